"""Small statistics shared by judge runs and sweeps (plain floats, no tensors).

    mean_ci(values) -> Estimate(mean, low, high, n): 95% normal interval, mean ± 1.96·s/√n
    band(values) -> (median, 5th, 95th percentile), linear interpolation
    agreement(a, b) -> (share equal, Cohen's κ) of two labellings of the same items
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass

Z95 = 1.959964


@dataclass(frozen=True)
class Estimate:
    mean: float | None
    low: float | None
    high: float | None
    n: int

    def to_dict(self) -> dict:
        return asdict(self)


def mean_ci(values: list[float]) -> Estimate:
    if not values:
        return Estimate(None, None, None, 0)
    mean = statistics.fmean(values)
    if len(values) < 2:
        return Estimate(mean, None, None, 1)
    half = Z95 * statistics.stdev(values) / math.sqrt(len(values))
    return Estimate(mean, mean - half, mean + half, len(values))


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def band(values: list[float]) -> dict | None:
    """{median, low (5%), high (95%), n} of a list, None when empty."""
    if not values:
        return None
    return {"median": quantile(values, 0.5), "low": quantile(values, 0.05), "high": quantile(values, 0.95),
            "n": len(values)}


def agreement(first: list[str], second: list[str]) -> dict:
    """Share of equal labels and Cohen's κ (None when undefined) over paired labels."""
    n = len(first)
    if n == 0:
        return {"n": 0, "agree": None, "kappa": None}
    observed = sum(a == b for a, b in zip(first, second, strict=True)) / n
    classes = set(first) | set(second)
    expected = sum((first.count(c) / n) * (second.count(c) / n) for c in classes)
    kappa = None if expected >= 1 else (observed - expected) / (1 - expected)
    return {"n": n, "agree": observed, "kappa": kappa}

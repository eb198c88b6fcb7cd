"""A pack build's time budget: the pace of its work measured as it trains, and what it predicts.

`Pace` holds moving averages (seconds per window forward, per token and site step, per SAE save, per
whole-model re-run on the loss windows); `finish_cost` predicts saving and evaluating from it;
`reserve` caps the evaluation's share of the budget; `recent_rate` is the training pace of the last
minutes, which the token target follows (`packs.fit_budget`).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from auditui.engine.packs import BuildPlan
    from auditui.engine.sites import Site


@dataclass
class Pace:
    """Seconds per unit of the build's work, measured as it trains, so they follow the machine's load
    (moving averages; 0 = not measured yet)."""

    forward: float = 0.0  # per window: the model's forward with every site hooked
    step: float = 0.0  # per token and site: one trainer step
    save: float = 0.0  # per SAE: export, save and reload through sae-lens (measured once)
    tail: float = 0.0  # re-running every layer on the loss windows, with the loss (probed every PROBE_SECONDS)
    encode: float = 0.0  # per token and SAE: an evaluation's encode + decode (probed with the re-run)

    @staticmethod
    def mix(old: float, new: float) -> float:
        return new if old == 0 else 0.8 * old + 0.2 * new


# Shares of the evaluation's parts, measured once on SmolLM2 (2 cores): re-running the layers from l
# costs TAIL_FIXED + TAIL_LAYERS (L - l) / L of re-running them all (the fixed part is the unembedding
# and its loss); an SAE encode + decode costs ENCODE_PER_STEP training steps until it is probed. The
# whole re-run and the encode are probed while training: on a machine shared with other jobs the
# re-run's small matmuls slow down far more than the training's large ones (10x was seen), and the
# encode's share of a step depends on the widths, so no fixed ratio to the training pace holds.
TAIL_FIXED, TAIL_LAYERS, ENCODE_PER_STEP = 0.28, 0.72, 0.85
PROBE_SECONDS = 120.0
RATE_SECONDS = 120.0
EVAL_SHARE = 0.2  # of a budgeted build's wall clock, at most, for the held-out pass and the spliced losses


@dataclass(frozen=True)
class FinishCost:
    """Predicted seconds of what follows training: saving, the held-out pass (per batch), the spliced losses."""

    save: float
    held_out_batch: float
    held_out_batches: int
    losses: float

    @property
    def total(self) -> float:
        return self.save + self.held_out_batch * self.held_out_batches + self.losses


def reserve(cost: FinishCost, plan: BuildPlan) -> tuple[float, float]:
    """(seconds kept after training, of which for the spliced losses): the predicted finish, its evaluation
    capped at EVAL_SHARE of the budget; past the cap the held-out pass and the losses shrink alike (a
    machine so loaded that evaluating would take most of the budget still trains for 80% of it)."""
    evaluate = cost.total - cost.save
    cap = EVAL_SHARE * 60 * plan.build_minutes
    scale = min(1.0, cap / evaluate) if evaluate > 0 and cap > 0 else 1.0
    return cost.save + scale * evaluate, scale * cost.losses


def finish_cost(plan: BuildPlan, sites: list[Site], n_layers: int, held_out_windows: int, pace: Pace) -> FinishCost:
    batch = plan.seqs_per_forward
    tokens = batch * (plan.seq_len - 1)
    held = batch * pace.forward + tokens * len(sites) * (pace.encode or ENCODE_PER_STEP * pace.step)
    tails = 2 + sum(2 * (TAIL_FIXED + TAIL_LAYERS * (n_layers - s.layer) / n_layers) for s in sites)  # + record, check
    losses = tails * (pace.tail or 1.3 * plan.ce_sequences * pace.forward) + plan.ce_sequences * pace.forward
    return FinishCost(len(sites) * pace.save, held, math.ceil(held_out_windows / batch), losses)


def recent_rate(samples: deque[tuple[float, int]], tokens: int, seconds: float) -> float:
    """Training tokens per second over the last RATE_SECONDS of (seconds, tokens) `samples` (pruned here),
    the whole run's average before that much has passed: the pace the rest of the run will most likely
    keep as the machine's load changes."""
    while len(samples) > 2 and samples[-1][0] - samples[1][0] >= RATE_SECONDS:
        samples.popleft()
    if len(samples) < 2 or samples[-1][0] - samples[0][0] < RATE_SECONDS / 4:
        return tokens / max(seconds, 1e-9)
    return (samples[-1][1] - samples[0][1]) / (samples[-1][0] - samples[0][0])

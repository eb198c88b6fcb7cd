"""A pack build's time budget: the pace of its work measured as it trains, and what it predicts.

`Pace` holds the measured seconds per window forward and per token and site step (moving averages),
per SAE save, and per whole-model re-run on the loss windows and SAE encode (medians of recent
probes); `finish_cost` predicts saving and evaluating from it;
`reserve` caps the evaluation's share of the budget; `recent_rate` is the training pace of the last
minutes, which the token target follows (`packs.fit_budget`).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from auditui.engine.packs import BuildPlan
    from auditui.engine.sites import Site


@dataclass
class Pace:
    """Seconds per unit of the build's work, measured as it trains, so they follow the machine's load
    (0 = not measured yet)."""

    forward: float = 0.0  # per window: the model's forward with every site hooked
    step: float = 0.0  # per token and site: one trainer step
    save: float = 0.0  # per SAE: export, save and reload through sae-lens (measured once)
    tail: float = 0.0  # re-running every layer on the loss windows, with the loss (probed every PROBE_SECONDS)
    tail_last: float = 0.0  # the same from the last layer only (probed with it)
    encode: float = 0.0  # per token and SAE: an evaluation's encode + decode (probed with the re-run)
    probing: float = 0.0  # the last probe's own seconds
    probes: dict[str, deque[float]] = field(default_factory=dict)  # the last PROBES_KEPT of each probe

    @staticmethod
    def mix(old: float, new: float) -> float:
        return new if old == 0 else 0.8 * old + 0.2 * new

    def probed(self, name: str, seconds: float) -> None:
        """Set the probed pace `name` ("tail", "tail_last", "encode") to the median of its last PROBES_KEPT probes: a
        probe is short, and one that another job preempted is an outlier the median drops (17x and 55x the
        others were seen with two spinners on the cores; a moving average kept it to the end), while a
        load that lasts moves the median within three probes."""
        kept = self.probes.setdefault(name, deque(maxlen=PROBES_KEPT))
        kept.append(seconds)
        setattr(self, name, statistics.median(kept))


# Until the re-runs are probed: re-running the layers from l costs TAIL_FIXED + TAIL_LAYERS (L - l) / L
# of re-running them all (the fixed part is the unembedding and its loss; measured once on SmolLM2, 2
# cores), and an SAE encode + decode costs ENCODE_PER_STEP training steps. Both are probed while
# training: on a machine shared with other jobs the re-run's small matmuls slow down far more than the
# training's large ones (10x was seen), and the fixed share is most of a small model's re-run.
TAIL_FIXED, TAIL_LAYERS, ENCODE_PER_STEP = 0.28, 0.72, 0.85
PROBE_SECONDS = 120.0
PROBES_KEPT = 5
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


def tail_seconds(pace: Pace, plan: BuildPlan, n_layers: int) -> tuple[float, float]:
    """(fixed, per layer) seconds of re-running the layers from l on the loss windows, which costs
    fixed + per_layer (L - l): from the two probes (from layer 0 and from the last), else from the
    forward's pace and the TAIL_ shares."""
    if pace.tail and n_layers > 1:
        per_layer = max(0.0, pace.tail - pace.tail_last) / (n_layers - 1)
        return max(0.0, pace.tail - per_layer * n_layers), per_layer
    whole = pace.tail or 1.3 * plan.ce_sequences * pace.forward
    return TAIL_FIXED * whole, TAIL_LAYERS * whole / n_layers


def finish_cost(plan: BuildPlan, sites: list[Site], n_layers: int, held_out_windows: int, pace: Pace) -> FinishCost:
    batch = plan.seqs_per_forward
    encode = pace.encode or ENCODE_PER_STEP * pace.step  # per token and SAE
    held = batch * pace.forward + batch * (plan.seq_len - 1) * len(sites) * encode
    fixed, per_layer = tail_seconds(pace, plan, n_layers)
    splice = plan.ce_sequences * plan.seq_len * encode  # the spliced run encodes every position
    tails = sum(2 * (fixed + per_layer * (n_layers - s.layer)) + splice for s in sites)  # spliced, ablated
    losses = 2 * (fixed + per_layer * n_layers) + tails + plan.ce_sequences * pace.forward  # + record, check, mask
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

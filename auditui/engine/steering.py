"""Steering plans (seed 001 section 3.5 and appendix B, seed 003): data, schedules, builders, steered sampling.

A plan is a list of features (site, latent), each with an operation (`interventions.OPS`: rescale,
add, clamp, mean_ablate; their formulas are in interventions.py) and a coefficient c_f, plus:

  layers     the layer of a feature is its flow position (`flow.position`: resid_pre(L) is the
             residual after layer L-1, every other site is its own layer). The span l_start..l_end
             is the plan's `span` (a flow graph's cut span), else the features' layers.
             "cumulative" (default): the features of layers l_start..l; "single": only layer l's;
             l = `layer`, default l_end (so a cumulative plan with no layer steers every feature).
  schedule   the coefficient of feature f at layer l, with s = c_f (times the row's strength):
               constant     s
               linear       s + (s* - s) (l - l_start) / (l_end - l_start)   (s at l_start, s* = `end`
                            at l_end, the seed's k·l + b; s on a one-layer span)
               exponential  s · e^(α l)   (α = `alpha`, l the absolute layer as in the seed)
  fold       multiply add and clamp coefficients by each feature's typical activation m_j: the mean
             of its SAE activation over the tokens where it fires (> 0), `typical_activations` of a
             set of site activations the caller chooses (e.g. the reference texts or the pack's
             held-out tokens) and passes as `typical={site: [d_sae]}`. Folded, "add s" adds s times
             the latent's typical reconstruction term (s · m_j · ||w_j|| along d_j) and "clamp c" sets
             the activation to c · m_j. Rescale (a ratio) and mean-ablation (a fraction) do not fold.
  scope      "all" | "prompt" | "generated" tokens of each row (interventions.py).

Several features of one site and operation compile to one `Intervention` (one SAE encode); a
site's interventions run in the plan's order. Mean-ablation needs the reference mean ā of its
sites (`means={site: [width]}`).

Strengths (steered sampling): a row's strength σ multiplies every feature's coefficient (c_f · σ
is the schedule's s), so a plan meant for a grid keeps c_f = 1 and the grid gives s (or r). Rows of
one batch carry different strengths; unsteered rows are left out of every intervention.

JSON (`SteeringPlan.to_dict`):
    {"format": "auditui-steering/1",
     "features": [{"feature": "12/resid_post/1234", "op": "add", "coefficient": 8.0}, ...],
     "mode": "cumulative" | "single", "layer": int | null, "span": [l_start, l_end] | null,
     "schedule": {"kind": "constant" | "linear" | "exponential", "end": s*, "alpha": α},
     "fold": bool, "scope": "all" | "prompt" | "generated", "source": "where the plan came from"}

Builders (pure): `plan_from_flow(graph)`, `plans_from_attribution(result, k)`,
`plan_from_features([(site, latent), ...])`, `parse_plan("12/resid_post/1234:add:8, ...")`.

`steered_samples(lm, bank, prompt_ids, plan, strengths, n, params, seed)` samples n completions
without the plan and n with it per strength, the same seeds seed..seed+n-1 in every group, all in
one batch (or `batch_size` rows at a time), and says per completion which token positions were
steered.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from auditui.engine.flow import Feature, FlowGraph, position
from auditui.engine.generation import generate_rows
from auditui.engine.interventions import OPS, SCOPES, Intervention, decoder_rows, mean_projections
from auditui.engine.model import LoadedModel
from auditui.engine.reference import rows_per_chunk
from auditui.engine.saes import SAEBank
from auditui.engine.sampling import Sample, SamplingParams
from auditui.engine.sites import Edit, Site
from auditui.errors import AuditError
from auditui.progress import QUIET, Progress

PLAN_FORMAT = "auditui-steering/1"
SCHEDULES = ("constant", "linear", "exponential")
MODES = ("cumulative", "single")
FOLDED = ("add", "clamp")
TYPED = "FEATURE:OP:COEFFICIENT, e.g. 12/resid_post/1234:add:8"


def _finite(value: float, what: str) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise AuditError(f"{what} must be a finite number, got {value}")
    return value


# -- plan data ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlanFeature:
    feature: Feature
    op: str = "add"
    coefficient: float = 1.0

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise AuditError(f"unknown operation {self.op!r} for {self.feature}; use {', '.join(OPS)}")
        object.__setattr__(self, "coefficient", _finite(self.coefficient, f"the coefficient of {self.feature}"))

    @property
    def layer(self) -> int:
        return position(self.feature.site)

    def to_dict(self) -> dict:
        return {"feature": str(self.feature), "op": self.op, "coefficient": self.coefficient}

    @classmethod
    def from_dict(cls, data: dict) -> PlanFeature:
        return cls(Feature.parse(data["feature"]), data.get("op", "add"), data.get("coefficient", 1.0))


@dataclass(frozen=True)
class Schedule:
    kind: str = "constant"
    end: float = 1.0  # s*: the linear schedule's value at l_end
    alpha: float = -0.05  # the exponential schedule's rate

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise AuditError(f"unknown schedule {self.kind!r}; use {', '.join(SCHEDULES)}")
        object.__setattr__(self, "end", _finite(self.end, "the linear schedule's end value s*"))
        object.__setattr__(self, "alpha", _finite(self.alpha, "the exponential schedule's alpha"))

    def value(self, s: float, layer: int, start: int, stop: int) -> float:
        """The coefficient at `layer` of a feature whose coefficient is s, on the span start..stop."""
        if self.kind == "linear" and stop > start:
            return s + (self.end - s) * (layer - start) / (stop - start)
        if self.kind == "exponential":
            return s * math.exp(self.alpha * layer)
        return s


@dataclass(frozen=True)
class SteeringPlan:
    """See the module docstring."""

    features: tuple[PlanFeature, ...]
    mode: str = "cumulative"
    layer: int | None = None
    span: tuple[int, int] | None = None
    schedule: Schedule = field(default_factory=Schedule)
    fold: bool = False
    scope: str = "all"
    source: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "features", tuple(self.features))
        if not self.features:
            raise AuditError("a steering plan needs at least one feature")
        seen = [(f.feature, f.op) for f in self.features]
        twice = sorted({f"{feature}:{op}" for feature, op in seen if seen.count((feature, op)) > 1})
        if twice:
            raise AuditError(f"the plan lists {', '.join(twice)} more than once")
        if self.mode not in MODES:
            raise AuditError(f"unknown layer selection {self.mode!r}; use {', '.join(MODES)}")
        if self.scope not in SCOPES:
            raise AuditError(f"unknown token scope {self.scope!r}; use {', '.join(SCOPES)}")
        if self.span is not None:
            object.__setattr__(self, "span", (int(self.span[0]), int(self.span[1])))
            if self.span[0] > self.span[1]:
                raise AuditError(f"the span starts at layer {self.span[0]} after its end {self.span[1]}")

    # -- layers and coefficients ---------------------------------------------------------------
    @property
    def bounds(self) -> tuple[int, int]:
        """(l_start, l_end): the span, else the features' first and last layers."""
        layers = [f.layer for f in self.features]
        return self.span or (min(layers), max(layers))

    @property
    def target_layer(self) -> int:
        """l: the single layer, or the last layer of a cumulative plan."""
        return self.bounds[1] if self.layer is None else self.layer

    def selected(self) -> list[PlanFeature]:
        """The features this plan steers: layer l only (single) or l_start..l (cumulative)."""
        start, target = self.bounds[0], self.target_layer
        chosen = [f for f in self.features if (f.layer == target if self.mode == "single" else start <= f.layer <= target)]
        if not chosen:
            where = f"layer {target}" if self.mode == "single" else f"layers {start}..{target}"
            raise AuditError(f"no feature of the plan lies at {where} "
                             f"(its features are at layers {sorted({f.layer for f in self.features})})")
        return chosen

    def coefficient(self, feature: PlanFeature, strength: float = 1.0) -> float:
        """The scheduled coefficient of a feature at its layer for a row of this strength (unfolded)."""
        return self.schedule.value(feature.coefficient * strength, feature.layer, *self.bounds)

    # -- data ------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": PLAN_FORMAT, "features": [f.to_dict() for f in self.features], "mode": self.mode,
                "layer": self.layer, "span": list(self.span) if self.span else None,
                "schedule": asdict(self.schedule), "fold": self.fold, "scope": self.scope, "source": self.source}

    @classmethod
    def from_dict(cls, data: dict) -> SteeringPlan:
        if data.get("format", PLAN_FORMAT) != PLAN_FORMAT:
            raise AuditError(f"not a steering plan (format {data.get('format')!r}, expected {PLAN_FORMAT})")
        try:
            features = tuple(PlanFeature.from_dict(f) for f in data["features"])
            return cls(features, data.get("mode", "cumulative"), data.get("layer"),
                       tuple(data["span"]) if data.get("span") else None,  # type: ignore[arg-type]
                       Schedule(**data.get("schedule", {})), bool(data.get("fold", False)),
                       data.get("scope", "all"), data.get("source", ""))
        except (KeyError, TypeError) as exc:
            raise AuditError(f"a steering plan is missing or mistypes a field: {exc}") from None


# -- compilation ----------------------------------------------------------------------------------
def _check_features(bank: SAEBank, features: Iterable[PlanFeature]) -> None:
    for f in features:
        if f.feature.site not in bank:
            raise AuditError(f"no SAE at {f.feature.site} for {f.feature} (SAEs loaded for: "
                             f"{', '.join(str(s) for s in bank.sites) or 'none'})")
        d_sae = int(bank.sae(f.feature.site).cfg.d_sae)
        if not 0 <= f.feature.latent < d_sae:
            raise AuditError(f"latent {f.feature.latent} is out of range for {f.feature.site} (d_sae {d_sae})")


def _fold_factors(bank: SAEBank, site: Site, op: str, latents: list[int],
                  typical: Mapping[Site, Tensor] | None) -> Tensor:
    """[k] multipliers of the coefficients of one (site, op) group: 1, or the folding of the docstring."""
    if op not in FOLDED:
        return torch.ones(len(latents))
    if typical is None or site not in typical:
        raise AuditError(f"folding needs the typical activations of {site} (typical_activations)")
    m = typical[site].float().cpu()[latents]  # [k]
    if op == "clamp":
        return m
    return m * decoder_rows(bank.sae(site), latents).norm(dim=1).cpu()


def plan_interventions(plan: SteeringPlan, bank: SAEBank, strengths: Sequence[float] = (1.0,),
                       typical: Mapping[Site, Tensor] | None = None,
                       means: Mapping[Site, Tensor] | None = None) -> list[Intervention]:
    """One Intervention per (site, op) of the selected features; strength rows = one per strength."""
    selected = plan.selected()
    _check_features(bank, selected)
    groups: dict[tuple[Site, str], list[PlanFeature]] = {}
    for f in selected:
        groups.setdefault((f.feature.site, f.op), []).append(f)
    out = []
    for (site, op), members in groups.items():
        latents = [f.feature.latent for f in members]
        fold = _fold_factors(bank, site, op, latents, typical) if plan.fold else torch.ones(len(latents))
        values = torch.tensor([[plan.coefficient(f, s) for f in members] for s in strengths]) * fold  # [rows, k]
        baseline: tuple[float, ...] = ()
        if op == "mean_ablate":
            if means is None or site not in means:
                raise AuditError(f"mean-ablation at {site} needs its reference mean ā")
            baseline = mean_projections(bank, site, latents, means[site])
        out.append(Intervention(site, tuple(latents), op, values, plan.scope, baseline))
    return out


def compile(plan: SteeringPlan, bank: SAEBank, strengths: Sequence[float | None] | None = None,
            prompt_lengths: Sequence[int] | None = None, typical: Mapping[Site, Tensor] | None = None,
            means: Mapping[Site, Tensor] | None = None) -> dict[Site, list[Edit]]:
    """SiteHooks edits of a plan. strengths: one per batch row (None: that row is not steered);
    default one strength 1 for every row. prompt_lengths: per row, for prompt/generated scopes."""
    rows = None if strengths is None else [s is not None for s in strengths]
    values = [1.0] if strengths is None else [1.0 if s is None else _finite(s, "a strength") for s in strengths]
    edits: dict[Site, list[Edit]] = {}
    for iv in plan_interventions(plan, bank, values, typical, means):
        edits.setdefault(iv.site, []).append(iv.edit(bank, prompt_lengths, rows))
    return edits


def typical_activations(bank: SAEBank, site: Site, x: Tensor) -> Tensor:
    """m [d_sae]: each latent's mean SAE activation over the rows x [n, width] where it fires (0 if never)."""
    sae = bank.sae(site)
    total = torch.zeros(sae.cfg.d_sae, device=sae.W_dec.device)
    count = torch.zeros_like(total)
    step = rows_per_chunk(sae.cfg.d_sae)
    with torch.no_grad():
        for start in range(0, x.shape[0], step):
            codes = sae.encode(x[start:start + step].to(sae.W_dec.device, torch.float32))
            codes = codes.to_dense() if codes.is_sparse else codes  # [chunk, d_sae]
            total += codes.clamp_min(0).sum(0)
            count += (codes > 0).sum(0)
    return total / count.clamp_min(1)


# -- builders -------------------------------------------------------------------------------------
def _reachable(graph: FlowGraph, cut: float) -> set[str]:
    """Residual nodes joined to the root by residual edges scoring at least `cut`."""
    links: dict[str, set[str]] = {}
    for edge in graph.edges:
        if edge.module == "R" and edge.score >= cut:
            links.setdefault(edge.source, set()).add(edge.target)
            links.setdefault(edge.target, set()).add(edge.source)
    kept, frontier = {str(graph.root)}, [str(graph.root)]
    while frontier:
        for other in links.get(frontier.pop(), ()):
            if other not in kept:
                kept.add(other)
                frontier.append(other)
    return kept


def plan_from_flow(graph: FlowGraph, op: str = "add", coefficient: float = 1.0, cut: float = 0.5,
                   module_cut: float = 0.15, **options: Any) -> SteeringPlan:
    """The residual nodes of the root's chain within t^(R) = cut, the module nodes feeding them with a
    score of at least module_cut (seed 001 appendix B), spanning l_start..l_end of those residual nodes."""
    residual = _reachable(graph, cut)
    modules = {e.source for e in graph.edges if e.module in ("M", "A") and e.score >= module_cut and e.target in residual}
    nodes = [n for n in graph.ordered_nodes() if n.id in residual | modules]
    layers = [n.layer for n in nodes if n.id in residual]
    features = tuple(PlanFeature(n.feature, op, coefficient) for n in nodes)
    source = f"flow graph of {graph.root} (t^(R)={cut}, modules > {module_cut})"
    return SteeringPlan(features, **{"span": (min(layers), max(layers)), "source": source, **options})


def plans_from_attribution(result: dict, k: int, together: bool = True, op: str = "rescale",
                           coefficient: float = 0.0, site: Site | str | None = None,
                           **options: Any) -> list[SteeringPlan]:
    """The top-k rows by Δ-attribution of an attribution result (optionally of one site): one plan
    with all k latents (together) or one plan per latent. Defaults steer away (rescale r = 0)."""
    if k < 1:
        raise AuditError(f"k must be at least 1 (got {k})")
    rows = [r for r in result.get("rows", []) if site is None or r["site"] == str(site)]
    if not rows:
        raise AuditError("the attribution result has no rows" + (f" at {site}" if site is not None else ""))
    top = sorted(rows, key=lambda r: -r["delta_attr"])[:k]
    features = [PlanFeature(Feature(Site.parse(r["site"]), int(r["latent"])), op, coefficient) for r in top]
    source = f"top {len(top)} of an attribution run by Δ-attribution"
    if together:
        return [SteeringPlan(tuple(features), **{"source": source, **options})]
    return [SteeringPlan((f,), **{"source": f"{source}: {f.feature}", **options}) for f in features]


def random_like(plan: SteeringPlan, bank: SAEBank, generator: torch.Generator,
                alive: Mapping[Site, Tensor] | None = None) -> SteeringPlan:
    """A plan of the same shape from random latents: each feature's latent replaced by one drawn
    uniformly from its site's other latents (none twice per site), same operations, coefficients,
    layers, schedule, folding and scope (the control of a steering effect). `alive` ({site: bool
    [d_sae]}): draw only latents marked True there, e.g. those with a typical activation > 0 when
    the plan folds (a folded latent that never fires adds nothing and would shrink the band to 0)."""
    pools: dict[Site, list[int]] = {}
    for f in plan.features:
        site = f.feature.site
        if site not in pools:
            keep = alive[site] if alive is not None and site in alive else torch.ones(bank.sae(site).cfg.d_sae, dtype=torch.bool)
            chosen = {g.feature.latent for g in plan.features if g.feature.site == site}
            order = torch.randperm(len(keep), generator=generator).tolist()
            pools[site] = [i for i in order if bool(keep[i]) and i not in chosen]
    features = []
    for f in plan.features:
        site = f.feature.site
        if not pools[site]:
            raise AuditError(f"{site} has no latent left for a random plan of the same shape")
        features.append(PlanFeature(Feature(site, pools[site].pop()), f.op, f.coefficient))
    return replace(plan, features=tuple(features), source=f"random latents shaped like: {plan.source or 'a plan'}")


def plan_from_features(features: Iterable[Feature | str | tuple[Site | str, int]], op: str = "add",
                       coefficient: float = 1.0, **options: Any) -> SteeringPlan:
    """A plan over a steering set: (site, latent) pairs, Features or `12/resid_post/1234` strings."""
    def feature(item: Feature | str | tuple[Site | str, int]) -> Feature:
        if isinstance(item, Feature):
            return item
        if isinstance(item, str):
            return Feature.parse(item)
        site, latent = item
        return Feature(Site.parse(site) if isinstance(site, str) else site, int(latent))

    chosen = tuple(PlanFeature(feature(item), op, coefficient) for item in features)
    return SteeringPlan(chosen, **{"source": "steering set", **options})


def parse_plan(text: str, **options: Any) -> SteeringPlan:
    """A typed plan: `12/resid_post/1234:add:8, 3/mlp/7:rescale:0` (FEATURE:OP:COEFFICIENT, comma-separated)."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise AuditError(f"type at least one feature as {TYPED}")
    features = []
    for item in items:
        parts = [p.strip() for p in item.split(":")]
        if len(parts) != 3:
            raise AuditError(f"cannot read {item!r}; write {TYPED}")
        feature = Feature.parse(parts[0])
        op = parts[1].lower().replace("-", "_")
        if op not in OPS:
            raise AuditError(f"unknown operation {parts[1]!r} in {item!r}; use {', '.join(OPS)}")
        try:
            coefficient = float(parts[2])
        except ValueError:
            raise AuditError(f"the coefficient {parts[2]!r} in {item!r} is not a number") from None
        features.append(PlanFeature(feature, op, coefficient))
    return SteeringPlan(tuple(features), **{"source": f"typed: {text.strip()}", **options})


# -- steered sampling -----------------------------------------------------------------------------
@dataclass
class SteeredSample:
    """One completion of a steered run; strength None = unsteered. Steered positions are the prompt
    positions (0 = first prompt token) and the completion token indices whose site tensors the plan
    edited (a completion's last token is never fed back unless the row stopped at EOS)."""

    text: str
    token_ids: list[int]
    seed: int
    finish_reason: str
    strength: float | None
    steered_prompt: list[int]
    steered_generated: list[int]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SteeredSample:
        return cls(**data)


def steered_positions(scope: str, n_prompt: int, sample: Sample) -> tuple[list[int], list[int]]:
    """(prompt positions, completion indices) of a steered row that passed through the hooks."""
    fed = max(0, len(sample.token_ids) - (sample.finish_reason != "eos"))
    prompt = list(range(n_prompt)) if scope in ("all", "prompt") else []
    generated = list(range(fed)) if scope in ("all", "generated") else []
    return prompt, generated


@dataclass
class SteeredRun:
    """Unsteered and steered completions of one prompt with the same seeds (group by `strength`)."""

    plan: SteeringPlan
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    n: int
    strengths: list[float]
    samples: list[SteeredSample]

    def group(self, strength: float | None) -> list[SteeredSample]:
        return [s for s in self.samples if s.strength == strength]

    def to_dict(self) -> dict:
        return {"plan": self.plan.to_dict(), "prompt_ids": self.prompt_ids, "params": asdict(self.params),
                "seed": self.seed, "n": self.n, "strengths": self.strengths,
                "samples": [s.to_dict() for s in self.samples]}

    @classmethod
    def from_dict(cls, data: dict) -> SteeredRun:
        return cls(SteeringPlan.from_dict(data["plan"]), list(data["prompt_ids"]), SamplingParams(**data["params"]),
                   int(data["seed"]), int(data["n"]), [float(s) for s in data["strengths"]],
                   [SteeredSample.from_dict(s) for s in data["samples"]])


def steered_samples(lm: LoadedModel, bank: SAEBank, prompt_ids: list[int], plan: SteeringPlan,
                    strengths: list[float], n: int, params: SamplingParams, seed: int,
                    typical: Mapping[Site, Tensor] | None = None, means: Mapping[Site, Tensor] | None = None,
                    batch_size: int | None = None, progress: Progress = QUIET, unsteered: bool = True) -> SteeredRun:
    """n unsteered completions (unless `unsteered` is False), then n per strength, seeds
    seed..seed+n-1 in every group (module docstring).

    All rows run as one batch unless batch_size is given. A stop request ends the run after the
    current batch (its unfinished rows have finish_reason "cancelled").
    """
    if not strengths or n < 1:
        raise AuditError("give at least one strength and one sample per strength")
    groups: list[float | None] = [None, *strengths] if unsteered else list(strengths)
    row_strengths = [s for s in groups for _ in range(n)]
    seeds = [seed + i for _ in groups for i in range(n)]
    size = batch_size or len(seeds)
    total = len(seeds) * params.max_new_tokens
    samples: list[SteeredSample] = []
    for start in range(0, len(seeds), size):
        if progress.should_stop():
            break
        part = slice(start, start + size)
        rows = len(seeds[part])
        edits = compile(plan, bank, row_strengths[part], [len(prompt_ids)] * rows, typical, means)
        batch = generate_rows(lm, [prompt_ids] * rows, seeds[part], params, edits, progress,
                              start * params.max_new_tokens, total)
        for sample, strength in zip(batch, row_strengths[part], strict=True):
            steered = steered_positions(plan.scope, len(prompt_ids), sample) if strength is not None else ([], [])
            samples.append(SteeredSample(sample.text, sample.token_ids, sample.seed, sample.finish_reason,
                                         strength, *steered))
        if any(s.finish_reason == "cancelled" for s in batch):
            break
    return SteeredRun(plan, list(prompt_ids), params, seed, n, [float(s) for s in strengths], samples)


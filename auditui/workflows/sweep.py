"""Strength sweeps judged, with a random-latent band (seed 001 section 4.2 and Figure 16).

    run_id = sweep(store, engine, session_id, SweepRequest(plan, prompt, strengths, n, ...), judge, progress)

A plan (and, with `compare_layers`, its single-layer and cumulative variants at every layer of
the plan) is sampled at every strength of the grid, n samples each with seeds seed..seed+n-1;
strength 0 is always part of the grid: it is the unsteered samples, shared by every curve. Rows of
different strengths of one plan share a batch. The band: M plans of the same shape from random
latents (`steering.random_like`: same sites, count, operations, folding), sampled at the same
strengths and seeds; when the plan folds, only latents that fire on the session's texts are drawn
(a folded latent that never fires adds nothing). Plans must add or mean-ablate (strength 0 is then
the unsteered model). Every text is judged (cached), and gets its perplexity under the unsteered
model and its repetition rate.

Per strength and curve: behaviour b, coherence c and the score b·c (toward) or (1 - b)·c (away),
each a mean with a 95% interval over the scored samples, the unscored/failed count beside it.
Band per strength: median and 5-95% of the M random plans' mean score and mean behaviour; a
strength's effect is `real` only where the plan's mean score lies outside the band. Best strength:
chosen on the even seeds of the first curve, its score reported on the odd seeds (a held-out
estimate). Run kind "sweep"; every completion is stored with intervention {plan, strength, run_id,
curve | band}.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

import torch

from auditui.engine.attribution import check_sites
from auditui.engine.sampling import SamplingParams, check_counts, random_seed, use_chat
from auditui.engine.steering import SteeringPlan, random_like, steered_samples
from auditui.errors import AuditError
from auditui.judge.client import Judge
from auditui.progress import QUIET, Progress
from auditui.stats import band, mean_ci
from auditui.text import number, yes_no
from auditui.workflows.judge import Grade, Grading, Item, Tally, grade, text_metrics
from auditui.workflows.runs import provenance, recorded_run
from auditui.workflows.steer import Inputs, check_on, steering_inputs, store_samples

if TYPE_CHECKING:
    from auditui.engine import Engine
    from auditui.store.database import Store

SWEEP_KIND = "sweep"
SCALED = ("add", "mean_ablate")  # operations whose coefficient 0 leaves the model unsteered
DIRECTIONS = ("toward", "away")
MAX_ROWS = 4096
MAX_BAND = 64


@dataclass(frozen=True)
class SweepRequest:
    plan: SteeringPlan
    prompt: str
    grading: Grading
    strengths: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)
    n: int = 8
    params: SamplingParams = SamplingParams()
    seed: int | None = None
    band: int = 0  # M random plans of the same shape
    direction: str = "toward"
    compare_layers: bool = False
    band_seed: int = 0
    on: str = "audited"  # or "reference": the engine given is the session's reference model (steer toward)

    @property
    def grid(self) -> list[float]:
        """The steered strengths (0 is the unsteered samples), ascending, each once."""
        return sorted({float(s) for s in self.strengths} - {0.0})

    def curves(self) -> list[tuple[str, SteeringPlan]]:
        if not self.compare_layers:
            return [("plan", self.plan)]
        layers = sorted({f.layer for f in self.plan.features})
        return [("plan", self.plan)] + [(f"{mode} @ {layer}", replace(self.plan, mode=mode, layer=layer))
                                        for layer in layers for mode in ("single", "cumulative")]

    def rows(self) -> int:
        return self.n * (1 + len(self.grid) * (len(self.curves()) + self.band))

    def validate(self) -> None:
        self.grading.validate()
        check_on(self.on)
        if not self.prompt.strip():
            raise AuditError("type a prompt to sweep")
        if not self.grid:
            raise AuditError("give at least one strength other than 0 (0, the unsteered samples, is always included)")
        if self.direction not in DIRECTIONS:
            raise AuditError(f"direction is {' or '.join(DIRECTIONS)} (got {self.direction!r})")
        if not 0 <= self.band <= MAX_BAND:
            raise AuditError(f"the band takes 0..{MAX_BAND} random plans (got {self.band})")
        if self.n < 2:
            raise AuditError("a sweep needs at least 2 samples per strength (half choose the best strength, "
                             "half report it)")
        check_counts(self.n, self.seed or 0, self.n)
        if self.rows() > MAX_ROWS:
            raise AuditError(f"{self.rows()} completions asked for; at most {MAX_ROWS} per sweep "
                             "(fewer strengths, samples or band plans)")
        ops = sorted({f.op for f in self.plan.features} - set(SCALED))
        if ops:
            raise AuditError(f"a sweep scales add and mean-ablation coefficients, where strength 0 is the unsteered "
                             f"model; this plan uses {', '.join(ops)} (give --op add, or use steer with strengths)")
        if all(f.coefficient == 0 for f in self.plan.features):
            raise AuditError("every coefficient of the plan is 0: no strength would steer (give --coefficient)")
        for _, plan in self.curves():
            plan.selected()


def _score(grade_: Grade, direction: str) -> float | None:
    b, c = grade_.value("behaviour"), grade_.value("coherence")
    if b is None or c is None:
        return None
    return (b if direction == "toward" else 1 - b) * c


def _point(grades: list[Grade], metrics: list[dict], direction: str) -> dict:
    def values(name: str) -> list[float]:
        return [v for g in grades if (v := g.value(name)) is not None]

    scores = [v for g in grades if (v := _score(g, direction)) is not None]
    failed = sum(g.status in ("unscored", "error") for g in grades)
    asked = sum(g.status != "cancelled" for g in grades)
    return {"behaviour": mean_ci(values("behaviour")).to_dict(), "coherence": mean_ci(values("coherence")).to_dict(),
            "score": mean_ci(scores).to_dict(), "n": len(grades), "unscored": failed,
            "failure_rate": failed / asked if asked else None,
            "perplexity": mean_ci([m["perplexity"] for m in metrics if m["perplexity"] is not None]).mean,
            "repetition": mean_ci([m["repetition"] for m in metrics]).mean}


@dataclass
class Texts:
    """The sweep's graded texts by (group, strength): group "unsteered", a curve label or "band i"."""

    grades: dict[tuple[str, float], list[Grade]]
    metrics: dict[tuple[str, float], list[dict]]
    seeds: dict[tuple[str, float], list[int]]

    def point(self, group: str, strength: float, direction: str, seeds: set[int] | None = None) -> dict:
        key = ("unsteered", 0.0) if strength == 0 else (group, strength)
        keep = [i for i, s in enumerate(self.seeds.get(key, [])) if seeds is None or s in seeds]
        return _point([self.grades[key][i] for i in keep], [self.metrics[key][i] for i in keep], direction)


@dataclass(frozen=True)
class Batch:
    """Plans to sample at the same strengths and seeds, unsteered once, and grade (sweeps, validation)."""

    prompt: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    n: int
    strengths: list[float]  # steered strengths, 0 excluded
    plans: list[tuple[str, SteeringPlan]]  # (group label, plan); "band i" labels mark random plans
    on: str = "audited"

    @property
    def rows(self) -> int:
        return self.n * (1 + len(self.strengths) * len(self.plans))


@dataclass
class Graded:
    texts: Texts
    completion_ids: list[int | None]
    tally: Tally
    notes: list[str]
    complete: bool


def sample_and_grade(store: Store, engine: Engine, session_id: int, run_id: int, batch: Batch, grading: Grading,
                     judge: Judge, progress: Progress = QUIET, inputs: Inputs | None = None) -> Graded:
    """Sample every plan of the batch (stored under run_id), then judge and measure every text.
    `inputs`: the plans' steering inputs when the caller has them (random plans share their sites)."""
    inputs = inputs or steering_inputs(store, engine, session_id, [plan for _, plan in batch.plans], progress)
    prompt_id = store.add_prompt(session_id, batch.prompt, batch.prompt_ids, system=batch.params.system,
                                 chat=bool(batch.params.chat))
    stored = asdict(batch.params)
    rows = []
    for index, (group, plan) in enumerate(batch.plans):
        done = steered_samples(engine.lm, engine.bank, batch.prompt_ids, plan, batch.strengths, batch.n, batch.params,
                               batch.seed, inputs.typical, inputs.means, None, progress, unsteered=index == 0)
        tag = {"band": int(group.split()[1])} if group.startswith("band ") else {"curve": group}
        ids = store_samples(store, engine, prompt_id, run_id, plan, done.samples, stored, tag, batch.on)
        rows += [("unsteered" if s.strength is None else group, 0.0 if s.strength is None else s.strength, s, pk)
                 for s, pk in zip(done.samples, ids, strict=True)]
        if any(pk is None for pk in ids):
            break
    kept = [r for r in rows if r[3] is not None]
    store.delete_empty_prompt(prompt_id)  # stopped before its first completion: no empty prompt is left
    completions = store.completions_by_ids([r[3] for r in kept])
    grades, tally = grade(store, session_id, judge, grading,
                          [Item(c["id"], batch.prompt, c["text"]) for c in completions], run_id, progress)
    # after a stop the metrics are still computed (seconds), so what was sampled and graded is kept
    metrics = text_metrics(store, engine, completions, QUIET if progress.should_stop() else progress)
    texts = Texts({}, {}, {})
    by_id = {c["id"]: (g, m) for c, g, m in zip(completions, grades, metrics, strict=True)}
    for group, strength, sample, pk in kept:
        texts.grades.setdefault((group, strength), []).append(by_id[pk][0])
        texts.metrics.setdefault((group, strength), []).append(by_id[pk][1])
        texts.seeds.setdefault((group, strength), []).append(sample.seed)
    complete = len(kept) == batch.rows and all(g.status != "cancelled" for g in grades)
    return Graded(texts, [r[3] for r in rows], tally, inputs.notes, complete)


def prepared(engine: Engine, prompt: str, params: SamplingParams, seed: int | None) -> tuple[list[int], SamplingParams, int]:
    """The prompt's ids (chat template as the params say), the params with chat decided, the seed."""
    chat = use_chat(engine.lm, params)
    return (engine.lm.prompt_ids(prompt, chat=chat, system=params.system), replace(params, chat=chat),
            random_seed() if seed is None else seed)


def sweep(store: Store, engine: Engine, session_id: int, request: SweepRequest, judge: Judge,
          progress: Progress = QUIET) -> int:
    """Sample, judge and summarise a strength sweep with its random band; the run id."""
    request.validate()
    curves = request.curves()
    sites = check_sites(engine, sorted({f.feature.site for f in request.plan.features}))
    prompt_ids, params, seed = prepared(engine, request.prompt, request.params, request.seed)
    record = {"plan": request.plan.to_dict(), "prompt": request.prompt, "strengths": [0.0, *request.grid],
              "n": request.n, "params": asdict(params), "seed": seed, "band": request.band,
              "band_seed": request.band_seed, "direction": request.direction, "compare_layers": request.compare_layers,
              "judge": judge.config.describe(), "rubric": request.grading.describe(), "on": request.on,
              "model_id": engine.lm.model_id}
    seeds = [seed + i for i in range(request.n)]
    with recorded_run(store, session_id, SWEEP_KIND, record, provenance(engine.lm, engine, sites, seeds)) as run:
        inputs = steering_inputs(store, engine, session_id, [plan for _, plan in curves], progress)
        generator = torch.Generator().manual_seed(request.band_seed)
        alive = {site: t > 0 for site, t in inputs.typical.items()} if inputs.typical else None  # folded: firing ones
        band_plans = [(f"band {i}", random_like(request.plan, engine.bank, generator, alive)) for i in range(request.band)]
        batch = Batch(request.prompt, prompt_ids, params, seed, request.n, request.grid, curves + band_plans, request.on)
        graded = sample_and_grade(store, engine, session_id, run.run_id, batch, request.grading, judge, progress, inputs)
        result = summarise(graded.texts, request, [label for label, _ in curves], [p for _, p in band_plans], seeds)
        result.update(graded_record(graded, judge, request.grading))
        (run.done if graded.complete else run.partial)(result, _summary(result))
    return run.run_id


def graded_record(graded: Graded, judge: Judge, grading: Grading) -> dict:
    return {"completion_ids": graded.completion_ids, "notes": graded.notes, "counts": {**graded.tally.__dict__},
            "failure_rate": graded.tally.failure_rate(), "judge": judge.config.describe(), "rubric": grading.describe()}


def summarise(texts: Texts, request: SweepRequest, curves: list[str], band_plans: list[SteeringPlan],
              seeds: list[int]) -> dict:
    strengths = [0.0, *request.grid]
    direction = request.direction
    out_curves = [{"label": label, "points": [{"strength": s, **texts.point(label, s, direction)} for s in strengths]}
                  for label in curves]
    band_points = []
    for s in strengths:
        means = [texts.point(f"band {i}", s, direction) for i in range(len(band_plans))]
        band_points.append({"strength": s,
                            "score": band([m["score"]["mean"] for m in means if m["score"]["mean"] is not None]),
                            "behaviour": band([m["behaviour"]["mean"] for m in means
                                               if m["behaviour"]["mean"] is not None])})
    for curve in out_curves:
        for point, edge in zip(curve["points"], band_points, strict=True):
            mean, limits = point["score"]["mean"], edge["score"]
            point["real"] = None if mean is None or limits is None or point["strength"] == 0 else \
                not limits["low"] <= mean <= limits["high"]
    choose, report = set(seeds[0::2]), set(seeds[1::2])
    first = curves[0]
    chosen = [(texts.point(first, s, direction, choose)["score"]["mean"], s) for s in strengths]
    chosen = [(m, s) for m, s in chosen if m is not None]
    best = None
    if chosen:
        chosen_score, strength = max(chosen)
        best = {"curve": first, "strength": strength, "chosen_on_seeds": sorted(choose), "chosen_score": chosen_score,
                "reported_on_seeds": sorted(report),
                "reported_score": texts.point(first, strength, direction, report)["score"],
                "plan": _scaled(request.plan, strength).to_dict()}
    return {"direction": direction, "strengths": strengths, "curves": out_curves,
            "band": {"plans": [p.to_dict() for p in band_plans], "points": band_points}, "best": best}


def _scaled(plan: SteeringPlan, strength: float) -> SteeringPlan:
    """The plan at a strength, as a plan to steer with at strength 1."""
    return replace(plan, features=tuple(replace(f, coefficient=f.coefficient * strength) for f in plan.features),
                   source=f"{plan.source or 'plan'} at the sweep's best strength {strength:g}")


def _fmt(estimate: dict | None, key: str = "mean") -> str:
    return number(estimate.get(key) if estimate else None, ".2f")


def _summary(result: dict) -> dict:
    rows = []
    for curve in result["curves"]:
        for point, edge in zip(curve["points"], result["band"]["points"], strict=True):
            rows.append([curve["label"], point["strength"], _fmt(point["behaviour"]), _fmt(point["coherence"]),
                         _fmt(point["score"]), f"{_fmt(edge['score'], 'low')}..{_fmt(edge['score'], 'high')}",
                         yes_no(point["real"]), point["unscored"]])
    best, rate = result["best"], result["failure_rate"]
    headline = (f"sweep ({result['direction']}) over strengths {result['strengths']}: best "
                + (f"{best['strength']:g} (score {best['chosen_score']:.2f} on half the seeds, "
                   f"{_fmt(best['reported_score'])} on the other half)" if best else "none (nothing scored)")
                + f"; unscored or failed {'-' if rate is None else f'{rate:.0%}'}")
    return {"headline": headline,
            "table": {"columns": ["curve", "strength", "behaviour", "coherence", "score", "band 5-95%", "outside band",
                                  "unscored"], "rows": rows},
            "notes": [*result["notes"], f"graded by {result['judge']['model']} at {result['judge']['base_url']}"]}

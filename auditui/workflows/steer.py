"""Steering as a run: a plan (built from a flow run, an attribution run, the steering set, a file or
typed text), the same prompt and seeds without and with it for each strength, in one batched call.

    plan = plan_for(store, session_id, PlanSource(...), **plan options)
    run_id = steer(store, engine, session_id, SteerRequest(plan, prompt, strengths, n, params, seed), progress)

Every completion is stored: the unsteered ones as ordinary completions (on-policy, they may be
labelled and attributed), the steered ones with `intervention` = {"plan", "strength", "run_id"}, so
they never enter pairs or reference means. Run kind "steer": params {plan, prompt, strengths, n,
params, seed, batch_size}, result = `SteeredRun.to_dict()` plus the completion ids (same order as
its samples), summary = a table of strength x seed with the text.

Mean-ablation uses the session's reference means ā (`workflows.reference`); folding multiplies add
and clamp coefficients by each latent's typical activation, the mean of its SAE activation over the
tokens where it fires in the session's own unsteered texts (said in the run's notes).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from auditui.engine.attribution import check_sites
from auditui.engine.flow import FlowGraph
from auditui.engine.reference import read_sites
from auditui.engine.sampling import SamplingParams, check_counts, random_seed, use_chat
from auditui.engine.sites import Site
from auditui.engine.steering import (
    FOLDED,
    SteeredSample,
    SteeringPlan,
    parse_plan,
    plan_from_features,
    plan_from_flow,
    plans_from_attribution,
    steered_samples,
    typical_activations,
)
from auditui.errors import AuditError
from auditui.progress import QUIET, Progress
from auditui.workflows.attribute import attribution_run
from auditui.workflows.reference import reference_means, session_sequences
from auditui.workflows.runs import provenance, recorded_run

if TYPE_CHECKING:
    from auditui.engine import Engine
    from auditui.store.database import Store

STEER_KIND = "steer"
MAX_ROWS = 512  # strengths x samples of one request
MODELS = ("audited", "reference")  # the model a steering run samples (the session's reference model: toward)


def check_on(on: str) -> None:
    if on not in MODELS:
        raise AuditError(f"--on takes {' or '.join(MODELS)}, not {on!r}")


@dataclass(frozen=True)
class PlanSource:
    """Where a plan comes from: exactly one of the fields."""

    file: str | None = None  # a plan JSON file
    flow_run: int | None = None
    attribution_run: int | None = None
    top: int = 10  # latents of the attribution run, taken together
    steering_set: bool = False
    typed: str | None = None  # 12/resid_post/1234:add:8, ...

    def chosen(self) -> list[str]:
        return [name for name, given in (("--plan", self.file), ("--from-flow", self.flow_run is not None),
                                         ("--from-attribution", self.attribution_run is not None),
                                         ("--from-set", self.steering_set), ("--features", self.typed)) if given]


def _run_of(store: Store, run_id: int, kind: str) -> dict:
    run = attribution_run(store, run_id) if kind == "attribution" else store.run(run_id)
    if run["kind"] != kind or run["status"] != "done":
        raise AuditError(f"run {run_id} is not a finished {kind} run ({run['kind']}, {run['status']})")
    return run


def plan_for(store: Store, session_id: int, source: PlanSource, **options: Any) -> SteeringPlan:
    """The plan `source` names; `options` are SteeringPlan fields (op and coefficient for builders)."""
    chosen = source.chosen()
    if len(chosen) != 1:
        raise AuditError("give exactly one plan source: --plan FILE, --from-flow RUN, --from-attribution RUN, "
                         f"--from-set or --features (got {', '.join(chosen) or 'none'})")
    op_options = {key: options.pop(key) for key in ("op", "coefficient") if key in options}
    if source.file is not None:
        try:
            data = json.loads(Path(source.file).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise AuditError(f"cannot read the plan file {source.file}: {exc}") from None
        if not isinstance(data, dict):
            raise AuditError(f"{source.file} is not a steering plan (a JSON object)")
        plan = SteeringPlan.from_dict(data)
        return replace(plan, **options) if options else plan
    if source.flow_run is not None:
        graph = FlowGraph.from_dict(_run_of(store, source.flow_run, "flow")["result"])
        return plan_from_flow(graph, **op_options, **options)
    if source.attribution_run is not None:
        result = _run_of(store, source.attribution_run, "attribution")["result"]
        return plans_from_attribution(result, source.top, together=True, **op_options, **options)[0]
    if source.steering_set:
        features = [(f["site"], f["latent"]) for f in store.features(session_id)]
        if not features:
            raise AuditError("the steering set is empty; add latents with `s` in the Attribution or Flow screen")
        return plan_from_features(features, **op_options, **options)
    return parse_plan(source.typed or "", **options)


@dataclass(frozen=True)
class SteerRequest:
    plan: SteeringPlan
    prompt: str
    strengths: tuple[float, ...] = (1.0,)
    n: int = 4
    params: SamplingParams = SamplingParams()
    seed: int | None = None
    batch_size: int | None = None  # None: all rows in one batch
    on: str = "audited"  # or "reference": the engine given is the session's reference model

    def validate(self) -> None:
        check_on(self.on)
        if not self.prompt.strip():
            raise AuditError("type a prompt to steer")
        if not self.strengths:
            raise AuditError("give at least one strength")
        rows = self.n * (len(self.strengths) + 1)
        check_counts(self.n, self.seed or 0, self.batch_size or rows)
        if rows > MAX_ROWS:
            raise AuditError(f"{rows} completions asked for; at most {MAX_ROWS} per steering run")


def _typical(store: Store, engine: Engine, session_id: int, sites: list[Site]) -> dict[Site, Tensor]:
    rows: dict[Site, list[Tensor]] = {site: [] for site in sites}
    for batch, _ids, acts in read_sites(engine.lm, session_sequences(store, session_id), sites):
        for site in sites:
            rows[site] += [acts[site][b, seq.counted_from:len(seq)] for b, seq in enumerate(batch)]
    return {site: typical_activations(engine.bank, site, torch.cat(rows[site])) for site in sites}


def _summary(result: dict) -> dict:
    rows = [["-" if s["strength"] is None else s["strength"], s["seed"], s["finish_reason"],
             " ".join(s["text"].split())[:80]] for s in result["samples"]]
    plan = result["plan"]
    return {"headline": f"steering {len(plan['features'])} features ({plan['mode']}, {plan['schedule']['kind']}, "
                        f"scope {plan['scope']}) at strengths {result['strengths']}, {result['n']} samples each",
            "table": {"columns": ["strength", "seed", "finish", "completion"], "rows": rows},
            "notes": result["notes"]}


@dataclass(frozen=True)
class Inputs:
    """What compiling plans needs from the session: typical activations (folding), reference means."""

    typical: dict[Site, Tensor] | None
    means: dict[Site, Tensor] | None
    notes: list[str]


def steering_inputs(store: Store, engine: Engine, session_id: int, plans: list[SteeringPlan],
                    progress: Progress = QUIET) -> Inputs:
    selected = [(plan, f) for plan in plans for f in plan.selected()]
    notes = []
    means = None
    if any(f.op == "mean_ablate" for _, f in selected):
        sites = sorted({f.feature.site for _, f in selected if f.op == "mean_ablate"})
        means = reference_means(store, engine, session_id, sites, progress=progress).means
        notes.append("mean-ablation to the session's reference means ā")
    typical = None
    folded = sorted({f.feature.site for plan, f in selected if plan.fold and f.op in FOLDED})
    if folded:
        typical = _typical(store, engine, session_id, folded)
        notes.append("add/clamp coefficients folded by each latent's mean activation where it fires, "
                     "over the session's unsteered texts")
    return Inputs(typical, means, notes)


def store_samples(store: Store, engine: Engine, prompt_id: int, run_id: int, plan: SteeringPlan,
                  samples: list[SteeredSample], params: dict, tag: dict | None = None,
                  on: str = "audited") -> list[int | None]:
    """Store a plan's samples (cancelled ones as None): unsteered ones of the audited model as ordinary
    completions; steered ones with intervention {plan, strength, run_id, **tag}. Every sample of the
    reference model carries an intervention ({"plan": None, ...} unsteered, with "model": "reference"),
    so none enters the audited model's pairs, texts or reference means."""
    ids: list[int | None] = []
    extra = {**(tag or {}), **({"model": "reference"} if on == "reference" else {})}
    for sample in samples:
        if sample.finish_reason == "cancelled":
            ids.append(None)
            continue
        steered = sample.strength is not None
        intervention = {"plan": plan.to_dict() if steered else None, "strength": sample.strength, "run_id": run_id,
                        **extra} if steered or on == "reference" else None
        ids.append(store.add_completion(prompt_id, sample.text, sample.token_ids, sample.seed, params,
                                        model_id=engine.lm.model_id, finish_reason=sample.finish_reason,
                                        intervention=intervention, run_id=run_id))
    return ids


def steer(store: Store, engine: Engine, session_id: int, request: SteerRequest, progress: Progress = QUIET) -> int:
    """Sample unsteered and steered completions side by side and store them; the run id."""
    request.validate()
    lm, plan = engine.lm, request.plan
    sites = check_sites(engine, sorted({f.feature.site for f in plan.selected()}))
    chat = use_chat(lm, request.params)
    prompt_ids = lm.prompt_ids(request.prompt, chat=chat, system=request.params.system)
    seed = random_seed() if request.seed is None else request.seed
    stored = {**asdict(request.params), "chat": chat}
    params = {"plan": plan.to_dict(), "prompt": request.prompt, "strengths": list(request.strengths), "n": request.n,
              "params": stored, "seed": seed, "batch_size": request.batch_size, "on": request.on,
              "model_id": lm.model_id}
    seeds = [seed + i for i in range(request.n)]
    with recorded_run(store, session_id, STEER_KIND, params, provenance(lm, engine, sites, seeds)) as run:
        inputs = steering_inputs(store, engine, session_id, [plan], progress)
        done = steered_samples(lm, engine.bank, prompt_ids, plan, list(request.strengths), request.n,
                               replace(request.params, chat=chat), seed, inputs.typical, inputs.means,
                               request.batch_size, progress)
        prompt_id = store.add_prompt(session_id, request.prompt, prompt_ids, system=request.params.system, chat=chat)
        ids = store_samples(store, engine, prompt_id, run.run_id, plan, done.samples, stored, on=request.on)
        result = {**done.to_dict(), "prompt_id": prompt_id, "completion_ids": ids, "notes": inputs.notes}
        (run.partial if None in ids or len(ids) < request.n * (len(request.strengths) + 1) else run.done)(
            result, _summary(result))
    return run.run_id

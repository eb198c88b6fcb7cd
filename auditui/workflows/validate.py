"""Seed 003's comparison (Figures 1-2): do the top Δ-attribution latents change the behaviour when
steered, more often than the top Δ-activation latents, against a band of random latents?

    run_id = validate(store, engine, session_id, ValidateRequest(attribution_run, prompt, grading), judge, progress)

At one site of an attribution run, its top-k latents by Δ-attribution and its top-k by
Δ-activation are each steered alone, toward (add +s) and away (add -s), folded by their typical
activation, n samples each with the same seeds; M random latents of the same site (none of either set), steered
the same way, give the band. The effect of a latent in a direction is Δb = mean behaviour steered -
mean behaviour unsteered (the same unsteered samples for all). A latent leaves the band toward when
its Δb is above the random latents' 95th percentile, away when below their 5th; the result counts
how many of each set leave it. With the session's reference model given (seed 003: steer the
audited model away, a separate aligned model toward), the toward rows are sampled on the reference
model, each direction against its own model's unsteered samples. Run kind "validate".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch

from auditui.engine.attribution import check_sites
from auditui.engine.flow import Feature
from auditui.engine.sampling import SamplingParams, check_counts
from auditui.engine.sites import Site
from auditui.engine.steering import PlanFeature, SteeringPlan
from auditui.errors import AuditError
from auditui.judge.client import Judge
from auditui.progress import QUIET, Progress
from auditui.stats import band
from auditui.text import yes_no
from auditui.workflows.attribute import attribution_run
from auditui.workflows.judge import Grading, Tally
from auditui.workflows.runs import provenance, recorded_run
from auditui.workflows.steer import steering_inputs
from auditui.workflows.sweep import Batch, Graded, Texts, graded_record, prepared, sample_and_grade

if TYPE_CHECKING:
    from auditui.engine import Engine
    from auditui.store.database import Store

VALIDATE_KIND = "validate"
MAX_K = 50


@dataclass(frozen=True)
class ValidateRequest:
    attribution_run: int
    prompt: str
    grading: Grading
    site: str | None = None  # default: the run's first site
    k: int = 10
    strength: float = 4.0
    n: int = 4
    band: int = 8
    params: SamplingParams = SamplingParams()
    seed: int | None = None
    band_seed: int = 0

    def validate(self) -> None:
        self.grading.validate()
        if not self.prompt.strip():
            raise AuditError("type a prompt to steer")
        if not 1 <= self.k <= MAX_K:
            raise AuditError(f"k is 1..{MAX_K} latents per set (got {self.k})")
        if not self.strength > 0:
            raise AuditError(f"the strength is a positive number, applied as +s and -s (got {self.strength})")
        if self.band < 2:
            raise AuditError("the random band needs at least 2 random latents")
        check_counts(self.n, self.seed or 0, self.n)


def latent_sets(result: dict, site: str | None, k: int) -> tuple[str, list[int], list[int]]:
    """(site, top-k by Δ-attribution, top-k by Δ-activation) of an attribution result."""
    sites = list(result.get("sites", {}))
    chosen = site or (sites[0] if sites else None)
    if chosen not in result.get("sites", {}):
        raise AuditError(f"the attribution run has no site {chosen}; it has {', '.join(sites) or 'none'}")
    rows = sorted((r for r in result["rows"] if r["site"] == chosen), key=lambda r: r["rank"])
    return chosen, [int(r["latent"]) for r in rows[:k]], [int(x) for x in result["sites"][chosen]["act_top"][:k]]


def _plan(site: Site, latent: int) -> SteeringPlan:
    return SteeringPlan((PlanFeature(Feature(site, latent), "add", 1.0),), fold=True, scope="generated",
                        source=f"validation of {site}/{latent}")


def _effects(texts: dict[str, Texts], group: str, strength: float) -> dict:
    """Δb toward (+s) and away (-s), each against the unsteered samples of the model it was steered on."""
    out = {}
    for name, s in (("toward", strength), ("away", -strength)):
        base = texts[name].point("unsteered", 0.0, "toward")["behaviour"]["mean"]
        point = texts[name].point(group, s, "toward")
        mean = point["behaviour"]["mean"]
        out[name] = {"delta_behaviour": None if mean is None or base is None else mean - base,
                     "behaviour": point["behaviour"], "coherence": point["coherence"], "unscored": point["unscored"]}
    return out


def summarise(texts: dict[str, Texts], site: str, attr: list[int], act: list[int], m: int, strength: float) -> dict:
    """`texts` by direction ("toward", "away"): the same Texts, or the reference model's for toward."""
    random = [_effects(texts, f"band {i}", strength) for i in range(m)]
    edges = {d: band([r[d]["delta_behaviour"] for r in random if r[d]["delta_behaviour"] is not None])
             for d in ("toward", "away")}

    def rows(latents: list[int]) -> list[dict]:
        out = []
        for latent in latents:
            effect = _effects(texts, f"latent {latent}", strength)
            for direction, edge in edges.items():
                delta = effect[direction]["delta_behaviour"]
                outside = None if delta is None or edge is None else (
                    delta > edge["high"] if direction == "toward" else delta < edge["low"])
                effect[direction]["leaves_band"] = outside
            out.append({"latent": latent, **effect})
        return out

    sets = {"attribution": rows(attr), "activation": rows(act)}
    counts = {name: {d: sum(bool(r[d]["leaves_band"]) for r in latents) for d in ("toward", "away")} | {
        "latents": len(latents)} for name, latents in sets.items()}
    return {"site": site, "strength": strength, "sets": sets, "band": {"edges": edges, "random": random},
            "leaving_band": counts, "overlap": sorted(set(attr) & set(act))}


def validate(store: Store, engine: Engine, session_id: int, request: ValidateRequest, judge: Judge,
             progress: Progress = QUIET, reference: Engine | None = None) -> int:
    """The run id. With `reference` (the session's reference model, same SAEs), the toward rows are
    sampled on it and the away rows on the audited model."""
    request.validate()
    run = attribution_run(store, request.attribution_run)
    if run["kind"] != "attribution" or run["status"] != "done" or run["session_id"] != session_id:
        raise AuditError(f"run {request.attribution_run} is not a finished attribution run of session {session_id}")
    site_text, attr, act = latent_sets(run["result"], request.site, request.k)
    site = check_sites(engine, [Site.parse(site_text)])[0]
    inputs = steering_inputs(store, engine, session_id, [_plan(site, attr[0])], progress)  # folded: typical acts
    fires = inputs.typical[site] > 0  # a random latent that never fires would add nothing, folded
    generator = torch.Generator().manual_seed(request.band_seed)
    order = torch.randperm(len(fires), generator=generator).tolist()
    randoms = [x for x in order if bool(fires[x]) and x not in set(attr) | set(act)][:request.band]
    if len(randoms) < 2:
        raise AuditError(f"fewer than 2 latents of {site} fire on the session's texts outside the two sets: no band")
    plans = [(f"latent {x}", _plan(site, x)) for x in dict.fromkeys(attr + act)]
    plans += [(f"band {i}", _plan(site, x)) for i, x in enumerate(randoms)]
    prompt_ids, params, seed = prepared(engine, request.prompt, request.params, request.seed)
    record = {"attribution_run": request.attribution_run, "site": site_text, "k": request.k, "strength": request.strength,
              "n": request.n, "band": request.band, "band_latents": randoms, "prompt": request.prompt,
              "params": asdict(params), "seed": seed, "judge": judge.config.describe(),
              "rubric": request.grading.describe(),
              "toward_on": "audited" if reference is None else "reference", "model_id": engine.lm.model_id,
              "reference_model_id": None if reference is None else reference.lm.model_id}
    seeds = [seed + i for i in range(request.n)]
    with recorded_run(store, session_id, VALIDATE_KIND, record, provenance(engine.lm, engine, [site], seeds),
                      parent_id=request.attribution_run) as handle:
        def graded_on(model: Engine, strengths: list[float], on: str) -> Graded:
            ids, model_params, _ = prepared(model, request.prompt, request.params, seed)  # its own chat template
            batch = Batch(request.prompt, ids, model_params, seed, request.n, strengths, plans, on)
            return sample_and_grade(store, model, session_id, handle.run_id, batch, request.grading, judge, progress,
                                    inputs if model is engine else None)

        if reference is None:
            graded = [graded_on(engine, [request.strength, -request.strength], "audited")]
            texts = {"toward": graded[0].texts, "away": graded[0].texts}
        else:  # away on the audited model, toward on the reference model (seed 003)
            graded = [graded_on(engine, [-request.strength], "audited"),
                      graded_on(reference, [request.strength], "reference")]
            texts = {"away": graded[0].texts, "toward": graded[1].texts}
        result = summarise(texts, site_text, attr, act, request.band, request.strength)
        result.update(graded_record(graded[0], judge, request.grading))
        result["toward_on"] = "audited" if reference is None else f"reference {reference.lm.model_id}"
        if reference is not None:
            result["completion_ids"] += graded[1].completion_ids
            result["counts"] = {k: v + graded[1].tally.__dict__[k] for k, v in result["counts"].items()}
            result["failure_rate"] = Tally(**result["counts"]).failure_rate()
        (handle.done if all(g.complete for g in graded) else handle.partial)(result, _summary(result))
    return handle.run_id


def _summary(result: dict) -> dict:
    counts = result["leaving_band"]
    rows = []
    for name, latents in result["sets"].items():
        for r in latents:
            rows.append([name, r["latent"], *(f"{v:+.2f}" if (v := r[d]["delta_behaviour"]) is not None else "-"
                                              for d in ("toward", "away")),
                         *(yes_no(r[d]["leaves_band"]) for d in ("toward", "away"))])
    attr, act = counts["attribution"], counts["activation"]
    return {"headline": f"{result['site']}: leaving the random band (toward/away) — Δ-attribution top "
                        f"{attr['latents']}: {attr['toward']}/{attr['away']}, Δ-activation top {act['latents']}: "
                        f"{act['toward']}/{act['away']}",
            "table": {"columns": ["set", "latent", "Δb toward", "Δb away", "out toward", "out away"], "rows": rows},
            "notes": [*result["notes"], f"graded by {result['judge']['model']} at {result['judge']['base_url']}"]}

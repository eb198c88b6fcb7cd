"""Δ-attribution of a session's labelled pairs as a run, and exact checks as its child runs.

    attribute(store, engine, session_id, AttributeRequest(...), progress) -> run id
    check_latents(store, engine, run_id, [(site, latent), ...], progress=...) -> checked rows
    attribution_run(store, run_id) -> the run with every exact check merged into its rows

Pairs are the person's labels of unsteered completions (`Store.pairs`). The reference means come
from `auditui.workflows.reference` (stored, reused). The run's layout is documented in
`auditui.engine.attribution`; a check is a child run of kind "attribution_check" with params
{latents, positions, batch_size} and result {rows: [checked rows], notes}, so the finished
attribution run is never rewritten. A stop during attribution records a cancelled run without a
result, or with what it computed when the stop came during its last batch; a stop during a check keeps
the latents checked so far (a cancelled child run).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor

from auditui.engine.attribution import (
    NO_PAIRS,
    PairPlan,
    check_positions,
    check_sites,
    delta_scores,
    exact_deltas,
    plan_pairs,
    ranked_rows,
    refresh_checks,
    site_result,
    summarize,
)
from auditui.engine.reference import check_vocab, completion_sequence
from auditui.engine.sites import Site
from auditui.errors import AuditError
from auditui.progress import QUIET, Progress, stop_if_asked
from auditui.workflows.reference import load_reference, reference_means
from auditui.workflows.runs import provenance, recorded_run

if TYPE_CHECKING:
    from auditui.engine import Engine
    from auditui.store.database import Store

ATTRIBUTION_KIND = "attribution"
CHECK_KIND = "attribution_check"


@dataclass(frozen=True)
class AttributeRequest:
    sites: tuple[Site, ...] = ()  # empty: every site with an SAE
    top_k: int = 100
    positions: str = "prompt"
    check: int = 0  # exact ablation of the top `check` rows per site
    reference: str | None = None  # a text file for ā; None: the session's texts
    batch_size: int = 8

    def validate(self) -> None:
        """Refusals that need no model: bad numbers, positions, a missing reference file."""
        if self.top_k < 1 or self.check < 0 or self.batch_size < 1:
            raise AuditError("top-k and batch size must be at least 1 and check at least 0")
        check_positions(self.positions)
        if self.reference is not None and not Path(self.reference).is_file():
            raise AuditError(f"reference text file not found: {self.reference}")


def pair_plan(store: Store, session_id: int, positions: str = "prompt") -> PairPlan:
    """The session's labelled pairs; AuditError when no prompt has both labels."""
    check_positions(positions)
    labelled = []
    for pair in store.pairs(session_id):
        prompt = store.prompt(pair["prompt_id"])
        for completion in store.completions_by_ids(pair["positive"] + pair["negative"]):
            labelled.append((completion_sequence(prompt, completion), completion["label"]))
    if not labelled:
        raise AuditError(NO_PAIRS)
    return plan_pairs(labelled, positions)


def stored_plan(store: Store, weights: dict[str, float]) -> PairPlan:
    """The plan of an earlier run, from its stored completion weights."""
    completions = store.completions_by_ids([int(cid) for cid in weights])
    if len(completions) != len(weights):
        raise AuditError("completions of this attribution run were deleted; run attribution again")
    seqs = [completion_sequence(store.prompt(c["prompt_id"]), c) for c in completions]
    return PairPlan(seqs=seqs, weights={int(k): float(v) for k, v in weights.items()},
                    n_prompts=len({s.prompt_id for s in seqs}))


def _notes(engine: Engine, session_model: str, plan: PairPlan, positions: str) -> list[str]:
    notes = [f"L is the summed cross-entropy (nats) of each completion; δ = -(g·d)((a-ā)·d) averaged over "
             f"{positions} positions (position 0, the attention sink, excluded); exact ΔL mean-ablates all "
             "chosen positions at once and is divided by their number"]
    if session_model and session_model != engine.lm.model_id:
        notes.append(f"the session was sampled with {session_model}, not {engine.lm.model_id}: "
                     "attribution of off-policy completions")
    notes.append("Δ-activation is the mean SAE activation over the completion tokens, positive minus negative")
    if plan.skipped:
        notes.append(f"{len(plan.skipped)} completion(s) left out (no {positions} position or no pair): "
                     f"{plan.skipped[:10]}")
    if engine.lm.dtype != torch.float32:
        notes.append(f"model in {engine.lm.dtype}: exact ΔL of weak latents is within rounding noise")
    return notes + list(engine.bank.warnings)


def attribute(store: Store, engine: Engine, session_id: int, request: AttributeRequest,
              progress: Progress = QUIET) -> int:
    """Attribute the session's pairs at the request's sites, store the run, check the top latents."""
    request.validate()
    sites = check_sites(engine, list(request.sites) or engine.bank.sites)
    plan = pair_plan(store, session_id, request.positions)
    check_vocab(engine.lm, plan.seqs)
    params = {"sites": [str(s) for s in sites], "top_k": request.top_k, "positions": request.positions,
              "check": request.check, "reference": request.reference or "session",
              "batch_size": request.batch_size, "model_id": engine.lm.model_id, "saes": engine.sae_digests(sites)}
    session_model = store.session(session_id)["model_id"]
    with recorded_run(store, session_id, ATTRIBUTION_KIND, params, provenance(engine.lm, engine, sites)) as run:
        ref = reference_means(store, engine, session_id, sites, request.reference, request.batch_size, progress)
        scores = delta_scores(engine, plan, sites, ref.means, request.positions, request.batch_size, progress)
        result = {"loss": "sum", "positions": request.positions, "n_prompts": plan.n_prompts,
                  "n_completions": len(plan.seqs), "weights": {str(k): v for k, v in plan.weights.items()},
                  "skipped": plan.skipped, "sites": {}, "rows": [], "n_checked": 0, "spearman": None,
                  "reference": {"source": ref.source, "runs": {str(s): ref.runs[s] for s in sites},
                                "tokens": {str(s): ref.tokens.get(s) for s in sites}},
                  "notes": _notes(engine, session_model, plan, request.positions)}
        for site, (attr, act) in scores.items():
            result["sites"][str(site)], rows = site_result(engine, site, attr, act, request.top_k)
            result["rows"] += rows
        store.put_blob(run.run_id, "deltas", save_tensors({
            f"{site}|{name}": vec.cpu().contiguous() for site, pair in scores.items()
            for name, vec in zip(("attr", "act"), pair)}))
        # a stop that came while the last batch ran: the run is cancelled, what was computed kept
        (run.partial if progress.should_stop() else run.done)(result, summarize(result))
        stop_if_asked(progress)
    if request.check:
        targets = [(Site.parse(r["site"]), r["latent"]) for r in result["rows"] if r["rank"] <= request.check]
        check_latents(store, engine, run.run_id, targets, progress=progress)
    return run.run_id


def run_deltas(store: Store, run_id: int) -> dict[str, Tensor]:
    """The full Δ-attribution and Δ-activation vectors of an attribution run."""
    data = store.get_blob(run_id, "deltas")
    if data is None:
        raise AuditError(f"attribution run {run_id} has no stored Δ vectors; run attribution again")
    return load_tensors(data)


def attribution_run(store: Store, run_id: int) -> dict:
    """An attribution run with its exact checks (child runs, later ones win) merged into the rows."""
    run = store.run(run_id)
    if run["kind"] != ATTRIBUTION_KIND or run["result"] is None:
        return run
    result, params = copy.deepcopy(run["result"]), run["params"]
    rows = {(r["site"], r["latent"]): r for r in result["rows"]}
    for child in store.child_runs(run_id, CHECK_KIND):
        for row in (child["result"] or {}).get("rows", []):
            key = (row["site"], row["latent"])
            if key in rows:
                rows[key]["exact"] = row["exact"]
            else:
                rows[key] = copy.deepcopy(row)
                result["rows"].append(rows[key])
        result["notes"] += (child["result"] or {}).get("notes", [])
    result["rows"].sort(key=lambda r: (params["sites"].index(r["site"]), r["rank"]))
    refresh_checks(result)
    return {**run, "result": result, "summary": summarize(result)}


def _checked_run(engine: Engine, store: Store, run_id: int, sites: set[Site]) -> dict:
    run = attribution_run(store, run_id)
    if run["kind"] != ATTRIBUTION_KIND or run["status"] != "done":
        raise AuditError(f"run {run_id} is not a finished attribution run ({run['kind']}, {run['status']})")
    params = run["params"]
    if params["model_id"] != engine.lm.model_id:
        raise AuditError(f"run {run_id} was computed on {params['model_id']}; load that model to check it")
    for site in sites:
        if str(site) not in params["sites"]:
            raise AuditError(f"run {run_id} did not attribute site {site} (it has {', '.join(params['sites'])})")
        if site not in engine.bank or engine.bank.digest(site) != params["saes"][str(site)]:
            raise AuditError(f"the SAE loaded for {site} is not the one run {run_id} used; load the same pack")
    return run


def check_latents(store: Store, engine: Engine, run_id: int, latents: list[tuple[Site | str, int]],
                  batch_size: int | None = None, progress: Progress = QUIET) -> list[dict]:
    """Exact mean-ablation ΔL for `latents` of attribution run `run_id`, as a child run; the checked rows."""
    targets = [(Site.parse(s) if isinstance(s, str) else s, int(i)) for s, i in latents]
    run = _checked_run(engine, store, run_id, {s for s, _ in targets})
    result, params = run["result"], run["params"]
    deltas = run_deltas(store, run_id)
    sites = list(dict.fromkeys(s for s, _ in targets))
    for site in sites:
        size = deltas[f"{site}|attr"].shape[0]
        if not all(0 <= i < size for s, i in targets if s == site):
            raise AuditError(f"site {site} has latents 0..{size - 1}")
    batch = batch_size or params["batch_size"]
    child_params = {"latents": [[str(s), i] for s, i in targets], "positions": params["positions"], "batch_size": batch}
    with recorded_run(store, run["session_id"], CHECK_KIND, child_params, provenance(engine.lm, engine, sites),
                      parent_id=run_id) as child:
        plan = stored_plan(store, result["weights"])
        means = load_reference(store, result["reference"]["runs"], engine.lm.device)
        rows = {(r["site"], r["latent"]): r for r in result["rows"]}
        checked, notes = [], []
        for site in sites:
            attr, act = deltas[f"{site}|attr"], deltas[f"{site}|act"]
            wanted = list(dict.fromkeys(i for s, i in targets if s == site))
            new = [i for i in wanted if (str(site), i) not in rows]
            rows.update({(r["site"], r["latent"]): r for r in ranked_rows(engine, site, attr, act, new)})
            exact = exact_deltas(engine, plan, site, wanted, means[site], params["positions"], batch, progress)
            checked += [{**rows[(str(site), latent)], "exact": value} for latent, value in zip(wanted, exact)]
            if len(exact) < len(wanted):
                notes.append(f"exact check stopped after {len(exact)} of {len(wanted)} latents at {site}")
                break
        summary = {"headline": f"exact check of {len(checked)} latents of attribution run {run_id}"}
        (child.partial if notes or progress.should_stop() else child.done)({"rows": checked, "notes": notes}, summary)
    return checked

"""The session's reference model, and model-diffing Δ-activation as a run.

    audited, reference = load_models(settings, spec, progress)   # or load_reference(settings, spec, audited)
    set_reference_model(store, session_id, audited, reference, spec)
    session_reference(store, session_id) -> the stored model spec (AuditError when none)
    run_id = diff_activation(store, engine, reference, session_id, DiffRequest(...), progress, attribution_run=None)
    attribution_with_diff(store, run_id) -> an attribution run with its newest model-diffing child run merged in

The reference model loads through `auditui.engine.model.load_model` with the settings' device, dtype
and cache, and is refused (one-line AuditError, nothing stored) unless it shares the audited
model's tokenizer, width and depth (`auditui.engine.diffing.check_compatible`). The session stores
its spec (`sessions.reference_model`: an absolute path for a local directory or file).

Run kind "diff_activation"
    params      {sites, top_k, source: session | file | held_out, path, digest, n_texts, batch_size,
                 model_id, reference_model_id, reference_source, saes: {site: sha256}, attribution_run}
    provenance  the audited model's record (`runs.provenance`) + "reference_model": {model_id,
                model_source, device, dtype}
    result      `DiffResult.to_dict()`: {n_texts, source, sites: {site: {d_sae, top_k, n_tokens,
                overlap_attr, overlap_within, attribution_run}}, rows: [{site, latent, rank, delta_act,
                audited, reference, logit_lens, attr_rank, delta_attr, within_rank, delta_within}], notes}
    blob        "means": safetensors {"SITE|audited": [d_sae], "SITE|reference": [d_sae]}
The baselines at each site are the Δ-attribution and within-model Δ-activation vectors of
`attribution_run` when given (the diff run is then its child run), else of the newest finished
attribution run of the session on the same model and SAE at that site.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor

from auditui.engine.attribution import check_sites, summarize
from auditui.engine.diffing import (
    Baselines,
    DiffResult,
    annotate_attribution,
    check_compatible,
    diff_activations,
    held_out_sequences,
    rank_site,
)
from auditui.engine.model import SMOLLM2_ALIAS, load_model, resolve_source
from auditui.engine.reference import TokenSeq, check_vocab, sequences_digest
from auditui.engine.sites import Site
from auditui.errors import AuditError
from auditui.progress import QUIET, Progress
from auditui.workflows.attribute import ATTRIBUTION_KIND, attribution_run, run_deltas
from auditui.workflows.reference import reference_texts
from auditui.workflows.runs import provenance, recorded_run

if TYPE_CHECKING:
    from auditui.config import Settings
    from auditui.engine import Engine
    from auditui.engine.model import LoadedModel
    from auditui.store.database import Store

DIFF_KIND = "diff_activation"
MODEL_FIELDS = ("model_id", "model_source", "device", "dtype")


# -- the reference model -----------------------------------------------------------------------
def stored_spec(spec: str) -> str:
    """How a model spec is stored: local directories and files as absolute paths, hub ids as given."""
    kind, path = resolve_source(spec)
    return spec if kind == "hub" or spec == SMOLLM2_ALIAS or path is None else str(path.resolve())


def load_reference(settings: Settings, spec: str, audited: LoadedModel, progress: Progress = QUIET) -> LoadedModel:
    """The reference model on the settings' device and dtype, checked against the audited model."""
    reference = load_model(spec, settings.device, settings.dtype, settings.cache_path, progress)
    check_compatible(audited, reference)
    return reference


def load_models(settings: Settings, spec: str, progress: Progress = QUIET) -> tuple[LoadedModel, LoadedModel]:
    """(the settings' model, the reference `spec`), checked against each other."""
    stored_spec(spec)  # a missing local path is refused before any model loads
    audited = load_model(settings.model, settings.device, settings.dtype, settings.cache_path, progress)
    return audited, load_reference(settings, spec, audited, progress)


def set_reference_model(store: Store, session_id: int, audited: LoadedModel, reference: LoadedModel,
                        spec: str) -> None:
    """Name `spec` (loaded as `reference`) as the session's reference model, after the checks."""
    session = store.session(session_id)
    if session["model_id"] and session["model_id"] != audited.model_id:
        raise AuditError(f"session {session_id} audits {session['model_id']}, not {audited.model_id}; "
                         "give that model with --model to check the reference against it")
    check_compatible(audited, reference)
    store.touch_session(session_id, reference_model=stored_spec(spec),
                        **({} if session["model_id"] else {"model_id": audited.model_id}))


def session_reference(store: Store, session_id: int) -> str:
    spec = store.session(session_id)["reference_model"]
    if not spec:
        raise AuditError(f"session {session_id} names no reference model; set one with: "
                         f"auditui session reference {session_id} MODEL")
    return spec


# -- the run -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class DiffRequest:
    sites: tuple[Site, ...] = ()  # empty: every site with an SAE
    top_k: int = 100
    text_file: str | None = None  # None: the session's texts (or the pack's held-out windows)
    held_out: bool = False  # the loaded pack's held-out windows
    batch_size: int = 8

    def validate(self) -> None:
        """Refusals that need no model."""
        if self.top_k < 1 or self.batch_size < 1:
            raise AuditError("top-k and batch size must be at least 1")
        if self.held_out and self.text_file is not None:
            raise AuditError("give either a text file or the held-out windows, not both")
        if self.text_file is not None and not Path(self.text_file).is_file():
            raise AuditError(f"text file not found: {self.text_file}")


def diff_texts(store: Store, engine: Engine, session_id: int, request: DiffRequest) -> tuple[list[TokenSeq], dict]:
    """The token sequences of the request and their key {source, path, digest}."""
    if not request.held_out:
        seqs, key = reference_texts(engine, store, session_id, Path(request.text_file) if request.text_file else None)
        return seqs, {k: key[k] for k in ("source", "path", "digest")}
    if engine.bank.pack is None:
        raise AuditError("the held-out windows come from an SAE pack's build; load one with --pack")
    seqs = held_out_sequences(engine.bank.pack.path)
    check_vocab(engine.lm, seqs)
    return seqs, {"source": "held_out", "path": str(engine.bank.pack.path), "digest": sequences_digest(seqs)}


def _baselines(store: Store, engine: Engine, session_id: int, site: Site, run_id: int | None) -> Baselines | None:
    """Δ-attribution and within-model Δ-activation at `site` from run `run_id`, else the newest usable one."""
    candidates = [store.run(run_id)] if run_id is not None else reversed(store.runs(session_id, ATTRIBUTION_KIND))
    for run in candidates:
        params = run["params"] or {}
        if (run["kind"] == ATTRIBUTION_KIND and run["status"] == "done" and params.get("model_id") == engine.lm.model_id
                and params.get("saes", {}).get(str(site)) == engine.bank.digest(site)):
            deltas = run_deltas(store, run["id"])
            return Baselines(run["id"], deltas[f"{site}|attr"], deltas[f"{site}|act"])
    return None


def _notes(result: DiffResult, engine: Engine, reference: LoadedModel, attribution_run: int | None) -> list[str]:
    notes = [f"Δ-act = mean SAE activation in {engine.lm.model_id} minus {reference.model_id} (model diffing), the same "
             "SAE and the same tokens (position 0 and tokens that are norm outliers in either model left out)"]
    alone = [s.site for s in result.sites if s.attribution_run is None]
    if alone:
        where = (f"attribution run {attribution_run} did not attribute" if attribution_run is not None else
                 "no finished attribution run on this model and SAE at")
        notes.append(f"{where} {', '.join(alone)}: no Δ-attribution or within-model Δ-activation to compare with there")
    if len(alone) < len(result.sites):
        notes.append("attr # / within # = the latent's rank by Δ-attribution / by the within-model Δ-activation "
                     "(positive minus negative completions) of the attribution run")
    return notes + list(engine.bank.warnings)


def diff_activation(store: Store, engine: Engine, reference: LoadedModel, session_id: int, request: DiffRequest,
                    progress: Progress = QUIET, attribution_run: int | None = None) -> int:
    """Model-diffing Δ-activation at the request's sites, stored as a run; its id."""
    request.validate()
    sites = check_sites(engine, list(request.sites) or engine.bank.sites)
    check_compatible(engine.lm, reference)
    seqs, key = diff_texts(store, engine, session_id, request)
    check_vocab(reference, seqs)
    params = {"sites": [str(s) for s in sites], "top_k": request.top_k, **key, "n_texts": len(seqs),
              "batch_size": request.batch_size, "model_id": engine.lm.model_id,
              "reference_model_id": reference.model_id, "reference_source": reference.source,
              "saes": engine.sae_digests(sites), "attribution_run": attribution_run}
    prov = {**provenance(engine.lm, engine, sites),
            "reference_model": {k: v for k, v in provenance(reference).items() if k in MODEL_FIELDS}}
    with recorded_run(store, session_id, DIFF_KIND, params, prov, parent_id=attribution_run) as run:
        diffs = diff_activations(engine.lm, reference, engine.bank, seqs, sites, request.batch_size, progress)
        rankings = [rank_site(engine.lm, engine.bank, diffs[site], request.top_k,
                              _baselines(store, engine, session_id, site, attribution_run)) for site in sites]
        result = DiffResult(rankings, len(seqs), key["path"] or key["source"])
        result.notes = _notes(result, engine, reference, attribution_run)
        store.put_blob(run.run_id, "means", save_tensors({
            f"{site}|{name}": vec.cpu().contiguous() for site, diff in diffs.items()
            for name, vec in (("audited", diff.audited), ("reference", diff.reference))}))
        run.done(result.to_dict(), result.summary())
    return run.run_id


def diff_deltas(store: Store, run_id: int) -> dict[str, Tensor]:
    """{site: Δ [d_sae]} of a model-diffing run."""
    data = store.get_blob(run_id, "means")
    if data is None:
        raise AuditError(f"model-diffing run {run_id} has no stored means; run it again")
    means = load_tensors(data)
    return {name.removesuffix("|audited"): vec - means[name.replace("|audited", "|reference")]
            for name, vec in means.items() if name.endswith("|audited")}


def attribution_with_diff(store: Store, run_id: int) -> dict:
    """`attribution_run` plus the Δ-act models column of its newest finished model-diffing child run."""
    run = attribution_run(store, run_id)
    children = [c for c in store.child_runs(run_id, DIFF_KIND) if c["status"] == "done"]
    if run["result"] is None or not children:
        return run
    result = copy.deepcopy(run["result"])
    annotate_attribution(result, diff_deltas(store, children[-1]["id"]), children[-1]["id"])
    return {**run, "result": result, "summary": summarize(result)}

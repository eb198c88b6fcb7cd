"""`auditui attribute`: Δ-attribution of SAE latents over the session's labelled pairs, stored as a run.

The completions come from the session database as stored token ids (prompt ids + completion ids;
nothing is re-tokenized). `--json` prints {run_id, session_id, status, params, summary, result}
with `result` as documented in `auditui.engine.attribution` (exact checks merged in). With
`--reference-model M` a model-diffing run (`auditui diff`) over the session's texts follows as a child
run of the attribution run, and its rows carry `delta_diff` / `diff_rank` (the "Δ-act models" column).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from auditui.cli import app
from auditui.cli.common import (
    DbOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelOpt,
    PackOpt,
    Printer,
    ReferenceModelOpt,
    SaeOpt,
    SessionOpt,
    emit,
    engine_for,
    open_store,
    print_run,
    settings_from,
)

SiteOpt = Annotated[list[str] | None, typer.Option(
    "--site", help="LAYER/KIND to attribute, repeatable (default: every site with an SAE)")]
PositionsOpt = Annotated[str, typer.Option(
    "--positions", help="token positions averaged: prompt (seed 003) | completion | all")]
ReferenceOpt = Annotated[Path | None, typer.Option(
    "--reference", help="text file for the reference mean ā (default: the session's own texts)")]


@app.command()
def attribute(site: SiteOpt = None,
              top: Annotated[int, typer.Option("--top", help="latents kept per site")] = 100,
              check: Annotated[int, typer.Option("--check", help="exact ablation of the top N per site")] = 0,
              positions: PositionsOpt = "prompt", reference: ReferenceOpt = None,
              batch: Annotated[int, typer.Option("--batch", help="completions per forward/backward")] = 8,
              reference_model: ReferenceModelOpt = None, session_id: SessionOpt = None, model: ModelOpt = None,
              pack: PackOpt = None, sae: SaeOpt = None,
              device: DeviceOpt = None, dtype: DtypeOpt = None, db: DbOpt = None, as_json: JsonOpt = False) -> None:
    """Rank SAE latents by Δ-attribution (positive minus negative completions) with a Δ-activation baseline;
    with --reference-model also by model-diffing Δ-activation (audited minus reference model)."""
    from auditui.engine.sites import Site
    from auditui.workflows.attribute import AttributeRequest, pair_plan
    from auditui.workflows.attribute import attribute as attribute_workflow
    from auditui.workflows.diffing import DiffRequest, attribution_with_diff, diff_activation, load_reference

    settings = settings_from(model=model, pack=pack, device=device, dtype=dtype, db=db)
    request = AttributeRequest(sites=tuple(Site.parse(text) for text in site or []), top_k=top, positions=positions,
                               check=check, reference=str(reference) if reference else None, batch_size=batch)
    request.validate()
    with open_store(db) as store:
        sid = store.resolve_session(session_id)
        pair_plan(store, sid, positions)  # refuse before loading the model
        engine = engine_for(settings, sae)
        other = load_reference(settings, reference_model, engine.lm, Printer()) if reference_model else None
        run_id = attribute_workflow(store, engine, sid, request, Printer())
        if other is not None:
            params = store.run(run_id)["params"]
            diff_activation(store, engine, other, sid, DiffRequest(sites=tuple(Site.parse(s) for s in params["sites"]),
                            top_k=top, batch_size=batch), Printer(), attribution_run=run_id)
        run = attribution_with_diff(store, run_id)
    emit({"run_id": run_id, "session_id": sid, "status": run["status"], "params": run["params"],
          "summary": run["summary"], "result": run["result"]}, as_json, print_run)

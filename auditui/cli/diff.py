"""`auditui diff`: model-diffing Δ-activation of SAE latents, audited minus reference model, stored as a run.

    auditui diff [--site 12/resid_post ...] [--top 100] [--text FILE | --held-out]
                 [--reference-model M] [--session S] [--json]

The reference model is the session's (`auditui session reference ID M`) unless `--reference-model`
names one for this run. The ranking is compared with the newest attribution run at the same sites
(top-k overlap with Δ-attribution and with the within-model Δ-activation) when there is one.
`--json` prints {run_id, session_id, status, params, provenance, summary, result} with `result` as
documented in `auditui.workflows.diffing`.
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


@app.command()
def diff(site: Annotated[list[str] | None, typer.Option(
             "--site", "--sites", help="LAYER/KIND, repeatable (default: every site with an SAE)")] = None,
         top: Annotated[int, typer.Option("--top", help="latents kept per site")] = 100,
         text: Annotated[Path | None, typer.Option("--text", help="a text file to diff over (default: the session)")] = None,
         held_out: Annotated[bool, typer.Option("--held-out", help="the pack's held-out windows")] = False,
         reference_model: ReferenceModelOpt = None,
         batch: Annotated[int, typer.Option("--batch", help="texts per forward")] = 8,
         session_id: SessionOpt = None, model: ModelOpt = None, pack: PackOpt = None, sae: SaeOpt = None,
         device: DeviceOpt = None, dtype: DtypeOpt = None, db: DbOpt = None, as_json: JsonOpt = False) -> None:
    """Rank SAE latents by model-diffing Δ-activation (audited minus reference model, the same tokens)."""
    from auditui.engine.sites import Site
    from auditui.workflows.diffing import DiffRequest, diff_activation, load_reference, session_reference
    from auditui.workflows.reference import session_sequences

    settings = settings_from(model=model, pack=pack, device=device, dtype=dtype, db=db)
    request = DiffRequest(sites=tuple(Site.parse(s) for s in site or []), top_k=top,
                          text_file=str(text) if text else None, held_out=held_out, batch_size=batch)
    request.validate()
    with open_store(db) as store:
        sid = store.resolve_session(session_id)
        spec = reference_model or session_reference(store, sid)  # refuse before loading any model
        if text is None and not held_out:
            session_sequences(store, sid)
        engine = engine_for(settings, sae)
        reference = load_reference(settings, spec, engine.lm, Printer())
        run = store.run(diff_activation(store, engine, reference, sid, request, Printer()))
    emit({"run_id": run["id"], "session_id": sid, "status": run["status"], "params": run["params"],
          "provenance": run["provenance"], "summary": run["summary"], "result": run["result"]}, as_json, print_run)

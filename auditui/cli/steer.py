"""`auditui steer`: a steering plan applied while sampling, the same seeds without and with it.

    auditui steer --from-flow RUN | --from-attribution RUN [--top K] | --from-set | --plan FILE |
                  --features "12/resid_post/1234:add:8,..."  --prompt "..." [--strength 2 --strength 4]
                  [--op add|rescale|clamp|mean_ablate] [--coefficient C] [--mode cumulative|single]
                  [--layer L] [--schedule constant|linear|exponential --end S* --alpha A] [--fold]
                  [--scope all|prompt|generated] [-n 4] [--seed S] [--on audited|reference] [--json]

A row's strength multiplies every coefficient, so `--strength` values form a grid in one batch.
The run (kind "steer") and every completion are stored in the session; steered completions carry
their plan and never enter pairs or reference means. `--on reference` steers the session's reference
model (`auditui session reference`) instead, with the same SAE sources; the run's provenance then
names the reference model (it was checked against the audited model when it was set).
"""

from __future__ import annotations

from dataclasses import replace
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
from auditui.cli.plans import (
    AlphaOpt,
    CoefficientOpt,
    EndOpt,
    FeaturesOpt,
    FoldOpt,
    FromAttributionOpt,
    FromFlowOpt,
    FromSetOpt,
    LayerOpt,
    MaxNewOpt,
    ModeOpt,
    OnOpt,
    OpOpt,
    PlanFileOpt,
    PromptOpt,
    RawOpt,
    ScheduleOpt,
    ScopeOpt,
    SeedOpt,
    SystemOpt,
    TemperatureOpt,
    TopOpt,
    TopPOpt,
    plan_from,
    sampling_from,
    steered_settings,
)


@app.command()
def steer(prompt: PromptOpt, plan_file: PlanFileOpt = None, from_flow: FromFlowOpt = None,
          from_attribution: FromAttributionOpt = None, top: TopOpt = 10, from_set: FromSetOpt = False,
          features: FeaturesOpt = None, op: OpOpt = None, coefficient: CoefficientOpt = None, mode: ModeOpt = "cumulative",
          layer: LayerOpt = None, schedule: ScheduleOpt = "constant", end: EndOpt = 1.0, alpha: AlphaOpt = -0.05,
          fold: FoldOpt = False, scope: ScopeOpt = "all",
          strength: Annotated[list[float] | None, typer.Option("--strength", help="repeatable; default 1")] = None,
          n: Annotated[int, typer.Option("-n", help="samples per strength (and unsteered)")] = 4,
          seed: SeedOpt = None, max_new_tokens: MaxNewOpt = 48, temperature: TemperatureOpt = 1.0, top_p: TopPOpt = 0.95,
          raw: RawOpt = False, system: SystemOpt = None,
          batch_size: Annotated[int | None, typer.Option("--batch-size", help="rows per batch (default all)")] = None,
          on: OnOpt = "audited", reference_model: ReferenceModelOpt = None,
          session: SessionOpt = None, model: ModelOpt = None, pack: PackOpt = None, sae: SaeOpt = None,
          device: DeviceOpt = None, dtype: DtypeOpt = None, db: DbOpt = None, as_json: JsonOpt = False) -> None:
    """Sample a prompt without and with a steering plan (one batch per strength grid)."""
    from auditui.workflows.steer import SteerRequest
    from auditui.workflows.steer import steer as steer_workflow

    settings = settings_from(model=model, pack=pack, device=device, dtype=dtype, db=db)
    with open_store(db) as store:
        session_id = store.resolve_session(session)
        plan = plan_from(store, session_id, plan_file, from_flow, from_attribution, top, from_set, features, op,
                         coefficient, mode, layer, schedule, end, alpha, fold, scope)
        request = SteerRequest(plan, prompt, tuple(strength or [1.0]), n,
                               sampling_from(temperature, top_p, max_new_tokens, raw, system), seed, batch_size, on)
        request.validate()  # before the model loads, and before --reference-model is recorded
        settings, on = steered_settings(store, session_id, settings, on, reference_model)
        request = replace(request, on=on)
        engine = engine_for(settings, sae)
        run = store.run(steer_workflow(store, engine, session_id, request, Printer()))
    emit({"run_id": run["id"], "session_id": session_id, "status": run["status"], "on": on,
          "model_id": engine.lm.model_id, "params": run["params"], "summary": run["summary"], "result": run["result"]},
         as_json, print_run)

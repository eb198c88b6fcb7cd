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

from pathlib import Path
from typing import Annotated, Any

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
    SaeOpt,
    SessionOpt,
    emit,
    engine_for,
    open_store,
    print_summary,
    settings_from,
)
from auditui.errors import AuditError

STEERED = ("audited", "reference")


def _plan_options(op: str | None, coefficient: float | None, mode: str, layer: int | None, schedule: str,
                  end: float, alpha: float, fold: bool, scope: str) -> dict[str, Any]:
    from auditui.engine.steering import Schedule

    options: dict[str, Any] = {"mode": mode, "layer": layer, "schedule": Schedule(schedule, end, alpha),
                               "fold": fold, "scope": scope}
    options.update({k: v for k, v in (("op", op), ("coefficient", coefficient)) if v is not None})
    return options


@app.command()
def steer(prompt: Annotated[str, typer.Option("--prompt", help="the user prompt to steer")],
          plan_file: Annotated[Path | None, typer.Option("--plan", help="a steering plan JSON file")] = None,
          from_flow: Annotated[int | None, typer.Option("--from-flow", help="a flow run id")] = None,
          from_attribution: Annotated[int | None, typer.Option("--from-attribution", help="an attribution run id")] = None,
          top: Annotated[int, typer.Option("--top", help="latents of the attribution run, together")] = 10,
          from_set: Annotated[bool, typer.Option("--from-set", help="the session's steering set")] = False,
          features: Annotated[str | None, typer.Option("--features", help="FEATURE:OP:COEF, comma-separated")] = None,
          op: Annotated[str | None, typer.Option("--op", help="add | rescale | clamp | mean_ablate")] = None,
          coefficient: Annotated[float | None, typer.Option("--coefficient", help="per feature (builders)")] = None,
          mode: Annotated[str, typer.Option("--mode", help="cumulative | single")] = "cumulative",
          layer: Annotated[int | None, typer.Option("--layer", help="l: the single layer / the last one")] = None,
          schedule: Annotated[str, typer.Option("--schedule", help="constant | linear | exponential")] = "constant",
          end: Annotated[float, typer.Option("--end", help="linear: s* at l_end")] = 1.0,
          alpha: Annotated[float, typer.Option("--alpha", help="exponential: s·e^(α·l)")] = -0.05,
          fold: Annotated[bool, typer.Option("--fold", help="fold add/clamp by typical activations")] = False,
          scope: Annotated[str, typer.Option("--scope", help="all | prompt | generated tokens")] = "all",
          strength: Annotated[list[float] | None, typer.Option("--strength", help="repeatable; default 1")] = None,
          n: Annotated[int, typer.Option("-n", help="samples per strength (and unsteered)")] = 4,
          seed: Annotated[int | None, typer.Option("--seed", help="sample i gets seed+i (default random)")] = None,
          max_new_tokens: Annotated[int, typer.Option("--max-new-tokens")] = 48,
          temperature: Annotated[float, typer.Option("--temperature", help="0 = greedy")] = 1.0,
          top_p: Annotated[float, typer.Option("--top-p")] = 0.95,
          raw: Annotated[bool, typer.Option("--raw", help="no chat template")] = False,
          system: Annotated[str | None, typer.Option("--system", help="system prompt")] = None,
          batch_size: Annotated[int | None, typer.Option("--batch-size", help="rows per batch (default all)")] = None,
          on: Annotated[str, typer.Option("--on", help="audited | reference: the model steered (the session's reference)")]
          = "audited",
          session: SessionOpt = None, model: ModelOpt = None, pack: PackOpt = None, sae: SaeOpt = None,
          device: DeviceOpt = None, dtype: DtypeOpt = None, db: DbOpt = None, as_json: JsonOpt = False) -> None:
    """Sample a prompt without and with a steering plan (one batch per strength grid)."""
    from auditui.engine.sampling import SamplingParams
    from auditui.workflows.diffing import session_reference
    from auditui.workflows.steer import PlanSource, SteerRequest, plan_for
    from auditui.workflows.steer import steer as steer_workflow

    settings = settings_from(model=model, pack=pack, device=device, dtype=dtype, db=db)
    params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                            chat=False if raw else None, system=system)
    source = PlanSource(file=str(plan_file) if plan_file else None, flow_run=from_flow,
                        attribution_run=from_attribution, top=top, steering_set=from_set, typed=features)
    if on not in STEERED:
        raise AuditError(f"--on takes {' or '.join(STEERED)}, not {on!r}")
    with open_store(db) as store:
        session_id = store.resolve_session(session)
        if on == "reference":  # the same SAE sources, attached to (and checked against) the reference model
            settings = settings.with_overrides(model=session_reference(store, session_id))
        plan = plan_for(store, session_id, source,
                        **_plan_options(op, coefficient, mode, layer, schedule, end, alpha, fold, scope))
        request = SteerRequest(plan, prompt, tuple(strength or [1.0]), n, params, seed, batch_size)
        request.validate()  # before the model loads
        engine = engine_for(settings, sae)
        run = store.run(steer_workflow(store, engine, session_id, request, Printer()))
    emit({"run_id": run["id"], "session_id": session_id, "status": run["status"], "on": on,
          "model_id": engine.lm.model_id, "params": run["params"], "summary": run["summary"], "result": run["result"]},
         as_json,
         lambda d: print_summary(d["summary"], f"run {d['run_id']} ({d['status']}): {d['summary']['headline']}"))

"""The steering-plan options shared by `auditui steer` and `auditui sweep`, and sampling options
shared by every command that samples: declared once as typed aliases, read by `plan_from` and
`sampling_from`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from auditui.config import Settings
    from auditui.engine.sampling import SamplingParams
    from auditui.engine.steering import SteeringPlan
    from auditui.store.database import Store

PlanFileOpt = Annotated[Path | None, typer.Option("--plan", help="a steering plan JSON file")]
FromFlowOpt = Annotated[int | None, typer.Option("--from-flow", help="a flow run id")]
FromAttributionOpt = Annotated[int | None, typer.Option("--from-attribution", help="an attribution run id")]
TopOpt = Annotated[int, typer.Option("--top", help="latents of the attribution run, together")]
FromSetOpt = Annotated[bool, typer.Option("--from-set", help="the session's steering set")]
FeaturesOpt = Annotated[str | None, typer.Option("--features", help="FEATURE:OP:COEF, comma-separated")]
OpOpt = Annotated[str | None, typer.Option("--op", help="add | rescale | clamp | mean_ablate")]
CoefficientOpt = Annotated[float | None, typer.Option("--coefficient", help="per feature (builders)")]
ModeOpt = Annotated[str, typer.Option("--mode", help="cumulative | single")]
LayerOpt = Annotated[int | None, typer.Option("--layer", help="l: the single layer / the last one")]
ScheduleOpt = Annotated[str, typer.Option("--schedule", help="constant | linear | exponential")]
EndOpt = Annotated[float, typer.Option("--end", help="linear: s* at l_end")]
AlphaOpt = Annotated[float, typer.Option("--alpha", help="exponential: s·e^(α·l)")]
FoldOpt = Annotated[bool, typer.Option("--fold", help="fold add/clamp by typical activations")]
ScopeOpt = Annotated[str, typer.Option("--scope", help="all | prompt | generated tokens")]

PromptOpt = Annotated[str, typer.Option("--prompt", help="the user prompt to sample")]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="sample i gets seed+i (default random)")]
MaxNewOpt = Annotated[int, typer.Option("--max-new-tokens")]
TemperatureOpt = Annotated[float, typer.Option("--temperature", help="0 = greedy")]
TopPOpt = Annotated[float, typer.Option("--top-p")]
RawOpt = Annotated[bool, typer.Option("--raw", help="no chat template")]
SystemOpt = Annotated[str | None, typer.Option("--system", help="system prompt")]
OnOpt = Annotated[str, typer.Option("--on", help="audited | reference: the model steered (the session's reference)")]


def plan_from(store: Store, session_id: int, plan_file: Path | None, from_flow: int | None,
              from_attribution: int | None, top: int, from_set: bool, features: str | None, op: str | None,
              coefficient: float | None, mode: str, layer: int | None, schedule: str, end: float, alpha: float,
              fold: bool, scope: str) -> SteeringPlan:
    from auditui.engine.steering import Schedule
    from auditui.workflows.steer import PlanSource, plan_for

    source = PlanSource(file=str(plan_file) if plan_file else None, flow_run=from_flow,
                        attribution_run=from_attribution, top=top, steering_set=from_set, typed=features)
    options: dict[str, Any] = {"mode": mode, "layer": layer, "schedule": Schedule(schedule, end, alpha),
                               "fold": fold, "scope": scope}
    options.update({k: v for k, v in (("op", op), ("coefficient", coefficient)) if v is not None})
    return plan_for(store, session_id, source, **options)


def steered_settings(store: Store, session_id: int, settings: Settings, on: str,
                     reference_model: str | None = None) -> tuple[Settings, str]:
    """(the settings of the model `--on` names, the --on value in effect): the session's reference
    model keeps the same SAE sources, attached to (and checked against) it. `--reference-model M`
    steers M (implies --on reference): a session without a reference model gets M, checked against
    the audited model as `session reference` does; a session naming another one is refused."""
    from auditui.errors import AuditError
    from auditui.workflows.diffing import load_models, session_reference, set_reference_model, stored_spec
    from auditui.workflows.steer import check_on

    check_on(on)
    if reference_model is not None:
        current = store.session(session_id)["reference_model"]
        if current and current != stored_spec(reference_model):
            raise AuditError(f"session {session_id} names the reference model {current}; change it with "
                             f"auditui session reference {session_id} MODEL")
        if not current:
            set_reference_model(store, session_id, *load_models(settings, reference_model), reference_model)
        on = "reference"
    return (settings.with_overrides(model=session_reference(store, session_id)) if on == "reference" else settings), on


def sampling_from(temperature: float, top_p: float, max_new_tokens: int, raw: bool, system: str | None) -> SamplingParams:
    from auditui.engine.sampling import SamplingParams

    return SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                          chat=False if raw else None, system=system)

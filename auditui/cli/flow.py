"""`auditui flow`: a residual feature's flow graph (table, --json, --dot, --mermaid), the
deactivation test (`auditui flow deactivate`) and transition-table precomputation (`flow tables`).

    auditui flow --pack P --feature 12/resid_post/1234 [--k 1] [--direction both] [--json|--dot|--mermaid]
                 [--session ID] [--no-save]
    auditui flow deactivate --feature 12/resid_post/1234 --text "..." --token -1 [--r 0] [--chat] [--json]
    auditui flow tables [--k 5]

Graphs and deactivation tests are stored as runs in the session (given, or the most recent one), as
the TUI stores them; --no-save skips that, and a database without sessions stores nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated

import typer

from auditui.cli import AuditGroup, app
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
    print_summary,
    saving_session,
    settings_from,
)
from auditui.errors import AuditError

if TYPE_CHECKING:
    from auditui.engine import Engine
    from auditui.store.database import Store

FeatureOpt = Annotated[str | None, typer.Option("--feature", "-f", help="LAYER/KIND/INDEX, e.g. 12/resid_post/1234")]
SaveOpt = Annotated[bool, typer.Option("--save/--no-save", help="store the result as a run in the session")]

flow_app = typer.Typer(cls=AuditGroup, invoke_without_command=True, add_completion=False,
                       help="Flow graphs of SAE features across layers (seed 001).")
app.add_typer(flow_app, name="flow")


def _save(db: str | None, session: int | None, write: Callable[[Store, int], int]) -> int | None:
    """Run `write(store, session_id)` on the session (given, or the latest one if any); the run id."""
    with saving_session(db, session) as target:
        if target is None:
            return None
        run_id = write(*target)
    typer.echo(f"stored as run {run_id} in {target[0].path}", err=True)
    return run_id


@flow_app.callback(invoke_without_command=True)
def flow(ctx: typer.Context, feature: FeatureOpt = None,
         k: int = typer.Option(1, "--k", help="matches kept per module and step (top-k)"),
         direction: str = typer.Option("both", "--direction", help="backward | forward | both"),
         t_res: float = typer.Option(0.5, "--t-res", help="t^(R): residual chain cut"),
         t_module: float = typer.Option(0.15, "--t-module", help="module features below this are dropped"),
         labels: int = typer.Option(5, "--labels", help="logit-lens tokens per node (0: none)"),
         tables: bool = typer.Option(False, "--tables", help="build and cache full transition tables"),
         as_json: JsonOpt = False,
         dot: bool = typer.Option(False, "--dot", help="print Graphviz DOT"),
         mermaid: bool = typer.Option(False, "--mermaid", help="print a Mermaid flowchart"),
         model: ModelOpt = None, pack: PackOpt = None, sae: SaeOpt = None, device: DeviceOpt = None,
         dtype: DtypeOpt = None, db: DbOpt = None, session: SessionOpt = None, save: SaveOpt = True) -> None:
    """Build the flow graph of a residual feature backward to layer 0 and forward to the last layer."""
    if ctx.invoked_subcommand is not None:
        return
    if feature is None:
        raise AuditError("give a feature: auditui flow --feature LAYER/KIND/INDEX (e.g. 12/resid_post/1234)")
    if as_json + dot + mermaid > 1:
        raise AuditError("choose one of --json, --dot, --mermaid")
    from auditui.engine.flow import graph_summary, to_dot, to_mermaid
    from auditui.workflows.flow import FlowRequest, flow_graph, record_flow

    settings = settings_from(model=model, pack=pack, device=device, dtype=dtype, db=db)
    request = FlowRequest(feature, k=k, direction=direction, t_res=t_res, t_module=t_module, labels=labels,
                          build_tables=tables)
    request.validate()  # before the model loads
    engine = engine_for(settings, sae)
    graph = flow_graph(engine, request)
    data = graph.to_dict()
    if save:
        data["run_id"] = _save(db, session, lambda store, sid: record_flow(store, engine, sid, graph))
    if dot or mermaid:
        typer.echo(to_dot(graph) if dot else to_mermaid(graph), nl=False)
        return
    emit(data, as_json, lambda _: print_summary(graph_summary(graph)))


@flow_app.command()
def deactivate(feature: FeatureOpt = None,
               text: str = typer.Option(..., "--text", help="the text to run"),
               token: int = typer.Option(-1, "--token", help="token index (negative counts from the end)"),
               r: float = typer.Option(0.0, "--r", help="rescaling coefficient (0 removes the predecessor)"),
               seed: int = typer.Option(0, "--seed", help="seed of the random-of-top-5 method"),
               chat: bool = typer.Option(False, "--chat", help="wrap the text in the chat template"),
               as_json: JsonOpt = False, model: ModelOpt = None, pack: PackOpt = None, sae: SaeOpt = None,
               device: DeviceOpt = None, dtype: DtypeOpt = None, db: DbOpt = None,
               session: SessionOpt = None, save: SaveOpt = True) -> None:
    """Rescale a feature's top-1 / top-5 / random-of-top-5 predecessors at one token (section 5.2)."""
    if feature is None:
        raise AuditError("give a feature: auditui flow deactivate --feature LAYER/KIND/INDEX --text ...")
    from auditui.engine.deactivation import deactivation_summary
    from auditui.workflows.flow import DeactivateRequest, record_deactivation
    from auditui.workflows.flow import deactivate as deactivate_workflow

    settings = settings_from(model=model, pack=pack, device=device, dtype=dtype, db=db)
    request = DeactivateRequest(feature, text, token=token, r=r, seed=seed, chat=chat)
    request.validate()
    engine = engine_for(settings, sae)
    result = deactivate_workflow(engine, request)
    summary = deactivation_summary(result)
    if save:
        run_id = _save(db, session, lambda store, sid: record_deactivation(store, engine, sid, request, result))
        result = {**result, "run_id": run_id}
    emit(result, as_json, lambda _: print_summary(summary))


@flow_app.command()
def tables(k: int = typer.Option(5, "--k", help="matches kept per row (at least 5)"), as_json: JsonOpt = False,
           model: ModelOpt = None, pack: PackOpt = None, sae: SaeOpt = None, device: DeviceOpt = None,
           dtype: DtypeOpt = None) -> None:
    """Build (or check) every transition table flow graphs over this pack use, cached under <cache>/flow."""
    from auditui.engine.flow import precompute_tables

    settings = settings_from(model=model, pack=pack, device=device, dtype=dtype)
    engine: Engine = engine_for(settings, sae)
    started = time.perf_counter()
    pairs = precompute_tables(engine, k, Printer())
    data = {"tables": len(pairs), "seconds": round(time.perf_counter() - started, 3),
            "cache": str(settings.cache_path / "flow")}
    emit(data, as_json, lambda d: typer.echo(f"{d['tables']} transition tables ready in {d['cache']} "
                                             f"({d['seconds']} s)"))

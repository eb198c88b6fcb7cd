"""`auditui flow`: a residual feature's flow graph (table, --json, --dot, --mermaid), the
deactivation test (`auditui flow deactivate`) and transition-table precomputation (`flow tables`).

    auditui flow --pack P --feature 12/resid_post/1234 [--k 1] [--direction both] [--json|--dot|--mermaid]
                 [--save | --db FILE | --session ID]     # store the graph as a run of kind "flow"
    auditui flow deactivate --feature 12/resid_post/1234 --text "..." --token -1 [--r 0] [--json]
    auditui flow tables [--k 5]
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated

import typer

from auditui.cli import AuditGroup, app
from auditui.cli.common import (DbOpt, DeviceOpt, DtypeOpt, JsonOpt, ModelOpt, PackOpt, SaeOpt, SessionOpt, emit,
                                engine_for, open_store, print_summary, progress_printer, settings_from)
from auditui.errors import AuditError

if TYPE_CHECKING:
    from auditui.store.database import Store

FeatureOpt = Annotated[str | None, typer.Option("--feature", "-f", help="LAYER/KIND/INDEX, e.g. 12/resid_post/1234")]
SaveOpt = Annotated[bool, typer.Option("--save", help="store the result as a run in the session database")]

flow_app = typer.Typer(cls=AuditGroup, invoke_without_command=True, add_completion=False,
                       help="Flow graphs of SAE features across layers (seed 001).")
app.add_typer(flow_app, name="flow")


def _save(db: str | None, session: int | None, write: Callable[[Store, int], int]) -> int:
    """Run `write(store, session_id)` on the session database (session: given or latest); the run id."""
    with open_store(db) as store:
        run_id = write(store, store.resolve_session(session))
    typer.echo(f"stored as run {run_id} in {store.path}", err=True)
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
         dtype: DtypeOpt = None, db: DbOpt = None, session: SessionOpt = None, save: SaveOpt = False) -> None:
    """Build the flow graph of a residual feature backward to layer 0 and forward to the last layer."""
    if ctx.invoked_subcommand is not None:
        return
    if feature is None:
        raise AuditError("give a feature: auditui flow --feature LAYER/KIND/INDEX (e.g. 12/resid_post/1234)")
    if as_json + dot + mermaid > 1:
        raise AuditError("choose one of --json, --dot, --mermaid")
    from auditui.engine.flow import (Thresholds, build_flow_graph, graph_summary, store_flow_graph, to_dot,
                                     to_mermaid)

    settings = settings_from(model=model, pack=pack, device=device, dtype=dtype, db=db)
    engine = engine_for(settings, sae, as_json or dot or mermaid)
    graph = build_flow_graph(engine, feature, k=k, direction=direction,
                             thresholds=Thresholds(cut=t_res, module=t_module), label_tokens=labels,
                             build_tables=tables)
    data = graph.to_dict()
    if save or session is not None or db is not None:
        data["run_id"] = _save(db, session, lambda store, sid: store_flow_graph(store, sid, graph, engine))
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
               session: SessionOpt = None, save: SaveOpt = False) -> None:
    """Rescale a feature's top-1 / top-5 / random-of-top-5 predecessors at one token (section 5.2)."""
    if feature is None:
        raise AuditError("give a feature: auditui flow deactivate --feature LAYER/KIND/INDEX --text ...")
    from auditui.engine.deactivation import deactivation_summary, deactivation_test, store_deactivation
    from auditui.engine.flow import text_ids

    settings = settings_from(model=model, pack=pack, device=device, dtype=dtype, db=db)
    engine = engine_for(settings, sae, as_json)
    result = deactivation_test(engine, feature, text_ids(engine.lm, text, chat=chat), token, r=r, seed=seed)
    summary = deactivation_summary(result)
    if save or session is not None or db is not None:
        result["run_id"] = _save(db, session,
                                 lambda store, sid: store_deactivation(store, sid, engine, result, text, chat))
    emit(result, as_json, lambda _: print_summary(summary))


@flow_app.command()
def tables(k: int = typer.Option(5, "--k", help="matches kept per row (at least 5)"), as_json: JsonOpt = False,
           model: ModelOpt = None, pack: PackOpt = None, sae: SaeOpt = None, device: DeviceOpt = None,
           dtype: DtypeOpt = None) -> None:
    """Build (or check) every transition table flow graphs over this pack use, cached under <cache>/flow."""
    from auditui.engine.flow import precompute_tables

    settings = settings_from(model=model, pack=pack, device=device, dtype=dtype)
    engine = engine_for(settings, sae, as_json)
    started = time.perf_counter()
    pairs = precompute_tables(engine, k, progress_printer(as_json))
    data = {"tables": len(pairs), "seconds": round(time.perf_counter() - started, 3),
            "cache": str(settings.cache_path / "flow")}
    emit(data, as_json, lambda d: typer.echo(f"{d['tables']} transition tables ready in {d['cache']} "
                                             f"({d['seconds']} s)"))

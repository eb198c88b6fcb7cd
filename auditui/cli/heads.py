"""`auditui heads`: attention heads' QK singular vectors, sparse attention decomposition and the SAE
latents they align with (seed 004).

    auditui heads scan  --text "..." [--threshold 0.3] [--top 20] [--per-head 5] [--chat] [--json]
    auditui heads pair  --text "..." --layer L --head H --query Q --key K [--chat] [--align 3] [--json]
    auditui heads align --layer L --head H [--k K] [--top 5] [--json]
    auditui heads align --feature LAYER/KIND/INDEX [--top 10] [--json]

Token positions count from 0 (negative: from the end). Results are stored as runs ("heads_scan",
"heads_pair", "heads_align") in the session (given with --session, or the most recent one), as the
TUI stores them; --no-save skips that, and a database without sessions stores nothing. `--json`
prints the run's result (see `auditui.workflows.heads`) with its `run_id`.
"""

from __future__ import annotations

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

if TYPE_CHECKING:
    from auditui.engine import Engine
    from auditui.store.database import Store
    from auditui.workflows.heads import HeadsOutcome

TextOpt = Annotated[str, typer.Option("--text", help="the text to run")]
ChatOpt = Annotated[bool, typer.Option("--chat", help="wrap the text in the chat template")]
SeedOpt = Annotated[int, typer.Option("--seed", help="seed of the random-rotation control / reference")]
SaveOpt = Annotated[bool, typer.Option("--save/--no-save", help="store the result as a run in the session")]

heads_app = typer.Typer(cls=AuditGroup, no_args_is_help=True, add_completion=False,
                        help="Attention heads: QK singular vectors, sparse attention decomposition, aligned latents.")
app.add_typer(heads_app, name="heads")

Work = Callable[["Store | None", "int | None"], "HeadsOutcome"]


def _stored(db: str | None, session: int | None, save: bool, work: Work) -> HeadsOutcome:
    """`work(store, session_id)` on the session (given, or the latest one), or `work(None, None)` unsaved."""
    if not save:
        return work(None, None)
    with saving_session(db, session) as target:
        if target is None:
            return work(None, None)
        outcome = work(*target)
    typer.echo(f"stored as run {outcome.run_id} in {target[0].path}", err=True)
    return outcome


def _engine(model: str | None, pack: str | None, sae: list[str] | None, device: str | None,
            dtype: str | None) -> Engine:
    return engine_for(settings_from(model=model, pack=pack, device=device, dtype=dtype), sae)


def _emit(outcome: HeadsOutcome, as_json: bool) -> None:
    emit({**outcome.result, "run_id": outcome.run_id}, as_json, lambda _: print_summary(outcome.summary))


@heads_app.command("scan")
def scan_command(text: TextOpt,
                 threshold: float = typer.Option(0.3, "--threshold", help="attention weight above which a pair is decomposed"),
                 top: int = typer.Option(20, "--top", help="sparsest pairs shown (and kept overall)"),
                 per_head: int = typer.Option(5, "--per-head", help="sparsest pairs kept for every head"),
                 first_key: bool = typer.Option(False, "--include-first-key", help="also decompose key 0 (attention sink)"),
                 chat: ChatOpt = False, seed: SeedOpt = 0, as_json: JsonOpt = False, model: ModelOpt = None,
                 pack: PackOpt = None, sae: SaeOpt = None, device: DeviceOpt = None, dtype: DtypeOpt = None,
                 db: DbOpt = None, session: SessionOpt = None, save: SaveOpt = True) -> None:
    """Every (layer, head, query, key) attended above the threshold, ranked by the sparsity S of its terms."""
    from auditui.workflows.heads import HeadsScanRequest, heads_scan

    request = HeadsScanRequest(text, threshold=threshold, top=top, per_head=per_head, chat=chat,
                               include_first_key=first_key, seed=seed)
    request.validate()
    engine = _engine(model, pack, sae, device, dtype)
    _emit(_stored(db, session, save, lambda store, sid: heads_scan(store, engine, sid, request, Printer())), as_json)


@heads_app.command("pair")
def pair_command(text: TextOpt,
                 layer: int = typer.Option(..., "--layer", help="layer of the head"),
                 head: int = typer.Option(..., "--head", help="head index in the layer"),
                 query: int = typer.Option(..., "--query", help="query token position (negative: from the end)"),
                 key: int = typer.Option(..., "--key", help="key token position, at most the query's"),
                 align: int = typer.Option(3, "--align", help="largest terms whose aligned latents are looked up"),
                 latents: int = typer.Option(5, "--latents", help="aligned latents per side"),
                 chat: ChatOpt = False, seed: SeedOpt = 0, as_json: JsonOpt = False, model: ModelOpt = None,
                 pack: PackOpt = None, sae: SaeOpt = None, device: DeviceOpt = None, dtype: DtypeOpt = None,
                 db: DbOpt = None, session: SessionOpt = None, save: SaveOpt = True) -> None:
    """ℓ̃ of one (layer, head, query, key) split over the head's singular pairs, with the rotation control."""
    from auditui.workflows.heads import HeadsPairRequest, heads_pair, resolve_pair

    request = HeadsPairRequest(text, layer, head, query, key, chat=chat, seed=seed, align=align, latents=latents)
    request.validate()
    engine = _engine(model, pack, sae, device, dtype)
    resolve_pair(engine.lm, request)  # a refused pair stores nothing and says why
    _emit(_stored(db, session, save, lambda store, sid: heads_pair(store, engine, sid, request, Printer())), as_json)


@heads_app.command("align")
def align_command(layer: int | None = typer.Option(None, "--layer", help="layer of the head"),
                  head: int | None = typer.Option(None, "--head", help="head index in the layer"),
                  k: int = typer.Option(0, "--k", help="singular pair index (0: the largest σ)"),
                  feature: str | None = typer.Option(None, "--feature", "-f",
                                                     help="LAYER/KIND/INDEX: the heads aligned with this latent"),
                  top: int = typer.Option(0, "--top", help="latents per side, or heads (0: 5 latents, 10 heads)"),
                  n_random: int = typer.Option(256, "--random", help="random unit vectors of the reference"),
                  seed: SeedOpt = 0, as_json: JsonOpt = False, model: ModelOpt = None, pack: PackOpt = None,
                  sae: SaeOpt = None, device: DeviceOpt = None, dtype: DtypeOpt = None, db: DbOpt = None,
                  session: SessionOpt = None, save: SaveOpt = True) -> None:
    """The SAE latents closest to a head's singular vectors u_k / v_k, or the heads closest to a latent."""
    from auditui.workflows.heads import HeadsAlignRequest, heads_align

    request = HeadsAlignRequest(layer=layer, head=head, k=k, feature=feature, top=top, n_random=n_random, seed=seed)
    request.validate()
    engine = _engine(model, pack, sae, device, dtype)
    _emit(_stored(db, session, save, lambda store, sid: heads_align(store, engine, sid, request, Printer())), as_json)

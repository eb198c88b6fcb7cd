"""Options shared by the headless commands, the one way they print results, open the session
database and load the engine."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Column, Table
from rich.text import Text

from auditui.config import Settings, load_settings
from auditui.text import visible

if TYPE_CHECKING:
    from auditui.engine import Engine
    from auditui.store.database import Store

ModelOpt = Annotated[str | None, typer.Option("--model", "-m", help="HF id, local dir, .gguf, or smollm2")]
PackOpt = Annotated[str | None, typer.Option("--pack", "-p", help="SAE pack dir or name (demo)")]
SaeOpt = Annotated[list[str] | None, typer.Option(
    "--sae", help="extra SAE source: RELEASE[:ID_GLOB], hf:OWNER/REPO[/DIR], or a saved SAE dir")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="auto | cpu | cuda | cuda:N")]
DtypeOpt = Annotated[str | None, typer.Option("--dtype", help="auto | float32 | bfloat16 | float16")]
DbOpt = Annotated[str | None, typer.Option("--db", help="session database file (AUDITUI_DB)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print machine-readable JSON")]
SessionOpt = Annotated[int | None, typer.Option("--session", "-s", help="session id (default: the most recent)")]
ReferenceModelOpt = Annotated[str | None, typer.Option(
    "--reference-model", help="a reference model beside the audited one (HF id, local dir, .gguf); same tokenizer and width")]


def settings_from(**flags: Any) -> Settings:
    return load_settings(**flags)


def engine_for(settings: Settings, sae: list[str] | None, as_json: bool = False) -> Engine:
    """The settings' model with its pack and any --sae sources; loading progress on stderr."""
    from auditui.workflows.engine import open_engine, sae_specs

    return open_engine(settings, sae_specs(settings, sae), progress=Printer())


@contextmanager
def open_store(db: str | None) -> Iterator[Store]:
    """The settings' session database; SQLite failures inside become one-line errors."""
    from auditui.store.database import Store, database_errors

    path = Path(settings_from(db=db).db)
    with database_errors(path):
        store = Store(path)
        try:
            yield store
        finally:
            store.close()
            for note in store.damaged:
                typer.echo(f"warning: {visible(note)}", err=True)


@contextmanager
def saving_session(db: str | None, session: int | None) -> Iterator[tuple[Store, int] | None]:
    """Where a result is stored: (store, the given or the latest session), or None with a note on
    stderr when the database has no session yet."""
    with open_store(db) as store:
        if session is None and store.latest_session_id() is None:
            typer.echo(f"not stored: {store.path} has no session yet", err=True)
            yield None
        else:
            yield store, store.resolve_session(session)


def emit(data: Any, as_json: bool, human: Callable[[Any], None]) -> None:
    """Print `data` as JSON (one document on stdout) or through `human`."""
    if as_json:
        json.dump(data, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        human(data)


def print_run(data: dict) -> None:
    """A stored run as the commands print it: "run ID (status): headline", then its summary."""
    summary = data["summary"] or {}
    print_summary(summary, f"run {data['run_id']} ({data['status']}): {summary.get('headline', '')}")


def print_summary(summary: dict, headline: str | None = None) -> None:
    """A run summary (headline, table, notes) on the terminal; model text is never markup."""
    console = Console(highlight=False)
    console.print(Text(visible(summary.get("headline", "") if headline is None else headline), style="bold"))
    table = summary.get("table")
    if table:
        grid = Table(*(Column(header=Text(visible(str(c)))) for c in table["columns"]), box=None)
        for row in table["rows"]:
            grid.add_row(*(Text(visible(str(cell))) for cell in row))
        console.print(grid)
    for note in summary.get("notes", []):
        console.print(Text(visible(f"note: {note}")))


class Printer:
    """The CLI's Progress: lines on stderr (stdout stays clean JSON), one per message without a count
    and one per tenth of a counted phase. It never asks to stop: Ctrl-C interrupts the command."""

    def __init__(self) -> None:
        self._shown: tuple[str, int] | None = None

    def progress(self, done: float, total: float, message: str = "") -> None:
        if not total:
            typer.echo(f"... {message}", err=True)
            return
        tenth = int(10 * done // total)
        if self._shown != (message, tenth):
            self._shown = (message, tenth)
            typer.echo(f"... {message} {int(100 * done // total)}%", err=True)

    def should_stop(self) -> bool:
        return False

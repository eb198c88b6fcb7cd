"""Base screens: the app's store and engine queue at hand, and the layout of a mission-step screen."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Input, Static

from auditui.tui.widgets.params import ParamRow
from auditui.tui.widgets.status import StatusBar


class AuditScreen(Screen):
    AUTO_FOCUS = "DataTable"  # not a text field: the screen's letter keys act from the start
    NEEDS_SAES = False  # a screen whose steps need SAEs says when they will be ready while the pack builds

    def on_screen_resume(self) -> None:
        building = getattr(self.app, "pack_build_line", "")
        if self.NEEDS_SAES and building:
            self.notify(f"{building}. The {self.title or 'screen'} needs them; prompts, sampling and labelling "
                        "work meanwhile.", title="SAEs", severity="warning", timeout=8, markup=False)

    @property
    def store(self) -> Any:
        return self.app.store  # type: ignore[attr-defined]

    def submit(self, title: str, fn: Callable[[Any], Any], on_done: Callable[[Any], None] | None = None,
               on_error: Callable[[str], None] | None = None, stages: tuple[str, ...] = ()) -> Any:
        """Queue engine work (see AuditApp.submit): `fn(ctx)` on the engine thread, callbacks here."""
        return self.app.submit(title, fn, on_done=on_done, on_error=on_error, stages=stages)  # type: ignore[attr-defined]

    def engine(self, ctx: Any) -> Any:
        """The loaded Engine, inside a job."""
        return ctx.state["engine"]

    def results(self) -> DataTable:
        """The table the screen's keys act on (focused when a text field is left)."""
        return self.query(DataTable).first()

    def action_back(self) -> None:
        """`b`, or Esc when no job runs: leave a text field first, then go back to the previous screen."""
        if isinstance(self.focused, Input):
            self.results().focus()
        elif len(self.app.screen_stack) > 2:  # never below the sessions screen
            self.app.pop_screen()

    def show_damaged(self) -> None:
        """The store's notes about damaged rows read so far, as one warning (then forgotten, so the next
        read of the same rows warns again)."""
        notes = list(self.store.damaged)
        self.store.damaged.clear()
        if notes:
            self.notify("\n".join(notes[:5]) + (f"\n… and {len(notes) - 5} more" if len(notes) > 5 else ""),
                        title="damaged database rows", severity="warning", timeout=20, markup=False)


class StepScreen(AuditScreen):
    """A row of parameters, a table of results (one row per `self.rows` entry), a detail pane."""

    TABLE_ID = "results"

    def __init__(self, session_id: int):
        super().__init__()
        self.session_id = session_id
        self.rows: list[dict] = []

    def params(self) -> list[tuple]:
        """(name, default, width[, "integer" | "number"]) of the parameter inputs."""
        raise NotImplementedError

    def param_rows(self) -> list[list[tuple]]:
        """The parameter inputs, one ParamRow per list (a screen with many fields has more than one)."""
        return [self.params()]

    def body(self) -> ComposeResult:
        """What sits between the parameters and the detail pane: the results table."""
        yield DataTable(cursor_type="row", id=self.TABLE_ID)

    def compose(self) -> ComposeResult:
        yield Header()
        for fields in self.param_rows():
            yield ParamRow(fields)
        yield from self.body()
        with VerticalScroll(id="detail-box"):
            yield Static(id="detail")
        yield StatusBar()
        yield Footer()

    @property
    def table(self) -> DataTable:
        return self.query_one(f"#{self.TABLE_ID}", DataTable)

    def results(self) -> DataTable:
        return self.table

    def param_values(self) -> dict[str, str]:
        return {name: value for row in self.query(ParamRow) for name, value in row.values().items()}

    def set_params(self, values: dict[str, str]) -> None:
        for row in self.query(ParamRow):
            row.set_values({name: value for name, value in values.items() if name in row.names})

    def current(self) -> dict | None:
        """The `rows` entry under the table cursor."""
        table = self.table
        return self.rows[table.cursor_row] if self.rows and table.row_count else None

    def show_detail(self, text: Text) -> None:
        self.query_one("#detail", Static).update(text)

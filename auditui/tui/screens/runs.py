"""Run history: every run of the session (id, kind, status, created, headline, parameters), newest
first; Enter reopens an attribution, flow, steering or sweep run in its own screen (an exact check
opens its attribution run), other kinds show their stored summary below."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.widgets import DataTable, Footer, Header, Static

from auditui.text import one_line
from auditui.tui.guard import guarded
from auditui.tui.screens.base import AuditScreen
from auditui.tui.screens.sessions import when
from auditui.tui.widgets.status import StatusBar
from auditui.tui.widgets.summary import summary_text

PARAMS_WIDTH = 60


def params_line(params: dict | None) -> str:
    """The run's scalar and short list parameters as `name=value`, one line (plans and texts left out)."""
    shown = []
    for name, value in (params or {}).items():
        if isinstance(value, list) and all(isinstance(v, str | int | float) for v in value) and len(value) <= 8:
            value = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
        if isinstance(value, bool | int | float) or (isinstance(value, str) and len(value) <= 40):
            shown.append(f"{name}={value}")
    line = " ".join(shown)
    return line if len(line) <= PARAMS_WIDTH else line[:PARAMS_WIDTH - 1] + "…"


def headline(run: dict) -> str:
    return (run["summary"] or {}).get("headline") or run["error"] or ""


class RunsScreen(AuditScreen):
    HELP = ("Every step is stored as a run with its parameters, provenance and status (done, cancelled, "
            "failed). Enter reopens attribution, flow, steering and sweep runs in their screens.")
    BINDINGS = [
        Binding("enter", "open", "Open", show=True),
        Binding("b", "back", "Back"),
    ]

    def __init__(self, session_id: int):
        super().__init__()
        self.session_id = session_id
        self.runs: list[dict] = []

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(id="notice")
        yield DataTable(cursor_type="row", id="runs")
        with VerticalScroll(id="detail-box"):
            yield Static(id="detail")
        yield StatusBar()
        yield Footer()

    @guarded
    def on_mount(self) -> None:
        self.title = "runs"
        self.query_one(DataTable).add_columns("id", "kind", "status", "created", "headline", "params")
        self.refresh_rows()

    @guarded
    def on_screen_resume(self) -> None:
        self.refresh_rows()

    def refresh_rows(self) -> None:
        table = self.query_one(DataTable)
        row = table.cursor_row
        self.runs = self.store.runs(self.session_id)[::-1]
        table.clear()
        for run in self.runs:
            table.add_row(str(run["id"]), run["kind"], run["status"], when(run["created"]),
                          Text(one_line(headline(run))[:80]), Text(one_line(params_line(run["params"]))),
                          key=str(run["id"]))
        self.query_one("#notice", Static).update(Text(f"{len(self.runs)} runs · Enter opens one · F1 keys"))
        if table.row_count:
            table.move_cursor(row=min(row, table.row_count - 1))
        self.show_damaged()

    def current(self) -> dict | None:
        table = self.query_one(DataTable)
        return self.runs[table.cursor_row] if self.runs and table.row_count else None

    def on_data_table_row_highlighted(self) -> None:
        run = self.current()
        if run is not None:
            text = Text(f"run {run['id']} · {run['kind']} · {run['status']}\n", style="bold")
            text.append(one_line(params_line(run["params"])) + "\n", style="dim")
            if run["summary"]:
                text.append_text(summary_text(run["summary"]))
            elif run["error"]:
                text.append(one_line(run["error"]))
            self.query_one("#detail", Static).update(text)

    def on_data_table_row_selected(self) -> None:
        self.action_open()

    @guarded
    def action_open(self) -> None:
        from auditui.tui.screens.attribution import AttributionScreen
        from auditui.tui.screens.flow import FlowScreen
        from auditui.tui.screens.steering import SteeringScreen
        from auditui.tui.screens.sweep import SweepScreen

        run = self.current()
        if run is None:
            return
        if not run["result"]:
            self.notify(f"run {run['id']} is {run['status']} and kept no result", timeout=4)
            return
        screens = {"attribution": AttributionScreen, "attribution_check": AttributionScreen, "flow": FlowScreen,
                   "steer": SteeringScreen, "sweep": SweepScreen}
        if run["kind"] not in screens:
            self.notify(f"{run['kind']} runs have no screen of their own: their summary is below", timeout=4)
            return
        target = run["parent_id"] if run["kind"] == "attribution_check" else run["id"]
        self.app.push_screen(screens[run["kind"]](self.session_id, run_id=target))

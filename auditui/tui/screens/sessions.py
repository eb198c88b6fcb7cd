"""Sessions: list, create, open, rename, delete (with confirmation), export a report (a dialog)."""

from __future__ import annotations

import time
from pathlib import Path

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Footer, Header, Static

from auditui.text import one_line
from auditui.tui.guard import guard_call, guarded
from auditui.tui.screens.base import AuditScreen
from auditui.tui.screens.dialogs import AskForm, Confirm
from auditui.tui.widgets.status import StatusBar


def when(timestamp: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(timestamp)) if timestamp else ""


def models_line(session: dict, audited: str = "") -> str:
    """The session's audited model (`audited`, else the one it was made with) and its reference model when it
    names one ("tiny-gpt2-planted vs reference tiny-gpt2"; a local reference by its folder's name), on one line."""
    reference = session.get("reference_model") or ""
    reference = Path(reference).name if Path(reference).is_absolute() else reference
    audited = audited or session["model_id"] or ""
    return one_line(f"{audited or '?'} vs reference {reference}" if reference else audited)


class SessionsScreen(AuditScreen):
    HELP = "A session keeps prompts, completions, labels and every run. All of it is saved as you act."
    BINDINGS = [
        Binding("n", "new", "New"),
        Binding("enter", "open", "Open", show=True),
        Binding("r", "rename", "Rename"),
        Binding("d", "delete", "Delete"),
        Binding("e", "export", "Export"),
        Binding("q", "app.quit", "Quit"),
    ]

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(id="notice")
        yield DataTable(cursor_type="row", id="sessions")
        yield StatusBar()
        yield Footer()

    @guarded
    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_columns("id", "name", "updated", "prompts", "completions", "runs", "models")
        self.refresh_rows()

    @guarded
    def on_screen_resume(self) -> None:
        self.refresh_rows()

    @guarded
    def refresh_rows(self, select: int | None = None) -> None:
        notice = self.query_one("#notice", Static)
        table = self.query_one(DataTable)
        if self.store is None:
            notice.update(Text(f"cannot open the session database: {self.app.store_error}"))  # type: ignore[attr-defined]
            return
        rows = self.store.sessions()
        notice.update(Text(f"{self.store.path.name} · {len(rows)} sessions · n new · Enter open · F1 keys"))
        table.clear()
        for row in rows:
            table.add_row(str(row["id"]), Text(one_line(row["name"])), when(row["updated"]), str(row["n_prompts"]),
                          str(row["n_completions"]), str(row["n_runs"]), Text(models_line(row)), key=str(row["id"]))
        if select is not None and str(select) in table.rows:
            table.move_cursor(row=table.get_row_index(str(select)))

    def selected_id(self) -> int | None:
        table = self.query_one(DataTable)
        if self.store is None or table.row_count == 0:
            return None
        key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key
        return int(key.value) if key.value is not None else None

    @guarded
    def action_new(self) -> None:
        if self.store is None:
            return
        def create(answer: dict[str, str] | None) -> None:
            if answer:
                session_id = self.store.create_session(answer["name"])  # the first sampling sets model and pack
                self.refresh_rows(select=session_id)
                self.open_session(session_id)
        self.app.push_screen(AskForm("Name of the new session:", [("name", "")]), guard_call(self, create))

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        self.action_open()

    @guarded
    def action_open(self) -> None:
        session_id = self.selected_id()
        if session_id is not None:
            self.open_session(session_id)

    @guarded
    def open_session(self, session_id: int) -> None:
        from auditui.tui.screens.samples import SamplesScreen

        self.store.touch_session(session_id)
        self.app.push_screen(SamplesScreen(session_id))

    @guarded
    def action_rename(self) -> None:
        session_id = self.selected_id()
        if session_id is None:
            return
        def rename(answer: dict[str, str] | None) -> None:
            if answer:
                self.store.rename_session(session_id, answer["name"])
                self.refresh_rows(select=session_id)
        self.app.push_screen(AskForm("New name:", [("name", self.store.session(session_id)["name"])]),
                             guard_call(self, rename))

    @guarded
    def action_delete(self) -> None:
        session_id = self.selected_id()
        if session_id is None:
            return
        name = self.store.session(session_id)["name"]
        def delete(yes: bool | None) -> None:
            if yes:
                self.store.delete_session(session_id)
                self.refresh_rows()
                self.notify(f"deleted session {name!r}", markup=False)
        self.app.push_screen(Confirm(f"Delete session {name!r} and everything in it?"), guard_call(self, delete))

    @guarded
    def action_export(self) -> None:
        from auditui.tui.screens.export import export_dialog

        session_id = self.selected_id()
        if session_id is not None:
            export_dialog(self, session_id)


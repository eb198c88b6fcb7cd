"""SAE packs: the loaded one's quality per SAE (variance explained, L0, dead latents, spliced-in loss),
and a picker to load another (a targeted dictionary beside the general pack)."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import DataTable, Label

from auditui.tui.widgets.summary import summary_table


class PackQuality(ModalScreen[None]):
    """A pack summary ({"headline", "table", "notes"}, from `auditui.engine.packs.pack_info`)."""

    BINDINGS = [Binding("escape,f2,q", "dismiss(None)", "Close")]

    def __init__(self, summary: dict):
        super().__init__()
        self.summary = summary

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog pack"):
            yield Label(Text(self.summary["headline"], style="bold"))
            yield summary_table(self.summary, cursor_type="row", id="pack-table")
            for note in self.summary["notes"]:
                yield Label(Text(note))


class PackPicker(ModalScreen[str | None]):
    """The built packs (rows of `auditui.engine.packs.list_packs`); Enter loads one, Esc cancels."""

    BINDINGS = [Binding("escape,q", "dismiss(None)", "Cancel")]

    def __init__(self, packs: list[dict], loaded: str):
        super().__init__()
        self.packs, self.loaded = packs, loaded

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog pack"):
            yield Label(Text("Load which SAE pack? (Enter: load, Esc: cancel)", style="bold"))
            table: DataTable = DataTable(cursor_type="row", id="pack-picker")
            table.add_columns("pack", "kind", "SAEs", "model", "")
            for row in self.packs:
                table.add_row(Text(row["name"]), row["kind"], str(row["saes"]), Text(row["model_id"]),
                              "loaded" if row["name"] == self.loaded else "", key=row["name"])
            yield table

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        self.dismiss(event.row_key.value)

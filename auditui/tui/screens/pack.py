"""The loaded SAE pack's quality per SAE (variance explained, L0, dead latents, spliced-in loss)."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Label

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

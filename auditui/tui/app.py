"""Placeholder app (the full TUI lands with the sessions issue)."""

from __future__ import annotations

from textual.app import App, ComposeResult
from textual.widgets import Footer, Header, Static

from auditui.config import Settings


class AuditApp(App):
    TITLE = "auditui"

    def __init__(self, settings: Settings):
        super().__init__()
        self.settings = settings

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(f"model {self.settings.model} · pack {self.settings.pack}")
        yield Footer()


def run_app(settings: Settings) -> None:
    AuditApp(settings).run()

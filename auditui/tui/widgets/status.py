"""The one-line status bar: engine state (model, SAEs) and the running job with its progress."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.reactive import reactive
from textual.widgets import ProgressBar, Static


class StatusBar(Horizontal):
    engine_text: reactive[str] = reactive("engine: starting")
    job_text: reactive[str] = reactive("")

    def compose(self) -> ComposeResult:
        yield Static(id="engine-state")
        yield ProgressBar(total=None, show_eta=False, id="job-progress")
        yield Static(id="job-state")

    def on_mount(self) -> None:
        self.sync(self.app)

    def sync(self, app: object) -> None:
        """Copy the app's engine/job state (the app calls this on every change; a bar not composed yet, or
        being removed as the app closes, has nothing to update)."""
        bars, engines = self.query(ProgressBar), self.query("#engine-state")
        if not bars or not engines:
            return
        self.engine_text = app.status_text() if hasattr(app, "status_text") else ""
        job = getattr(app, "job_status", None)
        self.job_text = job[0] if job else ""
        bars.first().display = job is not None
        for static in self.query("#job-state"):
            static.display = job is not None
        engines.first().display = job is None  # the job's stage and count need the room
        if job is not None:
            bars.first().update(total=job[2] or None, progress=job[1])

    def watch_engine_text(self, text: str) -> None:
        for static in self.query("#engine-state").results(Static):
            static.update(Text(text))

    def watch_job_text(self, text: str) -> None:
        for static in self.query("#job-state").results(Static):
            static.update(Text(text))

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
        """Copy the app's engine/job state (the app calls this on every change)."""
        self.engine_text = getattr(app, "engine_status", "")
        job = getattr(app, "job_status", None)
        self.job_text = job[0] if job else ""
        bar = self.query_one(ProgressBar)
        bar.display = job is not None
        self.query_one("#engine-state").display = job is None  # the job's stage and count need the room
        if job is not None:
            bar.update(total=job[2] or None, progress=job[1])

    def watch_engine_text(self, text: str) -> None:
        self.query_one("#engine-state", Static).update(Text(text))

    def watch_job_text(self, text: str) -> None:
        self.query_one("#job-state", Static).update(Text(text))

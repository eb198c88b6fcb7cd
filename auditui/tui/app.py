"""The auditui Textual app: sessions, then one screen per mission step, over one engine queue.

The first frame appears at once; the model and SAEs load in the engine queue with progress.
Every engine call is a `Job` (see jobs.py); the app turns job messages into the status bar,
notifications and the jobs' own callbacks. Nothing here computes: screens call engine/store
functions inside jobs and render their results.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.screen import Screen

from auditui.config import Settings, save_setting
from auditui.errors import AuditError
from auditui.store import Store
from auditui.tui.guard import guard_call
from auditui.tui.jobs import EngineQueue, Job, JobContext, JobDone, JobFailed, JobProgress, JobStarted
from auditui.tui.screens.dialogs import Help
from auditui.tui.themes import dark_and_light, load_themes
from auditui.tui.widgets.status import StatusBar


class AuditApp(App):
    CSS_PATH = "app.tcss"
    TITLE = "auditui"
    BINDINGS = [
        Binding("f1", "help", "Help"),
        Binding("f2", "pack_quality", "SAE pack quality", show=False),
        Binding("escape", "cancel_job", "Cancel job / back", show=False),
        Binding("ctrl+t", "toggle_theme", "Theme", show=False),
        Binding("ctrl+q", "quit", "Quit", show=False),
    ]

    def __init__(self, settings: Settings, load_engine: bool = True):
        super().__init__()
        self.settings = settings
        self.load_engine = load_engine
        self.store: Store | None = None
        self.store_error = ""
        self.engine_status = "engine: loading" if load_engine else "engine: off"
        self.engine_error = ""
        self.job_status: tuple[str, float, float] | None = None
        self.jobs = EngineQueue(self.post_message)
        self.pack: Any = None  # the loaded SAE pack's PackInfo (manifest), once the engine is up
        self._clocks: tuple = (None, {})  # (job, {stage: (when it started, done then)}): the ETA's clock per stage

    # -- start-up ------------------------------------------------------------------------------
    def on_mount(self) -> None:
        for theme in load_themes():
            self.register_theme(theme)
        self.theme = (self.settings.theme if self.settings.theme in self.available_themes
                      else dark_and_light(self.available_themes)[0])
        self.theme_changed_signal.subscribe(self, self._remember_theme)
        self.jobs.start(self.run_worker)
        try:
            self.store = Store(self.settings.db)
        except AuditError as exc:
            self.store_error = str(exc)
        from auditui.tui.screens.sessions import SessionsScreen

        self.push_screen(SessionsScreen())
        if self.load_engine:
            self.submit("load model", self._load_engine, on_done=self._engine_loaded,
                        on_error=self._engine_failed, needs_engine=False, cancellable=False)

    def _load_engine(self, ctx: JobContext) -> tuple[str, list[str], Any]:
        """On the engine thread: the Engine into the shared state; (status line, SAE warnings, pack) back."""
        from auditui.workflows.engine import open_engine

        ctx.progress(0, 0, f"loading {self.settings.model}")
        engine = open_engine(self.settings, progress=ctx, strict=False)
        ctx.state["engine"] = engine
        lm, bank = engine.lm, engine.bank
        saes = (f"{len(bank)} SAEs" + (f" ({bank.pack.name})" if bank.pack else "")) if len(bank) else "no SAEs"
        return f"{lm.model_id} · {lm.n_layers} layers · {saes} · {lm.device}", list(bank.warnings), bank.pack

    def _engine_loaded(self, result: tuple[str, list[str], Any]) -> None:
        self.engine_status, warnings, self.pack = result
        self._sync_status()
        for warning in warnings:
            self.notify(warning, title="SAEs", severity="warning", timeout=10, markup=False)
        for screen in self.screen_stack:  # a session opened while the model loaded: is it this model's?
            if hasattr(screen, "check_model"):
                guard_call(self, screen.check_model)()

    def _engine_failed(self, error: str) -> None:
        self.engine_error, self.engine_status = error, "model not loaded"
        self._sync_status()

    def _remember_theme(self, theme: Any) -> None:
        guard_call(self, save_setting)("theme", theme.name)

    # -- jobs ----------------------------------------------------------------------------------
    def submit(self, title: str, fn: Callable[[JobContext], Any], on_done: Callable[[Any], None] | None = None,
               on_error: Callable[[str], None] | None = None, needs_engine: bool = True,
               cancellable: bool = True, stages: tuple[str, ...] = ()) -> Job:
        """Queue engine work; `fn(ctx)` runs on the engine thread, callbacks on the UI thread; `stages`: see Job.

        A job that is not cancellable (the model load: everything after it needs the model) runs to
        its end when Esc is pressed; Esc then only drops the jobs queued behind it."""
        def run(ctx: JobContext) -> Any:
            if needs_engine and "engine" not in ctx.state:
                raise AuditError(f"the model is not loaded{': ' + self.engine_error if self.engine_error else ''}")
            return fn(ctx)
        return self.jobs.submit(Job(title, run, on_done, on_error, cancellable=cancellable, stages=stages))

    def on_job_started(self, message: JobStarted) -> None:
        self._set_job((message.job.title, 0, 0))

    def on_job_progress(self, message: JobProgress) -> None:
        stage = message.message if message.message != message.job.title else ""
        if self._clocks[0] is not message.job:
            self._clocks = (message.job, {})
        clocks = self._clocks[1]  # a stage keeps its clock when the job comes back to it (sampling after saving)
        if stage not in clocks or message.done < clocks[stage][1]:  # a new stage, or its count restarted
            clocks[stage] = (time.monotonic(), message.done)
        started, done_then = clocks[stage]
        count = f" {message.done:g}/{message.total:g}" if message.total else ""
        left = eta(time.monotonic() - started, message.done - done_then, message.total - message.done)
        head = message.job.title + stage_of(message.job.stages, message.message)
        self._set_job((f"{head}{': ' * bool(stage)}{stage}{count}{left}", message.done, message.total))

    def on_job_done(self, message: JobDone) -> None:
        self._set_job(None)
        if message.job.on_done:
            guard_call(self, message.job.on_done)(message.result)

    def on_job_failed(self, message: JobFailed) -> None:
        self._set_job(None)
        job = message.job
        if message.cancelled:
            self.notify(f"{job.title}: cancelled", timeout=3)
        else:
            self.notify(message.error, title=job.title, severity="error", timeout=10, markup=False)
        if job.on_error:
            guard_call(self, job.on_error)(message.error)

    def _set_job(self, status: tuple[str, float, float] | None) -> None:
        self.job_status = status
        self._sync_status()

    def _sync_status(self) -> None:
        for bar in self.screen.query(StatusBar):
            bar.sync(self)

    def on_screen_resume(self) -> None:
        self._sync_status()

    # -- actions -------------------------------------------------------------------------------
    def action_cancel_job(self) -> None:
        """Esc: cancel the running job; with none, leave a text field or go back (AuditScreen.action_back)."""
        if self.jobs.cancel_current():
            self.notify("cancelling…", timeout=2)
        elif self.jobs.busy:
            self.notify("the model keeps loading: every step needs it", timeout=3)
        elif hasattr(self.screen, "action_back"):
            self.screen.action_back()

    def action_toggle_theme(self) -> None:
        dark, light = dark_and_light(self.available_themes)
        self.theme = light if self.theme == dark else dark

    def action_help(self) -> None:
        if isinstance(self.screen, Help):
            return
        mine = {b.action for cls in type(self.screen).__mro__ if cls.__module__.startswith("auditui.")
                for b in cls.__dict__.get("BINDINGS", [])}  # declared by auditui's screens, not Textual's
        rows = [(keys, binding.description or binding.action, binding.action in mine)
                for node in (self.screen, self) for keys, binding in own_keys(node)]
        own = [row[:2] for row in rows if row[2]]
        self.push_screen(Help(own + [row[:2] for row in rows if not row[2]], getattr(self.screen, "HELP", ""),
                              getattr(self.screen, "TERMS", ()), own=len(own)))

    def action_pack_quality(self) -> None:
        """Show the loaded pack's per-SAE quality (its manifest is in memory: no engine job, so F2
        works while a long job runs)."""
        from auditui.engine.packs import pack_info
        from auditui.tui.screens.pack import PackQuality

        if isinstance(self.screen, PackQuality):
            return
        if self.pack is None:
            self.notify("no SAE pack is loaded (start auditui with --pack NAME)", severity="error", markup=False)
            return
        self.push_screen(PackQuality(pack_info(self.pack)["summary"]))

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        yield SystemCommand("Toggle light/dark theme", "Switch between the auditui themes", self.action_toggle_theme)
        yield SystemCommand("Cancel the running job", "Same as Escape", self.action_cancel_job)
        yield SystemCommand("Keys", "Show the keys of this screen (F1)", self.action_help)
        yield SystemCommand("SAE pack quality", "Variance explained, L0, dead latents, spliced-in loss (F2)",
                            self.action_pack_quality)
        for keys, binding in own_keys(screen):  # every key of the screen by name, whatever has focus
            if binding.description:
                yield SystemCommand(binding.description, f"key {keys}", partial(screen.run_action, binding.action))

    def on_unmount(self) -> None:
        self.jobs.shutdown()


def eta(elapsed: float, done: float, left: float) -> str:
    """The label's ETA (" · ~1m20s left") from a stage's pace so far; "" before a second or a step has passed."""
    if elapsed < 1 or done <= 0 or left <= 0:
        return ""
    seconds = round(elapsed / done * left)
    shown = f"{seconds}s" if seconds < 60 else (f"{seconds // 60}m{seconds % 60:02d}s" if seconds < 3600
                                                 else f"{seconds // 3600}h{seconds % 3600 // 60:02d}m")
    return f" · ~{shown} left"


def stage_of(stages: tuple[str, ...], message: str) -> str:
    """" · stage k/n" when `message` begins with the k-th of a job's n > 1 `stages`; "" otherwise."""
    k = next((i for i, name in enumerate(stages) if message.startswith(name)), None)
    return f" · stage {k + 1}/{len(stages)}" if k is not None and len(stages) > 1 else ""


def own_keys(node: App | Screen) -> list[tuple[str, Binding]]:
    """(keys, binding) of the node's own bindings, one per action: "plus,equals_sign" is one row "+"."""
    rows: dict[str, tuple[list[str], Binding]] = {}
    for key, bindings in node._bindings.key_to_bindings.items():
        for binding in bindings:
            keys = rows.setdefault(binding.action, ([], binding))[0]
            if (binding.key_display or key) not in keys:
                keys.append(binding.key_display or key)
    return [(" ".join(keys), binding) for keys, binding in rows.values()]


def run_app(settings: Settings) -> None:
    AuditApp(settings).run()

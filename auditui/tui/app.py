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
        Binding("f3", "switch_pack", "Load another SAE pack", show=False),
        Binding("escape", "cancel_job", "Cancel job / back", show=False),
        Binding("ctrl+t", "toggle_theme", "Theme", show=False),
        Binding("ctrl+q", "quit", "Quit", show=False),
    ]

    def __init__(self, settings: Settings, load_engine: bool = True, build_pack: bool = False):
        """`build_pack`: when the settings name a pack that is not built, build it in the background
        (`auditui pack build`, detached; `pack_build_args` are added to its command line)."""
        super().__init__()
        self.settings = settings
        self.load_engine = load_engine
        self.build_pack = build_pack
        self.pack_build_args: tuple[str, ...] = ()
        self.pack_build_line = ""  # "SAEs in ~17 min (building demo: train 43%)" while a build runs
        self.store: Store | None = None
        self.store_error = ""
        self.engine_status = "engine: loading" if load_engine else "engine: off"
        self.engine_error = ""
        self.job_status: tuple[str, float, float] | None = None
        self.jobs = EngineQueue(self.post_message)
        self.pack: Any = None  # the loaded SAE pack's PackInfo (manifest), once the engine is up
        self.building = ""  # the pack a background build makes (the settings' pack when the app started)
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
        if self.build_pack and self.settings.pack:
            self.run_worker(self._start_pack_build, thread=True, name="pack build", exit_on_error=False)
        if self.load_engine:
            self.submit("load model", self._load_engine, on_done=self._engine_loaded,
                        on_error=self._engine_failed, needs_engine=False, cancellable=False)

    def _load_engine(self, ctx: JobContext) -> tuple[str, list[str], Any]:
        """On the engine thread: the Engine into the shared state; (status line, SAE warnings, pack) back."""
        from auditui.workflows.engine import open_engine

        ctx.progress(0, 0, f"loading {self.settings.model}")
        engine = open_engine(self.settings, progress=ctx, strict=False)
        ctx.state["engine"] = engine
        return engine_line(engine), list(engine.bank.warnings), engine.bank.pack

    def _engine_loaded(self, result: tuple[str, list[str], Any]) -> None:
        self.engine_status, warnings, self.pack = result
        self._sync_status()
        for warning in warnings if self.pack is not None or not self.pack_build_line else ():  # a build is on its way
            self.notify(warning, title="SAEs", severity="warning", timeout=10, markup=False)
        for screen in self.screen_stack:  # a session opened while the model loaded: is it this model's?
            if hasattr(screen, "check_model"):
                guard_call(self, screen.check_model)()

    def _engine_failed(self, error: str) -> None:
        self.engine_error, self.engine_status = error, "model not loaded"
        self._sync_status()

    # -- the SAE pack, built in the background --------------------------------------------------
    def _start_pack_build(self) -> None:
        """In a thread: when the settings' pack is a name not built yet, start its build unless one is
        running; then watch it. (A path or a registry source has nothing to build.)"""
        from auditui.pack_build import is_building, is_built, start_build

        cache, name = self.settings.cache_path, self.settings.pack
        try:
            if is_built(cache, name):
                return
        except AuditError:  # not a pack name: nothing to build
            return
        try:
            log = None if is_building(cache, name) else start_build(self.settings, name, self.pack_build_args)
        except OSError as exc:
            self.call_from_thread(self.notify, f"cannot start building pack {name}: {exc}", title="SAEs",
                                  severity="error", timeout=15, markup=False)
            return
        self.call_from_thread(self._watch_pack_build, log)

    def _watch_pack_build(self, log: Any) -> None:
        self.building = self.settings.pack
        self.pack_build_line = f"SAEs: (building {self.building}: starting)"
        if log is not None:
            self.notify(f"Building the SAE pack {self.building} in the background; sampling and labelling work "
                        f"meanwhile, and the status bar says when it is ready. Log: {log}", title="SAEs", timeout=15,
                        markup=False)
        self._pack_timer = self.set_interval(2.0, self._poll_pack_build)
        self._sync_status()

    def _poll_pack_build(self) -> None:
        from auditui.pack_build import is_built, read_status

        cache, name = self.settings.cache_path, self.building
        status = read_status(cache, name)
        if is_built(cache, name):
            self._pack_timer.stop()
            self.pack_build_line = ""
            if self.pack is None:  # no other pack was loaded meanwhile (F3)
                self.load_pack(name)
            else:
                self.notify(f"The SAE pack {name} is built; F3 loads it", title="SAEs", timeout=10, markup=False)
        elif status is not None and status.state == "failed":
            self._pack_timer.stop()
            self.pack_build_line = status.line()
            self.notify(f"building pack {name} failed: {status.message}", title="SAEs", severity="error", timeout=20,
                        markup=False)
        elif status is not None:
            self.pack_build_line = status.line()
        self._sync_status()

    def load_pack(self, name: str) -> None:
        """Load the built pack `name` in place of the engine's SAEs (an engine job); it becomes the
        settings' pack of this app, so what is sampled from then on records it."""
        def load(ctx: JobContext) -> tuple[str, list[str], Any]:  # on the engine thread
            from auditui.engine.saes import SAEBank

            engine = ctx.state["engine"]
            lm = engine.lm
            engine.bank = SAEBank.from_specs([name], self.settings.cache_path, device=lm.device,
                                             model=lm.model).attach(lm)
            return engine_line(engine), list(engine.bank.warnings), engine.bank.pack

        def loaded(result: tuple[str, list[str], Any]) -> None:
            self.settings = self.settings.with_overrides(pack=name)
            self._engine_loaded(result)
            self.notify(f"The SAE pack {name} is loaded: {result[0]}", title="SAEs", timeout=10, markup=False)
        self.submit("load SAEs", load, on_done=loaded, cancellable=False)

    def action_switch_pack(self) -> None:
        """F3: pick a built pack (a targeted dictionary, another general pack) and load it."""
        from auditui.engine.packs import list_packs
        from auditui.tui.screens.pack import PackPicker

        packs = [row for row in guard_call(self, list_packs)(self.settings.cache_path) or []
                 if row["status"] == "complete"]
        if not packs:
            self.notify(f"no built pack under {self.settings.cache_path / 'packs'}", severity="error", markup=False)
            return
        loaded = self.pack.name if self.pack is not None else ""

        def picked(name: str | None) -> None:
            if name and name != loaded:
                self.load_pack(name)
        self.push_screen(PackPicker(packs, loaded), picked)

    def status_text(self) -> str:
        """The status bar's engine part: the model, and the pack build while one runs."""
        if self.pack_build_line:
            return f"{self.pack_build_line} · {self.engine_status.split(' · ')[0]}"
        return self.engine_status

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
            self.notify(self.pack_build_line or "no SAE pack is loaded (start auditui with --pack NAME)",
                        severity="warning" if self.pack_build_line else "error", markup=False)
            return
        self.push_screen(PackQuality(pack_info(self.pack)["summary"]))

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        yield SystemCommand("Toggle light/dark theme", "Switch between the auditui themes", self.action_toggle_theme)
        yield SystemCommand("Cancel the running job", "Same as Escape", self.action_cancel_job)
        yield SystemCommand("Keys", "Show the keys of this screen (F1)", self.action_help)
        yield SystemCommand("SAE pack quality", "Variance explained, L0, dead latents, spliced-in loss (F2)",
                            self.action_pack_quality)
        yield SystemCommand("Load another SAE pack", "A targeted dictionary or another pack, by name (F3)",
                            self.action_switch_pack)
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


def engine_line(engine: Any) -> str:
    """"SmolLM2-135M-Instruct · 30 layers · 91 SAEs (demo) · cpu"."""
    lm, bank = engine.lm, engine.bank
    saes = (f"{len(bank)} SAEs" + (f" ({bank.pack.name})" if bank.pack else "")) if len(bank) else "no SAEs"
    return f"{lm.model_id} · {lm.n_layers} layers · {saes} · {lm.device}"


def run_app(settings: Settings) -> None:
    AuditApp(settings, build_pack=True).run()

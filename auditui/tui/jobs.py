"""One serialized engine queue for the TUI.

All engine work (model load, sampling, attribution, flow ...) runs on a single background thread,
one job at a time, so the UI thread never blocks and two jobs never race for the model. Jobs only
report through messages (JobProgress / JobDone / JobFailed) posted to the app; their `on_done` /
`on_error` callbacks then run on the UI thread. Escape cancels the running job cooperatively:
the job's `should_stop()` turns true and the engine call stops at its next check.

An engine error becomes a message in the UI, never a crash of the app.
"""

from __future__ import annotations

import logging
import queue
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from textual.message import Message

from auditui.errors import AuditError
from auditui.progress import Cancelled

log = logging.getLogger("auditui.tui")


@dataclass
class Job:
    title: str
    fn: Callable[[JobContext], Any]
    on_done: Callable[[Any], None] | None = None
    on_error: Callable[[str], None] | None = None
    cancellable: bool = True
    stages: tuple[str, ...] = ()  # the job's stages in order, as its progress messages begin: "stage k/n" in the label
    cancel: threading.Event = field(default_factory=threading.Event)


class JobContext:
    """What a job sees on the engine thread: the shared state, and the `auditui.progress.Progress`
    that workflows report to and check for cancellation."""

    def __init__(self, runner: EngineQueue, job: Job):
        self.runner, self.job = runner, job

    @property
    def state(self) -> dict[str, Any]:
        """Engine-thread state shared by jobs (e.g. the loaded Engine under "engine")."""
        return self.runner.state

    def progress(self, done: float, total: float, message: str = "") -> None:
        self.runner.post(JobProgress(self.job, done, total, message))

    def should_stop(self) -> bool:
        return self.job.cancel.is_set()


class JobStarted(Message):
    def __init__(self, job: Job):
        super().__init__()
        self.job = job


class JobProgress(Message):
    def __init__(self, job: Job, done: float, total: float, message: str):
        super().__init__()
        self.job, self.done, self.total, self.message = job, done, total, message


class JobDone(Message):
    def __init__(self, job: Job, result: Any):
        super().__init__()
        self.job, self.result = job, result


class JobFailed(Message):
    def __init__(self, job: Job, error: str, cancelled: bool = False):
        super().__init__()
        self.job, self.error, self.cancelled = job, error, cancelled


class EngineQueue:
    """A FIFO of jobs run one at a time in one Textual thread worker; `post` delivers messages."""

    def __init__(self, post: Callable[[Message], Any]):
        self.post = post
        self.state: dict[str, Any] = {}
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._current: Job | None = None
        self._lock = threading.Lock()

    def start(self, run_worker: Callable[..., Any]) -> None:
        """Start the loop with the app's `run_worker` (a failing job never exits the app)."""
        run_worker(self._loop, thread=True, exit_on_error=False, name="engine-queue", group="engine")

    def submit(self, job: Job) -> Job:
        self._queue.put(job)
        return job

    @property
    def busy(self) -> bool:
        return self._current is not None or not self._queue.empty()

    def cancel_current(self) -> bool:
        """Ask the running job to stop and drop the queued ones; True if anything was cancelled."""
        dropped = False
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                dropped = True
                self.post(JobFailed(job, "cancelled before it started", cancelled=True))
        with self._lock:
            if self._current is not None and self._current.cancellable:
                self._current.cancel.set()
                return True
        return dropped

    def shutdown(self) -> None:
        self.cancel_current()
        self._queue.put(None)

    def _loop(self) -> None:
        while (job := self._queue.get()) is not None:
            with self._lock:
                self._current = job
            self.post(JobStarted(job))
            try:
                result = job.fn(JobContext(self, job))
                if job.cancel.is_set():
                    raise Cancelled()
                self.post(JobDone(job, result))
            except Cancelled:
                self.post(JobFailed(job, "cancelled", cancelled=True))
            except AuditError as exc:
                self.post(JobFailed(job, str(exc)))
            except Exception as exc:  # engine bugs and OOMs must not kill the app
                log.error("job %s failed:\n%s", job.title, traceback.format_exc())
                self.post(JobFailed(job, f"{type(exc).__name__}: {exc}".splitlines()[0]))
            finally:
                with self._lock:
                    self._current = None

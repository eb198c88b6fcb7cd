"""A pack build as a process of its own: one per pack at a time, its progress in a status file.

    with build_lock(cache, name): ... build_pack(..., progress=StatusFile(...))   # `auditui pack build`
    start_build(settings, name) -> log path    # the TUI: `auditui pack build NAME`, detached
    read_status(cache, name) -> BuildStatus | None    # anyone: what the build is doing, when it ends

Beside the work folder, under `<cache>/packs/`: `.NAME.build.lock` (an flock held for the build's
life, so a killed build never blocks the next one), `.NAME.build.json` (the status, rewritten
atomically every few seconds) and `.NAME.build.log` (the detached process's output). The build
outlives the TUI that started it; a TUI opened later watches the same build.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from auditui.config import Settings
from auditui.engine.saes import MANIFEST, check_pack_name, packs_root
from auditui.errors import AuditError
from auditui.progress import Progress

WRITE_EVERY = 2.0  # seconds between status writes (a stage change is written at once)


def _path(cache_dir: Path, name: str, suffix: str) -> Path:
    return packs_root(cache_dir) / f".{check_pack_name(name)}.build.{suffix}"


def log_path(cache_dir: Path, name: str) -> Path:
    return _path(cache_dir, name, "log")


@contextmanager
def build_lock(cache_dir: Path, name: str) -> Iterator[None]:
    """Hold the pack's build lock (refused in one line while another process holds it)."""
    path = _path(cache_dir, name, "lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            raise AuditError(f"pack {name} is already being built (process {holder}); "
                             f"see its progress with: auditui pack status {name}") from None
        handle.truncate(0)
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def is_built(cache_dir: Path, name: str) -> bool:
    """True once the pack is published (a build renames its folder into place only when complete)."""
    return (packs_root(cache_dir) / check_pack_name(name) / MANIFEST).exists()


def is_building(cache_dir: Path, name: str) -> bool:
    """True while some process holds the pack's build lock."""
    path = _path(cache_dir, name, "lock")
    if not path.exists():
        return False
    with open(path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


@dataclass
class BuildStatus:
    """What a build is doing. Times are epoch seconds; `deadline` 0 = no wall-clock budget (GPU)."""

    name: str
    pid: int
    state: str = "running"  # running | done | failed
    stage: str = "starting"
    done: float = 0.0
    total: float = 0.0
    started: float = 0.0
    deadline: float = 0.0
    updated: float = 0.0
    message: str = ""

    def eta(self, now: float) -> float | None:
        """Seconds until the pack is ready: the deadline's, else the training pace's (None before it is known
        and once the build has ended)."""
        if self.state != "running":
            return None
        if self.deadline:
            return max(0.0, self.deadline - now)
        if self.stage == "train" and self.done > 0 and self.total > self.done:
            return (now - self.started) / self.done * (self.total - self.done)
        return None

    def line(self, now: float | None = None) -> str:
        """One short line for a status bar, what matters first: "SAEs in ~17 min (building demo: train 43%)"."""
        now = time.time() if now is None else now
        if self.state == "failed":
            return f"SAEs: building {self.name} failed ({self.message[:60]})"
        if self.state == "done":
            return f"SAEs: pack {self.name} is built"
        share = f" {100 * self.done / self.total:.0f}%" if self.total else ""
        eta = self.eta(now)
        ready = "SAEs:" if eta is None else f"SAEs in ~{max(1, round(eta / 60))} min"
        return f"{ready} (building {self.name}: {self.stage}{share})"


class StatusFile:
    """A build's Progress: passes every call to `inner` and keeps the status file current."""

    def __init__(self, cache_dir: Path, name: str, inner: Progress, budget_seconds: float = 0.0):
        now = time.time()
        self.path = _path(cache_dir, name, "json")
        self.inner = inner
        self.status = BuildStatus(name, os.getpid(), started=now, deadline=now + budget_seconds if budget_seconds else 0.0)
        self.written = 0.0
        self._write()

    def progress(self, done: float, total: float, message: str = "") -> None:
        self.inner.progress(done, total, message)
        status = self.status
        if total:
            changed = message != status.stage
            status.stage, status.done, status.total = message, done, total
        else:
            changed, status.message = True, message
        if changed or time.monotonic() - self.written > WRITE_EVERY:
            self._write()

    def should_stop(self) -> bool:
        return self.inner.should_stop()

    def finish(self, error: str = "") -> None:
        self.status.state, self.status.message = ("failed", error) if error else ("done", self.status.message)
        self._write()

    def _write(self) -> None:
        self.status.updated = time.time()
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(asdict(self.status)))
        tmp.replace(self.path)
        self.written = time.monotonic()


def read_status(cache_dir: Path, name: str) -> BuildStatus | None:
    """The pack's last build status (None when there is none or it cannot be read); a "running" build
    whose process no longer holds the lock is reported as failed."""
    try:
        data = json.loads(_path(cache_dir, name, "json").read_text())
        status = BuildStatus(**{f.name: data[f.name] for f in fields(BuildStatus) if f.name in data})
    except (OSError, ValueError, TypeError):
        return None
    if status.state == "running" and not is_building(cache_dir, name):
        status.state, status.message = "failed", f"the build stopped; see {log_path(cache_dir, name)}"
    return status


def start_build(settings: Settings, name: str, extra_args: tuple[str, ...] = ()) -> Path:
    """Start `auditui pack build NAME [extra_args]` for the settings' model as a detached process (it
    outlives the caller); its output goes to the log, whose path is returned."""
    log = log_path(settings.cache_path, name)
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "auditui", "pack", "build", name, "--model", settings.model,
               "--device", settings.device, "--dtype", settings.dtype, *extra_args]
    with open(log, "w") as out:
        subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                         start_new_session=True, env={**os.environ, "AUDITUI_CACHE_DIR": str(settings.cache_path)})
    return log

"""One progress and cancellation context for every long step, engine methods included.

The TUI's job context and the CLI's printer implement `Progress`; engine methods take one and call
`progress(done, total, message)` per unit of work and `should_stop()` between units. A step that
notices a stop raises `Cancelled` (through `stop_if_asked`), or returns what it has when a partial
result is meaningful (an exact check stopped after some latents); the run lifecycle records either
as a cancelled run.
"""

from __future__ import annotations

from typing import Protocol

from auditui.errors import AuditError


class Cancelled(AuditError):
    """The user asked the running step to stop."""

    def __init__(self, message: str = "cancelled by the user"):
        super().__init__(message)


class Progress(Protocol):
    def progress(self, done: float, total: float, message: str = "") -> None:
        """`done` of `total` units of the phase `message` (total 0: no count known)."""

    def should_stop(self) -> bool:
        """True once the user asked to stop."""


class Quiet:
    """A Progress that shows nothing and never stops."""

    def progress(self, done: float, total: float, message: str = "") -> None:
        return None

    def should_stop(self) -> bool:
        return False


QUIET = Quiet()


def stop_if_asked(progress: Progress) -> None:
    if progress.should_stop():
        raise Cancelled()

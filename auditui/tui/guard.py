"""`@guarded`: a UI handler whose user-facing error (bad input, damaged database, unwritable file)
becomes a one-line message.

Textual stops a widget's message loop when one of its handlers raises, so errors must be caught in
the handler itself; engine errors already arrive as JobFailed messages (jobs.py).
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Callable
from typing import Any, TypeVar

from auditui.errors import AuditError

F = TypeVar("F", bound=Callable[..., Any])


def guard_call(widget: Any, fn: F) -> F:
    """`fn` whose AuditError / sqlite3.Error / OSError is shown by `widget.notify` instead of raised."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (AuditError, sqlite3.Error, OSError) as exc:
            widget.notify(str(exc), title="error", severity="error", timeout=10, markup=False)
            return None
    return wrapper  # type: ignore[return-value]


def guarded(method: F) -> F:
    """The method form of `guard_call`, for handlers and actions of a widget or screen."""
    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        return guard_call(self, method)(self, *args, **kwargs)
    return wrapper  # type: ignore[return-value]

"""Session storage (SQLite through sqlite-utils). Never imports Textual."""

from auditui.store.database import LABELS, Store

__all__ = ["LABELS", "Store"]

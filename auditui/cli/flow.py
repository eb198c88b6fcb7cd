"""Headless commands (filled in by its issue)."""

from auditui.cli import app  # noqa: F401

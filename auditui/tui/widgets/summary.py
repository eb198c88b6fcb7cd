"""A run summary ({"headline", "table", "notes"}, the convention every engine step follows) as text."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import DataTable


def summary_text(summary: dict) -> Text:
    """A run summary (headline / table / notes) as plain text."""
    text = Text(summary.get("headline", "") + "\n", style="bold")
    table = summary.get("table") or {}
    if table:
        text.append("  ".join(table["columns"]) + "\n", style="dim")
        for row in table["rows"]:
            text.append("  ".join(str(cell) for cell in row) + "\n")
    for note in summary.get("notes", []):
        text.append(f"{note}\n", style="dim")
    return text


def summary_table(summary: dict, **kwargs) -> DataTable:
    """A run summary's table as a DataTable (cells as literal text, never markup)."""
    table: DataTable = DataTable(**kwargs)
    table.add_columns(*summary["table"]["columns"])
    for row in summary["table"]["rows"]:
        table.add_row(*(Text(str(cell)) for cell in row))
    return table

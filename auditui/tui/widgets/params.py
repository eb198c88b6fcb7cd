"""A one-line row of labelled inputs (e.g. `n [8] temp [1.0]`) and parsing of what was typed."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import Input, Label

from auditui.errors import AuditError


class ParamRow(Horizontal):
    """Inputs `#param-NAME` for (name, default, width) triples, in one line."""

    DEFAULT_CSS = """
    ParamRow { height: 1; width: auto; }
    ParamRow Label { color: $text-muted; }
    """

    def __init__(self, fields: list[tuple[str, str, int]], **kwargs: object):
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.fields = fields

    def compose(self) -> ComposeResult:
        for name, value, width in self.fields:
            yield Label(f" {name} ")
            input_ = Input(value=value, id=f"param-{name}")
            input_.styles.width = width + 2
            yield input_

    def values(self) -> dict[str, str]:
        return {name: self.query_one(f"#param-{name}", Input).value.strip() for name, _, _ in self.fields}


def parse_number(raw: str, kind: type, name: str, low: float, high: float) -> float | int:
    """`raw` as int/float within [low, high], or an AuditError naming the field."""
    try:
        value = kind(raw)
    except ValueError:
        raise AuditError(f"{name} must be a number, not {raw!r}") from None
    if not low <= value <= high:
        raise AuditError(f"{name} must be between {low} and {high}")
    return value

"""A one-line row of labelled inputs (e.g. `n [8] temp [1.0]`) and parsing of what was typed."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import Input, Label

from auditui.errors import AuditError

NUMERIC = ("integer", "number")


class ParamRow(Horizontal):
    """Inputs `#param-NAME` for (name, default, width[, type]) fields in one line; type "integer" / "number"
    fields accept only numbers and are flagged (class -invalid) while what they hold is not one."""

    DEFAULT_CSS = """
    ParamRow { height: 1; width: auto; }
    ParamRow Label { color: $text-muted; }
    """

    def __init__(self, fields: list[tuple], **kwargs: object):
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.fields = fields

    def compose(self) -> ComposeResult:
        for name, value, width, *rest in self.fields:
            kind = rest[0] if rest else "text"
            yield Label(f" {name} ")
            input_ = Input(value=value, id=f"param-{name}", type=kind, valid_empty=True)
            input_.styles.width = width + 2 + (kind in NUMERIC)  # padding, and the cursor after a full number
            yield input_

    @property
    def names(self) -> list[str]:
        return [name for name, *_ in self.fields]

    def values(self) -> dict[str, str]:
        return {name: self.query_one(f"#param-{name}", Input).value.strip() for name, *_ in self.fields}

    def set_values(self, values: dict[str, str]) -> None:
        for name, value in values.items():
            self.query_one(f"#param-{name}", Input).value = value


def parse_number(raw: str, kind: type, name: str, low: float, high: float) -> float | int:
    """`raw` as int/float within [low, high], or an AuditError naming the field."""
    try:
        value = kind(raw)
    except ValueError:
        raise AuditError(f"{name} must be a number, not {raw!r}") from None
    if not low <= value <= high:
        raise AuditError(f"{name} must be between {low} and {high}")
    return value


def parse_numbers(raw: str, name: str, low: float, high: float) -> tuple[float, ...]:
    """Space- or comma-separated numbers (e.g. strengths "0 2 4 8"), each within [low, high]."""
    return tuple(float(parse_number(part, float, name, low, high)) for part in raw.replace(",", " ").split())

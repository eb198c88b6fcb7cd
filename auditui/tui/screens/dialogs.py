"""Small modal dialogs: ask for a line of text, confirm a destructive action, show help."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import DataTable, Input, Label


class AskForm(ModalScreen[dict[str, str] | None]):
    """Ask for one or more lines of text; Enter in the last field submits, Esc cancels."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]

    def __init__(self, question: str, fields: list[tuple[str, str]], optional: tuple[str, ...] = ()):
        super().__init__()
        self.question, self.fields, self.optional = question, fields, optional

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(Text(self.question))
            for i, (name, value) in enumerate(self.fields):
                if len(self.fields) > 1:
                    yield Label(Text(name), classes="field-name")
                yield Input(value=value, id=f"field-{i}")
            yield from self.more()

    def more(self) -> ComposeResult:
        """Widgets below the fields (none here)."""
        yield from ()

    def answer(self) -> dict[str, str] | None:
        """The fields' values, or None when a field that is not optional is empty."""
        values = {name: self.query_one(f"#field-{i}", Input).value.strip()
                  for i, (name, _) in enumerate(self.fields)}
        return values if all(value or name in self.optional for name, value in values.items()) else None

    def on_input_submitted(self, event: Input.Submitted) -> None:
        inputs = list(self.query(Input))
        position = inputs.index(event.input)
        if position + 1 < len(inputs):
            inputs[position + 1].focus()
            return
        self.dismiss(self.answer())


class Confirm(ModalScreen[bool]):
    BINDINGS = [Binding("y", "dismiss(True)", "Yes"), Binding("n,escape", "dismiss(False)", "No")]

    def __init__(self, question: str):
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(Text(self.question))
            yield Label("y: yes    n / Esc: no")


class Help(ModalScreen[None]):
    """Every key of the screen below (and the app's), with what it does."""

    BINDINGS = [Binding("escape,f1,q", "dismiss(None)", "Close")]

    def __init__(self, rows: list[tuple[str, str]], notes: str = ""):
        super().__init__()
        self.rows, self.notes = rows, notes

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog help"):
            yield Label("Keys  (Esc closes; Ctrl+P opens the command palette)")
            table: DataTable = DataTable(show_header=False, cursor_type="none")
            table.add_columns("key", "action")
            for key, action in self.rows:
                table.add_row(Text(key), Text(action))
            yield table
            if self.notes:
                yield Label(Text(self.notes))

"""Small modal dialogs: ask for a line of text, confirm a destructive action, show help."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import DataTable, Input, Label, Static


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
    """The screen's own keys first, then the app's (a rule between), the screen's notes and the terms it
    uses explained; the body scrolls."""

    BINDINGS = [Binding("escape,f1,q", "dismiss(None)", "Close")]

    def __init__(self, rows: list[tuple[str, str]], notes: str = "", terms: tuple[tuple[str, str], ...] = (),
                 own: int | None = None):
        """`rows`: (keys, action); the first `own` of them are the screen's (None: all)."""
        super().__init__()
        self.rows, self.notes, self.terms = rows, notes, terms
        self.own = len(rows) if own is None else own

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog help"):
            yield Label("Keys of this screen, then everywhere (Esc closes)")
            with VerticalScroll(id="help-body"):
                table: DataTable = DataTable(show_header=False, cursor_type="none")
                table.add_columns("key", "action")
                for i, (key, action) in enumerate(self.rows):
                    if i == self.own and i:
                        table.add_row(Text("──", style="dim"), Text("everywhere", style="dim"))
                    table.add_row(Text(key, style="bold" if i < self.own else ""), Text(action))
                yield table
                if self.notes:
                    yield Label(Text(self.notes), classes="help-notes")
                if self.terms:
                    terms = Text("Terms on this screen\n", style="bold")
                    for term, meaning in self.terms:
                        terms.append(term, style="bold")
                        terms.append(f": {meaning}\n")
                    yield Static(terms, id="help-terms")

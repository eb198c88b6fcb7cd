"""The session's steering set: the latents added with `s` in the Attribution, Flow and Heads screens,
with where each came from; `d` removes the selected one, `t` steers the set, `l` (or Enter) opens its
latent page. Leaving it (b, Esc) tells the screen that opened it, so a Steering screen over the set
rebuilds its plan."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Footer, Header, Static

from auditui.text import one_line
from auditui.tui.guard import guarded
from auditui.tui.screens.base import AuditScreen
from auditui.tui.screens.sessions import when
from auditui.tui.widgets.status import StatusBar


class FeaturesScreen(AuditScreen):
    NEEDS_SAES = True
    HELP = "The steering set is what `t` on the Samples screen steers: one plan over all of its latents."
    BINDINGS = [
        Binding("d,delete", "remove", "Remove"),
        Binding("l", "latent", "Latent page"),
        Binding("t", "steering", "Steer the set"),
        Binding("b", "back", "Back"),
    ]

    def __init__(self, session_id: int):
        super().__init__()
        self.session_id = session_id
        self.features: list[dict] = []

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(id="notice")
        yield DataTable(cursor_type="row", id="features")
        yield StatusBar()
        yield Footer()

    @guarded
    def on_mount(self) -> None:
        self.query_one(DataTable).add_columns("id", "feature", "source", "SAE sha256", "added", "note")
        self.refresh_rows()

    def refresh_rows(self) -> None:
        table = self.query_one(DataTable)
        row = table.cursor_row
        self.features = self.store.features(self.session_id)
        table.clear()
        for feature in self.features:
            table.add_row(str(feature["id"]), f"{feature['site']}/{feature['latent']}", Text(one_line(feature["source"])),
                          (feature["sae_digest"] or "-")[:12], when(feature["created"]), Text(one_line(feature["note"])),
                          key=str(feature["id"]))
        count = len(self.features)
        self.title = f"steering set · {count} feature{'s' * (count != 1)}"
        self.query_one("#notice", Static).update(Text("d removes the selected latent · t steers the set" if count else
                                                      "empty: add latents with s in the Attribution or Flow screen"))
        if table.row_count:
            table.move_cursor(row=min(row, table.row_count - 1))

    @guarded
    def action_remove(self) -> None:
        table = self.query_one(DataTable)
        if not self.features or not table.row_count:
            return
        feature = self.features[table.cursor_row]
        self.store.remove_feature(feature["id"])
        self.refresh_rows()
        self.notify(f"{feature['site']}/{feature['latent']} removed from the steering set", timeout=3)

    def action_steering(self) -> None:
        from auditui.tui.screens.steering import SteeringScreen
        from auditui.workflows.steer import PlanSource

        below = self.app.screen_stack[-2]
        if isinstance(below, SteeringScreen) and below.source == PlanSource(steering_set=True):
            self.action_back()
        else:
            self.app.push_screen(SteeringScreen(self.session_id))

    def action_back(self) -> None:
        self.dismiss(None)  # the opener's callback (if any) runs: the set may have changed

    def on_data_table_row_selected(self) -> None:
        self.action_latent()

    def action_latent(self) -> None:
        table = self.query_one(DataTable)
        if self.features and table.row_count:
            from auditui.tui.screens.latent import open_latent

            feature = self.features[table.cursor_row]
            open_latent(self, self.session_id, f"{feature['site']}/{feature['latent']}")

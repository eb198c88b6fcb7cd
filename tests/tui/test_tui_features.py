"""Steering set view on a tiny model + pack: listed with its count, a latent removed from the store,
the Steering screen over the set rebuilt on coming back."""

from __future__ import annotations

from helpers import SIZE, cells, labelled_session, wait_idle
from textual.widgets import DataTable

from auditui.config import load_settings
from auditui.store import Store
from auditui.tui.app import AuditApp
from auditui.tui.screens.features import FeaturesScreen
from auditui.tui.screens.samples import SamplesScreen
from auditui.tui.screens.steering import SteeringScreen

SPEC = [("Is the sky blue?", [("Yes, it is blue.", "positive"), ("No idea at all.", "negative")])]


async def test_steering_set_is_listed_counted_and_edited(tmp_path, tiny_models, tiny_packs, loaded):
    settings = load_settings(model=str(tiny_models["llama"]), pack=str(tiny_packs["llama"]), db=str(tmp_path / "s.db"))
    store = Store(settings.db)
    session_id = labelled_session(store, loaded("llama"), SPEC)
    for site, latent, source in (("2/resid_post", 5, "attribution"), ("1/mlp_out", 3, "flow"), ("2/resid_post", 9, "flow")):
        store.add_feature(session_id, site, latent, source=source, sae_digest="ab" * 32)
    app = AuditApp(settings)
    async with app.run_test(size=SIZE) as pilot:
        await wait_idle(app, pilot)
        await pilot.press("enter")
        await pilot.pause()
        app.screen.query_one("#completions", DataTable).focus()
        await pilot.press("v")
        await pilot.pause()
        assert isinstance(app.screen, FeaturesScreen) and app.screen.title == "steering set · 3 features"
        table = app.screen.query_one("#features", DataTable)
        assert [(row[1], row[2]) for row in cells(table)] == [
            (f"{f['site']}/{f['latent']}", f["source"]) for f in store.features(session_id)]
        table.move_cursor(row=0)
        await pilot.press("d")
        await pilot.pause()
        left = [f"{f['site']}/{f['latent']}" for f in store.features(session_id)]
        assert len(left) == 2 and [row[1] for row in cells(table)] == left
        assert app.screen.title == "steering set · 2 features"
        await pilot.press("t")  # steer the set
        await wait_idle(app, pilot)
        assert isinstance(app.screen, SteeringScreen)
        assert sorted(row[1] for row in cells(app.screen.query_one("#plan", DataTable))) == sorted(left)
        await pilot.press("v")
        await pilot.pause()
        await pilot.press("d", "b")  # one more removed; back on Steering, the plan is rebuilt
        await wait_idle(app, pilot)
        assert isinstance(app.screen, SteeringScreen)
        left = [f"{f['site']}/{f['latent']}" for f in store.features(session_id)]
        assert len(left) == 1 and [row[1] for row in cells(app.screen.query_one("#plan", DataTable))] == left
        await pilot.press("b", "b")  # Steering, then the set view it was opened from
        await pilot.pause()
        assert isinstance(app.screen, SamplesScreen)

"""Steering screen on a tiny model + pack: opened from Attribution and Flow, plan table, run, side by side."""

from __future__ import annotations

from helpers import SIZE, cells, open_screen, tiny_tui, wait_idle
from textual.widgets import DataTable, Static

from auditui.tui.screens.attribution import AttributionScreen
from auditui.tui.screens.flow import FlowScreen
from auditui.tui.screens.steering import SteeringScreen

SPEC = [("Is the sky blue?", [("Yes, it is blue.", "positive"), ("No idea at all.", "negative")])]


async def test_steering_screen_from_attribution_and_flow(tmp_path, tiny_models, tiny_packs, loaded):
    app, store, session_id = tiny_tui(tmp_path, tiny_models, tiny_packs, loaded, SPEC)
    async with app.run_test(size=SIZE) as pilot:
        await open_screen(app, pilot, AttributionScreen(session_id))
        app.screen.query_one("#param-sites").value = "2/resid_post"
        app.screen.query_one("#param-top").value = "5"
        await pilot.press("ctrl+r")
        await wait_idle(app, pilot)
        await pilot.press("t")
        await wait_idle(app, pilot)
        assert isinstance(app.screen, SteeringScreen)
        rows = store.runs(session_id, "attribution")[-1]["result"]["rows"]
        top = [f"{r['site']}/{r['latent']}" for r in sorted(rows, key=lambda r: -r["delta_attr"])]
        table = app.screen.query_one("#plan", DataTable)
        assert [row[1] for row in cells(table)] == top and {row[2] for row in cells(table)} == {"rescale"}
        for name, value in (("prompt", "Tell me"), ("strengths", "1 0"), ("n", "1"), ("max", "4")):
            app.screen.query_one(f"#param-{name}").value = value
        await pilot.press("ctrl+r")
        await wait_idle(app, pilot)
        run = store.runs(session_id, "steer")[-1]
        assert run["status"] == "done" and run["params"]["strengths"] == [1.0, 0.0]
        assert [s["strength"] for s in run["result"]["samples"]] == [None, 1.0, 0.0]
        detail = str(app.screen.query_one("#detail", Static).render())
        assert "unsteered" in detail and "s=1" in detail and "s=0" in detail
        app.screen.query_one("#plan", DataTable).focus()
        await pilot.press("o")  # cycle the operation: the plan is rebuilt with it
        await wait_idle(app, pilot)
        assert {row[2] for row in cells(app.screen.query_one("#plan", DataTable))} == {"clamp"}
        await pilot.press("b", "b")
        app.push_screen(FlowScreen(session_id, "2/resid_post/5"))
        await wait_idle(app, pilot)
        await pilot.press("t")
        await wait_idle(app, pilot)
        assert isinstance(app.screen, SteeringScreen)
        assert "2/resid_post/5" in [row[1] for row in cells(app.screen.query_one("#plan", DataTable))]

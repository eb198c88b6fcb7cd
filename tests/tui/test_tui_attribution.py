"""Attribution screen on a tiny model + pack: run, bars, exact check, snippets, flow hand-off, resume."""

from __future__ import annotations

from helpers import SIZE, cells, labelled_session, open_screen, tiny_tui, wait_idle
from textual.widgets import DataTable, Static

from auditui.config import load_settings
from auditui.store import Store
from auditui.tui.app import AuditApp
from auditui.tui.screens.attribution import AttributionScreen
from auditui.tui.screens.flow import FlowScreen
from auditui.workflows.attribute import attribution_run

SPEC = [("Is the sky blue?", [("Yes, it is blue.", "positive"), ("No idea at all.", "negative")]),
        ("Say hi", [("Hello there!", "positive"), ("Go away now.", "negative"), ("Hm.", "negative")])]


async def test_attribution_screen(tmp_path, tiny_models, tiny_packs, loaded):
    app, store, session_id = tiny_tui(tmp_path, tiny_models, tiny_packs, loaded, SPEC)
    async with app.run_test(size=SIZE) as pilot:
        await open_screen(app, pilot, AttributionScreen(session_id))
        assert app.screen.query_one("#param-sites").value == "1/resid_post"  # middle residual site with an SAE
        app.screen.query_one("#param-sites").value = "2/resid_post 1/mlp_out"
        app.screen.query_one("#param-top").value = "5"
        await pilot.press("ctrl+r")
        await wait_idle(app, pilot)
        run = store.runs(session_id, "attribution")[-1]
        table = app.screen.query_one("#ranked", DataTable)
        shown = [(row[1], int(row[2])) for row in cells(table)]
        assert shown == [(r["site"], r["latent"]) for r in run["result"]["rows"]] and len(shown) == 10
        assert len(cells(table)[0][4]) > 0  # the bar of the top latent is drawn
        # exact check of the selected row lands in the table and the store
        table.move_cursor(row=1)
        await pilot.press("c")
        await wait_idle(app, pilot)
        checked = attribution_run(store, run["id"])["result"]["rows"][1]
        assert checked["exact"] is not None
        assert cells(app.screen.query_one("#ranked", DataTable))[1][7] == f"{checked['exact']:+.3g}"
        # where it fires
        await pilot.press("v")
        await wait_idle(app, pilot)
        assert "where " in str(app.screen.query_one("#detail", Static).render())
        await pilot.press("s")
        assert [(f["site"], f["latent"], f["source"]) for f in store.features(session_id)] == [
            (checked["site"], checked["latent"], "attribution")]
        # send a residual latent on to the flow screen
        residual = next(i for i, (site, _) in enumerate(shown) if site == "2/resid_post")
        table.move_cursor(row=residual)
        await pilot.press("f")
        await wait_idle(app, pilot)
        assert isinstance(app.screen, FlowScreen)
        assert store.runs(session_id, "flow")[-1]["result"]["root"] == f"2/resid_post/{shown[residual][1]}"
    # a new app shows the last run again
    app = AuditApp(app.settings, load_engine=False)
    async with app.run_test(size=SIZE) as pilot:
        app.push_screen(AttributionScreen(session_id))
        await pilot.pause()
        assert len(cells(app.screen.query_one("#ranked", DataTable))) == 10


async def test_attribution_tails_come_from_the_full_delta_vectors(tmp_path, tiny_models, tiny_packs, loaded):
    from safetensors.torch import load

    settings = load_settings(model=str(tiny_models["llama"]), pack=str(tiny_packs["llama"]), db=str(tmp_path / "s.db"))
    store = Store(settings.db)
    session_id = labelled_session(store, loaded("llama"), SPEC)

    def expected(run_id: int, key) -> list[tuple[str, int, str]]:
        attr = load(store.get_blob(run_id, "deltas"))["2/resid_post|attr"]
        order = sorted(range(attr.shape[0]), key=lambda i: key(float(attr[i])))[:4]
        return [("2/resid_post", i, f"{float(attr[i]):+.3g}") for i in order]

    def shown(app) -> list[tuple[str, int, str]]:
        return [(row[1], int(row[2]), row[3]) for row in cells(app.screen.query_one("#ranked", DataTable))]

    app = AuditApp(settings)
    async with app.run_test(size=SIZE) as pilot:
        await wait_idle(app, pilot)
        app.push_screen(AttributionScreen(session_id))
        await pilot.pause()
        app.screen.query_one("#param-sites").value = "2/resid_post"
        app.screen.query_one("#param-top").value = "4"
        await pilot.press("ctrl+r")
        await wait_idle(app, pilot)
        run_id = store.runs(session_id, "attribution")[-1]["id"]
        assert shown(app) == expected(run_id, lambda v: -v)
        await pilot.press("o")  # the negative tail: the most negative Δ-attribution first
        await wait_idle(app, pilot)
        assert "top -Δ" in app.screen.title
        assert shown(app) == expected(run_id, lambda v: v) and all(float(row[2]) < 0 for row in shown(app))
        assert all(row[8] for row in cells(app.screen.query_one("#ranked", DataTable)))  # logit lens, engine loaded
        await pilot.press("c")  # an exact check of a latent only this tail shows
        await wait_idle(app, pilot)
        assert cells(app.screen.query_one("#ranked", DataTable))[0][7] != "-"
        await pilot.press("o")
        await wait_idle(app, pilot)
        assert shown(app) == expected(run_id, lambda v: -abs(v))
    app = AuditApp(settings, load_engine=False)  # no model: the tail is read from the store alone
    async with app.run_test(size=SIZE) as pilot:
        app.push_screen(AttributionScreen(session_id))
        await pilot.pause()
        await pilot.press("o")
        await pilot.pause()
        assert shown(app) == expected(run_id, lambda v: v)


async def test_the_difference_of_means_direction_is_a_row_of_the_ranking(tmp_path, tiny_models, tiny_packs, loaded):
    """Issue 18: `d` adds each site's difference-of-means direction as a pseudo-latent row Δμ, at the rank the
    contrast workflow gives it among the site's latents; in the negative tail it ranks from the other end."""
    app, store, session_id = tiny_tui(tmp_path, tiny_models, tiny_packs, loaded, SPEC)
    async with app.run_test(size=SIZE) as pilot:
        await open_screen(app, pilot, AttributionScreen(session_id))
        app.screen.query_one("#param-sites").value = "2/resid_post 1/mlp_out"
        app.screen.query_one("#param-top").value = "300"  # every latent: the Δμ row sits among them
        await pilot.press("ctrl+r")
        await wait_idle(app, pilot)
        await pilot.press("d")
        await wait_idle(app, pilot)
        contrast = store.runs(session_id, "contrast")[-1]["result"]["sites"]
        shown = cells(app.screen.query_one("#ranked", DataTable))
        pseudo = {row[1]: (i, int(row[0])) for i, row in enumerate(shown) if row[2] == "Δμ"}
        assert {site: rank for site, (_, rank) in pseudo.items()} == {s: contrast[s]["rank"] for s in contrast}
        for site, (i, rank) in pseudo.items():  # in place: after the latents it is below, before those above it
            block = [(j, int(row[0])) for j, row in enumerate(shown) if row[1] == site and row[2] != "Δμ"]
            assert all((j < i) == (r < rank) for j, r in block)
        table = app.screen.query_one("#ranked", DataTable)
        table.move_cursor(row=pseudo["2/resid_post"][0])
        await pilot.pause()
        assert "difference of means (Δμ" in str(app.screen.query_one("#detail", Static).render())
        await pilot.press("s")  # not an SAE latent: never in the steering set
        await pilot.pause()
        assert store.features(session_id) == [] and any("not an SAE latent" in n.message for n in app._notifications)
        await pilot.press("o")  # the negative tail
        await wait_idle(app, pilot)
        negative = {row[1]: int(row[0]) for row in cells(app.screen.query_one("#ranked", DataTable)) if row[2] == "Δμ"}
        d_sae = {s: contrast[s]["d_sae"] for s in contrast}
        assert negative == {s: d_sae[s] + 2 - contrast[s]["rank"] for s in contrast}

"""The rest of issue 16: flow re-rooting history and a flow screen that remembers its graph and thresholds,
a session of another model says so on open, F1 lists the screen's keys first and explains its terms,
"pairs" says what it counts, and the progress label shows an ETA at 80 columns."""

from __future__ import annotations

import threading
import time

from helpers import SIZE, cells, labelled_session, open_screen, tiny_tui, wait_idle
from textual.widgets import DataTable, Static

from auditui.config import load_settings
from auditui.store import Store
from auditui.tui.app import AuditApp, eta
from auditui.tui.screens.dialogs import Help
from auditui.tui.screens.flow import FlowScreen
from auditui.tui.screens.samples import SamplesScreen

SPEC = [("Is the sky blue?", [("Yes, it is blue.", "positive"), ("No idea at all.", "negative")])]


def settings(tmp_path, tiny_models, tiny_packs=None):
    pack = str(tiny_packs["llama"]) if tiny_packs else ""
    return load_settings(model=str(tiny_models["llama"]), pack=pack, db=str(tmp_path / "s.db"))


def shown(app) -> tuple[str, list[str]]:
    """The flow screen's root field and its table's feature column."""
    return app.screen.query_one("#param-feature").value, [row[1] for row in cells(app.screen.query_one("#layers"))]


async def test_flow_rerooting_history_and_a_screen_that_remembers(tmp_path, tiny_models, tiny_packs, loaded):
    config = settings(tmp_path, tiny_models, tiny_packs)
    store = Store(config.db)
    session_id = labelled_session(store, loaded("llama"), SPEC)
    app = AuditApp(config)
    async with app.run_test(size=SIZE) as pilot:
        await wait_idle(app, pilot)
        app.push_screen(FlowScreen(session_id, "2/resid_post/5"))
        await wait_idle(app, pilot)
        screen = app.screen
        screen.query_one("#param-t_R").value = "-1"  # no cut: every layer
        screen.query_one("#param-t_M").value = "0.05"
        await pilot.press("ctrl+r")
        await wait_idle(app, pilot)
        first, second = [r["id"] for r in store.runs(session_id, "flow")]
        graph = shown(app)
        table = screen.query_one("#layers", DataTable)
        table.move_cursor(row=0)
        await pilot.press("enter")  # re-root on the lowest node
        await wait_idle(app, pilot)
        third = store.runs(session_id, "flow")[-1]["id"]
        assert shown(app)[0] == graph[1][0] and "3/3" in screen.title
        await pilot.press("left_square_bracket")
        await pilot.pause()
        assert shown(app) == graph and f"run {second}" in screen.title and "2/3" in screen.title
        assert screen.param_values()["t_R"] == "-1"
        await pilot.press("left_square_bracket")
        await pilot.pause()
        assert f"run {first}" in screen.title and screen.param_values()["t_R"] == "0.5"
        await pilot.press("left_square_bracket")  # nothing before: says so, stays
        await pilot.pause()
        assert f"run {first}" in screen.title and any("no earlier graph" in n.message for n in app._notifications)
        await pilot.press("right_square_bracket", "right_square_bracket")
        await pilot.pause()
        assert f"run {third}" in screen.title
        await pilot.press("left_square_bracket")
        await pilot.pause()
        table.move_cursor(row=len(graph[1]) - 1)
        await pilot.press("enter")  # a new root after going back drops the later graph
        await wait_idle(app, pilot)
        fourth = store.runs(session_id, "flow")[-1]["id"]
        assert screen.history == [first, second, fourth] and "3/3" in screen.title
        latest = shown(app)
        await pilot.press("b")
        await pilot.pause()
        app.push_screen(FlowScreen(session_id))  # reopened: the latest graph with its fields
        await pilot.pause()
        assert shown(app) == latest and f"run {fourth}" in app.screen.title
        assert app.screen.param_values()["t_R"] == "-1" and app.screen.param_values()["t_M"] == "0.05"
        await pilot.press("b")
        app.push_screen(FlowScreen(session_id, "1/resid_post/3"))  # a new root built with the remembered thresholds
        await wait_idle(app, pilot)
        run = store.runs(session_id, "flow")[-1]
        assert run["params"]["root"] == "1/resid_post/3" and run["params"]["thresholds"]["cut"] == -1
        assert run["params"]["thresholds"]["module"] == 0.05


async def test_a_session_of_another_model_says_so_on_open(tmp_path, tiny_models, loaded):
    config = settings(tmp_path, tiny_models)
    store = Store(config.db)
    session_id = store.create_session("made elsewhere", model_id="HuggingFaceTB/SmolLM2-135M-Instruct")
    prompt_id = store.add_prompt(session_id, "Hi", [1, 40000, 2])
    store.add_completion(prompt_id, "Hello", [48000], seed=0, params={}, model_id="HuggingFaceTB/SmolLM2-135M-Instruct")
    labelled_session(store, loaded("llama"), SPEC, name="this model")
    vocab = loaded("llama").model.config.vocab_size
    for wait_first in (False, True):  # opened while the model loads, and after
        app = AuditApp(config)
        async with app.run_test(size=SIZE) as pilot:
            if wait_first:
                await wait_idle(app, pilot)
            table = app.screen.query_one("#sessions", DataTable)
            table.move_cursor(row=table.get_row_index(str(session_id)))
            await pilot.press("enter")
            await wait_idle(app, pilot)
            assert isinstance(app.screen, SamplesScreen) and app.screen.session_id == session_id
            warnings = [n.message for n in app._notifications if n.severity == "warning"]
            assert len(warnings) == 1, warnings
            assert "made with HuggingFaceTB/SmolLM2-135M-Instruct, but tiny-llama is loaded" in warnings[0]
            assert f"go up to 48000, beyond this model's vocabulary of {vocab}" in warnings[0]
            assert "made with HuggingFaceTB/SmolLM2-135M-Instruct" in app.screen.sub_title
            await pilot.press("b")
            table.move_cursor(row=table.get_row_index(str(session_id + 1)))
            await pilot.press("enter")  # a session of the loaded model: no warning
            await pilot.pause()
            assert len([n for n in app._notifications if n.severity == "warning"]) == 1


async def test_help_lists_the_screens_keys_first_and_explains_its_terms(tmp_path, tiny_models, loaded):
    config = settings(tmp_path, tiny_models)
    session_id = labelled_session(Store(config.db), loaded("llama"), SPEC)
    app = AuditApp(config, load_engine=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("enter")
        await pilot.pause()
        assert str(app.screen.query_one("#pairs", Static).render()).strip() == "pairs: 1 (prompts with + and -)"
        for screen, terms in ((None, ["pairs"]), (FlowScreen(session_id), ["s^R", "translated", "processed", "newborn",
                                                                          "unexplained", "t_R", "t_M", "r"])):
            if screen is not None:
                app.push_screen(screen)
                await pilot.pause()
            own = [binding.description for binding in type(app.screen).BINDINGS]
            await pilot.press("f1")
            await pilot.pause()
            assert isinstance(app.screen, Help)
            actions = [row[1] for row in cells(app.screen.query_one(DataTable))]
            assert actions[:len(own)] == own and actions[len(own)] == "everywhere" and "Help" in actions[len(own):]
            explained = str(app.screen.query_one("#help-terms", Static).render())
            assert all(f"{term}:" in explained or f"{term}," in explained for term in terms), explained
            await pilot.press("escape")
            await pilot.pause()
            await pilot.press("escape")  # leave the Flow screen's feature field


def test_eta_from_the_pace_of_the_stage():
    assert eta(10, 5, 5) == " · ~10s left" and eta(30, 1, 9) == " · ~4m30s left" and eta(3600, 1, 2) == " · ~2h00m left"
    assert eta(0.5, 1, 9) == eta(10, 0, 9) == eta(10, 5, 0) == ""


async def test_the_progress_label_shows_the_stage_count_and_an_eta_at_80_columns(tmp_path, tiny_models):
    app = AuditApp(settings(tmp_path, tiny_models), load_engine=False)
    release = threading.Event()

    def job(ctx):
        ctx.progress(0, 4, "attribution at 12/resid_post")
        time.sleep(1.1)
        ctx.progress(1, 4, "attribution at 12/resid_post")
        release.wait(10)

    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        app.submit("attribution", job, needs_engine=False)
        for _ in range(100):
            await pilot.pause(0.05)
            if app.job_status and "1/4" in app.job_status[0]:
                break
        await pilot.pause()
        label = str(app.screen.query_one("#job-state", Static).render())
        release.set()
        await wait_idle(app, pilot)
        assert label.startswith("attribution: attribution at 12/resid_post 1/4 · ~") and label.endswith("s left")


async def test_help_scrolls_to_its_last_term_at_80x24(tmp_path, tiny_models, tiny_packs, loaded):
    """F1's body is longer than an 80x24 screen: it has the focus, so the keys scroll it to the last term."""
    from auditui.tui.screens.attribution import AttributionScreen

    app, _, session_id = tiny_tui(tmp_path, tiny_models, tiny_packs, loaded, SPEC)
    async with app.run_test(size=SIZE) as pilot:
        await open_screen(app, pilot, AttributionScreen(session_id))
        await pilot.press("f1")
        await pilot.pause()
        body = app.screen.query_one("#help-body")
        assert isinstance(app.screen, Help) and app.screen.focused is body and body.max_scroll_y > 0
        await pilot.press("end")
        await pilot.pause()
        terms = app.screen.query_one("#help-terms")
        assert body.scroll_y == body.max_scroll_y and terms.region.bottom <= body.region.bottom
        assert terms.region.bottom > body.region.y  # the last term is on screen

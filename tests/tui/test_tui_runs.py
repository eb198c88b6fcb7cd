"""Run history on a tiny model + pack: every run of the session listed, each reopened in its screen
(an older attribution run, not the latest; a flow graph as stored; a steering run; a sweep)."""

from __future__ import annotations

import json

from helpers import SIZE, attribution, cells, labelled_session
from judge_servers import Scripted
from textual.widgets import DataTable, Static

from auditui.config import load_settings
from auditui.engine.flow import FlowGraph, layer_rows
from auditui.engine.sampling import SamplingParams
from auditui.engine.sites import Site
from auditui.engine.steering import parse_plan
from auditui.judge.client import Judge, JudgeConfig
from auditui.store import Store
from auditui.tui.app import AuditApp
from auditui.tui.screens.attribution import AttributionScreen
from auditui.tui.screens.flow import FlowScreen
from auditui.tui.screens.runs import RunsScreen, params_line
from auditui.tui.screens.samples import SamplesScreen
from auditui.tui.screens.steering import SteeringScreen
from auditui.tui.screens.sweep import SweepScreen
from auditui.workflows.engine import open_engine
from auditui.workflows.flow import FlowRequest, flow_graph, record_flow
from auditui.workflows.judge import Grading
from auditui.workflows.steer import SteerRequest, steer
from auditui.workflows.sweep import SweepRequest, sweep

SPEC = [("Is the sky blue?", [("Yes, it is blue.", "positive"), ("No idea at all.", "negative")])]
SHORT = SamplingParams(max_new_tokens=3, chat=False)


async def test_run_history_lists_every_run_and_reopens_each_in_its_screen(tmp_path, tiny_models, tiny_packs):
    settings = load_settings(model=str(tiny_models["llama"]), pack=str(tiny_packs["llama"]), db=str(tmp_path / "s.db"),
                             device="cpu", dtype="float32")
    engine = open_engine(settings)
    store = Store(settings.db)
    session_id = labelled_session(store, engine.lm, SPEC)
    older = attribution(engine, store, session_id, [Site.parse("2/resid_post")], top_k=3)
    attribution(engine, store, session_id, [Site.parse("1/resid_post")], top_k=2)
    flow = record_flow(store, engine, session_id, flow_graph(engine, FlowRequest("2/resid_post/5", t_res=-1)))
    plan = parse_plan("2/resid_post/5:add:4")
    steered = steer(store, engine, session_id, SteerRequest(plan, "Hi", (1.0,), n=1, params=SHORT, seed=0))
    with Scripted([(200, {}, json.dumps({"behaviour": 3, "coherence": 4}))]) as server:
        swept = sweep(store, engine, session_id, SweepRequest(plan, "Hi", Grading.named("behaviour", ("greeting",)),
                                                              (4.0,), 2, SHORT, seed=0),
                      Judge(JudgeConfig(server.url, "fixed")))
    failed = store.start_run(session_id, "heads_scan", {"text": "abc", "threshold": 0.1})
    store.fail_run(failed, "boom")
    runs = store.runs(session_id)[::-1]
    app = AuditApp(settings, load_engine=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("enter", "r")  # open the session, then its run history
        await pilot.pause()
        assert isinstance(app.screen, RunsScreen)
        table = app.screen.query_one("#runs", DataTable)
        shown = cells(table)
        assert [row[:3] for row in shown] == [[str(r["id"]), r["kind"], r["status"]] for r in runs]
        assert shown[0][4] == "boom" and shown[0][5] == "text=abc threshold=0.1" == params_line(runs[0]["params"])
        assert [row[4] for row in shown[1:]] == [r["summary"]["headline"][:80] for r in runs[1:]]

        async def reopen(run_id: int, screen_type: type) -> None:
            app.screen.query_one("#runs", DataTable).move_cursor(row=[r["id"] for r in runs].index(run_id))
            await pilot.press("enter")
            await pilot.pause(0.3)
            assert isinstance(app.screen, screen_type)

        await reopen(older, AttributionScreen)
        assert f"run {older}" in app.screen.title
        assert {row[1] for row in cells(app.screen.query_one("#ranked", DataTable))} == {"2/resid_post"}
        await pilot.press("b")
        await reopen(flow, FlowScreen)
        graph = store.run(flow)["result"]
        assert [row[1] for row in cells(app.screen.query_one("#layers", DataTable))] == [
            n["id"] for layer in layer_rows(FlowGraph.from_dict(graph)) for n in layer["residual"]]
        assert app.screen.query_one("#param-feature").value == "2/resid_post/5" and f"run {flow}" in app.screen.title
        await pilot.press("b")
        await reopen(steered, SteeringScreen)
        assert f"run {steered} (done)" in str(app.screen.query_one("#detail", Static).render())
        assert app.screen.param_values()["prompt"] == "Hi" and app.screen.param_values()["coef"] == "4"
        await pilot.press("b")
        await reopen(swept, SweepScreen)
        assert f"run {swept}" in app.screen.title and "graded by the judge fixed" in str(
            app.screen.query_one("#detail", Static).render())
        await pilot.press("b")
        await reopen(failed, RunsScreen)  # no result: it stays, and says so
        assert any("kept no result" in n.message for n in app._notifications)
        await pilot.press("b")
        assert isinstance(app.screen, SamplesScreen)

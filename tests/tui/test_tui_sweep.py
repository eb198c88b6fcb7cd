"""Sweep screen on a tiny model + pack with a rule judge on a real loopback HTTP server: opened from
Steering, run, table = stored result, the judge named, best plan back into Steering, Esc stores a
cancelled run, reopening shows the latest run."""

from __future__ import annotations

import json
import re
import threading

import pytest
from helpers import SIZE, cells, labelled_session, press_when, wait_idle
from judge_servers import Scripted
from textual.widgets import DataTable, Static

from auditui.config import load_settings
from auditui.store import Store
from auditui.tui.app import AuditApp
from auditui.tui.screens.steering import SteeringScreen
from auditui.tui.screens.sweep import SweepScreen
from auditui.workflows.steer import PlanSource

SPEC = [("Is the sky blue?", [("Yes, it is blue.", "positive"), ("No idea at all.", "negative")])]
TEXT = re.compile(r'Text:\n"""\n(.*)\n"""', re.S)


def answer(messages: list[dict]) -> str:
    """A rule judge: behaviour and coherence from the text's length and letters; 'x' makes it babble."""
    text = TEXT.search(messages[-1]["content"]).group(1)
    if "x" in text:
        return "no idea"
    return json.dumps({"behaviour": len(text) % 6, "coherence": 5 - len(set(text)) % 3})


def two(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def expected_rows(result: dict) -> list[list[str]]:
    """The table the stored result should give, cell by cell."""
    rows = []
    for curve in result["curves"]:
        for point, edge in zip(curve["points"], result["band"]["points"], strict=True):
            score, band = point["score"], edge["score"]
            rows.append([curve["label"], f"{point['strength']:g}", two(score["mean"]),
                         "-" if score["low"] is None else f"{score['low']:.2f}..{score['high']:.2f}",
                         f"{point['unscored']}/{point['n']}",
                         "-" if point["failure_rate"] is None else f"{point['failure_rate']:.0%}",
                         two(point["behaviour"]["mean"]), two(point["coherence"]["mean"]),
                         "-" if band is None else f"{two(band['low'])} {two(band['median'])} {two(band['high'])}",
                         {True: "yes", False: "no", None: "-"}[point["real"]]])
    return rows


@pytest.fixture
def config(tmp_path, tiny_models, tiny_packs, monkeypatch):
    for name in ("AUDITUI_JUDGE_BASE_URL", "AUDITUI_JUDGE_MODEL"):
        monkeypatch.delenv(name, raising=False)
    return load_settings(model=str(tiny_models["llama"]), pack=str(tiny_packs["llama"]), db=str(tmp_path / "s.db"))


def fill(screen, url: str, **values: str) -> None:
    fields = {"subject": "long texts", "strengths": "10 40", "n": "2", "band": "2", "judge": url, "model": "rule",
              **values}
    for name, value in fields.items():
        screen.query_one(f"#param-{name}").value = value


def detail(app) -> str:
    return str(app.screen.query_one("#detail", Static).render())


async def test_sweep_from_steering_shows_the_stored_numbers_and_hands_back_the_best_plan(config, loaded):
    store = Store(config.db)
    session_id = labelled_session(store, loaded("llama"), SPEC)
    app = AuditApp(config)
    with Scripted([answer]) as server:
        async with app.run_test(size=SIZE) as pilot:
            await wait_idle(app, pilot)
            app.push_screen(SteeringScreen(session_id, PlanSource(typed="2/resid_post/5:add:1")))
            await wait_idle(app, pilot)
            app.screen.query_one("#param-prompt").value = "Once upon a time"
            app.screen.query_one("#param-max").value = "6"
            await pilot.press("w")
            await pilot.pause()
            assert isinstance(app.screen, SweepScreen)
            assert app.screen.query_one("#param-prompt").value == "Once upon a time"
            assert "auditui judge serve" in detail(app)  # no judge configured: how to start one
            await pilot.press("ctrl+r")
            await wait_idle(app, pilot)
            assert store.runs(session_id, "sweep") == []
            fill(app.screen, server.url)
            await pilot.press("ctrl+r")
            await wait_idle(app, pilot)
            run = store.runs(session_id, "sweep")[-1]
            result = run["result"]
            assert run["status"] == "done" and run["params"]["plan"]["features"][0]["feature"] == "2/resid_post/5"
            assert run["params"]["prompt"] == "Once upon a time" and run["params"]["params"]["max_new_tokens"] == 6
            assert result["strengths"] == [0.0, 10.0, 40.0] and len(result["band"]["plans"]) == 2
            table = app.screen.query_one("#points", DataTable)
            assert cells(table) == expected_rows(result) and len(cells(table)) == 3
            assert f"graded by the judge rule at {server.url}" in detail(app)
            assert server.count > 0
            best = result["best"]
            await pilot.press("t")
            await wait_idle(app, pilot)
            assert isinstance(app.screen, SteeringScreen)
            plan = cells(app.screen.query_one("#plan", DataTable))
            assert [(row[1], row[2], row[3]) for row in plan] == [("2/resid_post/5", "add", f"{best['strength']:.3g}")]
            assert app.screen.query_one("#param-coef").value == f"{best['strength']:g}"
            app.screen.query_one("#param-n").value = "1"
            app.screen.query_one("#param-strengths").value = "1"
            await pilot.press("ctrl+r")  # steering with the taken plan
            await wait_idle(app, pilot)
            steered = store.runs(session_id, "steer")[-1]
            assert steered["params"]["plan"]["features"] == best["plan"]["features"]
    app = AuditApp(config, load_engine=False)  # reopened from scratch: the latest sweep, its fields
    async with app.run_test(size=SIZE) as pilot:
        app.push_screen(SweepScreen(session_id))
        await pilot.pause()
        assert f"run {run['id']}" in app.screen.title
        assert cells(app.screen.query_one("#points", DataTable)) == expected_rows(result)
        assert app.screen.param_values() | {"judge": ""} == {
            "prompt": "Once upon a time", "subject": "long texts", "rubric": "behaviour", "strengths": "10 40", "n": "2",
            "band": "2", "dir": "toward", "max": "6", "judge": "", "model": "rule"}


async def test_escape_during_a_sweep_stores_and_shows_a_cancelled_run(config, loaded):
    from auditui.engine.steering import parse_plan

    store = Store(config.db)
    session_id = labelled_session(store, loaded("llama"), SPEC)
    entered, release = threading.Event(), threading.Event()

    def slow(messages: list[dict]) -> str:
        entered.set()
        release.wait(20)
        return answer(messages)

    app = AuditApp(config)
    with Scripted([slow]) as server:
        async with app.run_test(size=SIZE) as pilot:
            await wait_idle(app, pilot)
            app.push_screen(SweepScreen(session_id, parse_plan("2/resid_post/5:add:1"), "Once upon a time", "6"))
            await pilot.pause()
            fill(app.screen, server.url, band="3")  # 2 x (1 + 2 x 4) texts: more than the 4 calls in flight
            await pilot.press("ctrl+r")
            await press_when(pilot, entered, "escape")
            release.set()
            await wait_idle(app, pilot)
            run = store.runs(session_id, "sweep")[-1]
            assert run["status"] == "cancelled" and f"run {run['id']} · cancelled" in app.screen.title
            assert server.count < 18  # the texts not yet sent never were
            # what the run kept is shown (the workflow keeps no result when the stop reaches its perplexity step)
            shown = cells(app.screen.query_one("#points", DataTable))
            assert shown == (expected_rows(run["result"]) if run["result"] else [])
            assert "cancelled" in detail(app)

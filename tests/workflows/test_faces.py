"""The CLI and the TUI are two faces over the same workflows: the same steps store the same runs.

The same audit (sample, label, attribute, flow twice, deactivate) is driven once through the CLI
and once through the TUI (Pilot, keys and fields) on two fresh databases; every stored run must
agree in kind, status, params, provenance, result and summary. Also: Esc while the model loads
leaves a usable model.
"""

from __future__ import annotations

import threading

from helpers import SIZE, firing_feature, press_when, wait_idle
from typer.testing import CliRunner

from auditui.cli import app as cli
from auditui.config import load_settings
from auditui.store import Store
from auditui.tui.app import AuditApp
from auditui.tui.screens.attribution import AttributionScreen
from auditui.tui.screens.flow import FlowScreen
from auditui.tui.screens.samples import SamplesScreen

PROMPT = "Tell me about rivers"
TEXT = "The cat sat on the mat."


def _stored(db) -> list[tuple]:
    keys = ("kind", "status", "params", "provenance", "result", "summary")
    return [tuple(run[k] for k in keys) for run in Store(db).runs(Store(db).latest_session_id())]


def _cli_audit(db, model, pack, feature: str) -> None:
    runner = CliRunner()
    common = ["--db", str(db), "--model", str(model), "--pack", str(pack)]
    steps = [["session", "new", "same", "--db", str(db)],
             ["sample", "--prompt", PROMPT, "-n", "4", "--seed", "7", "--max-new-tokens", "8", *common],
             ["label", "1", "pos", "--db", str(db)], ["label", "2", "neg", "--db", str(db)],
             ["attribute", "--site", "2/resid_post", "--top", "5", *common],
             ["flow", "--feature", feature, *common],
             ["flow", "--feature", feature, "--t-res", "-1", *common],
             ["flow", "deactivate", "--feature", feature, "--text", TEXT, "--token", "-1", *common]]
    for args in steps:
        result = runner.invoke(cli, args)
        assert result.exit_code == 0, (args, result.output)


async def _tui_audit(db, model, pack, feature: str) -> None:
    app = AuditApp(load_settings(model=str(model), pack=str(pack), db=str(db)))
    async with app.run_test(size=SIZE) as pilot:
        await wait_idle(app, pilot)
        await pilot.press("n", *"same", "enter")
        await pilot.pause()
        assert isinstance(app.screen, SamplesScreen)
        session_id = app.screen.session_id
        for name, value in (("n", "4"), ("max", "8"), ("seed", "7")):
            app.screen.query_one(f"#param-{name}").value = value
        app.screen.query_one("#prompt").focus()
        await pilot.press(*PROMPT, "enter")
        await wait_idle(app, pilot)
        app.screen.query_one("#completions").move_cursor(row=0)
        await pilot.press("plus", "minus")
        await pilot.pause()
        app.push_screen(AttributionScreen(session_id))
        await pilot.pause()
        app.screen.query_one("#param-sites").value = "2/resid_post"
        app.screen.query_one("#param-top").value = "5"
        await pilot.press("ctrl+r")
        await wait_idle(app, pilot)
        app.push_screen(FlowScreen(session_id, feature))  # builds at once with the default thresholds
        await wait_idle(app, pilot)
        app.screen.query_one("#param-t_R").value = "-1"
        app.screen.action_build()
        await wait_idle(app, pilot)
        app.screen.query_one("#layers").move_cursor(row=app.screen.query_one("#layers").get_row_index(feature))
        await pilot.press("x")
        await wait_idle(app, pilot)  # the dialog opens once it knows where the feature fires
        app.screen.query_one("#field-0").value = TEXT  # a typed text instead of the session's
        app.screen.query_one("#field-1").value = "-1"
        await pilot.press("enter")
        await wait_idle(app, pilot)


async def test_cli_and_tui_store_identical_runs(tmp_path, tiny_models, tiny_packs):
    model, pack = tiny_models["llama"], tiny_packs["llama"]
    feature = firing_feature(model, pack, TEXT)
    _cli_audit(tmp_path / "cli.db", model, pack, feature)
    await _tui_audit(tmp_path / "tui.db", model, pack, feature)
    cli_runs, tui_runs = _stored(tmp_path / "cli.db"), _stored(tmp_path / "tui.db")
    kinds = [run[0] for run in cli_runs]
    assert kinds == ["sample", "attribution", "reference_mean", "flow", "flow", "deactivation"]
    assert all(run[1] == "done" for run in cli_runs)
    for cli_run, tui_run in zip(cli_runs, tui_runs, strict=True):
        assert cli_run == tui_run, cli_run[0]
    assert cli_runs[1][3]["saes"]["2/resid_post"] and cli_runs[1][3]["model_id"] == "tiny-llama"
    cli_store, tui_store = Store(tmp_path / "cli.db"), Store(tmp_path / "tui.db")
    assert [c["pack_id"] for c in cli_store.completions(1)] == [c["pack_id"] for c in tui_store.completions(1)]
    assert cli_store.session(1)["pack_id"] == tui_store.session(1)["pack_id"] == "tiny"


async def test_escape_during_model_load_keeps_the_model(tmp_path, tiny_models, monkeypatch):
    import auditui.workflows.engine as engine_workflow

    real = engine_workflow.load_model
    loading, escaped = threading.Event(), threading.Event()

    def slow_load(*args, **kwargs):  # the real load, once Esc has arrived while it runs
        loading.set()
        escaped.wait(60)
        return real(*args, **kwargs)
    monkeypatch.setattr(engine_workflow, "load_model", slow_load)
    app = AuditApp(load_settings(model=str(tiny_models["gpt2"]), pack="", db=str(tmp_path / "s.db")))
    async with app.run_test(size=SIZE) as pilot:
        await press_when(pilot, loading, "escape")
        assert app.job_status[0].startswith("load model")
        escaped.set()
        await wait_idle(app, pilot)
        assert "3 layers" in app.engine_status and not app.engine_error
        await pilot.press("n", *"after esc", "enter")
        await pilot.pause()
        app.screen.query_one("#param-n").value = "2"
        app.screen.query_one("#param-max").value = "4"
        app.screen.query_one("#prompt").focus()
        await pilot.press(*"Hi", "enter")
        await wait_idle(app, pilot)
        assert len(Store(tmp_path / "s.db").completions(app.screen.session_id)) == 2

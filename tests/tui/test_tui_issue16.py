"""Regressions of issue 16 (tried at 80x24): what a cancel stores and shows, controls that describe the
shown run, screen keys that work and are palette commands, the deactivation dialog's defaults,
numeric fields, help rows and toasts; and the damaged-row warning of issue 17."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from helpers import SIZE, cells, labelled_session, press_when, wait_idle
from textual.widgets import DataTable, Static

import auditui.workflows.attribute as attribute_workflow
import auditui.workflows.sample as sample_workflow
from auditui.config import load_settings
from auditui.store import Store
from auditui.tui.app import AuditApp
from auditui.tui.screens.attribution import AttributionScreen
from auditui.tui.screens.dialogs import Help
from auditui.tui.screens.flow import FlowScreen
from auditui.tui.screens.samples import SamplesScreen
from auditui.tui.widgets.status import StatusBar

SPEC = [("Is the sky blue?", [("Yes, it is blue.", "positive"), ("No idea at all.", "negative")]),
        ("Say hi", [("Hello there!", "positive"), ("Go away now.", "negative")])]


def settings(tmp_path, tiny_models, tiny_packs=None):
    pack = str(tiny_packs["llama"]) if tiny_packs else ""
    return load_settings(model=str(tiny_models["llama"]), pack=pack, db=str(tmp_path / "s.db"))


def wait_for_stop(monkeypatch, module, name):
    """Replace `module.name` by the real function that, once it has run, waits for the user's Esc (so
    the stop arrives while the step is busy, e.g. during the last batch); `entered` is set inside."""
    real, entered = getattr(module, name), threading.Event()

    def slow(*args, **kwargs):
        result = real(*args, **kwargs)
        entered.set()
        progress = kwargs.get("progress") or args[-1]
        deadline = time.monotonic() + 20
        while not progress.should_stop() and time.monotonic() < deadline:
            time.sleep(0.02)
        return result
    monkeypatch.setattr(module, name, slow)
    return entered


async def test_escape_during_attribution_is_stored_and_shown_as_cancelled(tmp_path, tiny_models, tiny_packs, loaded,
                                                                          monkeypatch):
    config = settings(tmp_path, tiny_models, tiny_packs)
    store = Store(config.db)
    session_id = labelled_session(store, loaded("llama"), SPEC)
    entered = wait_for_stop(monkeypatch, attribute_workflow, "delta_scores")
    app = AuditApp(config)
    async with app.run_test(size=SIZE) as pilot:
        await wait_idle(app, pilot)
        app.push_screen(AttributionScreen(session_id))
        await pilot.pause()
        app.screen.query_one("#param-sites").value = "2/resid_post"
        await pilot.press("ctrl+r")
        await press_when(pilot, entered, "escape")
        await wait_idle(app, pilot)
        assert any(n.message == "attribution: cancelled" for n in app._notifications)
        run = store.runs(session_id, "attribution")[-1]
        assert run["status"] == "cancelled" and run["result"]["rows"]  # what was computed is kept
        assert "cancelled" in app.screen.title
    app = AuditApp(config, load_engine=False)
    async with app.run_test(size=SIZE) as pilot:
        app.push_screen(AttributionScreen(session_id))
        await pilot.pause()
        assert f"run {run['id']}" in app.screen.title and "cancelled" in app.screen.title


async def test_reopened_attribution_controls_describe_the_shown_run(tmp_path, tiny_models, tiny_packs, loaded):
    config = settings(tmp_path, tiny_models, tiny_packs)
    store = Store(config.db)
    session_id = labelled_session(store, loaded("llama"), SPEC)
    app = AuditApp(config)
    async with app.run_test(size=SIZE) as pilot:
        await wait_idle(app, pilot)
        app.push_screen(AttributionScreen(session_id))
        await pilot.pause()
        for name, value in (("sites", "2/resid_post 1/mlp_out"), ("top", "3"), ("check", "1"), ("positions", "all")):
            app.screen.query_one(f"#param-{name}").value = value
        await pilot.press("ctrl+r")
        await wait_idle(app, pilot)
        run_id = store.runs(session_id, "attribution")[-1]["id"]
    app = AuditApp(config)
    async with app.run_test(size=SIZE) as pilot:
        await wait_idle(app, pilot)
        app.push_screen(AttributionScreen(session_id))
        await pilot.pause()
        assert app.screen.param_values() == {"sites": "2/resid_post 1/mlp_out", "top": "3", "check": "1",
                                             "positions": "all"}
        assert f"run {run_id}" in app.screen.title
        assert {row[1] for row in cells(app.screen.query_one("#ranked", DataTable))} == {"2/resid_post", "1/mlp_out"}


async def test_escape_before_the_first_completion_keeps_no_empty_prompt(tmp_path, tiny_models, loaded, monkeypatch):
    config = settings(tmp_path, tiny_models)
    store = Store(config.db)
    session_id = labelled_session(store, loaded("llama"), SPEC[:1], chat=True)
    entered = threading.Event()

    def no_batch(lm, prompt_ids, n, params, seed, batch_size, progress):  # stops before any batch ends
        entered.set()
        while not progress.should_stop():
            time.sleep(0.02)
        yield from ()
    monkeypatch.setattr(sample_workflow, "iter_sample_batches", no_batch)
    app = AuditApp(config)
    async with app.run_test(size=SIZE) as pilot:
        await wait_idle(app, pilot)
        await pilot.press("enter")
        await pilot.pause()
        app.screen.query_one("#prompt").value = "never answered"
        app.screen.action_sample()
        await press_when(pilot, entered, "escape")
        await wait_idle(app, pilot)
        assert [p["text"] for p in store.prompts(session_id)] == ["Is the sky blue?"]
        assert store.runs(session_id, "sample")[-1]["status"] == "cancelled"
        assert len(cells(app.screen.query_one("#prompts", DataTable))) == 1


async def test_a_prompt_without_completions_shows_only_itself(tmp_path, tiny_models, loaded):
    """An empty prompt (kept by an older version) selected on opening: its own empty completions pane,
    its own text in the detail pane, never another prompt's completion."""
    config = settings(tmp_path, tiny_models)
    store = Store(config.db)
    session_id = labelled_session(store, loaded("llama"), SPEC[:1])
    store.add_prompt(session_id, "empty one", [1, 2])
    app = AuditApp(config, load_engine=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("enter")
        await pilot.pause(0.3)
        assert cells(app.screen.query_one("#completions", DataTable)) == []
        assert str(app.screen.query_one("#detail", Static).render()) == "empty one"


async def test_report_header_names_the_pack_the_runs_used(tmp_path, tiny_models):
    config = settings(tmp_path, tiny_models)
    store = Store(config.db)
    session_id = store.create_session("made before the pack loaded")
    run_id = store.start_run(session_id, "flow", {}, {"model_id": "tiny-llama", "pack": "tiny", "saes": {}})
    store.finish_run(run_id, {}, {"headline": "a graph"})
    app = AuditApp(config, load_engine=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("e", "enter", "enter", "enter")  # the export dialog's defaults
        await pilot.pause()
    report = (tmp_path / f"s-session{session_id}.md").read_text(encoding="utf-8")
    assert "SAE pack: tiny" in report and "model: tiny-llama" in report


async def test_letter_keys_act_on_the_samples_screen_and_are_palette_commands(tmp_path, tiny_models, loaded):
    config = settings(tmp_path, tiny_models)
    store = Store(config.db)
    session_id = labelled_session(store, loaded("llama"), SPEC[:1])
    app = AuditApp(config, load_engine=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("enter")
        await pilot.pause()
        for screen in (app.screen, FlowScreen(session_id)):
            if screen is not app.screen:
                app.push_screen(screen)
                await pilot.pause()
            titles = {command.title for command in app.get_system_commands(app.screen)}
            wanted = {binding.description for binding in type(app.screen).BINDINGS if binding.description}
            assert wanted <= titles, wanted - titles
        await pilot.press("escape", "b")  # Esc leaves Flow's feature field (it has focus), b goes back
        await pilot.pause()
        assert isinstance(app.screen, SamplesScreen)
        await pilot.press("a")
        await pilot.pause()
        assert isinstance(app.screen, AttributionScreen)
        assert app.screen.app.screen_stack[-2].query_one("#prompt").value == ""
        await pilot.press("b", "ctrl+p", *"Flow")
        await pilot.pause(0.3)
        await pilot.press("enter")
        await pilot.pause(0.3)
        assert isinstance(app.screen, FlowScreen)
        await pilot.press("escape")  # no job runs: Esc leaves the field, then goes back
        await pilot.pause()
        await pilot.press("escape")
        await pilot.pause()
        assert isinstance(app.screen, SamplesScreen)


def activations(engine, ids: list[int], site, latent: int) -> list[float]:
    """The latent's activation at every token of `ids` (read here, independently of the TUI)."""
    from auditui.engine.flow import forward_sites

    acts = forward_sites(engine.lm, torch.tensor([ids]), {site})[site][0]
    with torch.no_grad():
        codes = engine.bank.sae(site).encode(acts.float())
    return (codes.to_dense() if codes.is_sparse else codes)[:, latent].tolist()


async def test_deactivation_dialog_offers_the_texts_in_context_at_the_strongest_token(tmp_path, tiny_models,
                                                                                      tiny_packs, loaded):
    from auditui.engine.sites import Site

    config = settings(tmp_path, tiny_models, tiny_packs)
    store = Store(config.db)
    lm = loaded("llama")
    session_id = labelled_session(store, lm, SPEC, chat=True)
    app = AuditApp(config)
    async with app.run_test(size=SIZE) as pilot:
        await wait_idle(app, pilot)
        engine, site = app.jobs.state["engine"], Site.parse("2/resid_post")
        texts = [(p["prompt_ids"] + c["token_ids"]) for p in store.prompts(session_id)
                 for c in store.completions(prompt_id=p["id"])]
        latent = next(j for j in range(engine.bank.sae(site).cfg.d_sae)
                      if max(activations(engine, texts[-1], site, j)) > 0
                      and activations(engine, store.completions(session_id)[-1]["token_ids"], site, j)[-1] == 0)
        app.push_screen(FlowScreen(session_id, f"2/resid_post/{latent}"))
        await wait_idle(app, pilot)
        await pilot.press("x")
        await wait_idle(app, pilot)
        choices = app.screen.query_one("#choices", DataTable)
        assert choices.has_focus and choices.row_count == len(texts)  # every text is offered, strongest first
        await pilot.press("enter")  # test the highlighted one at its strongest token
        await wait_idle(app, pilot)
        run = store.runs(session_id, "deactivation")[-1]
        text, token = run["params"]["text"], run["params"]["token"]
        assert run["params"]["chat"] is False and any(  # a text of the session with its chat-templated prompt
            p["text"] in text and c["text"] in text for p in store.prompts(session_id)
            for c in store.completions(prompt_id=p["id"]))
        values = activations(engine, lm.prompt_ids(text, chat=False), site, latent)
        best = max(max(activations(engine, seq, site, latent)) for seq in texts)
        assert values[token] == max(values) == best > 0 and run["result"]["active"]
        assert run["result"]["z_old"] == pytest.approx(best, rel=1e-4)


async def test_numeric_fields_show_their_value_and_flag_invalid_ones(tmp_path, tiny_models, loaded):
    config = settings(tmp_path, tiny_models)
    labelled_session(Store(config.db), loaded("llama"), SPEC[:1])
    app = AuditApp(config, load_engine=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("enter")
        await pilot.pause()
        field = app.screen.query_one("#param-top-p")
        field.focus()
        await pilot.press("end")
        await pilot.pause()
        assert "0.95" in field.render_line(0).text
        field.value = "0.10.05"
        await pilot.pause()
        assert field.has_class("-invalid")


async def test_help_lists_each_key_once_and_toasts_leave_the_status_bar_visible(tmp_path, tiny_models, loaded):
    config = settings(tmp_path, tiny_models)
    labelled_session(Store(config.db), loaded("llama"), SPEC[:1])
    app = AuditApp(config, load_engine=False)
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await pilot.press("enter")
        await pilot.pause()
        app.notify("a toast " * 20)
        await pilot.pause(0.3)
        bar = app.screen.query_one(StatusBar).region
        toasts = [toast.region for toast in app.screen.query("Toast")]
        assert toasts and not any(toast.overlaps(bar) for toast in toasts)
        await pilot.press("f1")
        await pilot.pause()
        assert isinstance(app.screen, Help)
        actions = [row[1] for row in cells(app.screen.query_one(DataTable))]
        assert actions.count("Positive") == 1 and "Attribution" in actions


async def test_damaged_rows_are_a_visible_warning_when_a_session_opens(tmp_path, tiny_models):
    config = settings(tmp_path, tiny_models)
    store = Store(config.db)
    session_id = store.create_session("damaged")
    prompt_id = store.add_prompt(session_id, "intact prompt", [1, 2])
    damaged = store.add_completion(prompt_id, "damaged completion", [4], seed=1, params={})
    with store.db.conn:
        store.db.execute("UPDATE completions SET params = '{broken' WHERE id = ?", [damaged])
    app = AuditApp(config, load_engine=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("enter")
        await pilot.pause()
        assert isinstance(app.screen, SamplesScreen)
        warnings = [n for n in app._notifications if n.severity == "warning"]
        assert len(warnings) == 1 and f"completions row {damaged}: params is damaged" in warnings[0].message
        assert "damaged completion" in str(app.screen.query_one("#detail", Static).render())

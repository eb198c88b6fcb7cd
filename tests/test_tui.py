"""The TUI driven by Textual's Pilot on a tiny model: sessions, sampling, labels, persistence, errors."""

from __future__ import annotations

import subprocess
import sys

from rich.control import strip_control_codes
from textual.widgets import DataTable, Static

from auditui.config import config_file, load_settings
from auditui.store import Store
from auditui.tui.app import AuditApp
from auditui.tui.screens.dialogs import Help
from auditui.tui.screens.samples import SamplesScreen

SIZE = (80, 24)
NASTY = "[/INST] [bold]not bold[/bold] <script>alert(1)</script>"


async def wait_idle(app: AuditApp, pilot, timeout: float = 60.0) -> None:
    """Wait until the engine queue has nothing running or queued."""
    waited = 0.0
    while app.jobs.busy or app.job_status is not None:
        await pilot.pause(0.1)
        waited += 0.1
        assert waited < timeout, "engine queue never went idle"
    await pilot.pause()


def settings_for(tmp_path, model_dir, **extra):
    return load_settings(model=str(model_dir), pack="", db=str(tmp_path / "s.db"), **extra)


def cells(table: DataTable) -> list[list[str]]:
    return [[str(cell) for cell in table.get_row_at(i)] for i in range(table.row_count)]


async def test_sample_label_quit_and_reopen(tmp_path, tiny_models):
    settings = settings_for(tmp_path, tiny_models["llama"])
    app = AuditApp(settings)
    async with app.run_test(size=SIZE) as pilot:
        await wait_idle(app, pilot)
        assert "3 layers" in app.engine_status
        await pilot.press("n", *"audit one", "enter")
        await pilot.pause()
        assert isinstance(app.screen, SamplesScreen)
        for name, value in (("n", "4"), ("max", "8"), ("seed", "7")):
            app.screen.query_one(f"#param-{name}").value = value
        app.screen.query_one("#prompt").focus()
        await pilot.press(*"Tell me a story", "enter")
        await wait_idle(app, pilot)
        table = app.screen.query_one("#completions", DataTable)
        assert table.row_count == 4 and table.has_focus
        table.move_cursor(row=0)
        await pilot.press("plus", "plus", "minus", "minus")
        await pilot.pause()
        assert "pairs: 1" in str(app.screen.query_one("#pairs", Static).render())
        assert [row[1] for row in cells(app.screen.query_one("#prompts", DataTable))] == ["Tell me a story"]
        await pilot.press("ctrl+q")
    store = Store(settings.db)
    session_id = store.latest_session_id()
    assert store.session(session_id)["name"] == "audit one"
    comps = store.completions(session_id)
    assert [c["label"] for c in comps] == ["positive", "positive", "negative", "negative"]
    assert [c["seed"] for c in comps] == [7, 8, 9, 10]
    assert store.pairs(session_id) == [{"prompt_id": comps[0]["prompt_id"],
                                        "positive": [comps[0]["id"], comps[1]["id"]],
                                        "negative": [comps[2]["id"], comps[3]["id"]]}]
    # A new app on the same file shows all of it again.
    app = AuditApp(settings, load_engine=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert cells(app.screen.query_one("#sessions", DataTable))[0][1] == "audit one"
        await pilot.press("enter")
        await pilot.pause()
        table = app.screen.query_one("#completions", DataTable)
        assert [row[1] for row in cells(table)] == ["+", "+", "-", "-"]
        shown = [strip_control_codes(" ".join(c["text"].split())[:200]) for c in comps]
        assert [row[2] for row in cells(table)] == shown


async def test_model_text_renders_literally(tmp_path, tiny_models):
    settings = settings_for(tmp_path, tiny_models["llama"])
    store = Store(settings.db)
    session_id = store.create_session("markup")
    prompt_id = store.add_prompt(session_id, NASTY, [1, 2])
    store.add_completion(prompt_id, NASTY, [3], seed=1, params={})
    app = AuditApp(settings, load_engine=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("enter")
        await pilot.pause()
        detail = str(app.screen.query_one("#detail", Static).render())
        assert NASTY in detail
        assert cells(app.screen.query_one("#completions", DataTable))[0][2] == NASTY
        assert cells(app.screen.query_one("#prompts", DataTable))[0][1] == NASTY[:16] + "…"


async def test_bad_database_is_a_message_not_a_crash(tmp_path, tiny_models):
    db = tmp_path / "s.db"
    store = Store(db)
    store.db.execute("PRAGMA user_version = 99")
    store.close()  # the last connection checkpoints the WAL into the file
    before = db.read_bytes()
    app = AuditApp(settings_for(tmp_path, tiny_models["llama"]), load_engine=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("n")  # nothing to act on: no crash
        await pilot.pause()
        notice = str(app.screen.query_one("#notice", Static).render())
        assert "newer auditui" in notice and app.is_running
    assert db.read_bytes() == before


async def test_engine_error_keeps_the_app_alive(tmp_path):
    app = AuditApp(settings_for(tmp_path, tmp_path / "no-such-model"))
    async with app.run_test(size=SIZE) as pilot:
        await wait_idle(app, pilot)
        assert app.engine_status == "model not loaded" and "not found" in app.engine_error
        await pilot.press("n", *"s", "enter")
        app.screen.query_one("#prompt").focus()
        await pilot.press(*"hi", "enter")
        await wait_idle(app, pilot)
        assert app.is_running and isinstance(app.screen, SamplesScreen)


async def test_escape_cancels_sampling(tmp_path, tiny_models):
    settings = settings_for(tmp_path, tiny_models["gpt2"])
    app = AuditApp(settings)
    async with app.run_test(size=SIZE) as pilot:
        await wait_idle(app, pilot)
        await pilot.press("n", *"c", "enter")
        for name, value in (("n", "64"), ("max", "400")):
            app.screen.query_one(f"#param-{name}").value = value
        app.screen.query_one("#prompt").focus()
        await pilot.press(*"go", "enter")
        while app.job_status is None:
            await pilot.pause(0.05)
        await pilot.press("escape")
        await wait_idle(app, pilot)
        assert app.is_running
    assert len(Store(settings.db).completions()) < 64


async def test_help_and_theme_choice_is_remembered(tmp_path, tiny_models):
    settings = settings_for(tmp_path, tiny_models["llama"])
    app = AuditApp(settings, load_engine=False)
    async with app.run_test(size=SIZE) as pilot:
        assert app.theme == "auditui-dark"
        await pilot.press("f1")
        await pilot.pause()
        assert isinstance(app.screen, Help)
        keys = [row[0] for row in cells(app.screen.query_one(DataTable))]
        assert "n" in keys and "d" in keys
        await pilot.press("escape", "ctrl+t")
        await pilot.pause()
        assert app.theme == "auditui-light"
    assert 'theme = "auditui-light"' in config_file().read_text()
    app = AuditApp(load_settings(model="x", pack="", db=str(tmp_path / "s.db")), load_engine=False)
    async with app.run_test(size=SIZE):
        assert app.theme == "auditui-light"


def test_first_frame_needs_no_torch():
    """The TUI modules import without torch/transformers/sae-lens: the first frame comes first."""
    code = ("import sys, auditui.cli, auditui.tui.app; "
            "print(sorted(m for m in ('torch', 'transformers', 'sae_lens') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


async def test_database_damaged_while_open_is_a_message(tmp_path, tiny_models):
    settings = settings_for(tmp_path, tiny_models["llama"])
    store = Store(settings.db)
    store.create_session("x")
    app = AuditApp(settings, load_engine=False)
    async with app.run_test(size=SIZE) as pilot:
        with store.db.conn:
            store.db.execute("DROP VIEW pairs")  # the samples screen reads it
        await pilot.press("enter")
        await pilot.pause()
        assert app.is_running
        assert any("no such table" in n.message for n in app._notifications)


async def test_command_palette_offers_the_screen_keys(tmp_path, tiny_models):
    app = AuditApp(settings_for(tmp_path, tiny_models["llama"]), load_engine=False)
    async with app.run_test(size=SIZE) as pilot:
        titles = [command.title for command in app.get_system_commands(app.screen)]
        assert {"New", "Rename", "Delete", "Export", "Toggle light/dark theme"} <= set(titles)
        await pilot.press("ctrl+p")
        await pilot.press(*"New")
        await pilot.pause(0.3)
        await pilot.press("enter")
        await pilot.pause(0.3)
        await pilot.press(*"from palette", "enter")
        await pilot.pause()
        assert isinstance(app.screen, SamplesScreen)
    assert Store(tmp_path / "s.db").sessions()[0]["name"] == "from palette"

"""The TUI driven by Textual's Pilot on a tiny model: sessions, sampling, labels, persistence, errors."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from helpers import NASTY, SIZE, cells, wait_idle
from platformdirs import user_data_dir
from textual.widgets import DataTable, Static

from auditui.config import REPO_ROOT, config_file, load_settings
from auditui.store import Store
from auditui.text import visible
from auditui.tui import themes
from auditui.tui.app import AuditApp
from auditui.tui.screens.dialogs import Help
from auditui.tui.screens.samples import SamplesScreen


def settings_for(tmp_path, model_dir, **extra):
    return load_settings(model=str(model_dir), pack="", db=str(tmp_path / "s.db"), **extra)


async def test_sample_label_quit_and_reopen(tmp_path, tiny_models):
    settings = settings_for(tmp_path, tiny_models["llama"])
    app = AuditApp(settings)
    async with app.run_test(size=SIZE) as pilot:
        await wait_idle(app, pilot)
        assert "3 layers" in app.engine_status
        await pilot.press("n", *"audit one", "enter")
        await pilot.pause()
        assert isinstance(app.screen, SamplesScreen)
        session = Store(settings.db).session(app.screen.session_id)
        assert (session["model_id"], session["pack_id"]) == ("", "")  # the first sampling fills them
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
        assert cells(app.screen.query_one("#prompts", DataTable))[0][1:] == ["Tell me a story", "2/2"]
        assert [row[1] for row in cells(table)] == ["+", "+", "-", "-"] and table.cursor_row == 3
        await pilot.press("0")  # the last row: the cursor stays, the detail shows the new label
        await pilot.pause()
        assert cells(app.screen.query_one("#prompts", DataTable))[0][2] == "2/1"
        assert " · unlabelled · " in str(app.screen.query_one("#detail", Static).render())
        await pilot.press("minus")
        model_id = app.jobs.state["engine"].lm.model_id
        await pilot.press("ctrl+q")
    store = Store(settings.db)
    session_id = store.latest_session_id()
    assert store.session(session_id)["name"] == "audit one"
    assert store.session(session_id)["model_id"] == model_id == "tiny-llama"  # not settings.model (a path)
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
        shown = [" ".join(visible(c["text"]).split())[:200] for c in comps]  # controls as visible escapes
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
    """Escape during the second batch: the first batch (8 completions) is already saved, no unfinished
    completion is, later batches never start, and the user is told the job was cancelled."""
    settings = settings_for(tmp_path, tiny_models["gpt2"])
    n, max_new = 64, 40
    app = AuditApp(settings)
    async with app.run_test(size=SIZE) as pilot:
        await wait_idle(app, pilot)
        await pilot.press("n", *"c", "enter")
        for name, value in (("n", str(n)), ("max", str(max_new)), ("seed", "0")):
            app.screen.query_one(f"#param-{name}").value = value
        app.screen.query_one("#prompt").value = "go"
        app.screen.action_sample()  # not a key press: Pilot would wait for the busy queue to drain
        # progress counts n * max_new token steps; past 8 * max_new the second batch of 8 is running
        while app.job_status is None or app.job_status[1] <= 8 * max_new:
            assert app.jobs.busy, "sampling ended before Esc"
            await pilot.pause(0.02)
        await pilot.press("escape")
        await wait_idle(app, pilot)
        assert app.is_running
        assert any(note.message == f"sample {n}: cancelled" for note in app._notifications)
    # The engine commits each finished batch whole; of the interrupted batch only rows that hit EOS.
    batches: dict[int, list[str]] = {}
    for comp in Store(settings.db).completions():
        batches.setdefault(comp["seed"] // 8, []).append(comp["finish_reason"])
    whole = [b for b, reasons in batches.items() if len(reasons) == 8]
    assert whole[:1] == [0] and whole == list(range(len(whole))) and len(whole) < n // 8
    partial = [reason for b, reasons in batches.items() if b not in whole for reason in reasons]
    assert set(batches) <= {*whole, len(whole)} and set(partial) <= {"eos"}


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


async def test_export_errors_are_messages(tmp_path, tiny_models):
    """A report path that cannot be written (a folder stands there) or a damaged database is one
    notification on either screen, not a crash; a refused target stops the whole export before any write."""
    settings = settings_for(tmp_path, tiny_models["llama"])
    store = Store(settings.db)
    session_id = store.create_session("ünïcode ✓")
    (tmp_path / f"s-session{session_id}.html").mkdir()
    app = AuditApp(settings, load_engine=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("e", "enter", "enter", "enter")  # the export dialog on the sessions screen: its defaults
        await pilot.pause()
        assert not (tmp_path / f"s-session{session_id}.md").exists()
        await pilot.press("e", "enter", "enter", *["backspace"] * 20, *"md", "enter")  # Markdown only
        await pilot.pause()
        assert "ünïcode ✓" in (tmp_path / f"s-session{session_id}.md").read_text(encoding="utf-8")
        await pilot.press("enter")  # open the session
        await pilot.pause()
        with store.db.conn:
            store.db.execute("DROP VIEW pairs")  # the report reads it
        app.screen.query_one("#completions").focus()
        await pilot.press("e", "enter", "enter", *["backspace"] * 20, *"md", "enter", "y")  # on the samples screen
        await pilot.pause()
        assert app.is_running and isinstance(app.screen, SamplesScreen)
        errors = [n.message for n in app._notifications if n.severity == "error"]
        assert len(errors) == 2 and errors[0].endswith("is a folder; give a file name") and "no such table" in errors[1]
    assert "ünïcode ✓" in (tmp_path / f"s-session{session_id}.md").read_text(encoding="utf-8")


async def test_unreadable_settings_file_is_kept_and_reported(tmp_path, tiny_models):
    settings = settings_for(tmp_path, tiny_models["llama"])
    broken = "theme = [unclosed\n"
    config_file().write_text(broken, encoding="utf-8")
    app = AuditApp(settings, load_engine=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+t")
        await pilot.pause()
        assert app.is_running and app.theme == "auditui-light"
        assert any("cannot read settings file" in n.message for n in app._notifications)
    assert config_file().read_text(encoding="utf-8") == broken


async def test_without_theme_files_the_builtin_themes_serve(tmp_path, tiny_models, monkeypatch):
    """An installed auditui has no themes/ folder: Textual's dark/light themes, switchable with Ctrl+T."""
    monkeypatch.setattr(themes, "THEMES_DIR", tmp_path / "no-themes")
    app = AuditApp(settings_for(tmp_path, tiny_models["llama"]), load_engine=False)
    async with app.run_test(size=SIZE) as pilot:
        assert app.theme == "textual-dark" and "auditui-dark" not in app.available_themes
        await pilot.press("ctrl+t")
        await pilot.pause()
        assert app.theme == "textual-light"


async def test_unusable_sae_pack_leaves_the_model_loaded(tmp_path, tiny_models):
    app = AuditApp(load_settings(model=str(tiny_models["llama"]), pack="no-such-pack", db=str(tmp_path / "s.db")))
    async with app.run_test(size=SIZE) as pilot:
        await wait_idle(app, pilot)
        assert app.engine_status.startswith("tiny-llama · 3 layers · no SAEs")
        assert len(app.jobs.state["engine"].bank) == 0
        warnings = [n for n in app._notifications if n.title == "SAEs"]
        assert len(warnings) == 1 and "no-such-pack" in warnings[0].message and warnings[0].severity == "warning"


def test_wheel_ships_the_stylesheet_and_keeps_sessions_out_of_site_packages(tmp_path):
    """Build the wheel, unpack it as an installed package: app.tcss is there, no themes/ or sessions/
    folder is, and the default database goes to the user data folder."""
    src = tmp_path / "src"
    shutil.copytree(REPO_ROOT / "auditui", src / "auditui", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, src / name)
    code = f"from setuptools import build_meta; print(build_meta.build_wheel({str(tmp_path / 'dist')!r}))"
    wheel = subprocess.run([sys.executable, "-c", code], cwd=src, capture_output=True, text=True,
                           check=True).stdout.strip().splitlines()[-1]
    site = tmp_path / "site"
    with zipfile.ZipFile(tmp_path / "dist" / wheel) as archive:
        assert "auditui/tui/app.tcss" in archive.namelist()
        archive.extractall(site)
    code = ("import auditui.config as c, auditui.tui.themes as t; "
            "print(c.__file__, c.Settings().db, len(t.load_themes()), sep='\\n')")
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("AUDITUI_DB")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out == [str(site / "auditui" / "config.py"), str(Path(user_data_dir("auditui")) / "auditui.db"), "0"]


ENCODING_ARG = {"write_text": 1, "read_text": 0}  # the position of `encoding` among the arguments


def test_tui_writes_text_as_utf8():
    """Every write_text / read_text of the TUI and the settings names its encoding (exports hold model text)."""
    files = [*(REPO_ROOT / "auditui" / "tui").rglob("*.py"), REPO_ROOT / "auditui" / "config.py"]
    calls = [(path.name, node.lineno) for path in files for node in ast.walk(ast.parse(path.read_text("utf-8")))
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
             and node.func.attr in ENCODING_ARG and len(node.args) <= ENCODING_ARG[node.func.attr]
             and not any(k.arg == "encoding" for k in node.keywords)]
    assert calls == []


async def test_f2_shows_the_loaded_packs_quality(tmp_path, tiny_models):
    from helpers import TINY_SOURCES, tiny_plan

    from auditui.engine.packs import build_pack
    from auditui.tui.screens.pack import PackQuality

    pack = build_pack(tiny_plan(model=str(tiny_models["llama"]), layers=(1,)), tmp_path / "cache", "cpu", "float32",
                      sources=TINY_SOURCES)
    manifest = json.loads((pack / "pack.json").read_text())
    app = AuditApp(load_settings(model=str(tiny_models["llama"]), pack=str(pack), db=str(tmp_path / "s.db")))
    async with app.run_test(size=SIZE) as pilot:
        await wait_idle(app, pilot)
        await pilot.press("f2")
        await wait_idle(app, pilot)
        assert isinstance(app.screen, PackQuality)
        rows = cells(app.screen.query_one("#pack-table", DataTable))
        assert [row[0] for row in rows] == list(manifest["saes"])  # 1/attn_out, 1/mlp_out, 1/resid_post
        for row, entry in zip(rows, manifest["saes"].values()):
            assert row[4] == f"{entry['variance_explained']:.3f}" and row[6] == f"{entry['dead_fraction']:.3f}"
            assert row[8] == f"{entry['loss_spliced']:.3f}"
        await pilot.press("escape")
        assert not isinstance(app.screen, PackQuality)


async def test_f3_loads_another_pack_in_place_of_the_loaded_one(tmp_path, tiny_models):
    """A targeted dictionary beside the general pack: F3 lists the built packs and loads the one picked;
    the engine's SAEs, the status bar and the pack recorded from then on are the new pack's."""
    from helpers import TINY_SOURCES, tiny_plan

    from auditui.engine.packs import build_pack
    from auditui.tui.screens.pack import PackPicker
    from auditui.workflows.engine import pack_label

    cache = tmp_path / "cache"
    for name, layer in (("general", 1), ("narrow", 0)):
        build_pack(tiny_plan(name, model=str(tiny_models["llama"]), layers=(layer,)), cache, "cpu", "float32",
                   sources=TINY_SOURCES)
    app = AuditApp(load_settings(model=str(tiny_models["llama"]), pack="general", db=str(tmp_path / "s.db"),
                                 cache_dir=str(cache)))
    async with app.run_test(size=SIZE) as pilot:
        await wait_idle(app, pilot)
        assert {site.layer for site in app.jobs.state["engine"].bank.sites} == {1}
        await pilot.press("f3")
        await pilot.pause()
        assert isinstance(app.screen, PackPicker)
        rows = cells(app.screen.query_one("#pack-picker", DataTable))
        assert [(row[0], row[1], row[4]) for row in rows] == [("general", "general", "loaded"), ("narrow", "general", "")]
        await pilot.press("down", "enter")
        await wait_idle(app, pilot)
        assert not isinstance(app.screen, PackPicker)
        assert {site.layer for site in app.jobs.state["engine"].bank.sites} == {0}
        assert app.pack.name == "narrow" and "(narrow)" in app.engine_status
        assert app.settings.pack == "narrow" and pack_label(app.settings) == "narrow"


async def test_f2_without_a_pack_is_a_message(tmp_path, tiny_models):
    app = AuditApp(settings_for(tmp_path, tiny_models["llama"]))
    async with app.run_test(size=SIZE) as pilot:
        await wait_idle(app, pilot)
        await pilot.press("f2")
        await wait_idle(app, pilot)
        assert any("no SAE pack is loaded" in n.message for n in app._notifications)

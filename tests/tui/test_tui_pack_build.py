"""First run (issue 16): the TUI opens at once and builds the missing pack in a process of its own,
with its progress in the status bar; sampling works meanwhile; the SAEs load when the pack is done."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from helpers import SIZE, TEXT, wait_idle
from textual.widgets import Static

from auditui.config import load_settings
from auditui.pack_build import BuildStatus, build_lock, is_building, log_path, read_status
from auditui.store import Store
from auditui.tui.app import AuditApp
from auditui.tui.screens.attribution import AttributionScreen
from auditui.tui.screens.samples import SamplesScreen

BUILD = ("--quick", "--layers", "1-2", "--width", "64", "--k", "4", "--tokens", "1000000", "--minutes", "0.3")


def corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "text.txt").write_text("\n\n".join(TEXT[i:] + TEXT[:i] for i in range(0, 2000, 3)))
    return folder


def status_bar(app) -> str:
    found = app.screen.query("#engine-state")
    return str(found.first(Static).render()) if found else ""


async def test_a_missing_pack_builds_in_the_background_while_sampling_works(tmp_path, tiny_models, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("AUDITUI_CACHE_DIR", str(cache))
    settings = load_settings(model=str(tiny_models["llama"]), pack="fresh", db=str(tmp_path / "s.db"),
                             device="cpu", dtype="float32")
    session_id = Store(settings.db).create_session("first run", settings.model)
    app = AuditApp(settings, build_pack=True)
    app.pack_build_args = (*BUILD, "--corpus", str(corpus(tmp_path)))
    began = time.monotonic()
    seen: list[str] = []
    async with app.run_test(size=SIZE) as pilot:
        await wait_idle(app, pilot)
        app.push_screen(SamplesScreen(session_id))
        while "(building fresh: train" not in status_bar(app):
            await pilot.pause(0.2)
            assert time.monotonic() - began < 60, app.pack_build_line
        seen.append(status_bar(app))
        assert is_building(cache, "fresh") and app.engine_status.endswith("no SAEs · cpu")
        for name, value in (("n", "2"), ("max", "4")):
            app.screen.query_one(f"#param-{name}").value = value
        app.screen.query_one("#prompt").focus()
        await pilot.press(*"Is the sky blue?", "enter")  # sampling while the pack trains in the other process
        await wait_idle(app, pilot)
        assert len(app.store.completions(session_id)) == 2 and app.pack is None
        app.push_screen(AttributionScreen(session_id))  # an SAE screen says when its SAEs will be ready
        await pilot.pause(0.5)
        assert any("SAEs in ~1 min" in n.message and "needs them" in n.message for n in app._notifications)
        while app.pack is None:
            await pilot.pause(0.2)
            assert time.monotonic() - began < 120, app.pack_build_line
        await wait_idle(app, pilot)
        seen.append(status_bar(app))
    seconds = time.monotonic() - began
    assert seen[0].startswith("SAEs in ~1 min (building fresh: train ") and seen[0].endswith(" · tiny-llama")
    assert "6 SAEs (fresh)" in app.engine_status  # layers 1-2: resid_post, attn_out, mlp_out and not app.pack_build_line
    assert read_status(cache, "fresh").state == "done" and not is_building(cache, "fresh")
    manifest = json.loads((cache / "packs" / "fresh" / "pack.json").read_text())
    assert manifest["training"]["build_budget_seconds"] == 18.0 and seconds < 60
    assert list(manifest["corpus"]) == ["file-0-text"]
    assert "train" in log_path(cache, "fresh").read_text()


def test_one_build_per_pack_and_a_dead_build_reads_as_failed(tmp_path, tiny_models):
    cache = tmp_path / "cache"
    env = {**os.environ, "AUDITUI_CACHE_DIR": str(cache)}
    with build_lock(cache, "busy"):
        assert is_building(cache, "busy")
        proc = subprocess.run([sys.executable, "-m", "auditui", "pack", "build", "busy", "--model",
                               str(tiny_models["llama"]), *BUILD], capture_output=True, text=True, env=env, timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert lines[0] == f"error: pack busy is already being built (process {os.getpid()}); " \
                           "see its progress with: auditui pack status busy"
    assert not is_building(cache, "busy")
    status = cache / "packs" / ".busy.build.json"
    status.write_text(json.dumps({"name": "busy", "pid": 1, "state": "running", "stage": "train", "done": 5, "total": 10}))
    found = read_status(cache, "busy")  # nobody holds the lock: the process died
    assert found.state == "failed" and str(log_path(cache, "busy")) in found.message
    status.write_text("{not json")
    assert read_status(cache, "busy") is None
    proc = subprocess.run([sys.executable, "-m", "auditui", "pack", "status", "busy"], capture_output=True, text=True,
                          env=env, timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("error: no build of pack busy is on record")


def test_status_line_and_eta():
    running = BuildStatus("demo", 1, stage="train", done=43, total=100, started=1000.0, deadline=2000.0)
    assert running.line(now=1000.0) == "SAEs in ~17 min (building demo: train 43%)"
    assert running.eta(2500.0) == 0.0
    unbudgeted = BuildStatus("demo", 1, stage="train", done=25, total=100, started=1000.0)  # a GPU build: from its pace
    assert unbudgeted.eta(1100.0) == 300.0 and BuildStatus("demo", 1).eta(5.0) is None
    assert BuildStatus("demo", 1, state="failed", message="out of memory").line() == \
        "SAEs: building demo failed (out of memory)"
    done = BuildStatus("demo", 1, state="done", stage="evaluate", done=37, total=100, deadline=2000.0)
    assert done.line(now=1000.0) == "SAEs: pack demo is built" and done.eta(1000.0) is None

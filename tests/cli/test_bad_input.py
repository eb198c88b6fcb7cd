"""Hostile and careless input: one `error:` line, exit 2, and every file byte-identical afterwards;
model text and names never reach a terminal or a Markdown report raw."""

from __future__ import annotations

import json
import re
import sqlite3

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_cli_sessions import fails, ok

from auditui.errors import AuditError
from auditui.store import Store
from auditui.store.reports import render_reports
from auditui.text import md_inline, visible

RAW = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
HOSTILE = "\x1b[2J\x1b]0;pwned\x07\x1b]52;c;Y2xpcA==\x07\u009b31m\u202eevil# <img src=x onerror=alert(1)> [x](javascript:1)"


def test_a_report_never_replaces_the_database_or_a_foreign_file(tmp_path):
    db = tmp_path / "S.db"
    ok("session", "new", "keep me", "--db", db)
    Store(db).close()
    before = db.read_bytes()
    assert "session database" in fails("report", "--db", db, "--out", db)
    other = tmp_path / "notes.md"
    other.write_text("my own notes\n")
    assert "not an earlier auditui md report" in fails("report", "--db", db, "--out", other)
    foreign = tmp_path / "app.sqlite"
    sqlite3.connect(foreign).execute("CREATE TABLE t (x)").connection.commit()
    assert "not an earlier auditui html report" in fails("report", "--db", db, "--format", "html", "--out", foreign)
    assert db.read_bytes() == before and other.read_text() == "my own notes\n"
    report = tmp_path / "report.md"
    ok("report", "--db", db, "--out", report)
    ok("report", "--db", db, "--out", report)  # an earlier export of the same kind is replaced
    assert "keep me" in report.read_text() and not list(tmp_path.glob(".*.tmp"))


def test_a_foreign_sqlite_database_is_refused_untouched(tmp_path):
    foreign = tmp_path / "browser.db"
    conn = sqlite3.connect(foreign)
    conn.execute("CREATE TABLE cookies (host TEXT, value TEXT)")
    conn.execute("INSERT INTO cookies VALUES ('a', 'b')")
    conn.commit()
    conn.close()
    before = foreign.read_bytes()
    assert "another program" in fails("session", "list", "--db", foreign)
    assert foreign.read_bytes() == before and not (tmp_path / "browser.db-wal").exists()


def test_pack_names_cannot_leave_the_cache(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("x")
    for name in ("../../victim", str(victim), "", "a/b", ".."):
        assert "pack name" in fails("pack", "build", name, "--quick")
    assert (victim / "precious.txt").read_text() == "x"


def test_malformed_pack_manifests_are_one_line_errors(tmp_path, tiny_models, tiny_packs):
    import shutil

    for name, change in (("list", lambda m: {**m, "saes": list(m["saes"])}), ("array", lambda m: [m]),
                         ("nopath", lambda m: {**m, "saes": {k: {"sha256": "x"} for k in m["saes"]}}),
                         ("escape", lambda m: {**m, "saes": {k: {**v, "path": "../../etc"} for k, v in m["saes"].items()}}),
                         ("absolute", lambda m: {**m, "saes": {k: {**v, "path": "/etc"} for k, v in m["saes"].items()}})):
        pack = tmp_path / name
        shutil.copytree(tiny_packs["gpt2"], pack)
        manifest = json.loads((pack / "pack.json").read_text())
        (pack / "pack.json").write_text(json.dumps(change(manifest)))
        fails("inspect", "--model", tiny_models["gpt2"], "--pack", pack)
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_packs["gpt2"], damaged)
    weights = damaged / "resid_post_1" / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    assert "sha256" in fails("flow", "--model", tiny_models["gpt2"], "--pack", damaged, "--feature",
                             "1/resid_post/0", "--no-save")


def test_ids_beyond_sqlite_integers_are_refused(tmp_path):
    db = tmp_path / "s.db"
    ok("session", "new", "s", "--db", db)
    huge = "99999999999999999999"
    for args in (("label", huge, "pos"), ("session", "show", huge), ("session", "delete", huge, "--yes"),
                 ("session", "rename", huge, "x"), ("report", "--session", huge)):
        assert "64-bit" in fails(*args, "--db", db)


def test_hostile_names_and_text_never_reach_the_terminal_or_markdown_raw(tmp_path):
    db = tmp_path / "s.db"
    for out in (ok("session", "new", HOSTILE, "--db", db), ok("session", "show", "--db", db),
                ok("session", "list", "--db", db), ok("report", "--db", db)):
        assert not RAW.search(out), out
    md = ok("report", "--db", db)
    assert len([line for line in md.splitlines() if line.startswith("#")]) == 1  # the name is no heading
    assert not re.search(r"(?<!\\)<img", md) and not re.search(r"(?<!\\)\]\(javascript", md)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=40))
def test_fuzz_text_through_the_store_reports_and_session_show(tmp_path, text):
    db = tmp_path / "fuzz.db"
    db.unlink(missing_ok=True)
    store = Store(db)
    if re.search("[\ud800-\udfff]", text):  # not valid Unicode: refused where it enters, nothing stored
        with pytest.raises(AuditError, match="not valid UTF-8"):
            store.create_session("n" + text)
        assert store.sessions() == []
        return
    session_id = store.create_session("n" + text)
    name = store.session(session_id)["name"]
    prompt_id = store.add_prompt(session_id, text or "p", [1], system=text or None)
    store.add_completion(prompt_id, text, [2], seed=0, params={})
    reports = render_reports(store, session_id)
    store.close()
    assert not RAW.search(reports["md"]) and not RAW.search(reports["html"])
    assert visible(text) in reports["md"] and md_inline(name) in reports["md"]
    assert json.loads(reports["json"])["prompts"][0]["completions"][0]["text"] == text
    assert "<script" not in reports["html"] or "<script" not in text
    assert not RAW.search(ok("session", "show", "--db", db))


def test_non_finite_numbers_are_refused(tmp_path, tiny_models, tiny_packs):
    db = tmp_path / "s.db"
    ok("session", "new", "s", "--db", db)
    model, pack = str(tiny_models["gpt2"]), str(tiny_packs["gpt2"])
    assert "finite" in fails("sample", "--prompt", "hi", "--temperature", "inf", "--model", model, "--db", db)
    assert "finite" in fails("flow", "--feature", "1/resid_post/0", "--t-res", "nan", "--model", model,
                             "--pack", pack, "--db", db)
    assert "finite" in fails("flow", "deactivate", "--feature", "1/resid_post/0", "--text", "hi", "--r", "nan",
                             "--model", model, "--pack", pack, "--db", db)
    assert "--labels" in fails("flow", "--feature", "1/resid_post/0", "--labels", "-1", "--model", model,
                               "--pack", pack, "--db", db)
    assert Store(db).runs(1) == []


def test_undecodable_text_huge_counts_bad_models_and_ranges(tmp_path, tiny_models, tiny_packs):
    db = tmp_path / "s.db"
    ok("session", "new", "s", "--db", db)
    before = db.read_bytes()
    model, pack = str(tiny_models["gpt2"]), str(tiny_packs["gpt2"])
    bad_byte = b"\xff".decode("utf-8", "surrogateescape")  # what Python makes of $'\xff' in argv
    assert "not valid UTF-8" in fails("session", "new", bad_byte, "--db", db)
    assert "not valid UTF-8" in fails("sample", "--prompt", bad_byte, "--model", model, "--pack", "", "--db", db)
    assert "not valid UTF-8" in fails("flow", "deactivate", "--feature", "1/resid_post/0", "--text", bad_byte,
                                      "--model", model, "--pack", pack, "--db", db)
    assert "at most 1024" in fails("sample", "--prompt", "hi", "-n", "100000", "--model", model, "--db", db)
    assert "reads at most" in fails("flow", "deactivate", "--feature", "1/resid_post/0", "--text", "word " * 600,
                                    "--model", model, "--pack", pack, "--db", db)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all" * 10)
    for gguf in (empty, junk):
        assert "GGUF" in fails("inspect", "--model", gguf, "--pack", "")
    assert "at most 1000" in fails("inspect", "--model", model, "--pack", "",
                                   "--sae", "gpt2-small-res-jb:blocks.{0..2000000}.hook_resid_pre")
    assert db.read_bytes() == before


def test_a_damaged_row_is_named_and_the_rest_is_shown(tmp_path):
    db = tmp_path / "s.db"
    ok("session", "new", "s", "--db", db)
    store = Store(db)
    prompt_id = store.add_prompt(1, "intact prompt", [1, 2])
    store.add_completion(prompt_id, "intact completion", [3], seed=0, params={})
    damaged = store.add_completion(prompt_id, "damaged completion", [4], seed=1, params={})
    run_id = store.start_run(1, "flow", {"k": 1})
    store.finish_run(run_id, {"x": 1}, {"headline": "h"})
    with store.db.conn:
        store.db.execute("UPDATE runs SET summary = '{broken' WHERE id = ?", [run_id])
        store.db.execute("UPDATE completions SET token_ids = '[1,' WHERE id = ?", [damaged])
    store.close()
    from typer.testing import CliRunner

    from auditui.cli import app

    for args in (["session", "show"], ["report"], ["report", "--format", "json"]):
        result = CliRunner().invoke(app, [*args, "--db", str(db)])
        assert result.exit_code == 0, result.output
        assert "intact completion" in result.stdout and "damaged completion" in result.stdout
        warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
        assert f"warning: runs row {run_id}: summary is damaged (not JSON); shown as empty" in warnings
        assert f"warning: completions row {damaged}: token_ids is damaged (not JSON); shown as empty" in warnings

"""`auditui session|sample|label|report` on tiny models; every bad input is one line with exit code 2."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from typer.testing import CliRunner

from auditui.cli import app
from auditui.store import Store
from auditui.text import visible

runner = CliRunner()


def ok(*args: object) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return result.stdout


def fails(*args: object) -> str:
    """Exit code 2 and exactly one `error:` line (progress lines start with '...')."""
    result = runner.invoke(app, [str(a) for a in args])
    lines = [line for line in result.stderr.splitlines() if not line.startswith("...")]
    assert result.exit_code == 2, (args, result.stdout, result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), (args, result.stderr)
    return lines[0]


def test_session_new_list_show_rename_delete(tmp_path):
    db = tmp_path / "s.db"
    assert "session new NAME" in fails("session", "show", "--db", db)
    first = json.loads(ok("session", "new", "first", "--db", db, "--json"))
    second = json.loads(ok("session", "new", "second", "--db", db, "--json"))
    listed = json.loads(ok("session", "list", "--db", db, "--json"))
    assert [s["id"] for s in listed] == [second["id"], first["id"]]  # most recent first
    assert "second" in ok("session", "list", "--db", db)
    shown = json.loads(ok("session", "show", "--db", db, "--json"))
    assert shown["session"]["id"] == second["id"] and shown["prompts"] == []
    assert json.loads(ok("session", "show", first["id"], "--db", db, "--json"))["session"]["name"] == "first"
    assert "renamed session" in ok("session", "rename", first["id"], "alpha", "--db", db)
    assert "--yes" in fails("session", "delete", first["id"], "--db", db)
    assert len(Store(db).sessions()) == 2
    assert "deleted" in ok("session", "delete", first["id"], "--yes", "--db", db)
    assert [s["name"] for s in Store(db).sessions()] == ["second"]
    assert "no session" in fails("session", "show", first["id"], "--db", db)
    assert "needs a name" in fails("session", "rename", second["id"], "  ", "--db", db)


def test_sample_label_and_report_on_a_tiny_model(tmp_path, tiny_models, tiny_packs):
    db, model = tmp_path / "s.db", tiny_models["llama"]
    ok("session", "new", "audit", "--db", db)
    args = ["sample", "--db", db, "--model", model, "--pack", tiny_packs["llama"], "--prompt", "<script>[/INST]",
            "-n", 4, "--seed", 11, "--batch-size", 2, "--max-new-tokens", 8, "--temperature", 0.8, "--json"]
    first = json.loads(ok(*args))
    assert [c["seed"] for c in first["completions"]] == [11, 12, 13, 14]
    assert all(len(c["token_ids"]) <= 8 for c in first["completions"])
    again = json.loads(ok(*args))  # a new prompt row, the same completions
    assert [c["text"] for c in again["completions"]] == [c["text"] for c in first["completions"]]
    assert again["prompt_id"] != first["prompt_id"]

    store = Store(db)
    rows = store.completions(first["session_id"])
    assert len(rows) == 8 and {r["pack_id"] for r in rows} == {"tiny"} and {r["model_id"] for r in rows} == {
        "tiny-llama"}
    assert rows[0]["params"] == {"temperature": 0.8, "top_p": 0.95, "max_new_tokens": 8, "chat": True,
                                 "system": None}
    assert store.prompt(first["prompt_id"])["text"] == "<script>[/INST]"

    a, b = (c["id"] for c in first["completions"][:2])
    assert json.loads(ok("label", a, "pos", "--db", db, "--json"))["pairs"] == []
    pairs = json.loads(ok("label", b, "neg", "--db", db, "--json"))["pairs"]
    assert pairs == [{"prompt_id": first["prompt_id"], "positive": [a], "negative": [b]}]
    assert "unlabelled" in ok("label", b, "none", "--db", db)
    assert store.pairs(first["session_id"]) == []
    ok("label", b, "-", "--db", db)

    out = tmp_path / "report.html"
    ok("report", "--db", db, "--format", "html", "--out", out)
    assert "&lt;script&gt;[/INST]" in out.read_text() and "<script" not in out.read_text()
    report = json.loads(ok("report", "--db", db, "--format", "json"))
    assert [c["label"] for c in report["prompts"][0]["completions"][:2]] == ["positive", "negative"]
    assert "### Completion" in ok("report", "--db", db)
    ok("report", "--db", db, "--format", "md", "--out", tmp_path / "report.md")
    md = (tmp_path / "report.md").read_bytes().decode()
    assert all(visible(c["text"]) in md for c in first["completions"])  # controls shown as \x.. escapes
    assert not re.search("[\x00-\x08\x0b-\x1f\x7f-\x9f]", md)
    human = ok(*args[:-1])
    assert "seed 11" in human and "\x1b" not in human


def test_sample_raw_system_and_session_option(tmp_path, tiny_models, loaded):
    db, model = tmp_path / "s.db", tiny_models["gpt2"]
    target = json.loads(ok("session", "new", "target", "--db", db, "--json"))["id"]
    ok("session", "new", "other", "--db", db)
    raw = json.loads(ok("sample", "--db", db, "--model", model, "--pack", "", "--prompt", "plain", "-n", 2,
                        "--max-new-tokens", 4, "--raw", "--session", target, "--json"))
    assert raw["session_id"] == target
    store = Store(db)
    prompt = store.prompt(raw["prompt_id"])
    assert prompt["chat"] == 0 and prompt["prompt_ids"] == loaded("gpt2").prompt_ids("plain", chat=False)
    latest = json.loads(ok("session", "new", "latest", "--db", db, "--json"))["id"]
    chat = json.loads(ok("sample", "--db", db, "--model", model, "--pack", "", "--prompt", "hi", "-n", 1,
                         "--max-new-tokens", 4, "--system", "Be brief.", "--temperature", 0, "--json"))
    assert chat["session_id"] == latest  # without --session: the most recently used session
    assert store.prompt(chat["prompt_id"])["system"] == "Be brief."
    assert store.completion(chat["completions"][0]["id"])["pack_id"] == ""


def test_bad_inputs_are_one_line_with_exit_code_2(tmp_path, tiny_models):
    db, model = tmp_path / "s.db", str(tiny_models["gpt2"])
    sample = ["sample", "--db", db, "--model", model, "--pack", "", "--prompt", "hi"]
    assert "session new" in fails(*sample)
    session_id = json.loads(ok("session", "new", "s", "--db", db, "--json"))["id"]
    other = json.loads(ok("session", "new", "other", "--db", db, "--json"))["id"]
    completion = json.loads(ok(*sample, "-n", 1, "--max-new-tokens", 2, "--session", session_id,
                               "--json"))["completions"][0]["id"]
    cases = {
        "must be >= 1": [*sample, "-n", 0],
        "temperature must be": [*sample, "--temperature", -1],
        "top-p must be": [*sample, "--top-p", 0],
        "max new tokens must be": [*sample, "--max-new-tokens", 0],
        "the seed must be": [*sample, "--seed", -1],
        "system prompt needs": [*sample, "--raw", "--system", "x"],
        "fit in the model's context": ["sample", "--db", db, "--model", model, "--pack", "", "--prompt", "x" * 600],
        "model directory not found": ["sample", "--db", db, "--model", tmp_path / "nope", "--prompt", "hi"],
        "no session 99": [*sample, "--session", 99],
        "no completion 99": ["label", 99, "pos", "--db", db],
        "unknown label": ["label", completion, "maybe", "--db", db],
        f"belongs to session {session_id}": ["label", completion, "pos", "--session", other, "--db", db],
        "unknown report format": ["report", "--format", "pdf", "--db", db],
        "cannot write": ["report", "--out", tmp_path / "missing" / "r.md", "--db", db],
    }
    for expected, args in cases.items():
        assert expected in fails(*args), args
    assert len(Store(db).completions()) == 1  # nothing was stored by a refused request


def test_real_entry_point_error_is_one_line(tmp_path):
    db = tmp_path / "s.db"
    for args in (["label", "5", "pos", "--db", str(db)], ["sample", "--db", str(db), "--prompt", "x", "-n", "0"]):
        proc = subprocess.run([sys.executable, "-m", "auditui", *args], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert proc.stderr.startswith("error: ") and len(proc.stderr.splitlines()) == 1, proc.stderr

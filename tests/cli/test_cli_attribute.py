"""`auditui attribute` on tiny fixtures: JSON round trip into the session DB, one-line refusals."""

from __future__ import annotations

import json

import pytest
from helpers import labelled_session
from typer.testing import CliRunner

from auditui.cli import app
from auditui.engine.model import load_model
from auditui.store.database import Store
from auditui.workflows.attribute import attribution_run

runner = CliRunner()
SPEC = [("Is the sky blue?", [("Yes, it is.", "positive"), ("No way!", "negative")]),
        ("Tell me a joke", [("Why did the chicken", "negative"), ("No.", "positive"), ("Knock", "positive")])]


@pytest.fixture
def session_db(tmp_path, tiny_models):
    lm = load_model(str(tiny_models["llama"]), device="cpu", dtype="float32")
    db = tmp_path / "s.db"
    store = Store(db)
    labelled_session(store, lm, SPEC)
    store.close()
    return db


def _args(db, tiny_models, tiny_packs, *extra: str) -> list[str]:
    return ["attribute", "--db", str(db), "--model", str(tiny_models["llama"]), "--pack", str(tiny_packs["llama"]),
            "--device", "cpu", *extra]


def test_attribute_json_round_trip(session_db, tiny_models, tiny_packs):
    result = runner.invoke(app, _args(session_db, tiny_models, tiny_packs, "--site", "1/resid_post",
                                      "--site", "2/mlp_out", "--top", "7", "--check", "2",
                                      "--positions", "all", "--json"))
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    run = attribution_run(Store(session_db), data["run_id"])
    assert run["kind"] == "attribution" and run["status"] == data["status"] == "done"
    assert run["result"] == data["result"] and run["summary"] == data["summary"]
    assert run["params"]["sites"] == ["1/resid_post", "2/mlp_out"] and run["params"]["positions"] == "all"
    rows = run["result"]["rows"]
    assert len(rows) == 14 and {r["site"] for r in rows} == {"1/resid_post", "2/mlp_out"}
    assert sorted(r["rank"] for r in rows if r["exact"] is not None) == [1, 1, 2, 2]
    assert run["result"]["n_prompts"] == 2 and run["result"]["n_completions"] == 5
    assert data["summary"]["headline"].startswith("Δ-attribution over 2 prompts")
    assert Store(session_db).runs(data["session_id"], "reference_mean")[0]["status"] == "done"


def test_attribute_human_output(session_db, tiny_models, tiny_packs):
    result = runner.invoke(app, _args(session_db, tiny_models, tiny_packs, "--site", "1/mlp_out", "--top", "3"))
    assert result.exit_code == 0, result.output
    assert "Δ-attribution over 2 prompts" in result.stdout and "logit lens" in result.stdout


def test_attribute_refusals_are_one_line(tmp_path, session_db, tiny_models, tiny_packs):
    store = Store(session_db)
    labelled = str(store.latest_session_id())
    unlabelled = store.create_session("unlabelled")
    prompt_id = store.add_prompt(unlabelled, "Hi", prompt_ids=[72, 105])
    store.add_completion(prompt_id, "Yo", [89, 111], 0, {})
    cases = {
        "no prompt has both a positive and a negative completion; label some": ["--session", str(unlabelled)],
        "no SAE for site 9/resid_post": ["--session", labelled, "--site", "9/resid_post"],
        "unknown positions 'middle'": ["--session", labelled, "--positions", "middle"],
        "reference text file not found": ["--session", labelled, "--reference", str(tmp_path / "missing.txt")],
    }
    for message, extra in cases.items():
        result = runner.invoke(app, _args(session_db, tiny_models, tiny_packs, *extra, "--json"))
        assert result.exit_code == 2, (message, result.output)
        lines = [line for line in result.stderr.splitlines() if not line.startswith("...")]
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
        assert result.stdout == ""
    assert store.runs(unlabelled, "attribution") == []

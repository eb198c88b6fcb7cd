"""`auditui judge grade|serve|rubrics`, `auditui sweep`, `auditui validate` on tiny fixtures against real
loopback servers: JSON round trips, the cache counted at the server, SVG figures, one-line refusals,
and the offline judge served by llm-katan's transformers backend over a local model directory."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest
from helpers import labelled_session
from judge_servers import Scripted, free_port, katan, requests
from typer.testing import CliRunner

from auditui.cli import app
from auditui.engine.model import load_model
from auditui.store.database import Store

runner = CliRunner()
SPEC = [("Is the sky blue?", [('Yes. {"behaviour": 5, "coherence": 4}', "positive"), ("No way!", "negative")]),
        ("Tell me a joke", [("Why did the chicken", "negative"), ('{"behaviour": 0, "coherence": 1}', "positive")])]


def rule(messages: list[dict]) -> str:
    text = messages[-1]["content"]
    return json.dumps({"behaviour": len(text) % 6, "coherence": 5})


@pytest.fixture
def session_db(tmp_path, tiny_models):
    lm = load_model(str(tiny_models["llama"]), device="cpu", dtype="float32")
    db = tmp_path / "s.db"
    store = Store(db)
    labelled_session(store, lm, SPEC)
    store.close()
    return db


def _common(db: Path, tiny_models, tiny_packs=None) -> list[str]:
    return ["--db", str(db), "--model", str(tiny_models["llama"]), "--device", "cpu",
            *(["--pack", str(tiny_packs["llama"])] if tiny_packs else [])]


def test_grade_json_then_cached_and_labels(session_db, tiny_models, tmp_path):
    with katan(tmp_path) as url:
        args = ["judge", "grade", *_common(session_db, tiny_models), "--judge-url", url, "--judge-model", "echo-judge",
                "--subject", "a rating", "--label-threshold", "0.5", "--json"]
        first = runner.invoke(app, args)
        assert first.exit_code == 0, first.output
        second = runner.invoke(app, args)
        assert requests(url) == 4
    data, again = json.loads(first.stdout), json.loads(second.stdout)
    assert [r["status"] for r in data["result"]["rows"]] == ["scored", "unscored", "unscored", "scored"]
    assert data["result"]["failure_rate"] == 0.5 and again["result"]["counts"]["cached"] == 4
    assert data["result"]["labels"]["agreement_with_person"] == {"n": 2, "agree": 0.5, "kappa": 0.0}
    assert Store(session_db).run(data["run_id"])["result"] == data["result"]
    human = runner.invoke(app, args[:-1])
    assert "judge echo-judge" in human.stdout and "unscored or failed 50%" in human.stdout


def test_sweep_and_validate_json_with_svg_figures(session_db, tiny_models, tiny_packs, tmp_path):
    plot = tmp_path / "sweep.svg"
    with Scripted([rule]) as server:
        judge = ["--judge-url", server.url, "--judge-model", "rule", "--subject", "length"]
        out = runner.invoke(app, ["sweep", *_common(session_db, tiny_models, tiny_packs), *judge,
                                  "--features", "2/resid_post/5:add:1", "--prompt", "Once", "--strength", "10",
                                  "--strength", "30", "-n", "2", "--band", "2", "--max-new-tokens", "4", "--seed", "1",
                                  "--plot", str(plot), "--json"])
        assert out.exit_code == 0, out.output
        attr = runner.invoke(app, ["attribute", *_common(session_db, tiny_models, tiny_packs), "--site", "2/resid_post",
                                   "--top", "2", "--json"])
        attr_run = json.loads(attr.stdout)["run_id"]
        check = runner.invoke(app, ["validate", *_common(session_db, tiny_models, tiny_packs), *judge,
                                    "--from-attribution", str(attr_run), "--prompt", "Once", "--k", "2", "-n", "2",
                                    "--band", "2", "--max-new-tokens", "4", "--plot", str(tmp_path / "v.svg"), "--json"])
        assert check.exit_code == 0, check.output
    data = json.loads(out.stdout)
    assert data["status"] == "done" and data["result"]["strengths"] == [0.0, 10.0, 30.0]
    assert len(data["result"]["completion_ids"]) == 2 * (1 + 2 * 3)
    for svg in (plot, tmp_path / "v.svg"):
        text = svg.read_text()
        assert text.startswith("<!-- auditui figure -->")
        ElementTree.fromstring(text.split("\n", 1)[1])  # well-formed SVG
        assert "random latents" in text
    assert json.loads(check.stdout)["result"]["leaving_band"]["attribution"]["latents"] == 2
    again = runner.invoke(app, ["sweep", *_common(session_db, tiny_models, tiny_packs), *judge, "--features",
                                "2/resid_post/5:add:1", "--prompt", "Once", "--plot", str(session_db)])
    assert again.exit_code == 2 and "session database" in again.stderr


@pytest.mark.parametrize(("extra", "message"), [
    (["judge", "grade", "--judge-url", "http://127.0.0.1:9/v1", "--judge-model", "m"], "needs --subject"),
    (["judge", "grade", "--subject", "x", "--judge-model", "m"], "judge URL"),
    (["judge", "grade", "--subject", "x", "--judge-url", "http://127.0.0.1:9/v1"], "judge model"),
    (["judge", "grade", "--subject", "x", "--rubric", "nope"], "no rubric"),
    (["sweep", "--features", "2/resid_post/5:add:1", "--prompt", "Hi", "--subject", "x", "--judge-url",
      "http://127.0.0.1:9/v1", "--judge-model", "m", "--strength", "0"], "other than 0"),
    (["validate", "--from-attribution", "1", "--prompt", "Hi", "--subject", "x", "--judge-url",
      "http://127.0.0.1:9/v1", "--judge-model", "m", "--k", "0"], "k is"),
])
def test_refusals_are_one_line_and_leave_the_db_alone(session_db, tiny_models, extra, message):
    before = session_db.read_bytes()
    out = runner.invoke(app, [*extra, "--db", str(session_db), "--model", str(tiny_models["llama"])])
    assert out.exit_code == 2 and message in out.stderr and out.stderr.count("\n") == 1, out.output
    assert session_db.read_bytes() == before


def test_rubrics_lists_builtin_and_user_rubrics(tmp_path, monkeypatch):
    from auditui.config import config_file

    folder = config_file().parent / "rubrics"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "mine.toml").write_text('name = "mine"\ndescription = "my own"\nsystem = "s"\nuser = "{text}"\n'
                                      '[scores.b]\nmin = 0\nmax = 1\n[derived]\nbehaviour = "b"\ncoherence = "b"\n')
    out = runner.invoke(app, ["judge", "rubrics", "--json"])
    names = [r["name"] for r in json.loads(out.stdout)]
    assert {"behaviour", "coherence-behaviour", "concept-fluency", "subjects", "mine"} <= set(names)


def test_judge_serve_is_a_real_local_judge_over_a_model_directory(tiny_models, session_db, tmp_path):
    """The offline judge: llm-katan's transformers backend over a local model, graded through it.
    A tiny random model answers nonsense: every text is unscored and counted, none becomes 0."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "auditui", "judge", "serve", "--model", str(tiny_models["llama"]),
                             "--port", str(port), "--judge-model", "tiny"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).read()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "judge serve did not start"
                time.sleep(0.3)
        out = runner.invoke(app, ["judge", "grade", *_common(session_db, tiny_models), "--judge-url",
                                  f"http://127.0.0.1:{port}/v1", "--judge-model", "tiny", "--subject", "x", "--json"])
    finally:
        proc.terminate()
        proc.wait(20)
    with pytest.raises(OSError):  # the server was this process: nothing is left listening
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
    assert out.exit_code == 0, out.output
    result = json.loads(out.stdout)["result"]
    assert result["counts"]["texts"] == 4 and result["judge"]["model"] == "tiny"
    assert all(r["status"] in ("unscored", "scored") for r in result["rows"])
    assert result["failure_rate"] == result["counts"]["unscored"] / 4

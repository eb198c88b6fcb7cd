"""`auditui heads scan|pair|align` on a tiny model + pack: JSON round trips equal the stored runs, bad
indices are one `error:` line with exit 2 and store nothing."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from auditui.cli import app
from auditui.engine.heads import Decomposition, DirectionAlignment, PairAlignment, Scan
from auditui.store.database import Store

runner = CliRunner()
TEXT = "Which heads attend for few reasons?"


def heads(tiny_models, tiny_packs, *args: str) -> list[str]:
    return ["heads", *args, "--model", str(tiny_models["qwen2"]), "--pack", str(tiny_packs["qwen2"])]


def fields(data: dict, kind: type) -> dict:
    return {key: value for key, value in data.items() if key in kind.__dataclass_fields__}


def run_json(args: list[str]) -> dict:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_scan_pair_align_json_round_trip(tiny_models, tiny_packs, tmp_path):
    db = tmp_path / "s.db"
    session = Store(db).create_session("heads")
    common = ["--db", str(db), "--session", str(session), "--json"]
    scan = run_json(heads(tiny_models, tiny_packs, "scan", "--text", TEXT, "--threshold", "0.2", "--top", "5",
                          "--per-head", "1", *common))
    parsed = Scan.from_dict(fields(scan, Scan))
    assert parsed.threshold == 0.2 and parsed.n_hits >= len(parsed.hits) >= 5 and len(scan["tokens"]) > 10
    assert [h.sparsity for h in parsed.hits] == sorted(h.sparsity for h in parsed.hits)
    run = Store(db).run(scan["run_id"])
    assert run["kind"] == "heads_scan" and run["result"] == {k: v for k, v in scan.items() if k != "run_id"}
    assert run["params"]["threshold"] == 0.2 and run["params"]["model"] == "tiny-qwen2"

    hit = parsed.hits[0]
    pair = run_json(heads(tiny_models, tiny_packs, "pair", "--text", TEXT, "--layer", str(hit.layer), "--head",
                          str(hit.head), "--query", str(hit.query), "--key", str(hit.key), *common))
    decomposition = Decomposition.from_dict(fields(pair, Decomposition))
    assert (decomposition.layer, decomposition.head, decomposition.query, decomposition.key) == (
        hit.layer, hit.head, hit.query, hit.key)
    assert sum(decomposition.terms) == pytest.approx(decomposition.relative, abs=1e-5)
    assert decomposition.sparsity == pytest.approx(hit.sparsity, abs=1e-6)
    assert len(pair["alignments"]) == min(3, len(decomposition.terms))
    assert PairAlignment.from_dict(fields(pair["alignments"][0], PairAlignment)).k == decomposition.ranked()[0]
    run = Store(db).run(pair["run_id"])
    assert run["kind"] == "heads_pair" and run["result"]["terms"] == pair["terms"]

    aligned = run_json(heads(tiny_models, tiny_packs, "align", "--layer", "2", "--head", "1", "--k", "3", *common))
    alignment = PairAlignment.from_dict(fields(aligned, PairAlignment))
    assert (alignment.layer, alignment.head, alignment.k) == (2, 1, 3) and aligned["site"] == "1/resid_post"
    assert len(alignment.query) == len(alignment.key) == 5 and set(aligned["labels"]) >= {
        str(m.latent) for m in alignment.query}
    feature = run_json(heads(tiny_models, tiny_packs, "align", "--feature", "1/resid_post/9", "--top", "4", *common))
    direction = DirectionAlignment.from_dict(fields(feature, DirectionAlignment))
    assert len(direction.matches) == 4 and feature["feature"] == "1/resid_post/9"
    assert [r["kind"] for r in Store(db).runs(session)] == ["heads_scan", "heads_pair", "heads_align", "heads_align"]

    human = runner.invoke(app, heads(tiny_models, tiny_packs, "pair", "--text", TEXT, "--layer", "0", "--head", "0",
                                     "--query", "-1", "--key", "3", "--no-save", "--db", str(db)))
    assert human.exit_code == 0, human.output
    assert "head L0H0, query" in human.stdout and "query latents" in human.stdout and "stored as" not in human.stderr
    assert len(Store(db).runs(session)) == 4


def test_bad_indices_are_one_error_line_and_store_nothing(tiny_models, tiny_packs, tmp_path):
    db = tmp_path / "s.db"
    session = Store(db).create_session("bad")
    pair = ["pair", "--text", TEXT]
    cases = [
        ([*pair, "--layer", "3", "--head", "0", "--query", "5", "--key", "1"], "layer 3 is out of range"),
        ([*pair, "--layer", "0", "--head", "4", "--query", "5", "--key", "1"], "head 4 is out of range"),
        ([*pair, "--layer", "0", "--head", "0", "--query", "999", "--key", "1"], "query token 999 is outside"),
        ([*pair, "--layer", "0", "--head", "0", "--query", "4", "--key", "9"], "key 9 comes after query 4"),
        ([*pair, "--layer", "0", "--head", "0", "--query", "0", "--key", "0"], "query must be token 1 or later"),
        (["scan", "--text", TEXT, "--threshold", "0"], "threshold must be in (0, 1]"),
        (["scan", "--text", TEXT, "--threshold", "nan"], "threshold must be in (0, 1]"),
        (["scan", "--text", "  "], "give a text"),
        (["align", "--layer", "0", "--head", "0", "--k", "16"], "singular index k 16 is out of range"),
        (["align", "--layer", "0"], "give a layer and a head"),
        (["align", "--feature", "1/resid_post/500"], "out of range for 1/resid_post"),
        (["align", "--feature", "1/resid_post/3", "--layer", "1", "--head", "0"], "not both"),
        (["pair", "--layer", "0", "--head", "0", "--query", "1", "--key", "0"], "--text"),
    ]
    for args, message in cases:
        result = runner.invoke(app, heads(tiny_models, tiny_packs, *args, "--db", str(db)))
        assert result.exit_code == 2, (args, result.output)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], (args, result.stderr)
        assert [line for line in result.stderr.splitlines() if not line.startswith("...")] == errors, result.stderr
    assert Store(db).runs(session) == []
    empty = tmp_path / "empty.db"
    result = runner.invoke(app, heads(tiny_models, tiny_packs, "scan", "--text", TEXT, "--db", str(empty)))
    assert result.exit_code == 0 and "not stored" in result.stderr and "heads scan of" in result.stdout

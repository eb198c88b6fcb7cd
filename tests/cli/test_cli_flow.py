"""`auditui flow` on tiny fixtures: JSON / DOT / Mermaid parse, runs are stored, errors are one line."""

from __future__ import annotations

import json
import re

import torch
from typer.testing import CliRunner

from auditui.cli import app
from auditui.engine.model import load_model
from auditui.engine.saes import SAEBank
from auditui.engine.sites import Site, SiteHooks
from auditui.store.database import Store

runner = CliRunner()
TEXT = "Where does this feature come from?"


def flow_args(tiny_models, tiny_packs, *extra: str) -> list[str]:
    return ["flow", "--model", str(tiny_models["qwen2"]), "--pack", str(tiny_packs["qwen2"]), *extra]


def test_flow_json_dot_and_mermaid_describe_the_same_graph(tiny_models, tiny_packs):
    args = flow_args(tiny_models, tiny_packs, "--feature", "1/resid_post/5", "--k", "2", "--t-res", "0.2")
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    graph = json.loads(result.stdout)
    assert graph["root"] == "1/resid_post/5" and graph["k"] == 2 and graph["thresholds"]["cut"] == 0.2
    ids = {node["id"] for node in graph["nodes"]}
    assert "1/resid_post/5" in ids and graph["edges"]
    assert all(e["source"] in ids and e["target"] in ids for e in graph["edges"])
    assert {n["role"] for n in graph["nodes"]} >= {"res", "mlp"}

    dot = runner.invoke(app, [*args, "--dot"])
    assert dot.exit_code == 0, dot.output
    assert dot.stdout.startswith('digraph "flow 1/resid_post/5" {') and dot.stdout.rstrip().endswith("}")
    declared = set(re.findall(r'^  "([^"]+)" \[shape=', dot.stdout, flags=re.M))
    linked = re.findall(r'^  "([^"]+)" -> "([^"]+)" \[label="([0-9.-]+)"\];$', dot.stdout, flags=re.M)
    assert declared == ids
    assert sorted(linked) == sorted((e["source"], e["target"], f"{e['score']:.2f}") for e in graph["edges"])

    mermaid = runner.invoke(app, [*args, "--mermaid"])
    assert mermaid.exit_code == 0, mermaid.output
    lines = mermaid.stdout.splitlines()
    assert lines[0] == "flowchart TB"
    names = dict(re.findall(r'^  (n\d+)[\[\(\{]+"([^<"]+)<br/>', mermaid.stdout, flags=re.M))
    assert set(names.values()) == ids
    arrows = re.findall(r"^  (n\d+) -->\|([0-9.-]+)\| (n\d+)$", mermaid.stdout, flags=re.M)
    assert sorted((names[a], names[b]) for a, _, b in arrows) == sorted((e["source"], e["target"])
                                                                        for e in graph["edges"])


def test_flow_human_table_and_stored_run(tiny_models, tiny_packs, tmp_path):
    db = tmp_path / "s.db"
    store = Store(db)
    session = store.create_session("flows")
    result = runner.invoke(app, flow_args(tiny_models, tiny_packs, "--feature", "2/resid_post/7", "--db", str(db),
                                          "--session", str(session)))
    assert result.exit_code == 0, result.output
    assert "flow graph of 2/resid_post/7" in result.stdout and "s^(R)" in result.stdout
    runs = store.runs(session, "flow")
    assert len(runs) == 1 and runs[0]["status"] == "done"
    assert runs[0]["result"]["root"] == "2/resid_post/7" and runs[0]["summary"]["headline"].startswith("flow graph")
    assert runs[0]["params"]["model"] == "tiny-qwen2"
    damaged = tmp_path / "notes.db"
    damaged.write_bytes(b"these are my notes, not a database\n" * 200)
    bad = runner.invoke(app, flow_args(tiny_models, tiny_packs, "--feature", "2/resid_post/7", "--db", str(damaged)))
    assert bad.exit_code == 2 and bad.stderr.splitlines()[-1].startswith(f"error: {damaged} is not a usable")
    assert [line for line in bad.stderr.splitlines() if not line.startswith("...")] == [bad.stderr.splitlines()[-1]]


def test_flow_errors_are_one_line(tiny_models, tiny_packs):
    for extra, message in [(["--feature", "1/resid_post"], "cannot read feature"),
                           (["--feature", "1/resid_post/4096"], "out of range"),
                           (["--feature", "1/attn_z/3"], "no SAE at 1/attn_z"),
                           (["--feature", "1/mlp_out/3"], "not a residual feature"),
                           (["--feature", "1/resid_post/3", "--direction", "up"], "direction must be"),
                           (["--feature", "1/resid_post/3", "--json", "--dot"], "choose one of"),
                           ([], "give a feature")]:
        result = runner.invoke(app, flow_args(tiny_models, tiny_packs, *extra))
        assert result.exit_code == 2, (extra, result.output)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], result.stderr


def test_flow_deactivate_json_and_tables(tiny_models, tiny_packs, tmp_path):
    lm = load_model(str(tiny_models["qwen2"]), device="cpu", dtype="float32")
    bank = SAEBank.from_specs([str(tiny_packs["qwen2"])], tmp_path).attach(lm)
    site = Site(2, "resid_post")
    ids = lm.prompt_ids(TEXT, chat=False)
    with torch.no_grad(), SiteHooks(lm.model, reads=[site]) as hooks:
        lm.model(torch.tensor([ids]))
    latent = int(bank.sae(site).encode(hooks.acts[site][0, -1]).argmax())
    db = tmp_path / "s.db"
    session = Store(db).create_session("deactivations")
    result = runner.invoke(app, ["flow", "deactivate", "--model", str(tiny_models["qwen2"]), "--pack",
                                 str(tiny_packs["qwen2"]), "--feature", f"2/resid_post/{latent}", "--text", TEXT,
                                 "--token", "-1", "--seed", "3", "--json", "--db", str(db)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["active"] and data["token"] == len(ids) - 1 and data["z_old"] > 0
    run = Store(db).run(data["run_id"])
    assert run["kind"] == "deactivation" and run["session_id"] == session and run["result"]["rows"] == data["rows"]
    assert run["params"] == {"model": "tiny-qwen2", "pack": bank.pack.name, "feature": f"2/resid_post/{latent}",
                             "text": TEXT, "chat": False, "token": len(ids) - 1, "r": 0.0, "seed": 3}
    graph = runner.invoke(app, flow_args(tiny_models, tiny_packs, "--feature", f"2/resid_post/{latent}", "--save",
                                         "--db", str(db), "--json"))
    flow_params = Store(db).run(json.loads(graph.stdout)["run_id"])["params"]
    assert {key: flow_params[key] for key in ("model", "pack")} == {"model": "tiny-qwen2", "pack": bank.pack.name}
    assert {row["method"] for row in data["rows"]} == {"top1", "top5", "random"}
    assert all(abs(row["change"] - (1 - row["z_new"] / data["z_old"])) < 1e-9 for row in data["rows"])
    bad = runner.invoke(app, ["flow", "deactivate", "--model", str(tiny_models["qwen2"]), "--pack",
                              str(tiny_packs["qwen2"]), "--feature", "2/resid_post/1", "--text", TEXT,
                              "--token", "500"])
    assert bad.exit_code == 2 and "outside the text" in bad.stderr
    codes = bank.sae(site).encode(hooks.acts[site][0, -1])
    silent = int((codes == 0).nonzero()[0, 0])  # a TopK SAE: most latents are silent at a token
    before = len(Store(db).runs(session))
    inactive = runner.invoke(app, ["flow", "deactivate", "--model", str(tiny_models["qwen2"]), "--pack",
                                   str(tiny_packs["qwen2"]), "--feature", f"2/resid_post/{silent}", "--text", TEXT,
                                   "--db", str(db)])
    assert inactive.exit_code == 2 and "is inactive at token" in inactive.stderr  # refused, nothing stored
    assert len(Store(db).runs(session)) == before

    tables = runner.invoke(app, ["flow", "tables", "--model", str(tiny_models["qwen2"]), "--pack",
                                 str(tiny_packs["qwen2"]), "--json"])
    assert tables.exit_code == 0, tables.output
    assert json.loads(tables.stdout)["tables"] == 12  # backward R/M/A and forward R of each residual site that has them

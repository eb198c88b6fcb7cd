"""Steering as a run: plans from every source, steered completions stored apart from the audit data."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import attribution, tiny_audit
from typer.testing import CliRunner

from auditui.cli import app as cli
from auditui.engine.sampling import SamplingParams
from auditui.engine.sites import Site
from auditui.errors import AuditError
from auditui.workflows.flow import FlowRequest, flow_graph, record_flow
from auditui.workflows.reference import session_sequences
from auditui.workflows.steer import PlanSource, SteerRequest, plan_for, steer

SPEC = [("Is the sky blue?", [("Yes, it is.", "positive"), ("No way!", "negative")]),
        ("Tell me a joke", [("No.", "positive"), ("Knock knock", "negative")])]
GREEDY = SamplingParams(temperature=0, max_new_tokens=6, chat=False)


@pytest.fixture
def setup(tmp_path, tiny_models, tiny_packs):
    return tiny_audit(tmp_path, tiny_models["llama"], tiny_packs["llama"], SPEC)


def test_steered_completions_are_stored_with_their_plan_and_kept_out_of_the_audit(setup):
    store, engine, session_id = setup
    pairs_before, texts_before = store.pairs(session_id), session_sequences(store, session_id)
    plan = plan_for(store, session_id, PlanSource(typed="2/resid_post/5:add:1, 1/mlp_out/3:add:1"))
    run_id = steer(store, engine, session_id, SteerRequest(plan, "Once upon a time", (0.0, 40.0), 2, GREEDY, seed=3))
    run = store.run(run_id)
    assert run["kind"] == "steer" and run["status"] == "done" and run["provenance"]["saes"].keys() == {
        "1/mlp_out", "2/resid_post"}
    result = run["result"]
    rows = store.completions_by_ids(result["completion_ids"])
    strengths = [s["strength"] for s in result["samples"]]
    assert strengths == [None, None, 0.0, 0.0, 40.0, 40.0] and [r["seed"] for r in rows] == [3, 4] * 3
    assert [r["intervention"] is None for r in rows] == [True, True, False, False, False, False]
    assert rows[4]["intervention"] == {"plan": plan.to_dict(), "strength": 40.0, "run_id": run_id}
    # strength 0 adds nothing: the same greedy tokens as unsteered; a large one changes them
    assert [r["token_ids"] for r in rows[2:4]] == [r["token_ids"] for r in rows[:2]]
    assert [r["token_ids"] for r in rows[4:]] != [r["token_ids"] for r in rows[:2]]
    for row in rows[4:]:
        store.set_label(row["id"], "positive")
    store.set_label(rows[0]["id"], "negative")
    assert store.pairs(session_id) == pairs_before  # a steered completion never forms a pair
    unsteered = [s for s in session_sequences(store, session_id)]
    assert len(unsteered) == len(texts_before) + 2  # the unsteered rows join the session's texts, steered never
    assert all(s.completion_id not in {r["id"] for r in rows[2:]} for s in unsteered)


def test_plans_from_flow_attribution_and_the_steering_set(setup):
    store, engine, session_id = setup
    graph = flow_graph(engine, FlowRequest("2/resid_post/5", t_res=-1, t_module=-1))
    flow_plan = plan_for(store, session_id, PlanSource(flow_run=record_flow(store, engine, session_id, graph)),
                         op="add", coefficient=2.0)
    chosen = {str(f.feature) for f in flow_plan.features}  # the appendix-B cuts: t^(R) 0.5, modules 0.15
    assert "2/resid_post/5" in chosen and chosen <= {n.id for n in graph.ordered_nodes()}
    assert all(f.coefficient == 2.0 and f.op == "add" for f in flow_plan.features) and flow_plan.span[1] == 2
    run_id = attribution(engine, store, session_id, [Site(2, "resid_post")], top_k=5)
    top = plan_for(store, session_id, PlanSource(attribution_run=run_id, top=3))
    rows = sorted(store.run(run_id)["result"]["rows"], key=lambda r: -r["delta_attr"])[:3]
    assert [(str(f.feature), f.op, f.coefficient) for f in top.features] == [
        (f"{r['site']}/{r['latent']}", "rescale", 0.0) for r in rows]
    with pytest.raises(AuditError, match="steering set is empty"):
        plan_for(store, session_id, PlanSource(steering_set=True))
    store.add_feature(session_id, "1/mlp_out", 7, "test")
    assert [str(f.feature) for f in plan_for(store, session_id, PlanSource(steering_set=True)).features] == ["1/mlp_out/7"]
    with pytest.raises(AuditError, match="exactly one plan source"):
        plan_for(store, session_id, PlanSource(typed="2/resid_post/5:add:1", steering_set=True))
    with pytest.raises(AuditError, match="not a finished flow run"):
        plan_for(store, session_id, PlanSource(flow_run=run_id))


def test_mean_ablation_and_folding_read_the_session(setup):
    store, engine, session_id = setup
    plan = plan_for(store, session_id, PlanSource(typed="2/resid_post/5:mean_ablate:1"), fold=True)
    run = store.run(steer(store, engine, session_id, SteerRequest(plan, "Hi", (1.0,), 1, GREEDY, seed=0)))
    assert run["status"] == "done" and len(run["result"]["notes"]) == 1  # mean-ablation; folding does not apply
    assert store.runs(session_id, "reference_mean")[-1]["status"] == "done"
    folded = plan_for(store, session_id, PlanSource(typed="2/resid_post/5:add:1"), fold=True)
    run = store.run(steer(store, engine, session_id, SteerRequest(folded, "Hi", (1.0,), 1, GREEDY, seed=0)))
    assert "folded" in " ".join(run["result"]["notes"])


def test_cli_steer_json_and_refusals(setup, tiny_models, tiny_packs, tmp_path):
    store, engine, session_id = setup
    plan_file = tmp_path / "plan.json"
    plan = plan_for(store, session_id, PlanSource(typed="2/resid_post/5:add:20"))
    plan_file.write_text(json.dumps(plan.to_dict()))
    common = ["--db", str(store.path), "--model", str(tiny_models["llama"]), "--pack", str(tiny_packs["llama"])]
    result = CliRunner().invoke(cli, ["steer", "--plan", str(plan_file), "--prompt", "Hello", "-n", "2",
                                      "--strength", "1", "--strength", "2", "--temperature", "0",
                                      "--max-new-tokens", "4", "--scope", "generated", *common, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["status"] == "done" and data["result"]["strengths"] == [1.0, 2.0]
    assert data["result"]["plan"]["scope"] == "generated" and len(data["result"]["samples"]) == 6
    steered = [s for s in data["result"]["samples"] if s["strength"] is not None]
    assert all(s["steered_prompt"] == [] and s["steered_generated"] for s in steered)
    runs_before = len(store.runs(session_id))
    for bad in (["--features", "2/resid_post/5:push:1"], ["--features", "9/resid_post/5:add:1"],
                ["--features", "2/resid_post/5:add:1", "--from-set"], ["--plan", str(tmp_path / "none.json")]):
        out = CliRunner().invoke(cli, ["steer", "--prompt", "Hello", *bad, *common])
        assert out.exit_code == 2 and out.stderr.strip().splitlines()[-1].startswith("error: "), (bad, out.output)
    assert len(store.runs(session_id)) == runs_before
    assert torch.is_grad_enabled()

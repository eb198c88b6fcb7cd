"""Steering plans: hand-edited hidden states for every op, schedule and layer selection; KV-cached
generation equals a no-cache recomputation; batched strengths equal rows run alone; builders and JSON."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_interventions import banks_fixture, codes, hand_edit, random_prompts, replacing, run, sae_arrays  # noqa: F401 (fixture)

from auditui.engine.flow import Edge, Feature, FlowGraph, Node, Thresholds
from auditui.engine.generation import generate_rows
from auditui.engine.interventions import OPS
from auditui.engine.sampling import SamplingParams, eos_ids, sample_completions
from auditui.engine.sites import Site, SiteHooks
from auditui.engine.steering import (
    PlanFeature,
    Schedule,
    SteeredRun,
    SteeringPlan,
    compile,
    parse_plan,
    plan_from_features,
    plan_from_flow,
    plan_interventions,
    plans_from_attribution,
    steered_samples,
    typical_activations,
)
from auditui.errors import AuditError

ORDER = {"resid_pre": 0, "attn_out": 1, "mlp_out": 2, "resid_post": 3}  # order of computation in a block
COEFFICIENTS = {"rescale": 0.5, "add": 3.0, "clamp": 1.5, "mean_ablate": 0.8}
SCHEDULES = {"constant": Schedule(), "linear": Schedule("linear", end=0.25),
             "exponential": Schedule("exponential", alpha=-0.4)}
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=6)


def hand_coefficient(schedule: Schedule, s: float, layer: int, start: int, stop: int) -> float:
    """Seed 001 appendix B, written out again."""
    if schedule.kind == "linear":
        k = (schedule.end - s) / (stop - start)
        return k * layer + (s - k * start)
    return s * math.exp(schedule.alpha * layer) if schedule.kind == "exponential" else s


def active_latents(bank, site: Site, h: torch.Tensor, n: int) -> list[int]:
    return torch.tensor(codes(bank, site, h, range(bank.sae(site).cfg.d_sae))).sum((0, 1)).topk(n).indices.tolist()


def demo_plan(lm, bank, ids: torch.Tensor, op: str, **options) -> SteeringPlan:
    """Features at layers 0, 1 (attention, MLP, residual: two latents there) and 2, active on ids."""
    sites = [Site(0, "resid_post"), Site(1, "attn_out"), Site(1, "mlp_out"), Site(1, "resid_post"), Site(2, "resid_post")]
    clean, _ = run(lm, ids, sites)
    features = []
    for i, site in enumerate(sites):
        for latent in active_latents(bank, site, clean[site], 2 if site == Site(1, "resid_post") else 1):
            features.append(PlanFeature(Feature(site, latent), op, COEFFICIENTS[op] * (1 + 0.25 * i)))
    return SteeringPlan(tuple(features), **options)


def hand_steered(lm, bank, ids: torch.Tensor, plan: SteeringPlan, strengths: list[float], means: dict):
    """Replay the model site by site in computation order, editing each site tensor by hand."""
    start, stop = plan.bounds
    target = stop if plan.layer is None else plan.layer
    chosen = [f for f in plan.features if (f.layer == target if plan.mode == "single" else start <= f.layer <= target)]
    by_site: dict[Site, list[PlanFeature]] = {}
    for f in chosen:
        by_site.setdefault(f.feature.site, []).append(f)
    replaced: dict = {}
    for site in sorted(by_site, key=lambda s: (s.layer, ORDER[s.kind])):
        acts, _ = run(lm, ids, [site], replaced)
        h = acts[site].double().numpy()  # [rows, seq, width]
        latents = [f.feature.latent for f in by_site[site]]
        raw, unit = sae_arrays(bank, site, latents)
        s = np.array([[hand_coefficient(plan.schedule, f.coefficient * sigma, f.layer, start, stop)
                       for f in by_site[site]] for sigma in strengths])  # [rows, k]
        baseline = unit @ means[site].double().numpy()
        (op,) = {f.op for f in by_site[site]}
        out = np.stack([hand_edit(op, h[row], codes(bank, site, acts[site][row], latents), raw, unit,
                                  np.repeat(s[row:row + 1], h.shape[1], axis=0), baseline)
                        for row in range(h.shape[0])])
        replaced[site] = replacing(torch.tensor(out, dtype=torch.float32))
    return run(lm, ids, list(replaced), replaced)


def site_means(lm, bank) -> dict[Site, torch.Tensor]:
    gen = torch.Generator().manual_seed(9)
    return {site: torch.randn(lm.d_model, generator=gen) for site in bank.sites}


# -- the plan's hooks against hand-edited hidden states ------------------------------------------
@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("op", OPS)
def test_plan_equals_hand_edited_hidden_states(family, loaded, banks, op, schedule):
    """Every op x schedule x (single layer 1 | cumulative 0..1): two rows with strengths 1 and 2."""
    lm, bank = loaded(family), banks(family)
    ids = torch.tensor(random_prompts(lm, (8, 8)))
    means = site_means(lm, bank)
    for mode in ("single", "cumulative"):
        plan = demo_plan(lm, bank, ids, op, mode=mode, layer=1, schedule=SCHEDULES[schedule])
        edits = compile(plan, bank, [1.0, 2.0], means=means)
        assert {s.layer for s in edits} == ({1} if mode == "single" else {0, 1})
        hand_acts, hand_logits = hand_steered(lm, bank, ids, plan, [1.0, 2.0], means)
        acts, logits = run(lm, ids, list(hand_acts), edits)
        for site in hand_acts:
            torch.testing.assert_close(acts[site], hand_acts[site], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(logits, hand_logits, atol=1e-4, rtol=1e-4)
        assert (logits - run(lm, ids, [])[1]).abs().max() > 1e-3


def test_folding_multiplies_add_and_clamp_by_the_typical_activation(loaded, banks):
    lm, bank = loaded("llama"), banks("llama")
    site = Site(1, "mlp_out")
    ids = torch.tensor(random_prompts(lm, (12, 12, 12)))
    x = run(lm, ids, [site])[0][site].reshape(-1, lm.d_model)
    typical = typical_activations(bank, site, x)
    a = codes(bank, site, x, range(bank.sae(site).cfg.d_sae))  # [n, d_sae]
    fired = a > 0
    by_hand = np.where(fired.any(0), (a * fired).sum(0) / np.maximum(fired.sum(0), 1), 0.0)
    np.testing.assert_allclose(typical.numpy(), by_hand, rtol=1e-5, atol=1e-6)
    latents = [int(j) for j in np.argsort(-by_hand)[:2]]
    raw, _ = sae_arrays(bank, site, latents)
    for op, factor in (("add", by_hand[latents] * np.linalg.norm(raw, axis=1)), ("clamp", by_hand[latents]),
                       ("rescale", np.ones(2))):
        plan = plan_from_features([(site, j) for j in latents], op, 2.0, fold=True)
        (iv,) = plan_interventions(plan, bank, [1.0, 3.0], typical={site: typical})
        np.testing.assert_allclose(np.array(iv.strength), np.outer([2.0, 6.0], factor), rtol=1e-5)
    with pytest.raises(AuditError, match="typical activations"):
        compile(plan_from_features([(site, 1)], "add", fold=True), bank)


# -- KV cache, left padding, rows with different strengths -----------------------------------------
def recompute_greedy(lm, bank, plan, prompt: list[int], strength: float | None, n_new: int, means) -> list[int]:
    """One row alone: no padding, no cache, the whole sequence recomputed for every new token."""
    row = torch.tensor([prompt])
    edits = compile(plan, bank, [strength], [len(prompt)], means=means)
    with torch.no_grad(), SiteHooks(lm.model, edits=edits):
        for _ in range(n_new):
            row = torch.cat([row, lm.model(row, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return row[0, len(prompt):].tolist()


@pytest.mark.parametrize("scope", ["all", "prompt", "generated"])
def test_kv_cached_steered_generation_equals_no_cache_recomputation(family, loaded, banks, scope):
    """Left-padded prompts of lengths 5, 11, 8 carrying strengths 1, 3 and none, every op in one plan."""
    lm, bank = loaded(family), banks(family)
    means = site_means(lm, bank)
    prompts = random_prompts(lm, (5, 11, 8))
    plan = parse_plan("0/resid_post/3:add:12, 1/mlp_out/7:rescale:0, 1/resid_post/11:clamp:2, "
                      "2/attn_out/5:mean_ablate:1, 2/resid_post/9:add:-12", scope=scope,
                      schedule=Schedule("exponential", alpha=-0.2))
    strengths = [1.0, 3.0, None]
    edits = compile(plan, bank, strengths, [len(p) for p in prompts], means=means)
    cached = generate_rows(lm, prompts, [0, 1, 2], GREEDY, edits)
    plain = generate_rows(lm, prompts, [0, 1, 2], GREEDY)
    eos = set(eos_ids(lm))
    for prompt, strength, sample, unsteered in zip(prompts, strengths, cached, plain, strict=True):
        alone = recompute_greedy(lm, bank, plan, prompt, strength, GREEDY.max_new_tokens, means)
        assert alone[:len(sample.token_ids)] == sample.token_ids
        assert sample.finish_reason == "length" or alone[len(sample.token_ids)] in eos
        if strength is None:
            assert sample.token_ids == unsteered.token_ids
    assert any(s.token_ids != u.token_ids for s, u in zip(cached, plain))


def test_rows_of_one_batch_with_different_strengths_equal_the_rows_run_one_by_one(loaded, banks):
    lm, bank = loaded("llama"), banks("llama")
    prompt = random_prompts(lm, (7,))[0]
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=8)
    plan = parse_plan("0/resid_post/3:add:1, 1/mlp_out/7:add:1, 2/resid_post/9:add:-1")
    grid = steered_samples(lm, bank, prompt, plan, [0.5, 4.0, 8.0], 2, params, seed=40)
    assert [s.strength for s in grid.samples] == [None, None, 0.5, 0.5, 4.0, 4.0, 8.0, 8.0]
    assert [s.seed for s in grid.samples] == [40, 41] * 4
    for strength in (0.5, 4.0, 8.0):
        alone = steered_samples(lm, bank, prompt, plan, [strength], 2, params, seed=40, batch_size=1)
        assert [s.token_ids for s in alone.group(strength)] == [s.token_ids for s in grid.group(strength)]
    unsteered = sample_completions(lm, prompt, 2, params, seed=40)
    assert [s.token_ids for s in grid.group(None)] == [s.token_ids for s in unsteered]
    assert grid.group(8.0) != grid.group(None)
    assert SteeredRun.from_dict(grid.to_dict()) == grid


@pytest.mark.parametrize("scope", ["all", "prompt", "generated"])
def test_steered_positions_are_the_tokens_the_hooks_changed(loaded, banks, monkeypatch, scope):
    import auditui.engine.steering as steering

    lm, bank = loaded("gpt2"), banks("gpt2")
    prompt = random_prompts(lm, (6,))[0]
    site = Site(1, "resid_post")
    changed: set[tuple[int, int]] = set()  # (row, own position)
    real_compile = steering.compile

    def watched(*args, **kwargs):
        edits = real_compile(*args, **kwargs)
        inner = edits[site]

        def edit(h, pos):
            out = h
            for fn in inner:
                out = fn(out, pos)
            hit = (out != h).any(-1)
            changed.update((int(r), int(pos.token[r, t])) for r, t in hit.nonzero().tolist())
            return out
        return {**edits, site: [edit]}

    monkeypatch.setattr(steering, "compile", watched)
    plan = parse_plan("1/resid_post/3:add:5", scope=scope)
    run_ = steered_samples(lm, bank, prompt, plan, [1.0], 2, SamplingParams(max_new_tokens=5), seed=7)
    for row, sample in enumerate(run_.samples):
        fed = {t - len(prompt) for r, t in changed if r == row and t >= len(prompt)}
        assert sample.steered_prompt == sorted(t for r, t in changed if r == row and t < len(prompt))
        assert sample.steered_generated == sorted(i for i in fed if i < len(sample.token_ids))
        assert (sample.strength is None) == (not sample.steered_prompt and not sample.steered_generated)


def test_rows_with_different_prompts_sample_as_they_would_alone(loaded):
    lm = loaded("gpt_neox")
    prompts = random_prompts(lm, (4, 9, 6))
    params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=8)
    batched = generate_rows(lm, prompts, [5, 6, 7], params)
    for prompt, seed, sample in zip(prompts, [5, 6, 7], batched, strict=True):
        assert generate_rows(lm, [prompt], [seed], params)[0].token_ids == sample.token_ids
    with pytest.raises(AuditError, match="one seed per prompt"):
        generate_rows(lm, prompts, [1], params)


# -- plans: selection, builders, JSON, errors ----------------------------------------------------
def test_layer_selection_and_schedules():
    feats = tuple(PlanFeature(Feature(Site(layer, "resid_post"), 1), "add", 2.0) for layer in (3, 5, 8))
    plan = SteeringPlan(feats, span=(3, 8), schedule=Schedule("linear", end=1.0))
    assert [f.layer for f in plan.selected()] == [3, 5, 8]
    assert [plan.coefficient(f) for f in feats] == pytest.approx([2.0, 1.6, 1.0])
    assert [f.layer for f in SteeringPlan(feats, layer=5).selected()] == [3, 5]
    assert [f.layer for f in SteeringPlan(feats, mode="single", layer=5).selected()] == [5]
    exp = SteeringPlan(feats, schedule=Schedule("exponential", alpha=-0.05))
    assert exp.coefficient(feats[2], strength=3.0) == pytest.approx(6.0 * math.exp(-0.4))
    assert PlanFeature(Feature(Site(0, "resid_pre"), 1)).layer == -1  # the embeddings: flow position -1
    with pytest.raises(AuditError, match="no feature of the plan lies at layer 4"):
        SteeringPlan(feats, mode="single", layer=4).selected()


def test_plan_builders():
    def node(text: str, role: str) -> Node:
        return Node(Feature.parse(text), role)

    ids = ["2/resid_post/1", "3/resid_post/2", "4/resid_post/3", "5/resid_post/4", "3/mlp_out/8", "4/attn_out/9",
           "4/mlp_out/10"]
    graph = FlowGraph(Feature.parse("3/resid_post/2"), 1, "both", Thresholds(cut=0.3),
                      {i: node(i, "M" if "mlp" in i else "A" if "attn" in i else "R") for i in ids},
                      [Edge(ids[0], ids[1], "R", 0.7), Edge(ids[1], ids[2], "R", 0.55), Edge(ids[2], ids[3], "R", 0.4),
                       Edge(ids[4], ids[1], "M", 0.2), Edge(ids[5], ids[2], "A", 0.15), Edge(ids[6], ids[2], "M", 0.1)])
    plan = plan_from_flow(graph, "add", 4.0, schedule=Schedule("exponential"))
    assert [str(f.feature) for f in plan.features] == [ids[0], ids[1], ids[4], ids[2], ids[5]]  # by layer
    assert plan.span == (2, 4) and plan.schedule.kind == "exponential" and "flow graph" in plan.source
    assert {f.op for f in plan.features} == {"add"} and {f.coefficient for f in plan.features} == {4.0}

    result = {"rows": [{"site": "1/resid_post", "latent": 5, "delta_attr": 0.2},
                       {"site": "2/mlp_out", "latent": 6, "delta_attr": 0.9},
                       {"site": "1/resid_post", "latent": 7, "delta_attr": 0.5}]}
    (together,) = plans_from_attribution(result, 2)
    assert [str(f.feature) for f in together.features] == ["2/mlp_out/6", "1/resid_post/7"]
    assert {(f.op, f.coefficient) for f in together.features} == {("rescale", 0.0)}
    alone = plans_from_attribution(result, 3, together=False, op="add", coefficient=-8.0, site="1/resid_post")
    assert [[str(f.feature) for f in p.features] for p in alone] == [["1/resid_post/7"], ["1/resid_post/5"]]

    steering_set = plan_from_features([(Site(1, "mlp_out"), 3), ("2/res", 5), "3/att/6"], "clamp", 2.0, scope="generated")
    assert [str(f.feature) for f in steering_set.features] == ["1/mlp_out/3", "2/resid_post/5", "3/attn_out/6"]
    assert steering_set.scope == "generated"


def test_typed_plans_and_json_round_trip():
    plan = parse_plan(" 12/resid_post/1234:add:8, 3/mlp/7:Rescale:0 ,4/att/2:mean-ablate:1 ", mode="single", layer=3)
    assert [(str(f.feature), f.op, f.coefficient) for f in plan.features] == [
        ("12/resid_post/1234", "add", 8.0), ("3/mlp_out/7", "rescale", 0.0), ("4/attn_out/2", "mean_ablate", 1.0)]
    data = plan.to_dict()
    assert data["format"] == "auditui-steering/1" and data["features"][0] == {
        "feature": "12/resid_post/1234", "op": "add", "coefficient": 8.0}
    assert SteeringPlan.from_dict(data) == plan
    spanned = SteeringPlan(plan.features, span=(3, 12), schedule=Schedule("linear", end=0.5), fold=True)
    assert SteeringPlan.from_dict(spanned.to_dict()) == spanned
    for text, message in [("", "at least one feature"), ("12/resid_post/1234:add", "FEATURE:OP:COEFFICIENT"),
                          ("12/resid_post/1234:boost:2", "unknown operation 'boost'"),
                          ("12/resid_post/1234:add:lots", "'lots' in '12/resid_post/1234:add:lots' is not a number"),
                          ("12/resid_post/x:add:1", "LAYER/KIND/INDEX"), ("12/middle/1:add:1", "unknown site kind"),
                          ("1/res/2:add:1, 1/resid_post/2:add:3", "more than once"),
                          ("1/res/2:add:inf", "finite")]:
        with pytest.raises(AuditError, match=message):
            parse_plan(text)
    with pytest.raises(AuditError, match="not a steering plan"):
        SteeringPlan.from_dict({**data, "format": "other/1"})
    with pytest.raises(AuditError, match="missing"):
        SteeringPlan.from_dict({"mode": "single"})


def test_compile_errors_name_the_problem(banks):
    bank = banks("llama")
    with pytest.raises(AuditError, match="no SAE at 7/resid_post"):
        compile(parse_plan("7/resid_post/1:add:1"), bank)
    with pytest.raises(AuditError, match="out of range"):
        compile(parse_plan("1/resid_post/4096:add:1"), bank)
    with pytest.raises(AuditError, match="reference mean"):
        compile(parse_plan("1/resid_post/3:mean_ablate:1"), bank)
    with pytest.raises(AuditError, match="prompt length"):
        compile(parse_plan("1/resid_post/3:add:1", scope="prompt"), bank)

"""Attention heads (seed 004): per-family head weights, exact relative attention decomposition against
the model's own attention scores, S(v) / N_recon, the rotation control, a planted rank-1 head and
its SAE latents, and the on-disk Ω SVD cache."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from helpers import hook_count
from torch import Tensor
from torch.overrides import TorchFunctionMode

from auditui.engine.head_weights import attention_module, head_weights
from auditui.engine.heads import (
    Decomposition,
    DirectionAlignment,
    PairAlignment,
    Scan,
    align_pair,
    capture_states,
    decompose,
    decompose_row,
    heads_for_direction,
    n_recon,
    omega,
    omega_svd,
    random_rotation,
    scan,
    sparsity,
)
from auditui.engine.saes import out_projection
from auditui.errors import AuditError
from auditui.testing import FAMILIES, build_tiny_sae

PROMPT = "the cat sat on the mat because it was warm, and then it slept."


class SoftmaxInputs(TorchFunctionMode):
    """Records what the model's eager attention passes to softmax: its own pre-softmax scores + mask."""

    def __init__(self) -> None:
        super().__init__()
        self.scores: list[Tensor] = []  # per layer [batch, heads, seq, seq]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.softmax:
            self.scores.append(args[0].detach().clone())
        return func(*args, **(kwargs or {}))


def eager_copy(lm):
    """A private copy of a loaded tiny model with eager attention (the shared fixture stays untouched)."""
    model = copy.deepcopy(lm.model)
    model.set_attn_implementation("eager")
    return dataclasses.replace(lm, model=model)


def model_scores(lm, ids: list[int]) -> list[Tensor]:
    """The model's own pre-softmax scores per layer, [heads, seq, seq] (masked entries ~ -3e38)."""
    with SoftmaxInputs() as seen, torch.no_grad():
        lm.model(torch.tensor([ids]))
    assert len(seen.scores) == lm.n_layers
    return [s[0] for s in seen.scores]


def model_relative(scores: Tensor) -> tuple[Tensor, Tensor]:
    """ℓ_j - mean_{i≠j} ℓ_i over the keys the model did not mask, and that visibility mask."""
    visible = scores > -1e30
    m = visible.sum(-1, keepdim=True)
    total = (scores * visible).sum(-1, keepdim=True)
    return scores - (total - scores) / (m - 1).clamp_min(1), visible


def prompt_ids(lm) -> list[int]:
    return lm.tokenizer(PROMPT)["input_ids"]


# -- head weights ----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_head_weights_rebuild_the_attention_output(family, loaded):
    lm = eager_copy(loaded(family))
    layer = 1
    attn = attention_module(lm.model, layer)
    seen = {}

    def keep_input(module, args, kwargs):
        seen["h"] = (args[0] if args else kwargs["hidden_states"]).detach()

    def keep_output(module, args, output):
        seen["out"], seen["weights"] = output[0].detach(), output[1].detach()

    handles = [attn.register_forward_pre_hook(keep_input, with_kwargs=True), attn.register_forward_hook(keep_output)]
    try:
        with torch.no_grad():
            lm.model(torch.tensor([prompt_ids(lm)]))
    finally:
        for handle in handles:
            handle.remove()
    w = head_weights(lm.model, layer)
    h, weights = seen["h"][0], seen["weights"][0]  # [T, d], [H, T, T]
    v = h @ w.w_v[w.kv_head]  # [H, T, dh]
    if w.b_v is not None:
        v = v + w.b_v[w.kv_head][:, None, :]
    out = torch.einsum("hrj,hjc,hcd->rd", weights, v, w.w_o)
    if w.b_o is not None:
        out = out + w.b_o
    torch.testing.assert_close(out, seen["out"][0], atol=1e-4, rtol=1e-4)
    assert w.w_q.shape == (lm.n_heads, lm.d_model, lm.d_head) and w.w_o.shape == (lm.n_heads, lm.d_head, lm.d_model)
    torch.testing.assert_close(out_projection(lm, layer), w.w_o.reshape(-1, lm.d_model))
    if family in ("llama", "qwen2", "gemma2"):
        assert w.kv_head.tolist() == [0, 0, 1, 1] and w.w_k.shape[0] == 2
    assert w.rotary == (family != "gpt2")
    assert (w.b_q is not None) == (family in ("gpt2", "gpt_neox", "qwen2"))


@pytest.mark.parametrize("family", FAMILIES)
def test_svd_reconstructs_omega(family, loaded):
    lm = loaded(family)
    svd = omega_svd(lm.model)
    for layer in range(lm.n_layers):
        w, s = head_weights(lm.model, layer), svd.layers[layer]
        rebuilt = s.u @ torch.diag_embed(s.s) @ s.v.transpose(-1, -2)  # [H, d+1, d+1]
        target = omega(w)
        torch.testing.assert_close(rebuilt, target, atol=1e-5 * target.abs().max().item(), rtol=0)
        eye = torch.eye(lm.d_head).expand(lm.n_heads, -1, -1)
        torch.testing.assert_close(s.u.transpose(-1, -2) @ s.u, eye, atol=1e-5, rtol=0)
        torch.testing.assert_close(s.v.transpose(-1, -2) @ s.v, eye, atol=1e-5, rtol=0)
        assert (s.s[:, :-1] >= s.s[:, 1:]).all()


# -- exactness against the model's own scores ------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_terms_sum_to_the_models_own_score_difference(family, loaded):
    lm = eager_copy(loaded(family))
    if family == "gemma2":  # pre-cap scores are what the terms decompose; a short window exercises masking
        lm.model.config.sliding_window = 8
        for layer in range(lm.n_layers):
            attn = attention_module(lm.model, layer)
            attn.attn_logit_softcapping = None
            if attn.sliding_window:
                attn.sliding_window = 8
    ids = prompt_ids(lm)
    scores = model_scores(lm, ids)
    svd = omega_svd(lm.model)
    states = capture_states(lm, ids)
    checked = 0
    for layer in range(lm.n_layers):
        relative, visible = model_relative(scores[layer])
        attention = torch.softmax(scores[layer], dim=-1)
        for head in range(lm.n_heads):
            for query in [*range(1, len(ids), 5), len(ids) - 1]:  # every key of a spread of queries
                row = decompose_row(states, svd, layer, head, query)
                assert [d.key for d in row] == visible[head, query].nonzero()[:, 0].tolist()
                got = torch.tensor([sum(d.terms) for d in row])
                want = relative[head, query, visible[head, query]]
                torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
                torch.testing.assert_close(torch.tensor([d.relative for d in row]), want, atol=1e-4, rtol=1e-5)
                torch.testing.assert_close(torch.tensor([d.attention for d in row]),
                                           attention[head, query, visible[head, query]], atol=1e-5, rtol=1e-4)
                checked += len(row)
    assert checked > 300
    if family == "gemma2":  # layer 0 slides, layer 1 is global
        assert not model_relative(scores[0])[1][0, -1, 0] and model_relative(scores[1])[1][0, -1, 0]
    assert hook_count(lm.model) == 0


def test_gemma2_soft_cap_relative_is_reported_beside_the_pre_cap_terms(loaded):
    lm = eager_copy(loaded("gemma2"))
    for layer in range(lm.n_layers):
        attention_module(lm.model, layer).attn_logit_softcapping = 1.0  # small enough to bend the scores
    ids = prompt_ids(lm)
    relative, visible = model_relative(model_scores(lm, ids)[2])
    svd = omega_svd(lm.model)
    row = decompose_row(capture_states(lm, ids), svd, 2, 3, len(ids) - 1)
    capped = torch.tensor([d.relative_capped for d in row])
    torch.testing.assert_close(capped, relative[3, -1, visible[3, -1]], atol=1e-4, rtol=1e-5)
    pre_cap = torch.tensor([sum(d.terms) for d in row])
    torch.testing.assert_close(pre_cap, torch.tensor([d.relative for d in row]), atol=1e-5, rtol=1e-5)
    assert (pre_cap - capped).abs().max() > 0.05  # the cap matters here, and the terms are pre-cap
    assert (torch.sign(pre_cap) == torch.sign(capped)).float().mean() > 0.9


# -- metrics and control ---------------------------------------------------------------------------
def test_sparsity_and_n_recon_reference_values():
    n = 8
    assert sparsity(torch.ones(n)).item() == pytest.approx(1.0)
    assert sparsity(-torch.ones(n) * 3).item() == pytest.approx(1.0)
    one_hot = torch.zeros(n)
    one_hot[3] = -2.5
    assert sparsity(one_hot).item() == pytest.approx(1 / n)
    assert sparsity(torch.zeros(n)).item() == 1.0
    assert sparsity(torch.stack([torch.ones(n), one_hot])).tolist() == pytest.approx([1.0, 1 / n])
    terms = torch.tensor([[1.0, 3.0, -0.5], [-2.0, 0.5, -1.0], [1.0, 1.0, 1.0], [0.0, 5.0, 0.0]])
    assert n_recon(terms, terms.sum(-1)).tolist() == [2, 2, 3, 1]


def test_rotation_control_keeps_the_spectrum_and_changes_the_terms(loaded):
    lm = loaded("gpt2")  # no rotary: the control can be rebuilt from the residual directly
    ids = prompt_ids(lm)
    svd, states = omega_svd(lm.model), capture_states(lm, ids)
    layer, head, query, key = 1, 2, len(ids) - 1, 4
    d = decompose(states, svd, layer, head, query, key, seed=7)
    s = svd.layers[layer]
    rotation = random_rotation(lm.d_head, d.control.seed)
    torch.testing.assert_close(rotation.T @ rotation, torch.eye(lm.d_head), atol=1e-5, rtol=0)
    u, v, sigma = s.u[head] @ rotation, s.v[head] @ rotation, s.s[head]
    rotated = u @ torch.diag(sigma) @ v.T
    torch.testing.assert_close(torch.linalg.svdvals(rotated)[:lm.d_head], sigma, atol=1e-5, rtol=1e-5)
    x = states.xbar[layer]  # [T, d+1]
    others = torch.cat([x[:key], x[key + 1:query + 1]]).mean(0)
    expected = s.scale * sigma * (x[query] @ u) * ((x[key] - others) @ v)
    torch.testing.assert_close(torch.tensor(d.control.terms), expected, atol=1e-5, rtol=1e-4)
    assert d.control.total == pytest.approx(sum(d.control.terms), abs=1e-5)
    assert d.control.n_recon == n_recon(expected, expected.sum()).item()
    assert (torch.tensor(d.terms) - expected).abs().max() > 1e-2
    assert d.control.sparsity != pytest.approx(d.sparsity, abs=1e-3)
    again = decompose(states, svd, layer, head, query, key, seed=7)
    assert again.control == d.control and decompose(states, svd, layer, head, query, key, seed=8).control != d.control


# -- a planted head --------------------------------------------------------------------------------
def planted_llama(lm, a: Tensor, b: Tensor, tokens: tuple[int, int]):
    """Layer 0, head 0: Ω ≈ a bᵀ (on the slowest rotary pair); the two tokens embed as a and b."""
    lm = eager_copy(lm)
    attn = attention_module(lm.model, 0)
    d_head, gen = lm.d_head, torch.Generator().manual_seed(5)
    pair = d_head // 2 - 1  # lowest rotary frequency
    with torch.no_grad():
        for proj, direction in ((attn.q_proj, a), (attn.k_proj, b)):
            rows = 0.01 * torch.randn(d_head, lm.d_model, generator=gen)
            rows[pair] = direction
            proj.weight[:d_head] = rows
        embed = lm.model.get_input_embeddings().weight
        embed[tokens[0]], embed[tokens[1]] = a, b
    return lm


def test_planted_rank_one_head_gives_one_term_and_its_latents(loaded):
    base = loaded("llama")
    gen = torch.Generator().manual_seed(3)
    a, b = torch.linalg.qr(torch.randn(base.d_model, 2, generator=gen)).Q.T  # two orthonormal directions
    ids = prompt_ids(base)
    query, key = len(ids) - 3, 6
    ids[query], ids[key] = (base.tokenizer(ch)["input_ids"][0] for ch in "ZX")
    lm = planted_llama(base, a, b, (ids[query], ids[key]))
    svd = omega_svd(lm.model)
    s = svd.layers[0]
    assert s.s[0, 0] > 100 * s.s[0, 1]
    assert abs(torch.nn.functional.cosine_similarity(s.u[0, :-1, 0], a, dim=0)) > 0.99
    assert abs(torch.nn.functional.cosine_similarity(s.v[0, :-1, 0], b, dim=0)) > 0.99

    states = capture_states(lm, ids)
    d = decompose(states, svd, 0, 0, query, key)
    terms = torch.tensor(d.terms)
    assert d.n_recon == 1 and d.ranked()[0] == 0
    assert terms[0].abs() > 0.95 * terms.abs().sum()
    assert d.relative > 5 and d.sparsity < 2 / lm.d_head
    relative, _ = model_relative(model_scores(lm, ids)[0])
    assert sum(d.terms) == pytest.approx(relative[0, query, key].item(), abs=1e-4)
    row = decompose_row(states, svd, 0, 0, query)
    assert max(row, key=lambda x: x.relative).key == key  # without the directions no key stands out so

    sae = build_tiny_sae("standard", lm.d_model, 128, "blocks.0.hook_resid_pre", seed=2)
    with torch.no_grad():
        sae.W_dec[7], sae.W_dec[11] = a, b
    aligned = align_pair(svd, 0, 0, 0, sae.W_dec, n_random=256)
    assert aligned.query[0].latent == 7 and aligned.key[0].latent == 11
    assert abs(aligned.query[0].cos) > 0.99 and abs(aligned.key[0].cos) > 0.99
    assert aligned.reference.q99 < 0.7 and aligned.reference.p_value(aligned.query[0].cos) == pytest.approx(1 / 257)
    assert aligned.query_norm > 0.99
    for_a = heads_for_direction(svd, a).matches[0]
    assert (for_a.layer, for_a.head, for_a.k, for_a.side) == (0, 0, 0, "query") and abs(for_a.cos) > 0.99
    for_b = heads_for_direction(svd, b)
    assert (for_b.matches[0].layer, for_b.matches[0].k, for_b.matches[0].side) == (0, 0, "key")
    assert for_b.matches[0].head in (0, 1)  # both query heads read K/V head 0
    assert abs(for_b.matches[0].cos) > 1.5 * for_b.reference.max
    for result, kind in ((d, Decomposition), (aligned, PairAlignment), (for_b, DirectionAlignment)):
        assert kind.from_dict(json.loads(json.dumps(result.to_dict()))) == result


# -- scan ------------------------------------------------------------------------------------------
def test_scan_ranks_attended_pairs_by_sparsity(loaded):
    lm = loaded("qwen2")
    ids = prompt_ids(lm)
    svd, states = omega_svd(lm.model), capture_states(lm, ids)
    result = scan(states, svd, threshold=0.2)
    assert result.n_hits == len(result.hits) > 10
    assert [h.sparsity for h in result.hits] == sorted(h.sparsity for h in result.hits)
    assert all(h.attention > 0.2 and 1 <= h.key <= h.query for h in result.hits)
    assert sum(map(sum, result.counts)) == result.n_hits
    assert len(result.grid) == lm.n_layers and all(len(row) == lm.n_heads for row in result.grid)
    for hit in result.hits[::7]:
        d = decompose(states, svd, hit.layer, hit.head, hit.query, hit.key)
        assert (hit.sparsity, hit.n_recon, hit.control_sparsity) == pytest.approx(
            (d.sparsity, d.n_recon, d.control.sparsity), abs=1e-5)
        assert hit.attention == pytest.approx(d.attention) and hit.top == d.ranked()[:min(hit.n_recon, 5)]
    with_sink = scan(states, svd, threshold=0.2, include_first_key=True, top=5)
    assert with_sink.n_hits > result.n_hits and len(with_sink.hits) == 5
    assert Scan.from_dict(json.loads(json.dumps(result.to_dict()))) == result
    assert hook_count(lm.model) == 0


def test_pairs_outside_the_causal_window_are_refused(loaded):
    lm = loaded("gpt2")
    ids = prompt_ids(lm)
    svd, states = omega_svd(lm.model), capture_states(lm, ids)
    with pytest.raises(AuditError, match="not visible"):
        decompose(states, svd, 0, 0, 3, 5)
    with pytest.raises(AuditError, match="query position 0"):
        decompose(states, svd, 0, 0, 0, 0)
    with pytest.raises(AuditError, match="no head 0.9"):
        decompose(states, svd, 0, 9, 3, 1)


# -- the on-disk SVD cache -------------------------------------------------------------------------
def test_svd_cache_is_identical_warm_and_invalidated_by_weight_changes(loaded, tmp_path):
    lm = loaded("qwen2")
    cold = omega_svd(lm.model, tmp_path)
    warm = omega_svd(lm.model, tmp_path)
    assert not cold.cached and warm.cached and warm.digest == cold.digest
    for c, w in zip(cold.layers, warm.layers):
        for name in ("u", "s", "v", "gain", "key_map"):
            assert torch.equal(getattr(c, name), getattr(w, name)), name
    assert len(list(tmp_path.iterdir())) == 1

    changed = copy.deepcopy(lm.model)
    with torch.no_grad():
        changed.model.layers[1].self_attn.v_proj.weight.add_(0.1)  # Ω does not read V
    assert omega_svd(changed, tmp_path).cached
    with torch.no_grad():
        changed.model.layers[1].self_attn.k_proj.bias.add_(0.1)
    fresh = omega_svd(changed, tmp_path)
    assert not fresh.cached and fresh.digest != cold.digest
    assert torch.equal(fresh.layers[0].s, cold.layers[0].s) and not torch.equal(fresh.layers[1].s, cold.layers[1].s)
    assert len(list(tmp_path.iterdir())) == 2


# -- slow tier: SmolLM2 ----------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_terms_sum_to_its_own_scores(smollm2):
    lm = eager_copy(smollm2)
    ids = lm.prompt_ids("Then, Simon and Andrew were working at the restaurant. Simon decided to give a basketball to")
    scores = model_scores(lm, ids)
    svd, states = omega_svd(lm.model), capture_states(lm, ids)
    for layer in (0, 14, 29):
        relative, visible = model_relative(scores[layer])
        for head in (0, 4, 8):
            row = decompose_row(states, svd, layer, head, len(ids) - 1)
            got = torch.tensor([sum(d.terms) for d in row])
            want = relative[head, -1, visible[head, -1]]
            torch.testing.assert_close(got, want, atol=2e-3 + 1e-5 * want.abs().max().item(), rtol=1e-4)
    assert scan(states, svd).n_hits > 100

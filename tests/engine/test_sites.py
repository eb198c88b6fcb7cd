"""Sites read and write the right tensors, for every family (checked against HF's own outputs)."""

from __future__ import annotations

import pytest
import torch
from helpers import hook_count

from auditui.engine.sites import KINDS, Site, SiteHooks, all_sites, site_from_hook_name
from auditui.errors import AuditError

TEXT = "The quick brown fox jumps over the lazy dog."


def _ids(lm) -> torch.Tensor:
    return torch.tensor([lm.prompt_ids(TEXT, chat=False)])


def test_reads_match_hidden_states_and_decompose(family, loaded):
    lm = loaded(family)
    ids = _ids(lm)
    sites = all_sites(lm.n_layers, KINDS)
    with SiteHooks(lm.model, reads=sites) as hooks:
        out = lm.model(ids, output_hidden_states=True)
    acts, hidden = hooks.acts, out.hidden_states
    last = lm.n_layers - 1
    for layer in range(lm.n_layers):
        pre, post = acts[Site(layer, "resid_pre")], acts[Site(layer, "resid_post")]
        torch.testing.assert_close(pre, hidden[layer])
        if layer < last:
            torch.testing.assert_close(post, hidden[layer + 1])
            torch.testing.assert_close(acts[Site(layer + 1, "resid_pre")], post)
        recomposed = pre + acts[Site(layer, "attn_out")] + acts[Site(layer, "mlp_out")]
        torch.testing.assert_close(post, recomposed, atol=1e-5, rtol=1e-5)
        assert acts[Site(layer, "attn_z")].shape[-1] == lm.n_heads * lm.d_head
    # HF applies the final norm to the last hidden state; the site is before it.
    final_norm = lm.model.get_submodule(lm.adapter.final_norm)
    torch.testing.assert_close(final_norm(acts[Site(last, "resid_post")]), hidden[-1])
    assert not torch.allclose(acts[Site(last, "resid_post")], hidden[-1])


def _add(v: torch.Tensor):
    return lambda h, pos: h + v


def test_write_resid_pre0_equals_edited_embeddings(family, loaded):
    """+v at resid_pre(0) == the same +v applied by hand to the input embeddings."""
    lm = loaded(family)
    ids = _ids(lm)
    v = torch.randn(lm.d_model)
    with SiteHooks(lm.model, edits={Site(0, "resid_pre"): _add(v)}):
        hooked = lm.model(ids).logits
    embeds = lm.model.get_input_embeddings()(ids)  # Gemma's sqrt(d) scale is inside the module
    by_hand = lm.model(inputs_embeds=embeds + v).logits
    torch.testing.assert_close(hooked, by_hand, atol=1e-4, rtol=1e-4)
    assert (hooked - lm.model(ids).logits).abs().max() > 1e-2


def _mlp_output_linear(lm, layer: int) -> torch.nn.Module:
    names = {"gpt2": "mlp.c_proj", "gpt_neox": "mlp.dense_4h_to_h", "llama": "mlp.down_proj"}
    return lm.model.get_submodule(f"{lm.adapter.layers}.{layer}.{names[lm.adapter.name]}")


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama", "qwen2"])
def test_write_mlp_out_equals_bias_edit(family, loaded):
    """+v at mlp_out(L) == adding v to the bias of the MLP's output projection (a weight edit)."""
    lm = loaded(family)
    ids, layer = _ids(lm), 1
    v = torch.randn(lm.d_model)
    with SiteHooks(lm.model, edits={Site(layer, "mlp_out"): _add(v)}):
        hooked = lm.model(ids).logits
    linear = _mlp_output_linear(lm, layer)
    old_bias = linear.bias
    linear.bias = torch.nn.Parameter((old_bias.detach() if old_bias is not None else 0) + v, requires_grad=False)
    try:
        by_hand = lm.model(ids).logits
    finally:
        linear.bias = old_bias
    torch.testing.assert_close(hooked, by_hand, atol=1e-4, rtol=1e-4)
    assert (hooked - lm.model(ids).logits).abs().max() > 1e-2


def test_residual_writes_agree_across_equivalent_sites(family, loaded):
    """+v at resid_post(L) == +v at resid_pre(L+1); == +v at mlp_out(L) outside post-norm families."""
    lm = loaded(family)
    ids = _ids(lm)
    v = torch.randn(lm.d_model)
    logits = {}
    for site in (Site(0, "resid_post"), Site(1, "resid_pre"), Site(0, "mlp_out")):
        with SiteHooks(lm.model, edits={site: _add(v)}):
            logits[site.kind] = lm.model(ids).logits
    torch.testing.assert_close(logits["resid_post"], logits["resid_pre"])
    if lm.adapter.name != "gemma2":
        torch.testing.assert_close(logits["resid_post"], logits["mlp_out"], atol=1e-4, rtol=1e-4)


def test_hooks_removed_on_exit_and_on_error(family, loaded):
    lm = loaded(family)
    before = hook_count(lm.model)
    sites = all_sites(lm.n_layers, KINDS)
    with SiteHooks(lm.model, reads=sites, edits={sites[0]: _add(torch.zeros(lm.d_model))}):
        assert hook_count(lm.model) > before
    assert hook_count(lm.model) == before
    with pytest.raises(ValueError, match="boom"):
        with SiteHooks(lm.model, reads=sites):
            raise ValueError("boom")
    assert hook_count(lm.model) == before
    with pytest.raises(AuditError, match="outside"):
        with SiteHooks(lm.model, reads=[Site(99, "resid_post")]):
            pass
    assert hook_count(lm.model) == before


def test_generation_edits_prompt_pass_and_every_new_token(family, loaded):
    """With the KV cache on, the edit sees the prompt, then each new token at its true position."""
    lm = loaded(family)
    ids = _ids(lm)
    n_new = 6
    v = 3.0 * torch.randn(lm.d_model)
    calls: list[tuple[int, int]] = []

    def edit(h: torch.Tensor, pos) -> torch.Tensor:
        calls.append((pos.start, h.shape[1]))
        return h + v

    site = Site(1, "resid_pre")
    with SiteHooks(lm.model, edits={site: edit}):
        steered = lm.model.generate(ids, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                                    use_cache=True, pad_token_id=0)
    prompt_len = ids.shape[1]
    assert calls == [(0, prompt_len)] + [(prompt_len + i, 1) for i in range(n_new - 1)]
    # Independent check: greedy decoding by full recomputation (no cache), edit on every position.
    seq = ids
    with SiteHooks(lm.model, edits={site: _add(v)}):
        for _ in range(n_new):
            next_id = lm.model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, next_id], dim=1)
    assert steered.tolist() == seq.tolist()
    plain = lm.model.generate(ids, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, pad_token_id=0)
    assert plain.tolist() != steered.tolist()


def test_gradients_reach_every_read_site(loaded):
    lm = loaded("llama")
    ids = _ids(lm)
    sites = [Site(0, "resid_post"), Site(1, "mlp_out"), Site(2, "attn_out")]
    embeds = lm.model.get_input_embeddings()(ids).requires_grad_(True)
    with SiteHooks(lm.model, reads=sites, keep_grad=True) as hooks:
        loss = lm.model(inputs_embeds=embeds).logits[0, -1].logsumexp(-1)
        loss.backward()
    grads = hooks.grads
    assert all(grads[s].shape == hooks.acts[s].shape and grads[s].abs().sum() > 0 for s in sites)


def test_site_names_and_hook_names():
    assert Site.parse("12/res") == Site(12, "resid_post")
    assert Site.parse(" 3 / mlp ") == Site(3, "mlp_out")
    assert site_from_hook_name("blocks.8.hook_resid_pre") == Site(8, "resid_pre")
    assert site_from_hook_name("blocks.2.attn.hook_z") == Site(2, "attn_z")
    assert Site(5, "attn_out").hook_name == "blocks.5.hook_attn_out"
    with pytest.raises(AuditError, match="LAYER/KIND"):
        Site.parse("twelve")
    with pytest.raises(AuditError, match="unknown site kind"):
        Site.parse("1/resid_mid")
    with pytest.raises(AuditError, match="not a site"):
        site_from_hook_name("blocks.1.hook_resid_mid")


def test_hf_module_paths_map_to_sites(loaded):
    lm = loaded("llama")
    assert site_from_hook_name("model.layers.2", lm.model) == Site(2, "resid_post")
    assert site_from_hook_name("model.layers.0.mlp", lm.model) == Site(0, "mlp_out")
    assert site_from_hook_name("model.layers.1.self_attn", lm.model) == Site(1, "attn_out")


@pytest.mark.parametrize("scope", ["generated", "prompt"])
def test_left_padded_batch_edits_exactly_the_scoped_tokens_of_each_row(family, loaded, scope):
    """Prompts of different lengths, left-padded, KV-cached: an edit restricted to each row's generated
    (or prompt) tokens touches exactly those tokens and equals a hand loop per row without cache."""
    lm = loaded(family)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, len(lm.tokenizer), (n,), generator=gen).tolist() for n in (5, 11, 8)]
    lengths = torch.tensor([len(p) for p in prompts])  # [rows]
    width, n_new, pad = int(lengths.max()), 5, lm.tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])  # [rows, width]
    mask = (torch.arange(width)[None, :] >= width - lengths[:, None]).long()  # [rows, width]
    v = 4.0 * torch.randn(lm.d_model, generator=gen)
    site = Site(1, "resid_pre")

    def in_scope(pos, rows: torch.Tensor) -> torch.Tensor:  # [batch, seq] bool
        own = lengths[rows][:, None]
        return pos.token >= own if scope == "generated" else (pos.token >= 0) & (pos.token < own)

    touched: set[tuple[int, int]] = set()

    def batched_edit(h: torch.Tensor, pos) -> torch.Tensor:
        hit = in_scope(pos, torch.arange(h.shape[0]))
        touched.update((int(r), int(pos.token[r, t])) for r, t in hit.nonzero().tolist())
        return h + hit[..., None].to(h.dtype) * v

    with torch.no_grad(), SiteHooks(lm.model, edits={site: batched_edit}):
        out = lm.model.generate(ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new,
                                do_sample=False, use_cache=True, pad_token_id=pad)
    generated = out[:, width:].tolist()
    own_span = {"generated": lambda n: range(n, n + n_new - 1), "prompt": lambda n: range(n)}[scope]
    assert touched == {(r, t) for r, n in enumerate(lengths.tolist()) for t in own_span(n)}
    for r, prompt in enumerate(prompts):  # independent: one row, no padding, no cache, full recompute
        row = torch.tensor([prompt])
        with torch.no_grad(), SiteHooks(lm.model, edits={site: lambda h, pos, r=r: h + in_scope(
                pos, torch.tensor([r]))[..., None].to(h.dtype) * v}):
            for _ in range(n_new):
                row = torch.cat([row, lm.model(row, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], 1)
        assert row[0, len(prompt):].tolist() == generated[r]


def test_positions_fail_loudly_without_position_information(loaded):
    from auditui.engine.sites import forward_positions

    embeds = torch.zeros(2, 3, 8)
    assert forward_positions((), {"inputs_embeds": embeds}).token.tolist() == [[0, 1, 2]] * 2
    with pytest.raises(AuditError, match="cannot read the position"):
        forward_positions((), {"inputs_embeds": embeds, "past_state": object()})
    with pytest.raises(AuditError, match="narrower"):
        forward_positions((), {"inputs_embeds": embeds, "attention_mask": torch.ones(2, 2)})
    legacy = forward_positions((), {"inputs_embeds": embeds, "cache_position": torch.arange(4, 7)})
    assert legacy.start == 4 and legacy.columns.tolist() == [4, 5, 6]

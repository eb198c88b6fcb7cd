"""Latent labels: logit-lens tokens and top-activating snippets, checked against independent code."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from helpers import labelled_session

from auditui.engine import Engine, labels
from auditui.engine.labels import logit_lens, token_strings
from auditui.engine.model import load_model
from auditui.engine.saes import SAEBank
from auditui.engine.sites import Site, SiteHooks
from auditui.store.database import Store
from auditui.workflows.snippets import session_snippets

SPEC = [("Is the sky blue?", [("Yes, it is.", "positive"), ("No way!", "negative")]),
        ("Tell me a joke", [("Why did the chicken", "negative"), ("No.", "positive")]),
        ("A prompt with no completion yet", [])]


@pytest.mark.parametrize("family", ["gpt2", "gemma2"])
def test_logit_lens_is_the_cosine_with_unembedding_rows_after_the_final_norm(family, loaded):
    lm = loaded(family)
    direction = torch.randn(2, lm.d_model)
    gain = lm.model.get_submodule(lm.adapter.final_norm).weight.detach()
    if family == "gemma2":
        gain = 1 + gain  # Gemma's RMSNorm scales by (1 + w)
        seen = direction * gain
    else:
        seen = (direction - direction.mean(dim=1, keepdim=True)) * gain  # LayerNorm centres first
    w_u = lm.model.get_output_embeddings().weight.detach()
    cosines = torch.nn.functional.cosine_similarity(seen[:, None, :], w_u[None], dim=-1)  # [2, vocab]
    values, ids = cosines.topk(5, dim=1)
    got = logit_lens(lm, direction, k=5)
    for row in range(2):
        assert [tok for tok, _ in got[row]] == token_strings(lm, ids[row].tolist())
        torch.testing.assert_close(torch.tensor([v for _, v in got[row]]), values[row], rtol=1e-4, atol=1e-5)


def test_the_unembedding_cache_lets_a_dropped_model_go(tiny_models):
    lm = load_model(str(tiny_models["gpt2"]), device="cpu", dtype="float32")
    first = labels.unit_unembedding(lm)
    assert labels.unit_unembedding(lm) is first and lm.model in labels._UNEMBED_CACHE
    model, entries = weakref.ref(lm.model), len(labels._UNEMBED_CACHE)
    del lm
    gc.collect()
    assert model() is None and len(labels._UNEMBED_CACHE) == entries - 1


def test_token_strings_spell_the_text(loaded):
    lm = loaded("llama")
    ids = lm.tokenizer("héllo wörld", add_special_tokens=False)["input_ids"]
    strings = token_strings(lm, ids)
    assert len(strings) == len(ids) and "w" in strings and lm.tokenizer.decode(ids) == "héllo wörld"


def test_top_snippets_find_the_strongest_texts_with_per_token_activations(loaded, tiny_packs, tmp_path):
    lm = loaded("llama")
    bank = SAEBank.from_specs([str(tiny_packs["llama"])], tmp_path, device=lm.device, model=lm.model).attach(lm)
    engine = Engine(lm, bank, tmp_path)
    store = Store(tmp_path / "s.db")
    session_id = labelled_session(store, lm, SPEC)
    site = Site(1, "resid_post")
    sae = bank.sae(site)
    texts = []  # (completion id, ids, first counted position, codes [T, d_sae]) computed one text at a time
    for prompt in store.prompts(session_id):
        completions = store.completions(prompt_id=prompt["id"]) or [{"id": None, "token_ids": []}]
        for i, completion in enumerate(completions):
            ids = prompt["prompt_ids"] + completion["token_ids"]
            with torch.no_grad(), SiteHooks(lm.model, reads=[site]) as hooks:
                lm.model(torch.tensor([ids]))
                codes = sae.encode(hooks.acts[site][0])
            texts.append((completion["id"], ids, 1 if i == 0 else len(prompt["prompt_ids"]), codes))
    latent = int(torch.stack([codes[first:].max(dim=0).values for _, _, first, codes in texts]).max(dim=0)
                 .values.argmax())
    expected = sorted(((float(codes[first:, latent].max()), cid, ids, first + int(codes[first:, latent].argmax()),
                        codes[:, latent]) for cid, ids, first, codes in texts if codes[first:, latent].max() > 0),
                      key=lambda item: -item[0])
    snippets = session_snippets(store, engine, session_id, site, latent, k=3, before=4, after=2)
    assert len(snippets) == min(3, len(expected)) >= 2
    for snippet, (best, cid, ids, position, values) in zip(snippets, expected, strict=False):
        assert snippet["completion_id"] == cid and snippet["position"] == position
        assert snippet["max"] == pytest.approx(best, rel=1e-4)
        start, end = max(0, position - 4), min(len(ids), position + 3)
        assert snippet["start"] == start and "".join(snippet["tokens"]) == lm.tokenizer.decode(ids[start:end])
        torch.testing.assert_close(torch.tensor(snippet["activations"]), values[start:end], rtol=1e-4, atol=1e-5)
        assert snippet["activations"][position - start] == pytest.approx(best, rel=1e-4)

"""Model-diffing Δ-activation against an independent two-model computation (plain transformers forwards
with output_hidden_states and a hand hook, the SAE's own encode), and its rankings."""

from __future__ import annotations

import pytest
import torch
from sae_lens import SAE
from transformers import AutoModelForCausalLM

from auditui.engine.diffing import Baselines, DiffResult, diff_activations, rank_site, top_indices
from auditui.engine.model import load_model
from auditui.engine.reference import OUTLIER_FACTOR, TokenSeq, inliers
from auditui.engine.saes import SAEBank
from auditui.engine.sites import Site
from auditui.testing import build_tiny_model

SITES = [Site(1, "resid_post"), Site(1, "mlp_out")]
TEXTS = ["The river rose in the spring.", "A committee met on Tuesday", "def parse(text): return text.split()",
         "Once upon a time, a cat", "ok"]


@pytest.fixture(scope="module")
def models(tiny_models, tmp_path_factory):
    """(audited dir, reference dir): two random tiny llamas with the same tokenizer and width."""
    return tiny_models["llama"], build_tiny_model("llama", tmp_path_factory.mktemp("ref") / "tiny-llama-ref", seed=1)


def _seqs(lm) -> list[TokenSeq]:
    seqs = []
    for i, text in enumerate(TEXTS):
        ids = tuple(lm.prompt_ids(text, chat=False))
        seqs.append(TokenSeq(ids=ids, n_prompt=min(3, len(ids)), counted_from=1 + i % 3))
    return seqs


def _independent(model_dir, seqs: list[TokenSeq]) -> dict[Site, torch.Tensor]:
    """Site rows [N, d_model] over every sequence's positions counted_from..len, one sequence per forward."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows: dict[Site, list[torch.Tensor]] = {site: [] for site in SITES}
    seen = {}
    handle = model.model.layers[1].mlp.register_forward_hook(lambda _m, _i, out: seen.__setitem__("mlp", out))
    with torch.no_grad():
        for seq in seqs:
            out = model(input_ids=torch.tensor([seq.ids]), output_hidden_states=True)
            rows[SITES[0]].append(out.hidden_states[2][0, seq.counted_from:])  # after layer 1 (not the last: no norm)
            rows[SITES[1]].append(seen["mlp"][0, seq.counted_from:])
    handle.remove()
    return {site: torch.cat(parts) for site, parts in rows.items()}


def test_model_diffing_equals_an_independent_two_model_computation(models, tiny_packs):
    audited_dir, reference_dir = models
    audited, reference = (load_model(str(d), device="cpu", dtype="float32") for d in models)
    bank = SAEBank.from_specs([str(tiny_packs["llama"])], tiny_packs["llama"], model=audited.model).attach(audited)
    seqs = _seqs(audited)
    rows_a, rows_r = _independent(audited_dir, seqs), _independent(reference_dir, seqs)
    for batch_size in (2, len(seqs)):  # padded batches of similar lengths, and one batch
        diffs = diff_activations(audited, reference, bank, seqs, SITES, batch_size=batch_size)
        for site in SITES:
            a, r = rows_a[site], rows_r[site]
            norms_a, norms_r = a.norm(dim=-1), r.norm(dim=-1)
            keep = (norms_a <= OUTLIER_FACTOR * norms_a.median()) & (norms_r <= OUTLIER_FACTOR * norms_r.median())
            assert keep.all()  # so every batching keeps the same tokens
            sae = SAE.load_from_disk(tiny_packs["llama"] / f"{site.kind}_{site.layer}")
            with torch.no_grad():
                expected_a, expected_r = sae.encode(a).mean(0), sae.encode(r).mean(0)  # [d_sae]
            diff = diffs[site]
            assert diff.n_tokens == len(a) == sum(len(s) - s.counted_from for s in seqs)
            torch.testing.assert_close(diff.audited, expected_a, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(diff.reference, expected_r, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(diff.delta, expected_a - expected_r, atol=1e-5, rtol=1e-4)
            assert diff.delta.abs().max() > 1e-2  # two different models: not vacuous


def test_a_model_against_itself_differs_by_nothing(models, tiny_packs):
    audited = load_model(str(models[0]), device="cpu", dtype="float32")
    bank = SAEBank.from_specs([str(tiny_packs["llama"])], tiny_packs["llama"], model=audited.model).attach(audited)
    diffs = diff_activations(audited, audited, bank, _seqs(audited), SITES)
    assert all(float(d.delta.abs().max()) == 0.0 and float(d.audited.abs().max()) > 0 for d in diffs.values())


def test_rankings_overlaps_and_the_summary(models, tiny_packs):
    audited, reference = (load_model(str(d), device="cpu", dtype="float32") for d in models)
    bank = SAEBank.from_specs([str(tiny_packs["llama"])], tiny_packs["llama"], model=audited.model).attach(audited)
    diff = diff_activations(audited, reference, bank, _seqs(audited), SITES[:1])[SITES[0]]
    delta = diff.delta
    alone = rank_site(audited, bank, diff, 5)
    assert [r.latent for r in alone.rows] == top_indices(delta, 5) == delta.topk(5).indices.tolist()
    assert [r.rank for r in alone.rows] == [1, 2, 3, 4, 5] and alone.overlap_attr is None and alone.rows[0].attr_rank is None
    assert all(len(r.logit_lens) == 8 for r in alone.rows)
    same, reversed_ = delta.clone(), -delta
    ranked = rank_site(audited, bank, diff, 5, Baselines(run_id=7, attr=same, within=reversed_))
    assert (ranked.overlap_attr, ranked.overlap_within, ranked.attribution_run) == (5, 0, 7)
    assert [r.attr_rank for r in ranked.rows] == [1, 2, 3, 4, 5]
    assert [r.within_rank for r in ranked.rows] == [128, 127, 126, 125, 124]
    assert ranked.rows[0].delta_within == pytest.approx(-ranked.rows[0].delta_act)
    result = DiffResult([ranked], n_texts=5, source="session", notes=["n"])
    data = result.to_dict()
    assert data["sites"]["1/resid_post"] == {"d_sae": 128, "top_k": 5, "n_tokens": diff.n_tokens, "overlap_attr": 5,
                                             "overlap_within": 0, "attribution_run": 7}
    assert data["rows"][0] == ranked.rows[0].to_dict() and len(data["rows"]) == 5
    summary = result.summary()
    assert "top-k overlap with Δ-attribution: 1/resid_post 5/5" in summary["headline"]
    assert "the within-model Δ-activation: 1/resid_post 0/5" in summary["headline"]
    assert summary["table"]["rows"][0][:3] == [1, "1/resid_post", ranked.rows[0].latent]


def test_inliers_drop_norm_outliers():
    rows = torch.ones(6, 4)
    rows[3] *= 100
    assert inliers(rows).tolist() == [True, True, True, False, True, True]
    assert inliers(torch.zeros(0, 4)).tolist() == []

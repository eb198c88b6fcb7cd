"""Seeded batched sampling: batch-invariant seeds, exact sampling distribution, EOS, errors, storage."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import Probe
from scipy.stats import chisquare

from auditui.engine.sampling import SamplingParams, sample_completions, sampling_processors
from auditui.engine.sites import Site
from auditui.errors import AuditError

PROMPT = "Tell me a story about a cat."


def _nucleus_probs(logits: np.ndarray, temperature: float, top_p: float) -> np.ndarray:
    """softmax(logits / T) restricted to the smallest top set holding >= top_p of the mass, renormalised."""
    z = logits / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p)
    mass_before = np.cumsum(p[order]) - p[order]
    keep = order[mass_before < top_p]
    out = np.zeros_like(p)
    out[keep] = p[keep]
    return out / out.sum()


def _chi2_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    """Chi-square goodness of fit; categories with expected count < 5 are pooled into one."""
    expected = probs * counts.sum()
    big = expected >= 5
    observed = np.append(counts[big], counts[~big].sum())
    wanted = np.append(expected[big], expected[~big].sum())
    if wanted[-1] == 0:
        observed, wanted = observed[:-1], wanted[:-1]
    return float(chisquare(observed, wanted).pvalue)


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # rotary and learned positions
def test_each_completion_is_reproducible_from_its_seed_whatever_the_batch(loaded, family):
    lm = loaded(family)
    ids = lm.prompt_ids(PROMPT)
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=12)
    batched = sample_completions(lm, ids, 6, params, seed=100, batch_size=3)
    alone = [sample_completions(lm, ids, 1, params, seed=100 + i)[0] for i in range(6)]
    assert [s.seed for s in batched] == list(range(100, 106))
    assert [s.token_ids for s in batched] == [s.token_ids for s in alone]
    assert [s.text for s in batched] == [s.text for s in alone]
    assert len({tuple(s.token_ids) for s in batched}) == 6  # different seeds, different samples
    again = sample_completions(lm, ids, 6, params, seed=100, batch_size=6)
    assert [s.token_ids for s in again] == [s.token_ids for s in batched]


def test_sampling_processors_give_the_tempered_top_p_distribution():
    """Gumbel-max over the warped logits matches softmax(logits/T) on the top-p nucleus."""
    logits = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0], dtype=np.float32)
    params = SamplingParams(temperature=0.8, top_p=0.9)
    n = 20000
    scores = torch.tensor(logits).repeat(n, 1)  # [n, vocab]
    processors = sampling_processors(params, list(range(n)), torch.device("cpu"))
    picks = processors(torch.zeros(n, 1, dtype=torch.long), scores).argmax(-1).numpy()
    counts = np.bincount(picks, minlength=len(logits))
    probs = _nucleus_probs(logits.astype(np.float64), 0.8, 0.9)
    assert (counts[probs == 0] == 0).all() and (probs == 0).sum() >= 2  # outside the nucleus: never
    assert _chi2_pvalue(counts, probs) > 1e-3
    assert np.abs(counts / n - probs).max() < 0.015


def test_first_tokens_follow_the_models_softmax(loaded):
    lm = loaded("qwen2")
    ids = lm.prompt_ids(PROMPT)
    with torch.no_grad():
        logits = lm.model(torch.tensor([ids])).logits[0, -1].double().numpy()  # [vocab]
    params = SamplingParams(temperature=0.7, top_p=0.95, max_new_tokens=1)
    samples = sample_completions(lm, ids, 2000, params, seed=0, batch_size=1000)
    counts = np.bincount([s.token_ids[0] if s.token_ids else lm.tokenizer.eos_token_id for s in samples],
                         minlength=len(logits))
    probs = _nucleus_probs(logits, 0.7, 0.95)
    assert counts[probs == 0].sum() == 0
    assert _chi2_pvalue(counts, probs) > 1e-3


def test_temperature_zero_is_greedy_decoding(loaded):
    lm = loaded("gpt_neox")
    ids = lm.prompt_ids(PROMPT, chat=False)
    out = sample_completions(lm, ids, 3, SamplingParams(temperature=0, max_new_tokens=12), seed=5)
    tokens = list(ids)
    with torch.no_grad():  # greedy without a KV cache, one full forward per token
        for _ in range(12):
            tokens.append(int(lm.model(torch.tensor([tokens])).logits[0, -1].argmax()))
    assert all(s.token_ids == tokens[len(ids):] for s in out)
    assert [s.seed for s in out] == [5, 6, 7] and out[0].finish_reason == "length"


def _eos_after(lm, prompt_len: int, steps_by_row: list[int]):
    """An edit of the last resid_post that makes row r say EOS once it has generated steps_by_row[r] tokens."""
    eos = lm.tokenizer.eos_token_id
    direction = lm.model.get_output_embeddings().weight[eos].detach()  # [d_model]

    def edit(h: torch.Tensor, pos) -> torch.Tensor:  # h [batch, seq, d_model]
        due = pos.token >= prompt_len - 1 + torch.tensor(steps_by_row)[:, None]  # [batch, seq]
        return h + 50.0 * due[..., None].to(h.dtype) * direction
    return {Site(lm.n_layers - 1, "resid_post"): edit}


def test_rows_stop_on_eos_independently_and_edits_apply(loaded):
    lm = loaded("llama")
    ids = lm.prompt_ids(PROMPT)
    edits = _eos_after(lm, len(ids), [2, 5, 3])
    out = sample_completions(lm, ids, 3, SamplingParams(max_new_tokens=10), seed=1, batch_size=3, edits=edits)
    assert [len(s.token_ids) for s in out] == [2, 5, 3]
    assert all(s.finish_reason == "eos" for s in out)
    assert all(lm.tokenizer.eos_token_id not in s.token_ids for s in out)
    assert out[1].text == lm.tokenizer.decode(out[1].token_ids)
    plain = sample_completions(lm, ids, 3, SamplingParams(max_new_tokens=10), seed=1, batch_size=3)
    assert [s.token_ids[:2] for s in plain] == [s.token_ids[:2] for s in out]  # before the edit: same tokens
    assert all(len(s.token_ids) > 5 for s in plain)


def test_bad_requests_are_clear_errors(loaded):
    lm = loaded("gpt2")
    ids = lm.prompt_ids(PROMPT)
    with pytest.raises(AuditError, match="at most 448 fit"):
        sample_completions(lm, list(range(3, 460)), 1, SamplingParams(max_new_tokens=64), seed=0)
    with pytest.raises(AuditError, match="below the model's context"):
        sample_completions(lm, ids, 1, SamplingParams(max_new_tokens=512), seed=0)
    for bad in (dict(temperature=-1.0), dict(temperature=float("nan")), dict(top_p=0.0), dict(top_p=1.5),
                dict(max_new_tokens=0)):
        with pytest.raises(AuditError):
            SamplingParams(**bad)
    for n, seed, batch in ((0, 0, 8), (2, -1, 8), (2, 0, 0)):
        with pytest.raises(AuditError):
            sample_completions(lm, ids, n, SamplingParams(), seed=seed, batch_size=batch)
    with pytest.raises(AuditError, match="empty"):
        sample_completions(lm, [], 1, SamplingParams(), seed=0)


def test_cancel_mid_batch_and_between_batches(loaded):
    lm = loaded("llama")
    ids = lm.prompt_ids(PROMPT)
    params = SamplingParams(max_new_tokens=20)
    probe = Probe(stop=lambda events: len(events) >= 6)
    out = sample_completions(lm, ids, 8, params, seed=0, batch_size=4, progress=probe)
    calls = [(d, t) for d, t, _ in probe.events]
    assert len(out) == 4 and all(s.finish_reason == "cancelled" for s in out)
    assert all(len(s.token_ids) == 6 for s in out) and calls[-1] == (24, 160)
    full = sample_completions(lm, ids, 4, params, seed=0)
    assert [s.token_ids[:6] for s in full] == [s.token_ids for s in out]

    probe = Probe(stop=lambda events: bool(events) and events[-1][0] >= 80)
    out = sample_completions(lm, ids, 8, params, seed=0, batch_size=4, progress=probe)
    progress = [(d, t) for d, t, _ in probe.events]
    assert [s.token_ids for s in out] == [s.token_ids for s in full] and progress[-1] == (80, 160)
    steps = [d for d, _ in progress]
    assert steps == sorted(steps) and steps[:2] == [4, 8]


@pytest.mark.slow
def test_smollm2_batched_sampling_matches_one_by_one_and_stops_on_eos(smollm2):
    ids = smollm2.prompt_ids("What is 2+2? Answer with one word.")
    params = SamplingParams(temperature=0.7, top_p=0.95, max_new_tokens=48)
    batched = sample_completions(smollm2, ids, 4, params, seed=3, batch_size=4)
    alone = [sample_completions(smollm2, ids, 1, params, seed=3 + i)[0] for i in range(4)]
    assert [s.token_ids for s in batched] == [s.token_ids for s in alone]
    assert any(s.finish_reason == "eos" for s in batched)
    assert all("<|im_end|>" not in s.text for s in batched)

"""Batched, seeded, KV-cached generation of rows that may have different prompts.

Row i has its own prompt and its own seed. Prompts are left-padded to the longest one with the
tokenizer's pad id and an attention mask, so every row's first generated token sits at the same
column; transformers derives each row's position ids from the mask, and `SiteHooks` edits see each
row's own positions (`Positions.token`: 0 at the row's first real token, -1 on padding). Sampling
is sampling.py's: temperature and top-p warpers, then Gumbel noise from one generator per row
seed (`GumbelNoise`), argmax; temperature 0 is greedy. A row's completion therefore depends only
on its prompt, its seed and the edits applied to it, not on the other rows of the batch (up to
float differences between batch shapes, which flip a token only on a near-tie).

`generate_rows` is one `generate` call; progress counts token steps like sampling.py
(`progress.progress(done, total, "sampling")`, `progress.should_stop()` after every token, which
ends the call with finish_reason "cancelled" on unfinished rows).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import nullcontext

import torch
from torch import Tensor
from transformers import GenerationConfig, StoppingCriteriaList

from auditui.engine.model import LoadedModel
from auditui.engine.sampling import (
    Sample,
    SamplingParams,
    _finish,
    _Monitor,
    check_counts,
    check_request,
    eos_ids,
    sampling_processors,
)
from auditui.engine.sites import Edit, Site, SiteHooks
from auditui.errors import AuditError
from auditui.progress import QUIET, Progress

Edits = Mapping[Site, Edit | list[Edit]]


def pad_left(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Left-padded ids [rows, width] and attention mask [rows, width] (1 on real tokens)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    return ids.to(device), mask.to(device)


def check_rows(lm: LoadedModel, prompts: Sequence[Sequence[int]], seeds: Sequence[int],
               params: SamplingParams) -> None:
    """Clear errors before any work: one seed per prompt, valid seeds, every prompt fits the context."""
    if not prompts or len(prompts) != len(seeds):
        raise AuditError(f"give one seed per prompt (got {len(prompts)} prompts and {len(seeds)} seeds)")
    for seed in set(seeds):
        check_counts(1, seed, 1)
    for prompt in {tuple(p) for p in prompts}:
        check_request(lm, list(prompt), 1, params, seeds[0], 1)


def generation_config(lm: LoadedModel, params: SamplingParams) -> GenerationConfig:
    """Greedy search (sampling is done by the logits processors) with every default pinned neutral,
    so the model's own generation defaults (repetition penalty ...) never change what is sampled."""
    return GenerationConfig(max_new_tokens=params.max_new_tokens, do_sample=False, num_beams=1,
                            repetition_penalty=1.0, no_repeat_ngram_size=0, min_length=0, min_new_tokens=0,
                            use_cache=True, eos_token_id=eos_ids(lm), pad_token_id=lm.tokenizer.pad_token_id)


def generate_rows(lm: LoadedModel, prompts: Sequence[Sequence[int]], seeds: Sequence[int], params: SamplingParams,
                  edits: Edits | None = None, progress: Progress = QUIET, done: int = 0,
                  total: int | None = None) -> list[Sample]:
    """One completion per row (prompt i, seed i) in one KV-cached `generate` call, with site edits.

    done / total: token steps already counted before this call and in the whole job (progress of a
    job made of several calls); total defaults to rows * max_new_tokens.
    """
    check_rows(lm, prompts, seeds, params)
    ids, mask = pad_left(prompts, lm.tokenizer.pad_token_id, lm.device)  # [rows, width]
    monitor = _Monitor(done, len(prompts), total or len(prompts) * params.max_new_tokens, progress)
    with torch.inference_mode(), SiteHooks(lm.model, edits=edits) if edits else nullcontext():
        out = lm.model.generate(ids, attention_mask=mask, generation_config=generation_config(lm, params),
                                logits_processor=sampling_processors(params, list(seeds), lm.device),
                                stopping_criteria=StoppingCriteriaList([monitor]))  # [rows, width + new]
    eos = set(eos_ids(lm))
    samples = []
    for row, seed in zip(out[:, ids.shape[1]:].tolist(), seeds, strict=True):
        tokens, reason = _finish(row, eos, params.max_new_tokens)
        samples.append(Sample(text=lm.tokenizer.decode(tokens), token_ids=tokens, seed=seed, finish_reason=reason))
    return samples

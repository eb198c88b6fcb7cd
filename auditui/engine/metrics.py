"""Judge-free text metrics, shown beside every judge score.

    completion_perplexity(lm, seqs) -> [exp(mean NLL of the completion tokens) | None]  (unsteered model)
    repetition_rate(token_ids, n) -> share of the text's n-grams that repeat an earlier n-gram

Perplexity is a coherence proxy: a steered text the unsteered model finds unlikely has drifted.
Empty completions have no perplexity (None).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from auditui.engine.attribution import completion_nll
from auditui.engine.reference import TokenSeq, pad_batch
from auditui.progress import QUIET, Progress, stop_if_asked

if TYPE_CHECKING:
    from auditui.engine.model import LoadedModel

REPEAT_N = 3


def repetition_rate(token_ids: list[int], n: int = REPEAT_N) -> float:
    """1 - distinct n-grams / n-grams; 0 for texts shorter than n + 1 tokens."""
    grams = [tuple(token_ids[i:i + n]) for i in range(len(token_ids) - n + 1)]
    return 0.0 if len(grams) < 2 else 1 - len(set(grams)) / len(grams)


def completion_perplexity(lm: LoadedModel, seqs: list[TokenSeq], batch_size: int = 8,
                          progress: Progress = QUIET) -> list[float | None]:
    """Perplexity of each sequence's completion tokens given its prompt, in input order."""
    out: list[float | None] = [None] * len(seqs)
    order = sorted((i for i, s in enumerate(seqs) if len(s) > s.n_prompt >= 1), key=lambda i: len(seqs[i]))
    for start in range(0, len(order), batch_size):
        stop_if_asked(progress)
        part = order[start:start + batch_size]
        batch = [seqs[i] for i in part]
        ids, mask = pad_batch(batch, lm.tokenizer.pad_token_id or 0, lm.device)  # [B, T]
        with torch.inference_mode():
            nll = completion_nll(lm, ids, mask, batch)  # [B] summed over completion tokens
        for i, seq, total in zip(part, batch, nll.tolist(), strict=True):
            out[i] = math.exp(min(total / (len(seq) - seq.n_prompt), 700.0))
        progress.progress(min(start + batch_size, len(order)), len(order), "perplexity")
    return out

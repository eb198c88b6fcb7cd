"""Batched, seeded sampling of completions; every completion is reproducible from its own seed.

Completion i of a call gets seed `seed + i`. Sampling is Gumbel-max on top of transformers' greedy,
KV-cached `generate`: transformers' temperature and top-p warpers shape the logits, then
`GumbelNoise` adds noise -log(E), E ~ Exp(1), drawn from a torch.Generator seeded with that row's
seed, and greedy decoding takes the argmax, which is an exact sample of the tempered, top-p
truncated softmax. A row's noise depends only on its seed and step, so a completion is the same
whatever batch it was sampled in (up to float differences between batched and single-row matmuls,
which can flip a token only on a near-tie). All N completions share one prompt, so rows need no
padding. Temperature 0 is greedy decoding.

Progress is counted in token steps: `progress.progress(done, total, "sampling")` with total =
n * max_new_tokens; `progress.should_stop()` is checked after every generated token.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from auditui.engine.model import LoadedModel
from auditui.engine.sites import Edit, Site
from auditui.errors import AuditError
from auditui.progress import QUIET, Progress

MAX_SEED = 2**62


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 0.95
    max_new_tokens: int = 64
    chat: bool | None = None  # None: use the chat template when the model has one
    system: str | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.temperature < float("inf"):  # also rejects NaN
            raise AuditError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise AuditError(f"top-p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise AuditError(f"max new tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class Sample:
    text: str
    token_ids: list[int]  # generated tokens, without the final EOS
    seed: int
    finish_reason: str  # "eos" | "length" | "cancelled"


class GumbelNoise(LogitsProcessor):
    """Adds Gumbel noise from one generator per row: argmax(scores + noise) samples softmax(scores)."""

    def __init__(self, seeds: list[int], device: torch.device):
        self.generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:  # scores [batch, vocab]
        exp = torch.stack([torch.empty(scores.shape[-1], device=scores.device, dtype=torch.float32)
                           .exponential_(generator=gen) for gen in self.generators])  # [batch, vocab]
        return scores - exp.clamp_min(torch.finfo(torch.float32).tiny).log()


def sampling_processors(params: SamplingParams, seeds: list[int], device: torch.device) -> LogitsProcessorList:
    """Temperature, top-p and per-row Gumbel noise; empty for temperature 0 (greedy)."""
    if params.temperature == 0:
        return LogitsProcessorList()
    warpers: list[LogitsProcessor] = [TemperatureLogitsWarper(params.temperature)]
    if params.top_p < 1:
        warpers.append(TopPLogitsWarper(params.top_p))
    return LogitsProcessorList([*warpers, GumbelNoise(seeds, device)])


class _Monitor(StoppingCriteria):
    """Called once per generated token: reports progress and stops every row when asked to."""

    def __init__(self, base: int, rows: int, total: int, progress: Progress):
        self.base, self.rows, self.total, self.steps = base, rows, total, 0
        self.progress = progress

    def __call__(self, input_ids: Tensor, scores: Tensor | None, **kwargs: object) -> Tensor:
        self.steps += 1
        self.progress.progress(self.base + self.steps * self.rows, self.total, "sampling")
        stop = self.progress.should_stop()
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


def eos_ids(lm: LoadedModel) -> list[int]:
    """End-of-sequence ids of the tokenizer and of the model's generation config."""
    ids = {lm.tokenizer.eos_token_id}
    configured = lm.model.generation_config.eos_token_id
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)


def use_chat(lm: LoadedModel, params: SamplingParams) -> bool:
    """Whether the prompt goes through the chat template (params.chat None: when the model has one)."""
    chat = lm.has_chat_template if params.chat is None else params.chat
    if params.system and not chat:
        raise AuditError("a system prompt needs the chat template (drop --raw or the system prompt)")
    return chat


def check_counts(n: int, seed: int, batch_size: int) -> None:
    if n < 1 or batch_size < 1:
        raise AuditError(f"the number of samples and the batch size must be >= 1 (got {n}, {batch_size})")
    if not 0 <= seed <= MAX_SEED:
        raise AuditError(f"the seed must be in 0..{MAX_SEED}, got {seed}")


def check_request(lm: LoadedModel, prompt_ids: list[int], n: int, params: SamplingParams, seed: int,
                  batch_size: int) -> None:
    """Clear errors for requests that cannot be sampled, before any work is done."""
    check_counts(n, seed, batch_size)
    if not prompt_ids:
        raise AuditError("the prompt is empty")
    context = lm.max_positions
    if params.max_new_tokens >= context:
        raise AuditError(f"max new tokens ({params.max_new_tokens}) must be below the model's context "
                         f"of {context} tokens")
    if len(prompt_ids) > context - params.max_new_tokens:
        raise AuditError(f"the prompt has {len(prompt_ids)} tokens; with {params.max_new_tokens} new tokens "
                         f"at most {context - params.max_new_tokens} fit in the model's context of {context}")


def _finish(row: list[int], eos: set[int], max_new_tokens: int) -> tuple[list[int], str]:
    """Cut a generated row at its first EOS; say why it ended."""
    for i, token in enumerate(row):
        if token in eos:
            return row[:i], "eos"
    return row, "length" if len(row) >= max_new_tokens else "cancelled"


def iter_sample_batches(lm: LoadedModel, prompt_ids: list[int], n: int, params: SamplingParams, seed: int,
                        batch_size: int = 8, progress: Progress = QUIET,
                        edits: Mapping[Site, Edit | list[Edit]] | None = None) -> Iterator[list[Sample]]:
    """Yield the completions batch by batch (seeds seed .. seed+n-1); stop early when asked to.

    A batch interrupted by `progress.should_stop()` is yielded with finish_reason "cancelled" on its
    unfinished rows.
    """
    from auditui.engine.generation import generate_rows  # generation builds on this module's pieces

    check_request(lm, prompt_ids, n, params, seed, batch_size)
    total = n * params.max_new_tokens
    for start in range(0, n, batch_size):
        if progress.should_stop():
            return
        seeds = [seed + i for i in range(start, min(n, start + batch_size))]
        batch = generate_rows(lm, [prompt_ids] * len(seeds), seeds, params, edits, progress,
                              start * params.max_new_tokens, total)
        stopped = any(sample.finish_reason == "cancelled" for sample in batch)
        if not stopped:  # the batch's share in full (rows that ended early), before the caller stores it
            progress.progress((start + len(seeds)) * params.max_new_tokens, total, "sampling")
        yield batch
        if stopped:
            return


def sample_completions(lm: LoadedModel, prompt_ids: list[int], n: int, params: SamplingParams, seed: int,
                       batch_size: int = 8, progress: Progress = QUIET,
                       edits: Mapping[Site, Edit | list[Edit]] | None = None) -> list[Sample]:
    """N completions of `prompt_ids`, sampled `batch_size` at a time; completion i has seed `seed + i`."""
    return [sample for batch in iter_sample_batches(lm, prompt_ids, n, params, seed, batch_size, progress, edits)
            for sample in batch]


def random_seed() -> int:
    return secrets.randbelow(2**31)

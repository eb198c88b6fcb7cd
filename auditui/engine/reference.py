"""Token sequences of a session, reading sites over them, and the reference mean ā per site.

Sequences
    `TokenSeq(ids, n_prompt, counted_from, completion_id, prompt_id)`: stored token ids, never
    re-tokenized text. `text_sequences(prompts, completions)` gives every text of a session once:
    each completion as prompt + completion, its prompt tokens counted only for the first completion
    of that prompt (`counted_from`), and prompts without completions on their own.
    `file_sequences(lm, path)` cuts a text file into windows of `FILE_WINDOW` tokens.
    Position 0 of every sequence is never counted: it is the attention sink (on SmolLM2 its
    residual norm is ~25,000 against a median of ~140).

Reading
    `pad_batch` right-pads a batch (causal models: real tokens never see the padding);
    `read_sites(lm, seqs, sites)` runs the model body only up to the last needed layer and yields
    `(batch, ids [B, T], acts {site: [B, T, width] float32})`; `encode_rows(sae, x)` is
    `sae.encode` in row chunks (memory stays bounded for wide SAEs).

Reference mean
    `mean_activations(lm, seqs, sites)`: ā_s = mean of site s over the counted positions of the
    reference texts, leaving out tokens whose norm exceeds `OUTLIER_FACTOR` x the batch median
    (further attention-sink tokens; `inliers(rows)`). Storing and reusing them is
    `auditui.workflows.reference`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from auditui.engine.sites import Site, SiteHooks
from auditui.errors import AuditError
from auditui.progress import QUIET, Progress, stop_if_asked

if TYPE_CHECKING:
    from sae_lens import SAE

    from auditui.engine.model import LoadedModel

FILE_WINDOW = 128  # tokens per window of a reference text file
FILE_MAX_TOKENS = 65_536  # a reference file is read up to this many tokens
OUTLIER_FACTOR = 10.0
ROW_BUDGET = 1 << 24  # elements of one [rows, d_sae] chunk


@dataclass(frozen=True)
class TokenSeq:
    """One token sequence: the first `n_prompt` ids are the prompt, the rest the completion."""

    ids: tuple[int, ...]
    n_prompt: int
    counted_from: int = 1  # positions >= this are this text's own tokens (0, the sink, never is)
    completion_id: int | None = None
    prompt_id: int | None = None

    def __len__(self) -> int:
        return len(self.ids)


# -- sequences ---------------------------------------------------------------------------------
def stored_prompt_ids(prompt: dict) -> list[int]:
    ids = prompt.get("prompt_ids")
    if not ids:
        raise AuditError(f"prompt {prompt['id']} has no stored token ids; sample it again with this version")
    return [int(i) for i in ids]


def completion_sequence(prompt: dict, completion: dict, counted_from: int = 1) -> TokenSeq:
    prompt_ids = stored_prompt_ids(prompt)
    token_ids = [int(i) for i in (completion.get("token_ids") or [])]  # may be empty (immediate EOS)
    return TokenSeq(ids=tuple(prompt_ids + token_ids), n_prompt=len(prompt_ids),
                    counted_from=max(1, counted_from), completion_id=completion["id"],
                    prompt_id=prompt["id"])


def text_sequences(prompts: list[dict], completions: list[dict]) -> list[TokenSeq]:
    """Every text once (see module docstring); prompts and completions as stored rows."""
    by_prompt: dict[int, list[dict]] = {}
    for completion in completions:
        by_prompt.setdefault(completion["prompt_id"], []).append(completion)
    seqs = []
    for prompt in prompts:
        own = by_prompt.get(prompt["id"], [])
        ids = stored_prompt_ids(prompt)
        if not own:
            seqs.append(TokenSeq(ids=tuple(ids), n_prompt=len(ids), prompt_id=prompt["id"]))
        for i, completion in enumerate(own):
            seqs.append(completion_sequence(prompt, completion, counted_from=1 if i == 0 else len(ids)))
    return seqs


def file_sequences(lm: LoadedModel, path: Path) -> list[TokenSeq]:
    """A text file as windows of FILE_WINDOW tokens (at most FILE_MAX_TOKENS tokens in all)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AuditError(f"cannot read reference text {path}: {exc}") from None
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"][:FILE_MAX_TOKENS]
    if len(ids) < 2:
        raise AuditError(f"reference text {path} holds fewer than 2 tokens")
    return [TokenSeq(ids=tuple(ids[i:i + FILE_WINDOW]), n_prompt=len(ids[i:i + FILE_WINDOW]))
            for i in range(0, len(ids), FILE_WINDOW) if len(ids[i:i + FILE_WINDOW]) > 1]


def check_vocab(lm: LoadedModel, seqs: list[TokenSeq]) -> None:
    vocab = int(lm.model.config.vocab_size)
    longest = max(len(s) for s in seqs)
    if longest > lm.max_positions:
        raise AuditError(f"a stored sequence has {longest} tokens; {lm.model_id} takes {lm.max_positions}")
    if any(max(s.ids) >= vocab or min(s.ids) < 0 for s in seqs):
        raise AuditError(f"stored token ids fall outside the vocabulary of {lm.model_id} ({vocab}); "
                         "the session was sampled with another model")


# -- batches and reading -----------------------------------------------------------------------
def pad_batch(seqs: list[TokenSeq], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Right-padded ids [B, T] and attention mask [B, T]."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, :len(seq)] = torch.tensor(seq.ids)
        mask[row, :len(seq)] = 1
    return ids.to(device), mask.to(device)


def span_mask(seqs: list[TokenSeq], spans: list[tuple[int, int]], width: int, device: torch.device) -> Tensor:
    """Bool [B, width], True on positions start <= t < end of each row's span."""
    positions = torch.arange(width)
    bounds = torch.tensor(spans, dtype=torch.long).reshape(len(seqs), 2)
    mask = (positions >= bounds[:, :1]) & (positions < bounds[:, 1:])
    return mask.to(device)


def counted_mask(seqs: list[TokenSeq], width: int, device: torch.device) -> Tensor:
    """Bool [B, width]: the positions that are each sequence's own text."""
    return span_mask(seqs, [(s.counted_from, len(s)) for s in seqs], width, device)


def batches(seqs: list[TokenSeq], batch_size: int) -> list[list[TokenSeq]]:
    """Batches of similar lengths (less padding), order within the input otherwise kept."""
    ordered = sorted(seqs, key=len)
    return [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]


class _Stop(Exception):
    """Raised by a hook once the last needed layer has run."""


def _stop(*_args: object) -> None:
    raise _Stop


def read_sites(lm: LoadedModel, seqs: list[TokenSeq], sites: list[Site], batch_size: int = 8
               ) -> Iterator[tuple[list[TokenSeq], Tensor, dict[Site, Tensor]]]:
    """Yield (batch, ids [B, T], {site: acts [B, T, width] float32}) in inference mode."""
    body = lm.model.get_submodule(lm.adapter.body)
    last = lm.model.get_submodule(f"{lm.adapter.layers}.{max(s.layer for s in sites)}")
    for batch in batches(seqs, batch_size):
        ids, mask = pad_batch(batch, lm.tokenizer.pad_token_id, lm.device)
        with torch.inference_mode(), SiteHooks(lm.model, reads=sites) as hooks:
            handle = last.register_forward_hook(_stop)  # after SiteHooks' own hook on that layer
            try:
                body(input_ids=ids, attention_mask=mask, use_cache=False)
            except _Stop:
                pass
            finally:
                handle.remove()
        yield batch, ids, {site: acts.float() for site, acts in hooks.acts.items()}


def rows_per_chunk(d_sae: int) -> int:
    return max(1, ROW_BUDGET // max(1, d_sae))


@torch.no_grad()
def encode_rows(sae: SAE, x: Tensor, latents: Tensor | None = None) -> Tensor:
    """`sae.encode` of rows x [N, width] -> [N, d_sae] (or [N, len(latents)]), in row chunks."""
    step = rows_per_chunk(sae.cfg.d_sae)
    chunks = []
    for start in range(0, x.shape[0], step):
        codes = sae.encode(x[start:start + step].to(sae.W_dec.device, torch.float32))
        chunks.append(codes if latents is None else codes[:, latents])
    if not chunks:
        return torch.zeros(0, sae.cfg.d_sae if latents is None else len(latents), device=sae.W_dec.device)
    return torch.cat(chunks)


# -- reference mean ----------------------------------------------------------------------------
def sequences_digest(seqs: list[TokenSeq]) -> str:
    payload = json.dumps([[list(s.ids), s.counted_from] for s in seqs]).encode()
    return hashlib.sha256(payload).hexdigest()


def inliers(rows: Tensor) -> Tensor:
    """Bool [N] of rows [N, width]: norm at most OUTLIER_FACTOR x the median norm (attention sinks out)."""
    norms = rows.norm(dim=-1)  # [N]
    return norms <= OUTLIER_FACTOR * norms.median() if len(rows) else torch.ones(0, dtype=torch.bool, device=rows.device)


def mean_activations(lm: LoadedModel, seqs: list[TokenSeq], sites: list[Site], batch_size: int = 8,
                     progress: Progress = QUIET) -> tuple[dict[Site, Tensor], dict[Site, int]]:
    """ā per site [width] over counted, non-outlier positions; and the number of positions used."""
    sums: dict[Site, Tensor] = {}
    counts: dict[Site, int] = {site: 0 for site in sites}
    done = 0
    for batch, ids, acts in read_sites(lm, seqs, sites, batch_size):
        counted = counted_mask(batch, ids.shape[1], lm.device)  # [B, T]
        for site in sites:
            rows = acts[site][counted]  # [N, width]
            rows = rows[inliers(rows)]
            sums[site] = sums.get(site, 0) + rows.double().sum(0)
            counts[site] += rows.shape[0]
        done += len(batch)
        progress.progress(done, len(seqs), "reference mean")
        stop_if_asked(progress)
    if any(n == 0 for n in counts.values()):
        raise AuditError("the reference texts have no token to average (each text needs 2+ tokens)")
    return {site: (sums[site] / counts[site]).float() for site in sites}, counts

"""Token sequences of a session, reading sites over them, and the reference mean ā per site.

Sequences
    `TokenSeq(ids, n_prompt, counted_from, completion_id, prompt_id)`: stored token ids, never
    re-tokenized text. `session_sequences(store, session_id)` gives every text of a session once:
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
    `reference_means(engine, store, session_id, sites, text_file=None) -> Reference`:
    ā_s = mean of site s over the counted positions of the reference texts (the session's texts,
    or a text file), leaving out tokens whose norm exceeds `OUTLIER_FACTOR` x the batch median
    (further attention-sink tokens). Stored in the session DB as a run of kind "reference_mean":
    params {model_id, source, path, digest}, result {sites, tokens: {site: n}}, one blob per site
    (name = site text, safetensors bytes {"mean": [width] float32}). A later call with the same
    model and the same texts (same token-id digest, or same file content) reuses the stored means
    and computes only the sites it lacks. `Reference.runs` maps each site to the run holding its
    ā; `load_reference(store, runs)` reads them back (e.g. to re-check an attribution run).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor

from auditui.engine.sites import Site, SiteHooks
from auditui.errors import AuditError

if TYPE_CHECKING:
    from sae_lens import SAE

    from auditui.engine import Engine
    from auditui.engine.model import LoadedModel
    from auditui.store.database import Store

REFERENCE_KIND = "reference_mean"
FILE_WINDOW = 128  # tokens per window of a reference text file
FILE_MAX_TOKENS = 65_536  # a reference file is read up to this many tokens
OUTLIER_FACTOR = 10.0
ROW_BUDGET = 1 << 24  # elements of one [rows, d_sae] chunk
Progress = Callable[[int, int, str], None]


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


@dataclass
class Reference:
    means: dict[Site, Tensor]  # site -> ā [width] float32 on the engine device
    runs: dict[Site, int]  # site -> id of the reference_mean run holding it
    source: str  # "session" or the text file path
    tokens: dict[Site, int] = field(default_factory=dict)  # positions averaged per site


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


def session_sequences(store: Store, session_id: int) -> list[TokenSeq]:
    """Every text of the session once (see module docstring)."""
    by_prompt: dict[int, list[dict]] = {}
    for completion in store.completions(session_id=session_id):
        by_prompt.setdefault(completion["prompt_id"], []).append(completion)
    seqs = []
    for prompt in store.prompts(session_id):
        completions = by_prompt.get(prompt["id"], [])
        ids = stored_prompt_ids(prompt)
        if not completions:
            seqs.append(TokenSeq(ids=tuple(ids), n_prompt=len(ids), prompt_id=prompt["id"]))
        for i, completion in enumerate(completions):
            seqs.append(completion_sequence(prompt, completion, counted_from=1 if i == 0 else len(ids)))
    if not seqs:
        raise AuditError(f"session {session_id} has no prompts yet; add and sample some first")
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


def _reference_texts(engine: Engine, store: Store, session_id: int, text_file: Path | None
                     ) -> tuple[list[TokenSeq], dict]:
    if text_file is None:
        seqs = session_sequences(store, session_id)
        key = {"model_id": engine.lm.model_id, "source": "session", "path": "", "digest": sequences_digest(seqs)}
    else:
        seqs = file_sequences(engine.lm, Path(text_file))
        key = {"model_id": engine.lm.model_id, "source": "file", "path": str(Path(text_file).resolve()),
               "digest": hashlib.sha256(Path(text_file).read_bytes()).hexdigest()}
    check_vocab(engine.lm, seqs)
    return seqs, key


def stored_means(store: Store, session_id: int, key: dict, device: torch.device) -> Reference:
    """The means already stored for `key` (model + texts), site by site."""
    found = Reference(means={}, runs={}, source=key["path"] or key["source"])
    for run in store.runs(session_id, REFERENCE_KIND):
        if run["status"] != "done" or {k: run["params"].get(k) for k in key} != key:
            continue
        for site_text, n_tokens in run["result"]["tokens"].items():
            site = Site.parse(site_text)
            found.means.setdefault(site, _load_mean(store, run["id"], site).to(device))
            found.runs.setdefault(site, run["id"])
            found.tokens.setdefault(site, n_tokens)
    return found


def _load_mean(store: Store, run_id: int, site: Site) -> Tensor:
    data = store.get_blob(run_id, str(site))
    if data is None:
        raise AuditError(f"reference run {run_id} lost its mean for {site}; delete the run and recompute")
    return load_tensors(data)["mean"]


def load_reference(store: Store, runs: dict[str, int], device: torch.device) -> dict[Site, Tensor]:
    """{site text: run id} -> {site: ā [width]} on `device`."""
    return {Site.parse(site): _load_mean(store, run_id, Site.parse(site)).to(device)
            for site, run_id in runs.items()}


def mean_activations(lm: LoadedModel, seqs: list[TokenSeq], sites: list[Site], batch_size: int = 8,
                     on_progress: Progress | None = None) -> tuple[dict[Site, Tensor], dict[Site, int]]:
    """ā per site [width] over counted, non-outlier positions; and the number of positions used."""
    sums: dict[Site, Tensor] = {}
    counts: dict[Site, int] = {site: 0 for site in sites}
    done = 0
    for batch, ids, acts in read_sites(lm, seqs, sites, batch_size):
        counted = counted_mask(batch, ids.shape[1], lm.device)  # [B, T]
        for site in sites:
            rows = acts[site][counted]  # [N, width]
            norms = rows.norm(dim=-1)
            rows = rows[norms <= OUTLIER_FACTOR * norms.median()] if len(rows) else rows
            sums[site] = sums.get(site, 0) + rows.double().sum(0)
            counts[site] += rows.shape[0]
        done += len(batch)
        if on_progress:
            on_progress(done, len(seqs), "reference mean")
    if any(n == 0 for n in counts.values()):
        raise AuditError("the reference texts have no token to average (each text needs 2+ tokens)")
    return {site: (sums[site] / counts[site]).float() for site in sites}, counts


def reference_means(engine: Engine, store: Store, session_id: int, sites: list[Site],
                    text_file: Path | str | None = None, batch_size: int = 8,
                    on_progress: Progress | None = None) -> Reference:
    """ā for each site: stored ones reused, missing ones computed in one pass and stored."""
    seqs, key = _reference_texts(engine, store, session_id, Path(text_file) if text_file else None)
    reference = stored_means(store, session_id, key, engine.lm.device)
    missing = [site for site in dict.fromkeys(sites) if site not in reference.means]
    if missing:
        means, counts = mean_activations(engine.lm, seqs, missing, batch_size, on_progress)
        run_id = store.start_run(session_id, REFERENCE_KIND, {**key, "sites": [str(s) for s in missing],
                                                              "n_texts": len(seqs)})
        for site in missing:
            store.put_blob(run_id, str(site), save_tensors({"mean": means[site].cpu().contiguous()}))
        store.finish_run(run_id, {"sites": [str(s) for s in missing],
                                  "tokens": {str(s): counts[s] for s in missing}},
                         {"headline": f"reference mean over {len(seqs)} texts ({key['source']}) "
                                      f"at {', '.join(str(s) for s in missing)}"})
        reference.means.update(means)
        reference.runs.update({site: run_id for site in missing})
        reference.tokens.update(counts)
    return reference

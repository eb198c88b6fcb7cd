"""A targeted dictionary's training windows: an audit session's own texts mixed with a pack's corpus.

    targeted_corpus(seqs, corpus, train_tokens, share, pad_id, seed) -> TokenCorpus

A dictionary trained on general text often has no latent for what one audit is about (issue 18: the
demo pack's best latent ranked a planted topic's token 67th in its logit lens). Trained on the
session's texts too, the same TopK trainer spends latents on them; `packs.build_pack` then trains,
exports through sae-lens, evaluates and writes the manifest exactly as for a pack.

Windows are as long as the longest session sequence (at most the corpus's window length). Each
session sequence (its prompt and completion, token ids as the attribution reads them) is one
window, right-padded with `pad_id`; `lengths` keeps its real length, so padding never trains or
counts. Corpus windows are cut to the same length. `share` of the training tokens come from the
session, whose sequences repeat (epochs) as often as that takes; every HOLD_EVERY-th session
sequence is held out instead, after the held-out corpus windows (which come first: the spliced-in
loss is measured on whole windows).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from auditui.engine.corpus import TokenCorpus
from auditui.engine.reference import TokenSeq
from auditui.errors import AuditError

HOLD_EVERY = 8
SESSION = "session"


def _cut(windows: torch.Tensor, length: int) -> torch.Tensor:
    """[n, seq_len] windows as [n * (seq_len // length), length] windows."""
    per = windows.shape[1] // length
    return windows[:, :per * length].reshape(-1, length)


def _padded(seqs: Sequence[TokenSeq], length: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, :len(seq)] = torch.tensor(seq.ids[:length], dtype=torch.long)
    return ids, torch.tensor([min(len(seq), length) for seq in seqs], dtype=torch.long)


def targeted_corpus(seqs: Sequence[TokenSeq], corpus: TokenCorpus, train_tokens: int, share: float = 0.5,
                    pad_id: int = 0, seed: int = 0) -> TokenCorpus:
    """The mixed windows (see module docstring); provenance counts the tokens of each part."""
    if not 0 < share < 1:
        raise AuditError(f"the session's share of the training tokens must be between 0 and 1, not {share:g}")
    seqs = [seq for seq in seqs if len(seq) > 1]
    if len(seqs) < 2:
        raise AuditError("a targeted dictionary needs at least 2 texts in the session; sample some first")
    length = min(corpus.seq_len, max(len(seq) for seq in seqs))
    held = [seq for i, seq in enumerate(seqs) if i % HOLD_EVERY == HOLD_EVERY - 1]
    train = [seq for i, seq in enumerate(seqs) if i % HOLD_EVERY != HOLD_EVERY - 1]
    session_ids, session_lengths = _padded(train, length, pad_id)
    per_epoch = int(session_lengths.sum())
    epochs = max(1, math.ceil(share * train_tokens / per_epoch))
    corpus_train = _cut(corpus.train, length)
    n_corpus = min(len(corpus_train), math.ceil((1 - share) * train_tokens / length))
    gen = torch.Generator().manual_seed(seed)
    corpus_train = corpus_train[torch.randperm(len(corpus_train), generator=gen)[:n_corpus]]
    ids = torch.cat([session_ids.repeat(epochs, 1), corpus_train])
    lengths = torch.cat([session_lengths.repeat(epochs), torch.full((n_corpus,), length)])
    order = torch.randperm(len(ids), generator=gen)
    sources = [SESSION] * (epochs * len(train)) + ["corpus"] * n_corpus
    held_corpus = _cut(corpus.held_out, length)
    held_ids, held_lengths = _padded(held, length, pad_id)
    provenance = {SESSION: {"sequences": len(train), "held_out_sequences": len(held), "tokens_per_epoch": per_epoch,
                            "epochs": epochs, "train_tokens": epochs * per_epoch},
                  "corpus": {"windows": n_corpus, "train_tokens": n_corpus * length, "window_length": length}}
    return TokenCorpus(train=ids[order], held_out=torch.cat([held_corpus, held_ids]),
                       train_sources=[sources[i] for i in order.tolist()], provenance=provenance,
                       train_lengths=lengths[order],
                       held_out_lengths=torch.cat([torch.full((len(held_corpus),), length), held_lengths]))

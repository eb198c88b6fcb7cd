"""Human-readable handles for latents: logit-lens tokens and top-activating snippets.

The logit lens of a direction d is the set of tokens whose unembedding rows have the largest
cosine with d after the final norm's elementwise gain (LayerNorm also centres d first), as in
nostalgebraist (2020) and seed 003. For attn_z SAEs pass `bank.output_decoder(site)` rows.

`top_snippets(engine, seqs, site, latent, k=8)` reads the site over token sequences (e.g. a
session's own texts: each prompt once, each completion once; only each sequence's counted
positions, so position 0, the attention sink, never counts), encodes with the site's SAE and
returns the k texts where the latent is most active, best first, as dicts:
    {"completion_id": int | None, "prompt_id": int, "max": float, "position": int (absolute
     position of the maximum), "in_completion": bool, "start": int (absolute position of the
     first shown token), "tokens": [str, ...], "activations": [float, ...] (one per token)}
showing `before` tokens before the maximum and `after` after it. Texts where the latent never
fires (activation <= 0) are left out. Cost: one forward up to the site's layer over the texts
plus one SAE encode (a worker thread, not the UI thread).
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from auditui.engine.reference import TokenSeq, encode_rows, read_sites
from auditui.engine.sites import Site
from auditui.progress import QUIET, Progress, stop_if_asked

if TYPE_CHECKING:
    from auditui.engine import Engine
    from auditui.engine.model import LoadedModel

# unit unembedding rows [vocab, d_model] per HF model; an entry goes when its model is freed
_UNEMBED_CACHE: weakref.WeakKeyDictionary[torch.nn.Module, Tensor] = weakref.WeakKeyDictionary()


def token_strings(lm: LoadedModel, ids: list[int]) -> list[str]:
    """Each token id as the text it stands for (byte-level marks decoded)."""
    tokenizer = lm.tokenizer
    return [tokenizer.convert_tokens_to_string([tok]) for tok in tokenizer.convert_ids_to_tokens(list(ids))]


def final_norm_gain(lm: LoadedModel) -> Tensor:
    """The final norm's elementwise gain [d_model] (Gemma stores it as w with gain 1 + w)."""
    norm = lm.model.get_submodule(lm.adapter.final_norm)
    weight = norm.weight.detach().float()
    return 1.0 + weight if lm.adapter.norm_kind == "rmsnorm_plus_one" else weight


def through_final_norm(lm: LoadedModel, directions: Tensor) -> Tensor:
    """Directions [n, d_model] as the final norm passes them on (centred for LayerNorm, gained)."""
    directions = directions.float().to(lm.device)
    if lm.adapter.norm_kind == "layernorm":
        directions = directions - directions.mean(dim=-1, keepdim=True)
    return directions * final_norm_gain(lm).to(lm.device)


def unit_unembedding(lm: LoadedModel) -> Tensor:
    """Unit-norm unembedding rows [vocab, d_model], cached while the model is alive."""
    w_u = _UNEMBED_CACHE.get(lm.model)
    if w_u is None:
        w_u = lm.model.get_output_embeddings().weight.detach().float()  # [vocab, d_model]
        w_u = _UNEMBED_CACHE[lm.model] = w_u / w_u.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return w_u


def logit_lens(lm: LoadedModel, directions: Tensor, k: int = 8, chunk: int = 256) -> list[list[tuple[str, float]]]:
    """Top-k (token, cosine) per direction [n, d_model], largest cosine first."""
    w_u = unit_unembedding(lm)
    out: list[list[tuple[str, float]]] = []
    for start in range(0, directions.shape[0], chunk):
        block = through_final_norm(lm, directions[start:start + chunk])  # [c, d_model]
        block = block / block.norm(dim=1, keepdim=True).clamp_min(1e-12)
        values, indices = (block @ w_u.T).topk(k, dim=1)  # [c, k]
        for vals, idx in zip(values.tolist(), indices.tolist(), strict=True):
            out.append(list(zip(token_strings(lm, idx), vals, strict=True)))
    return out


@torch.no_grad()
def logit_lens_tokens(lm: LoadedModel, directions: Tensor, k: int = 8) -> list[list[str]]:
    """Only the token strings of `logit_lens`."""
    return [[tok for tok, _ in row] for row in logit_lens(lm, directions, k)]


def latent_values(engine: Engine, seqs: list[TokenSeq], site: Site, latent: int, batch_size: int = 8,
                  progress: Progress = QUIET, stage: str = "snippets") -> list[tuple[TokenSeq, list[float]]]:
    """(seq, the latent's activation at every token of seq) for each of `seqs` (batched by length, so
    not in the input order); Cancelled when progress.should_stop()."""
    sae = engine.bank.sae(site)
    latent_index = torch.tensor([latent], device=sae.W_dec.device)
    out = []
    for batch, ids, acts in read_sites(engine.lm, seqs, [site], batch_size):
        rows = acts[site].reshape(-1, acts[site].shape[-1])  # [B*T, width]
        codes = encode_rows(sae, rows, latent_index)[:, 0].reshape(ids.shape).cpu()  # [B, T]
        out += [(seq, codes[row, :len(seq)].tolist()) for row, seq in enumerate(batch)]
        progress.progress(len(out), len(seqs), stage)
        stop_if_asked(progress)
    return out


def strongest(lm: LoadedModel, scanned: list[tuple[TokenSeq, list[float]]], k: int = 8, before: int = 24,
              after: int = 8) -> list[dict]:
    """The k snippets of `latent_values` output where the latent is most active over each sequence's
    counted positions (`TokenSeq.counted_from` on), best first; sequences where it never fires left out."""
    found = []  # (max, position, seq, activations of the whole sequence)
    for seq, values in scanned:
        own = values[seq.counted_from:]
        best = max(own, default=0.0)
        if best > 0:
            found.append((best, seq.counted_from + own.index(best), seq, values))
    found.sort(key=lambda item: -item[0])
    return [_snippet(lm, *item, before=before, after=after) for item in found[:k]]


def top_snippets(engine: Engine, seqs: list[TokenSeq], site: Site, latent: int, k: int = 8,
                 before: int = 24, after: int = 8, batch_size: int = 8, progress: Progress = QUIET) -> list[dict]:
    """The k texts of `seqs` where `latent` of `site` is most active (see module docstring);
    Cancelled when progress.should_stop()."""
    return strongest(engine.lm, latent_values(engine, seqs, site, latent, batch_size, progress), k, before, after)


def _snippet(lm: LoadedModel, best: float, position: int, seq: TokenSeq, values: list[float], before: int,
             after: int) -> dict:
    start, end = max(0, position - before), min(len(seq), position + after + 1)
    return {"completion_id": seq.completion_id, "prompt_id": seq.prompt_id, "max": best, "position": position,
            "in_completion": position >= seq.n_prompt, "start": start,
            "tokens": token_strings(lm, list(seq.ids[start:end])), "activations": values[start:end]}

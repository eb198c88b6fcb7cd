"""Human-readable handles for latents: logit-lens tokens of a decoder direction.

The logit lens of a direction d is the set of tokens whose unembedding rows have the largest
cosine with d after the final norm's elementwise gain (LayerNorm also centres d first), as in
nostalgebraist (2020) and seed 003.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from auditui.engine.model import LoadedModel

_UNEMBED_CACHE: dict[int, Tensor] = {}


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
    """Unit-norm unembedding rows [vocab, d_model], cached per loaded model."""
    key = id(lm.model)
    if key not in _UNEMBED_CACHE:
        w_u = lm.model.get_output_embeddings().weight.detach().float()  # [vocab, d_model]
        _UNEMBED_CACHE[key] = w_u / w_u.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return _UNEMBED_CACHE[key]


def logit_lens(lm: LoadedModel, directions: Tensor, k: int = 8, chunk: int = 256) -> list[list[tuple[str, float]]]:
    """Top-k (token, cosine) per direction [n, d_model], largest cosine first."""
    w_u = unit_unembedding(lm)
    out: list[list[tuple[str, float]]] = []
    for start in range(0, directions.shape[0], chunk):
        block = through_final_norm(lm, directions[start:start + chunk])  # [c, d_model]
        block = block / block.norm(dim=1, keepdim=True).clamp_min(1e-12)
        values, indices = (block @ w_u.T).topk(k, dim=1)  # [c, k]
        for vals, idx in zip(values.tolist(), indices.tolist(), strict=True):
            out.append([(lm.tokenizer.convert_tokens_to_string([lm.tokenizer.convert_ids_to_tokens(i)]), v)
                        for i, v in zip(idx, vals, strict=True)])
    return out


@torch.no_grad()
def logit_lens_tokens(lm: LoadedModel, directions: Tensor, k: int = 8) -> list[list[str]]:
    """Only the token strings of `logit_lens`."""
    return [[tok for tok, _ in row] for row in logit_lens(lm, directions, k)]

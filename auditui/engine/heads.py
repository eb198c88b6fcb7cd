"""Attention heads (seed 004): QK singular vectors, sparse attention decomposition, head <-> latent alignment.

Ω per head
  With x̄ = [n(x); 1], n the input norm without its affine part (LayerNorm: centred and scaled by
  1/std; RMSNorm: scaled by 1/rms) applied to resid_pre, a head's query and key (pre-rotary) are
  q = x̄ @ A and k = x̄ @ B with the folded maps
      A = [[diag(g) W_Q] ; [β W_Q + b_Q]]  [d_model+1, d_head]   (g, β: the norm's weight, bias)
  and B likewise (LayerNorm models also project out the mean in the top block: singular vectors
  are then orthogonal to the all-ones direction, which n(x) never has). Ω = A Bᵀ [(d+1) x (d+1)]
  is the paper's W_Qᵀ W_K in residual space, the query/key biases living in the extra coordinate.
  rank Ω <= d_head, and its SVD U Σ Vᵀ (truncated to d_head) is computed exactly through thin
  QRs: A = Q_A R_A, B = Q_B R_B, R_A R_Bᵀ = P Σ Wᵀ, U = Q_A P, V = Q_B W. The gain
  G = R_Aᵀ P [d_head, d_head] gives A = U Gᵀ, i.e. q = G (Uᵀ x̄). `omega_svd` computes every
  layer once and caches it on disk keyed by a sha256 of the weights Ω depends on.

Exactness under rotary embeddings (llama, qwen2, smollm, gemma2, gpt_neox's partial rotary)
  RoPE rotates q at position r and k at position j, score = scale · (R_r q_r) · (R_j k_j). We keep
  ONE basis per head, the SVD of the position-free Ω, and bring every key into its query's frame:
  k̃_rj = R_rᵀ (R_j k_j), the model's post-rotary key rotated back by the query's angle. Then
      score(r, j) = Σ_k scale · α_k γ_k,   α = Uᵀ x̄_r,   γ = Gᵀ k̃_rj,
  exactly, since Σ_k α_k γ_k = (G α)·k̃ = q_r · R_rᵀ R_j k_j (a rope attention factor, if any, is in
  the model's cos/sin and so on both sides). For un-rotated dims (GPT-2, the pass-through dims of
  partial rotary) and at offset 0, γ_k = σ_k v_kᵀ x̄_j: the paper's residual-space terms
  σ_k (u_kᵀ x̄_r)(v_kᵀ x̄_j). Rejected: an SVD of A R_{j-r} Bᵀ per offset gives every key its own
  basis, so relative attention (a mean over keys at many offsets) would have no common terms and
  S(v), N_recon, the rotation control and latent alignment would not refer to fixed directions.

Relative attention decomposition (section 5)
  For query r the visible keys are j <= r (and r - j < window on sliding-window layers), m of them.
  ℓ̃_j = ℓ_j - mean_{i≠j visible} ℓ_i with ℓ the scaled pre-softmax score; since ℓ is linear in the
  key, its terms are scale · α_k (γ_kj - mean_{i≠j} γ_ki) and they sum exactly to ℓ̃_j. Gemma-2
  soft-caps scores (cap · tanh(ℓ / cap)): the terms decompose the PRE-cap ℓ̃ and
  `relative_capped` reports the same difference on the capped scores the softmax sees (tanh is
  monotone: same sign). S(v) = (mean|v|)² / mean(v²) over the d_head terms (1: all equal, 1/n: one
  non-zero; S of all-zero terms is 1). N_recon = the fewest terms, largest first (in the direction
  of ℓ̃'s sign), whose running sum reaches ℓ̃. Control: U and V rotated by one random orthogonal
  matrix Q of the rank-d_head space (U Q, V Q; the same spectrum Σ), seeded per (seed, layer, head).
  Its terms are scale · σ_k (Qᵀa)_k (Qᵀb)_k with a = Uᵀ x̄_r = α and b = γ / σ the (relative) key's
  coordinates in the V basis (pseudo-inverse: 0 where σ_k ≈ 0); its S and N_recon (against its own
  sum, which is not ℓ̃) sit beside every decomposition.

Scan: one forward through the base model captures resid_pre of every layer and the rotary cos/sin;
then per layer, batched over heads, the scores, attention weights and, for every (head, query, key)
with attention above a threshold, the terms, S, N_recon and the control S.

Alignment: singular vectors are compared in the residual space through their first d_model
coordinates (the bias coordinate is dropped; `query_norm`/`key_norm` say how much of the unit
vector lies there). The decoder should be the residual SAE feeding the layer (resid_pre(L), i.e.
resid_post(L-1)). Reference: the same max-|cos| statistic for random unit vectors of width d_model
against the same decoder (or the same set of singular vectors).

Everything is computed in float32 on the model's device; with a bf16/fp16 model the terms sum to
the model's scores up to that precision.
"""

from __future__ import annotations

import hashlib
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from auditui.engine.head_weights import HeadWeights, attention_module, head_weights, input_norm
from auditui.errors import AuditError

if TYPE_CHECKING:
    from auditui.engine.model import LoadedModel

FORMAT = "auditui-omega/1"
_SVD_KEYS = ("u", "s", "v", "gain")
_PINV_RTOL = 1e-5


# -- Ω and its SVD ---------------------------------------------------------------------------------
def folded_maps(weights: HeadWeights) -> tuple[Tensor, Tensor]:
    """Query and key maps with the input norm folded in and the biases as a last row, float32.

    Returns A [n_heads, d_model+1, d_head] and B [n_kv_heads, d_model+1, d_head]: q = x̄ @ A[h].
    """
    norm = weights.norm
    gain = norm.weight.float()[:, None]  # [d_model, 1]
    shift = None if norm.bias is None else norm.bias.float()

    def fold(w: Tensor, b: Tensor | None) -> Tensor:  # w [heads, d_model, d_head] -> [heads, d_model+1, d_head]
        w = w.float()
        top = gain * w
        if norm.kind == "layernorm":
            top = top - top.mean(dim=1, keepdim=True)
        bias = torch.zeros(w.shape[0], w.shape[2], device=w.device) if b is None else b.float()
        if shift is not None:
            bias = bias + shift @ w
        return torch.cat([top, bias[:, None, :]], dim=1)

    return fold(weights.w_q, weights.b_q), fold(weights.w_k, weights.b_k)


def omega(weights: HeadWeights) -> Tensor:
    """Ω = A Bᵀ per head, [n_heads, d_model+1, d_model+1] (scale not included)."""
    query_map, key_map = folded_maps(weights)
    return query_map @ key_map[weights.kv_head].transpose(-1, -2)


@dataclass
class LayerSVD:
    """Ω = U Σ Vᵀ of every head of one layer, with what the decomposition needs (float32)."""

    layer: int
    u: Tensor  # [n_heads, d_model+1, d_head] left singular vectors (query side), columns
    s: Tensor  # [n_heads, d_head] singular values, descending
    v: Tensor  # [n_heads, d_model+1, d_head] right singular vectors (key side)
    gain: Tensor  # [n_heads, d_head, d_head] G: q = G (Uᵀ x̄)
    key_map: Tensor  # [n_kv_heads, d_model+1, d_head] B: k = x̄ @ B
    kv_head: Tensor  # [n_heads] long
    scale: float
    softcap: float | None
    window: int | None
    rotary: bool


def _svd_tensors(weights: HeadWeights) -> dict[str, Tensor]:
    query_map, key_map = folded_maps(weights)
    q_a, r_a = torch.linalg.qr(query_map)  # [H, d+1, dh], [H, dh, dh]
    q_b, r_b = torch.linalg.qr(key_map[weights.kv_head])
    p, s, w_t = torch.linalg.svd(r_a @ r_b.transpose(-1, -2))  # [H, dh, dh], [H, dh], [H, dh, dh]
    return {"u": q_a @ p, "s": s, "v": q_b @ w_t.transpose(-1, -2), "gain": r_a.transpose(-1, -2) @ p}


def _layer_svd(weights: HeadWeights, tensors: dict[str, Tensor]) -> LayerSVD:
    return LayerSVD(layer=weights.layer, **tensors, key_map=folded_maps(weights)[1], kv_head=weights.kv_head,
                    scale=weights.scale, softcap=weights.softcap, window=weights.window, rotary=weights.rotary)


@dataclass
class OmegaSVD:
    """The QK SVD of every layer of a model; `cached` tells whether it was read from disk."""

    layers: list[LayerSVD]
    digest: str
    cached: bool = False
    seconds: float = 0.0

    @property
    def n_heads(self) -> int:
        return self.layers[0].u.shape[0]

    @property
    def d_head(self) -> int:
        return self.layers[0].u.shape[2]


def _update(digest: hashlib._Hash, tensor: Tensor | None) -> None:
    if tensor is None:
        digest.update(b"none")
        return
    flat = tensor.detach().contiguous().reshape(-1)
    digest.update(f"{flat.dtype}{tuple(tensor.shape)}".encode())
    digest.update(flat.view(torch.uint8).cpu().numpy().tobytes())  # bytes must be on the host to hash


def weights_digest(layers: list[HeadWeights]) -> str:
    """sha256 of everything Ω depends on: q/k weights and biases, input norms, scales, caps, rope."""
    digest = hashlib.sha256(FORMAT.encode())
    for weights in layers:
        norm = weights.norm
        digest.update(repr((weights.layer, weights.scale, weights.softcap, weights.window, weights.rotary,
                            norm.kind, norm.eps)).encode())
        for tensor in (weights.w_q, weights.w_k, weights.b_q, weights.b_k, norm.weight, norm.bias, weights.kv_head):
            _update(digest, tensor)
    return digest.hexdigest()


def omega_svd(model: nn.Module, cache_dir: Path | None = None) -> OmegaSVD:
    """SVD of Ω for every head of every layer, read from / written to `cache_dir` when given."""
    from safetensors.torch import load_file, save_file

    started = time.perf_counter()
    layers = [head_weights(model, layer) for layer in range(model.config.num_hidden_layers)]
    digest = weights_digest(layers)
    path = None if cache_dir is None else Path(cache_dir) / f"omega-{digest[:32]}.safetensors"
    if path is not None and path.exists():
        stored = load_file(path, device=str(layers[0].w_q.device))
        svds = [_layer_svd(w, {key: stored[f"{w.layer}.{key}"] for key in _SVD_KEYS}) for w in layers]
        return OmegaSVD(svds, digest, cached=True, seconds=time.perf_counter() - started)
    tensors = [_svd_tensors(w) for w in layers]
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        save_file({f"{w.layer}.{key}": t[key].contiguous() for w, t in zip(layers, tensors) for key in _SVD_KEYS},
                  str(tmp), metadata={"format": FORMAT, "digest": digest})
        tmp.replace(path)
    svds = [_layer_svd(w, t) for w, t in zip(layers, tensors)]
    return OmegaSVD(svds, digest, cached=False, seconds=time.perf_counter() - started)


# -- prompt states ---------------------------------------------------------------------------------
@dataclass
class PromptStates:
    """What the decomposition reads from one forward pass over a prompt."""

    token_ids: list[int]
    xbar: list[Tensor]  # per layer [seq, d_model+1]: n(resid_pre) and a 1 (float32)
    cos: list[Tensor | None]  # per layer [seq, rotary_dims], as the model passed them to attention
    sin: list[Tensor | None]


def _keep_input(store: list, layer: int, module: nn.Module, args: tuple) -> None:
    store[layer] = args[0].detach()


def _keep_rope(store: list, layer: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
    store[layer] = kwargs.get("position_embeddings")


def capture_states(lm: LoadedModel, token_ids: list[int]) -> PromptStates:
    """One forward through the base model (no LM head) capturing each layer's attention input."""
    model = lm.model
    resid: list[Tensor | None] = [None] * lm.n_layers
    rope: list[tuple[Tensor, Tensor] | None] = [None] * lm.n_layers
    handles = []
    try:
        for layer in range(lm.n_layers):
            handles.append(input_norm(model, layer).register_forward_pre_hook(partial(_keep_input, resid, layer)))
            handles.append(attention_module(model, layer).register_forward_pre_hook(
                partial(_keep_rope, rope, layer), with_kwargs=True))
        with torch.inference_mode():
            model.get_submodule(lm.adapter.body)(input_ids=torch.tensor([token_ids], device=lm.device),
                                                 use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    xbar = []
    for layer, x in enumerate(resid):
        n = head_weights(model, layer).norm.normalize(x[0])  # [seq, d_model]
        xbar.append(torch.cat([n, torch.ones_like(n[:, :1])], dim=-1))
    cos = [None if r is None else r[0][0].float() for r in rope]
    sin = [None if r is None else r[1][0].float() for r in rope]
    return PromptStates(list(token_ids), xbar, cos, sin)


# -- per-layer scores ------------------------------------------------------------------------------
def _rotate(x: Tensor, cos: Tensor, sin: Tensor, sign: float = 1.0) -> Tensor:
    """RoPE as transformers applies it (rotate_half pairs on the first cos.shape[-1] dims).

    sign = -1 applies the transpose (rotates back). x [..., d_head], cos/sin [..., rotary_dims].
    """
    dims = cos.shape[-1]
    x_rot, x_pass = x[..., :dims], x[..., dims:]
    half = torch.cat((-x_rot[..., dims // 2:], x_rot[..., :dims // 2]), dim=-1)
    return torch.cat((x_rot * cos + sign * half * sin, x_pass), dim=-1)


@dataclass
class _LayerView:
    svd: LayerSVD
    alpha: Tensor  # [H, T, dh] Uᵀ x̄ per query position
    k_hat: Tensor  # [Hkv, T, dh] post-rotary keys
    raw: Tensor  # [H, T, T] scaled pre-cap scores
    attn: Tensor  # [H, T, T] attention weights
    relative: Tensor  # [H, T, T] ℓ̃ of the pre-cap scores
    relative_capped: Tensor  # [H, T, T] ℓ̃ of what the softmax sees (Gemma-2 soft-cap), else == relative
    visible: Tensor  # [T, T] bool, key j visible from query r
    n_keys: Tensor  # [T] visible keys per query
    key_sum: Tensor  # [Hkv, T, dh] sum of the post-rotary keys each query sees
    cos: Tensor | None  # [T, rotary_dims]
    sin: Tensor | None


def _visible(n: int, window: int | None, device: torch.device) -> Tensor:
    pos = torch.arange(n, device=device)
    offset = pos[:, None] - pos[None, :]  # r - j
    return (offset >= 0) & (offset < window) if window else offset >= 0


def _view(states: PromptStates, svd: LayerSVD) -> _LayerView:
    layer = svd.layer
    xbar = states.xbar[layer]  # [T, d+1]
    alpha = xbar @ svd.u  # [H, T, dh]
    q = alpha @ svd.gain.transpose(-1, -2)  # [H, T, dh]
    k = xbar @ svd.key_map  # [Hkv, T, dh]
    cos, sin = (states.cos[layer], states.sin[layer]) if svd.rotary else (None, None)
    if cos is not None:
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    raw = svd.scale * q @ k[svd.kv_head].transpose(-1, -2)  # [H, T, T]
    capped = svd.softcap * torch.tanh(raw / svd.softcap) if svd.softcap else raw
    visible = _visible(xbar.shape[0], svd.window, xbar.device)
    attn = torch.softmax(capped.masked_fill(~visible, float("-inf")), dim=-1)
    n_keys = visible.sum(-1)
    relative = _relative(raw, visible, n_keys)
    relative_capped = _relative(capped, visible, n_keys) if svd.softcap else relative
    return _LayerView(svd, alpha, k, raw, attn, relative, relative_capped, visible, n_keys, visible.float() @ k, cos, sin)


def _relative(scores: Tensor, visible: Tensor, n_keys: Tensor) -> Tensor:
    """ℓ_j - mean_{i≠j visible} ℓ_i for every (query, key): [H, T, T] -> [H, T, T]."""
    total = (scores * visible).sum(-1, keepdim=True)
    return scores - (total - scores) / (n_keys[:, None] - 1).clamp_min(1)


# -- metrics and the rotation control --------------------------------------------------------------
def sparsity(terms: Tensor) -> Tensor:
    """S(v) = (mean|v|)² / mean(v²) over the last dim: 1 for equal terms, 1/n for one non-zero."""
    square = terms.pow(2).mean(-1)
    return torch.where(square > 0, terms.abs().mean(-1).pow(2) / square.clamp_min(1e-30), torch.ones_like(square))


def n_recon(terms: Tensor, target: Tensor) -> Tensor:
    """The fewest terms, largest first in the direction of `target`, whose sum reaches it.

    terms [..., n], target [...] -> long [...]. The sum of all terms is the target (up to float).
    """
    sign = torch.where(target < 0, -1.0, 1.0)
    ordered = (terms * sign[..., None]).sort(dim=-1, descending=True).values
    tolerance = 1e-5 * terms.abs().sum(-1, keepdim=True)
    reached = ordered.cumsum(-1) >= (target * sign)[..., None] - tolerance
    return (~reached).sum(-1).clamp_max(terms.shape[-1] - 1) + 1


def random_rotation(n: int, seed: int) -> Tensor:
    """A Haar-random orthogonal matrix [n, n] (CPU generator, so a seed gives the same one anywhere)."""
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen))
    return q * torch.sign(torch.diagonal(r))[None, :]


def control_seed(seed: int, layer: int, head: int) -> int:
    """The seed of the rotation used for the control of (layer, head)."""
    return (seed * 1_000_003 + layer * 1_009 + head) % (2**63)


@lru_cache(maxsize=64)
def _layer_rotations(seed: int, layer: int, n_heads: int, d_head: int) -> Tensor:  # [H, dh, dh], CPU
    return torch.stack([random_rotation(d_head, control_seed(seed, layer, h)) for h in range(n_heads)])


def _rotations(seed: int, svd: LayerSVD) -> Tensor:  # [H, dh, dh] on the model's device
    return _layer_rotations(seed, svd.layer, *svd.s.shape).to(svd.s.device)


@dataclass
class _Terms:
    terms: Tensor  # [P, dh] terms of ℓ̃, sum = relative
    control: Tensor  # [P, dh] terms under the rotated basis
    relative: Tensor  # [P] pre-cap ℓ̃
    relative_capped: Tensor  # [P]


def _per_head(rows: Tensor, mats: Tensor, heads: Tensor) -> Tensor:
    """rows [P, n] @ mats[heads[p]] ([H, n, n]) for every p; `heads` sorted, one matmul per head."""
    chunks = rows.split(torch.bincount(heads, minlength=mats.shape[0]).tolist())
    return torch.cat([chunk @ mats[head] for head, chunk in enumerate(chunks)])


def _pair_terms(view: _LayerView, heads: Tensor, queries: Tensor, keys: Tensor, rotations: Tensor) -> _Terms:
    """Terms for pairs (heads[p], queries[p], keys[p]) of one layer, [P] index tensors, heads sorted."""
    svd = view.svd
    kv = svd.kv_head[heads]
    key = view.k_hat[kv, keys]  # [P, dh]
    m = view.n_keys[queries][:, None].float()
    key_rel = key - (view.key_sum[kv, queries] - key) / (m - 1)  # key minus the mean of the others
    if view.cos is not None:
        key_rel = _rotate(key_rel, view.cos[queries], view.sin[queries], sign=-1.0)  # into the query's frame
    gamma = _per_head(key_rel, svd.gain, heads)  # [P, dh] Gᵀ k̃
    alpha = view.alpha[heads, queries]  # [P, dh]
    sigma = svd.s[heads]  # [P, dh]
    usable = sigma > _PINV_RTOL * sigma[:, :1]
    coords = torch.where(usable, gamma / sigma.clamp_min(1e-30), torch.zeros_like(gamma))  # b = γ / σ
    alpha_r, coords_r = _per_head(alpha, rotations, heads), _per_head(coords, rotations, heads)  # Qᵀa, Qᵀb
    return _Terms(terms=svd.scale * alpha * gamma, control=svd.scale * sigma * alpha_r * coords_r,
                  relative=view.relative[heads, queries, keys],
                  relative_capped=view.relative_capped[heads, queries, keys])


# -- decomposition of one pair ---------------------------------------------------------------------
@dataclass
class Control:
    """The random-rotation control: the same spectrum, U and V rotated by one orthogonal matrix."""

    seed: int  # `random_rotation(d_head, seed)` is the rotation
    terms: list[float]
    total: float  # the control's own sum (not ℓ̃)
    sparsity: float
    n_recon: int


@dataclass
class Decomposition:
    """ℓ̃ of one (layer, head, query, key) split over the head's singular pairs k = 0..d_head-1."""

    layer: int
    head: int
    kv_head: int
    query: int
    key: int
    n_keys: int  # keys visible from the query
    attention: float  # the head's attention weight on the pair
    score: float  # scaled pre-softmax score ℓ_j (pre-cap)
    relative: float  # ℓ̃_j = ℓ_j - mean_{i≠j} ℓ_i (pre-cap) == sum(terms)
    relative_capped: float  # the same on soft-capped scores (Gemma-2); == relative otherwise
    sigma: list[float]  # singular values, descending; terms[k] goes with sigma[k]
    terms: list[float]
    sparsity: float  # S(terms)
    n_recon: int
    control: Control

    def ranked(self) -> list[int]:
        """Singular indices, largest term first in the direction of ℓ̃ (the N_recon order)."""
        sign = -1.0 if self.relative < 0 else 1.0
        return sorted(range(len(self.terms)), key=lambda k: -sign * self.terms[k])

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Decomposition:
        return cls(**{**data, "control": Control(**data["control"])})


def _decompositions(view: _LayerView, head: int, query: int, keys: Tensor, seed: int) -> list[Decomposition]:
    svd = view.svd
    n = len(keys)
    heads = torch.full((n,), head, device=keys.device)
    queries = torch.full((n,), query, device=keys.device)
    out = _pair_terms(view, heads, queries, keys, _rotations(seed, svd))
    s, nr = sparsity(out.terms).tolist(), n_recon(out.terms, out.relative).tolist()
    totals = out.control.sum(-1)
    cs, cn = sparsity(out.control).tolist(), n_recon(out.control, totals).tolist()
    terms, control, totals = out.terms.tolist(), out.control.tolist(), totals.tolist()
    rel, rel_capped = out.relative.tolist(), out.relative_capped.tolist()
    attn, raw = view.attn[head, query].tolist(), view.raw[head, query].tolist()
    sigma = svd.s[head].tolist()
    return [Decomposition(
        layer=svd.layer, head=head, kv_head=int(svd.kv_head[head]), query=query, key=key, n_keys=int(view.n_keys[query]),
        attention=attn[key], score=raw[key], relative=rel[p], relative_capped=rel_capped[p], sigma=sigma,
        terms=terms[p], sparsity=s[p], n_recon=nr[p],
        control=Control(control_seed(seed, svd.layer, head), control[p], totals[p], cs[p], cn[p]),
    ) for p, key in enumerate(keys.tolist())]


def _check_pair(states: PromptStates, svd: OmegaSVD, layer: int, head: int, query: int) -> None:
    if not 0 <= layer < len(svd.layers) or not 0 <= head < svd.n_heads:
        raise AuditError(f"no head {layer}.{head}: the model has {len(svd.layers)} layers of {svd.n_heads} heads")
    if not 1 <= query < len(states.token_ids):
        raise AuditError(f"query position {query} must be in 1..{len(states.token_ids) - 1} "
                         "(relative attention needs at least two visible keys)")


def decompose_row(states: PromptStates, svd: OmegaSVD, layer: int, head: int, query: int,
                  seed: int = 0) -> list[Decomposition]:
    """Decompositions of every key visible from `query` (oldest first)."""
    _check_pair(states, svd, layer, head, query)
    view = _view(states, svd.layers[layer])
    return _decompositions(view, head, query, view.visible[query].nonzero()[:, 0], seed)


def decompose(states: PromptStates, svd: OmegaSVD, layer: int, head: int, query: int, key: int,
              seed: int = 0) -> Decomposition:
    """The relative attention decomposition of one (layer, head, query, key)."""
    _check_pair(states, svd, layer, head, query)
    view = _view(states, svd.layers[layer])
    if not 0 <= key < len(states.token_ids) or not bool(view.visible[query, key]):
        raise AuditError(f"key {key} is not visible from query {query} in layer {layer} (causal"
                         f"{', window ' + str(svd.layers[layer].window) if svd.layers[layer].window else ''})")
    return _decompositions(view, head, query, torch.tensor([key], device=view.n_keys.device), seed)[0]


# -- scan ------------------------------------------------------------------------------------------
@dataclass
class ScanHit:
    layer: int
    head: int
    query: int
    key: int
    attention: float
    relative: float
    sparsity: float
    n_recon: int
    control_sparsity: float
    top: list[int]  # singular indices of the N_recon largest terms (at most 5)


@dataclass
class Scan:
    """Every (layer, head, query, key) with attention above `threshold`, sparsest first."""

    token_ids: list[int]
    threshold: float
    include_first_key: bool
    seed: int
    hits: list[ScanHit]  # possibly cut to the `top` sparsest
    n_hits: int  # before any cut
    grid: list[list[float | None]]  # [layer][head] median S of the head's hits (None: no hit)
    counts: list[list[int]]  # [layer][head] hits per head

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Scan:
        return cls(**{**data, "hits": [ScanHit(**hit) for hit in data["hits"]]})


def _layer_hits(view: _LayerView, threshold: float, include_first_key: bool, rotations: Tensor) -> list[ScanHit]:
    select = (view.attn > threshold) & view.visible & (view.n_keys >= 2)[:, None]
    if not include_first_key:
        select[..., 0] = False
    heads, queries, keys = select.nonzero(as_tuple=True)
    if len(heads) == 0:
        return []
    out = _pair_terms(view, heads, queries, keys, rotations)
    count = n_recon(out.terms, out.relative)
    sign = torch.where(out.relative < 0, -1.0, 1.0)[:, None]
    order = (out.terms * sign).argsort(dim=-1, descending=True)[:, :5].tolist()
    columns = zip(heads.tolist(), queries.tolist(), keys.tolist(), view.attn[heads, queries, keys].tolist(),
                  out.relative.tolist(), sparsity(out.terms).tolist(), count.tolist(),
                  sparsity(out.control).tolist(), order)
    return [ScanHit(view.svd.layer, h, r, j, a, rel, s, n, cs, top[:n]) for h, r, j, a, rel, s, n, cs, top in columns]


def scan(states: PromptStates, svd: OmegaSVD, threshold: float = 0.3, include_first_key: bool = False,
         seed: int = 0, top: int | None = None) -> Scan:
    """Rank every attended (layer, head, query, key) by the sparsity of its decomposition.

    Key position 0 (BOS / the chat template's first token) is usually an attention sink; it is
    left out unless `include_first_key`.
    """
    hits: list[ScanHit] = []
    for layer_svd in svd.layers:
        hits += _layer_hits(_view(states, layer_svd), threshold, include_first_key, _rotations(seed, layer_svd))
    hits.sort(key=lambda hit: (hit.sparsity, -hit.attention))
    per_head: dict[tuple[int, int], list[float]] = {}
    for hit in hits:
        per_head.setdefault((hit.layer, hit.head), []).append(hit.sparsity)
    cells = [[per_head.get((layer, head), []) for head in range(svd.n_heads)] for layer in range(len(svd.layers))]
    grid = [[statistics.median(cell) if cell else None for cell in row] for row in cells]
    counts = [[len(cell) for cell in row] for row in cells]
    return Scan(states.token_ids, threshold, include_first_key, seed, hits[:top] if top else hits, len(hits),
                grid, counts)


# -- head <-> latent alignment ---------------------------------------------------------------------
@dataclass
class Reference:
    """max |cos| of random unit vectors (width d_model) against the same vectors, over `n` draws."""

    n: int
    mean: float
    std: float
    q99: float
    max: float
    samples: list[float] = field(repr=False)

    def p_value(self, cos: float) -> float:
        """(1 + #draws at least |cos|) / (1 + n)."""
        return (1 + sum(s >= abs(cos) for s in self.samples)) / (1 + self.n)


def _unit_rows(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _reference(targets: Tensor, n: int, seed: int) -> Reference:
    """targets [m, d] unit rows; the max |cos| of `n` random unit vectors against them."""
    gen = torch.Generator().manual_seed(seed)
    probes = _unit_rows(torch.randn(n, targets.shape[1], generator=gen)).to(targets.device)
    best = (probes @ targets.T).abs().amax(-1)  # [n]
    return Reference(n, float(best.mean()), float(best.std()), float(best.quantile(0.99)), float(best.max()),
                     best.tolist())


@dataclass
class LatentMatch:
    latent: int
    cos: float  # signed (singular vectors have an arbitrary sign)


@dataclass
class PairAlignment:
    """The SAE latents closest to u_k (query side) and v_k (key side) of one head."""

    layer: int
    head: int
    k: int
    sigma: float
    query: list[LatentMatch]  # by |cos| with u_k, best first
    key: list[LatentMatch]  # by |cos| with v_k
    query_norm: float  # |u_k[:d_model]| (the rest is the bias coordinate)
    key_norm: float
    reference: Reference

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PairAlignment:
        return cls(**{**data, "query": [LatentMatch(**m) for m in data["query"]],
                      "key": [LatentMatch(**m) for m in data["key"]], "reference": Reference(**data["reference"])})


def _best(cosines: Tensor, top: int) -> list[LatentMatch]:
    best = cosines.abs().topk(min(top, cosines.shape[0])).indices.tolist()
    return [LatentMatch(i, float(cosines[i])) for i in best]


def align_pair(svd: OmegaSVD, layer: int, head: int, k: int, decoder: Tensor, top: int = 5,
               n_random: int = 256, seed: int = 0) -> PairAlignment:
    """Latents of `decoder` [d_sae, d_model] best aligned with the singular pair (u_k, v_k)."""
    layer_svd = svd.layers[layer]
    u, v = layer_svd.u[head, :-1, k], layer_svd.v[head, :-1, k]  # [d_model]
    if decoder.shape[1] != u.shape[0]:
        raise AuditError(f"decoder width {decoder.shape[1]} is not the model's d_model {u.shape[0]}")
    latents = _unit_rows(decoder.detach().to(u.device, torch.float32))  # [d_sae, d_model]
    return PairAlignment(layer, head, k, float(layer_svd.s[head, k]), _best(latents @ _unit_rows(u), top),
                         _best(latents @ _unit_rows(v), top), float(u.norm()), float(v.norm()),
                         _reference(latents, n_random, seed))


@dataclass
class HeadMatch:
    layer: int
    head: int
    k: int
    side: str  # "query" (u_k) | "key" (v_k)
    cos: float
    sigma: float


@dataclass
class DirectionAlignment:
    """The singular vectors of all heads closest to one direction (e.g. a latent's decoder row)."""

    matches: list[HeadMatch]  # by |cos|, best first
    reference: Reference  # random directions against the same singular vectors

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> DirectionAlignment:
        return cls([HeadMatch(**m) for m in data["matches"]], Reference(**data["reference"]))


def heads_for_direction(svd: OmegaSVD, direction: Tensor, top: int = 10, n_random: int = 64,
                        seed: int = 0) -> DirectionAlignment:
    """The (layer, head, k, side) whose u_k or v_k align best with `direction` [d_model]."""
    sides = torch.stack([torch.stack([layer.u[:, :-1], layer.v[:, :-1]]) for layer in svd.layers])  # [L, 2, H, d, dh]
    vectors = _unit_rows(sides.permute(0, 1, 2, 4, 3))  # [L, 2, H, dh, d]
    flat = vectors.reshape(-1, vectors.shape[-1])
    cosines = flat @ _unit_rows(direction.detach().to(flat.device, torch.float32))  # [L*2*H*dh]
    shape = vectors.shape[:-1]
    matches = []
    for index in cosines.abs().topk(min(top, cosines.shape[0])).indices.tolist():
        layer, side, head, k = torch.unravel_index(torch.tensor(index), shape)
        matches.append(HeadMatch(int(layer), int(head), int(k), ("query", "key")[int(side)], float(cosines[index]),
                                 float(svd.layers[int(layer)].s[int(head), int(k)])))
    return DirectionAlignment(matches, _reference(flat, n_random, seed))

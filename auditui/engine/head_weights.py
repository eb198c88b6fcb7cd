"""Per-head attention weights of every supported family, in one layout.

`head_weights(model, layer)` returns views of one layer's parameters (the model's device and dtype):

    w_q [n_heads, d_model, d_head]       q_h = h @ w_q[h] + b_q[h]        (h = the input norm's output)
    w_k, w_v [n_kv_heads, d_model, d_head]   k, v of query head h come from K/V head kv_head[h]
    w_o [n_heads, d_head, d_model]       attention output = sum_h z_h @ w_o[h] + b_o

Family layouts read here:
  * gpt2: Conv1D `c_attn` stores [d_model, 3*d_model] (x @ W); columns are [q | k | v], each
    head-major. `c_proj` is Conv1D [n_heads*d_head, d_model].
  * gpt_neox: Linear `query_key_value` [3*d_model, d_model] whose output is viewed as
    [.., n_heads, 3*d_head] and chunked, i.e. interleaved per head: rows h*3*d_head + [q | k | v].
  * llama / qwen2 / smollm / gemma2: separate `q_proj`, `k_proj`, `v_proj` ([heads*d_head, d_model]
    Linear, head-major) and `o_proj`; grouped-query attention repeats K/V head i for the
    n_heads / n_kv_heads consecutive query heads (transformers' `repeat_kv`), so kv_head[h] = h // group.

Also read from the modules: the input norm (LayerNorm, RMSNorm, or Gemma-2's RMSNorm whose
weight is applied as 1 + w), the attention scale (`module.scaling`: 1/sqrt(d_head), Gemma-2's
query_pre_attn_scalar^-1/2, GPT-2's optional inverse layer index), Gemma-2's logit soft-cap
(applied to the scaled scores before the mask: cap * tanh(s / cap)), a sliding window (key j is
visible from query r iff r - j < window) and whether q and k are rotated (RoPE; the rotary dims and
angles are read at run time from the cos/sin the model passes to its attention module).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from auditui.engine.sites import adapter_for
from auditui.errors import AuditError

INPUT_NORM = {"gpt2": "ln_1", "gpt_neox": "input_layernorm", "llama": "input_layernorm",
              "gemma2": "input_layernorm"}


@dataclass(frozen=True)
class InputNorm:
    """The norm in front of attention: h = weight * normalize(x) + bias."""

    kind: str  # "layernorm" | "rmsnorm"
    weight: Tensor  # [d_model], as applied (Gemma-2: 1 + w)
    bias: Tensor | None  # [d_model]
    eps: float

    def normalize(self, x: Tensor) -> Tensor:
        """The norm without its affine part, float32: [..., d_model] -> [..., d_model]."""
        x = x.float()
        if self.kind == "layernorm":
            x = x - x.mean(-1, keepdim=True)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


@dataclass(frozen=True)
class HeadWeights:
    """One layer's attention weights split per head (views of the model's parameters)."""

    layer: int
    w_q: Tensor  # [n_heads, d_model, d_head]
    w_k: Tensor  # [n_kv_heads, d_model, d_head]
    w_v: Tensor  # [n_kv_heads, d_model, d_head]
    w_o: Tensor  # [n_heads, d_head, d_model]
    b_q: Tensor | None  # [n_heads, d_head]
    b_k: Tensor | None  # [n_kv_heads, d_head]
    b_v: Tensor | None  # [n_kv_heads, d_head]
    b_o: Tensor | None  # [d_model]
    kv_head: Tensor  # [n_heads] long: query head -> its K/V head
    norm: InputNorm
    scale: float  # multiplies q . k
    softcap: float | None  # Gemma-2: scores -> cap * tanh(scores / cap)
    window: int | None  # sliding window (None: all causal keys)
    rotary: bool

    @property
    def n_heads(self) -> int:
        return self.w_q.shape[0]

    @property
    def d_head(self) -> int:
        return self.w_q.shape[2]


def _heads_in(weight_t: Tensor, n_heads: int) -> Tensor:
    """[d_in, n_heads*d_head] (x @ W layout) -> [n_heads, d_in, d_head]."""
    return weight_t.reshape(weight_t.shape[0], n_heads, -1).permute(1, 0, 2)


def _bias(module: nn.Module, n_heads: int) -> Tensor | None:
    return None if module.bias is None else module.bias.detach().reshape(n_heads, -1)


def _gpt2_qkv(attn: nn.Module, n_heads: int, n_kv: int) -> tuple[Tensor, ...]:
    weight = attn.c_attn.weight.detach()  # [d_model, 3*d_model], Conv1D
    bias = attn.c_attn.bias.detach()  # [3*d_model]
    w_q, w_k, w_v = (_heads_in(w, n_heads) for w in weight.chunk(3, dim=1))
    b_q, b_k, b_v = (b.reshape(n_heads, -1) for b in bias.chunk(3))
    w_o = attn.c_proj.weight.detach().reshape(n_heads, -1, weight.shape[0])
    return w_q, w_k, w_v, b_q, b_k, b_v, w_o, attn.c_proj.bias.detach()


def _neox_qkv(attn: nn.Module, n_heads: int, n_kv: int) -> tuple[Tensor, ...]:
    fused = attn.query_key_value
    weight = fused.weight.detach().T.reshape(-1, n_heads, 3, attn.head_size)  # [d_model, heads, 3, d_head]
    w_q, w_k, w_v = (weight[:, :, i].permute(1, 0, 2) for i in range(3))
    if fused.bias is None:
        b_q = b_k = b_v = None
    else:
        bias = fused.bias.detach().reshape(n_heads, 3, attn.head_size)
        b_q, b_k, b_v = (bias[:, i] for i in range(3))
    dense = attn.dense
    w_o = dense.weight.detach().T.reshape(n_heads, attn.head_size, -1)
    return w_q, w_k, w_v, b_q, b_k, b_v, w_o, None if dense.bias is None else dense.bias.detach()


def _split_qkv(attn: nn.Module, n_heads: int, n_kv: int) -> tuple[Tensor, ...]:
    if hasattr(attn, "q_norm"):
        raise AuditError("this model normalizes q and k per head (q_norm/k_norm), so its attention score "
                         "is not a bilinear form of the residual; head decomposition does not support it")
    projections = (attn.q_proj, attn.k_proj, attn.v_proj)
    w_q, w_k, w_v = (_heads_in(p.weight.detach().T, n) for p, n in zip(projections, (n_heads, n_kv, n_kv)))
    b_q, b_k, b_v = (_bias(p, n) for p, n in zip(projections, (n_heads, n_kv, n_kv)))
    o_proj = attn.o_proj
    w_o = o_proj.weight.detach().T.reshape(n_heads, -1, o_proj.weight.shape[0])
    return w_q, w_k, w_v, b_q, b_k, b_v, w_o, None if o_proj.bias is None else o_proj.bias.detach()


_READERS = {"gpt2": _gpt2_qkv, "gpt_neox": _neox_qkv, "llama": _split_qkv, "gemma2": _split_qkv}


def input_norm(model: nn.Module, layer: int) -> nn.Module:
    """The norm module whose output feeds the attention of `layer` (its input is resid_pre)."""
    adapter = adapter_for(model)
    return model.get_submodule(f"{adapter.layers}.{layer}.{INPUT_NORM[adapter.name]}")


def attention_module(model: nn.Module, layer: int) -> nn.Module:
    adapter = adapter_for(model)
    return model.get_submodule(f"{adapter.layers}.{layer}.{adapter.attn}")


def _input_norm(model: nn.Module, layer: int) -> InputNorm:
    module = input_norm(model, layer)
    kind = adapter_for(model).norm_kind
    weight = module.weight.detach()
    eps = module.variance_epsilon if hasattr(module, "variance_epsilon") else module.eps
    bias = getattr(module, "bias", None)
    return InputNorm(kind="layernorm" if kind == "layernorm" else "rmsnorm",
                     weight=1.0 + weight if kind == "rmsnorm_plus_one" else weight,
                     bias=None if bias is None else bias.detach(), eps=float(eps))


def head_weights(model: nn.Module, layer: int) -> HeadWeights:
    """The attention weights of `layer`, per head, for any supported family."""
    adapter = adapter_for(model)
    config = model.config
    n_heads = int(config.num_attention_heads)
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_heads)
    attn = attention_module(model, layer)
    w_q, w_k, w_v, b_q, b_k, b_v, w_o, b_o = _READERS[adapter.name](attn, n_heads, n_kv)
    return HeadWeights(
        layer=layer, w_q=w_q, w_k=w_k, w_v=w_v, w_o=w_o, b_q=b_q, b_k=b_k, b_v=b_v, b_o=b_o,
        kv_head=torch.arange(n_heads, device=w_q.device) // (n_heads // n_kv),
        norm=_input_norm(model, layer), scale=float(attn.scaling),
        softcap=getattr(attn, "attn_logit_softcapping", None), window=getattr(attn, "sliding_window", None),
        rotary=adapter.name != "gpt2" and bool(getattr(attn, "use_rope", True)),
    )

"""Hook sites: where in a model an activation is read or written.

A `Site(layer, kind)` names one tensor of the residual-stream picture of a transformer block:

    resid_pre(L) --+-- attn --> attn_out(L) --+
                   |                          +--> resid_post(L) == resid_pre(L+1)
                   +-- mlp  --> mlp_out(L)  --+

`resid_post(L) == resid_pre(L) + attn_out(L) + mlp_out(L)` holds for every family, parallel
blocks (GPT-NeoX) included. `attn_z(L)` is the concatenated per-head attention result fed to the
output projection (TransformerLens `hook_z`), of width n_heads * d_head.

A family adapter knows which module of a Hugging Face model produces each site. `SiteHooks` reads
and writes sites through forward hooks and always removes them on exit.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from auditui.errors import AuditError

KINDS = ("resid_pre", "resid_post", "attn_out", "mlp_out", "attn_z")
_KIND_ALIASES = {"res": "resid_post", "resid": "resid_post", "mlp": "mlp_out", "att": "attn_out",
                 "attn": "attn_out", "z": "attn_z"}


@dataclass(frozen=True, order=True)
class Site:
    layer: int
    kind: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise AuditError(f"unknown site kind {self.kind!r}; expected one of {', '.join(KINDS)}")

    def __str__(self) -> str:
        return f"{self.layer}/{self.kind}"

    @classmethod
    def parse(cls, text: str) -> Site:
        """Parse `12/resid_post` (or `12/res`, `12/mlp`, `12/att`)."""
        match = re.fullmatch(r"\s*(\d+)\s*/\s*([a-z_]+)\s*", text)
        if not match:
            raise AuditError(f"cannot read site {text!r}; write it as LAYER/KIND, e.g. 12/resid_post")
        kind = _KIND_ALIASES.get(match.group(2), match.group(2))
        return cls(int(match.group(1)), kind)

    @property
    def hook_name(self) -> str:
        """The TransformerLens / sae-lens hook name of this site."""
        if self.kind == "attn_z":
            return f"blocks.{self.layer}.attn.hook_z"
        return f"blocks.{self.layer}.hook_{self.kind}"


_HOOK_NAME = re.compile(r"blocks\.(\d+)\.(?:hook_(resid_pre|resid_post|attn_out|mlp_out)|attn\.hook_z)")


@dataclass(frozen=True)
class Positions:
    """Where the tokens of one forward call sit.

    start: column of the call's first token in the whole (padded) sequence: the length of what the
        KV cache already holds (non-zero for every token after the prompt in cached generation).
    token: [batch, seq] each row's own position: the number of real tokens before it in its row, so a
        left-padded row starts at 0 at its first real token; padding is -1.
    """

    start: int
    token: Tensor  # [batch, seq] long

    @property
    def columns(self) -> Tensor:  # [seq] long
        return torch.arange(self.start, self.start + self.token.shape[1], device=self.token.device)


# An edit receives the site tensor [batch, seq, width] and the Positions of its tokens and returns
# the tensor to use instead.
Edit = Callable[[Tensor, Positions], Tensor]


def _is_cache(value: object) -> bool:
    return hasattr(value, "get_seq_length") and callable(value.get_seq_length)


def forward_positions(args: tuple, kwargs: Mapping[str, object]) -> Positions:
    """Positions of a base-model forward call, from what every transformers 5.x passes to it.

    The start column comes from `cache_position` (older 5.x), else from the width of a 2-D
    attention mask (the mask covers the cached tokens too, so it also holds for sliding-window
    caches), else from the KV cache object under whatever keyword it is passed (`past_key_values`
    or `cache`), else 0 when the call has no cache at all. Rows' own positions come from the 2-D
    mask (left padding), else from `position_ids`, else from the columns. A call that carries a
    cache-like keyword this cannot read raises instead of guessing 0.
    """
    given = [kwargs.get("input_ids"), kwargs.get("inputs_embeds"), *args[:1]]
    first = next((value for value in given if value is not None), None)
    if not isinstance(first, Tensor):
        raise AuditError("cannot tell the positions of a forward call without input_ids or inputs_embeds")
    batch, seq = first.shape[0], first.shape[1]
    mask = kwargs.get("attention_mask")
    mask = mask if isinstance(mask, Tensor) and mask.dim() == 2 else None
    caches = [value for value in kwargs.values() if _is_cache(value)]
    cache_position = kwargs.get("cache_position")
    if isinstance(cache_position, Tensor) and cache_position.numel():
        start = int(cache_position.reshape(-1)[0])
    elif mask is not None:
        start = mask.shape[1] - seq
    elif caches:
        start = int(caches[0].get_seq_length())
    else:
        unread = [name for name, value in kwargs.items()
                  if value is not None and ("cache" in name or "past" in name) and not isinstance(value, bool)]
        if unread:
            raise AuditError(f"cannot read the position of this forward call from {', '.join(unread)}; "
                             "this transformers version passes its KV cache in a way auditui does not know")
        start = 0
    if start < 0:
        raise AuditError(f"the attention mask is narrower ({start + seq}) than the call's {seq} tokens")
    device = first.device
    if mask is not None:
        own = mask.long().cumsum(dim=1) - 1  # [batch, start + seq]
        token = own[:, start:].masked_fill(mask[:, start:] == 0, -1)
    elif isinstance(kwargs.get("position_ids"), Tensor):
        token = kwargs["position_ids"].long().expand(batch, seq)  # type: ignore[union-attr]
    else:
        token = torch.arange(start, start + seq, device=device).expand(batch, seq)
    return Positions(start, token.to(device))


@dataclass(frozen=True)
class Location:
    """Where a site lives: a module and whether the tensor is its first input or its output."""

    path: str  # dotted module path inside the model, `{layer}` filled in
    when: str  # "input" | "output"


@dataclass(frozen=True)
class FamilyAdapter:
    """How one model family lays out its blocks. Paths are relative to the CausalLM model."""

    name: str
    model_types: tuple[str, ...]
    body: str  # the base model (owner of the layer list)
    layers: str
    attn: str  # attention module, relative to a block
    out_proj: str  # attention output projection, relative to a block
    attn_out: str  # module whose output is what attention adds to the residual
    mlp_out: str  # module whose output is what the MLP adds to the residual
    final_norm: str
    norm_kind: str  # "layernorm" | "rmsnorm" | "rmsnorm_plus_one" (Gemma: weight is 1 + w)
    parallel: bool = False
    notes: tuple[str, ...] = field(default=())

    def location(self, site: Site) -> Location:
        block = f"{self.layers}.{site.layer}"
        if site.kind == "resid_pre":
            return Location(block, "input")
        if site.kind == "resid_post":
            return Location(block, "output")
        if site.kind == "attn_out":
            return Location(f"{block}.{self.attn_out}", "output")
        if site.kind == "mlp_out":
            return Location(f"{block}.{self.mlp_out}", "output")
        return Location(f"{block}.{self.out_proj}", "input")


ADAPTERS: dict[str, FamilyAdapter] = {}


def register_adapter(adapter: FamilyAdapter) -> FamilyAdapter:
    for model_type in adapter.model_types:
        ADAPTERS[model_type] = adapter
    return adapter


register_adapter(FamilyAdapter(
    name="gpt2", model_types=("gpt2",), body="transformer", layers="transformer.h",
    attn="attn", out_proj="attn.c_proj", attn_out="attn", mlp_out="mlp",
    final_norm="transformer.ln_f", norm_kind="layernorm",
))
register_adapter(FamilyAdapter(
    name="gpt_neox", model_types=("gpt_neox",), body="gpt_neox", layers="gpt_neox.layers",
    attn="attention", out_proj="attention.dense", attn_out="attention", mlp_out="mlp",
    final_norm="gpt_neox.final_layer_norm", norm_kind="layernorm", parallel=True,
))
register_adapter(FamilyAdapter(
    name="llama", model_types=("llama", "qwen2", "qwen3", "mistral", "olmo2", "smollm3"),
    body="model", layers="model.layers", attn="self_attn", out_proj="self_attn.o_proj",
    attn_out="self_attn", mlp_out="mlp", final_norm="model.norm", norm_kind="rmsnorm",
))
register_adapter(FamilyAdapter(
    name="gemma2", model_types=("gemma2",), body="model", layers="model.layers",
    attn="self_attn", out_proj="self_attn.o_proj", attn_out="post_attention_layernorm",
    mlp_out="post_feedforward_layernorm", final_norm="model.norm", norm_kind="rmsnorm_plus_one",
    notes=("attn_out/mlp_out are read after Gemma-2's post-norms (what is added to the residual); "
           "hook_z decoders projected through W_O skip the post-attention RMSNorm",),
))


def adapter_for(model: nn.Module) -> FamilyAdapter:
    model_type = getattr(model.config, "model_type", "?")
    try:
        return ADAPTERS[model_type]
    except KeyError:
        known = ", ".join(sorted(ADAPTERS))
        raise AuditError(f"model family {model_type!r} is not supported yet (supported: {known})") from None


def site_from_hook_name(hook_name: str, model: nn.Module | None = None) -> Site:
    """Map a sae-lens hook name (`blocks.8.hook_resid_post`) or an HF module path to a Site."""
    match = _HOOK_NAME.fullmatch(hook_name)
    if match:
        return Site(int(match.group(1)), match.group(2) or "attn_z")
    if model is not None:
        adapter = adapter_for(model)
        for layer in range(model.config.num_hidden_layers):
            for kind in ("resid_post", "attn_out", "mlp_out"):
                if adapter.location(Site(layer, kind)).path == hook_name:
                    return Site(layer, kind)
    raise AuditError(f"hook {hook_name!r} is not a site auditui reads "
                     "(expected blocks.L.hook_resid_pre|resid_post|attn_out|mlp_out, blocks.L.attn.hook_z, "
                     "or a block/attention/MLP module path)")


def all_sites(n_layers: int, kinds: Iterable[str] = KINDS) -> list[Site]:
    return [Site(layer, kind) for layer in range(n_layers) for kind in kinds]


def _first_tensor(value: object) -> Tensor:
    return value[0] if isinstance(value, tuple) else value  # type: ignore[index,return-value]


def _replace_first(value: object, tensor: Tensor) -> object:
    return (tensor, *value[1:]) if isinstance(value, tuple) else tensor  # type: ignore[index]


class SiteHooks:
    """Read and/or edit sites during forward passes (also cached generation).

    reads: sites whose tensor is captured ([batch, seq, width], concatenated over the forward calls
        made inside the context, e.g. the prompt pass then each generated token).
    edits: site -> list of edits applied in order; a read of the same site sees the edited tensor.
    keep_grad: keep captured tensors in the autograd graph and retain their gradients, so that
        after `loss.backward()` `hooks.grads[site]` holds dL/d(site).
    """

    def __init__(self, model: nn.Module, reads: Iterable[Site] = (),
                 edits: Mapping[Site, Edit | list[Edit]] | None = None, keep_grad: bool = False):
        self.model = model
        self.adapter = adapter_for(model)
        self.reads = list(dict.fromkeys(reads))
        self.edits = {site: (fns if isinstance(fns, list) else [fns]) for site, fns in (edits or {}).items()}
        self.keep_grad = keep_grad
        self._captured: dict[Site, list[Tensor]] = {site: [] for site in self.reads}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._positions: Positions | None = None  # of the current forward call of the base model

    # -- results -------------------------------------------------------------------------------
    @property
    def acts(self) -> dict[Site, Tensor]:
        return {site: torch.cat(chunks, dim=1) if len(chunks) > 1 else chunks[0]
                for site, chunks in self._captured.items() if chunks}

    @property
    def grads(self) -> dict[Site, Tensor]:
        if not self.keep_grad:
            raise RuntimeError("SiteHooks(keep_grad=True) is needed to read gradients")
        out = {}
        for site, chunks in self._captured.items():
            if len(chunks) != 1 or chunks[0].grad is None:
                raise RuntimeError(f"no gradient reached {site}; call backward on a loss of this pass")
            out[site] = chunks[0].grad
        return out

    # -- hook plumbing -------------------------------------------------------------------------
    def __enter__(self) -> SiteHooks:
        try:
            body = self.model.get_submodule(self.adapter.body)
            self._handles.append(body.register_forward_pre_hook(self._track_positions, with_kwargs=True))
            for site in sorted(set(self.reads) | set(self.edits)):
                self._register(site)
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _track_positions(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._positions = forward_positions(args, kwargs)

    def positions(self, h: Tensor) -> Positions:
        """Positions of h [batch, seq, width]: the current forward's, or (blocks run one by one,
        outside the base model, as the pack evaluation's layer replay does) columns from 0."""
        pos = self._positions
        if pos is None:
            batch, seq = h.shape[:2]
            return Positions(0, torch.arange(seq, device=h.device).expand(batch, seq))
        if pos.token.shape != h.shape[:2]:
            raise AuditError(f"a site tensor of shape {tuple(h.shape[:2])} does not match its forward call's "
                             f"tokens {tuple(pos.token.shape)}")
        return pos

    def _register(self, site: Site) -> None:
        n_layers = self.model.config.num_hidden_layers
        if not 0 <= site.layer < n_layers:
            raise AuditError(f"site {site} is outside the model's layers 0..{n_layers - 1}")
        loc = self.adapter.location(site)
        module = self.model.get_submodule(loc.path)
        process = self._processor(site)
        if loc.when == "output":
            def out_hook(mod: nn.Module, args: tuple, output: object) -> object:
                return _replace_first(output, process(_first_tensor(output)))
            self._handles.append(module.register_forward_hook(out_hook))
        else:
            def in_hook(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
                if args:
                    return (process(args[0]), *args[1:]), kwargs
                kwargs["hidden_states"] = process(kwargs["hidden_states"])
                return args, kwargs
            self._handles.append(module.register_forward_pre_hook(in_hook, with_kwargs=True))

    def _processor(self, site: Site) -> Callable[[Tensor], Tensor]:
        edits = self.edits.get(site, [])
        capture = self._captured.get(site)

        def process(h: Tensor) -> Tensor:
            for edit in edits:
                h = edit(h, self.positions(h))
            if capture is not None:
                if self.keep_grad and h.requires_grad:
                    h.retain_grad()
                    capture.append(h)
                else:
                    capture.append(h.detach())
            return h
        return process


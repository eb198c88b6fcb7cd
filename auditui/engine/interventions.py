"""One intervention on SAE latents at one site, compiled to a SiteHooks edit.

`Intervention(site, latents, op, strength, positions, baseline)` edits the site tensor h at every
token in scope. With S the latents, for each j in S:

    a_j    the feature's current SAE activation: `sae.encode(h_t)[j]` of the tensor as it arrives at
           the hook (upstream edits included), computed only for the tokens in scope;
    w_j    the latent's raw decoder row, precisely its reconstruction term per unit of activation,
           `sae.decode(e_j) - sae.decode(0)`: W_dec[j] for every SAE whose decode is a @ W_dec + b_dec
           (sae-lens "none" normalisation), W_dec[j] / ||W_dec[j]|| for TopK SAEs that rescale
           activations by the decoder norm;
    d_j    the unit decoder direction w_j / ||w_j||, as `SAEBank.decoder(site)` gives it (the space of
           the site itself: z space for attn_z sites).

    rescale      h <- h + sum_j (r_j - 1) a_j w_j          r = strength; r = 0 removes the latents'
                 terms from the reconstruction, r = 1 changes nothing, r = 2 doubles them. This is
                 (r - 1) times the part of the SAE reconstruction carried by S (the seed-001 h + (r-1) a V^T).
    clamp        h <- h + sum_j (c_j - a_j) w_j             c = strength: the activation is set to c.
    add          h <- h + sum_j s_j d_j                     s = strength (seed 001 appendix B, s·Vᵀ
                 with unit columns): s is a length in the site's units, whatever the SAE's decoder
                 scale.
    mean_ablate  h <- h + sum_j f_j (m_j - h·d_j) d_j       f = strength (1: the projection a_t·d_j
                 is set to the baseline m_j = ā·d_j as the exact check of Δ-attribution does; 0: nothing),
                 m = `baseline` (see `mean_projections`). Each latent moves along its own direction,
                 so for several non-orthogonal latents the final projections are only near m.

Rescale and clamp need the encoder; add and mean-ablate never run it. For SAEs that normalise
their input at run time (sae-lens "layer_norm", "constant_norm_rescale") the reconstruction term
depends on the token, so rescale and clamp take the difference of the SAE's own decodes of the old
and new activations instead (two encodes and decodes per token in scope).

Strength: a float (every row, every latent), a [batch] sequence/tensor (one value per batch row:
rows of one batch carry different coefficients) or a [batch or 1, n_latents] one (per row and
latent). Values are stored as nested tuples, so an Intervention is hashable data.

Token scope `positions`, per batch row (padding, own position -1, is never edited):
    "all"        every real token;
    "prompt"     own positions 0 .. n_prompt-1 of the row;
    "generated"  own positions >= n_prompt (the generated tokens fed back in KV-cached generation);
                 the last two need each row's prompt length (`edit(..., prompt_lengths=...)`);
    a set of absolute columns (the padded sequence's column = `Positions.columns`), every row;
    a bool mask [batch, columns] of absolute columns (columns beyond its width are out of scope).
`edit(..., rows=...)` restricts the intervention to some batch rows (others pass unchanged).

JSON (`to_dict`): {"site": "12/resid_post", "latents": [1234], "op": "add", "strength": 8.0 |
[per row] | [[per row and latent]], "positions": "all" | {"columns": [...]} | {"mask": [[...]]},
"baseline": [ā·d_j ...] (mean_ablate only)}.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from auditui.engine.reference import encode_rows
from auditui.engine.sites import Edit, Positions, Site
from auditui.errors import AuditError

if TYPE_CHECKING:
    from sae_lens import SAE

    from auditui.engine.saes import SAEBank

OPS = ("rescale", "add", "clamp", "mean_ablate")
SCOPES = ("all", "prompt", "generated")
RUNTIME_NORMS = ("layer_norm", "constant_norm_rescale")

Scope = str | frozenset[int] | tuple[tuple[bool, ...], ...]
Change = Callable[[Tensor, Tensor], Tensor]  # (x [n, width] f32, strength [n, k]) -> shift [n, width]


def _nested(value: object) -> float | tuple:
    """A float or nested tuples of floats from a number, a sequence or a tensor."""
    if isinstance(value, Tensor):
        value = value.tolist()
    if isinstance(value, Sequence):
        return tuple(_nested(v) for v in value)
    number = float(value)  # type: ignore[arg-type]
    if not math.isfinite(number):
        raise AuditError(f"an intervention strength must be a finite number, got {number}")
    return number


def _scope(value: object) -> Scope:
    """A scope name, a frozenset of absolute columns or a [batch, columns] mask of nested tuples."""
    if isinstance(value, Tensor):
        value = value.tolist()
    if isinstance(value, str) and value in SCOPES:
        return value
    if isinstance(value, set | frozenset | range | list | tuple) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        return frozenset(value)
    if isinstance(value, list | tuple) and value and all(isinstance(row, list | tuple) for row in value):
        return tuple(tuple(bool(v) for v in row) for row in value)
    raise AuditError(f"token positions must be {', '.join(SCOPES)}, a set of absolute positions or a "
                     f"[batch, seq] bool mask, not {value!r:.60}")


def _dense(codes: Tensor) -> Tensor:
    return codes.to_dense() if codes.is_sparse else codes


def decoder_rows(sae: SAE, latents: Sequence[int]) -> Tensor:
    """w_j [k, width]: each latent's reconstruction term per unit of activation (module docstring)."""
    basis = torch.zeros(len(latents) + 1, sae.cfg.d_sae, device=sae.W_dec.device)
    basis[torch.arange(1, len(latents) + 1), torch.tensor(list(latents))] = 1.0
    with torch.no_grad():
        decoded = sae.decode(basis).reshape(len(latents) + 1, -1)  # [k + 1, width]
    return decoded[1:] - decoded[:1]


def mean_projections(bank: SAEBank, site: Site, latents: Sequence[int], mean: Tensor) -> tuple[float, ...]:
    """The mean-ablation baseline ā·d_j of each latent, from a reference mean ā [width]."""
    directions = bank.decoder(site)[list(latents)]  # [k, width]
    return tuple((directions @ mean.float().to(directions.device)).tolist())


@dataclass(frozen=True)
class Intervention:
    """See the module docstring."""

    site: Site
    latents: tuple[int, ...]
    op: str
    strength: float | tuple = 1.0
    positions: Scope = "all"
    baseline: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        set_field = object.__setattr__
        set_field(self, "latents", tuple(int(j) for j in self.latents))
        set_field(self, "strength", _nested(self.strength))
        set_field(self, "positions", _scope(self.positions))
        set_field(self, "baseline", tuple(float(v) for v in self.baseline))
        if self.op not in OPS:
            raise AuditError(f"unknown intervention {self.op!r}; use {', '.join(OPS)}")
        if not self.latents or len(set(self.latents)) != len(self.latents) or min(self.latents) < 0:
            raise AuditError(f"an intervention needs distinct non-negative latents, got {list(self.latents)}")
        if (self.op == "mean_ablate") != bool(self.baseline) or len(self.baseline) not in (0, len(self.latents)):
            raise AuditError("mean_ablate needs one baseline ā·d per latent (and only mean_ablate takes one)")
        self.strength_matrix()

    def strength_matrix(self, device: torch.device | str = "cpu") -> Tensor:
        """The strengths as [rows, k] (rows 1 for a float or a per-latent row)."""
        k = len(self.latents)
        values = torch.tensor(self.strength, dtype=torch.float32, device=device)
        if values.dim() == 0:
            return values.expand(1, k)
        if values.dim() == 1 and values.numel():
            return values[:, None].expand(-1, k)
        if values.dim() == 2 and values.shape[1] == k and values.shape[0]:
            return values
        raise AuditError(f"a strength is a number, one per batch row, or [rows, {k}] per row and latent; "
                         f"got shape {list(values.shape)}")

    # -- compilation ---------------------------------------------------------------------------
    def edit(self, bank: SAEBank, prompt_lengths: Sequence[int] | Tensor | None = None,
             rows: Sequence[bool] | Tensor | None = None) -> Edit:
        """The SiteHooks edit of this intervention (prompt_lengths [batch]: own prompt length per row)."""
        change = _change(self, bank)
        strength = self.strength_matrix(bank.device)  # [rows or 1, k]
        lengths = None if prompt_lengths is None else torch.as_tensor(prompt_lengths, dtype=torch.long)
        if lengths is None and self.positions in ("prompt", "generated"):
            raise AuditError(f"a {self.positions}-only intervention needs each row's prompt length")
        chosen = None if rows is None else torch.as_tensor(rows, dtype=torch.bool)
        scope = _scope_mask(self.positions)

        def edit(h: Tensor, pos: Positions) -> Tensor:
            batch = h.shape[0]
            self._check_batch(batch, strength, lengths, chosen)
            hit = scope(pos, lengths) & (pos.token >= 0)  # [batch, seq]
            if chosen is not None:
                hit &= chosen.to(hit.device)[:, None]
            if not bool(hit.any()):
                return h
            x = h[hit]  # [n, width]
            row_of = hit.nonzero()[:, 0].to(strength.device)  # [n]
            shift = change(x.to(bank.device, torch.float32), strength.expand(batch, -1)[row_of])  # [n, width]
            out = h.clone()
            out[hit] = x + shift.to(h.device, h.dtype)
            return out
        return edit

    def _check_batch(self, batch: int, strength: Tensor, lengths: Tensor | None, chosen: Tensor | None) -> None:
        """Per-row inputs must match the batch (strengths and masks may also be one row for all)."""
        mask_rows = len(self.positions) if isinstance(self.positions, tuple) else None
        for name, size, shared in (("strengths", strength.shape[0], True), ("mask rows", mask_rows, True),
                                   ("prompt lengths", None if lengths is None else len(lengths), False),
                                   ("rows", None if chosen is None else len(chosen), False)):
            if size is not None and size != batch and not (shared and size == 1):
                raise AuditError(f"the {self.op} intervention at {self.site} has {size} {name} for a batch of {batch}")

    # -- data ------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        strength = self.strength if isinstance(self.strength, float) else _lists(self.strength)
        if isinstance(self.positions, str):
            positions: str | dict = self.positions
        elif isinstance(self.positions, frozenset):
            positions = {"columns": sorted(self.positions)}
        else:
            positions = {"mask": _lists(self.positions)}
        return {"site": str(self.site), "latents": list(self.latents), "op": self.op, "strength": strength,
                "positions": positions, "baseline": list(self.baseline)}

    @classmethod
    def from_dict(cls, data: dict) -> Intervention:
        positions = data.get("positions", "all")
        if isinstance(positions, dict):
            positions = frozenset(positions["columns"]) if "columns" in positions else positions["mask"]
        return cls(Site.parse(data["site"]), tuple(data["latents"]), data["op"], data.get("strength", 1.0),
                   positions, tuple(data.get("baseline", ())))


def _lists(value: tuple) -> list:
    return [_lists(v) if isinstance(v, tuple) else v for v in value]


def _scope_mask(positions: Scope) -> Callable[[Positions, Tensor | None], Tensor]:
    """positions -> (Positions, prompt lengths [batch]) -> in-scope mask [batch, seq] (padding still in)."""
    if positions == "all":
        return lambda pos, lengths: torch.ones_like(pos.token, dtype=torch.bool)
    if positions in ("prompt", "generated"):
        def by_prompt(pos: Positions, lengths: Tensor | None) -> Tensor:
            own = lengths.to(pos.token.device)[:, None]  # type: ignore[union-attr]
            return pos.token < own if positions == "prompt" else pos.token >= own
        return by_prompt
    if isinstance(positions, frozenset):
        columns = torch.tensor(sorted(positions), dtype=torch.long)

        def at_columns(pos: Positions, lengths: Tensor | None) -> Tensor:
            return torch.isin(pos.columns, columns.to(pos.token.device)).expand_as(pos.token)
        return at_columns
    mask = torch.tensor(positions, dtype=torch.bool)  # [batch, width]

    def by_mask(pos: Positions, lengths: Tensor | None) -> Tensor:
        part = mask[:, pos.start:pos.start + pos.token.shape[1]].to(pos.token.device)
        return torch.nn.functional.pad(part, (0, pos.token.shape[1] - part.shape[1])).expand_as(pos.token)
    return by_mask


def _change(iv: Intervention, bank: SAEBank) -> Change:
    """The shift of the in-scope rows x [n, width] for strengths [n, k], per the module docstring."""
    if iv.op in ("add", "mean_ablate"):
        units = bank.decoder(iv.site)[list(iv.latents)]  # [k, width]
        if iv.op == "add":
            return lambda x, s: s @ units
        target = torch.tensor(iv.baseline, device=units.device)  # [k]
        return lambda x, s: (s * (target - x @ units.T)) @ units
    sae = bank.sae(iv.site)
    latents = torch.tensor(iv.latents, device=sae.W_dec.device)
    new: Change = (lambda a, s: s * a) if iv.op == "rescale" else (lambda a, s: s.expand_as(a))
    if sae.cfg.normalize_activations in RUNTIME_NORMS:
        return lambda x, s: _decoded_shift(sae, x, latents, new, s)
    rows = decoder_rows(sae, iv.latents)  # [k, width]

    def shift(x: Tensor, s: Tensor) -> Tensor:
        with torch.no_grad():
            a = encode_rows(sae, x, latents)  # [n, k]
        return (new(a, s) - a) @ rows
    return shift


def _decoded_shift(sae: SAE, x: Tensor, latents: Tensor, new: Change, s: Tensor) -> Tensor:
    """decode(a') - decode(a) by the SAE itself; each decode follows its own encode (run-time norms)."""
    with torch.no_grad():
        full = sae.decode(_dense(sae.encode(x)))
        codes = _dense(sae.encode(x)).clone()
        codes[:, latents] = new(codes[:, latents], s)
        return sae.decode(codes) - full

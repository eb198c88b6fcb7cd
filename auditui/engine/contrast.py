"""A dictionary-free baseline: the contrastive (difference-of-means) direction per site, as a pseudo-latent.

Definitions (the pairs, weights w_c, positions and ā of `auditui.engine.attribution`)
    v      = Σ_c w_c · mean over the completion tokens of c (`activation_span`) of a_t   [width]:
             per prompt with both labels, the mean activation of its positive completions minus that
             of its negative ones, averaged over prompts (the Δ of Δ-activation, without an encoder).
    d      = v / ||v||, the unit direction; ||v|| is the Δ of the projection a·d.
    M      = Σ_c w_c / |P_c| · Σ_{t in P_c} g_t (a_t - ā)ᵀ   [width, width] over the chosen positions P_c.
    Δ-attr of any unit direction u = -uᵀ M u = Σ_c w_c · mean_t -(g_t·u)((a_t - ā)·u): the latents'
             formula, so with u = d_i (a unit SAE decoder row) it is latent i's Δ-attribution number
             for number. One pass (forward + backward per batch) gives v and M; then d's Δ-attr, every
             SAE latent's Δ-attr (-diag(D M Dᵀ)), and d's rank among them (1 + the latents above it).
    Δ-attr is even in u, so the sign of d only matters for steering: +d adds "more positive".

Steering: `direction_sae(d, site)` is a one-latent sae-lens SAE (W_dec = W_enc = d, no biases:
its activation is relu(a·d)), so a saved pack of them (`save_direction_pack`) loads as any SAE
(`--pack DIR` or `--sae DIR`) and steers through the same plans (`SITE/0:add:8`, mean_ablate exactly
along d; rescale/clamp on relu(a·d)).

API: contrast_moments(lm, plan, sites, means, positions, batch_size, progress) -> {site: (v, M)};
site_contrast(lm, site, v, m, decoder=None) -> SiteContrast (+ the unit direction).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from auditui.engine.attribution import PairPlan, descending_ranks, site_grads
from auditui.engine.labels import logit_lens_tokens
from auditui.engine.reference import batches
from auditui.engine.sites import Site
from auditui.errors import AuditError
from auditui.progress import QUIET, Progress, stop_if_asked

if TYPE_CHECKING:
    from sae_lens import SAE

    from auditui.engine.model import LoadedModel

LENS_TOKENS = 8


def check_contrast_sites(sites: list[Site]) -> list[Site]:
    if not sites:
        raise AuditError("choose at least one site for the contrastive direction (--sites)")
    z_sites = [str(s) for s in sites if s.kind == "attn_z"]
    if z_sites:
        raise AuditError(f"the contrastive direction is read in d_model sites; not {', '.join(z_sites)}")
    return list(dict.fromkeys(sites))


def contrast_moments(lm: LoadedModel, plan: PairPlan, sites: list[Site], means: dict[Site, Tensor],
                     positions: str = "prompt", batch_size: int = 8,
                     progress: Progress = QUIET) -> dict[Site, tuple[Tensor, Tensor]]:
    """(v [width], M [width, width]) per site, float64 (module docstring); Cancelled when stopped."""
    totals: dict[Site, tuple[Tensor, Tensor]] = {}
    done = 0
    for batch in batches(plan.seqs, batch_size):
        stop_if_asked(progress)
        acts, grads, sel, act_sel = site_grads(lm, batch, sites, positions)
        weights = plan.batch_weights(batch, lm.device).double()  # [B]
        per_pos = weights / sel.sum(1).clamp_min(1)  # [B]
        per_act = weights / act_sel.sum(1).clamp_min(1)  # [B]
        for site in sites:
            a, g = acts[site].detach().double(), grads[site].double()  # [B, T, width]
            centred = a[sel] - means[site].to(a)  # [N, width]
            m = (g[sel] * per_pos[sel.nonzero()[:, 0], None]).T @ centred  # [width, width]
            v = (a[act_sel] * per_act[act_sel.nonzero()[:, 0], None]).sum(0)  # [width]
            before = totals.get(site, (0.0, 0.0))
            totals[site] = (before[0] + v, before[1] + m)
        done += len(batch)
        progress.progress(done, len(plan.seqs), "contrast")
    return totals


def direction_attr(m: Tensor, directions: Tensor) -> Tensor:
    """Δ-attr [n] of unit directions [n, width]: -uᵀ M u each."""
    u = directions.to(m)
    return -((u @ m) * u).sum(dim=1)


@dataclass
class SiteContrast:
    site: str
    norm: float  # ||v||: Δ of the mean projection a·d, positive minus negative
    delta_attr: float  # of d
    logit_lens: list[str]
    d_sae: int | None = None  # the site's SAE, when one is loaded
    rank: int | None = None  # of d among its latents by Δ-attr (1: above every latent)
    top_latent: int | None = None  # the latent with the largest Δ-attr ...
    top_latent_attr: float | None = None  # ... and its Δ-attr
    nearest_latent: int | None = None  # the decoder row closest to d ...
    nearest_cosine: float | None = None  # ... and its cosine

    def to_dict(self) -> dict:
        return asdict(self)


def site_contrast(lm: LoadedModel, site: Site, v: Tensor, m: Tensor, decoder: Tensor | None = None
                  ) -> tuple[SiteContrast, Tensor]:
    """The site's contrast summary and its unit direction d [width] (float32); decoder: the SAE's unit rows [d_sae, width]."""
    norm = float(v.norm())
    if norm == 0:
        raise AuditError(f"positive and negative completions have the same mean activation at {site}")
    d = (v / norm).float()
    attr = float(direction_attr(m, d[None])[0])
    out = SiteContrast(str(site), norm, attr, logit_lens_tokens(lm, d[None], k=LENS_TOKENS)[0])
    if decoder is not None:
        latent_attr = direction_attr(m, decoder.double())  # [d_sae]
        ranks = descending_ranks(torch.cat([torch.tensor([attr], dtype=latent_attr.dtype), latent_attr.cpu()]))
        cosine = decoder.float() @ d.to(decoder.device)  # [d_sae]
        top, near = int(latent_attr.argmax()), int(cosine.abs().argmax())
        out.d_sae, out.rank = decoder.shape[0], int(ranks[0])
        out.top_latent, out.top_latent_attr = top, float(latent_attr[top])
        out.nearest_latent, out.nearest_cosine = near, float(cosine[near])
    return out, d


# -- the direction as a one-latent SAE -------------------------------------------------------------
def direction_sae(direction: Tensor, site: Site, model_name: str = "") -> SAE:
    """A sae-lens StandardSAE with one latent: W_dec = W_enc = d [width], zero biases."""
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    d = direction.detach().float().cpu()
    sae = StandardSAE(StandardSAEConfig(d_in=d.shape[0], d_sae=1,
                                        metadata=SAEMetadata(hook_name=site.hook_name, model_name=model_name)))
    with torch.no_grad():
        sae.W_dec.copy_(d[None] / d.norm())
        sae.W_enc.copy_(sae.W_dec.T)
        sae.b_dec.zero_()
        sae.b_enc.zero_()
    return sae


def save_direction_pack(directions: dict[Site, Tensor], out_dir: Path, name: str, model_id: str,
                        extra: dict | None = None) -> Path:
    """One one-latent SAE per site under out_dir and its pack.json; the pack dir."""
    from auditui.engine.saes import write_pack_manifest

    out_dir = Path(out_dir)
    if (out_dir / "pack.json").exists() or (out_dir.exists() and any(out_dir.iterdir())):
        raise AuditError(f"{out_dir} already holds files; export the directions to a new folder")
    saved = {}
    for site, d in directions.items():
        saved[site] = out_dir / f"{site.kind}_{site.layer}"
        direction_sae(d, site, model_id).save_model(saved[site])
    write_pack_manifest(out_dir, name, model_id, saved, extra)
    return out_dir

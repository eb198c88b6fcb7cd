"""Δ-attribution: rank SAE latents by what caused the positive completions (seed 003, Methods).

Definitions (for one completion C of a prompt, at one site)
    L        = sum over the completion tokens of their cross-entropy given everything before them
               (nats; L = -log p(C | prompt)). Sum, not mean, everywhere in this module.
    a_t      = the site activation at position t [width]; g_t = dL/da_t.
    d_i      = unit decoder row i of the site's SAE (`bank.decoder`; for attn_z the projection is
               taken in z space, where that SAE reads; `bank.output_decoder` only for logit lens).
    ā        = reference mean of the site (`auditui.engine.reference`).
    δ_{i,t}  = -(g_t·d_i)((a_t - ā)·d_i), first-order change of L when a_t·d_i <- ā·d_i.
    attr_i   = mean of δ_{i,t} over the chosen positions P:
               "prompt" (default, as in the seed): 1 <= t < n_prompt;
               "completion": the completion tokens that precede a scored token, n_prompt <= t < len-1;
               "all": 1 <= t < len-1.
               Position 0 (the attention sink; excluded from ā too) is never used.
    act_i    = mean SAE activation (`sae.encode` of a_t) over the completion tokens, exactly the
               positions n_prompt <= t < len (`activation_span`), whatever the attribution positions:
               that is where a prompt's positive and negative completions differ (over the prompt they
               share every activation, so Δ-act would be exactly 0).
    exact_i  = (L with a_t·d_i <- ā·d_i at every t in P, in one real forward - L) / |P|; to first
               order exact_i = attr_i, so the two are comparable number for number.
    Δ        = for each prompt with both labels: mean over its positive completions minus mean over
               its negative ones; then the mean over prompts. The same weights serve attr, act and
               exact, so Δ is linear in them and antisymmetric under swapping the labels.

Cost: all latents of every requested site come from one forward and one backward pass per batch
of completions (right-padded; the earliest needed site is made a grad leaf so the backward stops
there), then two matmuls per site, (G·Dᵀ) and ((A - ā)·Dᵀ) over the chosen positions. The exact
check costs one forward over all completions per latent.

API (pure: token sequences and tensors in; storing runs is `auditui.workflows.attribute`)
    plan_pairs([(TokenSeq, label), ...], positions) -> PairPlan: the completions of prompts with
        both labels and their weights in every Δ.
    delta_scores(engine, plan, sites, means, positions, batch_size, progress) -> {site: (Δ-attr,
        Δ-act)} [d_sae] each; raises Cancelled when progress.should_stop().
    exact_deltas(engine, plan, site, latents, mean, positions, batch_size, progress) -> [Δ exact]
        per latent, shorter when stopped (a partial check is meaningful).
    site_result / ranked_rows / refresh_checks / summarize: the result rows and run summary.
    progress.progress(done, total, message) names the phase ("attribution", "exact check SITE").
    Grad/inference modes are set inside (they are per thread).
    Latent detail view: `auditui.engine.labels.top_snippets` and `logit_lens`.

Stored run (kind "attribution", written by the workflow)
    params  {sites, top_k, positions, check, reference, batch_size, model_id, saes: {site: sha256}}
    result  {loss: "sum", positions, n_prompts, n_completions, weights: {completion_id: w},
             skipped: [completion ids without a chosen position],
             reference: {source, runs: {site: reference_mean run id}, tokens: {site: n}},
             sites: {site: {d_sae, top_k, overlap, act_top: [latents by Δ-act], n_checked, spearman}},
             rows: [{site, latent, rank, delta_attr, delta_act, act_rank, logit_lens: [tokens],
                     exact: float | None}, ...]  (per site, by rank; rank 1 = largest Δ-attr),
             n_checked, spearman (over every checked row, all sites), notes: [...]}
            (a model-diffing child run adds delta_diff, diff_rank to rows, overlap_diff to sites, diff_run:
             `auditui.workflows.diffing.attribution_with_diff`)
    summary {headline, table: {columns, rows} (top rows over all sites), notes}
    blob    "deltas": safetensors {"SITE|attr": [d_sae], "SITE|act": [d_sae]} (full Δ vectors).
    Exact checks are child runs (kind "attribution_check"); the workflow merges them into the view.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from auditui.engine.interventions import Intervention, mean_projections
from auditui.engine.labels import logit_lens_tokens
from auditui.engine.reference import TokenSeq, batches, encode_rows, pad_batch, rows_per_chunk, span_mask
from auditui.engine.sites import Positions, Site, SiteHooks
from auditui.errors import AuditError
from auditui.progress import QUIET, Progress, stop_if_asked
from auditui.text import number

if TYPE_CHECKING:
    from auditui.engine import Engine
    from auditui.engine.model import LoadedModel
    from auditui.engine.saes import SAEBank

POSITIONS = ("prompt", "completion", "all")
LENS_TOKENS = 8
SUMMARY_ROWS = 20
NO_PAIRS = "no prompt has both a positive and a negative completion; label some"
_ORDER = {"resid_pre": 0, "attn_z": 1, "attn_out": 2, "mlp_out": 3, "resid_post": 4}


# -- positions and pairs -----------------------------------------------------------------------
def check_positions(positions: str) -> str:
    if positions not in POSITIONS:
        raise AuditError(f"unknown positions {positions!r}; use {', '.join(POSITIONS)}")
    return positions


def position_span(seq: TokenSeq, positions: str) -> tuple[int, int]:
    """[start, end) of the chosen positions of one sequence (see module docstring)."""
    start = seq.n_prompt if positions == "completion" else 1
    end = seq.n_prompt if positions == "prompt" else len(seq) - 1
    return start, end


def activation_span(seq: TokenSeq) -> tuple[int, int]:
    """[start, end) of the positions Δ-activation averages: every completion token."""
    return seq.n_prompt, len(seq)


def has_positions(seq: TokenSeq, positions: str) -> bool:
    """Whether a sequence has a scored completion token and a chosen position."""
    start, end = position_span(seq, positions)
    return end > start and len(seq) > seq.n_prompt


def position_mask(seqs: list[TokenSeq], positions: str, width: int, device: torch.device) -> Tensor:
    """Bool [B, width]: the chosen positions of each sequence."""
    return span_mask(seqs, [position_span(s, positions) for s in seqs], width, device)


@dataclass
class PairPlan:
    """The completions of the labelled pairs and their weights in every Δ."""

    seqs: list[TokenSeq]
    weights: dict[int, float]  # completion id -> +1/(P·n_pos) or -1/(P·n_neg)
    n_prompts: int
    skipped: list[int] = field(default_factory=list)  # completion ids without a chosen position

    def batch_weights(self, batch: list[TokenSeq], device: torch.device) -> Tensor:
        """The weights [B] of a batch of the plan's sequences."""
        return torch.tensor([self.weights[s.completion_id] for s in batch], device=device)


def pair_weights(labelled: Iterable[tuple[TokenSeq, str]]) -> tuple[dict[int, float], int]:
    """Weights of the completions of prompts that have both labels, and the number of such prompts."""
    groups: dict[int, dict[str, list[int]]] = {}
    for seq, label in labelled:
        groups.setdefault(seq.prompt_id, {"positive": [], "negative": []})[label].append(seq.completion_id)
    both = [g for g in groups.values() if g["positive"] and g["negative"]]
    weights = {}
    for group in both:
        for label, sign in (("positive", 1.0), ("negative", -1.0)):
            for cid in group[label]:
                weights[cid] = sign / (len(both) * len(group[label]))
    return weights, len(both)


def plan_pairs(labelled: list[tuple[TokenSeq, str]], positions: str) -> PairPlan:
    """The plan of labelled sequences; AuditError when no prompt has both labels with positions."""
    check_positions(positions)
    if not labelled:
        raise AuditError(NO_PAIRS)
    usable = [(s, lab) for s, lab in labelled if has_positions(s, positions)]
    weights, n_prompts = pair_weights(usable)
    if not weights:
        raise AuditError(NO_PAIRS if len(usable) == len(labelled) else
                         f"no labelled pair has {positions} positions to attribute (empty or 1-token "
                         "completions, 1-token prompts); try --positions all")
    return PairPlan(seqs=[s for s, _ in usable if s.completion_id in weights], weights=weights,
                    n_prompts=n_prompts, skipped=[s.completion_id for s, _ in labelled
                                                  if s.completion_id not in weights])


# -- one forward + one backward ----------------------------------------------------------------
def feeds(a: Site, b: Site, parallel: bool) -> bool:
    """Is site b computed from site a (so a gradient reaching b flows from a grad leaf at a)?"""
    if a == b or b.layer > a.layer:
        return True
    if b.layer < a.layer or _ORDER[b.kind] <= _ORDER[a.kind]:
        return False
    if b.kind == "mlp_out" and a.kind in ("attn_z", "attn_out"):
        return not parallel
    return True


def grad_leaf(sites: list[Site], parallel: bool) -> Site:
    """The earliest site every requested site is computed from: the backward pass stops there."""
    first = min(sites, key=lambda s: (s.layer, _ORDER[s.kind]))
    return first if all(feeds(first, s, parallel) for s in sites) else Site(first.layer, "resid_pre")


def _make_leaf(h: Tensor, pos: Positions) -> Tensor:
    return h.detach().requires_grad_(True)


def completion_nll(lm: LoadedModel, ids: Tensor, mask: Tensor, seqs: list[TokenSeq]) -> Tensor:
    """L per sequence [B]: summed cross-entropy of the completion tokens (logits only where needed)."""
    first = min(s.n_prompt for s in seqs) - 1  # earliest position predicting a completion token
    keep = ids.shape[1] - first
    logits = lm.model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=keep).logits
    targets = torch.full((len(seqs), keep), -100, dtype=torch.long, device=ids.device)  # [B, keep]
    for row, seq in enumerate(seqs):
        targets[row, seq.n_prompt - 1 - first:len(seq) - 1 - first] = ids[row, seq.n_prompt:len(seq)]
    nll = F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=-100, reduction="none")
    return nll.sum(dim=1)


def site_scores(bank: SAEBank, site: Site, acts: Tensor, grads: Tensor, mean: Tensor, sel: Tensor,
                act_sel: Tensor) -> tuple[Tensor, Tensor]:
    """attr [B, d_sae] averaged over sel [B, T] and act [B, d_sae] over act_sel, from acts/grads [B, T, width]."""
    rows = sel.nonzero()[:, 0].to(bank.device)  # batch row of each chosen position [N]
    a = acts[sel].detach().float().to(bank.device)  # [N, width]
    g = grads[sel].float().to(bank.device)  # [N, width]
    decoder = bank.decoder(site)  # [d_sae, width]
    centred = a - mean.to(bank.device)
    attr = torch.zeros(sel.shape[0], decoder.shape[0], device=bank.device)  # [B, d_sae]
    step = rows_per_chunk(decoder.shape[0])
    for start in range(0, a.shape[0], step):
        part = slice(start, start + step)
        delta = -(g[part] @ decoder.T) * (centred[part] @ decoder.T)  # [n, d_sae]
        attr.index_add_(0, rows[part], delta)
    counts = sel.sum(dim=1).clamp_min(1).to(bank.device, torch.float32)[:, None]
    act_rows = act_sel.nonzero()[:, 0].to(bank.device)
    codes = encode_rows(bank.sae(site), acts[act_sel].detach().float().to(bank.device))  # [N', d_sae]
    act = torch.zeros_like(attr).index_add_(0, act_rows, codes)
    act_counts = act_sel.sum(dim=1).clamp_min(1).to(bank.device, torch.float32)[:, None]
    return attr / counts, act / act_counts


def site_grads(lm: LoadedModel, seqs: list[TokenSeq], sites: list[Site], positions: str = "prompt"
               ) -> tuple[dict[Site, Tensor], dict[Site, Tensor], Tensor, Tensor]:
    """One forward + backward of L: (acts, grads dL/d(acts)) [B, T, width] per site, the chosen
    positions sel and the activation positions act_sel [B, T]."""
    leaf = grad_leaf(sites, lm.adapter.parallel)
    with torch.inference_mode(False), torch.enable_grad(), \
            SiteHooks(lm.model, reads=sites, edits={leaf: _make_leaf}, keep_grad=True) as hooks:
        ids, mask = pad_batch(seqs, lm.tokenizer.pad_token_id, lm.device)
        sel = position_mask(seqs, positions, ids.shape[1], lm.device)
        act_sel = span_mask(seqs, [activation_span(s) for s in seqs], ids.shape[1], lm.device)
        completion_nll(lm, ids, mask, seqs).sum().backward()
    return hooks.acts, hooks.grads, sel, act_sel


def attribute_batch(engine: Engine, seqs: list[TokenSeq], sites: list[Site], means: dict[Site, Tensor],
                    positions: str = "prompt") -> dict[Site, tuple[Tensor, Tensor]]:
    """Per completion of `seqs`, for every latent of every site: (attr, act) [B, d_sae]."""
    acts, grads, sel, act_sel = site_grads(engine.lm, seqs, sites, positions)
    return {site: site_scores(engine.bank, site, acts[site], grads[site], means[site], sel, act_sel)
            for site in sites}


def delta_scores(engine: Engine, plan: PairPlan, sites: list[Site], means: dict[Site, Tensor],
                 positions: str = "prompt", batch_size: int = 8,
                 progress: Progress = QUIET) -> dict[Site, tuple[Tensor, Tensor]]:
    """Δ-attribution and Δ-activation [d_sae] per site; Cancelled when stopped."""
    totals: dict[Site, tuple[Tensor, Tensor]] = {}
    done = 0
    for batch in batches(plan.seqs, batch_size):
        stop_if_asked(progress)
        weights = plan.batch_weights(batch, engine.bank.device)
        for site, (attr, act) in attribute_batch(engine, batch, sites, means, positions).items():
            before = totals.get(site, (0.0, 0.0))
            totals[site] = (before[0] + weights @ attr, before[1] + weights @ act)
        done += len(batch)
        progress.progress(done, len(plan.seqs), "attribution")
    return totals


# -- exact check -------------------------------------------------------------------------------
@torch.inference_mode()
def exact_deltas(engine: Engine, plan: PairPlan, site: Site, latents: list[int], mean: Tensor,
                 positions: str = "prompt", batch_size: int = 8, progress: Progress = QUIET) -> list[float]:
    """Δ of exact_i (see module docstring) for each latent, in order; shorter when stopped."""
    lm = engine.lm
    mean_projs = mean_projections(engine.bank, site, latents, mean)  # ā·d_i per latent
    prepared = []
    for batch in batches(plan.seqs, batch_size):
        ids, mask = pad_batch(batch, lm.tokenizer.pad_token_id, lm.device)
        sel = position_mask(batch, positions, ids.shape[1], lm.device)
        per_position = plan.batch_weights(batch, lm.device) / sel.sum(1).clamp_min(1)
        prepared.append((batch, ids, mask, sel, per_position, completion_nll(lm, ids, mask, batch)))
    out: list[float] = []
    for j, (latent, mean_proj) in enumerate(zip(latents, mean_projs, strict=True)):
        if progress.should_stop():
            break
        total = 0.0
        for batch, ids, mask, sel, per_position, base in prepared:
            ablate = Intervention(site, (latent,), "mean_ablate", 1.0, positions=sel, baseline=(mean_proj,))
            with SiteHooks(lm.model, edits={site: ablate.edit(engine.bank)}):
                total += float(per_position @ (completion_nll(lm, ids, mask, batch) - base))
        out.append(total)
        progress.progress(j + 1, len(latents), f"exact check {site}")
    return out


# -- ranking -----------------------------------------------------------------------------------
def descending_ranks(values: Tensor) -> Tensor:
    """1 = largest; ties in index order."""
    ranks = torch.empty_like(values, dtype=torch.long)
    ranks[values.argsort(descending=True, stable=True)] = torch.arange(1, len(values) + 1, device=values.device)
    return ranks


def _average_ranks(values: Tensor) -> Tensor:
    _, inverse, counts = torch.unique(values, return_inverse=True, return_counts=True)
    counts = counts.double()
    first = torch.cumsum(counts, 0) - counts
    return (first + (counts - 1) / 2)[inverse]


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman rank correlation (ties get average ranks); None for fewer than 2 points or no spread."""
    if len(x) < 2:
        return None
    rx = _average_ranks(torch.tensor(x, dtype=torch.float64))
    ry = _average_ranks(torch.tensor(y, dtype=torch.float64))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = float(rx.norm() * ry.norm())
    return None if denom == 0 else float(rx @ ry) / denom


def _row(site: Site, latent: int, attr: Tensor, act: Tensor, attr_ranks: Tensor, act_ranks: Tensor,
         lens: list[str]) -> dict:
    return {"site": str(site), "latent": latent, "rank": int(attr_ranks[latent]),
            "delta_attr": float(attr[latent]), "delta_act": float(act[latent]),
            "act_rank": int(act_ranks[latent]), "logit_lens": lens, "exact": None}


def ranked_rows(engine: Engine, site: Site, attr: Tensor, act: Tensor, latents: list[int]) -> list[dict]:
    """Result rows for `latents` of `site`, labelled by logit lens."""
    lens = logit_lens_tokens(engine.lm, engine.bank.output_decoder(site)[latents], k=LENS_TOKENS)
    attr_ranks, act_ranks = descending_ranks(attr), descending_ranks(act)
    return [_row(site, latent, attr, act, attr_ranks, act_ranks, tokens)
            for latent, tokens in zip(latents, lens, strict=True)]


def site_result(engine: Engine, site: Site, attr: Tensor, act: Tensor, top_k: int) -> tuple[dict, list[dict]]:
    k = min(top_k, attr.shape[0])
    top, act_top = attr.topk(k).indices.tolist(), act.topk(k).indices.tolist()
    info = {"d_sae": attr.shape[0], "top_k": k, "overlap": len(set(top) & set(act_top)), "act_top": act_top,
            "n_checked": 0, "spearman": None}
    return info, ranked_rows(engine, site, attr, act, top)


def refresh_checks(result: dict) -> None:
    """Recompute n_checked and Spearman(delta_attr, exact) per site and over all sites."""
    checked = [r for r in result["rows"] if r["exact"] is not None]
    for site, info in result["sites"].items():
        rows = [r for r in checked if r["site"] == site]
        info["n_checked"] = len(rows)
        info["spearman"] = spearman([r["delta_attr"] for r in rows], [r["exact"] for r in rows])
    result["n_checked"] = len(checked)
    result["spearman"] = spearman([r["delta_attr"] for r in checked], [r["exact"] for r in checked])



def summarize(result: dict) -> dict:
    """The run summary: headline, table of the top rows over all sites, notes."""
    rows = sorted(result["rows"], key=lambda r: -r["delta_attr"])
    best = rows[0]
    overlaps = ", ".join(f"{site} {info['overlap']}/{info['top_k']}" for site, info in result["sites"].items())
    headline = (f"Δ-attribution over {result['n_prompts']} prompts ({result['n_completions']} completions, "
                f"{result['positions']} positions): top latent {best['site']}#{best['latent']} "
                f"(Δ-attr {number(best['delta_attr'])}); top-k overlap with Δ-activation: {overlaps}")
    if result["n_checked"]:
        headline += (f"; Spearman(attribution, exact ΔL) {number(result['spearman'])} over "
                     f"{result['n_checked']} checked latents")
    diffed = [f"{site} {info['overlap_diff']}/{info['top_k']}" for site, info in result["sites"].items()
              if "overlap_diff" in info]  # model diffing merged in (`auditui.engine.diffing.annotate_attribution`)
    if diffed:
        headline += f"; with model-diffing Δ-activation: {', '.join(diffed)}"
    models = ["Δ-act models"] if diffed else []
    table = {"columns": ["rank", "site", "latent", "Δ-attr", "Δ-act", *models, "exact ΔL", "logit lens"],
             "rows": [[r["rank"], r["site"], r["latent"], number(r["delta_attr"]), number(r["delta_act"]),
                       *([number(r.get("delta_diff"))] if models else []), number(r["exact"]), " ".join(r["logit_lens"][:5])]
                      for r in rows[:SUMMARY_ROWS]]}
    return {"headline": headline, "table": table, "notes": result["notes"]}


# -- sites --------------------------------------------------------------------------------------
def check_sites(engine: Engine, sites: list[Site]) -> list[Site]:
    if not sites:
        raise AuditError("choose at least one site to attribute")
    missing = [str(s) for s in sites if s not in engine.bank]
    if missing:
        loaded = ", ".join(str(s) for s in engine.bank.sites) or "none"
        raise AuditError(f"no SAE for site {', '.join(missing)} (SAEs loaded for: {loaded})")
    return list(dict.fromkeys(sites))



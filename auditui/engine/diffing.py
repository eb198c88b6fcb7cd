"""Model diffing: Δ-activation of SAE latents between the audited model and a reference model
(Wang et al., 2025), the baseline seed 003 compares Δ-attribution with.

Definitions (one site s, its SAE encoder f_s, the same SAE for both models)
    seqs   token sequences both models read as the same stored ids: a session's texts, a text
           file's windows, or a built pack's held-out windows (`held_out_sequences`).
    P      the positions averaged: each sequence's own tokens (`counted_mask`; position 0, the
           attention sink, never), keeping only those that are inliers (`reference.inliers`: norm
           at most 10x the batch median) in *both* models, so both means run over the same tokens.
    m^A_i  mean over P of f_s(a_t)_i, a_t the site activation of the audited model; m^R_i the same
           in the reference model.
    Δ_i    m^A_i - m^R_i, ranked descending (rank 1: the latent the audited model uses most beyond
           the reference), as the within-model Δ-activation and Δ-attribution are ranked.
    Two other rankings of the same latents are compared by top-k overlap |top-k(Δ) ∩ top-k(b)| and
    by each row's rank in them: Δ-attribution ("attribution") and the within-model Δ-activation,
    positive minus negative completions of the audited model ("within"), both the full vectors of
    an attribution run (`auditui.engine.attribution`).

Compatibility: `check_compatible(audited, reference)` requires the same tokenizer (the same
token -> id mapping and vocabulary size), the same width d_model and the same depth.

API (pure: models, SAEs and token sequences in, typed results out)
    check_compatible(audited, reference) -> None, or a one-line AuditError
    held_out_sequences(pack_dir) -> [TokenSeq]: the held-out windows a pack build kept (corpus.pt)
    diff_activations(audited, reference, bank, seqs, sites, batch_size, progress) -> {site: SiteDiff}
    rank_site(lm, bank, diff, top_k, baselines) -> SiteRanking (rows labelled by logit lens)
    DiffResult(sites, n_texts, source, notes): to_dict() (the run result) and summary()
    annotate_attribution(result, deltas, run_id): the model-diffing column on an attribution result
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from auditui.engine.attribution import LENS_TOKENS, SUMMARY_ROWS, descending_ranks
from auditui.engine.labels import logit_lens_tokens
from auditui.engine.packs import WorkDir
from auditui.engine.reference import TokenSeq, counted_mask, encode_rows, inliers, read_sites
from auditui.engine.sites import Site
from auditui.errors import AuditError
from auditui.progress import QUIET, Progress, stop_if_asked
from auditui.text import number

if TYPE_CHECKING:
    from auditui.engine.model import LoadedModel
    from auditui.engine.saes import SAEBank

NEEDS = "model diffing needs the same tokenizer, width and depth"


# -- compatibility and texts -------------------------------------------------------------------
def check_compatible(audited: LoadedModel, reference: LoadedModel) -> None:
    """AuditError (one line) unless both models share the tokenizer, d_model and the number of layers."""
    a, r = audited, reference
    vocab_a, vocab_r = a.tokenizer.get_vocab(), r.tokenizer.get_vocab()  # token -> id
    size_a, size_r = int(a.model.config.vocab_size), int(r.model.config.vocab_size)
    if size_a != size_r or vocab_a != vocab_r:
        how = (f"{len(vocab_r)} vs {len(vocab_a)} tokens, embeddings {size_r} vs {size_a}"
               if (size_a, len(vocab_a)) != (size_r, len(vocab_r)) else "same size, other token ids")
        raise AuditError(f"reference model {r.model_id} has another tokenizer than {a.model_id} ({how}); {NEEDS}")
    if a.d_model != r.d_model:
        raise AuditError(f"reference model {r.model_id} has d_model {r.d_model}, {a.model_id} has {a.d_model}; {NEEDS}")
    if a.n_layers != r.n_layers:
        raise AuditError(f"reference model {r.model_id} has {r.n_layers} layers, {a.model_id} has {a.n_layers}; {NEEDS}")


def held_out_sequences(pack_dir: Path) -> list[TokenSeq]:
    """The held-out token windows a pack build kept in its folder (`corpus.pt`), one TokenSeq each."""
    path = WorkDir(Path(pack_dir)).corpus
    if not path.is_file():
        raise AuditError(f"pack {pack_dir} keeps no held-out corpus ({path.name}); diff over the session or a text file")
    try:
        held = torch.load(path, map_location="cpu", weights_only=True)["held_out"]  # [n_windows, seq_len]
    except Exception as exc:  # pickle / zip / key errors of a damaged file
        raise AuditError(f"cannot read the held-out corpus {path}: {str(exc).splitlines()[0][:200]}") from None
    return [TokenSeq(ids=tuple(int(i) for i in row), n_prompt=len(row)) for row in held if len(row) > 1]


# -- the two-model pass ------------------------------------------------------------------------
@dataclass
class SiteDiff:
    """Mean SAE activations of one site in both models over the same positions."""

    site: Site
    audited: Tensor  # [d_sae] m^A
    reference: Tensor  # [d_sae] m^R
    n_tokens: int

    @property
    def delta(self) -> Tensor:
        """Δ [d_sae] = m^A - m^R."""
        return self.audited - self.reference


def diff_activations(audited: LoadedModel, reference: LoadedModel, bank: SAEBank, seqs: list[TokenSeq],
                     sites: list[Site], batch_size: int = 8, progress: Progress = QUIET) -> dict[Site, SiteDiff]:
    """m^A, m^R per site (see module docstring); both models read the same batches in lockstep."""
    check_compatible(audited, reference)
    sums: dict[Site, list[Tensor | float]] = {site: [0.0, 0.0] for site in sites}
    counts = {site: 0 for site in sites}
    done = 0
    both = zip(read_sites(audited, seqs, sites, batch_size), read_sites(reference, seqs, sites, batch_size), strict=True)
    for (batch, ids, acts_a), (_batch, _ids, acts_r) in both:
        counted = counted_mask(batch, ids.shape[1], audited.device)  # [B, T]
        for site in sites:
            a = acts_a[site][counted]  # [N, width]
            r = acts_r[site][counted.to(reference.device)].to(a.device)  # [N, width], the same positions
            keep = inliers(a) & inliers(r)  # [N]
            for slot, rows in enumerate((a[keep], r[keep])):
                sums[site][slot] = sums[site][slot] + encode_rows(bank.sae(site), rows).double().sum(0)  # [d_sae]
            counts[site] += int(keep.sum())
        done += len(batch)
        progress.progress(done, len(seqs), "model diffing")
        stop_if_asked(progress)
    if any(n == 0 for n in counts.values()):
        raise AuditError("the texts have no token to average (each text needs 2+ tokens)")
    return {site: SiteDiff(site, (sums[site][0] / counts[site]).float(), (sums[site][1] / counts[site]).float(),
                           counts[site]) for site in sites}


# -- rankings ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Baselines:
    """The two other rankings of a site's latents, from one attribution run (`auditui.engine.attribution`)."""

    run_id: int
    attr: Tensor  # [d_sae] Δ-attribution
    within: Tensor  # [d_sae] within-model Δ-activation: positive minus negative completions


def top_indices(values: Tensor, k: int) -> list[int]:
    """The k largest entries of values [n], ties in index order (as `descending_ranks`)."""
    return values.argsort(descending=True, stable=True)[:k].tolist()


@dataclass
class DiffRow:
    site: str
    latent: int
    rank: int  # 1 = largest Δ
    delta_act: float  # Δ_i
    audited: float  # m^A_i
    reference: float  # m^R_i
    logit_lens: list[str] = field(default_factory=list)
    attr_rank: int | None = None  # rank of the latent by Δ-attribution (None: no attribution run)
    delta_attr: float | None = None
    within_rank: int | None = None  # rank by the within-model Δ-activation
    delta_within: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SiteRanking:
    site: str
    d_sae: int
    top_k: int
    n_tokens: int
    rows: list[DiffRow]  # the top_k latents by Δ, by rank
    overlap_attr: int | None = None  # |top-k(Δ) ∩ top-k(Δ-attribution)|
    overlap_within: int | None = None  # |top-k(Δ) ∩ top-k(within-model Δ-activation)|
    attribution_run: int | None = None  # the run both baselines come from

    def info(self) -> dict:
        """The site's entry in the result (its rows go to the result's flat row list)."""
        return {k: v for k, v in asdict(self).items() if k not in ("site", "rows")}


def rank_site(lm: LoadedModel, bank: SAEBank, diff: SiteDiff, top_k: int,
              baselines: Baselines | None = None) -> SiteRanking:
    """The top_k latents of `diff` by Δ, compared with the baselines of the same SAE when given."""
    delta = diff.delta.cpu()  # [d_sae]
    k = min(top_k, delta.shape[0])
    top = top_indices(delta, k)
    ranks = descending_ranks(delta)
    lens = logit_lens_tokens(lm, bank.output_decoder(diff.site)[top], k=LENS_TOKENS)
    rows = [DiffRow(str(diff.site), i, int(ranks[i]), float(delta[i]), float(diff.audited[i]),
                    float(diff.reference[i]), tokens) for i, tokens in zip(top, lens, strict=True)]
    ranking = SiteRanking(str(diff.site), delta.shape[0], k, diff.n_tokens, rows)
    if baselines is None:
        return ranking
    attr, within = baselines.attr.cpu(), baselines.within.cpu()  # [d_sae] each
    if attr.shape != delta.shape or within.shape != delta.shape:
        raise AuditError(f"run {baselines.run_id} has {attr.shape[0]} latents at {diff.site}, its SAE {delta.shape[0]}")
    attr_ranks, within_ranks = descending_ranks(attr), descending_ranks(within)
    for row in rows:
        row.attr_rank, row.delta_attr = int(attr_ranks[row.latent]), float(attr[row.latent])
        row.within_rank, row.delta_within = int(within_ranks[row.latent]), float(within[row.latent])
    ranking.overlap_attr = len(set(top) & set(top_indices(attr, k)))
    ranking.overlap_within = len(set(top) & set(top_indices(within, k)))
    ranking.attribution_run = baselines.run_id
    return ranking



@dataclass
class DiffResult:
    sites: list[SiteRanking]
    n_texts: int
    source: str  # "session", "held_out" or the text file
    notes: list[str] = field(default_factory=list)

    @property
    def rows(self) -> list[DiffRow]:
        return [row for site in self.sites for row in site.rows]

    def to_dict(self) -> dict:
        return {"n_texts": self.n_texts, "source": self.source, "sites": {s.site: s.info() for s in self.sites},
                "rows": [row.to_dict() for row in self.rows], "notes": list(self.notes)}

    def summary(self) -> dict:
        """Headline, the top rows over all sites (Δ-act, and the latent's rank by Δ-attribution and by the
        within-model Δ-activation), notes."""
        best = max(self.rows, key=lambda r: r.delta_act)
        tokens = sum(s.n_tokens for s in self.sites) // max(1, len(self.sites))
        headline = (f"model diffing Δ-activation (audited - reference) over {self.n_texts} texts ({self.source}, "
                    f"~{tokens} tokens per site): top latent {best.site}#{best.latent} (Δ-act {number(best.delta_act)})")
        for name, key in (("Δ-attribution", "overlap_attr"), ("the within-model Δ-activation", "overlap_within")):
            found = [f"{s.site} {getattr(s, key)}/{s.top_k}" for s in self.sites if getattr(s, key) is not None]
            headline += f"; top-k overlap with {name}: {', '.join(found)}" if found else ""
        rows = sorted(self.rows, key=lambda r: -r.delta_act)[:SUMMARY_ROWS]
        table = {"columns": ["rank", "site", "latent", "Δ-act", "attr #", "within #", "logit lens"],  # 80 columns
                 "rows": [[r.rank, r.site, r.latent, number(r.delta_act), number(r.attr_rank), number(r.within_rank),
                           " ".join(r.logit_lens[:4])] for r in rows]}
        return {"headline": headline, "table": table, "notes": list(self.notes)}


# -- the model-diffing column of an attribution result -----------------------------------------
def annotate_attribution(result: dict, deltas: dict[str, Tensor], run_id: int) -> None:
    """Add `delta_diff` / `diff_rank` to each attribution row and `overlap_diff` to each site it has Δ for.

    result: an attribution run's result (layout in `auditui.engine.attribution`); deltas: {site: Δ [d_sae]}."""
    for site, info in result["sites"].items():
        if site not in deltas:
            continue
        delta = deltas[site].cpu()  # [d_sae]
        ranks = descending_ranks(delta)
        rows = [r for r in result["rows"] if r["site"] == site]
        for row in rows:
            row["delta_diff"], row["diff_rank"] = float(delta[row["latent"]]), int(ranks[row["latent"]])
        attr_top = {r["latent"] for r in rows if r["rank"] <= info["top_k"]}
        info["overlap_diff"] = len(attr_top & set(top_indices(delta, info["top_k"])))
    result["diff_run"] = run_id
    result["notes"] = [*result["notes"], f"Δ-act models: mean SAE activation, audited minus reference model "
                                         f"(model diffing run {run_id})"]

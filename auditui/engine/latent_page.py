"""A latent's page (what Neuronpedia / SAE-Vis show, offline): where it fires, what it writes, its neighbours.

`latent_page(engine, feature, corpus, texts)` reads the site over two sets of token sequences, one
forward up to the site's layer and one SAE encode each (`labels.latent_values`):
    corpus   e.g. the pack build's held-out windows (`diffing.held_out_sequences`)
    texts    e.g. the session's own texts (each completion with its prompt)
and returns a plain dict:
    {"feature": "2/resid_post/5",
     "corpus": {"n_texts", "n_tokens" (counted positions), "n_active" (activation > 0), "max"},
     "snippets": the k corpus snippets where it is most active (`labels.strongest`, best first),
     "histogram": {"edges": [bins + 1 floats from 0 to the max], "counts": [bins ints]} of the active
                  corpus tokens' activations,
     "texts": every text where it fires, strongest first (snippet dicts: completion_id, prompt_id, ...),
     "lens": {"positive": [(token, cosine)], "negative": [(token, cosine)]}: the logit lens of the
             decoder direction d and of -d (the tokens it promotes and suppresses),
     "neighbours": [{"relation", "site", "matches": [{"feature", "score", "label"}]}] or [] with a note}
Neighbours are decoder-cosine matches (`flow`): a residual feature's backward and forward R/M/A steps;
a module latent (mlp_out, attn_out, attn_z at layer L) against the residual before (L-1) and after (L).
Counted positions skip position 0 (the attention sink) as everywhere else.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from auditui.engine.flow import MODULES, RESIDUAL_KINDS, Feature, coverage, flow_index
from auditui.engine.labels import latent_values, logit_lens, strongest
from auditui.engine.reference import TokenSeq
from auditui.errors import AuditError
from auditui.progress import QUIET, Progress

if TYPE_CHECKING:
    from auditui.engine import Engine

NEIGHBOURS = 3  # matches per module and direction


def histogram(values: list[float], bins: int) -> dict:
    """Counts of `values` in `bins` equal bins from 0 to their max (the last bin closed)."""
    top = max(values, default=0.0)
    if not values or top <= 0:
        return {"edges": [], "counts": []}
    counts = torch.histc(torch.tensor(values), bins=bins, min=0.0, max=top).long().tolist()
    return {"edges": [top * i / bins for i in range(bins + 1)], "counts": counts}


def neighbours(engine: Engine, feature: Feature) -> tuple[list[dict], list[str]]:
    """The feature's flow neighbours (see module docstring) with logit-lens labels, and notes."""
    index = flow_index(engine)
    groups: list[dict] = []
    notes: list[str] = []
    if feature.site.kind in RESIDUAL_KINDS:
        for direction in ("backward", "forward"):
            step = index.step(feature, NEIGHBOURS, direction)
            for module in MODULES:
                if step.matches.get(module):
                    groups.append({"relation": f"{direction} {module}", "site": str(step.matches[module][0].feature.site),
                                   "matches": [(m.feature, m.score) for m in step.matches[module]]})
            notes += [f"{direction} {m}: {why}" for m, why in step.missing.items()]
    else:
        layer = feature.site.layer
        for relation, pos in (("residual before", layer - 1), ("residual after", layer)):
            site = index.residual_site(pos)
            if isinstance(site, str):
                notes.append(f"{relation}: {site}")
                continue
            top = index.cache.top(feature.site, site, feature.latent, NEIGHBOURS)
            groups.append({"relation": relation, "site": str(site), "matches": [(Feature(site, j), s) for j, s in top]})
    labels = index.labels([f for group in groups for f, _ in group["matches"]]) if groups else []
    at = iter(labels)
    for group in groups:
        group["matches"] = [{"feature": str(f), "score": score, "label": next(at)} for f, score in group["matches"]]
    return groups, notes


@torch.no_grad()
def latent_page(engine: Engine, feature: Feature | str, corpus: list[TokenSeq], texts: list[TokenSeq], k: int = 8,
                bins: int = 16, lens: int = 8, progress: Progress = QUIET) -> dict:
    """The page of one latent (see module docstring); Cancelled when progress.should_stop()."""
    feature = Feature.parse(feature) if isinstance(feature, str) else feature
    if feature.site not in engine.bank:
        raise AuditError(f"no SAE at {feature.site}; this bank covers {coverage(engine.bank)}")
    d_sae = int(engine.bank.sae(feature.site).cfg.d_sae)
    if not 0 <= feature.latent < d_sae:
        raise AuditError(f"latent {feature.latent} is out of range for {feature.site} (d_sae {d_sae})")
    site, latent = feature.site, feature.latent
    scanned = latent_values(engine, corpus, site, latent, progress=progress, stage="held-out corpus") if corpus else []
    counted = [v for seq, values in scanned for v in values[seq.counted_from:]]
    active = [v for v in counted if v > 0]
    on_texts = latent_values(engine, texts, site, latent, progress=progress, stage="session texts") if texts else []
    direction = engine.bank.output_decoder(site)[latent]
    positive, negative = logit_lens(engine.lm, torch.stack([direction, -direction]), k=lens)
    groups, notes = neighbours(engine, feature)
    return {"feature": str(feature),
            "corpus": {"n_texts": len(corpus), "n_tokens": len(counted), "n_active": len(active),
                       "max": max(active, default=0.0)},
            "snippets": strongest(engine.lm, scanned, k), "histogram": histogram(active, bins),
            "texts": strongest(engine.lm, on_texts, len(on_texts)),
            "lens": {"positive": positive, "negative": [(token, -cos) for token, cos in negative]},
            "neighbours": groups, "notes": notes}

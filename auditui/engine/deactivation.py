"""The deactivation test (seed 001, section 5.2 and appendix A.2): does removing a matched
predecessor turn the target feature off?

Rescaling. At token t of a site with SAE P, let a = P.encode(h_t) (activations [d_sae]) and S a set
of latents of P. The edit is

    h_t <- h_t + (r - 1) * c_S,      c_S = P.decode(a) - P.decode(a with a_j = 0 for j in S)

c_S is the part of the SAE reconstruction carried by S. For SAEs without activation normalisation
(sae-lens `normalize_activations = "none"`, the usual case) c_S = sum_{j in S} a_j * W_dec[j]: the
raw decoder row, i.e. the coefficient a_j * ||W_dec[j]|| on the unit direction
v_j = W_dec[j] / ||W_dec[j]||. This is the paper's h + (r - 1) a V^T with V the raw decoder columns,
so r = 0 removes exactly those latents' terms from the reconstruction (b_dec and the reconstruction
error stay in h), r = 1 changes nothing and r = 2 doubles them. For normalising SAEs the difference
of decodes applies the SAE's own output scaling. `a` is computed inside the hook from the tensor as
it arrives there (when several sites are edited, downstream ones see the upstream edits), and only
token t changes.

The test. For a target residual feature at position L on a text at token t: a clean pass gives the
target's activation z_old and every predecessor's activation; the target's top-5 backward matches
per module R, M, A (flow.py) are the candidates; for each method

    top1    the module's best match
    top5    all five matches (the module counts as active when any of them is)
    random  one of the five, drawn with `seed`

and each module that has an SAE, one edited pass gives z_new and change = 1 - z_new / z_old (1 = fully
deactivated, 0 = no effect, negative = the target grew). A "group" row per method rescales the chosen
features of all modules active under that method together when at least two are (for one active
module it equals that module's row). All edited passes run as one batch; tokens after t are dropped
(causal model).

Result (JSON-able):
  {"target", "token": t, "token_text", "r", "k", "seed", "z_old", "active",
   "predecessors": {"R": [{"feature", "score", "activation"}, ...], "M": ..., "A": ...},
   "missing": {"A": "no SAE at 3/attn_out nor 3/attn_z"},
   "groups": {"top1": "From RES & MLP", "top5": ..., "random": ...},
   "rows": [{"method", "set": "RES"|"MLP"|"ATT"|"group", "features": ["11/resid_post/5", ...],
             "active": bool, "z_new", "change"}],
   "notes": [...]}
`deactivation_summary(result)` renders it as a run summary {"headline", "table", "notes"};
`auditui.workflows.deactivate` stores a result as a run of kind "deactivation".
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import torch

from auditui.engine.flow import (
    MODULE_NAMES,
    MODULES,
    Feature,
    Match,
    check_position,
    flow_index,
    forward_sites,
    group_name,
    group_record,
    latent_activations,
)
from auditui.engine.interventions import Intervention
from auditui.engine.sites import Site

if TYPE_CHECKING:

    from auditui.engine import Engine

METHODS = ("top1", "top5", "random")
TOP_K = 5


def rescale(site: Site, latent_sets: list[list[int]], token: int, r: float) -> Intervention:
    """Batch row b rescales latents `latent_sets[b]` by r at absolute token `token` (the others by 1)."""
    latents = sorted({j for chosen in latent_sets for j in chosen})
    strength = [[r if j in chosen else 1.0 for j in latents] for chosen in latent_sets]  # [rows, k]
    return Intervention(site, tuple(latents), "rescale", strength, positions={token})


def pick(matches: list[Match], method: str, rng: random.Random) -> list[Match]:
    if method == "top1":
        return matches[:1]
    if method == "top5":
        return matches[:TOP_K]
    return [rng.choice(matches[:TOP_K])]


def deactivation_test(engine: Engine, target: Feature | str, ids: list[int], token: int, r: float = 0.0,
                      seed: int = 0) -> dict:
    """Rescale the target's predecessors by r at one token; report 1 - z_new/z_old (module docstring)."""
    index = flow_index(engine)
    lm, bank = index.lm, index.bank
    feature = index.check(target)
    pos = check_position(ids, token)
    step = index.step(feature, TOP_K, "backward")
    batch = torch.tensor([ids[:pos + 1]])  # [1, pos + 1]
    candidates = {x.feature for ms in step.matches.values() for x in ms} | {feature}
    clean = forward_sites(lm, batch, {f.site for f in candidates})
    activation = {f: float(v[0]) for f, v in latent_activations(bank, clean, pos, candidates).items()}
    record = group_record(step, activation)
    result = {"target": str(feature), "token": pos, "token_text": lm.tokenizer.decode([ids[pos]]), "r": r,
              "k": TOP_K, "seed": seed, "z_old": activation[feature], "active": record["active"],
              "predecessors": record["predecessors"], "missing": record["missing"], "groups": {},
              "rows": [], "notes": [f"{MODULE_NAMES[m]}: {why}" for m, why in step.missing.items()]}
    if not record["active"]:
        result["notes"].append(f"{feature} is inactive at token {pos}; pick a token where it fires")
        return result
    rng = random.Random(seed)
    variants: list[tuple[str, str, list[Match]]] = []
    for method in METHODS:
        picks = {m: pick(step.matches[m], method, rng) for m in MODULES if step.matches.get(m)}
        active = [m for m in picks if any(activation[x.feature] > 0 for x in picks[m])]
        result["groups"][method] = group_name(active)
        variants += [(method, MODULE_NAMES[m], chosen) for m, chosen in picks.items()]
        if len(active) >= 2:
            variants.append((method, "group", [x for m in active for x in picks[m]]))
    sites = {x.feature.site for _, _, chosen in variants for x in chosen}
    edits = {site: rescale(site, [[x.feature.latent for x in chosen if x.feature.site == site]
                                  for _, _, chosen in variants], pos, r).edit(bank) for site in sites}
    edited = forward_sites(lm, batch.repeat(len(variants), 1), {feature.site}, edits)
    z_new = latent_activations(bank, edited, pos, [feature])[feature].tolist()  # [n_variants]
    for (method, name, chosen), z in zip(variants, z_new, strict=True):
        result["rows"].append({"method": method, "set": name, "features": [str(x.feature) for x in chosen],
                               "active": any(activation[x.feature] > 0 for x in chosen), "z_new": z,
                               "change": 1.0 - z / result["z_old"]})
    return result


def deactivation_summary(result: dict) -> dict:
    """Run summary of a deactivation test: headline, one row per (method, set), notes."""
    rows = [[row["method"], row["set"], ", ".join(row["features"]), "yes" if row["active"] else "no",
             f"{row['z_new']:.4g}", f"{row['change']:.3f}"] for row in result["rows"]]
    best = max(result["rows"], key=lambda row: row["change"], default=None)
    headline = (f"deactivation of {result['target']} predecessors at token {result['token']} "
                f"({result['token_text']!r}), r={result['r']}: z_old={result['z_old']:.4g}")
    if best is not None:
        headline += f"; largest change {best['change']:.3f} ({best['method']} {best['set']})"
    return {"headline": headline,
            "table": {"columns": ["method", "set", "features", "active", "z_new", "change"], "rows": rows},
            "notes": [f"groups: {', '.join(f'{m} {g}' for m, g in result['groups'].items())}"] * bool(result["groups"])
            + list(result["notes"])}

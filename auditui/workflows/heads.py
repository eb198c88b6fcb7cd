"""Attention heads (seed 004) as runs: a prompt's scan, one pair's decomposition, head <-> latent alignment.

    heads_scan(store, engine, session_id, HeadsScanRequest(text, threshold=0.3), progress)   kind "heads_scan"
    heads_pair(store, engine, session_id, HeadsPairRequest(text, layer, head, query, key))     kind "heads_pair"
    heads_align(store, engine, session_id, HeadsAlignRequest(layer=, head=, k=) | (feature=))  kind "heads_align"

Each returns a `HeadsOutcome(result, summary, run_id)`; with `store=None` nothing is stored (the
CLI's --no-save). A request is validated (ranges, the text's tokens, the SAE it needs) before any
run starts, so a refused request stores nothing. Params are the request (token positions resolved)
plus the model id and pack label; provenance names the SAEs read (none for a scan). The Ω SVD of
every head is cached under `engine.cache_dir / "heads"` (see `auditui.engine.heads`).

Results are the engine dataclasses' `to_dict()` plus:
  * scan: `tokens` (the prompt's token strings) and `kept` ({top, per_head}); `hits` keeps the `top`
    sparsest hits overall and the `per_head` sparsest of every head (sparsest first; `n_hits`
    counts them all), so every head's best pairs can be shown again from the run.
  * pair: `query_token`, `key_token`, `site` (the residual SAE feeding the layer, or None) and
    `alignments`: for the `align` largest terms (in the N_recon order) the `PairAlignment` of that
    singular pair with `labels` {latent: logit-lens tokens} and `p_values` {"query": [...], "key": [...]}.
  * align by pair: `site`, `labels`, `p_values`; by feature: `feature`, `p_values` (one per match).

Alignment compares singular vectors with the decoder rows of the residual SAE feeding the layer:
resid_pre(L), else resid_post(L-1); a clear error when the bank has neither.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from auditui.engine.flow import Feature, coverage
from auditui.engine.head_weights import head_weights
from auditui.engine.heads import (
    Decomposition,
    OmegaSVD,
    PairAlignment,
    Scan,
    ScanHit,
    align_pair,
    capture_states,
    decompose,
    heads_for_direction,
    omega_svd,
    scan,
)
from auditui.engine.labels import logit_lens_tokens, token_strings
from auditui.engine.sites import Site
from auditui.errors import AuditError
from auditui.progress import QUIET, Progress, stop_if_asked
from auditui.workflows.runs import provenance, recorded_run

if TYPE_CHECKING:
    from auditui.engine import Engine
    from auditui.engine.model import LoadedModel
    from auditui.store.database import Store

SCAN_KIND = "heads_scan"
PAIR_KIND = "heads_pair"
ALIGN_KIND = "heads_align"
METRICS_NOTE = ("S(v) = (mean|v|)² / mean(v²) over the d_head terms of ℓ̃ = ℓ_key - mean of the other visible "
                "keys' ℓ (1: all terms equal, 1/d_head: one term); N_recon: the fewest terms, largest first, "
                "whose sum reaches ℓ̃; control: the same with U and V rotated at random (same singular values)")


# -- requests --------------------------------------------------------------------------------------
def _check_text(text: str) -> None:
    if not text.strip():
        raise AuditError("give a text to look at (--text)")


def _in_range(name: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise AuditError(f"{name} must be in {low}..{high}, not {value}")


@dataclass(frozen=True)
class HeadsScanRequest:
    text: str
    threshold: float = 0.3  # attention weight above which a (query, key) pair is decomposed
    top: int = 20  # sparsest hits shown (and kept overall)
    per_head: int = 5  # sparsest hits kept for every head
    chat: bool = False  # wrap the text in the chat template
    include_first_key: bool = False  # key 0 is usually an attention sink
    seed: int = 0  # rotation of the control

    def validate(self) -> None:
        _check_text(self.text)
        if not 0 < self.threshold <= 1:
            raise AuditError(f"threshold must be in (0, 1], not {self.threshold}")
        _in_range("top", self.top, 1, 100_000)
        _in_range("per-head", self.per_head, 0, 10_000)
        _in_range("seed", self.seed, 0, 2**62)


@dataclass(frozen=True)
class HeadsPairRequest:
    text: str
    layer: int
    head: int
    query: int  # token index (negative counts from the end)
    key: int  # token index (negative counts from the end), at most the query
    chat: bool = False
    seed: int = 0
    align: int = 3  # singular pairs (largest terms first) whose aligned latents are looked up (0: none)
    latents: int = 5  # aligned latents per side
    labels: int = 5  # logit-lens tokens per latent

    def validate(self) -> None:
        _check_text(self.text)
        _in_range("align", self.align, 0, 64)
        _in_range("latents", self.latents, 1, 1000)
        _in_range("labels", self.labels, 0, 64)
        _in_range("seed", self.seed, 0, 2**62)


@dataclass(frozen=True)
class HeadsAlignRequest:
    """Either a singular pair (layer, head, k) or a latent (feature LAYER/KIND/INDEX)."""

    layer: int | None = None
    head: int | None = None
    k: int = 0
    feature: str | None = None
    top: int = 0  # latents per side (pair) or heads (feature); 0: 5 latents, 10 heads
    n_random: int = 256  # random unit vectors of the significance reference
    seed: int = 0
    labels: int = 5

    @property
    def by_feature(self) -> bool:
        return self.feature is not None

    @property
    def count(self) -> int:
        return self.top or (10 if self.by_feature else 5)

    def validate(self) -> None:
        if self.by_feature:
            if self.layer is not None or self.head is not None:
                raise AuditError("give either a feature or a layer and head, not both")
            Feature.parse(self.feature or "")
        elif self.layer is None or self.head is None:
            raise AuditError("give a layer and a head (and a singular index k), or a feature LAYER/KIND/INDEX")
        _in_range("top", self.top, 0, 1000)
        _in_range("random", self.n_random, 1, 100_000)
        _in_range("labels", self.labels, 0, 64)
        _in_range("seed", self.seed, 0, 2**62)


# -- checks against the model and the bank ---------------------------------------------------------
def _check_head(lm: LoadedModel, layer: int, head: int) -> None:
    if not 0 <= layer < lm.n_layers:
        raise AuditError(f"layer {layer} is out of range: {lm.model_id} has layers 0..{lm.n_layers - 1}")
    if not 0 <= head < lm.n_heads:
        raise AuditError(f"head {head} is out of range: {lm.model_id} has heads 0..{lm.n_heads - 1} per layer")


def _token_ids(lm: LoadedModel, text: str, chat: bool) -> list[int]:
    ids = lm.prompt_ids(text, chat=chat)
    if len(ids) < 2:
        raise AuditError(f"the text has {len(ids)} token(s); relative attention needs at least two")
    if len(ids) > lm.max_positions:
        raise AuditError(f"the text has {len(ids)} tokens; {lm.model_id} reads at most {lm.max_positions}")
    return ids


def _position(name: str, index: int, n: int) -> int:
    pos = index + n if index < 0 else index
    if not 0 <= pos < n:
        raise AuditError(f"{name} token {index} is outside the text's {n} tokens (0..{n - 1}, or negative from the end)")
    return pos


def resolve_pair(lm: LoadedModel, request: HeadsPairRequest) -> tuple[list[int], int, int]:
    """The text's token ids and the (query, key) positions, checked; AuditError otherwise."""
    request.validate()
    _check_head(lm, request.layer, request.head)
    ids = _token_ids(lm, request.text, request.chat)
    query, key = _position("query", request.query, len(ids)), _position("key", request.key, len(ids))
    if query < 1:
        raise AuditError("the query must be token 1 or later (relative attention needs at least two visible keys)")
    if key > query:
        raise AuditError(f"key {key} comes after query {query}: attention is causal, keys are 0..{query}")
    window = head_weights(lm.model, request.layer).window
    if window and query - key >= window:
        raise AuditError(f"key {key} is outside layer {request.layer}'s sliding window of {window} from query {query}")
    return ids, query, key


def feeding_site(engine: Engine, layer: int) -> Site:
    """The residual SAE site feeding `layer`'s attention: resid_pre(L), else resid_post(L-1)."""
    candidates = [Site(layer, "resid_pre")] + ([Site(layer - 1, "resid_post")] if layer > 0 else [])
    for site in candidates:
        if site in engine.bank:
            return site
    raise AuditError(f"no residual SAE feeds layer {layer}: the bank has no "
                     f"{' nor '.join(str(s) for s in candidates)} (it covers {coverage(engine.bank)})")


def _check_latent(engine: Engine, feature: Feature) -> None:
    if feature.site not in engine.bank:
        raise AuditError(f"no SAE at {feature.site}; this bank covers {coverage(engine.bank)}")
    d_sae = int(engine.bank.sae(feature.site).cfg.d_sae)
    if not 0 <= feature.latent < d_sae:
        raise AuditError(f"latent {feature.latent} is out of range for {feature.site} (d_sae {d_sae})")


# -- engine calls ----------------------------------------------------------------------------------
def head_svd(engine: Engine, progress: Progress = QUIET) -> OmegaSVD:
    """The Ω SVD of every head, cached under `<cache>/heads`."""
    progress.progress(0, 0, "Ω SVD of every head")
    svd = omega_svd(engine.lm.model, Path(engine.cache_dir) / "heads")
    stop_if_asked(progress)
    return svd


def _labels(engine: Engine, site: Site, latents: list[int], k: int) -> dict[str, list[str]]:
    latents = list(dict.fromkeys(latents))
    if not latents or k <= 0:
        return {}
    rows = logit_lens_tokens(engine.lm, engine.bank.output_decoder(site)[latents], k=k)
    return {str(latent): row for latent, row in zip(latents, rows)}


def _pair_alignment(engine: Engine, svd: OmegaSVD, site: Site, layer: int, head: int, k: int, top: int,
                    n_random: int, seed: int, labels: int) -> dict:
    aligned = align_pair(svd, layer, head, k, engine.bank.output_decoder(site), top=top, n_random=n_random,
                         seed=seed)
    latents = [m.latent for m in aligned.query + aligned.key]
    return {**aligned.to_dict(), "site": str(site), "labels": _labels(engine, site, latents, labels),
            "p_values": {side: [aligned.reference.p_value(m.cos) for m in getattr(aligned, side)]
                         for side in ("query", "key")}}


@dataclass(frozen=True)
class HeadsOutcome:
    result: dict
    summary: dict
    run_id: int | None  # None: not stored


def _params(engine: Engine, request: object, **resolved: object) -> dict:
    return {"model": engine.lm.model_id, "pack": engine.pack_id, **asdict(request), **resolved}  # type: ignore[call-overload]


def _run(store: Store | None, engine: Engine, session_id: int | None, kind: str, params: dict, sites: list[Site],
         seed: int, compute) -> HeadsOutcome:  # type: ignore[no-untyped-def]
    """`compute()` -> (result, summary), inside a recorded run unless there is no store."""
    if store is None or session_id is None:
        return HeadsOutcome(*compute(), None)
    with recorded_run(store, session_id, kind, params, provenance(engine.lm, engine, sites, seeds=[seed])) as run:
        result, summary = compute()
        run.done(result, summary)
    return HeadsOutcome(result, summary, run.run_id)


# -- scan ------------------------------------------------------------------------------------------
def kept_hits(hits: list[ScanHit], top: int, per_head: int) -> list[ScanHit]:
    """The `top` first hits and the `per_head` first of every head, in their order."""
    seen: dict[tuple[int, int], int] = {}
    kept = []
    for index, hit in enumerate(hits):
        head = (hit.layer, hit.head)
        seen[head] = seen.get(head, 0) + 1
        if index < top or seen[head] <= per_head:
            kept.append(hit)
    return kept


def heads_scan(store: Store | None, engine: Engine, session_id: int | None, request: HeadsScanRequest,
               progress: Progress = QUIET) -> HeadsOutcome:
    """Every attended (layer, head, query, key) of the text ranked by sparsity, as a "heads_scan" run."""
    request.validate()
    lm = engine.lm
    ids = _token_ids(lm, request.text, request.chat)

    def compute() -> tuple[dict, dict]:
        svd = head_svd(engine, progress)
        progress.progress(1, 3, "forward pass")
        states = capture_states(lm, ids)
        stop_if_asked(progress)
        progress.progress(2, 3, f"scanning {lm.n_layers * lm.n_heads} heads")
        found = scan(states, svd, threshold=request.threshold, include_first_key=request.include_first_key,
                     seed=request.seed)
        progress.progress(3, 3, "scan done")
        result = {**dataclasses.replace(found, hits=kept_hits(found.hits, request.top, request.per_head)).to_dict(),
                  "tokens": token_strings(lm, ids), "kept": {"top": request.top, "per_head": request.per_head}}
        notes = [f"Ω SVD {'read from the cache' if svd.cached else 'computed and cached'} in {svd.seconds:.2f} s"]
        return result, scan_summary(result, notes)

    return _run(store, engine, session_id, SCAN_KIND, _params(engine, request), [], request.seed, compute)


def _token(tokens: list[str], index: int) -> str:
    return f"{index} {tokens[index]!r}" if 0 <= index < len(tokens) else str(index)


def scan_summary(result: dict, notes: list[str] | None = None) -> dict:
    """headline / table of the `top` sparsest hits / notes of a stored scan result."""
    tokens, hits = result["tokens"], result["hits"][:result["kept"]["top"]]
    grid = result["grid"]
    n_heads = sum(len(row) for row in grid)
    active = sorted(((s, layer, head) for layer, row in enumerate(grid) for head, s in enumerate(row) if s is not None))
    headline = (f"heads scan of {len(tokens)} tokens: {result['n_hits']} attended pairs (attention > "
                f"{result['threshold']}) in {len(active)} of {n_heads} heads"
                + (f"; sparsest S = {hits[0]['sparsity']:.3f} at L{hits[0]['layer']}H{hits[0]['head']}" if hits else ""))
    rows = [[f"L{h['layer']}H{h['head']}", _token(tokens, h["query"]), _token(tokens, h["key"]), f"{h['attention']:.3f}",
             f"{h['relative']:+.3f}", f"{h['sparsity']:.3f}", h["n_recon"], f"{h['control_sparsity']:.3f}",
             " ".join(map(str, h["top"]))] for h in hits]
    notes = list(notes or []) + [METRICS_NOTE]
    if active:
        notes.append("sparsest heads (median S of their pairs): "
                     + ", ".join(f"L{layer}H{head} {s:.3f}" for s, layer, head in active[:5]))
    if not result["include_first_key"]:
        notes.append("key 0 (the attention sink) is left out")
    return {"headline": headline,
            "table": {"columns": ["head", "query", "key", "attention", "ℓ̃", "S", "N_recon", "control S", "top terms"],
                      "rows": rows},
            "notes": notes}


# -- one pair --------------------------------------------------------------------------------------
def heads_pair(store: Store | None, engine: Engine, session_id: int | None, request: HeadsPairRequest,
               progress: Progress = QUIET) -> HeadsOutcome:
    """The relative attention decomposition of one (layer, head, query, key) with its aligned latents."""
    lm = engine.lm
    ids, query, key = resolve_pair(lm, request)
    site = None
    notes = []
    if request.align:
        try:
            site = feeding_site(engine, request.layer)
        except AuditError as exc:
            notes.append(f"no aligned latents: {exc}")

    def compute() -> tuple[dict, dict]:
        svd = head_svd(engine, progress)
        progress.progress(0, 0, "forward pass")
        states = capture_states(lm, ids)
        stop_if_asked(progress)
        found = decompose(states, svd, request.layer, request.head, query, key, seed=request.seed)
        tokens = token_strings(lm, ids)
        alignments = []
        if site is not None:
            for k in found.ranked()[:request.align]:
                progress.progress(len(alignments), request.align, "aligned latents")
                alignments.append(_pair_alignment(engine, svd, site, request.layer, request.head, k, request.latents,
                                                  256, request.seed, request.labels))
        result = {**found.to_dict(), "query_token": tokens[query], "key_token": tokens[key],
                  "site": None if site is None else str(site), "alignments": alignments, "notes": notes}
        return result, pair_summary(result)

    params = _params(engine, request, query=query, key=key)
    return _run(store, engine, session_id, PAIR_KIND, params, [site] if site else [], request.seed, compute)


def decomposition(result: dict) -> Decomposition:
    """The engine's Decomposition of a stored pair result."""
    names = {f.name for f in dataclasses.fields(Decomposition)}
    return Decomposition.from_dict({key: value for key, value in result.items() if key in names})


def _latent_list(alignment: dict, side: str, n: int = 3) -> str:
    return ", ".join(f"{m['latent']} ({m['cos']:+.2f})" for m in alignment[side][:n])


def pair_summary(result: dict, rows: int = 10) -> dict:
    d = decomposition(result)
    control = d.control
    headline = (f"head L{d.layer}H{d.head}, query {d.query} {result['query_token']!r} -> key {d.key} "
                f"{result['key_token']!r}: ℓ̃ = {d.relative:+.4f} (attention {d.attention:.3f}), S = {d.sparsity:.3f}, "
                f"N_recon = {d.n_recon} of {len(d.terms)}; control S = {control.sparsity:.3f}, "
                f"N_recon = {control.n_recon}")
    by_k = {a["k"]: a for a in result["alignments"]}
    order = d.ranked()
    table_rows = [[k, f"{d.sigma[k]:.4g}", f"{d.terms[k]:+.4f}", f"{control.terms[k]:+.4f}",
                   _latent_list(by_k[k], "query") if k in by_k else "", _latent_list(by_k[k], "key") if k in by_k else ""]
                  for k in order[:rows]]
    notes = [f"the {len(d.terms)} terms sum to ℓ̃ = {sum(d.terms):+.6f} (the model's pre-softmax score "
             f"difference, attention scale included); the control's terms sum to {control.total:+.4f}"]
    if len(order) > rows:
        notes.append(f"the other {len(order) - rows} terms sum to {sum(d.terms[k] for k in order[rows:]):+.4f}")
    if d.relative_capped != d.relative:
        notes.append(f"soft-capped, the softmax sees ℓ̃ = {d.relative_capped:+.4f} (the terms decompose the pre-cap score)")
    if result["site"]:
        notes.append(f"aligned latents: decoder rows of {result['site']} by |cos| with u_k (query side) and v_k (key side)")
    notes += result.get("notes", []) + [METRICS_NOTE]
    return {"headline": headline,
            "table": {"columns": ["k", "σ", "term", "control", "query latents", "key latents"], "rows": table_rows},
            "notes": notes}


def top_aligned_latent(result: dict) -> tuple[str, int] | None:
    """(site, latent) of the best-aligned latent of a pair result's largest term, or None."""
    if not result.get("alignments"):
        return None
    first = result["alignments"][0]
    matches = first["query"] + first["key"]
    if not matches:
        return None
    best = max(matches, key=lambda m: abs(m["cos"]))
    return first["site"], int(best["latent"])


# -- alignment -------------------------------------------------------------------------------------
def heads_align(store: Store | None, engine: Engine, session_id: int | None, request: HeadsAlignRequest,
                progress: Progress = QUIET) -> HeadsOutcome:
    """Latents aligned with a head's singular pair, or heads aligned with a latent; a "heads_align" run."""
    request.validate()
    lm = engine.lm
    feature: Feature | None = None
    if request.by_feature:
        feature = Feature.parse(request.feature or "")
        _check_latent(engine, feature)
        site = feature.site
    else:
        assert request.layer is not None and request.head is not None
        _check_head(lm, request.layer, request.head)
        if not 0 <= request.k < lm.d_head:
            raise AuditError(f"singular index k {request.k} is out of range: heads have d_head = {lm.d_head} "
                             f"(0..{lm.d_head - 1})")
        site = feeding_site(engine, request.layer)

    def compute() -> tuple[dict, dict]:
        svd = head_svd(engine, progress)
        progress.progress(0, 0, "alignment")
        if feature is not None:
            direction = engine.bank.output_decoder(feature.site)[feature.latent]
            found = heads_for_direction(svd, direction, top=request.count, n_random=request.n_random, seed=request.seed)
            result = {**found.to_dict(), "feature": str(feature),
                      "label": _labels(engine, feature.site, [feature.latent], request.labels).get(str(feature.latent), []),
                      "p_values": [found.reference.p_value(m.cos) for m in found.matches]}
            return result, direction_summary(result)
        result = _pair_alignment(engine, svd, site, request.layer, request.head, request.k, request.count,
                                 request.n_random, request.seed, request.labels)
        return result, alignment_summary(result)

    params = _params(engine, request, feature=None if feature is None else str(feature))
    return _run(store, engine, session_id, ALIGN_KIND, params, [site], request.seed, compute)


def _reference_note(reference: dict, what: str) -> str:
    return (f"reference: max |cos| of {reference['n']} random unit vectors against {what}: mean "
            f"{reference['mean']:.3f} ± {reference['std']:.3f}, 99th percentile {reference['q99']:.3f}, "
            f"max {reference['max']:.3f}; p = (1 + draws at least |cos|) / (1 + draws)")


def _tokens(label: list[str], n: int = 5) -> str:
    return " ".join(repr(tok) for tok in label[:n])


def alignment_summary(result: dict) -> dict:
    aligned = PairAlignment.from_dict({key: value for key, value in result.items()
                                       if key in {f.name for f in dataclasses.fields(PairAlignment)}})
    headline = (f"head L{aligned.layer}H{aligned.head}, singular pair {aligned.k} (σ = {aligned.sigma:.4g}): "
                f"best |cos| {max((abs(m.cos) for m in aligned.query + aligned.key), default=0):.3f} among "
                f"{result['site']} latents")
    rows = [[side, m["latent"], f"{m['cos']:+.3f}", f"{p:.3g}", _tokens(result["labels"].get(str(m["latent"]), []))]
            for side in ("query", "key") for m, p in zip(result[side], result["p_values"][side])]
    notes = [_reference_note(result["reference"], f"the {result['site']} decoder"),
             f"query side u_k, key side v_k; {aligned.query_norm:.3f} and {aligned.key_norm:.3f} of their unit "
             "norm lie in the residual coordinates (the rest is the bias coordinate)"]
    return {"headline": headline, "table": {"columns": ["side", "latent", "cos", "p", "label"], "rows": rows},
            "notes": notes}


def direction_summary(result: dict) -> dict:
    matches = result["matches"]
    headline = (f"heads aligned with {result['feature']} ({_tokens(result.get('label', []), 3)}): best "
                + (f"L{matches[0]['layer']}H{matches[0]['head']} k={matches[0]['k']} {matches[0]['side']} side, "
                   f"cos {matches[0]['cos']:+.3f}" if matches else "none"))
    rows = [[f"L{m['layer']}H{m['head']}", m["k"], m["side"], f"{m['cos']:+.3f}", f"{m['sigma']:.4g}", f"{p:.3g}"]
            for m, p in zip(matches, result["p_values"])]
    notes = [_reference_note(result["reference"], "every head's singular vectors"),
             "query side: u_k (what the query reads), key side: v_k (what the key offers)"]
    return {"headline": headline, "table": {"columns": ["head", "k", "side", "cos", "σ", "p"], "rows": rows},
            "notes": notes}


def scan_result(data: dict) -> Scan:
    """The engine's Scan of a stored scan result (its kept hits)."""
    names = {f.name for f in dataclasses.fields(Scan)}
    return Scan.from_dict({key: value for key, value in data.items() if key in names})

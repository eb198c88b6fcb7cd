"""Feature flow across layers (seed 001): s^(R/M/A) scores, matching, groups, flow graphs, export.

Vocabulary
  * A feature is `LAYER/KIND/INDEX`, e.g. `12/resid_post/1234` (aliases `12/res/1234`, `12/mlp/7`).
  * Residual SAEs may sit on resid_post(L) or resid_pre(L+1): the same tensor, "the residual after
    layer L". Its *position* is L (resid_pre(0), the embeddings, is position -1). Rows of the
    layered view and node `layer` fields are positions. When both kinds exist for a position the
    root feature's kind is preferred.
  * For a residual feature f at position L with unit decoder direction d_f, the modules are
    R = the residual SAE of position L-1, M = mlp_out(L), A = attn_out(L) (or attn_z(L) projected
    through W_O, `SAEBank.output_decoder`). Backward matching (section 3.3):
        s^(P) = max_k cos(d_f, d_k^(P)),  P in {R, M, A}
    with the matched latents; top-k keeps the k best, best first (k = 1 is the paper's matching).
    Forward matching from f at L uses R = residual of L+1, M = mlp_out(L+1), A = attn(L+1).
  * A module with no SAE is reported in `Step.missing` ("no SAE at 3/mlp_out") and in node notes.

Data-free class (section 3.3), from a residual feature's backward top-1 scores and `Thresholds`:
    translated   s^(R) >= high_res and s^(M) < high_mlp and s^(A) < high_attn
    processed    s^(R) >= high_res and (s^(M) >= high_mlp or s^(A) >= high_attn)
    newborn      s^(R) <  high_res and (s^(M) >= high_mlp or s^(A) >= high_attn)
    unexplained  all low
  A missing score counts as low; a node with no predecessor SAE at all (e.g. resid_pre(0), the
  embeddings) has class None. Defaults: high_res = 0.5 (the appendix-B cut), high_mlp =
  high_attn = 0.25 (appendix E drops MLP features below t^(M) = 0.25); the paper says "high" is
  layer specific, so `Thresholds.per_layer` overrides any field per layer. For reference, the best
  cosine between a vector and n random unit vectors in d dimensions is about sqrt(2 ln n / d)
  (0.16 for n = 2048, d = 576): scores near that are noise.

Activation groups (section 5.1, appendix A.1): on a text at one token, a target residual feature
that is active (SAE activation > 0) is "From RES", "From MLP", "From ATT", "From RES & MLP",
"From RES & ATT", "From MLP & ATT", "From RES & MLP & ATT" by which modules have an active matched
predecessor (with top-k, any of the k), or "From nowhere"; an inactive target has group None.

Flow graphs (section 3.3 "long-range", appendix B): from a residual root, the backward walk follows
each residual node's top-k R matches down to layer 0 and the forward walk follows forward R matches
up to the last layer; a chain stops where the R score is below `Thresholds.cut` (t^(R) = 0.5).
Every residual node carries its backward scores and class, and its M/A matches scoring at least
`Thresholds.module` (0.15) become module nodes with an edge into it. Edges always point along the
flow (earlier -> later). Nodes are deduplicated, so k > 1 gives a DAG (capped at `max_nodes`
residual nodes, noted when hit).

Result formats (plain JSON-able dicts):
  Step.to_dict():  {"feature", "direction", "matches": {"R": [{"feature", "score"}...], ...},
                    "scores": {"R": s | None, "M": ..., "A": ...}, "missing": {"M": "no SAE at ..."}}
  FlowGraph.to_dict():
    {"root": "12/resid_post/1234", "k": 1, "direction": "both", "thresholds": {...},
     "nodes": [{"id", "site", "kind", "layer", "latent", "role": "res"|"mlp"|"att", "label": [tokens],
                "scores": {"R", "M", "A"} (residual nodes), "class" (residual nodes, else None),
                "notes": [...]}],
     "edges": [{"source", "target", "module": "R"|"M"|"A", "score"}], "notes": [...]}
    `FlowGraph.from_dict` reads it back (e.g. from a stored run's result).
  layer_rows(graph): the layered view, one row per layer, ascending:
    [{"layer": L, "residual": [{...node, "mlp": [{"id", "score", "label"}], "attn": [...],
                                "from": [{"id", "score"}], "to": [{"id", "score"}]}]}]
  to_dot(graph) / to_mermaid(graph): Graphviz DOT and Mermaid flowchart text.
  graph_summary(graph): run summary {"headline", "table", "notes"}; `auditui.workflows.flow`
    stores a graph as a run of kind "flow" with the graph as its result.

Speed: decoders are cached on the bank device; score lookups go through `TransitionCache`
(transitions.py), which serves full top-k tables from memory or <cache>/flow/ and otherwise computes
(and memoizes) single rows; `precompute_tables` builds every table a graph can need (run it in a
background worker: ~15 s for 30 layers x 3 kinds at width 2048 on 2 CPU cores). Labels (logit-lens
tokens) are computed in one batch per graph and cached per latent; they cost more than a walk over
built tables, so a UI may pass `label_tokens=0` and call `FlowIndex.labels` for the visible rows.
One `FlowIndex` per SAE bank (`flow_index(engine)`) keeps all of this warm between calls.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields, replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from auditui.engine.labels import logit_lens_tokens
from auditui.engine.sites import Site, SiteHooks
from auditui.engine.transitions import TABLE_K, TransitionCache
from auditui.errors import AuditError
from auditui.progress import QUIET, Progress, stop_if_asked
from auditui.text import number

if TYPE_CHECKING:
    from auditui.engine import Engine
    from auditui.engine.model import LoadedModel
    from auditui.engine.saes import SAEBank

MODULES = ("R", "M", "A")
MODULE_NAMES = {"R": "RES", "M": "MLP", "A": "ATT"}
ROLES = {"R": "res", "M": "mlp", "A": "att"}
RESIDUAL_KINDS = ("resid_post", "resid_pre")
DIRECTIONS = ("backward", "forward", "both")
CLASSES = ("translated", "processed", "newborn", "unexplained")
LABEL_TOKENS = 5
MAX_NODES = 256


# -- features and positions ------------------------------------------------------------------------
@dataclass(frozen=True, order=True)
class Feature:
    site: Site
    latent: int

    def __str__(self) -> str:
        return f"{self.site}/{self.latent}"

    @classmethod
    def parse(cls, text: str) -> Feature:
        """Parse `12/resid_post/1234` (site aliases as in `Site.parse`)."""
        site, _, latent = text.strip().rpartition("/")
        if not site or not latent.strip().isdigit():
            raise AuditError(f"cannot read feature {text!r}; write it as LAYER/KIND/INDEX, e.g. 12/resid_post/1234")
        return cls(Site.parse(site), int(latent))


def position(site: Site) -> int:
    """The residual position of a site: resid_pre(L) is the residual after layer L-1."""
    return site.layer - 1 if site.kind == "resid_pre" else site.layer


def group_name(active_modules: Iterable[str]) -> str:
    """`From RES & MLP` etc. (modules in R, M, A order), or `From nowhere`."""
    names = [MODULE_NAMES[m] for m in MODULES if m in set(active_modules)]
    return "From " + (" & ".join(names) if names else "nowhere")


# -- thresholds and classes ------------------------------------------------------------------------
@dataclass(frozen=True)
class Thresholds:
    """Graph cut and class thresholds (see the module docstring); `per_layer` overrides by layer."""

    cut: float = 0.5  # t^(R): a residual chain stops where its R score is below this (appendix B)
    module: float = 0.15  # module features scoring below this are left out of the graph (appendix B)
    high_res: float = 0.5  # class: s^(R) at least this is "high"
    high_mlp: float = 0.25  # class: s^(M) at least this is "high"
    high_attn: float = 0.25  # class: s^(A) at least this is "high"
    per_layer: dict[int, dict[str, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = {f.name for f in fields(self)} - {"per_layer"}
        for layer, values in self.per_layer.items():
            unknown = set(values) - names
            if unknown:
                raise AuditError(f"unknown threshold(s) {', '.join(sorted(unknown))} for layer {layer}; "
                                 f"use {', '.join(sorted(names))}")

    def at(self, layer: int) -> Thresholds:
        return replace(self, per_layer={}, **self.per_layer.get(layer, {}))

    def to_dict(self) -> dict:
        return {**asdict(self), "per_layer": {str(k): v for k, v in self.per_layer.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> Thresholds:
        return cls(**{**data, "per_layer": {int(k): v for k, v in data.get("per_layer", {}).items()}})


def classify(scores: dict[str, float | None], thresholds: Thresholds) -> str:
    """The section-3.3 class of a residual feature from its backward top-1 scores."""
    def high(module: str, threshold: float) -> bool:
        value = scores.get(module)
        return value is not None and value >= threshold

    high_res = high("R", thresholds.high_res)
    high_module = high("M", thresholds.high_mlp) or high("A", thresholds.high_attn)
    if high_res:
        return "processed" if high_module else "translated"
    return "newborn" if high_module else "unexplained"


# -- one matching step ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Match:
    feature: Feature
    score: float

    def to_dict(self) -> dict:
        return {"feature": str(self.feature), "score": self.score}


@dataclass
class Step:
    """The top-k matches of one feature in each module, one layer back (or forward)."""

    feature: Feature
    direction: str
    matches: dict[str, list[Match]]
    missing: dict[str, str]

    @property
    def scores(self) -> dict[str, float | None]:
        return {m: (self.matches[m][0].score if self.matches.get(m) else None) for m in MODULES}

    def to_dict(self) -> dict:
        return {"feature": str(self.feature), "direction": self.direction,
                "matches": {m: [x.to_dict() for x in ms] for m, ms in self.matches.items()},
                "scores": self.scores, "missing": dict(self.missing)}


class FlowIndex:
    """Matching over one engine's SAE bank: feature checks, steps, cached tables and labels."""

    def __init__(self, engine: Engine):
        self.lm: LoadedModel = engine.lm
        self.bank: SAEBank = engine.bank
        self.cache = TransitionCache(engine.bank, engine.cache_dir / "flow")
        self._labels: dict[tuple[Feature, int], list[str]] = {}

    # -- checks ----------------------------------------------------------------------------------
    def check(self, feature: Feature | str) -> Feature:
        """Parse and validate a feature: its site has an SAE and the latent is in range."""
        feature = Feature.parse(feature) if isinstance(feature, str) else feature
        if feature.site not in self.bank:
            raise AuditError(f"no SAE at {feature.site}; this bank covers {coverage(self.bank)}")
        if feature.site.kind not in RESIDUAL_KINDS:
            raise AuditError(f"{feature} is not a residual feature; flow graphs start from a "
                             "resid_post or resid_pre latent")
        d_sae = int(self.bank.sae(feature.site).cfg.d_sae)
        if not 0 <= feature.latent < d_sae:
            raise AuditError(f"latent {feature.latent} is out of range for {feature.site} (d_sae {d_sae})")
        return feature

    # -- sites -----------------------------------------------------------------------------------
    def residual_site(self, pos: int, prefer: str = "resid_post") -> Site | str:
        """The residual SAE site of position `pos`, or why there is none."""
        candidates = ([Site(pos, "resid_post")] if pos >= 0 else []) + [Site(pos + 1, "resid_pre")]
        candidates.sort(key=lambda s: s.kind != prefer)
        for site in candidates:
            if site in self.bank:
                return site
        return "no SAE at " + " nor ".join(str(s) for s in candidates)

    def module_sites(self, feature: Feature, direction: str) -> dict[str, Site | str]:
        """The R/M/A sites one step `direction` of a residual feature (a string when missing)."""
        pos = position(feature.site)
        layer = pos if direction == "backward" else pos + 1
        if layer < 0:
            return dict.fromkeys(MODULES, "nothing before layer 0 (the embeddings)")
        if layer >= self.lm.n_layers:
            return dict.fromkeys(MODULES, f"nothing after the last layer ({self.lm.n_layers - 1})")
        attn = [s for s in (Site(layer, "attn_out"), Site(layer, "attn_z")) if s in self.bank]
        return {"R": self.residual_site(layer - 1 if direction == "backward" else layer, feature.site.kind),
                "M": Site(layer, "mlp_out") if Site(layer, "mlp_out") in self.bank else f"no SAE at {layer}/mlp_out",
                "A": attn[0] if attn else f"no SAE at {layer}/attn_out nor {layer}/attn_z"}

    # -- matching --------------------------------------------------------------------------------
    def step(self, feature: Feature, k: int = 1, direction: str = "backward",
             modules: Iterable[str] = MODULES, build: bool = False) -> Step:
        """Top-k matches of a residual feature in `modules`, one layer `direction`."""
        if direction not in ("backward", "forward"):
            raise AuditError(f"a step goes backward or forward, not {direction!r}")
        if k < 1:
            raise AuditError(f"k must be at least 1 (got {k})")
        matches: dict[str, list[Match]] = {}
        missing: dict[str, str] = {}
        for module, site in self.module_sites(feature, direction).items():
            if module not in modules:
                continue
            if isinstance(site, str):
                missing[module] = site
                continue
            top = self.cache.top(feature.site, site, feature.latent, k, build=build)
            matches[module] = [Match(Feature(site, j), score) for j, score in top]
        return Step(feature, direction, matches, missing)

    # -- labels ----------------------------------------------------------------------------------
    def labels(self, features: list[Feature], n_tokens: int = LABEL_TOKENS) -> list[list[str]]:
        """Logit-lens tokens of each feature's decoder direction (batched, cached)."""
        todo = list(dict.fromkeys(f for f in features if (f, n_tokens) not in self._labels))
        if todo:
            directions = torch.stack([self.bank.output_decoder(f.site)[f.latent] for f in todo])  # [n, d_model]
            for feature, tokens in zip(todo, logit_lens_tokens(self.lm, directions, n_tokens), strict=True):
                self._labels[(feature, n_tokens)] = tokens
        return [self._labels[(f, n_tokens)] for f in features]


_INDEXES: weakref.WeakKeyDictionary[SAEBank, FlowIndex] = weakref.WeakKeyDictionary()


def flow_index(engine: Engine) -> FlowIndex:
    """The engine's FlowIndex (one per SAE bank, so tables and labels stay warm between calls)."""
    index = _INDEXES.get(engine.bank)
    if index is None or index.lm is not engine.lm:
        index = _INDEXES[engine.bank] = FlowIndex(engine)
    return index


def coverage(bank: SAEBank) -> str:
    """`resid_post 0-29, mlp_out 0-29`: which layers of each kind have an SAE."""
    by_kind: dict[str, list[int]] = {}
    for site in bank.sites:
        by_kind.setdefault(site.kind, []).append(site.layer)
    if not by_kind:
        return "no sites (no SAEs loaded)"
    return ", ".join(f"{kind} {_ranges(layers)}" for kind, layers in by_kind.items())


def _ranges(values: list[int]) -> str:
    """[0, 1, 2, 5] -> `0-2,5`."""
    spans = [[values[0], values[0]]]
    for value in values[1:]:
        if value == spans[-1][1] + 1:
            spans[-1][1] = value
        else:
            spans.append([value, value])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def step_scores(engine: Engine, feature: Feature | str, k: int = 1, direction: str = "backward") -> Step:
    """s^(R), s^(M), s^(A) with the top-k matched latents of a residual feature."""
    index = flow_index(engine)
    return index.step(index.check(feature), k, direction)


def precompute_tables(engine: Engine, k: int = TABLE_K, progress: Progress = QUIET) -> list[tuple[Site, Site]]:
    """Build (or load) every transition table a flow graph over this bank can use; returns the pairs."""
    index = flow_index(engine)
    pairs = []
    for site in index.bank.sites:
        if site.kind in RESIDUAL_KINDS:
            probe = Feature(site, 0)
            for direction in ("backward", "forward"):
                modules = MODULES if direction == "backward" else ("R",)
                pairs += [(site, dst) for m, dst in index.module_sites(probe, direction).items()
                          if m in modules and isinstance(dst, Site)]
    for i, (src, dst) in enumerate(pairs):
        stop_if_asked(progress)
        index.cache.table(src, dst, k)
        progress.progress(i + 1, len(pairs), f"transition table {src} -> {dst}")
    return pairs


# -- graphs ---------------------------------------------------------------------------------------
@dataclass
class Node:
    feature: Feature
    role: str  # "R" residual | "M" mlp | "A" attention
    scores: dict[str, float | None] = field(default_factory=dict)  # residual: backward top-1 s^(P)
    klass: str | None = None
    label: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return str(self.feature)

    @property
    def layer(self) -> int:
        return position(self.feature.site)

    def to_dict(self) -> dict:
        return {"id": self.id, "site": str(self.feature.site), "kind": self.feature.site.kind, "layer": self.layer,
                "latent": self.feature.latent, "role": ROLES[self.role], "label": self.label,
                "scores": self.scores, "class": self.klass, "notes": self.notes}

    @classmethod
    def from_dict(cls, data: dict) -> Node:
        role = {v: k for k, v in ROLES.items()}[data["role"]]
        return cls(Feature.parse(data["id"]), role, dict(data.get("scores", {})), data.get("class"),
                   list(data.get("label", [])), list(data.get("notes", [])))


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    module: str  # "R" | "M" | "A": the module of the earlier end
    score: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class FlowGraph:
    root: Feature
    k: int
    direction: str
    thresholds: Thresholds
    nodes: dict[str, Node] = field(default_factory=dict)
    edges: list[Edge] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def residual_nodes(self) -> list[Node]:
        return sorted((n for n in self.nodes.values() if n.role == "R"), key=lambda n: (n.layer, n.feature))

    def ordered_nodes(self) -> list[Node]:
        return sorted(self.nodes.values(), key=lambda n: (n.layer, MODULES.index(n.role), n.feature))

    def to_dict(self) -> dict:
        return {"root": str(self.root), "k": self.k, "direction": self.direction,
                "thresholds": self.thresholds.to_dict(), "nodes": [n.to_dict() for n in self.ordered_nodes()],
                "edges": [e.to_dict() for e in self.edges], "notes": self.notes}

    @classmethod
    def from_dict(cls, data: dict) -> FlowGraph:
        nodes = [Node.from_dict(n) for n in data["nodes"]]
        return cls(Feature.parse(data["root"]), int(data["k"]), data["direction"],
                   Thresholds.from_dict(data["thresholds"]), {n.id: n for n in nodes},
                   [Edge(**e) for e in data["edges"]], list(data.get("notes", [])))


class _Builder:
    """Grows a FlowGraph: residual nodes with their backward scores and module predecessors."""

    def __init__(self, index: FlowIndex, graph: FlowGraph, build_tables: bool, max_nodes: int):
        self.index, self.graph = index, graph
        self.build_tables, self.max_nodes = build_tables, max_nodes
        self.backward: dict[Feature, Step] = {}
        self._edges: set[tuple[str, str]] = set()

    def residual(self, feature: Feature) -> Node | None:
        """The node of a residual feature, added with its scores and module nodes; None when full."""
        graph = self.graph
        if str(feature) in graph.nodes:
            return graph.nodes[str(feature)]
        if sum(n.role == "R" for n in graph.nodes.values()) >= self.max_nodes:
            note = f"stopped at {self.max_nodes} residual nodes (max_nodes)"
            if note not in graph.notes:
                graph.notes.append(note)
            return None
        step = self.index.step(feature, graph.k, "backward", build=self.build_tables)
        self.backward[feature] = step
        reasons: dict[str, list[str]] = {}
        for module, why in step.missing.items():
            reasons.setdefault(why, []).append(module)
        node = Node(feature, "R", step.scores, notes=[f"s^({','.join(ms)}): {why}" for why, ms in reasons.items()])
        if step.matches:
            node.klass = classify(step.scores, graph.thresholds.at(node.layer))
        graph.nodes[node.id] = node
        for module in ("M", "A"):
            for match in step.matches.get(module, []):
                if match.score >= graph.thresholds.at(node.layer).module:
                    graph.nodes.setdefault(str(match.feature), Node(match.feature, module))
                    self.edge(match.feature, feature, module, match.score)
        return node

    def edge(self, source: Feature, target: Feature, module: str, score: float) -> None:
        key = (str(source), str(target))
        if key not in self._edges:
            self._edges.add(key)
            self.graph.edges.append(Edge(key[0], key[1], module, score))

    def walk(self, root: Feature, direction: str) -> None:
        """Follow R matches from `root` in one direction until the cut or the end of the model."""
        frontier = [root]
        while frontier:
            feature = frontier.pop()
            node = self.graph.nodes[str(feature)]
            step = (self.backward[feature] if direction == "backward" else
                    self.index.step(feature, self.graph.k, "forward", ("R",), build=self.build_tables))
            if "R" in step.missing:
                node.notes.append(f"{direction} walk ends: {step.missing['R']}")
                continue
            for match in step.matches["R"]:
                later = feature if direction == "backward" else match.feature
                cut = self.graph.thresholds.at(position(later.site)).cut
                if match.score < cut:
                    node.notes.append(f"{direction} cut: best remaining match {match.feature} "
                                      f"s={match.score:.3f} < t^(R)={cut}")
                    break
                is_new = str(match.feature) not in self.graph.nodes
                if self.residual(match.feature) is None:
                    break
                earlier = match.feature if direction == "backward" else feature
                self.edge(earlier, later, "R", match.score)
                if is_new:
                    frontier.append(match.feature)


def build_flow_graph(engine: Engine, feature: Feature | str, k: int = 1, direction: str = "both",
                     thresholds: Thresholds | None = None, label_tokens: int = LABEL_TOKENS,
                     max_nodes: int = MAX_NODES, build_tables: bool = False) -> FlowGraph:
    """The flow graph of a residual feature (see the module docstring for the format).

    `build_tables=True` builds and saves the full transition tables of every layer pair the walk
    touches (slow once, then every walk over those layers is a lookup); by default existing tables
    are used and missing ones replaced by direct row computations. `label_tokens=0` skips labels.
    """
    if direction not in DIRECTIONS:
        raise AuditError(f"direction must be one of {', '.join(DIRECTIONS)}, not {direction!r}")
    index = flow_index(engine)
    root = index.check(feature)
    graph = FlowGraph(root, k, direction, thresholds or Thresholds())
    builder = _Builder(index, graph, build_tables, max_nodes)
    builder.residual(root)
    for way in ("backward", "forward"):
        if direction in (way, "both"):
            builder.walk(root, way)
    if label_tokens:
        nodes = graph.ordered_nodes()
        for node, tokens in zip(nodes, index.labels([n.feature for n in nodes], label_tokens), strict=True):
            node.label = tokens
    return graph


# -- the layered view -----------------------------------------------------------------------------
def layer_rows(graph: FlowGraph) -> list[dict]:
    """One row per layer (ascending): residual nodes with their module predecessors and R links."""
    into: dict[str, list[Edge]] = {}
    out_of: dict[str, list[Edge]] = {}
    for edge in graph.edges:
        into.setdefault(edge.target, []).append(edge)
        out_of.setdefault(edge.source, []).append(edge)
    rows: dict[int, list[dict]] = {}
    for node in graph.residual_nodes():
        def linked(edges: list[Edge], module: str, end: str) -> list[dict]:
            chosen = sorted((e for e in edges if e.module == module), key=lambda e: -e.score)
            return [{"id": getattr(e, end), "score": e.score, "label": graph.nodes[getattr(e, end)].label}
                    for e in chosen]
        entry = {**node.to_dict(), "mlp": linked(into.get(node.id, []), "M", "source"),
                 "attn": linked(into.get(node.id, []), "A", "source"),
                 "from": linked(into.get(node.id, []), "R", "source"),
                 "to": linked(out_of.get(node.id, []), "R", "target")}
        rows.setdefault(node.layer, []).append(entry)
    return [{"layer": layer, "residual": rows[layer]} for layer in sorted(rows)]


# -- export ---------------------------------------------------------------------------------------
def _show(token: str) -> str:
    """A token as one printable line (newlines and other control characters made visible)."""
    return "".join("⏎" if ch == "\n" else ch if ch.isprintable() else "·" for ch in token)


def _caption(node: Node) -> list[str]:
    lines = [node.id]
    if node.klass:
        lines.append(node.klass)
    if node.label:
        lines.append(" ".join(_show(t).strip() or "␣" for t in node.label[:3]))
    return lines


_SHAPES = {"R": "box", "M": "ellipse", "A": "hexagon"}


def to_dot(graph: FlowGraph) -> str:
    """Graphviz DOT: layers top to bottom, residual boxes, MLP ellipses, attention hexagons."""
    def quote(text: str) -> str:
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = [f"digraph {quote('flow ' + str(graph.root))} {{", "  rankdir=TB;", '  node [fontname="monospace"];']
    by_layer: dict[int, list[Node]] = {}
    for node in graph.ordered_nodes():
        by_layer.setdefault(node.layer, []).append(node)
        label = "\\n".join(quote(line)[1:-1] for line in _caption(node))
        style = ', style=bold' if node.feature == graph.root else ""
        lines.append(f'  {quote(node.id)} [shape={_SHAPES[node.role]}, label="{label}"{style}];')
    for nodes in by_layer.values():
        lines.append("  { rank=same; " + " ".join(quote(n.id) + ";" for n in nodes if n.role == "R") + " }")
    for edge in graph.edges:
        lines.append(f'  {quote(edge.source)} -> {quote(edge.target)} [label="{edge.score:.2f}"];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def to_mermaid(graph: FlowGraph) -> str:
    """Mermaid flowchart (top to bottom); node ids n0, n1, ... with `layer/kind/index` captions."""
    def escape(text: str) -> str:
        text = text.replace("#", "#35;")
        return text.replace('"', "#34;").replace("<", "#60;").replace(">", "#62;")

    ids = {node.id: f"n{i}" for i, node in enumerate(graph.ordered_nodes())}
    brackets = {"R": ('["', '"]'), "M": ('(["', '"])'), "A": ('{{"', '"}}')}
    lines = ["flowchart TB"]
    for node in graph.ordered_nodes():
        left, right = brackets[node.role]
        lines.append(f"  {ids[node.id]}{left}{'<br/>'.join(escape(x) for x in _caption(node))}{right}")
    for edge in graph.edges:
        lines.append(f"  {ids[edge.source]} -->|{edge.score:.2f}| {ids[edge.target]}")
    return "\n".join(lines) + "\n"


# -- persistence ----------------------------------------------------------------------------------

def graph_summary(graph: FlowGraph) -> dict:
    """Run summary: headline, one table row per residual node (ascending layers), notes."""
    residual = graph.residual_nodes()
    modules = [n for n in graph.nodes.values() if n.role != "R"]
    layers = [n.layer for n in residual]
    th = graph.thresholds
    headline = (f"flow graph of {graph.root}: {len(residual)} residual features over layers "
                f"{min(layers)}..{max(layers)}, {len(modules)} module features "
                f"(k={graph.k}, {graph.direction}, t^(R)={th.cut}, module >= {th.module})")
    rows = []
    for row in layer_rows(graph):
        for entry in row["residual"]:
            rows.append([row["layer"], entry["id"], entry["class"], *(number(entry["scores"].get(m), ".2f") for m in MODULES),
                         ", ".join(f"{m['id']} ({m['score']:.2f})" for m in entry["mlp"]),
                         ", ".join(f"{m['id']} ({m['score']:.2f})" for m in entry["attn"]),
                         " ".join(_show(t) for t in entry["label"])])
    notes = list(graph.notes) + [f"{n.id}: {note}" for n in residual for note in n.notes]
    return {"headline": headline,
            "table": {"columns": ["layer", "residual", "class", "s^(R)", "s^(M)", "s^(A)", "MLP", "ATT", "label"],
                      "rows": rows},
            "notes": notes}


# -- activations on a text: groups of section 5.1 -------------------------------------------------
def text_ids(lm: LoadedModel, text: str, chat: bool = False) -> list[int]:
    """Token ids of a text (raw by default; through the chat template with chat=True)."""
    ids = lm.prompt_ids(text, chat=chat)
    if not ids:
        raise AuditError("the text has no tokens")
    if len(ids) > lm.max_positions:
        raise AuditError(f"the text has {len(ids)} tokens; {lm.model_id} reads at most {lm.max_positions}")
    return ids


def check_position(ids: list[int], token: int) -> int:
    """A token index into `ids` (negative counts from the end) as a non-negative position."""
    pos = token + len(ids) if token < 0 else token
    if not 0 <= pos < len(ids):
        raise AuditError(f"token {token} is outside the text's {len(ids)} tokens (0..{len(ids) - 1})")
    return pos


def forward_sites(lm: LoadedModel, ids: Tensor, sites: Iterable[Site],
                  edits: dict | None = None) -> dict[Site, Tensor]:
    """Site tensors [batch, seq, width] of one forward of the model body on ids [batch, seq]."""
    with torch.no_grad(), SiteHooks(lm.model, reads=sites, edits=edits) as hooks:
        lm.model.get_submodule(lm.adapter.body)(input_ids=ids.to(lm.device), use_cache=False)
    return hooks.acts


def latent_activations(bank: SAEBank, acts: dict[Site, Tensor], pos: int,
                       features: Iterable[Feature]) -> dict[Feature, Tensor]:
    """SAE activations [batch] of each feature at token `pos`, encoded from site tensors."""
    wanted: dict[Site, set[int]] = {}
    for feature in features:
        wanted.setdefault(feature.site, set()).add(feature.latent)
    out: dict[Feature, Tensor] = {}
    with torch.no_grad():
        for site, latents in wanted.items():
            codes = bank.sae(site).encode(acts[site][:, pos].float().to(bank.device))  # [batch, d_sae]
            codes = codes.to_dense() if codes.is_sparse else codes
            out.update({Feature(site, j): codes[:, j].cpu() for j in latents})
    return out


def group_record(step: Step, activation: dict[Feature, float]) -> dict:
    """Activation group of one target (A.1) from its step's matches and activations at one token."""
    z = activation[step.feature]
    active = [m for m in MODULES if any(activation[x.feature] > 0 for x in step.matches.get(m, []))]
    return {"feature": str(step.feature), "activation": z, "active": z > 0,
            "group": group_name(active) if z > 0 else None, "active_modules": active,
            "predecessors": {m: [{**x.to_dict(), "activation": activation[x.feature]} for x in ms]
                             for m, ms in step.matches.items()},
            "missing": dict(step.missing)}


def predecessor_groups(engine: Engine, features: Iterable[Feature | str], ids: list[int], token: int,
                       k: int = 1) -> list[dict]:
    """Section-5.1 groups of residual features on one text at one token (one forward pass).

    Each record: {"feature", "activation", "active", "group" (None when the target is inactive),
    "active_modules": ["R", "M"], "predecessors": {"R": [{"feature", "score", "activation"}]},
    "missing": {...}}. With k > 1 a module counts as active when any of its k matches is.
    """
    index = flow_index(engine)
    targets = [index.check(f) for f in features]
    pos = check_position(ids, token)
    steps = [index.step(f, k, "backward") for f in targets]
    needed = set(targets) | {x.feature for s in steps for ms in s.matches.values() for x in ms}
    acts = forward_sites(index.lm, torch.tensor([ids[:pos + 1]]), {f.site for f in needed})
    values = {f: float(v[0]) for f, v in latent_activations(index.bank, acts, pos, needed).items()}
    return [group_record(step, values) for step in steps]

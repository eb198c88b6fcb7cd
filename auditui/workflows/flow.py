"""Flow graphs and deactivation tests as runs (kinds "flow" and "deactivation").

Both faces store every graph and every deactivation test built in a session, as it happens (the
CLI unless --no-save); the engine builds them (`auditui.engine.flow`, `auditui.engine.deactivation`).
Params: {"model": model id, "pack": pack label, then the step's own}; provenance names the model
and the digest of every SAE the walk could touch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from auditui.engine.deactivation import deactivation_summary, deactivation_test
from auditui.engine.flow import FlowGraph, Thresholds, build_flow_graph, graph_summary, text_ids
from auditui.errors import AuditError
from auditui.text import visible
from auditui.workflows.runs import provenance, recorded_run

if TYPE_CHECKING:
    from auditui.engine import Engine
    from auditui.store.database import Store

FLOW_KIND = "flow"
DEACTIVATION_KIND = "deactivation"


@dataclass(frozen=True)
class FlowRequest:
    feature: str  # LAYER/KIND/INDEX
    k: int = 1
    direction: str = "both"
    t_res: float = 0.5
    t_module: float = 0.15
    labels: int = 5  # logit-lens tokens per node
    build_tables: bool = False

    def thresholds(self) -> Thresholds:
        return Thresholds(cut=self.t_res, module=self.t_module)

    def validate(self) -> None:
        if not self.feature:
            raise AuditError("give a feature: LAYER/KIND/INDEX (e.g. 12/resid_post/1234)")
        _finite(t_res=self.t_res, t_module=self.t_module)
        if not 0 <= self.labels <= 64 or not 1 <= self.k <= 64:
            raise AuditError(f"--labels must be 0..64 and --k 1..64 (got {self.labels}, {self.k})")


@dataclass(frozen=True)
class DeactivateRequest:
    feature: str
    text: str
    token: int = -1  # negative counts from the end
    r: float = 0.0
    seed: int = 0
    chat: bool = False  # wrap the text in the chat template

    def validate(self) -> None:
        if not self.feature:
            raise AuditError("give a feature: LAYER/KIND/INDEX (e.g. 12/resid_post/1234)")
        _finite(r=self.r)


def _finite(**values: float) -> None:
    for name, value in values.items():
        if not math.isfinite(value):
            raise AuditError(f"{name} must be a finite number, got {value}")


def flow_graph(engine: Engine, request: FlowRequest) -> FlowGraph:
    request.validate()
    return build_flow_graph(engine, request.feature, k=request.k, direction=request.direction,
                            thresholds=request.thresholds(), label_tokens=request.labels,
                            build_tables=request.build_tables)


def _params(engine: Engine, **params: object) -> dict:
    return {"model": engine.lm.model_id, "pack": engine.pack_id, **params}


def _record(store: Store, engine: Engine, session_id: int, kind: str, params: dict, result: dict,
            summary: dict) -> int:
    with recorded_run(store, session_id, kind, params, provenance(engine.lm, engine, engine.bank.sites)) as run:
        run.done(result, summary)
    return run.run_id


def record_flow(store: Store, engine: Engine, session_id: int, graph: FlowGraph) -> int:
    """Store a built graph as a run; its id."""
    params = _params(engine, root=str(graph.root), k=graph.k, direction=graph.direction,
                     thresholds=graph.thresholds.to_dict())
    return _record(store, engine, session_id, FLOW_KIND, params, graph.to_dict(), graph_summary(graph))


def deactivate(engine: Engine, request: DeactivateRequest) -> dict:
    """The deactivation test's result (see `auditui.engine.deactivation`)."""
    request.validate()
    ids = text_ids(engine.lm, request.text, chat=request.chat)
    return deactivation_test(engine, request.feature, ids, request.token, r=request.r, seed=request.seed)


def record_deactivation(store: Store, engine: Engine, session_id: int, request: DeactivateRequest,
                        result: dict) -> int:
    """Store a deactivation test's result as a run (params name the resolved token); its id. A test
    whose target does not fire at the token measured nothing: it is refused, not stored as done."""
    if not result["active"]:
        raise AuditError(f"{result['target']} is inactive at token {result['token']} "
                         f"({visible(result['token_text'])!r}): nothing to deactivate, nothing stored; "
                         "pick a token where it fires")
    params = _params(engine, feature=result["target"], text=request.text, chat=request.chat, token=result["token"],
                     r=request.r, seed=request.seed)
    return _record(store, engine, session_id, DEACTIVATION_KIND, params, result, deactivation_summary(result))

"""One run lifecycle for every kind of step: started, then done, cancelled or failed, with the same
provenance record.

    with recorded_run(store, session_id, "attribution", params, provenance(engine, sites)) as run:
        ...
        run.done(result, summary)          # or run.partial(result, summary): cancelled, result kept

Provenance: the model id, the sha256 of every SAE the step used (never only a pack name, which a
rebuild silently repoints), the pack name as a label, the auditui version and the seeds. A child
run (`parent_id`) records a follow-up of an earlier run (an exact check of an attribution run, one
point of a sweep) instead of rewriting the finished run in place. The first run that used a model
(or SAEs) also fills the session's model / pack columns, so both faces set them by the same rule.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from typing import TYPE_CHECKING, Any

from auditui.errors import AuditError
from auditui.progress import Cancelled

if TYPE_CHECKING:
    from auditui.engine import Engine
    from auditui.engine.model import LoadedModel
    from auditui.store.database import Store


def auditui_version() -> str:
    try:
        return metadata.version("auditui")
    except metadata.PackageNotFoundError:
        return "unknown"


def provenance(lm: LoadedModel, engine: Engine | None = None, sites: Iterable[object] = (),
               seeds: list[int] | None = None) -> dict:
    """What a run was computed with (see module docstring)."""
    record: dict[str, Any] = {"model_id": lm.model_id, "model_source": lm.source, "device": str(lm.device),
                              "dtype": str(lm.dtype).removeprefix("torch."), "auditui": auditui_version(),
                              "saes": {}, "pack": None, "seeds": seeds}
    if engine is not None:
        record["saes"] = engine.sae_digests(list(dict.fromkeys(sites)))
        record["pack"] = engine.bank.pack.name if engine.bank.pack else None
    return record


@dataclass
class RunHandle:
    store: Store
    run_id: int
    finished: bool = field(default=False)

    def done(self, result: Any, summary: Any = None) -> None:
        self.store.finish_run(self.run_id, result, summary)
        self.finished = True

    def partial(self, result: Any, summary: Any = None) -> None:
        """Stopped by the user after part of the work: status cancelled, what was computed kept."""
        self.store.finish_run(self.run_id, result, summary, status="cancelled")
        self.finished = True


def _one_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text if isinstance(exc, AuditError) else f"{type(exc).__name__}: {text}"


@contextmanager
def recorded_run(store: Store, session_id: int, kind: str, params: dict, prov: dict,
                 parent_id: int | None = None) -> Iterator[RunHandle]:
    """Start a run; on leaving, a run that neither `done` nor `partial` recorded is failed or cancelled."""
    _fill_session(store, session_id, prov)
    run = RunHandle(store, store.start_run(session_id, kind, params, prov, parent_id))
    try:
        yield run
    except (Cancelled, KeyboardInterrupt) as exc:
        if not run.finished:
            store.fail_run(run.run_id, _one_line(exc) if isinstance(exc, Cancelled) else "interrupted",
                           status="cancelled")
        raise
    except BaseException as exc:
        if not run.finished:
            store.fail_run(run.run_id, _one_line(exc))
        raise
    if not run.finished:
        store.fail_run(run.run_id, "the step ended without a result")


def _fill_session(store: Store, session_id: int, prov: dict) -> None:
    session = store.session(session_id)
    fields = {}
    if not session["model_id"]:
        fields["model_id"] = prov["model_id"]
    if not session["pack_id"] and prov.get("pack"):
        fields["pack_id"] = prov["pack"]
    if fields:
        store.touch_session(session_id, **fields)

"""Judge-graded completions as a run, with the session DB as the judge's cache and call log.

    grades = grade(store, session_id, judge, Grading(rubric, subjects), items, run_id, progress)
    run_id = judge_run(store, engine, session_id, JudgeRequest(...), judge, progress)

Every call is stored in `judge_calls` (request id, latency, attempts, raw answer, parsed scores or
error). A text already answered by the same judge model under the same rubric digest (subjects
included) is not sent again: its stored answer is re-read (counted as cached). An answer that
cannot be parsed is *unscored*: it enters no mean and is counted in the failure rate beside every
mean. Transport failures (after retries) are errors, stored, not cached; once the judge looks
down (`client.BROKEN_AFTER` calls in a row unanswered) the texts not yet sent are errors too,
without a call.

Run kind "judge": params {judge, rubric, subjects, completion_ids, label_threshold}; result
{judge, rubric, subjects, rows: [{completion_id, status, behaviour, coherence, values, perplexity,
repetition, call_id, cached}], means: {behaviour, coherence, perplexity, repetition: Estimate},
counts {texts, scored, unscored, errors, cached, calls}, failure_rate, labels (when labelling)}.

Labelling: with a threshold, each scored completion is labelled positive (behaviour >= threshold)
or negative as labeller "judge:<model>", beside a person's label, never over it; the agreement
with the person's labels (share and Cohen's κ) is reported.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from auditui.config import Settings, config_file
from auditui.engine.metrics import completion_perplexity, repetition_rate
from auditui.engine.model import convert_gguf, gguf_cache_dir, resolve_source
from auditui.engine.reference import completion_sequence
from auditui.errors import AuditError
from auditui.judge.client import Judge, JudgeConfig, public_url
from auditui.judge.parse import parse_answer
from auditui.judge.rubrics import Rubric, load_rubric, rubric_files
from auditui.progress import QUIET, Progress
from auditui.stats import agreement, mean_ci
from auditui.store.database import PERSON
from auditui.workflows.runs import provenance, recorded_run

if TYPE_CHECKING:
    from auditui.engine import Engine
    from auditui.store.database import Store

JUDGE_KIND = "judge"
MAX_TEXTS = 4096


def judge_config(settings: Settings, base_url: str | None = None, model: str | None = None,
                 **options: float) -> JudgeConfig:
    """The judge of the flags, else of the settings (AUDITUI_JUDGE_BASE_URL / _MODEL, config.toml)."""
    config = JudgeConfig(base_url or settings.judge_base_url, model or settings.judge_model,
                         **{k: v for k, v in options.items() if v is not None})  # type: ignore[arg-type]
    config.validate()
    return config


def local_judge_model_dir(settings: Settings, progress: Progress = QUIET) -> Path:
    """A local directory (config.json + weights) of the settings' model for a judge server; a GGUF
    (smollm2 included) is de-quantized into the cache once, as the engine does."""
    kind, path = resolve_source(settings.model)
    if kind == "dir" and path is not None:
        return path
    if kind == "gguf" and path is not None:
        cached = gguf_cache_dir(path, settings.cache_path)
        if not (cached / "auditui-source.json").exists():
            convert_gguf(path, cached, progress)
        return cached
    raise AuditError(f"a local judge needs a local model (a directory, a .gguf file or smollm2), not {settings.model!r}")


def rubric_folders() -> tuple[Path, ...]:
    """The user's rubric folder (beside config.toml); its files override built-in rubrics of the same name."""
    return (config_file().parent / "rubrics",)


def known_rubrics() -> dict[str, Path]:
    return rubric_files(rubric_folders())


@dataclass(frozen=True)
class Grading:
    rubric: Rubric
    subjects: tuple[str, ...] = ()

    @classmethod
    def named(cls, rubric: str, subjects: tuple[str, ...] = ()) -> Grading:
        """A rubric by name (or a .toml file) with its subjects, checked."""
        grading = cls(load_rubric(rubric, rubric_folders()), tuple(s.strip() for s in subjects if s.strip()))
        grading.validate()
        return grading

    def validate(self) -> None:
        self.rubric.check_subjects(self.subjects)

    def describe(self) -> dict:
        return {"name": self.rubric.name, "digest": self.rubric.digest(self.subjects), "source": self.rubric.source,
                "subjects": list(self.subjects)}


@dataclass(frozen=True)
class Item:
    """A text to grade: its completion (None for a text outside the session) and the prompt it answers."""

    completion_id: int | None
    prompt: str
    text: str

    def digest(self) -> str:
        return hashlib.sha256(json.dumps([self.prompt, self.text], ensure_ascii=False).encode()).hexdigest()


@dataclass(frozen=True)
class Grade:
    completion_id: int | None
    status: str  # scored | unscored | error | cancelled
    values: dict | None = None  # the rubric's derived values in [0, 1]
    scores: dict | None = None  # the parsed scores
    call_id: int | None = None
    cached: bool = False

    def value(self, name: str) -> float | None:
        return None if self.values is None else self.values.get(name)


@dataclass
class Tally:
    texts: int = 0
    scored: int = 0
    unscored: int = 0
    errors: int = 0
    cached: int = 0
    calls: int = 0
    attempts: int = 0

    def add(self, grade: Grade) -> None:
        self.texts += 1
        self.cached += grade.cached
        if grade.status in ("scored", "unscored"):
            setattr(self, grade.status, getattr(self, grade.status) + 1)
        elif grade.status == "error":
            self.errors += 1

    def failure_rate(self) -> float | None:
        """Unscored and failed texts over the texts the judge was asked about."""
        asked = self.scored + self.unscored + self.errors
        return None if asked == 0 else (self.unscored + self.errors) / asked


def _stored_grade(rubric: Rubric, call: dict, completion_id: int | None, cached: bool) -> Grade:
    scores = call.get("scores")
    if call["status"] == "scored" and scores is not None:
        return Grade(completion_id, "scored", rubric.derive(scores), scores, call["id"], cached)
    return Grade(completion_id, call["status"], None, None, call["id"], cached)


def grade(store: Store, session_id: int, judge: Judge, grading: Grading, items: list[Item],
          run_id: int | None = None, progress: Progress = QUIET) -> tuple[list[Grade], Tally]:
    """Grades in the order of `items`, asking the judge only for texts it has not answered yet."""
    grading.validate()
    model, digest = judge.config.model, grading.rubric.digest(grading.subjects)
    by_digest: dict[str, dict | None] = {}
    for item in items:
        key = item.digest()
        if key not in by_digest:
            by_digest[key] = store.cached_judge_call(model, digest, key)
    ask = {key: item for item in items if by_digest[(key := item.digest())] is None}  # one call per new text
    calls = judge.ask_all([(key, grading.rubric.messages(item.text, item.prompt, grading.subjects))
                           for key, item in ask.items()], progress)
    rows = []
    unsent = {call.key: call.error for call in calls if not call.sent and not call.cancelled}
    for call in calls:
        if call.cancelled or not call.sent:
            continue
        parsed = parse_answer(call.raw, grading.rubric, len(grading.subjects)) if call.raw is not None else None
        status = "error" if parsed is None else ("scored" if parsed.scores is not None else "unscored")
        error = call.error if parsed is None else (parsed.reason or None)
        rows.append({"run_id": run_id, "completion_id": ask[call.key].completion_id, "judge_model": model,
                     "base_url": public_url(judge.config.base_url), "rubric": grading.rubric.name, "rubric_digest": digest,
                     "text_digest": call.key, "status": status, "raw": call.raw, "error": error,
                     "request_id": call.request_id, "attempts": call.attempts, "latency": call.latency,
                     "scores": None if parsed is None else parsed.scores})
    ids = store.add_judge_calls(session_id, rows)
    fresh = {row["text_digest"]: {**row, "id": pk} for row, pk in zip(rows, ids, strict=True)}
    tally = Tally(calls=len(rows), attempts=sum(call.attempts for call in calls))
    grades = []
    for item in items:
        key = item.digest()
        stored, cached = (fresh.get(key), False) if key in ask else (by_digest[key], True)
        if stored is not None:
            result = _stored_grade(grading.rubric, stored, item.completion_id, cached)
        else:  # cancelled, or not sent because the judge was down
            result = Grade(item.completion_id, "error" if key in unsent else "cancelled")
        tally.add(result)
        grades.append(result)
    return grades, tally


def summary_means(grades: list[Grade], names: tuple[str, ...] = ("behaviour", "coherence")) -> dict:
    return {name: mean_ci([v for g in grades if (v := g.value(name)) is not None]).to_dict() for name in names}


# -- the judge run -------------------------------------------------------------------------------
@dataclass(frozen=True)
class JudgeRequest:
    grading: Grading
    completion_ids: tuple[int, ...] = ()  # () = every completion of the session
    label_threshold: float | None = None  # label by behaviour >= threshold (in [0, 1])

    def validate(self) -> None:
        self.grading.validate()
        t = self.label_threshold
        if t is not None and not 0 <= t <= 1:
            raise AuditError(f"the label threshold is a behaviour score in 0..1 (got {t})")


def _completions(store: Store, session_id: int, ids: tuple[int, ...]) -> list[dict]:
    rows = store.completions(session_id=session_id) if not ids else store.completions_by_ids(list(ids))
    foreign = sorted({r["id"] for r in rows if r["session_id"] != session_id} | (set(ids) - {r["id"] for r in rows}))
    if foreign:
        raise AuditError(f"completion(s) {', '.join(map(str, foreign[:5]))} are not in session {session_id}")
    if not rows:
        raise AuditError(f"session {session_id} has no completions to judge; sample some first")
    if len(rows) > MAX_TEXTS:
        raise AuditError(f"{len(rows)} completions; judge at most {MAX_TEXTS} per run (pass --completion ids)")
    return rows


def text_metrics(store: Store, engine: Engine, rows: list[dict], progress: Progress = QUIET) -> list[dict]:
    """{perplexity, repetition} per completion row: perplexity under the loaded (unsteered) model."""
    prompts = {pid: store.prompt(pid) for pid in {r["prompt_id"] for r in rows}}
    seqs = [completion_sequence(prompts[r["prompt_id"]], r) for r in rows]
    perplexity = completion_perplexity(engine.lm, seqs, progress=progress)
    return [{"perplexity": p, "repetition": repetition_rate(list(r["token_ids"] or []))}
            for r, p in zip(rows, perplexity, strict=True)]


def _label(store: Store, grades: list[Grade], threshold: float, labeller: str) -> dict:
    person, judged = [], []
    for g in grades:
        behaviour = g.value("behaviour")
        if g.completion_id is None or behaviour is None:
            continue
        label = "positive" if behaviour >= threshold else "negative"
        store.set_label(g.completion_id, label, labeller=labeller)
        theirs = store.labels(g.completion_id).get(PERSON)
        if theirs in ("positive", "negative"):
            person.append(theirs)
            judged.append(label)
    return {"labeller": labeller, "threshold": threshold, "labelled": sum(g.value("behaviour") is not None for g in grades),
            "agreement_with_person": agreement(person, judged)}


def _summary(result: dict) -> dict:
    means, counts = result["means"], result["counts"]
    rate = result["failure_rate"]

    def fmt(name: str) -> str:
        m = means[name]
        return "-" if m["mean"] is None else f"{m['mean']:.2f} (n={m['n']})"

    rows = [[r["completion_id"], r["status"], *(f"{r[k]:.2f}" if r[k] is not None else "-"
                                                for k in ("behaviour", "coherence", "perplexity", "repetition"))]
            for r in result["rows"]]
    return {"headline": f"judge {result['judge']['model']}: behaviour {fmt('behaviour')}, coherence {fmt('coherence')}, "
                        f"unscored or failed {'-' if rate is None else f'{rate:.0%}'} of {counts['texts']} texts "
                        f"({counts['cached']} cached)",
            "table": {"columns": ["completion", "status", "behaviour", "coherence", "perplexity", "repetition"],
                      "rows": rows}, "notes": [f"graded by {result['judge']['model']} at {result['judge']['base_url']}"]}


def judge_run(store: Store, engine: Engine, session_id: int, request: JudgeRequest, judge: Judge,
              progress: Progress = QUIET) -> int:
    """Grade completions, compute their judge-free metrics, optionally label; the run id."""
    request.validate()
    rows = _completions(store, session_id, request.completion_ids)
    params = {"judge": judge.config.describe(), "rubric": request.grading.describe(),
              "completion_ids": [r["id"] for r in rows], "label_threshold": request.label_threshold}
    with recorded_run(store, session_id, JUDGE_KIND, params, provenance(engine.lm)) as run:
        prompts = {pid: store.prompt(pid)["text"] for pid in {r["prompt_id"] for r in rows}}
        items = [Item(r["id"], prompts[r["prompt_id"]], r["text"]) for r in rows]
        grades, tally = grade(store, session_id, judge, request.grading, items, run.run_id, progress)
        metrics = text_metrics(store, engine, rows, QUIET if progress.should_stop() else progress)  # keep what was graded
        out = [{"completion_id": g.completion_id, "status": g.status, "behaviour": g.value("behaviour"),
                "coherence": g.value("coherence"), "values": g.values, "call_id": g.call_id, "cached": g.cached, **m}
               for g, m in zip(grades, metrics, strict=True)]
        result = {"judge": judge.config.describe(), "rubric": request.grading.describe(), "rows": out,
                  "means": {**summary_means(grades),
                            **{k: mean_ci([m[k] for m in metrics if m[k] is not None]).to_dict()
                               for k in ("perplexity", "repetition")}},
                  "counts": {**tally.__dict__}, "failure_rate": tally.failure_rate()}
        if request.label_threshold is not None:
            result["labels"] = _label(store, grades, request.label_threshold, f"judge:{judge.config.model}")
        (run.partial if any(g.status == "cancelled" for g in grades) else run.done)(result, _summary(result))
    return run.run_id

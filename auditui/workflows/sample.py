"""Sample N completions of a prompt into a session: the prompt first, then each batch's completions
as soon as it finishes, and a run of kind "sample" (params, provenance, completion ids).

Progress: the engine's token steps ("sampling"), then "saving N completions" (no count) while a
finished batch is written. A request that cannot be sampled is refused before anything is stored. A
stop keeps the finished completions (unfinished rows are dropped) and records the run as cancelled with
what it holds; a prompt left without any completion is removed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from auditui.engine.sampling import SamplingParams, check_request, iter_sample_batches, random_seed, use_chat
from auditui.errors import AuditError
from auditui.progress import QUIET, Progress
from auditui.workflows.runs import provenance, recorded_run

if TYPE_CHECKING:
    from auditui.engine.model import LoadedModel
    from auditui.store.database import Store

SAMPLE_KIND = "sample"
MAX_SAMPLES = 1024  # per request: more is almost always a typo, and runs for a long time


def check_sample_count(n: int, batch_size: int) -> None:
    if n > MAX_SAMPLES or batch_size > MAX_SAMPLES:
        raise AuditError(f"at most {MAX_SAMPLES} samples (and rows per batch) per request, got "
                         f"{max(n, batch_size)}; sample in several requests")


@dataclass(frozen=True)
class SampleRequest:
    prompt: str
    n: int = 8
    params: SamplingParams = SamplingParams()
    seed: int | None = None  # None: a random seed, recorded
    batch_size: int = 8


@dataclass(frozen=True)
class SampleResult:
    prompt_id: int | None  # None: stopped before the first completion (the prompt is not kept)
    completion_ids: list[int]
    seed: int
    run_id: int
    cancelled: bool


def sample(store: Store, lm: LoadedModel, session_id: int, request: SampleRequest, progress: Progress = QUIET,
           pack_id: str = "") -> SampleResult:
    """Store the prompt, then every finished batch of completions; see the module docstring."""
    if not request.prompt.strip():
        raise AuditError("type a prompt first")
    check_sample_count(request.n, request.batch_size)
    params = request.params
    chat = use_chat(lm, params)
    prompt_ids = lm.prompt_ids(request.prompt, chat=chat, system=params.system)
    seed = random_seed() if request.seed is None else request.seed
    check_request(lm, prompt_ids, request.n, params, seed, request.batch_size)  # before the prompt is stored
    stored = {**asdict(params), "chat": chat}
    run_params = {"prompt": request.prompt, "n": request.n, "params": stored, "seed": seed,
                  "batch_size": request.batch_size}
    seeds = [seed + i for i in range(request.n)]
    with recorded_run(store, session_id, SAMPLE_KIND, run_params, provenance(lm, seeds=seeds)) as run:
        prompt_id = store.add_prompt(session_id, request.prompt, prompt_ids, system=params.system, chat=chat)
        completion_ids: list[int] = []
        try:
            for batch in iter_sample_batches(lm, prompt_ids, request.n, params, seed, request.batch_size, progress):
                finished = [item for item in batch if item.finish_reason != "cancelled"]
                # named while stored (no count: not a full bar that seems stuck)
                progress.progress(0, 0, f"saving {len(finished)} completion{'s' * (len(finished) != 1)}")
                for item in finished:
                    completion_ids.append(store.add_completion(
                        prompt_id, item.text, item.token_ids, item.seed, stored, model_id=lm.model_id,
                        pack_id=pack_id, finish_reason=item.finish_reason, run_id=run.run_id))
        finally:
            if not completion_ids:  # stopped (or failed) before the first completion: no empty prompt is left
                store.delete_empty_prompt(prompt_id)
        kept = prompt_id if completion_ids else None
        cancelled = len(completion_ids) < request.n
        result = {"prompt_id": kept, "completion_ids": completion_ids}
        summary = {"headline": f"{len(completion_ids)} of {request.n} completions of prompt {prompt_id}"
                               f"{'' if kept else ' (not kept)'} (seeds {seed}..{seed + request.n - 1})"}
        (run.partial if cancelled else run.done)(result, summary)
    return SampleResult(kept, completion_ids, seed, run.run_id, cancelled)

"""Sampling into a session: the prompt, each batch's completions as it finishes, the run."""

from __future__ import annotations

import pytest
from helpers import Probe

from auditui.engine.sampling import SamplingParams, sample_completions
from auditui.errors import AuditError
from auditui.store.database import Store
from auditui.workflows.sample import SampleRequest, sample

PROMPT = "Tell me a story about a cat."


def test_sample_into_session_stores_everything_and_commits_batch_by_batch(loaded, tmp_path):
    lm = loaded("qwen2")
    store = Store(tmp_path / "s.db")
    session_id = store.create_session("s")
    watcher = Store(tmp_path / "s.db")  # a second connection sees only committed rows
    seen_during_second_batch = []

    def watch(events) -> bool:
        if events and 3 * 16 < events[-1][0] < 6 * 16:
            seen_during_second_batch.append(len(watcher.completions(session_id)))
        return False

    params = SamplingParams(temperature=0.9, top_p=0.8, max_new_tokens=16, system="Be terse.")
    done = sample(store, lm, session_id, SampleRequest(PROMPT, 7, params, seed=42, batch_size=3), Probe(stop=watch),
                  pack_id="tiny")
    prompt_id, ids = done.prompt_id, done.completion_ids
    assert seen_during_second_batch and set(seen_during_second_batch) == {3}
    prompt = store.prompt(prompt_id)
    assert prompt["text"] == PROMPT and prompt["system"] == "Be terse." and prompt["chat"] == 1
    assert prompt["prompt_ids"] == lm.prompt_ids(PROMPT, chat=True, system="Be terse.")
    rows = store.completions_by_ids(ids)
    assert [r["seed"] for r in rows] == list(range(42, 49))
    assert all(r["model_id"] == lm.model_id and r["pack_id"] == "tiny" for r in rows)
    assert rows[0]["params"] == {"temperature": 0.9, "top_p": 0.8, "max_new_tokens": 16, "chat": True,
                                 "system": "Be terse."}
    assert store.session(session_id)["model_id"] == lm.model_id
    # Any one completion is reproduced from what the database holds about it alone.
    row = rows[4]
    again = sample_completions(lm, store.prompt(row["prompt_id"])["prompt_ids"], 1,
                               SamplingParams(**row["params"]), seed=row["seed"])[0]
    assert again.token_ids == row["token_ids"] and again.text == row["text"]
    assert again.finish_reason == row["finish_reason"]


def test_sample_into_session_raw_random_seed_and_errors(loaded, tmp_path):
    lm = loaded("gpt2")
    store = Store(tmp_path / "s.db")
    session_id = store.create_session("s")
    raw = SamplingParams(chat=False, max_new_tokens=4)
    first = sample(store, lm, session_id, SampleRequest("plain text", 2, raw))
    second = sample(store, lm, session_id, SampleRequest("plain text", 2, raw))
    seeds = [c["seed"] for c in store.completions(session_id)]
    assert seeds[1] == seeds[0] + 1 and seeds[3] == seeds[2] + 1 and seeds[0] != seeds[2]
    assert store.prompt(first.prompt_id)["chat"] == 0 and store.prompt(second.prompt_id)["prompt_ids"] == lm.prompt_ids(
        "plain text", chat=False)
    n_prompts = len(store.prompts(session_id))
    for prompt, params in (("  ", raw), ("x" * 600, raw), ("hi", SamplingParams(chat=False, system="s"))):
        with pytest.raises(AuditError):
            sample(store, lm, session_id, SampleRequest(prompt, 2, params))
    assert len(store.prompts(session_id)) == n_prompts  # a refused request stores no prompt
    stopped = sample(store, lm, session_id, SampleRequest("plain text", 4, raw, batch_size=2),
                     Probe(stop=lambda events: True))
    assert stopped.completion_ids == [] and stopped.prompt_id is None  # a prompt without completions is removed
    assert len(store.prompts(session_id)) == n_prompts
    assert stopped.cancelled and store.run(stopped.run_id)["status"] == "cancelled"

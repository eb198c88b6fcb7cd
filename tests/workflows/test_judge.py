"""Judge runs: every call stored, the session DB as cache (counted at the server), unscored answers
counted and never 0, judge-free metrics checked by hand, judge labels beside a person's."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import tiny_audit
from judge_servers import Scripted, katan, requests

from auditui.errors import AuditError
from auditui.judge.client import Judge, JudgeConfig
from auditui.judge.rubrics import load_rubric
from auditui.workflows.judge import Grading, JudgeRequest, judge_run

GOOD = json.dumps({"behaviour": 4, "coherence": 5})
SPEC = [("Say something", [(f"Sure. {GOOD}", "positive"), ("plain words, no rating", "negative"),
                           (f"Again {json.dumps({'behaviour': 1, 'coherence': 2})}", "negative")])]
GRADING = Grading(load_rubric("behaviour"), ("mentions a rating",))


@pytest.fixture
def setup(tmp_path, tiny_models):
    return tiny_audit(tmp_path, tiny_models["llama"], "", SPEC, saes=[])


def test_a_judge_run_scores_counts_failures_and_a_rerun_pays_nothing(setup, tmp_path):
    store, engine, session_id = setup
    with katan(tmp_path) as url:
        judge = Judge(JudgeConfig(url, "echo-judge", concurrency=3))
        run = store.run(judge_run(store, engine, session_id, JudgeRequest(GRADING), judge))
        assert requests(url) == 3
        again = store.run(judge_run(store, engine, session_id, JudgeRequest(GRADING), judge))
        assert requests(url) == 3  # every text was answered before: zero calls
    result = run["result"]
    assert [r["status"] for r in result["rows"]] == ["scored", "unscored", "scored"]
    assert [r["behaviour"] for r in result["rows"]] == [0.8, None, 0.2]  # the unscored text is not a 0
    assert result["means"]["behaviour"]["mean"] == pytest.approx(0.5) and result["means"]["behaviour"]["n"] == 2
    assert result["failure_rate"] == pytest.approx(1 / 3)
    assert result["counts"]["calls"] == 3 and again["result"]["counts"] == {**result["counts"], "calls": 0, "cached": 3,
                                                                             "attempts": 0}
    assert [r["behaviour"] for r in again["result"]["rows"]] == [0.8, None, 0.2]
    calls = store.judge_calls(session_id)
    assert len(calls) == 3 and {c["run_id"] for c in calls} == {run["id"]}
    assert all(c["request_id"] and c["latency"] > 0 and c["attempts"] == 1 and "[echo]" in c["raw"] for c in calls)
    assert calls[1]["status"] == "unscored" and calls[1]["error"]
    assert "unscored or failed 33%" in run["summary"]["headline"]


def test_judge_free_metrics_match_a_hand_computation(setup, tmp_path):
    store, engine, session_id = setup
    with katan(tmp_path) as url:
        run = store.run(judge_run(store, engine, session_id, JudgeRequest(GRADING), Judge(JudgeConfig(url, "echo-judge"))))
    lm = engine.lm
    for row, completion in zip(run["result"]["rows"], store.completions(session_id=session_id), strict=True):
        prompt_ids = store.prompt(completion["prompt_id"])["prompt_ids"]
        ids = torch.tensor([prompt_ids + completion["token_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(lm.model(ids).logits[0].double(), -1)
        n = len(prompt_ids)
        nll = -sum(float(logp[t - 1, ids[0, t]]) for t in range(n, ids.shape[1]))
        assert row["perplexity"] == pytest.approx(math.exp(nll / (ids.shape[1] - n)), rel=1e-4)
        grams = [tuple(completion["token_ids"][i:i + 3]) for i in range(len(completion["token_ids"]) - 2)]
        assert row["repetition"] == pytest.approx(1 - len(set(grams)) / len(grams))


def test_transport_errors_are_stored_not_cached_and_judge_labels_sit_beside_a_persons(setup):
    store, engine, session_id = setup
    ids = [c["id"] for c in store.completions(session_id=session_id)]
    with Scripted([(500, {}, "down")]) as server:
        judge = Judge(JudgeConfig(server.url, "j", retries=1, backoff=0.01))
        run = store.run(judge_run(store, engine, session_id, JudgeRequest(GRADING, (ids[0],)), judge))
    assert run["result"]["rows"][0]["status"] == "error" and run["result"]["failure_rate"] == 1.0
    assert store.judge_calls(session_id)[0]["error"].startswith("InternalServerError 500")
    answers = [(200, {}, json.dumps({"behaviour": b, "coherence": 5})) for b in (5, 0, 4)]
    with Scripted(answers) as server:  # the failed text is asked again: errors are not cached
        judge = Judge(JudgeConfig(server.url, "j", concurrency=1))
        run = store.run(judge_run(store, engine, session_id, JudgeRequest(GRADING, label_threshold=0.5), judge))
        assert server.count == 3
    labels = run["result"]["labels"]
    assert [store.labels(i) for i in ids] == [{"user": "positive", "judge:j": "positive"},
                                              {"user": "negative", "judge:j": "negative"},
                                              {"user": "negative", "judge:j": "positive"}]
    assert labels["agreement_with_person"]["n"] == 3 and labels["agreement_with_person"]["agree"] == pytest.approx(2 / 3)
    assert [c["label"] for c in store.completions(session_id=session_id)] == ["positive", "negative", "negative"]


@pytest.mark.parametrize(("request_", "message"), [
    (JudgeRequest(Grading(load_rubric("behaviour"))), "needs --subject"),
    (JudgeRequest(GRADING, (999,)), "not in session"),
    (JudgeRequest(GRADING, label_threshold=2.0), "0..1"),
])
def test_bad_requests_are_refused_before_any_call(setup, request_, message):
    store, engine, session_id = setup
    with Scripted([(200, {}, GOOD)]) as server:
        with pytest.raises(AuditError, match=message):
            judge_run(store, engine, session_id, request_, Judge(JudgeConfig(server.url, "j")))
        assert server.count == 0
    assert store.runs(session_id) == []

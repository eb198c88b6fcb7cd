"""The judge caller against real OpenAI-compatible servers on loopback, with the real openai client."""

from __future__ import annotations

import time

import pytest
from helpers import Probe
from judge_servers import DROP, Scripted, katan, requests

from auditui.errors import AuditError
from auditui.judge.client import Judge, JudgeConfig

MESSAGES = [{"role": "system", "content": "grade"}, {"role": "user", "content": "the text"}]


def judge(url: str, **options) -> Judge:
    return Judge(JudgeConfig(url, "echo-judge", **{"backoff": 0.01, "retries": 3, **options}))


def test_echo_answers_every_text_in_order_and_counts_at_the_server(tmp_path) -> None:
    with katan(tmp_path) as url:
        calls = judge(url, concurrency=4).ask_all([(i, [{"role": "user", "content": f"text {i}"}]) for i in range(10)])
        assert [c.key for c in calls] == list(range(10))
        assert all(c.error is None and f"User: text {c.key}" in c.raw and c.attempts == 1 for c in calls)
        assert all(c.request_id for c in calls)
        assert requests(url) == 10


def test_server_errors_are_retried_then_reported_not_raised(tmp_path) -> None:
    with katan(tmp_path, error_rate=1.0) as url:
        call = judge(url, retries=2).ask("k", MESSAGES)
        assert call.raw is None and "500" in call.error and call.attempts == 3


def test_rate_limited_forever_gives_up_after_the_retries(tmp_path) -> None:
    with katan(tmp_path, rate_limit_after=1) as url:
        calls = judge(url, retries=2).ask_all([(1, MESSAGES), (2, MESSAGES)])
        answered, limited = sorted(calls, key=lambda c: c.raw is None)
        assert answered.raw is not None
        assert limited.raw is None and "429" in limited.error and limited.attempts == 3


def test_a_timeout_is_an_error_after_retries(tmp_path) -> None:
    with katan(tmp_path, latency_ms=1500) as url:
        started = time.monotonic()
        call = judge(url, timeout=0.3, retries=1).ask("k", MESSAGES)
        assert call.raw is None and "Timeout" in call.error and call.attempts == 2
        assert time.monotonic() - started < 5


def test_429_with_retry_after_then_success_waits_as_asked() -> None:
    script = [(429, {"retry-after": "0.6"}, "slow down"), (200, {}, '{"coherence": 5, "behaviour": 1}')]
    with Scripted(script) as server:
        started = time.monotonic()
        call = judge(server.url).ask("k", MESSAGES)
        waited = time.monotonic() - started
    assert call.raw == '{"coherence": 5, "behaviour": 1}' and call.attempts == 2 and call.request_id == "req-2"
    assert waited >= 0.6 and server.count == 2


def test_a_dropped_connection_is_retried() -> None:
    with Scripted([DROP, DROP, (200, {}, "fine")]) as server:
        call = judge(server.url).ask("k", MESSAGES)
    assert (call.raw, call.attempts, server.count) == ("fine", 3, 3)


def test_client_errors_are_not_retried() -> None:
    with Scripted([(404, {}, "no such model")]) as server:
        call = judge(server.url).ask("k", MESSAGES)
    assert call.raw is None and "404" in call.error and server.count == 1


def test_a_stop_ends_the_waits_and_leaves_the_rest_unasked() -> None:
    with Scripted([(503, {"retry-after": "30"}, "busy")]) as server:
        probe = Probe(stop=lambda events: len(events) > 0)
        started = time.monotonic()
        calls = judge(server.url, concurrency=1).ask_all([(i, MESSAGES) for i in range(5)], probe)
    assert time.monotonic() - started < 5
    assert all(c.cancelled for c in calls[1:]) and server.count <= 1


def test_the_key_comes_from_the_environment_and_is_never_in_a_call(monkeypatch) -> None:
    monkeypatch.setenv("AUDITUI_JUDGE_KEY", "sk-secret-123")
    with Scripted([(200, {}, "ok")]) as server:
        call = judge(server.url).ask("k", MESSAGES)
    assert "sk-secret" not in repr(call) and "sk-secret" not in repr(judge(server.url).config.describe())


@pytest.mark.parametrize(("config", "message"), [
    (JudgeConfig("localhost:8000", "m"), "http"), (JudgeConfig("http://x", " "), "judge model"),
    (JudgeConfig("http://x", "m", concurrency=0), "concurrency"),
])
def test_bad_settings_are_one_line(config: JudgeConfig, message: str) -> None:
    with pytest.raises(AuditError, match=message):
        Judge(config)


def test_a_judge_that_is_down_is_not_asked_about_every_text() -> None:
    from auditui.judge.client import BROKEN_AFTER

    with Scripted([(200, {}, "ok")]) as server:
        url = server.url
    started = time.monotonic()
    calls = judge(url, concurrency=1, retries=1).ask_all([(i, MESSAGES) for i in range(50)])
    assert time.monotonic() - started < 10
    assert all(c.raw is None for c in calls) and sum(c.sent for c in calls) == BROKEN_AFTER
    assert "not sent" in calls[-1].error


def test_the_openai_key_goes_only_to_openai_and_urls_are_recorded_without_secrets(monkeypatch) -> None:
    from auditui.judge.client import api_key, public_url

    monkeypatch.delenv("AUDITUI_JUDGE_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai")
    assert api_key("https://api.openai.com/v1") == "sk-openai"
    assert api_key("http://evil.example.com/v1") == "no-key" and api_key("http://127.0.0.1:8765/v1") == "no-key"
    monkeypatch.setenv("AUDITUI_JUDGE_KEY", "sk-mine")
    assert api_key("http://127.0.0.1:8765/v1") == "sk-mine"
    assert public_url("https://user:pw@host.example:8443/v1?key=sk-x#f") == "https://host.example:8443/v1"
    assert JudgeConfig("http://u:p@h/v1?k=1", "m").describe()["base_url"] == "http://h/v1"


def test_a_retry_after_of_hours_is_cut_and_a_stop_during_the_wait_is_a_cancel() -> None:
    with Scripted([(429, {"retry-after": "36000"}, "later")]) as server:
        probe = Probe(stop=lambda events: time.monotonic() - started > 0.5)
        started = time.monotonic()
        call = judge(server.url).ask("k", MESSAGES, probe)
    assert call.cancelled and time.monotonic() - started < 5

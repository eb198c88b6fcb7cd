"""Calls to any OpenAI-compatible chat endpoint through the `openai` client, one text per call.

    judge = Judge(JudgeConfig(base_url, model, concurrency=8))
    calls = judge.ask_all([(key, messages), ...], progress)   # same order, one Call each

Temperature 0. The client's own retries are off so that every attempt is ours to count: 429, 5xx,
timeouts and dropped connections are retried with exponential backoff (doubling from `backoff`,
capped), waiting at least what a Retry-After / retry-after-ms header asks; other errors (400, 401,
404) are not retried; a Retry-After longer than MAX_RETRY_AFTER is cut to it. At most `concurrency`
calls are in flight; an interrupt (Ctrl-C) sends nothing more. The API key is read from the
environment when the Judge is made (`api_key`: OPENAI_API_KEY only for OpenAI's hosts) and is never
stored, logged or exported: a Call holds no part of the request, and the URL is recorded without
user, password or query (`public_url`).
"""

from __future__ import annotations

import email.utils
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from auditui.errors import AuditError
from auditui.progress import QUIET, Progress

MAX_RETRY_AFTER = 120.0  # s: a server may not make us wait longer per retry
BROKEN_AFTER = 3  # calls in a row without an answer: the judge is down, stop sending
NOT_SENT = "not sent"
MAX_CONCURRENCY = 64


@dataclass(frozen=True)
class JudgeConfig:
    base_url: str
    model: str
    concurrency: int = 4
    timeout: float = 60.0  # s per attempt
    retries: int = 4  # attempts after the first
    backoff: float = 0.5  # s before the first retry, doubled each time
    max_backoff: float = 30.0
    max_tokens: int = 256

    def validate(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise AuditError(f"the judge URL must start with http:// or https:// (got {self.base_url!r}); "
                             "set --judge-url or judge_base_url in the config")
        if not self.model.strip():
            raise AuditError("name the judge model (--judge-model or judge_model in the config)")
        if not 1 <= self.concurrency <= MAX_CONCURRENCY:
            raise AuditError(f"judge concurrency must be 1..{MAX_CONCURRENCY} (got {self.concurrency})")
        if not (self.timeout > 0 and self.backoff >= 0 and self.retries >= 0 and self.max_tokens >= 1):
            raise AuditError("judge timeout and max tokens must be positive, retries and backoff not negative")

    def describe(self) -> dict:
        """What graded (for runs and reports): never the key."""
        return {"base_url": public_url(self.base_url), "model": self.model, "temperature": 0,
                "max_tokens": self.max_tokens}


@dataclass(frozen=True)
class Call:
    key: Any  # the caller's id of the text
    raw: str | None  # the answer's text; None when no answer came
    error: str | None  # the last error, when no answer came
    request_id: str | None
    latency: float  # s, all attempts and waits
    attempts: int

    @property
    def cancelled(self) -> bool:
        return self.error == "cancelled"

    @property
    def sent(self) -> bool:
        return self.attempts > 0


def api_key(base_url: str) -> str:
    """AUDITUI_JUDGE_KEY for any judge; OPENAI_API_KEY only for OpenAI's own hosts (it is never sent to
    another endpoint); a placeholder otherwise (local servers need none)."""
    host = urlsplit(base_url).hostname or ""
    if os.environ.get("AUDITUI_JUDGE_KEY"):
        return os.environ["AUDITUI_JUDGE_KEY"]
    if os.environ.get("OPENAI_API_KEY") and (host == "openai.com" or host.endswith(".openai.com")):
        return os.environ["OPENAI_API_KEY"]
    return "no-key"


def public_url(base_url: str) -> str:
    """The URL without user, password, query or fragment (what runs, reports and call records show)."""
    parts = urlsplit(base_url)
    netloc = parts.hostname or ""
    return urlunsplit((parts.scheme, netloc + (f":{parts.port}" if parts.port else ""), parts.path, "", ""))


def _retry_after(exc: Exception) -> float | None:
    """Seconds a 429/503 asks us to wait (retry-after-ms, retry-after as seconds or an HTTP date)."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None) or {}
    if headers.get("retry-after-ms"):
        try:
            return float(headers["retry-after-ms"]) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        when = email.utils.parsedate_to_datetime(value) if email.utils.parsedate_tz(value) else None
        return None if when is None else max(0.0, when.timestamp() - time.time())


class Judge:
    def __init__(self, config: JudgeConfig):
        config.validate()
        import openai  # deferred: only judging needs it

        self.config, self._errors = config, openai
        self._retryable = (openai.RateLimitError, openai.InternalServerError, openai.APITimeoutError,
                           openai.APIConnectionError)
        self._client = openai.OpenAI(base_url=config.base_url, api_key=api_key(config.base_url), max_retries=0,
                                     timeout=config.timeout)

    def close(self) -> None:
        self._client.close()

    def _wait(self, seconds: float, progress: Progress) -> bool:
        """Sleep in short slices; False when a stop was asked meanwhile."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if progress.should_stop():
                return False
            time.sleep(min(0.05, max(0.0, end - time.monotonic())))
        return True

    def ask(self, key: Any, messages: list[dict[str, str]], progress: Progress = QUIET) -> Call:
        start, error, attempts = time.monotonic(), "cancelled", 0
        for attempt in range(self.config.retries + 1):
            if progress.should_stop():
                return Call(key, None, "cancelled", None, time.monotonic() - start, attempts)
            attempts = attempt + 1
            try:
                raw = self._client.chat.completions.with_raw_response.create(
                    model=self.config.model, messages=messages, temperature=0, max_tokens=self.config.max_tokens)
                answer = raw.parse()
                text = answer.choices[0].message.content if answer.choices else None
                request_id = raw.headers.get("x-request-id") or getattr(answer, "id", None)
                if text is None:
                    return Call(key, None, "the answer has no message text", request_id,
                                time.monotonic() - start, attempts)
                return Call(key, text, None, request_id, time.monotonic() - start, attempts)
            except self._retryable as exc:
                error = _describe(exc)
                wait = min(self.config.max_backoff, self.config.backoff * 2 ** attempt)
                asked = min(_retry_after(exc) or 0.0, MAX_RETRY_AFTER)
                if attempt == self.config.retries:
                    break
                if not self._wait(max(wait, asked), progress):
                    return Call(key, None, "cancelled", None, time.monotonic() - start, attempts)
            except self._errors.APIError as exc:
                return Call(key, None, _describe(exc), None, time.monotonic() - start, attempts)
        return Call(key, None, error, None, time.monotonic() - start, attempts)

    def ask_all(self, requests: list[tuple[Any, list[dict[str, str]]]], progress: Progress = QUIET) -> list[Call]:
        """Every request, at most `concurrency` at once, in the given order; progress per answer.

        After BROKEN_AFTER calls in a row got no answer (each after its retries), the judge is taken
        as down: the requests not yet sent are not sent (Call.error says so, attempts 0)."""
        done = failed_in_row = 0
        total = len(requests)
        lock = threading.Lock()

        stopped = threading.Event()  # set when the caller is interrupted (Ctrl-C): nothing more is sent
        watch = _Either(progress, stopped)

        def one(request: tuple[Any, list[dict[str, str]]]) -> Call:
            nonlocal done, failed_in_row
            if failed_in_row >= BROKEN_AFTER:
                return Call(request[0], None, f"{NOT_SENT}: {BROKEN_AFTER} calls in a row got no answer", None, 0.0, 0)
            try:
                call = self.ask(*request, progress=watch)
            except Exception as exc:  # an answer the client cannot read is this text's error, not the batch's
                call = Call(request[0], None, _describe(exc), None, 0.0, 1)
            with lock:
                failed_in_row = failed_in_row + 1 if call.raw is None and not call.cancelled else 0
                done += 1
            progress.progress(done, total, "judge")
            return call

        progress.progress(0, total, "judge")
        pool = ThreadPoolExecutor(max_workers=self.config.concurrency, thread_name_prefix="judge")
        try:
            return list(pool.map(one, requests))
        except BaseException:
            stopped.set()
            raise
        finally:
            pool.shutdown(wait=not stopped.is_set(), cancel_futures=True)


class _Either:
    """A Progress that also stops once `event` is set."""

    def __init__(self, progress: Progress, event: threading.Event):
        self.inner, self.event = progress, event

    def progress(self, done: float, total: float, message: str = "") -> None:
        self.inner.progress(done, total, message)

    def should_stop(self) -> bool:
        return self.event.is_set() or self.inner.should_stop()


def _describe(exc: Exception) -> str:
    status = getattr(exc, "status_code", None)
    text = " ".join(str(exc).split())[:300]
    return f"{type(exc).__name__}" + (f" {status}" if status else "") + (f": {text}" if text else "")

"""Real OpenAI-compatible HTTP servers on loopback for judge tests.

* `katan(tmp, **flags)`: llm-katan's echo backend (answers "[echo] ... User: <last user message>",
  simulated 500 / 429 / 504 / latency), started as a process; `requests(url)` reads its counter.
* `Scripted(responses)`: a stdlib HTTP server answering /v1/chat/completions with a script of
  (status, headers, content), DROP (close the connection without answering) or a function of the
  request's messages returning the answer (a rule-based judge), then the last entry forever; it
  counts requests. Used where an exact answer or header is needed (strict JSON,
  Retry-After), which the echo backend cannot give.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from auditui.judge.local import free_port, katan_args, serving

DROP = "drop"


@contextmanager
def katan(tmp: Path, **flags: object) -> Iterator[str]:
    """Base URL (…/v1) of an llm-katan echo server with the given flags (latency_ms=..., error_rate=...)."""
    port = free_port()
    args = katan_args("echo-judge", "echo-judge", port, backend="echo", stats_file=tmp / f"katan-{port}.json",
                      max_concurrent=16, **flags)
    with serving(args, port, timeout=30) as url:
        yield url


def requests(base_url: str) -> int:
    """Chat requests llm-katan has served (its /metrics counter)."""
    text = urllib.request.urlopen(base_url.removesuffix("/v1") + "/metrics", timeout=5).read().decode()
    return int(re.search(r"llm_katan_requests_total\{[^}]*\} (\d+)", text).group(1))


def _completion(content: str) -> bytes:
    return json.dumps({"id": "chatcmpl-scripted", "object": "chat.completion", "created": 0, "model": "scripted",
                       "choices": [{"index": 0, "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": content}}],
                       "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()


class Scripted:
    def __init__(self, script: list):
        self.script, self.count, self.lock = list(script), 0, threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                return None

            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                request = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
                with owner.lock:
                    step = owner.script[min(owner.count, len(owner.script) - 1)]
                    owner.count += 1
                if callable(step):
                    step = (200, {}, step(request["messages"]))
                if step == DROP:
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                status, headers, content = step
                body = _completion(content) if status == 200 else json.dumps({"error": {"message": content}}).encode()
                self.send_response(status)
                for key, value in {"content-type": "application/json", "x-request-id": f"req-{owner.count}",
                                   **headers}.items():
                    self.send_header(key, value)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def __enter__(self) -> Scripted:
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

"""A local OpenAI-compatible judge on loopback: llm-katan (its transformers backend over a local
model directory, or its echo backend for tests and benches), started as a process.

    args = katan_args("/path/to/model", "local-judge", port)     # the command line
    with serving(args, port) as base_url: ...                     # started, healthy, stopped on exit
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from auditui.errors import AuditError

KATAN = Path(sys.executable).with_name("llm-katan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def katan_args(model: str, name: str, port: int, backend: str = "transformers", device: str = "cpu",
               **flags: object) -> list[str]:
    """llm-katan's command line on 127.0.0.1:port; `flags` are its other options (latency_ms=100 ...)."""
    if not KATAN.exists():
        raise AuditError("llm-katan is not installed here: pip install 'auditui[judge]' (scripts/setup.sh does)")
    args = [str(KATAN), "--model", model, "--served-model-name", name, "--backend", backend, "--host", "127.0.0.1",
            "--port", str(port), "--device", device, "--no-quantize", "--disable-dashboard", "--log-level", "WARNING"]
    for key, value in flags.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


@contextmanager
def serving(args: list[str], port: int, timeout: float = 120.0) -> Iterator[str]:
    """Start the server, wait until /health answers, yield its base URL (…/v1); stop it on exit."""
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).read()
                if proc.poll() is None:  # ours answered, not another program on the port
                    break
                raise OSError("the server exited")
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AuditError(f"the judge server did not start on port {port}") from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

"""Judge throughput against a real OpenAI-compatible server on loopback: the same texts judged at
concurrency 1 and at concurrency 8 (goal >= 5x), through the real openai client.

The server is llm-katan's echo backend with a simulated latency per answer (--latency-ms, default
200: a small hosted model's answer time), so the ratio measures how well the client overlaps calls,
not the server's speed. Every answer is parsed with the behaviour rubric (the echo holds the text's
JSON, so all are scored). Interleaved runs (1, 8, 1, 8 ...), medians.

    .venv/bin/python bench/judge.py [--texts 48] [--latency-ms 200] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from timing import interleaved  # noqa: E402

from auditui.judge.client import Judge, JudgeConfig  # noqa: E402
from auditui.judge.local import free_port, katan_args, serving  # noqa: E402
from auditui.judge.parse import parse_answer  # noqa: E402
from auditui.judge.rubrics import load_rubric  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=48)
    parser.add_argument("--latency-ms", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    rubric = load_rubric("behaviour")
    requests = [(i, rubric.messages(f"text {i} " + json.dumps({"behaviour": i % 6, "coherence": 5}), "prompt",
                                    ("a behaviour",))) for i in range(args.texts)]
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp, serving(katan_args(
            "echo", "echo", port, backend="echo", latency_ms=args.latency_ms, max_concurrent=64,
            stats_file=Path(tmp) / "stats.json"), port) as url:
        judges = {c: Judge(JudgeConfig(url, "echo", concurrency=c)) for c in (1, 8)}
        scored: dict[int, int] = {}

        def run(concurrency: int) -> None:
            calls = judges[concurrency].ask_all(requests)
            scored[concurrency] = sum(parse_answer(c.raw or "", rubric).scores is not None for c in calls)

        times = interleaved({"concurrency 1": lambda: run(1), "concurrency 8": lambda: run(8)}, args.repeats)
    one, eight = times["concurrency 1"], times["concurrency 8"]
    print(f"{args.texts} texts, server latency {args.latency_ms} ms, llm-katan echo on loopback")
    print(f"concurrency 1: {one:.2f} s ({args.texts / one:.1f} texts/s), scored {scored[1]}/{args.texts}")
    print(f"concurrency 8: {eight:.2f} s ({args.texts / eight:.1f} texts/s), scored {scored[8]}/{args.texts}")
    print(f"ratio: {one / eight:.2f}x (goal >= 5x)")


if __name__ == "__main__":
    main()

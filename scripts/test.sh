#!/usr/bin/env bash
# Set up (idempotent) and run the default test suite, offline, on the locked dependency set.
# Extra args go to pytest (e.g. -m slow). `--latest` first: a separate venv (.venv-latest) with the
# newest versions that pyproject.toml's ranges admit, so drift shows before users meet it.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--latest" ]; then shift; export VENV=.venv-latest LATEST=1; fi
venv="${VENV:-.venv}"
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
"$venv/bin/lint-imports" --no-logo pyproject.toml >/dev/null || "$venv/bin/lint-imports" --no-logo pyproject.toml
"$venv/bin/ruff" check --quiet auditui tests bench
exec "$venv/bin/python" -m pytest -q "$@"

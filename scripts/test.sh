#!/usr/bin/env bash
# README command 2: set up the venv (with test extras) and run the lint check and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh test
set -euo pipefail
echo "[test] ruff check"
ruff check .
echo "[test] pytest"
python -m pytest -q "$@"

#!/usr/bin/env bash
# README command 2: set up the venv (with test extras) and run the lint check and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh test
set -euo pipefail
# lmms-eval for tests/test_lmms_eval.py (~1-2 min once; not a pip extra: docs/evaluation.md). SOLO_SKIP_LMMS_EVAL=1
# skips it (that test then skips).
[ "${SOLO_SKIP_LMMS_EVAL:-0}" = "1" ] || bash scripts/install_lmms_eval.sh
echo "[test] ruff check"
ruff check .
echo "[test] pytest"
python -m pytest -q "$@"

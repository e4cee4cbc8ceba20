#!/usr/bin/env bash
# Create (or reuse) the project's virtualenv and install megatron-solo into it, building the C++ core.
# Usage: source scripts/setup_env.sh [extras]      e.g. `source scripts/setup_env.sh test`
#   SOLO_VENV=path   venv location (default .venv); SOLO_VENV=none installs into the current python (NGC/Docker).
#   SOLO_MCORE=spec  megatron-core requirement (default: the tested release, megatron-core==0.16.1).
# torch is installed only when none is importable: GPU users bring their own CUDA build (e.g. an NGC container).
set -euo pipefail
_solo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_solo_extras="${1:-}"
_solo_venv="${SOLO_VENV:-$_solo_root/.venv}"
if [ "$_solo_venv" != "none" ]; then
  [ -x "$_solo_venv/bin/python" ] || python3 -m venv "$_solo_venv"
  # shellcheck disable=SC1091
  source "$_solo_venv/bin/activate"
fi
if ! python -c "import torch" 2>/dev/null; then
  echo "[setup] no torch importable: installing the CPU build torch==2.13.0"
  python -m pip install -q torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
fi
python -m pip install -q "${SOLO_MCORE:-megatron-core==0.16.1}" 2>&1 | grep -v "^WARNING: Location" || true
_spec="."
[ -n "$_solo_extras" ] && _spec=".[$_solo_extras]"
echo "[setup] pip install -e $_spec (builds megatron_solo._C)"
(cd "$_solo_root" && python -m pip install -q -e "$_spec" 2>&1 | grep -v "^WARNING: Location" || true)
python -W ignore -c "import megatron_solo._C, megatron.core, torch; print(f'[setup] ready: torch {torch.__version__}, megatron-core {megatron.core.__version__}')"
set +euo pipefail

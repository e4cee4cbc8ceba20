#!/usr/bin/env bash
# Create (or reuse) the project's virtualenv and install megatron-solo into it, building the C++ core.
# Usage: source scripts/setup_env.sh [extras]      e.g. `source scripts/setup_env.sh test`
#   SOLO_VENV=path   venv location (default .venv); SOLO_VENV=none installs into the current python (NGC/Docker).
#   SOLO_MCORE=spec  megatron-core requirement (default: the tested release, megatron-core==0.16.1).
#   SOLO_REINSTALL=1 reinstall even when nothing changed.
# torch is installed only when none is importable: GPU users bring their own CUDA build (e.g. an NGC container).
# A second run does not repeat work: the editable install is skipped while setup.py / pyproject.toml / the extras /
# the python are what they were at the last install (a stamp in build/), and megatron_solo._C is rebuilt only when
# a csrc/ file is newer than it.
set -euo pipefail
_solo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_solo_extras="${1:-}"
_solo_venv="${SOLO_VENV:-$_solo_root/.venv}"
_solo_mcore="${SOLO_MCORE:-megatron-core==0.16.1}"
_solo_quiet() { grep -v "^WARNING: Location" || true; }
if [ "$_solo_venv" != "none" ]; then
  if [ ! -x "$_solo_venv/bin/python" ]; then
    echo "[setup] creating the virtualenv $_solo_venv"
    python3 -m venv "$_solo_venv"
  fi
  # shellcheck disable=SC1091
  source "$_solo_venv/bin/activate"
fi
if ! python -c "import torch" 2>/dev/null; then
  echo "[setup] no torch importable: installing the CPU build torch==2.13.0"
  python -m pip install -q torch==2.13.0 2>&1 | _solo_quiet
fi
_have_mcore="$(python -c "import importlib.metadata as m; print(m.version('megatron-core'))" 2>/dev/null || true)"
if [ "$_solo_mcore" = "megatron-core==$_have_mcore" ]; then
  echo "[setup] $_solo_mcore already installed"
else
  echo "[setup] pip install $_solo_mcore"
  python -m pip install -q "$_solo_mcore" 2>&1 | _solo_quiet
fi
_spec="."
[ -n "$_solo_extras" ] && _spec=".[$_solo_extras]"
# What an editable install depends on: the packaging files and the interpreter (the extras are checked below).
_stamp_key="$(cd "$_solo_root" && { cat setup.py pyproject.toml; python -c "import sys; print(sys.executable)"; } | sha256sum | cut -c1-16)"
_stamp="$_solo_root/build/setup-$_stamp_key.stamp"
# "yes" when this python has megatron-solo installed editable from THIS tree and every requirement of the asked-for
# extras is installed (so `demo` after `test` installs nothing).
_installed_here="$(python - "$_solo_root" "$_solo_extras" <<'PY' 2>/dev/null || true
import importlib.metadata as m, json, sys
from packaging.requirements import Requirement
root, extras = sys.argv[1], [e for e in sys.argv[2].split(",") if e]
dists = [d for d in m.distributions(name="megatron-solo") if d.read_text("direct_url.json")]  # not the egg-info
url = json.loads(dists[0].read_text("direct_url.json")) if dists else {}
ok = bool(url.get("dir_info", {}).get("editable")) and url.get("url") == "file://" + root
for line in dists[0].requires or [] if ok else []:
    req = Requirement(line)
    if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras or [""]):
        try:
            ok = ok and req.specifier.contains(m.version(req.name), prereleases=True)
        except m.PackageNotFoundError:
            ok = False
print("yes" if ok else "no")
PY
)"
if [ -z "${SOLO_REINSTALL:-}" ] && [ -f "$_stamp" ] && [ "$_installed_here" = "yes" ]; then
  echo "[setup] megatron-solo $_spec already installed (editable, setup.py unchanged): skipping pip install -e"
  _so="$(ls "$_solo_root"/megatron_solo/_C.*.so 2>/dev/null | head -n 1 || true)"
  if [ -z "$_so" ] || [ -n "$(find "$_solo_root/csrc" "$_solo_root/setup.py" -newer "$_so" -print -quit)" ]; then
    echo "[setup] csrc/ changed since megatron_solo._C was built: rebuilding it (setup.py build_ext --inplace, ~1.5 min)"
    (cd "$_solo_root" && python setup.py -q build_ext --inplace 2>&1 | grep -v "^WARNING\|warning: \|^running\|^copying" || true)
  else
    echo "[setup] megatron_solo._C is up to date with csrc/"
  fi
else
  echo "[setup] pip install -e $_spec (builds megatron_solo._C: ~1.5 min on 2 cores)"
  (cd "$_solo_root" && python -m pip install -q -e "$_spec" 2>&1 | _solo_quiet)
  mkdir -p "$_solo_root/build" && rm -f "$_solo_root"/build/setup-*.stamp && touch "$_stamp"
fi
python -W ignore -c "import megatron_solo._C, megatron.core, torch; print(f'[setup] ready: torch {torch.__version__}, megatron-core {megatron.core.__version__}')"
set +euo pipefail

#!/usr/bin/env bash
# Install lmms-eval (the benchmark harness megatron_solo's `--model solo` adapter plugs into) into the current
# python without breaking it. A plain `pip install lmms-eval` (0.7.3) cannot be used here, nor as a setup.py extra:
#   - it pulls torchvision from PyPI, a CUDA build: next to a CPU torch its ops fail to load and transformers'
#     AutoProcessor import breaks;
#   - it pins wandb==0.25.0, which pins protobuf<7: the downgrade breaks sentencepiece's generated
#     sentencepiece_model_pb2 (our tokenizer extension);
#   - lmms-eval 0.7.3 patches filelock._api, which filelock>=4 no longer has.
# So: lmms-eval without its dependencies, then its declared base requirements minus torchvision (kept when torch is
# a CUDA build: the user's matched torchvision) and wandb (only for --wandb_args), with the installed torch and
# protobuf pinned and filelock<4. Idempotent; SOLO_LMMS_EVAL_SPEC overrides the version (default lmms-eval==0.7.3).
set -euo pipefail
spec="${SOLO_LMMS_EVAL_SPEC:-lmms-eval==0.7.3}"
if python -c "import lmms_eval.evaluator" 2>/dev/null; then
  echo "[lmms-eval] already installed: $(python -c 'import importlib.metadata as m; print(m.version("lmms-eval"))')"
  exit 0
fi
quiet() { grep -v "^WARNING: Location\|dependency resolver\|^lmms-eval .* requires\|^timm .* requires" || true; }
echo "[lmms-eval] installing $spec (dependencies filtered, torch/protobuf pinned)"
python -m pip install -q --no-deps "$spec" 2>&1 | quiet
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python - "$tmp" <<'EOF'
import importlib.metadata as md
import sys
from pathlib import Path

import torch
from packaging.requirements import Requirement

out = Path(sys.argv[1])
drop = {"wandb"} | ({"torchvision"} if torch.version.cuda is None else set())
reqs = []
for line in md.requires("lmms-eval") or []:
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue  # an extra's requirement
    if req.name.lower().replace("_", "-") not in drop:
        reqs.append(str(req))
(out / "requirements.txt").write_text("\n".join(reqs) + "\n")
pins = [f"torch=={torch.__version__}", f"protobuf=={md.version('protobuf')}", "filelock<4"]
(out / "constraints.txt").write_text("\n".join(pins) + "\n")
print(f"[lmms-eval] {len(reqs)} requirements (without {', '.join(sorted(drop))}); pinned: {', '.join(pins)}")
EOF
python -m pip install -q -r "$tmp/requirements.txt" -c "$tmp/constraints.txt" 2>&1 | quiet
# Requirements of those requirements (timm) bring torchvision back; on a CPU torch a PyPI (CUDA) build cannot load.
if python -c "import torch, sys; sys.exit(torch.version.cuda is not None)" && ! python -c "import torchvision" 2>/dev/null; then
  echo "[lmms-eval] removing torchvision: the PyPI (CUDA) build does not load next to a CPU torch"
  python -m pip uninstall -q -y torchvision
fi
python -c "import lmms_eval.evaluator, transformers, torch; from transformers import AutoProcessor; print('[lmms-eval] ready: torch', torch.__version__)"

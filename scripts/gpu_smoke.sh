#!/usr/bin/env bash
# One-GPU smoke test (CI has no GPU; run this on a GPU box after setup): demo shards -> 40 bf16 steps on 1 GPU with
# checkpoints -> resume from step 20 and compare losses with the uninterrupted run -> caption on cuda from the
# checkpoint. Prints "[gpu-smoke] OK" at the end.   Usage: bash scripts/gpu_smoke.sh   (OUT=dir to choose the output)
# CPU dry run of the same steps: SMOKE_DTYPE=--fp32 SMOKE_DEVICE=cpu SMOKE_GEN_DTYPE=fp32 bash scripts/gpu_smoke.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu_smoke}"
rm -rf "$OUT" && mkdir -p "$OUT"
python -X faulthandler -m tools.preprocess demo --out "$OUT/data" --seq-length 1024 --quiet
run() {
  torchrun --standalone --nproc_per_node 1 pretrain_solo.py --model tiny "${SMOKE_DTYPE:---bf16}" \
    --data-path "$OUT/data/train" --valid-data-path "$OUT/data/valid" --tokenizer-model "$OUT/data/tokenizer.model" \
    --micro-batch-size 2 --global-batch-size 8 --train-iters 40 --lr 2e-3 --min-lr 2e-4 --lr-warmup-iters 5 \
    --log-interval 10 --eval-interval 20 --eval-iters 2 --seed 1234 --save-interval 20 "$@"
}
run --save "$OUT/a" --metrics-log "$OUT/a.jsonl"
cp -r "$OUT/a" "$OUT/b" && rm -rf "$OUT/b/iter_0000040" && echo 20 > "$OUT/b/latest_checkpointed_iteration.txt"
run --load "$OUT/b" --save "$OUT/b" --metrics-log "$OUT/b.jsonl"
python - "$OUT" <<'PY'
import json, sys
def losses(p):
    return {r["iteration"]: r["loss"] for r in map(json.loads, open(p)) if r["kind"] == "train"}
a, b = losses(f"{sys.argv[1]}/a.jsonl"), losses(f"{sys.argv[1]}/b.jsonl")
same = [i for i in b if i > 20 and a.get(i) == b[i]]
print(f"[gpu-smoke] loss {a[min(a)]:.4f} -> {a[max(a)]:.4f}; resumed steps equal to the uninterrupted run: "
      f"{len(same)}/{len([i for i in b if i > 20])}")
assert a[max(a)] < a[min(a)] - 1.0 and len(same) == len([i for i in b if i > 20]) > 0
PY
img=$(python -c "import matplotlib.cbook as c; print(c.get_sample_data('grace_hopper.jpg', asfileobj=False))")
python -m megatron_solo.generate --checkpoint "$OUT/a" --image "$img" --prompt "Describe the image." \
  --device "${SMOKE_DEVICE:-cuda}" --dtype "${SMOKE_GEN_DTYPE:-bf16}" --max-new-tokens 16
echo "[gpu-smoke] OK"

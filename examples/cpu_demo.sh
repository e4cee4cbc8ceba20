#!/usr/bin/env bash
# The CPU demo (README command 1 runs it via scripts/demo.sh): build the bundled demo shards, then pre-train a tiny
# SOLO model with TP=2 x DP=2 and the distributed optimizer on 4 CPU processes (gloo); print the first and last
# loss and save a checkpoint that export_hf / generate can read.
#
#   bash examples/cpu_demo.sh                 # ~3-4 min on 2 cores
#   ITERS=100 bash examples/cpu_demo.sh       # shorter
#   OUT=/somewhere bash examples/cpu_demo.sh  # output dir (default runs/cpu_demo)
#
# Everything else is a plain pretrain_solo.py flag (Megatron-LM names), appended: bash examples/cpu_demo.sh --lr 1e-3
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/cpu_demo}"
ITERS="${ITERS:-300}"
SEQ="${SEQ:-512}"
mkdir -p "$OUT"

if [ ! -f "$OUT/data/valid/manifest.json" ]; then
  echo "[demo] building the demo shards (seq $SEQ) in $OUT/data"
  python -m tools.preprocess demo --out "$OUT/data" --seq-length "$SEQ"
fi

export OMP_NUM_THREADS=1 CUDA_VISIBLE_DEVICES="" PYTHONUNBUFFERED=1
rm -f "$OUT/metrics.jsonl"
torchrun --standalone --nproc_per_node 4 pretrain_solo.py \
  --model tiny \
  --tensor-model-parallel-size 2 --use-distributed-optimizer \
  --data-path "$OUT/data/train" --valid-data-path "$OUT/data/valid" \
  --tokenizer-model "$OUT/data/tokenizer.model" \
  --micro-batch-size 1 --global-batch-size 4 --train-iters "$ITERS" \
  --lr 2e-3 --min-lr 2e-4 --lr-warmup-iters 20 --lr-decay-style cosine \
  --weight-decay 0.1 --clip-grad 1.0 --seed 1234 \
  --log-interval 10 --log-throughput --eval-interval 100 --eval-iters 2 \
  --save "$OUT/checkpoints" --save-interval 100 \
  --tensorboard-dir "$OUT/tensorboard" --metrics-log "$OUT/metrics.jsonl" \
  "$@"

echo "[demo] checkpoint: $OUT/checkpoints (export: python -m megatron_solo.convert.export_hf --help)"
echo "[demo] metrics: $OUT/metrics.jsonl, TensorBoard: tensorboard --logdir $OUT/tensorboard"

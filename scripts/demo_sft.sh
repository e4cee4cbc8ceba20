#!/usr/bin/env bash
# The SFT demo (README tour): instruction-tune the CPU demo's pre-trained tiny SOLO model on generated questions
# and answers about the demo's shape pictures, then score it on held-out pictures and phrasings. Prints accuracy
# before SFT, after SFT and the chance level per question kind. ~5 min on 2 CPU cores (+3-4 min if the
# pre-training checkpoint has to be made first: scripts/demo.sh's, reused when present).
#
#   bash scripts/demo_sft.sh
#   ITERS=150 bash scripts/demo_sft.sh      # shorter (lower accuracy)
#
# Steps (each a user-facing command; docs/sft.md walks through them):
#   1. python -m megatron_solo.preprocess.demo_sft write   LLaVA-format conversations (1-3 turns) + VQA task files
#   2. python -m tools.preprocess build --source llava:...,template=mistral,loss-on=assistant   SFT shards
#   3. python -m megatron_solo.evaluate (before)            the pre-trained model, same template and tasks
#   4. torchrun pretrain_solo.py --pretrained-checkpoint ... --eval-tasks ...   SFT, held-out score every 100 steps
#   5. python -m megatron_solo.evaluate (after) + demo_sft report
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/setup_env.sh
source scripts/setup_env.sh demo
set -euo pipefail
OUT="${OUT:-runs/sft_demo}"
PRETRAINED="${PRETRAINED:-runs/cpu_demo/checkpoints}"
TRAIN="${TRAIN:-4000}"  # conversations
EVAL="${EVAL:-100}"     # held-out pictures (each asked about every attribute)
ITERS="${ITERS:-450}"
GBS="${GBS:-8}"
export OMP_NUM_THREADS=1 CUDA_VISIBLE_DEVICES="" PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
t0=$(date +%s)

if [ ! -f "$PRETRAINED/latest_checkpointed_iteration.txt" ]; then
  echo "[sft-demo] no pre-training checkpoint at $PRETRAINED: making it (examples/cpu_demo.sh)"
  OUT="$(dirname "$PRETRAINED")" bash examples/cpu_demo.sh --log-interval 50
fi
TOKENIZER="$PRETRAINED/tokenizer.model"
mkdir -p "$OUT"

DATA="$OUT/data-$TRAIN-$EVAL"  # generated deterministically: reused by a second run with the same sizes
SHARDS="$DATA/shards"
if [ ! -f "$SHARDS/manifest.json" ]; then
  echo "[sft-demo] 1-2. $TRAIN training conversations, $EVAL held-out pictures; SFT shards (mistral, assistant-only loss)"
  python -m megatron_solo.preprocess.demo_sft write --out "$DATA" --train "$TRAIN" --eval "$EVAL"
  python -m tools.preprocess build \
    --source "llava:$DATA/train/llava.json,image-root=$DATA/train,template=mistral,loss-on=assistant" \
    --tokenizer "$TOKENIZER" --out "$SHARDS" --seq-length 512 --workers 2 --quiet
else
  echo "[sft-demo] 1-2. reusing the generated conversations and SFT shards in $DATA"
fi

E="$DATA/eval"
TASKS=(--task "colour=vqa:$E/colour.jsonl" --task "shape=vqa:$E/shape.jsonl" --task "size=vqa:$E/size.jsonl"
       --task "background=vqa:$E/background.jsonl")
evaluate() {  # checkpoint, out dir
  OMP_NUM_THREADS=2 python -m megatron_solo.evaluate --checkpoint "$1" --template mistral "${TASKS[@]}" \
    --out-dir "$2" --max-new-tokens 8 --batch-size 32 --no-progress > "$2.log" 2>&1 || { cat "$2.log"; exit 1; }
}
echo "[sft-demo] 3. held-out accuracy of the pre-trained model"
evaluate "$PRETRAINED" "$OUT/before"

echo "[sft-demo] 4. SFT: $ITERS iterations x GBS $GBS from $PRETRAINED (fresh optimizer and schedule)"
rm -rf "$OUT/checkpoints" "$OUT/metrics.jsonl"
torchrun --standalone --nproc_per_node 2 pretrain_solo.py \
  --pretrained-checkpoint "$PRETRAINED" --data-path "$SHARDS" --use-distributed-optimizer \
  --micro-batch-size 1 --global-batch-size "$GBS" --train-iters "$ITERS" \
  --lr 1e-3 --min-lr 1e-4 --lr-warmup-iters 10 --lr-decay-style cosine --weight-decay 0.1 --clip-grad 1.0 \
  --eval-tasks "heldout=vqa:$E/heldout.jsonl" --eval-tasks-interval 100 --eval-tasks-max-new-tokens 8 \
  --log-interval 50 --save "$OUT/checkpoints" --metrics-log "$OUT/metrics.jsonl" \
  --tensorboard-dir "$OUT/tensorboard" "$@" 2>&1 | grep --line-buffered -v -i "warn"

echo "[sft-demo] 5. held-out accuracy after SFT (pictures and phrasings never trained on)"
evaluate "$OUT/checkpoints" "$OUT/after"
python -m megatron_solo.preprocess.demo_sft report --before "$OUT/before/scores.json" --after "$OUT/after/scores.json"
echo "[sft-demo] predictions: $OUT/after/*.jsonl; SFT checkpoint: $OUT/checkpoints (chat template recorded);"
echo "[sft-demo] chat with it: python -m megatron_solo.generate --checkpoint $OUT/checkpoints --chat; $(( $(date +%s) - t0 )) s"

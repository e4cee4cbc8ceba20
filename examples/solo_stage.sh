#!/usr/bin/env bash
# The SOLO-7B pre-training recipe (SOLO paper, section 3.2; /work facts in docs/training.md) for ONE stage on one
# 8-GPU node: TP=2 x DP=4, distributed optimizer, bf16, full activation recompute (uniform, 4 layers per group),
# GBS 128 x seq 32768 (4M tokens), MBS 1 (32 micro-batches of accumulation per DP rank), Adam (0.9, 0.999, 1e-8),
# lr 5e-5 cosine to 5e-6 with 200 warm-up steps, weight decay 0.1, grad clip 1.0.
#
# Called by stage{1,2,3}_8gpu.sh. Environment:
#   STAGE         1 | 2 | 3 (sets the iterations: 1525 / 3480 / 300)
#   INIT          checkpoint to start from, weights only (fresh optimizer + schedule, as SOLO chained stages):
#                 stage 1: the HF Mistral import (python -m megatron_solo.convert.import_hf ... --tp 2),
#                 stage 2/3: the previous stage's --save dir
#   DATA          Megatron-style blend "w1 path1 w2 path2 ..." of shard-set dirs (tools/preprocess build)
#   VALID         held-out shard set(s) (optional)
#   SAVE          where this stage writes checkpoints (resumes from it automatically if it holds one)
#   VISION_FRACTION  optional: target share of vision tokens instead of explicit weights (stage 1: 0.33, 2: 0.54,
#                 3: 0.38 in the paper's Table 1)
#   NNODES / NODE_RANK / MASTER_ADDR / MASTER_PORT   multi-node torchrun; default one node
#   SOLO_LAUNCH=srun  one process per srun task, no torchrun (multinode_slurm.sbatch): rank from SLURM_PROCID
# Extra arguments are appended to pretrain_solo.py's flags (e.g. --train-iters 10 for a smoke test).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${STAGE:?set STAGE=1|2|3}" "${INIT:?set INIT=<checkpoint to start from>}" "${DATA:?set DATA='w1 p1 w2 p2 ...'}"
: "${SAVE:?set SAVE=<checkpoint dir of this stage>}"
case "$STAGE" in
  1) ITERS=1525 ;;
  2) ITERS=3480 ;;
  3) ITERS=300 ;;
  *) echo "STAGE must be 1, 2 or 3" >&2; exit 2 ;;
esac
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
NNODES="${NNODES:-1}"

# shellcheck disable=SC2206
ARGS=(
  --model solo-7b
  --tensor-model-parallel-size 2 --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather --bf16
  --recompute-granularity full --recompute-method uniform --recompute-num-layers 4
  --micro-batch-size 1 --global-batch-size 128 --seq-length 32768 --train-iters "$ITERS"
  --lr 5e-5 --min-lr 5e-6 --lr-decay-style cosine --lr-warmup-iters 200
  --adam-beta1 0.9 --adam-beta2 0.999 --adam-eps 1e-8 --weight-decay 0.1 --clip-grad 1.0
  --data-path $DATA
  --pretrained-checkpoint "$INIT" --load "$SAVE" --save "$SAVE" --save-interval 100
  --log-interval 1 --log-throughput --tensorboard-dir "$SAVE/tensorboard" --metrics-log "$SAVE/metrics.jsonl"
  --exit-signal-handler
  --seed 1234
)
if [ -n "${VALID:-}" ]; then
  # shellcheck disable=SC2206
  ARGS+=(--valid-data-path $VALID --eval-interval 100 --eval-iters 4)
fi
if [ -n "${VISION_FRACTION:-}" ]; then
  ARGS+=(--vision-fraction "$VISION_FRACTION")
fi

export CUDA_DEVICE_MAX_CONNECTIONS=1
if [ "${SOLO_LAUNCH:-}" = "srun" ]; then
  export RANK="${SLURM_PROCID:?}" WORLD_SIZE="${SLURM_NTASKS:?}" LOCAL_RANK="${SLURM_LOCALID:?}"
  export MASTER_ADDR="${MASTER_ADDR:?}" MASTER_PORT="${MASTER_PORT:-29500}"
  exec python pretrain_solo.py "${ARGS[@]}" "$@"
elif [ "$NNODES" -gt 1 ]; then
  LAUNCH=(torchrun --nnodes "$NNODES" --node-rank "${NODE_RANK:?}" --nproc-per-node "$GPUS_PER_NODE"
          --rdzv-backend c10d --rdzv-endpoint "${MASTER_ADDR:?}:${MASTER_PORT:-29500}" --rdzv-id "solo-stage$STAGE")
else
  LAUNCH=(torchrun --standalone --nproc-per-node "$GPUS_PER_NODE")
fi
exec "${LAUNCH[@]}" pretrain_solo.py "${ARGS[@]}" "$@"

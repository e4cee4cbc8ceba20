#!/usr/bin/env bash
# SOLO-7B instruction tuning (SOLO paper §3.2.2; the released fine-tuning hyper-parameters: global batch 640, lr 1e-5
# with linear warm-up then cosine, weight decay 0.1, one epoch) on the pre-training stack, one 8-GPU node: TP=2 x
# DP=4 with sequence parallelism and the distributed optimizer, bf16. Ours where SOLO gives no number: warm-up 3% of
# the steps, cosine to 0, Adam (0.9, 0.999, 1e-8), grad clip 1.0. Packed with document isolation, loss on assistant
# turns only (the targets stored in the shards); SOLO's own SFT ran unpacked at micro-batch 1 outside Megatron.
# Workflow: docs/sft.md.
#
# Environment:
#   INIT        pre-training checkpoint (stage 3's SAVE): weights only, fresh optimizer and schedule
#   DATA        SFT shard sets "p1 p2 ..." or a weighted blend "w1 p1 w2 p2 ...", each built with
#               `python -m tools.preprocess build --seq-length 4096 --source KIND:PATH,template=mistral,loss-on=assistant`
#               (a mixture change is a new DATA, never a rebuild)
#   SAVE        checkpoint dir of this run; re-running the same command resumes from it
#   EPOCHS      epochs of the mixture (default 1): --train-samples = EPOCHS x the blend's samples per epoch
#   VALID       optional held-out SFT shard set(s): validation loss every EVAL_INTERVAL steps
#   EVAL_TASKS  optional held-out tasks, e.g. "vqa=vqa:/data/vqav2_val2k.jsonl caption=caption:/data/coco_val500.jsonl"
#               (megatron_solo/eval task files): scored every EVAL_INTERVAL steps, next to the loss
#   EVAL_INTERVAL (default 50), EVAL_SAMPLES (items per task, default 500)
#   PRECISION   --bf16 (default) | --fp32
#   TP          tensor-parallel size (default 2); DP = GPUS_PER_NODE x NNODES / TP
#   GBS         global batch in packs (default 640, SOLO's number, which counted unpacked conversations; a
#               4096-token pack holds several: the script prints how many (N), GBS=$((640 / N)) is SOLO's step)
#   NNODES / NODE_RANK / MASTER_ADDR / MASTER_PORT   multi-node (see multinode_slurm.sbatch); default one node
# Extra arguments are appended to pretrain_solo.py's flags (e.g. --train-samples 1280 for a smoke test).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${INIT:?set INIT=<pre-training checkpoint>}" "${DATA:?set DATA='p1 p2 ...' (SFT shard sets)}"
: "${SAVE:?set SAVE=<checkpoint dir of this run>}"
EPOCHS="${EPOCHS:-1}"
GBS="${GBS:-640}"
SEQ="${SEQ:-4096}"
EVAL_INTERVAL="${EVAL_INTERVAL:-50}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
TP="${TP:-2}"
NNODES="${NNODES:-1}"

# "One epoch of this mixture": the blend's samples per epoch (packs; data/blend.py), from the shard sets' files.
# shellcheck disable=SC2086
EPOCH_INFO=$(python - $DATA <<'PY'
import sys
from megatron_solo.data.blend import build_blend
b = build_blend(sys.argv[1:], seed=1234)
docs = sum(s.manifest["counts"]["documents"] * c / n for s, c, n in zip(b.sets, b.epoch_counts, b.set_sizes))
print(len(b), int(docs), f"{docs / max(1, len(b)):.1f}")
PY
)
read -r EPOCH_SAMPLES EPOCH_DOCS DOCS_PER_PACK <<< "$EPOCH_INFO"
TRAIN_SAMPLES=$(( EPOCH_SAMPLES * EPOCHS ))
echo "[sft] one epoch of the mixture = ${EPOCH_SAMPLES} packs (~${EPOCH_DOCS} conversations, ${DOCS_PER_PACK} per" \
     "pack); --train-samples ${TRAIN_SAMPLES} = ${EPOCHS} epoch(s) at GBS ${GBS}: $(( TRAIN_SAMPLES / GBS )) steps" \
     "(Megatron-LM floors: the last $(( TRAIN_SAMPLES % GBS )) packs are not reached)"

MODEL_ARGS=("${PRECISION:---bf16}")  # the architecture is INIT's (solo_config.json)
PARALLEL_ARGS=(
  --tensor-model-parallel-size "$TP" --sequence-parallel
  --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather
)
# shellcheck disable=SC2206
DATA_ARGS=(--data-path $DATA --seq-length "$SEQ")
TRAINING_ARGS=(--micro-batch-size 1 --global-batch-size "$GBS" --train-samples "$TRAIN_SAMPLES" --seed 1234)
OPTIMIZER_ARGS=(
  --lr 1e-5 --min-lr 0 --lr-decay-style cosine --lr-warmup-fraction 0.03
  --adam-beta1 0.9 --adam-beta2 0.999 --adam-eps 1e-8 --weight-decay 0.1 --clip-grad 1.0
)
CHECKPOINT_ARGS=(
  --pretrained-checkpoint "$INIT" --load "$SAVE" --save "$SAVE" --save-interval 100 --exit-signal-handler
)
EVAL_ARGS=()
if [ -n "${VALID:-}" ]; then
  # shellcheck disable=SC2206
  EVAL_ARGS+=(--valid-data-path $VALID --eval-interval "$EVAL_INTERVAL" --eval-iters 4)
fi
for task in ${EVAL_TASKS:-}; do
  EVAL_ARGS+=(--eval-tasks "$task")
done
if [ -n "${EVAL_TASKS:-}" ]; then
  EVAL_ARGS+=(--eval-tasks-interval "$EVAL_INTERVAL" --eval-tasks-samples "${EVAL_SAMPLES:-500}")
fi
LOGGING_ARGS=(
  --log-interval 1 --log-throughput --tensorboard-dir "$SAVE/tensorboard" --metrics-log "$SAVE/metrics.jsonl"
)

export CUDA_DEVICE_MAX_CONNECTIONS=1
if [ "${SOLO_LAUNCH:-}" = "srun" ]; then
  export RANK="${SLURM_PROCID:?}" WORLD_SIZE="${SLURM_NTASKS:?}" LOCAL_RANK="${SLURM_LOCALID:?}"
  export MASTER_ADDR="${MASTER_ADDR:?}" MASTER_PORT="${MASTER_PORT:-29500}"
  LAUNCH=(python)
elif [ "$NNODES" -gt 1 ]; then
  LAUNCH=(torchrun --nnodes "$NNODES" --node-rank "${NODE_RANK:?}" --nproc-per-node "$GPUS_PER_NODE"
          --rdzv-backend c10d --rdzv-endpoint "${MASTER_ADDR:?}:${MASTER_PORT:-29500}" --rdzv-id solo-sft)
else
  LAUNCH=(torchrun --standalone --nproc-per-node "$GPUS_PER_NODE")
fi
exec "${LAUNCH[@]}" pretrain_solo.py "${MODEL_ARGS[@]}" "${PARALLEL_ARGS[@]}" "${DATA_ARGS[@]}" "${TRAINING_ARGS[@]}" \
  "${OPTIMIZER_ARGS[@]}" "${CHECKPOINT_ARGS[@]}" "${EVAL_ARGS[@]}" "${LOGGING_ARGS[@]}" "$@"

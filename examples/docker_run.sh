#!/usr/bin/env bash
# Build the project image from the repo's Dockerfile (NGC PyTorch: CUDA torch, Transformer Engine, Apex) and run a
# command in it with all GPUs, the repo's data/ and ckpt/ dirs mounted.
#
#   bash examples/docker_run.sh                                   # interactive shell
#   bash examples/docker_run.sh bash examples/stage1_8gpu.sh      # SOLO stage 1 on the node's 8 GPUs
#   IMAGE=megatron-solo:dev DATA_DIR=/lustre/solo/data CKPT_DIR=/lustre/solo/ckpt bash examples/docker_run.sh ...
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE="${IMAGE:-megatron-solo:latest}"
DATA_DIR="${DATA_DIR:-$PWD/data}"
CKPT_DIR="${CKPT_DIR:-$PWD/ckpt}"
mkdir -p "$DATA_DIR" "$CKPT_DIR"
if [ -z "${NO_BUILD:-}" ]; then
  docker build -t "$IMAGE" .
fi
TTY=()
[ -t 0 ] && TTY=(-it)
# --ipc=host / ulimits: NCCL and the data loader need shared memory and locked pages (NGC's recommendation).
exec docker run --rm "${TTY[@]}" --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 \
  -v "$DATA_DIR:/opt/megatron-solo/data" -v "$CKPT_DIR:/opt/megatron-solo/ckpt" \
  -e CUDA_DEVICE_MAX_CONNECTIONS=1 \
  "$IMAGE" "${@:-bash}"

#!/usr/bin/env bash
# SOLO-7B Stage 1: ImageNet-21K class names + SlimPajama text (33% vision tokens), 1525 steps, from the HF Mistral-7B import.
# One 8-GPU node, TP=2 x DP=4 (the recipe: examples/solo_stage.sh). Stages chain by weights only (fresh optimizer
# and schedule), as SOLO did; re-running resumes from SAVE. Override INIT / DATA / VALID / SAVE / VISION_FRACTION
# (paths relative to the repo root, or absolute). The default blend is solved for the paper's vision-token share
# (Table 1); VISION_FRACTION= (empty) uses the weights written in DATA ("w1 p1 w2 p2").
set -euo pipefail
STAGE=1 INIT="${INIT:-ckpt/solo-7b-init}" DATA="${DATA:-data/imagenet21k data/slimpajama}" VISION_FRACTION="${VISION_FRACTION-0.33}" SAVE="${SAVE:-ckpt/stage1}" exec bash "$(dirname "$0")/solo_stage.sh" "$@"

#!/usr/bin/env bash
# SOLO-7B Stage 3 (annealing): ALLaVA, LLaVAR, DVQA, FigureQA + SlimPajama (38% vision tokens), 300 steps, from stage 2.
# One 8-GPU node, TP=2 x DP=4 (the recipe: examples/solo_stage.sh). Stages chain by weights only (fresh optimizer
# and schedule), as SOLO did; re-running resumes from SAVE. Override INIT / DATA / VALID / SAVE / VISION_FRACTION
# (paths relative to the repo root, or absolute). The default blend is solved for the paper's vision-token share
# (Table 1); VISION_FRACTION= (empty) uses the weights written in DATA ("w1 p1 w2 p2").
set -euo pipefail
STAGE=3 INIT="${INIT:-ckpt/stage2}" DATA="${DATA:-data/stage3_vision data/slimpajama}" VISION_FRACTION="${VISION_FRACTION-0.38}" SAVE="${SAVE:-ckpt/stage3}" exec bash "$(dirname "$0")/solo_stage.sh" "$@"

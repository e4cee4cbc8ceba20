#!/usr/bin/env bash
# SOLO-7B Stage 2: web-scale captions, Websight, small supervised sets + SlimPajama (54% vision tokens), 3480 steps, from stage 1.
# One 8-GPU node, TP=2 x DP=4 (the recipe: examples/solo_stage.sh). Stages chain by weights only (fresh optimizer
# and schedule), as SOLO did; re-running resumes from SAVE. Override INIT / DATA / VALID / SAVE / VISION_FRACTION
# (paths relative to the repo root, or absolute). The default blend is solved for the paper's vision-token share
# (Table 1); VISION_FRACTION= (empty) uses the weights written in DATA ("w1 p1 w2 p2").
set -euo pipefail
STAGE=2 INIT="${INIT:-ckpt/stage1}" DATA="${DATA:-data/stage2_vision data/slimpajama}" VISION_FRACTION="${VISION_FRACTION-0.54}" SAVE="${SAVE:-ckpt/stage2}" exec bash "$(dirname "$0")/solo_stage.sh" "$@"

#!/usr/bin/env bash
# README command 1: set up the venv, build the bundled demo shards, train a tiny SOLO model TP=2 x DP=2 on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh demo
set -euo pipefail
bash examples/cpu_demo.sh "$@"

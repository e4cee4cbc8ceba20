#!/usr/bin/env bash
# Submit a partitioned shard build to SLURM: an array of N partition tasks and the merge job that waits for all of
# them (examples/preprocess_slurm.sbatch says what each runs).
#
#   bash examples/preprocess_slurm_submit.sh N BUILD_ARGS...          (BUILD_ARGS must include --out OUT)
#   SBATCH_ARGS="--partition=cpu --cpus-per-task=16" bash examples/preprocess_slurm_submit.sh 32 --out ... ...
#   DRY_RUN=1 bash examples/preprocess_slurm_submit.sh ...             # print the two sbatch commands only
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:?usage: $0 N BUILD_ARGS... (with --out OUT)}"
shift
out=""
prev=""
for a in "$@"; do
  [ "$prev" = "--out" ] && out="$a"
  case "$a" in --out=*) out="${a#--out=}" ;; esac
  prev="$a"
done
[ -n "$out" ] || { echo "BUILD_ARGS must include --out OUT (the merged shard set)" >&2; exit 2; }
read -r -a extra <<< "${SBATCH_ARGS:-}"
array=(sbatch --parsable "${extra[@]}" --array="0-$((n - 1))" --export="ALL,PARTITIONS=$n"
       examples/preprocess_slurm.sbatch build "$@")
merge=(sbatch --parsable "${extra[@]}" --cpus-per-task=1 examples/preprocess_slurm.sbatch merge "$out")
if [ "${DRY_RUN:-0}" = "1" ]; then
  printf '%q ' "${array[@]}"; echo
  printf '%q ' "${merge[@]:0:2}" "--dependency=afterok:JOBID" "${merge[@]:2}"; echo
  exit 0
fi
mkdir -p logs
jid="$("${array[@]}")"
jid="${jid%%;*}"
mid="$("${merge[@]:0:2}" --dependency="afterok:$jid" "${merge[@]:2}")"
echo "partition array: job $jid (tasks 0-$((n - 1))); merge: job $mid after all of them succeed -> $out"

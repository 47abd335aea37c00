#!/usr/bin/env bash
# Submit an experiment's best configurations over the paper's seeds as a SLURM array
# (scripts/slurm/reproduce.sbatch), the array sized from `python -m harness.launch <exp> --list`:
# one task per run, or per RUNS_PER_TASK runs sharing one GPU. Behind each folder's slurm.sh.
#
#   bash scripts/slurm/submit.sh nano                               # 80 tasks: 8 optimizers x 10 seeds
#   RUNS_PER_TASK=4 bash scripts/slurm/submit.sh nano               # 20 tasks, 4 runs on each GPU
#   bash scripts/slurm/submit.sh cifar --seeds 0 1 2 --optimizers adam cadam
#   bash scripts/slurm/submit.sh nano --list                        # the runs; submits nothing
#
# Arguments after the experiment go to harness.launch (so --list shows which index is which run).
# sbatch's own options come from its environment variables (SBATCH_PARTITION, SBATCH_TIMELIMIT,
# SBATCH_ACCOUNT, ...); submit from the repository root's clone you want the runs in.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
if [ $# -lt 1 ]; then
  echo "usage: bash scripts/slurm/submit.sh <experiment> [harness.launch arguments]" >&2
  exit 2
fi
. "$ROOT/scripts/python.sh"
for arg in "$@"; do
  [ "$arg" = "--list" ] && exec "$PY" -m harness.launch "$@"
done
exp="$1"
shift
list="$("$PY" -m harness.launch "$exp" "$@" --list)"  # a bad argument stops here, with its one line
runs="$(printf '%s\n' "$list" | grep -c .)"
per="${RUNS_PER_TASK:-1}"
case "$per" in '' | *[!0-9]* | 0) echo "error: RUNS_PER_TASK must be a positive integer, got '$per'" >&2; exit 2 ;; esac
tasks=$(( (runs + per - 1) / per ))
echo "$exp: $runs runs in $tasks array tasks ($per per task)"
RUNS_PER_TASK="$per" exec sbatch --array="0-$((tasks - 1))" scripts/slurm/reproduce.sbatch "$exp" "$@"

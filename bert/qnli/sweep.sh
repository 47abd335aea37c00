#!/usr/bin/env bash
# bert/qnli: the paper's sweep of one optimizer (Optuna TPE over bert/configs/qnli/space.yaml, its
# budget and number of trials), through scripts/sweep.sh; the study and its trials go to
# runs/sweeps/bert-qnli/<optimizer>/.
#
#   bash bert/qnli/sweep.sh <optimizer> [--trials N] [options of python -m harness.sweep run]
#   bash bert/qnli/sweep.sh cadam
#   for i in 0 1 2 3; do CUDA_VISIBLE_DEVICES=$i bash bert/qnli/sweep.sh cadam --worker $i & done; wait
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: bash bert/qnli/sweep.sh <optimizer> [options of python -m harness.sweep run]" >&2
  exit 2
fi
exec bash "$(dirname "${BASH_SOURCE[0]}")/../../scripts/sweep.sh" bert/qnli "$@"

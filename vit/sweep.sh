#!/usr/bin/env bash
# vit: the paper's sweep of one optimizer (Optuna TPE over vit/configs/space.yaml, its
# budget and number of trials), through scripts/sweep.sh; the study and its trials go to
# runs/sweeps/vit/<optimizer>/.
#
#   bash vit/sweep.sh <optimizer> [--trials N] [options of python -m harness.sweep run]
#   bash vit/sweep.sh cadam
#   for i in 0 1 2 3; do CUDA_VISIBLE_DEVICES=$i bash vit/sweep.sh cadam --worker $i & done; wait
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: bash vit/sweep.sh <optimizer> [options of python -m harness.sweep run]" >&2
  exit 2
fi
exec bash "$(dirname "${BASH_SOURCE[0]}")/../scripts/sweep.sh" vit "$@"

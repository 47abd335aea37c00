#!/usr/bin/env bash
# Step-size robustness: scan h (lr for Adam/mSGD) from 0.1x to 10x its tuned value (best.yaml), the
# other hyperparameters tuned, several seeds; one run directory per point under
# runs/robustness/<exp>/<optimizer>/x<multiplier>/seed<S>/ (finished runs are skipped), then
# runs/robustness/<exp>/robustness.png and robustness.md.
#
#   bash scripts/robustness.sh <exp> [--optimizers adam cd ...] [--seeds 1337 1338 1339] [--points 7]
#   bash scripts/robustness.sh nano --optimizers adam msgd cd ikfad cadam --budget paper
#
# Parallel on one machine: one shard per GPU (on CPUs only, --threads cores/shards each), then draw once.
#   for i in 0 1 2 3; do CUDA_VISIBLE_DEVICES=$i bash scripts/robustness.sh nano --shard $i/4 & done; wait
#   bash scripts/robustness.sh nano --plot-only
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/python.sh
if [ $# -lt 1 ]; then
  echo "usage: bash scripts/robustness.sh <exp> [options of python -m harness.robustness]" >&2
  exit 2
fi
exec "$PY" -m harness.robustness "$@"

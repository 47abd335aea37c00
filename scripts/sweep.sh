#!/usr/bin/env bash
# Tune one optimizer on one experiment with Optuna as the release did (TPE, the search space, budget,
# trial seed and objective of <exp>/configs/space.yaml; our TPE is seeded). One trial = one run directory under
# runs/sweeps/<exp>/<optimizer>/trial-<k>/; the study is runs/sweeps/<exp>/<optimizer>/study.db.
#
#   bash scripts/sweep.sh <exp> <optimizer> [--trials N] [more options of python -m harness.sweep]
#   bash scripts/sweep.sh nano cd --trials 80
#   bash scripts/sweep.sh bert/sst2 cadam --pruner median
#   bash scripts/sweep.sh export nano cd --out tuned-cd.yaml      # (or: plot nano cd)
#
# Several workers may run on one study at once (one per GPU; on CPUs only, --threads cores/workers each):
#   for i in 0 1 2 3; do CUDA_VISIBLE_DEVICES=$i bash scripts/sweep.sh nano cd --worker $i & done; wait
# Killing a worker loses nothing: run the same command again.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/python.sh
if [ $# -lt 2 ]; then
  echo "usage: bash scripts/sweep.sh <exp> <optimizer> [--trials N] [options of python -m harness.sweep]" >&2
  exit 2
fi
if N=$("$PY" -m harness.preflight --runs-per-gpu-for "$1" --out "${PREFLIGHT_DIR:-results/preflight}"); then
  echo "this node's preflight report recommends $N $1 runs per GPU: start $N workers per GPU" >&2
fi
exec "$PY" -m harness.sweep "$@"

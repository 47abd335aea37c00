#!/usr/bin/env bash
# The quickstart: on a CPU-only machine with no internet, train the nano GPT with every
# optimizer of the paper at its tuned hyperparameters on a CPU-sized budget, and draw the
# comparison into results/quickstart/ (val_loss.png + results.md). About 10 minutes on 2 cores.
#   bash scripts/quickstart.sh                      # one seed
#   SEEDS="1337 1338" bash scripts/quickstart.sh    # mean and band over seeds
# Extra arguments go to harness.launch (e.g. --optimizers adam cadam, --set train.max_iters=2001).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh
PY="$ROOT/.venv/bin/python"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MPLBACKEND=Agg

"$PY" -m nano.prepare --source packaged --out data/nano-packaged
# shellcheck disable=SC2086
"$PY" -m harness.launch nano --config nano/configs/quickstart.yaml --seeds ${SEEDS:-1337} \
  --optimizers adam msgd cd cd0 ikfad ikfad0 cadam cadam0 \
  --runs-dir runs/quickstart --report results/quickstart "$@"
echo
echo "Done. The comparison: results/quickstart/val_loss.png and results/quickstart/results.md"

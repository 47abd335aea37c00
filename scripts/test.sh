#!/usr/bin/env bash
# The test command: sets up .venv if needed, then runs the (offline, CPU) test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k optimizers -x`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline
export MPLBACKEND=Agg PYTHONHASHSEED=0
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m pytest "$@"

#!/usr/bin/env bash
# Before a cluster run: does every experiment train on this node's device, in the paper's
# precision, with the paper's optimizers, and resume exactly? Does each optimizer's fast step
# equal its reference step here? On GPUs: how many nano runs to pack on one GPU, the full
# protocol's predicted wall time, owt's tokens/s and MFU, DDP on two GPUs against one.
#
#   bash scripts/preflight.sh             # at most ~8 minutes on one GPU
#   bash scripts/preflight.sh --quick     # fewer optimizers and steps: ~3 minutes on 2 CPU cores (CI)
#   bash scripts/preflight.sh --out DIR   # the report elsewhere (default results/preflight/)
#
# Writes results/preflight/<host>-<device>.md and .json; exit status 1 when a check failed.
# Offline: every dataset is generated into a temporary folder.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # run from anywhere: --out DIR is relative to here
. "$ROOT/scripts/python.sh"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 NONLINEAR_DAMPING_OFFLINE=1
export WANDB_MODE=offline TQDM_DISABLE=1 MPLBACKEND=Agg
exec "$PY" -m harness.preflight "$@"

#!/usr/bin/env bash
# Reproduce an experiment at the paper's protocol on this machine:
# every optimizer of its configs/best.yaml x the paper's seeds, one run per visible GPU at a
# time (on a CPU-only machine: one per core), skipping finished runs and resuming
# interrupted ones, then the report (results/<exp>/: figures + results.md).
#
#   bash scripts/reproduce.sh nano
#   bash scripts/reproduce.sh nano --seeds 1337 1338 --optimizers adam cadam --gpus 0,1
#   bash scripts/reproduce.sh nano --runs-per-gpu 4             # small models: several runs share each GPU
#   bash scripts/reproduce.sh bert/sst2 --set train.epochs=1
#
# Arguments after the experiment go to `python -m harness.launch` (see --help).
# Each experiment folder's run_seeds.sh is this with its experiment filled in (nano/run_seeds.sh,
# bert/sst2/run_seeds.sh, ...). The closing report never replaces one built from more runs
# (harness/README.md, "What a tool may write over").
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ $# -lt 1 ]; then
  echo "usage: bash scripts/reproduce.sh <experiment> [--seeds ...] [--optimizers ...] [--gpus 0,1,...]" >&2
  exit 2
fi
. "$ROOT/scripts/python.sh"
# How many runs share a GPU: what this node's preflight report recommends (measured for nano),
# unless --runs-per-gpu is given; PREFLIGHT_DIR: where the reports are (default results/preflight).
if [[ " $* " != *" --runs-per-gpu"* ]]; then
  if N=$("$PY" -m harness.preflight --runs-per-gpu-for "$1" --out "${PREFLIGHT_DIR:-results/preflight}"); then
    echo "--runs-per-gpu $N: this node's preflight report recommends it (pass --runs-per-gpu to override)" >&2
    set -- "$@" --runs-per-gpu "$N"
  elif [ "$1" = nano ]; then
    echo "no preflight report for this node: 'bash scripts/preflight.sh' measures how many nano runs to pack per GPU (--runs-per-gpu N)" >&2
  fi
fi
exec "$PY" -m harness.launch "$@"

#!/usr/bin/env bash
# nano: the best configuration of every optimizer (nano/configs/best.yaml) over the paper's seeds
# (nano/configs/paper.yaml): 80 runs, 8 optimizers x seeds 1337-1346, on the GPUs of this node (one run per
# GPU at a time; on a CPU-only machine one per core), skipping finished runs and resuming
# interrupted ones, then the report (results/nano/).
#
#   bash nano/run_seeds.sh --list                 # the runs: index optimizer seed
#   bash nano/run_seeds.sh
#   bash nano/run_seeds.sh --runs-per-gpu 4     # a small model: 4 runs share each GPU
#   bash nano/run_seeds.sh --seeds 1337 1338 --optimizers adam cadam
#
# Options: those of python -m harness.launch (--gpus, --runs-per-gpu, --seeds, --optimizers,
# --set, --list, ...), through scripts/reproduce.sh.
exec bash "$(dirname "${BASH_SOURCE[0]}")/../scripts/reproduce.sh" nano "$@"

#!/usr/bin/env bash
# vit: the best configuration of every optimizer (vit/configs/best.yaml) over the paper's seeds
# (vit/configs/paper.yaml): 80 runs, 8 optimizers x seeds 0-9, on the GPUs of this node (one run per
# GPU at a time; on a CPU-only machine one per core), skipping finished runs and resuming
# interrupted ones, then the report (results/vit/).
#
#   bash vit/run_seeds.sh --list                 # the runs: index optimizer seed
#   bash vit/run_seeds.sh
#   bash vit/run_seeds.sh --runs-per-gpu 2
#   bash vit/run_seeds.sh --seeds 0 1 --optimizers adam cadam
#
# Options: those of python -m harness.launch (--gpus, --runs-per-gpu, --seeds, --optimizers,
# --set, --list, ...), through scripts/reproduce.sh.
exec bash "$(dirname "${BASH_SOURCE[0]}")/../scripts/reproduce.sh" vit "$@"

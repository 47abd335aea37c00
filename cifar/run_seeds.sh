#!/usr/bin/env bash
# cifar: the best configuration of every optimizer (cifar/configs/best.yaml) over the paper's seeds
# (cifar/configs/paper.yaml): 50 runs, 5 optimizers x seeds 1-10, on the GPUs of this node (one run per
# GPU at a time; on a CPU-only machine one per core), skipping finished runs and resuming
# interrupted ones, then the report (results/cifar/).
#
#   bash cifar/run_seeds.sh --list                 # the runs: index optimizer seed
#   bash cifar/run_seeds.sh
#   bash cifar/run_seeds.sh --runs-per-gpu 2
#   bash cifar/run_seeds.sh --seeds 1 2 --optimizers adam cadam
#
# Options: those of python -m harness.launch (--gpus, --runs-per-gpu, --seeds, --optimizers,
# --set, --list, ...), through scripts/reproduce.sh.
exec bash "$(dirname "${BASH_SOURCE[0]}")/../scripts/reproduce.sh" cifar "$@"

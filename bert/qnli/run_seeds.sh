#!/usr/bin/env bash
# bert/qnli: the best configuration of every optimizer (bert/configs/qnli/best.yaml) over the paper's seeds
# (bert/configs/qnli/paper.yaml): 80 runs, 8 optimizers x seeds 1-10, on the GPUs of this node (one run per
# GPU at a time; on a CPU-only machine one per core), skipping finished runs and resuming
# interrupted ones, then the report (results/bert/qnli/).
#
#   bash bert/qnli/run_seeds.sh --list                 # the runs: index optimizer seed
#   bash bert/qnli/run_seeds.sh
#   bash bert/qnli/run_seeds.sh --gpus 0,1
#   bash bert/qnli/run_seeds.sh --seeds 1 2 --optimizers adam cadam
#
# Options: those of python -m harness.launch (--gpus, --runs-per-gpu, --seeds, --optimizers,
# --set, --list, ...), through scripts/reproduce.sh.
exec bash "$(dirname "${BASH_SOURCE[0]}")/../../scripts/reproduce.sh" bert/qnli "$@"

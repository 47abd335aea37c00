#!/usr/bin/env bash
# gpt2: the best configuration of every optimizer (gpt2/configs/best.yaml) over the paper's seeds
# (gpt2/configs/paper.yaml): 80 runs, 8 optimizers x seeds 1337-1346, on the GPUs of this node (one run per
# GPU at a time; on a CPU-only machine one per core), skipping finished runs and resuming
# interrupted ones, then the report (results/gpt2/).
#
#   bash gpt2/run_seeds.sh --list                 # the runs: index optimizer seed
#   bash gpt2/run_seeds.sh
#   bash gpt2/run_seeds.sh --gpus 0,1,2,3
#   bash gpt2/run_seeds.sh --seeds 1337 1338 --optimizers adam cadam
#
# Options: those of python -m harness.launch (--gpus, --runs-per-gpu, --seeds, --optimizers,
# --set, --list, ...), through scripts/reproduce.sh.
exec bash "$(dirname "${BASH_SOURCE[0]}")/../scripts/reproduce.sh" gpt2 "$@"

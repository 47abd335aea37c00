#!/usr/bin/env bash
# nano on a SLURM cluster: run_seeds.sh's runs as one array job (scripts/slurm/reproduce.sbatch,
# one task per run and GPU; RUNS_PER_TASK=N puts N runs on each task's GPU), the array sized from
# --list; preemption-safe (requeued tasks resume). Through scripts/slurm/submit.sh.
#
#   bash nano/slurm.sh --list                     # the runs, by array index; submits nothing
#   bash nano/slurm.sh                            # sbatch --array=0-79
#   RUNS_PER_TASK=2 bash nano/slurm.sh --seeds 1337 1338
#
# Options: those of python -m harness.launch; sbatch's from its SBATCH_* environment variables.
# A sweep on SLURM: sbatch scripts/slurm/sweep.sbatch nano <optimizer>.
exec bash "$(dirname "${BASH_SOURCE[0]}")/../scripts/slurm/submit.sh" nano "$@"

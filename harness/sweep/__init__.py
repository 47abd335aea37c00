"""Hyperparameter sweeps with Optuna: the paper's tuning protocol, one ordinary run per trial.

    python -m harness.sweep [run] <exp> <optimizer> [--trials N] [--storage URL] [--pruner median] ...
    python -m harness.sweep export <exp> <optimizer> --out FILE [--force]   (or --write-best)
    python -m harness.sweep plot <exp> <optimizer> [--out DIR]

The search space and the sweep budget of an experiment are in
``<exp>/configs/space.yaml``::

    budget: {train.max_iters: 2001}   # config overrides applied to every trial (dotted keys)
    trials: 80                        # finished (complete + pruned) trials the study aims at
    seed: 1337                        # the trials' run seed (default the first paper seed)
    seed_per_trial: true              # trial k runs seed + k (default false: all run seed)
    objective: best                   # best | final | best_epoch_end validation loss
    optimizers:
      cd: {h: [1.0e-4, 0.5, log], gamma: [1.0e-6, 10, uniform], c: [0.1, 1.0e6, log]}

A trial samples the hyperparameters with the (seeded) TPE sampler and runs
``python -m <exp>.train --optimizer NAME --seed S --set optimizer.<hp>=<value> ...
--out runs/sweeps/<exp>/<optimizer>/trial-<k>`` as a subprocess (a crash or a
NaN in a trial never takes the worker down, and every trial starts from fresh
torch state). Its objective, minimised, is the validation loss the space's
``objective`` picks from the run's records (``objective.objective_record``): the
best one, the last one, or the best at an epoch's end. A run that diverged (or
that has no finite loss for the objective) is *pruned*. Every trial runs the
space's ``seed`` (``--seed`` overrides it), or ``seed + k`` for trial k with
``seed_per_trial``, as the release's sweeps did per experiment; it is recorded as
the trial's ``seed`` user attribute.

Workers. The study lives in Optuna storage (default a SQLite file
``runs/sweeps/<exp>/<optimizer>/study.db``; a PostgreSQL/MySQL URL for
workers on several nodes) under the name ``<exp>-<optimizer>``. Any number of
workers may run the same command, also all at once on an empty database (the
tables and the study are created under a lock): this is Optuna's standard
distributed mode, each worker stops once the study holds ``trials`` finished
trials (a worker that is mid-trial then finishes that trial, so a study of W
workers may end with up to W - 1 extra trials). Each trial's run uses ``--threads`` CPU
threads (``OMP_NUM_THREADS``; default inherited, else torch's default of every core): W
workers on one machine's CPUs need cores/W each, or their runs spin against each other
(two 2-thread nano runs on 2 cores trained ten times slower than two 1-thread ones).

Kill safety. Finished trials are never repeated: a new trial always gets a new
trial number and run directory. A trial that was interrupted (SIGTERM/SIGUSR1
to the worker, e.g. SLURM's preemption signal, which is forwarded to the run:
it checkpoints and exits 75) or whose worker died (detected at the next
worker start on the same host from the worker's pid, on any host from Optuna's
heartbeat after ``--grace`` seconds) is marked FAIL and re-enqueued with the
same hyperparameters (Optuna's ``RetryHeartbeatStaleTrialCallback``). The
retry *resumes* the interrupted run directory from its checkpoint: trial
directories are named by the first trial of a retry chain (``trial-<k>`` with
k the original trial's number; the retry's own number is in the study), so one
run directory is trained once, however often its worker was interrupted.
"""
from __future__ import annotations

from ..experiments import experiment
from .cli import main
from .export import best_params, export_best, write_best
from .objective import Objective, TrialCrashed, WorkerInterrupted
from .plots import plot_study
from .space import Range, budget_sets, load_space, optimizer_space, set_arg
from .study import load_study
from .worker import SweepOptions, run_sweep

__all__ = ["Objective", "Range", "SweepOptions", "TrialCrashed", "WorkerInterrupted", "best_params", "budget_sets",
           "experiment", "export_best", "load_space", "load_study", "main", "optimizer_space", "plot_study",
           "run_sweep", "set_arg", "write_best"]

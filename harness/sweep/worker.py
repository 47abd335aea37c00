"""One sweep worker: ``SweepOptions`` (what ``python -m harness.sweep run`` is asked) and
``run_sweep``, which runs trials of the study until it holds its number of finished ones.

Any number of workers may run the same options at once (Optuna's distributed mode): a worker
starts no trial once the study's finished (complete or pruned) trials and the other workers'
live running ones make ``trials``. A running trial whose worker died does not count: it is
failed and re-enqueued (same hyperparameters, resumed run directory) for the next worker.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional, Sequence

from .. import processes
from ..errors import UsageError
from ..experiments import experiment
from ..rundir import check_folder
from ..signals import StopFlag
from .objective import Objective, TrialCrashed, WorkerInterrupted
from .plots import plot_study
from .space import budget_sets, load_space, optimizer_space
from .study import (default_storage, finished, live_running, masked, open_study, retry, seed_sampler, storage,
                    sweep_dir, quiet_optuna)

MAX_CONSECUTIVE_CRASHES = 3  # a worker whose trials keep crashing stops (something is broken)


@dataclass
class SweepOptions:
    """A sweep worker's options; the fields are ``python -m harness.sweep run``'s options."""

    experiment: str                    # nano, vit, ...; bert/sst2 for a task
    optimizer: str
    trials: Optional[int] = None       # finished trials to reach (default: space.yaml's)
    storage_url: Optional[str] = None  # default sqlite:///<out_root>/<exp>/<optimizer>/study.db
    seed: Optional[int] = None         # every trial's run seed (default: space.yaml's seed)
    sampler_seed: int = 0              # TPE seed, mixed with the worker index
    worker: Optional[int] = None       # default $SLURM_ARRAY_TASK_ID or 0
    pruner: str = "none"               # none | median
    prune_startup: int = 5             # median pruner: trials before it prunes
    prune_warmup: int = 0              # median pruner: steps before it prunes a trial
    config: Optional[str] = None       # YAML applied to every trial (its keys win over the budget)
    sets: Sequence[str] = ()           # --set KEY=VALUE for every trial
    space_file: Optional[str] = None   # default <exp>/configs/space.yaml
    out_root: str | Path = "runs/sweeps"
    poll_s: float = 10.0               # seconds between looks at a running trial's metrics
    heartbeat_s: int = 60
    grace_s: Optional[int] = None      # without a heartbeat for this long a trial is dead (default 3x)
    keep_checkpoints: bool = False     # keep finished trials' checkpoint.pt
    nproc: int = 1                     # GPUs per trial (torchrun) when > 1
    threads: Optional[int] = None      # CPU threads per trial (OMP_NUM_THREADS; default: inherited)
    plot: bool = True                  # draw the study's figures at the end

    @classmethod
    def from_args(cls, args) -> "SweepOptions":
        """From an argparse namespace whose names are the fields'."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})

    def check(self) -> None:
        """A one-line UsageError for a number no sweep can use (named by its option)."""
        minimum = {"--trials": (self.trials, 1), "--heartbeat": (self.heartbeat_s, 1), "--grace": (self.grace_s, 1),
                   "--nproc": (self.nproc, 1), "--threads": (self.threads, 1),
                   "--prune-startup": (self.prune_startup, 0), "--prune-warmup": (self.prune_warmup, 0)}
        for option, (value, low) in minimum.items():
            if value is not None and value < low:
                raise UsageError(f"{option} must be at least {low}, got {value}")
        if not self.poll_s > 0:
            raise UsageError(f"--poll must be a positive number of seconds, got {self.poll_s}")
        if self.grace_s is not None and self.grace_s <= self.heartbeat_s:
            raise UsageError(f"--grace ({self.grace_s} s) must be longer than --heartbeat ({self.heartbeat_s} s)")


def _pruner(options: SweepOptions):
    optuna = quiet_optuna()
    if options.pruner not in ("none", "median"):
        raise UsageError(f"--pruner must be none or median, got {options.pruner!r}")
    if options.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=options.prune_startup,
                                           n_warmup_steps=options.prune_warmup)
    return optuna.pruners.NopPruner()


def run_sweep(options: SweepOptions, pruner_obj=None):
    """Run one worker of the study ``<exp>-<optimizer>`` until it holds ``options.trials`` finished
    (complete or pruned) trials; returns the study. ``pruner_obj`` replaces the options' pruner.
    Raises UsageError on bad input (before any trial), ``WorkerInterrupted`` when a signal stopped
    it (the trial in flight will be retried) and ``TrialCrashed`` after too many crashes in a row."""
    from .. import config as config_lib

    options.check()

    exp = experiment(options.experiment)
    optimizer = str(options.optimizer).lower()
    space = load_space(exp, options.space_file)
    hp_space = optimizer_space(space, optimizer)
    n_trials = int(options.trials or space["trials"])
    seed = int(options.seed if options.seed is not None else space["seed"])
    run_sets = budget_sets(space["budget"], options.config) + list(options.sets)
    # Bad keys or values fail here, once, not in every trial.
    config_lib.resolve(exp.name, optimizer, seed, options.config, run_sets, exp.configs)

    out = sweep_dir(exp, optimizer, options.out_root)
    check_folder(out, "--out-root")
    url = options.storage_url or default_storage(exp, optimizer, options.out_root)
    store = storage(url, options.heartbeat_s, options.grace_s)
    worker = options.worker if options.worker is not None else int(os.environ.get("SLURM_ARRAY_TASK_ID", 0) or 0)
    pruner = pruner_obj if pruner_obj is not None else _pruner(options)
    study = open_study(exp, optimizer, hp_space, seed, store, url, pruner)
    others, recovered = live_running(study, store)
    tpe_seed = seed_sampler(study, options.sampler_seed, worker)

    done = finished(study)
    print(f"study {study.study_name} in {masked(url)}: {done}/{n_trials} finished, worker {worker}, "
          f"TPE seed {tpe_seed}, trial seed {seed}{' + trial number' if space['seed_per_trial'] else ''}, "
          f"objective {space['objective']}, runs in {out}"
          + (f"; retrying interrupted trial(s) {recovered}" if recovered else ""), flush=True)
    if done < n_trials <= done + others:
        print(f"the other workers' {others} running trial(s) complete the study's {n_trials}; "
              f"no trial for this worker to start", flush=True)
    if done + others < n_trials:
        _optimize(study, store, n_trials, out, lambda signals: Objective(
            exp, optimizer, hp_space, seed=seed, out=out, config=options.config, sets=run_sets, signals=signals,
            poll_s=options.poll_s, keep_checkpoints=options.keep_checkpoints, nproc=options.nproc,
            threads=options.threads, objective=space["objective"], seed_per_trial=space["seed_per_trial"]))
    if options.plot:
        for path in plot_study(study, out):
            print(path)
    return study


def _optimize(study, store, n_trials: int, out: Path, objective_for) -> None:
    """Run trials (``objective_for(signals)`` is the objective) under one progress bar until the
    study holds ``n_trials`` finished ones, a signal arrives or trials keep crashing."""
    with StopFlag() as signals, processes.progress_bar(total=n_trials, initial=finished(study),
                                                       desc=study.study_name) as progress:
        objective = objective_for(signals)
        after_trial = _AfterTrial(progress, signals, store, n_trials)
        try:
            study.optimize(objective, callbacks=[after_trial], catch=(TrialCrashed,), gc_after_trial=False)
        except WorkerInterrupted:
            if objective.current is not None:  # Optuna has marked it FAIL
                retry(study, objective.current)
            raise
        if after_trial.crashes >= MAX_CONSECUTIVE_CRASHES:
            raise TrialCrashed(f"{MAX_CONSECUTIVE_CRASHES} trials in a row crashed; see the train.log "
                               f"of the last trials under {out}")


class _AfterTrial:
    """Optuna's callback after each trial: one line about it, the progress bar, and the stops
    (the study has its finished trials, a stop request, ``MAX_CONSECUTIVE_CRASHES`` in a row)."""

    def __init__(self, progress, signals: StopFlag, store, n_trials: int):
        self.progress, self.signals, self.store, self.n_trials, self.crashes = progress, signals, store, n_trials, 0

    def __call__(self, study, frozen) -> None:
        state = frozen.state.name.lower()
        value = f" objective {frozen.value:.4f}" if frozen.value is not None else ""
        if state == "fail":
            value = f" ({frozen.user_attrs.get('error', '?')})"
        elif state == "pruned":
            value = f" (run {frozen.user_attrs.get('status') or 'stopped early'})"
        params = ", ".join(f"{k}={v:.4g}" for k, v in frozen.params.items())
        self.progress.write(f"trial {frozen.number} ({frozen.user_attrs.get('run_dir', '?')}): {state}{value}; "
                            f"{params}")
        self.crashes = self.crashes + 1 if state == "fail" else 0
        self.progress.n = finished(study)
        self.progress.refresh()
        # Other workers' live trials count too: at N-1 finished with two workers, each starting one
        # more trial made N+1 (the nano CADAM0 study's 81st). A dead worker's trial does not: it is
        # re-enqueued here, and this worker runs it.
        others, retried = live_running(study, self.store)
        if retried:
            self.progress.write(f"retrying interrupted trial(s) {retried}")
        if (self.progress.n + others >= self.n_trials or self.signals.flag
                or self.crashes >= MAX_CONSECUTIVE_CRASHES):
            study.stop()

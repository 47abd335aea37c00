"""The objective: one trial = one ordinary run in a subprocess, scored by its validation losses.

What a trial returns is the space's ``objective`` rule (``objective_record``): the best
validation loss (``best``), the last one (``final``) or the best at the end of an epoch
(``best_epoch_end``).

The run is ``python -m <exp>.train --optimizer NAME --seed S --set optimizer.<hp>=<value> ...
--out <sweep dir>/trial-<k>``: a crash or a NaN never takes the worker down, and every
trial starts from fresh torch state. Trial directories are named by the first trial of a
retry chain (``trial-<k>``, k the original trial's number), so a retry resumes the run
directory of the trial it retries.
"""
from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path
from typing import Iterable, Optional, Sequence

from .. import processes
from ..checkpoint import previous
from ..cpu import thread_env
from ..errors import UsageError
from ..experiments import Experiment, train_command
from ..rundir import RunDir, best_record, finite
from ..signals import EXIT_INTERRUPTED, Interrupted, StopFlag
from .space import OBJECTIVES, Range, set_arg


def objective_record(records: Iterable[dict], rule: str = "best") -> Optional[dict]:
    """The ``val`` record whose ``loss`` a trial returns under ``rule`` (a name of ``OBJECTIVES``);
    None when there is none (or, for ``final``, when the last evaluation's loss is not finite).

    - ``best``: the finite-loss record of lowest loss (the first on ties);
    - ``final``: the record of the highest ``step``;
    - ``best_epoch_end``: the lowest-loss record among those whose ``epoch`` (updates / updates
      per epoch) is a whole positive number, i.e. taken after an epoch's last update.
    """
    if rule not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {rule!r}")
    rows = [r for r in records if r.get("split") == "val"]
    if rule == "final":
        last = max(rows, key=lambda r: r["step"], default=None)
        return last if last is not None and finite(last.get("loss")) else None
    if rule == "best_epoch_end":
        rows = [r for r in rows if finite(r.get("epoch")) and r["epoch"] > 0 and float(r["epoch"]).is_integer()]
    return best_record(rows, "val", "loss", "min")


class WorkerInterrupted(Interrupted):
    """The worker was asked to stop; the trial's run checkpointed and the trial will be retried
    (the command exits with status 75, ``harness.errors.command``)."""


class TrialCrashed(Exception):
    """The trial's run exited with an error (not a divergence): the trial fails, the worker goes on."""


class _Reports:
    """Validation losses a running trial logged since the last look, reported to Optuna once
    per step (the pruner's input)."""

    def __init__(self, trial, run: RunDir):
        self.trial, self.run, self.offset, self.steps = trial, run, 0, set()

    def send(self) -> None:
        records, self.offset = self.run.records_after(self.offset)
        for r in records:
            if r.get("split") == "val" and finite(r.get("loss")) and r["step"] not in self.steps:
                self.steps.add(r["step"])
                self.trial.report(float(r["loss"]), int(r["step"]))


class Objective:
    """One trial = one ordinary run of ``exp`` in a subprocess; returns the validation loss that
    ``objective`` picks (``objective_record``).

    The run's seed is ``seed``, or ``seed + k`` for the trial numbered k (a retry keeps its
    original's k) with ``seed_per_trial``; it runs on ``threads`` CPU threads (None: inherited).
    A run that diverged (or has no record for the objective) prunes the trial, as does the
    pruner (the run is then stopped); an interrupted
    run raises ``WorkerInterrupted``, a crashed one ``TrialCrashed``, one that could not start
    (exit 2) ``UsageError``."""

    def __init__(self, exp: Experiment, optimizer: str, space: dict[str, Range], *, seed: int, out: Path,
                 config: Optional[str], sets: Sequence[str], signals: StopFlag, poll_s: float = 10.0,
                 keep_checkpoints: bool = False, nproc: int = 1, threads: Optional[int] = None,
                 objective: str = "best", seed_per_trial: bool = False):
        if objective not in OBJECTIVES:
            raise UsageError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
        self.exp, self.optimizer, self.space, self.seed, self.out = exp, optimizer, space, seed, out
        self.objective, self.seed_per_trial = objective, seed_per_trial
        self.config, self.sets, self.signals, self.poll_s = config, list(sets), signals, poll_s
        self.keep_checkpoints, self.nproc, self.threads = keep_checkpoints, nproc, threads
        self.current: Optional[int] = None  # the number of the trial whose run is in flight

    def __call__(self, trial) -> float:
        self.current = None
        if self.signals.flag:
            raise WorkerInterrupted("stop requested before the trial started")
        run, proc = self._start(trial)
        rc, pruned = self._wait(trial, run, proc)
        return self._result(trial, run, rc, pruned)

    def _start(self, trial) -> tuple[RunDir, subprocess.Popen]:
        """Sample the hyperparameters, record the trial's run directory, seed, host and pids, start the run."""
        params = {hp: trial.suggest_float(hp, r.low, r.high, log=r.log) for hp, r in self.space.items()}
        root = int(trial.user_attrs.get("root", trial.number))  # a retry inherits its original's attrs
        run = RunDir(self.out / f"trial-{root}")
        seed = self.trial_seed(root)
        attrs = {"root": root, "seed": seed, "objective": self.objective, "run_dir": str(run.path)}
        if self.config:  # values tuned on another model or data are for runs with that config (export says so)
            attrs["config"] = str(self.config)
        # The host last: a worker that sees it sees the pid (``recover_dead_trials``).
        attrs.update(pid=os.getpid(), pid_start=processes.start_time(os.getpid()), host=socket.gethostname())
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        cmd = train_command(self.exp, self.optimizer, seed, run.path, self.config,
                            self.sets + [set_arg(f"optimizer.{k}", v) for k, v in params.items()], self.nproc)
        proc = processes.start(cmd, run.log_file, thread_env(self.threads))
        self.current = trial.number
        self.signals.child = proc
        trial.set_user_attr("child_pid", proc.pid)
        trial.set_user_attr("child_start", processes.start_time(proc.pid))
        return run, proc

    def trial_seed(self, root: int) -> int:
        """The run seed of the trial numbered ``root`` (the first trial of its retry chain)."""
        return self.seed + root if self.seed_per_trial else self.seed

    def _wait(self, trial, run: RunDir, proc: subprocess.Popen) -> tuple[int, bool]:
        """Wait for the run, reporting its validation losses every ``poll_s`` seconds; stop it
        when the pruner says so. Returns (exit status, pruned)."""
        reports, pruned = _Reports(trial, run), False
        try:
            while True:
                try:
                    rc = proc.wait(timeout=self.poll_s)
                    break
                except subprocess.TimeoutExpired:
                    pass
                reports.send()
                if not self.signals.flag and trial.should_prune():
                    pruned, rc = True, processes.stop(proc)
                    break
        finally:
            self.signals.child = None
            if proc.poll() is None:  # an exception above: never leave the run behind
                processes.stop(proc)
        reports.send()
        return rc, pruned

    def _result(self, trial, run: RunDir, rc: int, pruned: bool) -> float:
        import optuna

        status = run.status()
        trial.set_user_attr("status", status)
        if pruned:
            self._drop_checkpoint(run)
            raise optuna.TrialPruned(f"median pruner stopped the run at {run.path}")
        if rc == EXIT_INTERRUPTED or (rc != 0 and self.signals.flag):  # a run that finished anyway counts
            raise WorkerInterrupted(f"{run.path} interrupted (exit status {rc}); the trial will be retried")
        if rc == 2:
            raise UsageError(f"trial {trial.number} could not start: {processes.last_line(run.log_file)}")
        if rc != 0:
            trial.set_user_attr("error", f"exit status {rc}: {processes.last_line(run.log_file)}")
            raise TrialCrashed(f"{run.path} exited with status {rc}: {processes.last_line(run.log_file)}")
        self._drop_checkpoint(run)
        chosen = objective_record(run.records(), self.objective)
        if status == "diverged" or chosen is None:
            raise optuna.TrialPruned(f"{run.path} " + (status if status == "diverged" else
                                     f"has no finite validation loss for the objective {self.objective}"))
        trial.set_user_attr("best_step", int(chosen["step"]))
        return float(chosen["loss"])

    def _drop_checkpoint(self, run: RunDir) -> None:
        """A finished trial's checkpoint is never needed again (the summary says it is done)."""
        if not self.keep_checkpoints:
            run.checkpoint_file.unlink(missing_ok=True)
            previous(run.checkpoint_file).unlink(missing_ok=True)

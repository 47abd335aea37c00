"""Hyperparameter sweeps with Optuna: the paper's tuning protocol, one ordinary run per trial.

    python -m harness.sweep [run] <exp> <optimizer> [--trials N] [--storage URL] [--pruner median] ...
    python -m harness.sweep export <exp> <optimizer> --out FILE [--force]   (or --write-best)
    python -m harness.sweep plot <exp> <optimizer> [--out DIR]

The search space and the sweep budget of an experiment are in
``<exp>/configs/space.yaml``::

    budget: {train.max_iters: 2001}   # config overrides applied to every trial (dotted keys)
    trials: 80                        # finished (complete + pruned) trials the study aims at
    optimizers:
      cd: {h: [1.0e-4, 0.5, log], gamma: [1.0e-6, 10, uniform], c: [0.1, 1.0e6, log]}

A trial samples the hyperparameters with the (seeded) TPE sampler and runs
``python -m <exp>.train --optimizer NAME --seed S --set optimizer.<hp>=<value> ...
--out runs/sweeps/<exp>/<optimizer>/trial-<k>`` as a subprocess (a crash or a
NaN in a trial never takes the worker down, and every trial starts from fresh
torch state). Its objective is the run's best validation loss, minimised. A
run that diverged (or whose loss is not finite) is *pruned*. Every trial uses
the same seed (``--seed``, default the experiment's first paper seed, as the
paper tuned with one seed); it is recorded as the trial's ``seed`` user attribute.

Workers. The study lives in Optuna storage (default a SQLite file
``runs/sweeps/<exp>/<optimizer>/study.db``; a PostgreSQL/MySQL URL for
workers on several nodes) under the name ``<exp>-<optimizer>``. Any number of
workers may run the same command: this is Optuna's standard distributed mode,
each worker stops once the study holds ``trials`` finished trials (a worker
that is mid-trial then finishes that trial, so a study of W workers may end
with up to W - 1 extra trials).

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

import argparse
import ctypes
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import yaml

from .errors import UsageError
from .signals import EXIT_INTERRUPTED, StopFlag as Signals  # noqa: F401 (re-exported)
from .experiments import Experiment, experiment, paper_seeds, train_command  # noqa: F401 (re-exported)

from .config import REPO  # noqa: E402

MAX_RETRY = 10                 # re-enqueues of one interrupted trial before it is given up
MAX_CONSECUTIVE_CRASHES = 3    # a worker whose trials keep crashing stops (something is broken)
STOP_TIMEOUT_S = 600           # how long a run may take to checkpoint after SIGTERM before SIGKILL


def set_arg(key: str, value: Any) -> str:
    """``--set`` text whose YAML reading gives back ``value`` exactly (floats via repr)."""
    if isinstance(value, str):
        return f"{key}={value}"
    if isinstance(value, float):
        return f"{key}={value!r}"
    return f"{key}={json.dumps(value)}"


# --------------------------------------------------------------------------- search spaces


@dataclass(frozen=True)
class Range:
    low: float
    high: float
    log: bool


def load_space(exp: Experiment, path: Optional[str] = None) -> dict:
    """``space.yaml`` checked: ``{"budget": {dotted key: value}, "trials": int, "optimizers":
    {name: {hp: Range}}}``."""
    import optimizers

    from .config import as_number, flatten, read_yaml

    path = Path(path) if path else exp.configs / "space.yaml"
    if not path.is_file():
        raise UsageError(f"{exp.name} has no search space: {path} is missing")
    raw = read_yaml(path)
    unknown = sorted(set(raw) - {"budget", "trials", "optimizers"})
    if unknown:
        raise UsageError(f"{path}: unknown top-level key(s) {', '.join(unknown)}; valid: budget, trials, optimizers")
    trials = raw.get("trials", 100)
    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
        raise UsageError(f"{path}: trials must be a positive integer, got {trials!r}")
    spaces = {}
    for name, hps in (raw.get("optimizers") or {}).items():
        if name not in optimizers.NAMES:
            raise UsageError(f"{path}: unknown optimizer {name!r}; valid: {', '.join(optimizers.NAMES)}")
        valid = optimizers.hyperparameter_names(name)
        spaces[name] = {}
        for hp, spec in (hps or {}).items():
            where = f"{path}: {name}.{hp}"
            if hp not in valid:
                raise UsageError(f"{where}: {name} has no hyperparameter {hp}; valid: {', '.join(valid)}")
            if not isinstance(spec, list) or len(spec) not in (2, 3):
                raise UsageError(f"{where}: expected [low, high] or [low, high, log|uniform], got {spec!r}")
            low, high = (as_number(v) for v in spec[:2])
            kind = spec[2] if len(spec) == 3 else "log"
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or low >= high:
                raise UsageError(f"{where}: expected numbers low < high, got {spec[:2]!r}")
            if kind not in ("log", "uniform"):
                raise UsageError(f"{where}: scale must be log or uniform, got {kind!r}")
            if kind == "log" and low <= 0:
                raise UsageError(f"{where}: a log range needs low > 0, got {low!r}")
            spaces[name][hp] = Range(float(low), float(high), kind == "log")
    return {"budget": flatten(raw.get("budget") or {}), "trials": trials, "optimizers": spaces, "path": path}


def optimizer_space(space: dict, optimizer: str) -> dict[str, Range]:
    if optimizer not in space["optimizers"]:
        raise UsageError(f"{space['path']} has no search space for {optimizer!r}; "
                         f"valid: {', '.join(space['optimizers'])}")
    return space["optimizers"][optimizer]


def budget_sets(budget: dict, config: Optional[str]) -> list[str]:
    """The budget as ``--set`` items, minus keys a user ``--config`` file sets itself
    (so ``--config nano/configs/smoke.yaml`` keeps its tiny ``train.max_iters``)."""
    import optimizers

    from .config import flatten, read_yaml

    own = set()
    if config:
        for top, value in read_yaml(Path(config)).items():
            if top not in optimizers.NAMES:
                own |= set(flatten({top: value}) if isinstance(value, dict) else {top: value})
    return [set_arg(k, v) for k, v in budget.items() if k not in own]


# --------------------------------------------------------------------------- child processes


def _pdeathsig():
    """In the child, before exec: get SIGTERM when the worker dies, so a trial never runs orphaned
    (it checkpoints and exits 75, and the retry resumes it)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl  # looked up now: the child must not allocate between fork and exec

        def preexec():
            prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
        return preexec
    return None


def launch(cmd: list[str], log: Path) -> subprocess.Popen:
    """Start ``cmd`` from the current directory with the repo importable, output appended to ``log``.

    The child gets its own session so a terminal's Ctrl-C reaches only the worker, which forwards
    one SIGTERM (a second SIGINT would make the run stop without its final checkpoint)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        f.write(f"$ {' '.join(cmd)}\n".encode())
        f.flush()
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, preexec_fn=_pdeathsig())


def stop(proc: subprocess.Popen, timeout: float = STOP_TIMEOUT_S) -> int:
    """SIGTERM (the harness checkpoints at the next step and exits 75), SIGKILL after ``timeout``."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


def last_line(log: Path) -> str:
    """What a run's log says went wrong: its last ``error:`` message, else its last line."""
    try:
        lines = [l for l in Path(log).read_text(errors="replace").splitlines() if l.strip()]
    except OSError:
        return ""
    errors = [l[len("error:"):] for l in lines if l.startswith("error:")]
    return (errors or lines or [""])[-1].strip()


def _proc_start(pid: int) -> Optional[str]:
    """A process's start time (clock ticks since boot), which tells a pid apart from its reuse."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] == "Z" else fields[19]  # a zombie has exited


def alive(pid: Optional[int], start: Optional[str]) -> bool:
    if not pid:
        return False
    if Path("/proc").is_dir():
        return _proc_start(pid) is not None and (start is None or _proc_start(pid) == start)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------- results of a run


def run_result(run_dir: Path) -> tuple[Optional[str], Optional[float], Optional[int]]:
    """(status from summary.json, best finite validation loss, its step) of a run directory."""
    try:
        status = json.loads((run_dir / "summary.json").read_text()).get("status")
    except (OSError, ValueError):
        status = None
    best, step = None, None
    for r in read_records(run_dir / "metrics.jsonl"):
        loss = r.get("loss")
        if r.get("split") == "val" and isinstance(loss, (int, float)) and math.isfinite(loss):
            if best is None or loss < best:
                best, step = float(loss), int(r["step"])
    return status, best, step


def read_records(path: Path) -> list[dict]:
    try:
        return parse_records(Path(path).read_bytes())
    except OSError:
        return []


def parse_records(data: bytes) -> list[dict]:
    """JSON lines; a line still being written is skipped."""
    out = []
    for line in data.decode(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


# --------------------------------------------------------------------------- the study


def _optuna():
    import optuna

    # The worker prints one line per trial itself (and the reason of a failure), no tracebacks.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", category=FutureWarning, module="optuna")
    return optuna


def _retry_callback():
    """Optuna's retry of a failed trial (the class was renamed in Optuna 4.9)."""
    import optuna

    cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
    if cls is not None:
        return cls(max_retry=MAX_RETRY), "heartbeat_stale_trial_callback"
    return optuna.storages.RetryFailedTrialCallback(max_retry=MAX_RETRY), "failed_trial_callback"


def sweep_dir(exp: Experiment, optimizer: str, root: str | Path = "runs/sweeps") -> Path:
    return Path(root).resolve() / exp.name / optimizer


def default_storage(exp: Experiment, optimizer: str, root: str | Path = "runs/sweeps") -> str:
    return f"sqlite:///{sweep_dir(exp, optimizer, root) / 'study.db'}"


def study_name(exp: Experiment, optimizer: str) -> str:
    return f"{exp.name}-{optimizer}"


def storage(url: str, heartbeat_s: Optional[int] = None, grace_s: Optional[int] = None, create: bool = True):
    """An ``RDBStorage`` (SQLite, PostgreSQL, MySQL) with the heartbeat and the retry callback."""
    optuna = _optuna()
    if not re.match(r"^(sqlite|postgresql|mysql)(\+\w+)?://", url):
        raise UsageError(f"--storage must be an sqlite:///, postgresql:// or mysql:// URL, got {url!r}")
    if url.startswith("sqlite:///"):
        db = Path(url[len("sqlite:///"):])
        if not create and not db.is_file():
            raise UsageError(f"no study at {db}; run `bash scripts/sweep.sh <exp> <optimizer>` first or pass --storage")
        db.parent.mkdir(parents=True, exist_ok=True)
    retry, keyword = _retry_callback()
    kwargs = {}
    if heartbeat_s:
        kwargs = {"heartbeat_interval": int(heartbeat_s), "grace_period": int(grace_s or 3 * heartbeat_s),
                  keyword: retry}
    # SQLite serialises writers: wait for the lock instead of failing when workers collide.
    engine = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else None
    return optuna.storages.RDBStorage(url, engine_kwargs=engine, **kwargs)


def load_study(exp: Experiment, optimizer: str, url: Optional[str] = None, out_root: str | Path = "runs/sweeps"):
    optuna = _optuna()
    url = url or default_storage(exp, optimizer, out_root)
    name = study_name(exp, optimizer)
    try:
        return optuna.load_study(study_name=name, storage=storage(url, create=False))
    except KeyError:
        raise UsageError(f"no study named {name} in {url}; run `bash scripts/sweep.sh {exp.name} {optimizer}`") from None


def finished(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def retry(study, number: int) -> None:
    """Enqueue a retry of the FAILed trial ``number``: same hyperparameters and user attributes
    (so the same run directory), with Optuna's retry bookkeeping (``retry_history``)."""
    frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
    if frozen.params:  # a trial stopped before it sampled anything has nothing to retry
        _retry_callback()[0](study, frozen)


def fail_and_retry(study, store, number: int) -> bool:
    """Mark the RUNNING trial ``number`` FAIL and enqueue its retry; False if another worker did it first."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    trial_id = store.get_trial_id_from_study_id_trial_number(store.get_study_id_from_name(study.study_name), number)
    try:
        if not store.set_trial_state_values(trial_id, state=TrialState.FAIL):
            return False
    except UpdateFinishedTrialError:
        return False
    retry(study, number)
    return True


def recover_dead_trials(study, store) -> list[int]:
    """RUNNING trials whose worker ran on this host and is gone: stop an orphaned run (it
    checkpoints), then fail and re-enqueue the trial. Other hosts' trials are left to the heartbeat."""
    from optuna.trial import TrialState

    host, recovered = socket.gethostname(), []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        a = t.user_attrs
        if a.get("host") != host or alive(a.get("pid"), a.get("pid_start")):
            continue
        child, child_start = a.get("child_pid"), a.get("child_start")
        if alive(child, child_start):
            os.kill(child, signal.SIGTERM)
            deadline = time.time() + STOP_TIMEOUT_S
            while alive(child, child_start) and time.time() < deadline:
                time.sleep(0.2)
            if alive(child, child_start):
                os.kill(child, signal.SIGKILL)
        if fail_and_retry(study, store, t.number):
            recovered.append(t.number)
    return recovered


class WorkerInterrupted(Exception):
    """The worker was asked to stop; the trial's run checkpointed and the trial will be retried."""


class TrialCrashed(Exception):
    """The trial's run exited with an error (not a divergence): the trial fails, the worker goes on."""


class Objective:
    """One trial = one ordinary run of ``exp`` in a subprocess; returns its best validation loss."""

    def __init__(self, exp: Experiment, optimizer: str, space: dict[str, Range], *, seed: int, out: Path,
                 config: Optional[str], sets: Sequence[str], signals: Signals, poll_s: float = 10.0,
                 keep_checkpoints: bool = False, nproc: int = 1):
        self.exp, self.optimizer, self.space, self.seed, self.out = exp, optimizer, space, seed, out
        self.config, self.sets, self.signals, self.poll_s = config, list(sets), signals, poll_s
        self.keep_checkpoints, self.nproc = keep_checkpoints, nproc
        self.current: Optional[int] = None  # the number of the trial whose run is in flight

    def __call__(self, trial) -> float:
        import optuna

        self.current = None
        if self.signals.flag:
            raise WorkerInterrupted("stop requested before the trial started")
        params = {hp: trial.suggest_float(hp, r.low, r.high, log=r.log) for hp, r in self.space.items()}
        root = int(trial.user_attrs.get("root", trial.number))  # a retry inherits its original's attrs
        run_dir = self.out / f"trial-{root}"
        for key, value in {"root": root, "seed": self.seed, "run_dir": str(run_dir), "host": socket.gethostname(),
                           "pid": os.getpid(), "pid_start": _proc_start(os.getpid())}.items():
            trial.set_user_attr(key, value)
        cmd = train_command(self.exp, self.optimizer, self.seed, run_dir, self.config,
                            self.sets + [set_arg(f"optimizer.{k}", v) for k, v in params.items()], self.nproc)
        proc = launch(cmd, run_dir / "train.log")
        self.current = trial.number
        self.signals.child = proc
        trial.set_user_attr("child_pid", proc.pid)
        trial.set_user_attr("child_start", _proc_start(proc.pid))
        reported, offset, pruned = set(), 0, False

        def report_new():
            """Report validation losses logged since the last look (the median pruner's input)."""
            nonlocal offset
            path = run_dir / "metrics.jsonl"
            size = path.stat().st_size if path.exists() else 0
            if size < offset:  # a resumed run truncated the records after its checkpoint
                offset = 0
            data = path.read_bytes()[offset:] if size else b""
            complete = data[: data.rfind(b"\n") + 1]
            offset += len(complete)
            for r in parse_records(complete):
                loss = r.get("loss")
                if (r.get("split") == "val" and isinstance(loss, (int, float)) and math.isfinite(loss)
                        and r["step"] not in reported):
                    reported.add(r["step"])
                    trial.report(float(loss), int(r["step"]))

        try:
            while True:
                try:
                    rc = proc.wait(timeout=self.poll_s)
                    break
                except subprocess.TimeoutExpired:
                    pass
                report_new()
                if not self.signals.flag and trial.should_prune():
                    pruned = True
                    rc = stop(proc)
                    break
        finally:
            self.signals.child = None
            if proc.poll() is None:  # an exception above: never leave the run behind
                stop(proc)
        report_new()

        status, best, step = run_result(run_dir)
        trial.set_user_attr("status", status)
        if pruned:
            self._drop_checkpoint(run_dir)
            raise optuna.TrialPruned(f"median pruner stopped the run at {run_dir}")
        if rc == EXIT_INTERRUPTED or (rc != 0 and self.signals.flag):  # a run that finished anyway counts
            raise WorkerInterrupted(f"{run_dir} interrupted (exit status {rc}); the trial will be retried")
        if rc == 2:
            raise UsageError(f"trial {trial.number} could not start: {last_line(run_dir / 'train.log')}")
        if rc != 0:
            trial.set_user_attr("error", f"exit status {rc}: {last_line(run_dir / 'train.log')}")
            raise TrialCrashed(f"{run_dir} exited with status {rc}: {last_line(run_dir / 'train.log')}")
        self._drop_checkpoint(run_dir)
        if status == "diverged" or best is None:
            raise optuna.TrialPruned(f"{run_dir} {status or 'logged no finite validation loss'}")
        trial.set_user_attr("best_step", step)
        return best

    def _drop_checkpoint(self, run_dir: Path) -> None:
        """A finished trial's checkpoint is never needed again (the summary says it is done)."""
        if not self.keep_checkpoints:
            (run_dir / "checkpoint.pt").unlink(missing_ok=True)


def _format_params(params: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in params.items())


def run_sweep(spec: str, optimizer: str, *, trials: Optional[int] = None, storage_url: Optional[str] = None,
              seed: Optional[int] = None, sampler_seed: int = 0, worker: Optional[int] = None,
              pruner: str = "none", prune_startup: int = 5, prune_warmup: int = 0,
              config: Optional[str] = None, sets: Iterable[str] = (), space_file: Optional[str] = None,
              out_root: str | Path = "runs/sweeps", poll_s: float = 10.0, heartbeat_s: int = 60,
              grace_s: Optional[int] = None, keep_checkpoints: bool = False, nproc: int = 1,
              plot: bool = True, pruner_obj=None):
    """Run one worker of the study ``<exp>-<optimizer>`` until it holds ``trials`` finished
    (complete or pruned) trials; returns the study. Raises UsageError on bad input and
    ``WorkerInterrupted`` when a signal stopped it (the trial in flight will be retried)."""
    optuna = _optuna()
    from tqdm.auto import tqdm

    from . import config as config_lib

    exp = experiment(spec)
    optimizer = str(optimizer).lower()
    space = load_space(exp, space_file)
    hp_space = optimizer_space(space, optimizer)
    n_trials = int(trials or space["trials"])
    seed = int(seed if seed is not None else paper_seeds(exp)[0])
    run_sets = budget_sets(space["budget"], config) + list(sets)
    # Bad keys or values fail here, once, not in every trial.
    config_lib.resolve(exp.name, optimizer, seed, config, run_sets, exp.configs)

    out = sweep_dir(exp, optimizer, out_root)
    url = storage_url or default_storage(exp, optimizer, out_root)
    store = storage(url, heartbeat_s, grace_s)
    if worker is None:
        worker = int(os.environ.get("SLURM_ARRAY_TASK_ID", 0) or 0)
    if pruner_obj is None:
        if pruner not in ("none", "median"):
            raise UsageError(f"--pruner must be none or median, got {pruner!r}")
        pruner_obj = (optuna.pruners.MedianPruner(n_startup_trials=prune_startup, n_warmup_steps=prune_warmup)
                      if pruner == "median" else optuna.pruners.NopPruner())
    study = optuna.create_study(study_name=study_name(exp, optimizer), storage=store, direction="minimize",
                                load_if_exists=True, pruner=pruner_obj)
    recorded = {hp: [r.low, r.high, "log" if r.log else "uniform"] for hp, r in hp_space.items()}
    if study.user_attrs.get("space", recorded) != recorded:
        raise UsageError(f"study {study.study_name} in {url} was made with the search space "
                         f"{study.user_attrs['space']}, not {recorded}; use another --storage")
    for key, value in {"space": recorded, "experiment": exp.name, "optimizer": optimizer, "seed": seed}.items():
        if key not in study.user_attrs:
            study.set_user_attr(key, value)
    recovered = recover_dead_trials(study, store)
    # A different stream for every worker and every restart, reproducible from the study's history.
    tpe_seed = int(np.random.SeedSequence([sampler_seed, worker, len(study.trials)]).generate_state(1)[0])
    study.sampler = optuna.samplers.TPESampler(seed=tpe_seed, constant_liar=True)

    done = finished(study)
    print(f"study {study.study_name} in {url}: {done}/{n_trials} finished, worker {worker}, TPE seed {tpe_seed}, "
          f"trial seed {seed}, runs in {out}"
          + (f"; retrying interrupted trial(s) {recovered}" if recovered else ""), flush=True)
    if done < n_trials:
        with Signals() as signals, tqdm(total=n_trials, initial=done, desc=study.study_name,
                                        dynamic_ncols=True) as progress:
            objective = Objective(exp, optimizer, hp_space, seed=seed, out=out, config=config, sets=run_sets,
                                  signals=signals, poll_s=poll_s, keep_checkpoints=keep_checkpoints,
                                  nproc=nproc)
            crashes = [0]

            def after_trial(study, frozen):
                state = frozen.state.name.lower()
                value = f" best val loss {frozen.value:.4f}" if frozen.value is not None else ""
                if state == "fail":
                    value = f" ({frozen.user_attrs.get('error', '?')})"
                elif state == "pruned":
                    value = f" (run {frozen.user_attrs.get('status') or 'stopped early'})"
                progress.write(f"trial {frozen.number} ({frozen.user_attrs.get('run_dir', '?')}): {state}{value}; "
                               f"{_format_params(frozen.params)}")
                crashes[0] = crashes[0] + 1 if state == "fail" else 0
                progress.n = finished(study)
                progress.refresh()
                if progress.n >= n_trials or signals.flag:
                    study.stop()
                if crashes[0] >= MAX_CONSECUTIVE_CRASHES:
                    study.stop()

            try:
                study.optimize(objective, callbacks=[after_trial], catch=(TrialCrashed,), gc_after_trial=False)
            except WorkerInterrupted:
                if objective.current is not None:  # Optuna has marked it FAIL
                    retry(study, objective.current)
                raise
            if crashes[0] >= MAX_CONSECUTIVE_CRASHES:
                raise TrialCrashed(f"{MAX_CONSECUTIVE_CRASHES} trials in a row crashed; see the train.log "
                                   f"of the last trials under {out}")
    if plot:
        for path in plot_study(study, out):
            print(path)
    return study


# --------------------------------------------------------------------------- results of a study


def best_params(study) -> dict[str, float]:
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise UsageError(f"study {study.study_name} has no completed trial yet")
    return dict(study.best_trial.params)


def yaml_float(value: float) -> str:
    """A float YAML 1.1 reads back as a float (``1e-05`` would be a string; ``1.0e-05`` is not)."""
    text = repr(float(value))
    mantissa, e, exponent = text.partition("e")
    if e and "." not in mantissa:
        text = f"{mantissa}.0e{exponent}"
    return text


def flow_entry(params: dict) -> str:
    return "{" + ", ".join(f"{k}: {yaml_float(v)}" for k, v in params.items()) + "}"


def export_best(study, exp: Experiment, optimizer: str, out: Path, force: bool = False) -> Path:
    """Write ``{optimizer: {hp: value}}`` (best.yaml format) to a new file ``out``."""
    out = Path(out)
    if out.exists() and not force:
        raise UsageError(f"{out} exists; choose a new --out or pass --force to overwrite it")
    best = study.best_trial
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"# Best of study {study.study_name}: trial {best.number}, best val loss {best.value:.6g}, "
                   f"run {best.user_attrs.get('run_dir', '?')}.\n"
                   f"# Use with: python -m {' '.join([exp.module, *exp.args])} --optimizer {optimizer} --config {out}\n"
                   f"{optimizer}: {flow_entry(best_params(study))}\n")
    return out


def write_best(best_yaml: Path, optimizer: str, params: dict) -> None:
    """Replace (or append) the ``optimizer:`` entry of a best.yaml, keeping every other line and comment."""
    from .config import as_number

    best_yaml = Path(best_yaml)
    text = best_yaml.read_text() if best_yaml.exists() else ""
    before = yaml.safe_load(text) or {}
    merged = {**(before.get(optimizer) or {}), **params}
    lines = text.splitlines(keepends=True)
    pattern = re.compile(rf"^{re.escape(optimizer)}\s*:\s*")
    for i, line in enumerate(lines):
        match = pattern.match(line)
        if match:
            end = i + 1  # a block-style entry continues on indented lines
            while end < len(lines) and lines[end][:1] in (" ", "\t") and lines[end].strip():
                end += 1
            lines[i:end] = [f"{match.group(0)}{flow_entry(merged)}\n"]
            break
    else:
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"
        lines.append(f"{optimizer}: {flow_entry(merged)}\n")
    new = "".join(lines)
    after = yaml.safe_load(new)
    expected = {**before, optimizer: merged}
    if {k: {h: as_number(v) for h, v in (e or {}).items()} for k, e in after.items()} != \
            {k: {h: as_number(v) for h, v in (e or {}).items()} for k, e in expected.items()}:
        raise UsageError(f"could not edit {best_yaml} in place; write the entry by hand: {optimizer}: {flow_entry(merged)}")
    tmp = best_yaml.with_name(f".{best_yaml.name}.tmp{os.getpid()}")
    tmp.write_text(new)
    os.replace(tmp, best_yaml)


def plot_study(study, out_dir: Path) -> list[Path]:
    """``history.png`` (optimisation history), ``importances.png`` (fANOVA parameter importances,
    when the study allows: at least two completed trials) and ``study.md`` in ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as ovm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    written = []
    plots = [("history.png", ovm.plot_optimization_history, 1), ("importances.png", ovm.plot_param_importances, 2)]
    for name, draw, needed in plots:
        if len(complete) < needed:
            print(f"{study.study_name}: {name} needs {needed} completed trial(s), has {len(complete)}; skipped")
            continue
        try:
            ax = draw(study)
        except Exception as e:  # e.g. importances of a study whose trials all share one value
            print(f"{study.study_name}: {name} skipped ({type(e).__name__}: {e})")
            plt.close("all")
            continue
        fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
        fig.set_size_inches(7, 4.5)
        fig.tight_layout()
        tmp = out_dir / f".{name}.tmp{os.getpid()}.png"
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, out_dir / name)
        plt.close(fig)
        written.append(out_dir / name)
    md = out_dir / "study.md"
    md.write_text(study_markdown(study, [p.name for p in written]))
    return written + [md]


def study_markdown(study, figures: list[str], top: int = 10) -> str:
    from optuna.trial import TrialState

    counts = {s.name.lower(): len(study.get_trials(deepcopy=False, states=(s,)))
              for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING,
                        TrialState.WAITING)}
    lines = [f"# Study {study.study_name}", "",
             "Trials: " + ", ".join(f"{n} {k}" for k, n in counts.items() if n) + ".", ""]
    complete = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.value)
    if complete:
        names = list(complete[0].params)
        lines += [f"Best {min(top, len(complete))} trials (objective: best validation loss):", "",
                  "| trial | best val loss | " + " | ".join(names) + " | run |",
                  "|---|---|" + "---|" * len(names) + "---|"]
        for t in complete[:top]:
            lines.append(f"| {t.number} | {t.value:.4f} | " + " | ".join(f"{t.params.get(n, float('nan')):.4g}"
                                                                         for n in names)
                         + f" | {Path(t.user_attrs.get('run_dir', '?')).name} |")
        lines.append("")
    lines += [f"![{Path(f).stem}]({f})" for f in figures]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- command line


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("run", "export", "plot", "-h", "--help"):
        argv.insert(0, "run")
    p = argparse.ArgumentParser(prog="python -m harness.sweep", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def common(q):
        q.add_argument("experiment", help="experiment folder (nano, vit, ...; bert/sst2 for a task)")
        q.add_argument("optimizer")
        q.add_argument("--storage", default=None,
                       help="Optuna storage URL (default sqlite:///runs/sweeps/<exp>/<optimizer>/study.db)")
        q.add_argument("--out-root", default=os.environ.get("SWEEPS", "runs/sweeps"),
                       help="where trial run directories go (default runs/sweeps, or $SWEEPS)")

    r = sub.add_parser("run", help="run one worker of the study (several may run at once)")
    common(r)
    r.add_argument("--trials", type=int, default=None, help="finished trials to reach (default: space.yaml's)")
    r.add_argument("--seed", type=int, default=None, help="the run seed of every trial (default: first paper seed)")
    r.add_argument("--sampler-seed", type=int, default=0, help="TPE seed (mixed with the worker index)")
    r.add_argument("--worker", type=int, default=None, help="worker index (default $SLURM_ARRAY_TASK_ID or 0)")
    r.add_argument("--pruner", default="none", choices=("none", "median"),
                   help="median: stop a trial whose intermediate val loss is worse than the median of earlier ones")
    r.add_argument("--prune-startup", type=int, default=5, help="median pruner: trials before it prunes")
    r.add_argument("--prune-warmup", type=int, default=0, help="median pruner: steps before it prunes a trial")
    r.add_argument("--config", default=None, help="YAML applied to every trial (its keys win over the budget)")
    r.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every trial (repeatable)")
    r.add_argument("--space", default=None, help="search space file (default <exp>/configs/space.yaml)")
    r.add_argument("--poll", type=float, default=10.0, help="seconds between looks at a running trial's metrics")
    r.add_argument("--heartbeat", type=int, default=60, help="seconds between a worker's heartbeats")
    r.add_argument("--grace", type=int, default=None,
                   help="seconds without a heartbeat after which a trial counts as dead (default 3x heartbeat)")
    r.add_argument("--nproc", type=int, default=1, help="GPUs per trial (torchrun) when > 1")
    r.add_argument("--keep-checkpoints", action="store_true", help="keep finished trials' checkpoint.pt")
    r.add_argument("--no-plot", action="store_true", help="do not draw the study's figures at the end")

    e = sub.add_parser("export", help="write the best hyperparameters in best.yaml format")
    common(e)
    e.add_argument("--out", default=None, help="a new file to write")
    e.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    e.add_argument("--write-best", action="store_true", help="replace the entry in <exp>/configs/best.yaml")

    g = sub.add_parser("plot", help="draw the study's history and importances, and study.md")
    common(g)
    g.add_argument("--out", default=None, help="folder (default: next to the study's trials)")

    args = p.parse_args(argv)
    try:
        if args.command == "run":
            run_sweep(args.experiment, args.optimizer, trials=args.trials, storage_url=args.storage, seed=args.seed,
                      sampler_seed=args.sampler_seed, worker=args.worker, pruner=args.pruner,
                      prune_startup=args.prune_startup, prune_warmup=args.prune_warmup, config=args.config,
                      sets=args.sets, space_file=args.space, out_root=args.out_root, poll_s=args.poll,
                      heartbeat_s=args.heartbeat, grace_s=args.grace, keep_checkpoints=args.keep_checkpoints,
                      nproc=args.nproc, plot=not args.no_plot)
            return 0
        exp = experiment(args.experiment)
        optimizer = args.optimizer.lower()
        study = load_study(exp, optimizer, args.storage, args.out_root)
        if args.command == "export":
            if not args.out and not args.write_best:
                raise UsageError("export needs --out FILE (a new file) or --write-best")
            if args.out:
                print(export_best(study, exp, optimizer, Path(args.out), args.force))
            if args.write_best:
                write_best(exp.configs / "best.yaml", optimizer, best_params(study))
                print(f"{exp.configs / 'best.yaml'}: {optimizer} replaced by trial {study.best_trial.number}")
        else:
            for path in plot_study(study, Path(args.out) if args.out else sweep_dir(exp, optimizer, args.out_root)):
                print(path)
        return 0
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except WorkerInterrupted as err:
        print(f"interrupted: {err}; run the same command to continue", file=sys.stderr)
        return EXIT_INTERRUPTED
    except TrialCrashed as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())

"""``python -m harness.sweep [run|export|plot] <exp> <optimizer> ...``: the command line.

    python -m harness.sweep [run] <exp> <optimizer> [--trials N] [--storage URL] [--pruner median] ...
    python -m harness.sweep export <exp> <optimizer> --out FILE [--force]   (or --write-best)
    python -m harness.sweep plot <exp> <optimizer> [--out DIR]

Exit status: 0 done, 2 bad input (one ``error:`` line), 75 interrupted (rerun the same
command to continue), 1 when trials kept crashing.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional

from ..errors import UsageError, command
from ..experiments import experiment
from .export import best_params, export_best, write_best
from .objective import TrialCrashed
from .plots import plot_study
from .study import holds_password, load_study, masked, sweep_dir
from .worker import SweepOptions, run_sweep


# The storage URL from the environment: a URL with a password must not be an argument, which
# every user of the machine can read (ps, /proc/<pid>/cmdline); a process's environment is its own.
STORAGE_ENV = "SWEEP_STORAGE"


def storage_url(argument: Optional[str]) -> Optional[str]:
    """The ``--storage`` argument, else ``$SWEEP_STORAGE``; a one-line UsageError for an argument
    that holds a password (in its userinfo or a ``password=`` query parameter)."""
    if argument is None:
        return os.environ.get(STORAGE_ENV) or None
    if holds_password(argument):
        raise UsageError(f"--storage {masked(argument)} holds a password, which every user of this machine can "
                         f"read on a command line; pass the URL in ${STORAGE_ENV} instead, or the password in a "
                         f"PGPASSFILE (mode 0600)")
    return argument


def _common(q: argparse.ArgumentParser) -> None:
    q.add_argument("experiment", help="experiment folder (nano, vit, ...; bert/sst2 for a task)")
    q.add_argument("optimizer")
    q.add_argument("--storage", dest="storage_url", metavar="STORAGE", default=None,
                   help=f"Optuna storage URL without a password (default ${STORAGE_ENV}, else "
                        "sqlite:///runs/sweeps/<exp>/<optimizer>/study.db); a password goes in "
                        f"${STORAGE_ENV} or a PGPASSFILE, never on the command line")
    q.add_argument("--out-root", default=os.environ.get("SWEEPS", "runs/sweeps"),
                   help="where trial run directories go (default runs/sweeps, or $SWEEPS)")


def _run_parser(r: argparse.ArgumentParser) -> None:
    """The options of ``run``, named as ``SweepOptions``' fields."""
    _common(r)
    r.add_argument("--trials", type=int, default=None, help="finished trials to reach (default: space.yaml's)")
    r.add_argument("--seed", type=int, default=None, help="the trials' run seed (trial k runs seed + k where space.yaml sets seed_per_trial; default: space.yaml's seed)")
    r.add_argument("--sampler-seed", type=int, default=0, help="TPE seed (mixed with the worker index)")
    r.add_argument("--worker", type=int, default=None, help="worker index (default $SLURM_ARRAY_TASK_ID or 0)")
    r.add_argument("--pruner", default="none", choices=("none", "median"),
                   help="median: stop a trial whose intermediate val loss is worse than the median of earlier ones")
    r.add_argument("--prune-startup", type=int, default=5, help="median pruner: trials before it prunes")
    r.add_argument("--prune-warmup", type=int, default=0, help="median pruner: steps before it prunes a trial")
    r.add_argument("--config", default=None, help="YAML applied to every trial (its keys win over the budget)")
    r.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every trial (repeatable)")
    r.add_argument("--space", dest="space_file", metavar="SPACE", default=None,
                   help="search space file (default <exp>/configs/space.yaml)")
    r.add_argument("--poll", dest="poll_s", metavar="POLL", type=float, default=10.0,
                   help="seconds between looks at a running trial's metrics")
    r.add_argument("--heartbeat", dest="heartbeat_s", metavar="HEARTBEAT", type=int, default=60,
                   help="seconds between a worker's heartbeats")
    r.add_argument("--grace", dest="grace_s", metavar="GRACE", type=int, default=None,
                   help="seconds without a heartbeat after which a trial counts as dead (default 3x heartbeat)")
    r.add_argument("--nproc", type=int, default=1, help="GPUs per trial (torchrun) when > 1")
    r.add_argument("--threads", type=int, default=None,
                   help="CPU threads per trial (OMP_NUM_THREADS; default: inherited, else every core); "
                        "W workers on one machine's CPUs: cores/W each")
    r.add_argument("--keep-checkpoints", action="store_true", help="keep finished trials' checkpoint.pt")
    r.add_argument("--no-plot", dest="plot", action="store_false", help="do not draw the study's figures at the end")


def parser() -> argparse.ArgumentParser:
    """``run`` (the default), ``export`` and ``plot``, each with the experiment and optimizer."""
    p = argparse.ArgumentParser(prog="python -m harness.sweep", description=sys.modules[__package__].__doc__
                                .split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    _run_parser(sub.add_parser("run", help="run one worker of the study (several may run at once)"))

    e = sub.add_parser("export", help="write the best hyperparameters in best.yaml format")
    _common(e)
    e.add_argument("--out", default=None, help="a new file to write")
    e.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    e.add_argument("--write-best", action="store_true", help="replace the entry in <exp>/configs/best.yaml")

    g = sub.add_parser("plot", help="draw the study's history and importances, and study.md")
    _common(g)
    g.add_argument("--out", default=None, help="folder (default: next to the study's trials)")
    return p


def _export_or_plot(args) -> None:
    """``export`` (to a new file and/or best.yaml) or ``plot`` the existing study."""
    exp = experiment(args.experiment)
    optimizer = args.optimizer.lower()
    study = load_study(exp, optimizer, args.storage_url, args.out_root)
    if args.command == "plot":
        for path in plot_study(study, Path(args.out) if args.out else sweep_dir(exp, optimizer, args.out_root)):
            print(path)
        return
    if not args.out and not args.write_best:
        raise UsageError("export needs --out FILE (a new file) or --write-best")
    if args.out:
        print(export_best(study, exp, optimizer, Path(args.out), args.force))
    if args.write_best:
        write_best(exp.configs / "best.yaml", optimizer, best_params(study))
        print(f"{exp.configs / 'best.yaml'}: {optimizer} replaced by trial {study.best_trial.number}")


@command
def main(argv: Optional[list[str]] = None) -> int:
    """The command line; ``run`` is the default command. Returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("run", "export", "plot", "-h", "--help"):
        argv.insert(0, "run")
    args = parser().parse_args(argv)
    args.storage_url = storage_url(args.storage_url)
    try:
        if args.command == "run":
            run_sweep(SweepOptions.from_args(args))
        else:
            _export_or_plot(args)
        return 0
    except TrialCrashed as err:
        print(f"error: {err}", file=sys.stderr)
        return 1

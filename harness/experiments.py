"""Experiment names -> how to run them.

Most experiments are one folder (``nano`` -> ``python -m nano.train``, configs in
``nano/configs``). GLUE has one folder with a config folder per task:
``bert/sst2`` (also written ``bert-sst2``) -> ``python -m bert.train --task sst2``,
configs in ``bert/configs/sst2``, runs under ``runs/bert/sst2``.
"""
from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from . import config as config_lib
from .errors import UsageError


@dataclass(frozen=True)
class Experiment:
    """How to run one experiment: ``python -m <module> <args...>`` with configs in ``configs``.

    ``task`` is None for a one-task folder, else the task (``bert/sst2``); ``tasks`` lists a
    folder's tasks (empty for a one-task folder). Its data facts (the prepare command, the
    metadata file) the experiment states itself and passes to the harness's data readers
    (``nano.DATA`` to ``harness.token_bins.TokenBins``); an ``Experiment`` holds none.
    """

    name: str              # run and study names: "nano", "bert-sst2"
    module: str            # "nano.train", "bert.train"
    args: tuple[str, ...]  # () or ("--task", "sst2")
    configs: Path          # <repo>/nano/configs, <repo>/bert/configs/sst2
    runs_subdir: str       # runs/<runs_subdir>/<optimizer>/seed<S>: "nano", "bert/sst2"
    folder: str = ""       # "nano", "bert"
    task: Optional[str] = None
    tasks: tuple[str, ...] = ()

    @property
    def default_out(self) -> str:
        """The run directory pattern: ``runs/<runs_subdir>/{optimizer}/seed{seed}``."""
        return f"runs/{self.runs_subdir}/{{optimizer}}/seed{{seed}}"


def experiment(spec: str, task_required: bool = True) -> Experiment:
    """The experiment called ``spec`` ("nano", "vit", "bert/sst2", "bert-sst2", ...).

    A folder with several tasks named without one ("bert") is an error, unless
    ``task_required`` is False: then its ``task`` is None (``harness.run.start`` reads
    ``--task`` from the command line)."""
    repo = config_lib.REPO
    folder, _, task = str(spec).strip("/").replace("/", "-").partition("-")
    root = repo / folder
    if not folder or not (root / "train.py").is_file():
        known = sorted(p.parent.name for p in repo.glob("*/train.py"))
        raise UsageError(f"unknown experiment {spec!r}; valid: {', '.join(known) or 'none yet'}")
    tasks = tuple(sorted(p.parent.name for p in (root / "configs").glob("*/paper.yaml")))
    if tasks:  # a folder of tasks (bert) states their order, the paper's, in its package
        tasks = tuple(getattr(importlib.import_module(folder), "TASKS", tasks))
    common = dict(module=f"{folder}.train", folder=folder, tasks=tasks)
    if task:
        if task not in tasks:
            raise UsageError(f"unknown {folder} task {task!r}; valid tasks: {', '.join(tasks) or 'none'}")
        return Experiment(f"{folder}-{task}", args=("--task", task), configs=root / "configs" / task,
                          runs_subdir=f"{folder}/{task}", task=task, **common)
    if not (root / "configs" / "paper.yaml").is_file() and task_required:
        raise UsageError(f"{folder} has several tasks: name one of " + ", ".join(f"{folder}/{t}" for t in tasks))
    return Experiment(folder, args=(), configs=root / "configs", runs_subdir=folder, **common)


def paper_seeds(exp: Experiment) -> list[int]:
    return [int(s) for s in (config_lib.read_yaml(exp.configs / "paper.yaml").get("seeds") or [0])]


def train_command(exp: Experiment, optimizer: str, seed: int, out: Path, config: Optional[str] = None,
                  sets: Sequence[str] = (), nproc: int = 1) -> list[str]:
    """The command line of one ordinary run (under torchrun when ``nproc`` > 1)."""
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    cmd = launcher + ["-m", exp.module, *exp.args, "--optimizer", optimizer, "--seed", str(seed)]
    if config:
        cmd += ["--config", str(config)]
    for item in sets:
        cmd += ["--set", item]
    return cmd + ["--out", str(out)]

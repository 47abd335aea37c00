"""Experiment names -> how to run them.

Most experiments are one folder (``nano`` -> ``python -m nano.train``, configs in
``nano/configs``). GLUE has one folder with a task per config folder: ``bert/sst2``
(also written ``bert-sst2``) -> ``python -m bert.train --task sst2``, configs in
``bert/configs/sst2``, runs under ``runs/bert/sst2``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config import REPO
from .errors import UsageError


@dataclass(frozen=True)
class Experiment:
    name: str            # as recorded in configs and summaries: "nano", "bert-sst2"
    module: str          # the train module: "nano.train"
    args: tuple          # extra arguments of the train module: ("--task", "sst2")
    configs_dir: Path
    runs_subdir: str     # runs/<runs_subdir>/<optimizer>/seed<S>

    def command(self, python: str = "python") -> list[str]:
        return [python, "-m", self.module, *self.args]


def available() -> list[str]:
    """Every experiment spec with a configs/paper.yaml in this checkout."""
    out = []
    for paper in sorted(REPO.glob("*/configs/paper.yaml")):
        out.append(paper.parts[-3])
    for paper in sorted(REPO.glob("*/configs/*/paper.yaml")):
        out.append(f"{paper.parts[-4]}/{paper.parts[-2]}")
    return out


def experiment(spec: str) -> Experiment:
    """The experiment called ``spec`` ("nano", "vit", "bert/sst2", "bert-sst2", ...)."""
    folder, _, task = str(spec).strip("/").replace("-", "/", 1).partition("/")
    if task:
        configs = REPO / folder / "configs" / task
        if (configs / "paper.yaml").is_file():
            return Experiment(f"{folder}-{task}", f"{folder}.train", ("--task", task), configs, f"{folder}/{task}")
    else:
        configs = REPO / folder / "configs"
        if (configs / "paper.yaml").is_file():
            return Experiment(folder, f"{folder}.train", (), configs, folder)
    raise UsageError(f"unknown experiment {spec!r}; valid: {', '.join(available())}")

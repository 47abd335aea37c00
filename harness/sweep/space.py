"""A sweep's search space and budget: ``<exp>/configs/space.yaml`` read and checked.

    budget: {train.max_iters: 2001}   # config overrides applied to every trial (dotted keys)
    trials: 80                        # finished (complete + pruned) trials the study aims at
    seed: 123                         # every trial's run seed (default: the first paper seed)
    seed_per_trial: false             # true: trial k runs seed + k (each retry keeps its original's k)
    objective: best                   # what a trial returns (minimised): see OBJECTIVES
    base: space.yaml                  # (a preset) take every other key from this file beside it
    optimizers:
      cd: {h: [1.0e-4, 0.5, log], gamma: [1.0e-6, 10, uniform], c: [0.1, 1.0e6, log]}
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..errors import UsageError
from ..experiments import Experiment, paper_seeds


def set_arg(key: str, value: Any) -> str:
    """``--set`` text whose YAML reading gives back ``value`` exactly (floats via repr)."""
    if isinstance(value, str):
        return f"{key}={value}"
    if isinstance(value, float):
        return f"{key}={value!r}"
    return f"{key}={json.dumps(value)}"


# What a trial returns, computed from its run's ``val`` records (``objective.objective_record``).
OBJECTIVES = {
    "best": "the lowest validation loss of any evaluation",
    "final": "the validation loss of the last evaluation",
    "best_epoch_end": "the lowest validation loss among the evaluations at the end of an epoch",
}
TOP_KEYS = ("budget", "trials", "seed", "seed_per_trial", "objective", "optimizers", "base")


@dataclass(frozen=True)
class Range:
    """One hyperparameter's range: ``low`` to ``high``, sampled log-uniformly when ``log``."""

    low: float
    high: float
    log: bool


def load_space(exp: Experiment, path: Optional[str] = None) -> dict:
    """``space.yaml`` checked: ``{"budget": {dotted key: value}, "trials": int, "seed": int,
    "seed_per_trial": bool, "objective": a name of OBJECTIVES, "optimizers": {name: {hp: Range}}}``."""
    import optimizers

    from ..config import as_number, flatten, read_yaml

    path = Path(path) if path else exp.configs / "space.yaml"
    if not path.is_file():
        raise UsageError(f"{exp.name} has no search space: {path} is missing")
    raw = read_yaml(path)
    if "base" in raw:  # a preset: another space file (beside this one) with some keys replaced
        base = path.parent / str(raw.pop("base"))
        if not base.is_file() or base.resolve() == path.resolve():
            raise UsageError(f"{path}: base must name another space file beside it, got {base.name!r}")
        raw = {**read_yaml(base), **raw}
    unknown = sorted(set(raw) - set(TOP_KEYS))
    if unknown:
        raise UsageError(f"{path}: unknown top-level key(s) {', '.join(unknown)}; valid: {', '.join(TOP_KEYS)}")
    trials = raw.get("trials", 100)
    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
        raise UsageError(f"{path}: trials must be a positive integer, got {trials!r}")
    seed = raw.get("seed", paper_seeds(exp)[0])
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise UsageError(f"{path}: seed must be a non-negative integer, got {seed!r}")
    seed_per_trial = raw.get("seed_per_trial", False)
    if not isinstance(seed_per_trial, bool):
        raise UsageError(f"{path}: seed_per_trial must be true or false, got {seed_per_trial!r}")
    objective = raw.get("objective", "best")
    if objective not in OBJECTIVES:
        raise UsageError(f"{path}: objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
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
    return {"budget": flatten(raw.get("budget") or {}), "trials": trials, "seed": seed,
            "seed_per_trial": seed_per_trial, "objective": objective, "optimizers": spaces, "path": path}


def optimizer_space(space: dict, optimizer: str) -> dict[str, Range]:
    """The ranges of ``optimizer`` in a loaded space; a one-line UsageError if it has none."""
    if optimizer not in space["optimizers"]:
        raise UsageError(f"{space['path']} has no search space for {optimizer!r}; "
                         f"valid: {', '.join(space['optimizers'])}")
    return space["optimizers"][optimizer]


def budget_sets(budget: dict, config: Optional[str]) -> list[str]:
    """The budget as ``--set`` items, minus keys a user ``--config`` file sets itself
    (so ``--config nano/configs/smoke.yaml`` keeps its tiny ``train.max_iters``)."""
    import optimizers

    from ..config import flatten, read_yaml

    own = set()
    if config:
        for top, value in read_yaml(Path(config)).items():
            if top not in optimizers.NAMES:
                own |= set(flatten({top: value}) if isinstance(value, dict) else {top: value})
    return [set_arg(k, v) for k, v in budget.items() if k not in own]


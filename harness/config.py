"""Configuration: the experiment's protocol, the optimizer's tuned values, overrides.

A resolved config is a nested dict of plain values::

    experiment: nano            # the folder name
    seed: 1337
    optimizer: {name: cadam, h: 0.008276, gamma: 9.474, c: 0.952, alpha: 8.829}
    data: {...}  model: {...}  train: {...}
    wandb: false

It is built, in order of increasing precedence, from
1. ``<exp>/configs/paper.yaml``   the protocol: every valid key with its default;
2. ``<exp>/configs/best.yaml``    ``{optimizer name: {hyperparameter: value}}``;
3. ``--config FILE``              any protocol sections to override, and/or
                                  best.yaml-style ``{optimizer name: {...}}`` entries;
4. ``--set key=value``            dotted keys (``train.max_iters=200``,
                                  ``optimizer.h=0.3``), values parsed as YAML.

Only keys that exist in paper.yaml (or, under ``optimizer.``, the chosen
optimizer's hyperparameters) are accepted, and a value must have the type of
the default it replaces (an int is accepted for a float).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml

from .errors import UsageError

REPO = Path(__file__).resolve().parents[1]


def read_yaml(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"config file not found: {path}")
    with open(path) as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise UsageError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"{path} must hold a mapping at top level, got {type(data).__name__}")
    return data


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; leaves are anything but dicts."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def as_number(value: Any) -> Any:
    """YAML 1.1 reads ``1e-3`` (no dot) as a string: read such strings as numbers."""
    if isinstance(value, str):
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
    return value


def _check_type(key: str, value: Any, default: Any) -> Any:
    """``value`` if it may replace ``default``; ints widen to floats."""
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        value = as_number(value)
    if default is None or value is None:
        return value
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(default, bool) and isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float))
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int)
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise UsageError(
            f"bad type for {key}: {value!r} is {type(value).__name__}, expected {type(default).__name__} "
            f"(like the default {default!r})"
        )
    return value


def _set(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


def parse_set(item: str) -> tuple[str, Any]:
    """``"train.max_iters=200"`` -> ``("train.max_iters", 200)`` (value parsed as YAML)."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise UsageError(f"--set expects key=value, got {item!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def resolve(
    experiment: str,
    optimizer: str,
    seed: int,
    config_file: Optional[str] = None,
    sets: Iterable[str] = (),
    configs_dir: Optional[Path] = None,
) -> dict:
    """The fully resolved config of one run; raises UsageError on any bad key or value."""
    import optimizers  # here, not at the top: tools that only read configs need no torch

    configs_dir = Path(configs_dir) if configs_dir else REPO / experiment / "configs"
    name = str(optimizer).lower()
    if name not in optimizers.NAMES:
        raise UsageError(f"unknown optimizer {optimizer!r}; valid: {', '.join(optimizers.NAMES)}")

    protocol = read_yaml(configs_dir / "paper.yaml")
    best = read_yaml(configs_dir / "best.yaml")
    cfg = copy.deepcopy(protocol)
    cfg.update(experiment=experiment, seed=int(seed))
    cfg.setdefault("wandb", False)
    defaults = flatten(cfg)
    optim = optimizers.info(name)
    hp_names = optim.hyperparameters + optim.switches
    hyper = dict(best.get(name) or {})

    def apply(key: str, value: Any, origin: str) -> None:
        if key.startswith("optimizer."):
            hp = key[len("optimizer."):]
            if hp == "name":
                raise UsageError(f"{origin}: choose the optimizer with --optimizer, not {key}")
            if hp not in hp_names:
                raise UsageError(
                    f"{origin}: unknown key {key} for optimizer {name}; valid: "
                    + ", ".join(f"optimizer.{k}" for k in hp_names)
                )
            if hp in optim.switches:  # code paths and maximize: true/false (or null where that is the default)
                nullable = optim.defaults[hp] is None
                if not isinstance(value, bool) and not (nullable and value is None):
                    raise UsageError(f"{origin}: bad type for {key}: {value!r}, expected true, false"
                                     + (" or null" if nullable else ""))
            else:
                value = as_number(value)
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise UsageError(f"{origin}: bad type for {key}: {value!r}, expected a number")
            hyper[hp] = value
            return
        if key not in defaults:
            valid = sorted(defaults) + [f"optimizer.{k}" for k in hp_names]
            raise UsageError(f"{origin}: unknown key {key!r}; valid keys: {', '.join(valid)}")
        _set(cfg, key, _check_type(key, value, defaults[key]))

    if config_file:
        for top, value in read_yaml(Path(config_file)).items():
            if top in optimizers.NAMES:  # best.yaml format (e.g. a sweep's export)
                if top == name:
                    for hp, v in (value or {}).items():
                        apply(f"optimizer.{hp}", v, str(config_file))
                continue
            sub = flatten({top: value}) if isinstance(value, dict) else {top: value}
            for key, v in sub.items():
                apply(key, v, str(config_file))
    for item in sets:
        key, value = parse_set(item)
        apply(key, value, "--set")

    for hp in hyper:
        if hp not in optim.switches:
            hyper[hp] = as_number(hyper[hp])
        if hp not in hp_names:
            raise UsageError(f"best.yaml: unknown hyperparameter {hp} for {name}; valid: {', '.join(hp_names)}")
    try:  # validate the values now, before any run directory is touched
        import torch

        optimizers.build(name, [torch.zeros(1, requires_grad=True)], **hyper)
    except ValueError as e:
        raise UsageError(str(e)) from None
    cfg["optimizer"] = {"name": name, **hyper}
    return cfg


def dump(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None)

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
from typing import Any, Iterable, Optional, Sequence

import yaml

from .errors import UsageError

REPO = Path(__file__).resolve().parents[1]


def read_yaml(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"config file not found: {path}")
    with open(path, "rb") as f:
        try:
            data = yaml.safe_load(f.read().decode())
        except UnicodeDecodeError:
            raise UsageError(f"{path} is not valid YAML: not UTF-8 text") from None
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


def _optimizer_value(optim, key: str, value: Any, origin: str) -> Any:
    """``value`` checked for ``optimizer.<hp>`` (``key``) of the optimizer ``optim`` (an OptimInfo)."""
    hp = key[len("optimizer."):]
    names = optim.hyperparameters + optim.switches
    if hp == "name":
        raise UsageError(f"{origin}: choose the optimizer with --optimizer, not {key}")
    if hp not in names:
        raise UsageError(f"{origin}: unknown key {key} for optimizer {optim.name}; valid: "
                         + ", ".join(f"optimizer.{k}" for k in names))
    if hp in optim.switches:  # code paths and maximize: true/false (or null where that is the default)
        nullable = optim.defaults[hp] is None
        if not isinstance(value, bool) and not (nullable and value is None):
            raise UsageError(f"{origin}: bad type for {key}: {value!r}, expected true, false"
                             + (" or null" if nullable else ""))
        return value
    value = as_number(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f"{origin}: bad type for {key}: {value!r}, expected a number")
    return value


def _overrides(config_file: Optional[str], sets: Iterable[str], name: str, names: Sequence[str]):
    """``(dotted key, value, origin)`` of every override, in order of precedence: the
    ``--config`` file (protocol sections, and ``name``'s entry of a best.yaml-style file;
    the other optimizers' entries are skipped), then each ``--set``."""
    if config_file:
        for top, value in read_yaml(Path(config_file)).items():
            if top in names:  # best.yaml format (e.g. a sweep's export)
                if top == name:
                    for hp, v in (value or {}).items():
                        yield f"optimizer.{hp}", v, str(config_file)
                continue
            for key, v in (flatten({top: value}) if isinstance(value, dict) else {top: value}).items():
                yield key, v, str(config_file)
    for item in sets:
        yield (*parse_set(item), "--set")


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
    optim = optimizers.info(name)
    hp_names = optim.hyperparameters + optim.switches

    cfg = copy.deepcopy(read_yaml(configs_dir / "paper.yaml"))
    cfg.update(experiment=experiment, seed=int(seed))
    cfg.setdefault("wandb", False)
    defaults = flatten(cfg)
    hyper = dict(read_yaml(configs_dir / "best.yaml").get(name) or {})
    for key, value, origin in _overrides(config_file, sets, name, optimizers.NAMES):
        if key.startswith("optimizer."):
            hyper[key[len("optimizer."):]] = _optimizer_value(optim, key, value, origin)
        elif key in defaults:
            _set(cfg, key, _check_type(key, value, defaults[key]))
        else:
            valid = sorted(defaults) + [f"optimizer.{k}" for k in hp_names]
            raise UsageError(f"{origin}: unknown key {key!r}; valid keys: {', '.join(valid)}")

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
    check_values(cfg)
    return cfg


# Values that make no sense whatever the experiment (the keys an experiment's paper.yaml holds):
# counts of at least 1, amounts of at least 0, and probabilities.
AT_LEAST_1 = ("train.batch_size", "train.eval_interval", "train.eval_iters", "train.eval_batch_size",
              "train.log_interval", "train.gradient_accumulation_steps", "train.epochs", "train.evals_per_epoch",
              "data.block_size", "data.max_length", "model.block_size", "model.vocab_size", "model.n_layer",
              "model.n_head", "model.n_embd", "model.n_layers", "model.n_heads", "model.dim", "model.hidden_dim",
              "model.img_size", "model.patch_size", "model.embed_dim", "model.depth", "model.num_heads",
              "model.width", "model.max_position_embeddings")
AT_LEAST_0 = ("train.max_iters", "train.grad_clip", "data.subset")
PROBABILITIES = ("model.dropout", "model.drop_rate", "model.attention_dropout", "model.seq_classif_dropout")
# Keys with a fixed set of values (nano/model.py SCALED_INIT: which residual projections get
# GPT-2's scaled init; harness/cifar10.py NORMALIZE: the images' per-channel statistics).
CHOICES = {"model.scaled_init": ("all", "mlp"), "data.normalize": ("fixed", "computed")}
# (width, heads): attention splits the width evenly over the heads.
DIVISIBLE = (("model.n_embd", "model.n_head"), ("model.dim", "model.n_heads"), ("model.embed_dim", "model.num_heads"),
             ("model.img_size", "model.patch_size"))


def check_values(cfg: dict) -> None:
    """A one-line UsageError for a value no run can use: a count below 1 (an evaluation
    interval of 0, say), a negative amount, a dropout outside [0, 1), a width its heads do not
    divide, a ``train.diverge_factor`` other than 0 (off) or above 1. Null means "the
    model's default" where a key allows it, and is not checked."""
    flat = flatten(cfg)
    for keys, low, what in ((AT_LEAST_1, 1, "an integer >= 1"), (AT_LEAST_0, 0, "a number >= 0")):
        for key in keys:
            value = flat.get(key)
            if value is not None and not (value >= low and (low == 0 or isinstance(value, int))):
                raise UsageError(f"{key} must be {what}, got {value!r}")
    for key in PROBABILITIES:
        value = flat.get(key)
        if value is not None and not 0 <= value < 1:
            raise UsageError(f"{key} must be in [0, 1), got {value!r}")
    for width, heads in DIVISIBLE:
        if flat.get(width) and flat.get(heads) and flat[width] % flat[heads]:
            raise UsageError(f"{width} = {flat[width]} must be a multiple of {heads} = {flat[heads]}")
    for key, valid in CHOICES.items():
        if key in flat and flat[key] not in valid:
            raise UsageError(f"{key} must be one of {', '.join(valid)}, got {flat[key]!r}")
    factor = flat.get("train.diverge_factor")
    if factor is not None and not (factor == 0 or factor > 1):
        raise UsageError(f"train.diverge_factor must be 0 (off) or above 1 (x the first evaluated loss), "
                         f"got {factor!r}")


def dump(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None)

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
the default it replaces (an int is accepted for a float). Values are then
checked where their meaning is stated: the optimizer's by its constructor, the
``train`` section by its schema here (``TrainConfig``, kept on ``Run.train``),
the ``model`` section (and an experiment's own ``data`` keys) by the
experiment's model config (``experiment_module``).
"""
from __future__ import annotations

import copy
import importlib
import re
from dataclasses import dataclass, fields
from pathlib import Path
from types import ModuleType
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


def resolve_run(
    experiment: str,
    optimizer: str,
    seed: int,
    config_file: Optional[str] = None,
    sets: Iterable[str] = (),
    configs_dir: Optional[Path] = None,
) -> tuple[dict, "TrainConfig"]:
    """The fully resolved config of one run and its ``train`` section as the schema
    (``TrainConfig``); raises UsageError on any bad key or value, before anything is written:
    the keys and types against paper.yaml, the optimizer's hyperparameters, the ``train``
    section by the schema and the experiment's own sections by the experiment
    (``experiment_module(...).check_config``: its model config)."""
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
    origins = dict.fromkeys(hyper, "best.yaml")  # where each value came from, for the error below
    for key, value, origin in _overrides(config_file, sets, name, optimizers.NAMES):
        if key.startswith("optimizer."):
            hp = key[len("optimizer."):]
            hyper[hp], origins[hp] = _optimizer_value(optim, key, value, origin), origin
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
        # The optimizers' messages (and torch's) name the value: "Invalid h: ...", "Invalid learning rate: ..."
        bad = re.match(r"Invalid (learning rate|\w+):", str(e))
        hp = ("lr" if bad.group(1) == "learning rate" else bad.group(1)) if bad else None
        raise UsageError(f"{origins[hp]}: optimizer.{hp}: {e}" if hp in origins else str(e)) from None
    cfg["optimizer"] = {"name": name, **hyper}
    train = TrainConfig.from_section(cfg.get("train") or {})
    experiment_module(experiment).check_config(cfg)
    return cfg, train


def resolve(experiment: str, optimizer: str, seed: int, config_file: Optional[str] = None,
            sets: Iterable[str] = (), configs_dir: Optional[Path] = None) -> dict:
    """The fully resolved config of one run (``resolve_run``'s, without the schema)."""
    return resolve_run(experiment, optimizer, seed, config_file, sets, configs_dir)[0]


def experiment_module(experiment: str) -> ModuleType:
    """The training module of ``experiment`` (``nano`` -> ``nano.train``, ``bert-sst2`` ->
    ``bert.train``): what the harness knows of an experiment's own config sections comes
    from it, so that the harness names none of their keys:

    - ``check_config(cfg)``: a one-line UsageError for a ``model`` (or the experiment's own
      ``data``) value no run can use, raised by the experiment's model config (e.g.
      ``nano.model.GPTConfig.__post_init__``);
    - ``BEHAVIOUR_OF_OLDER_RUNS``: its keys added after runs were started (see the harness's
      ``BEHAVIOUR_OF_OLDER_RUNS``)."""
    return importlib.import_module(f"{experiment.partition('-')[0]}.train")


# ---------------------------------------------------------------- value checks
# The one wording of each rule, for the schema below and for the experiments' model configs.

def check_count(key: str, value: Any) -> None:
    """A count: an integer >= 1. None (the default, where a key allows it) is not checked."""
    if value is not None and not (isinstance(value, int) and value >= 1):
        raise UsageError(f"{key} must be an integer >= 1, got {value!r}")


def check_amount(key: str, value: Any) -> None:
    """An amount: a number >= 0. None (the default, where a key allows it) is not checked."""
    if value is not None and not value >= 0:
        raise UsageError(f"{key} must be a number >= 0, got {value!r}")


def check_probability(key: str, value: Any) -> None:
    """A dropout rate in [0, 1); None (the model's default) is not checked."""
    if value is not None and not 0 <= value < 1:
        raise UsageError(f"{key} must be in [0, 1), got {value!r}")


def check_multiple(width_key: str, width: Any, heads_key: str, heads: Any) -> None:
    """``width`` divisible by ``heads`` (attention splits the width evenly over the heads);
    not checked when either is unset (None or 0: refused by ``check_count``)."""
    if width and heads and width % heads:
        raise UsageError(f"{width_key} = {width} must be a multiple of {heads_key} = {heads}")


def check_choice(key: str, value: Any, valid: Sequence[str]) -> None:
    if value not in valid:
        raise UsageError(f"{key} must be one of {', '.join(valid)}, got {value!r}")


# ---------------------------------------------------------------- the train schema

PRECISIONS = ("fp32", "fp16", "bf16")
CPU_PRECISIONS = ("fp32", "bf16")  # CPU autocast in fp16 is emulated: slow, and not what the paper's GPUs did
# How a language model's validation loss is estimated (``train.eval_batches``, read by
# ``harness.data.LMEvaluation``):
#   fixed  the same ``eval_iters`` batches at every evaluation (a generator seeded by the run
#          seed), so successive points of a curve differ only through the model;
#   fresh  new random batches at every evaluation (nanoGPT's ``estimate_loss``, the paper's
#          estimator), from a generator whose state is checkpointed, so a resumed run draws
#          what the uninterrupted one would have. The minimum over a run of such noisy
#          estimates is biased low, which is why both can be recorded.
ESTIMATORS = ("fixed", "fresh")


@dataclass(frozen=True)
class TrainConfig:
    """The ``train`` section, typed and checked: every key an experiment's paper.yaml may
    hold, with the value a config without it gets. Built once per run (``resolve_run``) and
    kept on ``Run.train``; paper.yaml states each experiment's values, ``resolve`` the types.

    The length of a run is ``max_iters`` optimizer steps (nano, owt, gpt2) or ``epochs``
    passes over the training set (vit, cifar, bert); the keys an experiment does not use
    are None.
    """

    batch_size: int  # examples (sequences, images) per optimizer step: the global batch, over all
    #                  ranks and micro-batches (``Run.micro_batch_size``)
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step on each rank
    grad_clip: float = 0.0  # global grad-norm clipping; 0 = none
    log_interval: int = 10  # steps between divergence checks and progress updates
    compile: bool = False  # torch.compile the model
    parallel: str = "ddp"  # with several processes: ddp (replicas) or fsdp2 (sharded)
    precision: str = "fp32"  # on CUDA: fp32, fp16 (autocast + GradScaler) or bf16
    cpu_precision: str = "fp32"  # on the CPU: fp32, or bf16 (autocast; to measure what low precision changes)
    diverge_factor: float = 0.0  # an evaluated loss above this x the first evaluation's: diverged; 0 = off
    tf32: bool = False  # on CUDA: TF32 tensor cores for float32 matmuls; false = torch's default (off)
    max_iters: Optional[int] = None  # optimizer steps in all
    epochs: Optional[int] = None  # passes over the training set
    eval_interval: Optional[int] = None  # steps between evaluations
    eval_iters: Optional[int] = None  # validation batches per evaluation
    eval_batches: tuple[str, ...] = ("fixed",)  # validation estimators (``ESTIMATORS``); the first is ``loss``
    eval_batch_size: Optional[int] = None  # examples per evaluation batch
    evals_per_epoch: Optional[int] = None  # evaluations per epoch
    keep_best: bool = False  # keep the best validation weights and test them at the end (cifar)

    def __post_init__(self):
        from .parallel import PARALLEL

        for name in ("batch_size", "eval_interval", "eval_iters", "eval_batch_size", "log_interval",
                     "gradient_accumulation_steps", "epochs", "evals_per_epoch"):
            check_count(f"train.{name}", getattr(self, name))
        for name in ("max_iters", "grad_clip"):
            check_amount(f"train.{name}", getattr(self, name))
        factor = self.diverge_factor
        if not (factor == 0 or factor > 1):
            raise UsageError(f"train.diverge_factor must be 0 (off) or above 1 (x the first evaluated loss), "
                             f"got {factor!r}")
        if self.parallel not in PARALLEL:
            raise UsageError(f"train.parallel must be {' or '.join(PARALLEL)}, got {self.parallel!r}")
        if self.precision not in PRECISIONS:
            raise UsageError(f"train.precision must be {', '.join(PRECISIONS[:-1])} or {PRECISIONS[-1]}, "
                             f"got {self.precision!r}")
        if self.cpu_precision not in CPU_PRECISIONS:
            raise UsageError(f"train.cpu_precision must be fp32 or bf16, got {self.cpu_precision!r}")
        value = self.eval_batches
        names = [value] if isinstance(value, str) else list(value or [])
        if not names or len(set(names)) != len(names) or not set(names) <= set(ESTIMATORS):
            raise UsageError(f"train.eval_batches must be a non-empty list of distinct estimators from "
                             f"{', '.join(ESTIMATORS)}, got {value!r}")
        object.__setattr__(self, "eval_batches", tuple(names))

    @classmethod
    def from_section(cls, train: dict) -> "TrainConfig":
        """The schema of a resolved config's ``train`` section; null means the default."""
        keys = {f.name for f in fields(cls)}
        unknown = sorted(set(train) - keys)
        if unknown:
            raise UsageError(f"train.{unknown[0]} is not a key of the train schema (harness.config.TrainConfig); "
                             f"valid: {', '.join(f'train.{k}' for k in sorted(keys))}")
        if train.get("batch_size") is None:
            raise UsageError("train.batch_size must be an integer >= 1, got None")
        return cls(**{k: v for k, v in train.items() if v is not None})


# Keys added to the configs after runs were started, with the value that does what those
# runs did: a saved config without the key matches a config holding that value. The
# experiments' own keys are in their training modules' BEHAVIOUR_OF_OLDER_RUNS.
BEHAVIOUR_OF_OLDER_RUNS = {"train.diverge_factor": 0.0, "train.parallel": "ddp", "train.eval_batches": ["fixed"],
                           "train.cpu_precision": "fp32", "train.tf32": True}


def config_mismatch(where: Path, old: Optional[dict], cfg: dict, older: Optional[dict] = None) -> None:
    """A one-line UsageError naming the keys that differ when ``old`` (a config found in
    ``where``) is not ``cfg``; nothing when ``old`` is None or equal. A key ``old`` lacks
    matches the value of ``BEHAVIOUR_OF_OLDER_RUNS`` (and of ``older``: the experiment's)."""
    if old is None or old == cfg:
        return
    a, b = flatten(old), flatten(cfg)
    missing = object()
    compatible = {**BEHAVIOUR_OF_OLDER_RUNS, **(older or {})}
    diff = sorted(k for k in set(a) | set(b) if a.get(k, missing) != b.get(k, missing)
                  and not (k not in a and b[k] == compatible.get(k, missing)))
    if not diff:
        return
    raise UsageError(f"{where} holds a run with a different config ({', '.join(diff)}); "
                     "resume it with the same arguments or choose another --out")


def dump(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None)

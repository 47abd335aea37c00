"""One registry from the paper's optimizer names to constructors and their facts (as timm's
``OptimInfo``): what the harness, the sweeps and the report need to know about an optimizer
is stated here once, not guessed from its name."""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from .cadam import CADAM
from .cd import CD
from .ikfad import iKFAD
from .ldhd import LDHD

__all__ = ["NAMES", "OptimInfo", "build", "hyperparameter_names", "info", "sort_key"]


def _adam(params, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, maximize=False, foreach=None,
          fused=None):
    return torch.optim.Adam(params, lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay,
                            maximize=maximize, foreach=foreach, fused=fused)


def _msgd(params, lr=1e-2, momentum=0.9, weight_decay=0.0, maximize=False, foreach=None, fused=None):
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, maximize=maximize,
                           foreach=foreach, fused=fused)


def _without_gamma(cls):
    """The paper's "0" ablations: the same optimizer with gamma fixed to 0."""

    def make(params, **hyperparameters):
        return cls(params, gamma=0.0, **hyperparameters)

    signature = inspect.signature(cls)
    make.__signature__ = signature.replace(parameters=[p for p in signature.parameters.values() if p.name != "gamma"])
    return make


@dataclass(frozen=True)
class OptimInfo:
    """What the harness knows about one optimizer name.

    ``hyperparameters`` are the numeric keyword arguments of ``constructor`` (read from
    its signature), ``switches`` its boolean or None ones (code paths, ``maximize``),
    ``step_size`` the hyperparameter that plays the step size (the one a robustness scan
    multiplies: ``h`` for the damped dynamics, ``lr`` for Adam and mSGD), ``label`` the
    display name; the registry's order is the report's.
    """

    name: str
    constructor: Callable
    step_size: str
    label: str
    description: str

    def _keywords(self) -> list[inspect.Parameter]:
        return [p for p in inspect.signature(self.constructor).parameters.values()
                if p.name != "params" and p.kind is p.POSITIONAL_OR_KEYWORD]

    @property
    def hyperparameters(self) -> tuple[str, ...]:
        return tuple(p.name for p in self._keywords() if not (p.default is None or isinstance(p.default, bool)))

    @property
    def switches(self) -> tuple[str, ...]:
        return tuple(p.name for p in self._keywords() if p.default is None or isinstance(p.default, bool))

    @property
    def defaults(self) -> dict:
        return {p.name: p.default for p in self._keywords()}


_INFOS = [
    OptimInfo("adam", _adam, "lr", "Adam", "torch.optim.Adam (keys beta1, beta2 for its betas)"),
    OptimInfo("msgd", _msgd, "lr", "mSGD", "torch.optim.SGD with momentum (no dampening, no Nesterov)"),
    OptimInfo("ldhd", LDHD, "h", "LDHD", "linearly damped Hamiltonian dynamics (the momentum-SGD baseline)"),
    OptimInfo("cd", CD, "h", "CD", "cubic damping"),
    OptimInfo("cd0", _without_gamma(CD), "h", "CD0", "cubic damping with gamma = 0"),
    OptimInfo("ikfad", iKFAD, "h", "iKFAD", "individual kinetic friction-adaptive descent"),
    OptimInfo("ikfad0", _without_gamma(iKFAD), "h", "iKFAD0", "iKFAD with gamma = 0"),
    OptimInfo("cadam", CADAM, "h", "CADAM", "cubically damped Adam dynamics"),
    OptimInfo("cadam0", _without_gamma(CADAM), "h", "CADAM0", "CADAM with gamma = 0"),
]
_REGISTRY: dict[str, OptimInfo] = {i.name: i for i in _INFOS}

NAMES: tuple[str, ...] = tuple(_REGISTRY)


def info(name: str) -> OptimInfo:
    """The facts of optimizer ``name`` (case-insensitive, one of ``NAMES``)."""
    key = str(name).lower()
    if key not in _REGISTRY:
        raise ValueError(f"Unknown optimizer {name!r}; valid names: {', '.join(NAMES)}")
    return _REGISTRY[key]


def hyperparameter_names(name: str) -> tuple[str, ...]:
    """The keyword arguments that ``build(name, ...)`` accepts: hyperparameters, then switches."""
    i = info(name)
    return i.hyperparameters + i.switches


def sort_key(name: str):
    """Registry order (the paper's), unknown names last and alphabetically."""
    key = str(name).lower()
    return (NAMES.index(key) if key in NAMES else len(NAMES), key)


def build(name: str, params: Iterable, **hyperparameters) -> torch.optim.Optimizer:
    """Construct the optimizer called ``name`` (case-insensitive, one of ``NAMES``).

    ``adam`` is ``torch.optim.Adam`` (keys lr, beta1, beta2, eps), ``msgd`` is
    ``torch.optim.SGD`` with momentum (keys lr, momentum), ``ldhd``/``cd``/
    ``ikfad``/``cadam`` are this package's optimizers with their constructor
    keywords, and ``cd0``/``ikfad0``/``cadam0`` fix gamma = 0 (so refuse a
    ``gamma`` key). Missing keys take the constructor defaults.
    """
    keys = hyperparameter_names(name)
    unknown = sorted(set(hyperparameters) - set(keys))
    if unknown:
        raise ValueError(
            f"Unknown hyperparameter(s) {', '.join(unknown)} for optimizer {name!r}; "
            f"valid: {', '.join(keys)}"
        )
    return info(name).constructor(params, **hyperparameters)

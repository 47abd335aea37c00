"""One registry from the paper's optimizer names to constructors (as timm's factory)."""
from __future__ import annotations

from typing import Callable, Iterable

import torch

from .cadam import CADAM
from .cd import CD
from .ikfad import iKFAD
from .ldhd import LDHD

__all__ = ["NAMES", "build", "hyperparameter_names"]


def _adam(params, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
    return torch.optim.Adam(params, lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay)


def _msgd(params, lr=1e-2, momentum=0.9, weight_decay=0.0):
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def _without_gamma(cls):
    """The paper's "0" ablations: the same optimizer with gamma fixed to 0."""

    def make(params, **hyperparameters):
        return cls(params, gamma=0.0, **hyperparameters)

    return make


# Keys every damped-dynamics optimizer takes besides its own hyperparameters.
_COMMON = ("lr", "weight_decay", "maximize", "foreach", "fused")

# name -> (constructor, the hyperparameter keys it accepts)
_REGISTRY: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "adam": (_adam, ("lr", "beta1", "beta2", "eps", "weight_decay")),
    "msgd": (_msgd, ("lr", "momentum", "weight_decay")),
    "ldhd": (LDHD, ("h", "gamma", *_COMMON)),
    "cd": (CD, ("h", "gamma", "c", *_COMMON)),
    "cd0": (_without_gamma(CD), ("h", "c", *_COMMON)),
    "ikfad": (iKFAD, ("h", "alpha", "mu", "gamma", *_COMMON)),
    "ikfad0": (_without_gamma(iKFAD), ("h", "alpha", "mu", *_COMMON)),
    "cadam": (CADAM, ("h", "gamma", "c", "alpha", "eps", *_COMMON)),
    "cadam0": (_without_gamma(CADAM), ("h", "c", "alpha", "eps", *_COMMON)),
}

NAMES: tuple[str, ...] = tuple(_REGISTRY)


def _lookup(name: str):
    key = str(name).lower()
    if key not in _REGISTRY:
        raise ValueError(f"Unknown optimizer {name!r}; valid names: {', '.join(NAMES)}")
    return _REGISTRY[key]


def hyperparameter_names(name: str) -> tuple[str, ...]:
    """The keyword arguments that ``build(name, ...)`` accepts."""
    return _lookup(name)[1]


def build(name: str, params: Iterable, **hyperparameters) -> torch.optim.Optimizer:
    """Construct the optimizer called ``name`` (case-insensitive, one of ``NAMES``).

    ``adam`` is ``torch.optim.Adam`` (keys lr, beta1, beta2, eps), ``msgd`` is
    ``torch.optim.SGD`` with momentum (keys lr, momentum), ``ldhd``/``cd``/
    ``ikfad``/``cadam`` are this package's optimizers with their constructor
    keywords, and ``cd0``/``ikfad0``/``cadam0`` fix gamma = 0 (so refuse a
    ``gamma`` key). Missing keys take the constructor defaults.
    """
    constructor, keys = _lookup(name)
    unknown = sorted(set(hyperparameters) - set(keys))
    if unknown:
        raise ValueError(
            f"Unknown hyperparameter(s) {', '.join(unknown)} for optimizer {name!r}; "
            f"valid: {', '.join(keys)}"
        )
    return constructor(params, **hyperparameters)

"""Shared machinery of the damped-dynamics optimizers.

Every optimizer here integrates a system of ODEs in the parameters ``q`` and
per-element state (a momentum ``p`` and, for iKFAD and CADAM, one more
variable) by operator splitting: each sub-step is the *exact* flow of one piece
of the vector field over one time step ``h``. The sub-steps below are the only
place the arithmetic of a piece lives; each optimizer module strings them
together in the order of ``spec/optimizers.md``.

Each sub-step exists twice: a single-tensor form (plain tensor ops, the
readable reference) and a multi-tensor form on ``torch._foreach_*`` ops. The
two forms perform the same floating-point operations in the same order, so
the two paths of every optimizer agree to rounding.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["DampedOptimizer"]


def decay_factor(rate: float, h: float) -> float:
    """``exp(-rate h)``: the factor by which x' = -rate x shrinks x over time h."""
    return math.exp(-rate * h)


def relax_weight(rate: float, h: float) -> float:
    """``(1 - exp(-rate h)) / rate``: the weight of a frozen source in the exact
    solution of x' = s - rate x over time h (see ``relax``)."""
    return -math.expm1(-rate * h) / rate


# ----------------------------------------------------------------------------
# Sub-steps, single tensor. ``p`` momentum, ``g`` gradient, ``q`` parameter.
# ----------------------------------------------------------------------------

def kick(p: Tensor, g: Tensor, h: float) -> None:
    """Exact flow of p' = -g over time h: ``p <- p - h g``."""
    p.add_(g, alpha=-h)


def drift(q: Tensor, p: Tensor, h: float) -> None:
    """Exact flow of q' = p over time h: ``q <- q + h p``."""
    q.add_(p, alpha=h)


def scale(x: Tensor, factor: float) -> None:
    """Exact flow of x' = -k x over time h, with ``factor = exp(-k h)``.

    Used for linear friction (k = gamma) and decoupled weight decay (k = lambda).
    A factor of exactly 1 is skipped so that gamma = 0 or lambda = 0 is an exact no-op.
    """
    if factor != 1.0:
        x.mul_(factor)


def cubic_damping(p: Tensor, c: float, h: float) -> None:
    """Exact flow of p' = -c p^3 over time h: ``p <- p / sqrt(1 + 2 c h p^2)``."""
    if c != 0.0:
        p.div_(torch.sqrt(p.square().mul_(2.0 * c * h).add_(1.0)))


def relax(x: Tensor, source: Tensor, decay: float, weight: float) -> None:
    """Exact flow of x' = s - a x over time h for a frozen source s.

    With ``decay = exp(-a h)`` and ``s = weight_raw * source^2`` the solution is
    ``x <- decay x + (1 - decay) s / a``; the caller folds ``(1 - decay)/a`` and
    any constant of s into ``weight``, so this computes ``x <- decay x + weight source^2``.
    """
    x.mul_(decay).addcmul_(source, source, value=weight)


def friction(p: Tensor, xi: Tensor, h: float) -> None:
    """Exact flow of p' = -xi p over time h with xi frozen: ``p <- exp(-h xi) p``."""
    p.mul_(torch.exp(xi * -h))


def preconditioned_drift(q: Tensor, p: Tensor, zeta: Tensor, h: float, eps: float) -> None:
    """Exact flow of q' = p / (sqrt(zeta) + eps) over time h (p, zeta frozen)."""
    q.addcdiv_(p, torch.sqrt(zeta).add_(eps), value=h)


# ----------------------------------------------------------------------------
# Sub-steps, multi tensor: the same operations on lists, via torch._foreach_*.
# ----------------------------------------------------------------------------

def foreach_kick(ps: list[Tensor], gs: list[Tensor], h: float) -> None:
    torch._foreach_add_(ps, gs, alpha=-h)


def foreach_drift(qs: list[Tensor], ps: list[Tensor], h: float) -> None:
    torch._foreach_add_(qs, ps, alpha=h)


def foreach_scale(xs: list[Tensor], factor: float) -> None:
    if factor != 1.0:
        torch._foreach_mul_(xs, factor)


def foreach_cubic_damping(ps: list[Tensor], c: float, h: float) -> None:
    if c != 0.0:
        denom = torch._foreach_mul(ps, ps)
        torch._foreach_mul_(denom, 2.0 * c * h)
        torch._foreach_add_(denom, 1.0)
        torch._foreach_sqrt_(denom)
        torch._foreach_div_(ps, denom)


def foreach_relax(xs: list[Tensor], sources: list[Tensor], decay: float, weight: float) -> None:
    torch._foreach_mul_(xs, decay)
    torch._foreach_addcmul_(xs, sources, sources, value=weight)


def foreach_friction(ps: list[Tensor], xis: list[Tensor], h: float) -> None:
    factor = torch._foreach_mul(xis, -h)
    torch._foreach_exp_(factor)
    torch._foreach_mul_(ps, factor)


def foreach_preconditioned_drift(
    qs: list[Tensor], ps: list[Tensor], zetas: list[Tensor], h: float, eps: float
) -> None:
    denom = torch._foreach_sqrt(zetas)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(qs, ps, denom, value=h)


# ----------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------

# name -> (lower bound, lower bound allowed?)
_RANGES = {
    "h": (0.0, False),
    "gamma": (0.0, True),
    "c": (0.0, True),
    "alpha": (0.0, False),
    "mu": (0.0, False),
    "eps": (0.0, True),
    "weight_decay": (0.0, True),
}


def check_hyperparameter(name: str, value: Any) -> float:
    """Return ``value`` as a float, or raise ValueError naming it and its valid range."""
    low, inclusive = _RANGES[name]
    valid = f"a finite number {'>=' if inclusive else '>'} {low:g}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"Invalid {name}: {value!r}; expected {valid} (a Python number)")
    value = float(value)
    if not math.isfinite(value) or value < low or (value == low and not inclusive):
        raise ValueError(f"Invalid {name}: {value!r}; expected {valid}")
    return value


# ----------------------------------------------------------------------------
# The optimizer base class
# ----------------------------------------------------------------------------

class DampedOptimizer(Optimizer):
    """Base class: validation, lazy state, closure handling and path selection.

    A subclass sets ``state_names`` (the per-element state tensors, created as
    zeros the first time a parameter has a gradient) and implements
    ``_single_tensor(params, grads, states, group)`` and ``_multi_tensor(...)``
    with the same signature, where ``states`` holds one list per state name,
    aligned with ``params``. ``step`` picks the path (see ``foreach``).
    """

    state_names: Sequence[str] = ("momentum",)

    def __init__(self, params: Iterable, defaults: dict, foreach: Optional[bool] = None):
        if foreach not in (None, True, False):
            raise ValueError(f"Invalid foreach: {foreach!r}; expected None, True or False")
        for name, value in defaults.items():
            defaults[name] = check_hyperparameter(name, value)
        defaults["foreach"] = foreach
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        for name in _RANGES.keys() & param_group.keys():
            param_group[name] = check_hyperparameter(name, param_group[name])
        super().add_param_group(param_group)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("foreach", None)

    def _gather(self, group: dict):
        """Parameters with a gradient, their gradients, and their state lists."""
        params, grads = [], []
        states: list[list[Tensor]] = [[] for _ in self.state_names]
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            if torch.is_complex(p):
                raise RuntimeError(f"{type(self).__name__} does not support complex parameters")
            state = self.state[p]
            if not state:
                for name in self.state_names:
                    state[name] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            for lst, name in zip(states, self.state_names):
                lst.append(state[name])
        return params, grads, states

    def _use_foreach(self, group: dict, params: list[Tensor]) -> bool:
        foreach = group["foreach"]
        if foreach is None:
            # As torch.optim does: the multi-tensor path when every tensor is on a
            # device with fast foreach kernels (CUDA), else the single-tensor loop.
            from torch.optim.optimizer import _default_to_fused_or_foreach

            _, foreach = _default_to_fused_or_foreach(params, differentiable=False, use_fused=False)
        return bool(foreach)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        """Advance the dynamics by one time step ``h`` per param group.

        ``closure`` (optional) re-evaluates the model and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, states = self._gather(group)
            if not params:
                continue
            if not self._use_foreach(group, params):
                self._single_tensor(params, grads, states, group)
                continue
            # foreach kernels want one device and dtype per call.
            buckets = Optimizer._group_tensors_by_device_and_dtype([params, grads, *states])
            for (tensors, _) in buckets.values():
                self._multi_tensor(tensors[0], tensors[1], tensors[2:], group)
        return loss

    @staticmethod
    def _single_tensor(params, grads, states, group) -> None:  # pragma: no cover
        """One step of the dynamics, a parameter at a time (the reference)."""
        raise NotImplementedError

    @staticmethod
    def _multi_tensor(params, grads, states, group) -> None:  # pragma: no cover
        """The same step on lists of tensors with torch._foreach_* kernels."""
        raise NotImplementedError

"""Shared machinery of the damped-dynamics optimizers.

Every optimizer here integrates a system of ODEs in the parameters ``q`` and
per-element state (a momentum ``p`` and, for iKFAD and CADAM, one more
variable) by operator splitting: each sub-step is the *exact* flow of one piece
of the vector field over one time step ``h``. The sub-steps below are the only
place the arithmetic of a piece lives; each optimizer module strings them
together in the order of ``spec/optimizers.md``, once, in its ``_update``.

Each sub-step exists twice: a single-tensor form (plain tensor ops, the
readable reference) and a multi-tensor form on ``torch._foreach_*`` ops. The
two forms perform the same floating-point operations in the same order (the
one difference: friction's power of two is ``exp2`` in one and ``pow(2, .)``
in the other, for want of a foreach exp2), so the two paths of every
optimizer agree to rounding.

The single-tensor forms take their coefficients (``h``, decay factors, ...)
either as Python floats, in the eager loop, or as 0-d tensors, inside the
compiled kernel of the fused path (``optimizers/_fused.py``), where
hyperparameters must be inputs of the compiled graph rather than constants
baked into it, so that a scheduler changing them never recompiles. The
compiled kernel therefore runs the very same ``_update`` as the loop. On the
CPU the fused path runs native kernels instead (``optimizers/_native.c``),
where the same sub-steps are C macros of the same names, strung together in
each optimizer's order; the tests hold both to the single-tensor loop.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import _fused, _native

__all__ = ["DampedOptimizer"]

# A sub-step coefficient: a Python float (eager paths) or a 0-d tensor (compiled kernel).
Coefficient = Union[float, Tensor]

LOG2E = 1.0 / math.log(2.0)  # log2(e): exp(x) = 2 ** (x log2 e)


def decay_factor(rate: float, h: float) -> float:
    """``exp(-rate h)``: the factor by which x' = -rate x shrinks x over time h."""
    return math.exp(-rate * h)


def relax_weight(rate: float, h: float) -> float:
    """``(1 - exp(-rate h)) / rate``: the weight of a frozen source in the exact
    solution of x' = s - rate x over time h (see ``relax``)."""
    return -math.expm1(-rate * h) / rate


def _is_number(value: Coefficient, constant: float) -> bool:
    """True when ``value`` is a Python number equal to ``constant``.

    The eager paths skip a sub-step that this makes an exact no-op, to save a
    pass over memory. A compiled kernel gets tensors and skips nothing: its
    graph must not depend on hyperparameter values, and multiplying by exactly
    1, or dividing by sqrt(1 + 0 * p^2) = 1, changes no bit anyway.
    """
    return not isinstance(value, Tensor) and value == constant


# ----------------------------------------------------------------------------
# Sub-steps, single tensor. ``p`` momentum, ``g`` gradient, ``q`` parameter.
# A Python-float coefficient uses the in-place ATen form with a scalar
# argument (one pass, no temporary); a tensor coefficient (compiled kernel)
# spells the same formula with tensor arithmetic, which Inductor fuses into
# its single loop, so the temporary never exists there either.
# ----------------------------------------------------------------------------

def kick(p: Tensor, g: Tensor, h: Coefficient) -> None:
    """Exact flow of p' = -g over time h: ``p <- p - h g``."""
    if isinstance(h, Tensor):
        p.sub_(g * h)
    else:
        p.add_(g, alpha=-h)


def drift(q: Tensor, p: Tensor, h: Coefficient) -> None:
    """Exact flow of q' = p over time h: ``q <- q + h p``."""
    if isinstance(h, Tensor):
        q.add_(p * h)
    else:
        q.add_(p, alpha=h)


def scale(x: Tensor, factor: Coefficient) -> None:
    """Exact flow of x' = -k x over time h, with ``factor = exp(-k h)``.

    Used for linear friction (k = gamma) and decoupled weight decay (k = lambda).
    A factor of exactly 1 is skipped on the eager paths (``_is_number``); either
    way gamma = 0 or lambda = 0 is an exact no-op.
    """
    if not _is_number(factor, 1.0):
        x.mul_(factor)


def cubic_damping(p: Tensor, c: Coefficient, h: Coefficient) -> None:
    """Exact flow of p' = -c p^3 over time h: ``p <- p / sqrt(1 + 2 c h p^2)``."""
    if not _is_number(c, 0.0):
        p.div_(torch.sqrt(p.square().mul_(2.0 * c * h).add_(1.0)))


def relax(x: Tensor, source: Tensor, decay: Coefficient, weight: Coefficient) -> None:
    """Exact flow of x' = s - a x over time h for a frozen source s.

    With ``decay = exp(-a h)`` and ``s = weight_raw * source^2`` the solution is
    ``x <- decay x + (1 - decay) s / a``; the caller folds ``(1 - decay)/a`` and
    any constant of s into ``weight``, so this computes ``x <- decay x + weight source^2``.
    """
    x.mul_(decay)
    if isinstance(weight, Tensor):
        x.addcmul_(source * weight, source)
    else:
        x.addcmul_(source, source, value=weight)


def friction(p: Tensor, xi: Tensor, h: Coefficient) -> None:
    """Exact flow of p' = -xi p over time h with xi frozen: ``p <- exp(-h xi) p``.

    The factor is computed as ``2 ** (xi * (-h log2 e))``: the exponent gets one
    rounding either way, so this is as accurate as ``exp(xi * -h)``, and exp2
    vectorises to fewer instructions, which makes iKFAD's compiled CPU step
    (two factors per element, compute-bound) about 15% faster.
    """
    p.mul_(torch.exp2(xi * (-h * LOG2E)))


def preconditioned_drift(q: Tensor, p: Tensor, zeta: Tensor, h: Coefficient, eps: Coefficient) -> None:
    """Exact flow of q' = p / (sqrt(zeta) + eps) over time h (p, zeta frozen)."""
    denom = torch.sqrt(zeta).add_(eps)
    if isinstance(h, Tensor):
        q.add_(p / denom * h)
    else:
        q.addcdiv_(p, denom, value=h)


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
    exponent = torch._foreach_mul(xis, -h * LOG2E)
    torch._foreach_mul_(ps, torch._foreach_pow(2.0, exponent))


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

# With ``fused=None`` on CUDA (or on a CPU where the native kernels cannot be
# built) the compiled kernel is used only when the optimizer holds at least
# this many parameter elements. Below it, a step is cheap eagerly and the
# one-off compile (a few seconds per optimizer and dtype, less with a warm
# Inductor cache) would outweigh the saving over a short run; above it the
# kernel saves several times its compile time within the first few hundred
# steps. On a CPU with the native kernels (built once per machine in about a
# second, then loaded in milliseconds) the fused path is the default at any size.
# See benchmarks/README.md for the measurements behind the number.
FUSED_DEFAULT_MIN_NUMEL = 1 << 22


def _check_flag(name: str, value: Any) -> None:
    if value not in (None, True, False):
        raise ValueError(f"Invalid {name}: {value!r}; expected None, True or False")


class DampedOptimizer(Optimizer):
    """Base class: validation, lazy state, closure handling and path selection.

    A subclass sets ``state_names`` (the per-element state tensors, created as
    zeros the first time a parameter has a gradient) and implements

    - ``_coefficients(group)``: the step's scalar coefficients (``h``, decay
      factors, ...) as a tuple of Python floats, computed once per group and step;
    - ``_update(q, g, *states, k)``: one step for ONE parameter tensor, given the
      coefficient tuple ``k``; it strings together the single-tensor sub-steps and
      is the one statement of the optimizer's arithmetic. The single-tensor loop
      calls it with floats; the fused path compiles it and calls it with ``k`` a
      1-D tensor (``optimizers/_fused.py``);
    - ``_multi_tensor(params, grads, states, group)``: the same step on lists,
      with the ``torch._foreach_*`` sub-steps.

    ``states`` holds one list per state name, aligned with ``params``.
    ``step`` picks the path (see ``foreach`` and ``fused``).
    """

    state_names: Sequence[str] = ("momentum",)
    # The name of the optimizer's kernel in optimizers/_native.c, which restates
    # ``_update`` in C; None where there is none. A subclass that overrides
    # ``_update`` without naming a kernel of its own gets None (``__init_subclass__``),
    # so the fused path compiles its ``_update`` instead of running the parent's kernel.
    native_kernel: Optional[str] = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "_update" in vars(cls) and "native_kernel" not in vars(cls):
            cls.native_kernel = None

    def __init__(
        self, params: Iterable, defaults: dict, foreach: Optional[bool] = None, fused: Optional[bool] = None
    ):
        _check_flag("foreach", foreach)
        _check_flag("fused", fused)
        if foreach and fused:
            raise ValueError("Invalid foreach=True with fused=True; choose at most one of them")
        for name, value in defaults.items():
            defaults[name] = check_hyperparameter(name, value)
        defaults["foreach"] = foreach
        defaults["fused"] = fused
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        for name in _RANGES.keys() & param_group.keys():
            param_group[name] = check_hyperparameter(name, param_group[name])
        super().add_param_group(param_group)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("foreach", None)
            group.setdefault("fused", None)

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

    def _use_fused(self, group: dict) -> bool:
        fused = group["fused"]
        if torch.compiler.is_compiling():
            # The step is being traced by an outer torch.compile: give it plain
            # tensor ops to trace rather than a nested compiled kernel.
            return False
        if fused is None:
            # An explicit foreach choice is a request for that eager path.
            if group["foreach"] is not None:
                return False
            params = group["params"]
            if params and _native.supports(self.native_kernel, params[0].device, params[0].dtype):
                return True
            numel = sum(p.numel() for g in self.param_groups for p in g["params"])
            return numel >= FUSED_DEFAULT_MIN_NUMEL
        return fused

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
            if self._use_fused(group):
                _fused.fused_step(
                    type(self)._update, self.native_kernel, self._coefficients(group), params, grads, states
                )
            elif not self._use_foreach(group, params):
                self._single_tensor(params, grads, states, group)
            else:
                # foreach kernels want one device and dtype per call.
                buckets = Optimizer._group_tensors_by_device_and_dtype([params, grads, *states])
                for (tensors, _) in buckets.values():
                    self._multi_tensor(tensors[0], tensors[1], tensors[2:], group)
        return loss

    def _single_tensor(self, params, grads, states, group) -> None:
        """One step of the dynamics, a parameter at a time (the reference)."""
        k = self._coefficients(group)
        update = type(self)._update
        for q, g, *state in zip(params, grads, *states):
            update(q, g, *state, k)

    @staticmethod
    def _coefficients(group) -> tuple:  # pragma: no cover
        """The step's scalar coefficients for ``_update``, as Python floats."""
        raise NotImplementedError

    @staticmethod
    def _update(q, g, *states_and_coefficients) -> None:  # pragma: no cover
        """One step for one parameter tensor: ``_update(q, g, *states, k)``."""
        raise NotImplementedError

    @staticmethod
    def _multi_tensor(params, grads, states, group) -> None:  # pragma: no cover
        """The same step on lists of tensors with torch._foreach_* kernels."""
        raise NotImplementedError

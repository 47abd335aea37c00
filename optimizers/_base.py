"""Shared machinery of the damped-dynamics optimizers.

Every optimizer here integrates a system of ODEs in the parameters ``q`` and
per-element state (a momentum ``p`` and, for iKFAD and CADAM, one more
variable) by operator splitting: each sub-step is the *exact* flow of one piece
of the vector field over one time step ``h``. The sub-steps below are the only
place the arithmetic of a piece lives; each optimizer module strings them
together in its order (its class docstring), once, in its ``_update``.

Each sub-step takes either single tensors or lists of tensors. On tensors it
runs plain in-place tensor ops (the single-tensor loop, and the compiled kernel
of the fused path); on lists, the same operations in the same order as
``torch._foreach_*`` ops (the foreach path). So the paths of every optimizer
agree to rounding.

Coefficients (``h``, decay factors, ...) are Python floats or 0-d tensors. A
float takes the in-place ATen form with a scalar argument (one pass, no
temporary). A tensor, which is what a hyperparameter given as a tensor becomes
and what the compiled kernel (``optimizers/_fused.py``) is always handed,
spells the same formula with tensor arithmetic: inside ``torch.compile`` it is
an input of the graph rather than a constant baked into it, so a scheduler that
changes it never recompiles, and Inductor fuses the arithmetic into its one
loop. On the CPU the fused path runs native kernels instead
(``optimizers/_native.c``), where the same sub-steps are C macros of the same
names, strung together in each optimizer's order; the tests hold every path to
the single-tensor loop.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import _fused, _native
from ._fused import COMPILED, FOREACH, NATIVE, PATHS, SINGLE

__all__ = ["DampedOptimizer", "PATHS"]

# A sub-step coefficient: a Python float or a 0-d tensor.
Coefficient = Union[float, Tensor]
# What a sub-step updates: one tensor, or a list of them (the foreach path).
Tensors = Union[Tensor, list]


def decay_factor(rate: Coefficient, h: Coefficient) -> Coefficient:
    """``exp(-rate h)``: the factor by which x' = -rate x shrinks x over time h."""
    if isinstance(rate, Tensor) or isinstance(h, Tensor):
        return torch.exp(-rate * h)
    return math.exp(-rate * h)


def relax_weight(rate: Coefficient, h: Coefficient) -> Coefficient:
    """``(1 - exp(-rate h)) / rate``: the weight of a frozen source in the exact
    solution of x' = s - rate x over time h (see ``relax``)."""
    if isinstance(rate, Tensor) or isinstance(h, Tensor):
        return -torch.expm1(-rate * h) / rate
    return -math.expm1(-rate * h) / rate


def _is_number(value: Coefficient, constant: float) -> bool:
    """True when ``value`` is a Python number equal to ``constant``.

    The eager paths skip a sub-step that this makes an exact no-op, to save a
    pass over memory. A tensor coefficient skips nothing: a compiled graph must
    not depend on hyperparameter values, and multiplying by exactly 1, or
    dividing by sqrt(1 + 0 * p^2) = 1, changes no bit anyway.
    """
    return not isinstance(value, Tensor) and value == constant


# ----------------------------------------------------------------------------
# Elementwise primitives on a tensor or a list of tensors (then torch._foreach_*).
# ----------------------------------------------------------------------------

def _many(x: Tensors) -> bool:
    return isinstance(x, (list, tuple))


def _mul(x: Tensors, y) -> Tensors:
    return torch._foreach_mul(x, y) if _many(x) else x * y


def _mul_(x: Tensors, y) -> None:
    torch._foreach_mul_(x, y) if _many(x) else x.mul_(y)


def _div_(x: Tensors, y) -> None:
    torch._foreach_div_(x, y) if _many(x) else x.div_(y)


def _add_(x: Tensors, scalar: Coefficient) -> None:
    torch._foreach_add_(x, scalar) if _many(x) else x.add_(scalar)


def _exp_(x: Tensors) -> None:
    torch._foreach_exp_(x) if _many(x) else x.exp_()


def _sqrt(x: Tensors) -> Tensors:
    return torch._foreach_sqrt(x) if _many(x) else torch.sqrt(x)


def _sqrt_(x: Tensors) -> None:
    torch._foreach_sqrt_(x) if _many(x) else x.sqrt_()


def _axpy_(y: Tensors, x: Tensors, a: Coefficient) -> None:
    """``y <- y + a x``."""
    if isinstance(a, Tensor):
        torch._foreach_add_(y, torch._foreach_mul(x, a)) if _many(y) else y.add_(x * a)
    else:
        torch._foreach_add_(y, x, alpha=a) if _many(y) else y.add_(x, alpha=a)


def _addcmul_(y: Tensors, a: Tensors, b: Tensors, value: Coefficient) -> None:
    """``y <- y + value a b``."""
    if isinstance(value, Tensor):
        torch._foreach_addcmul_(y, _mul(a, value), b) if _many(y) else y.addcmul_(a * value, b)
    else:
        torch._foreach_addcmul_(y, a, b, value=value) if _many(y) else y.addcmul_(a, b, value=value)


def _addcdiv_(y: Tensors, a: Tensors, b: Tensors, value: float = 1.0) -> None:
    """``y <- y + value a / b``."""
    torch._foreach_addcdiv_(y, a, b, value=value) if _many(y) else y.addcdiv_(a, b, value=value)


# ----------------------------------------------------------------------------
# Sub-steps. ``p`` momentum, ``g`` gradient, ``q`` parameter: tensors or lists.
# ----------------------------------------------------------------------------

def kick(p: Tensors, g: Tensors, kick_step: Coefficient) -> None:
    """Exact flow of p' = -g over time h: ``p <- p + kick_step g``, with
    ``kick_step = -h`` (``+h`` with ``maximize``, the flow of p' = +g)."""
    _axpy_(p, g, kick_step)


def drift(q: Tensors, p: Tensors, drift_step: Coefficient) -> None:
    """Exact flow of q' = p over time ``drift_step = lr h``: ``q <- q + lr h p``."""
    _axpy_(q, p, drift_step)


def scale(x: Tensors, factor: Coefficient) -> None:
    """Exact flow of x' = -k x over time h, with ``factor = exp(-k h)``.

    Used for linear friction (k = gamma) and decoupled weight decay (k = lambda).
    A factor of exactly 1 is skipped on the eager paths (``_is_number``); either
    way gamma = 0 or lambda = 0 is an exact no-op.
    """
    if not _is_number(factor, 1.0):
        _mul_(x, factor)


def cubic_damping(p: Tensors, two_c_h: Coefficient) -> None:
    """Exact flow of p' = -c p^3 over time h: ``p <- p / sqrt(1 + 2 c h p^2)``, with
    ``two_c_h = 2 c h`` (dimensionless per momentum^2). Skipped on the eager paths
    when it is exactly 0 (c = 0), an exact no-op."""
    if not _is_number(two_c_h, 0.0):
        denom = _mul(p, p)
        _mul_(denom, two_c_h)
        _add_(denom, 1.0)
        _sqrt_(denom)
        _div_(p, denom)


def relax(x: Tensors, source: Tensors, decay: Coefficient, weight: Coefficient) -> None:
    """Exact flow of x' = s - a x over time h for a frozen source s.

    With ``decay = exp(-a h)`` and ``s = weight_raw * source^2`` the solution is
    ``x <- decay x + (1 - decay) s / a``; the caller folds ``(1 - decay)/a`` and
    any constant of s into ``weight``, so this computes ``x <- decay x + weight source^2``.
    """
    _mul_(x, decay)
    _addcmul_(x, source, source, weight)


def friction(p: Tensors, xi: Tensors, minus_h: Coefficient) -> None:
    """Exact flow of p' = -xi p over time h with xi frozen: ``p <- exp(-h xi) p``,
    with ``minus_h = -h``.

    The factor is computed in place, one whole-list temporary on the foreach
    path. (The native kernels compute it as ``2 ** (xi * (-h log2 e))``, which
    vectorises to fewer instructions; for want of a foreach exp2, and so that the
    eager paths round alike, these use ``exp``.)
    """
    factor = _mul(xi, minus_h)
    _exp_(factor)
    _mul_(p, factor)


def preconditioned_drift(q: Tensors, p: Tensors, zeta: Tensors, drift_step: Coefficient,
                         eps: Coefficient) -> None:
    """Exact flow of q' = p / (sqrt(zeta) + eps) over time ``drift_step = lr h``
    (p, zeta frozen): ``q <- q + lr h p / (sqrt(zeta) + eps)``.

    A tensor ``drift_step`` (a tensor ``lr`` or ``h``) divides the denominator in
    place, ``q <- q + p / ((sqrt(zeta) + eps) / (lr h))``, so that the foreach
    path holds one whole-list temporary (the denominator) as with a float; at
    ``lr = 0`` the denominator is infinite and ``q`` unchanged, as with a float.
    """
    denom = _sqrt(zeta)
    _add_(denom, eps)
    if isinstance(drift_step, Tensor):
        _div_(denom, drift_step)
        _addcdiv_(q, p, denom)
    else:
        _addcdiv_(q, p, denom, drift_step)


# ----------------------------------------------------------------------------
# Coefficients
# ----------------------------------------------------------------------------

# The coefficients every optimizer's step takes first, in this order (``DampedOptimizer._motion``).
MOTION = ("kick_step", "drift_step", "decay", "linear")


def coefficient_tuple(name: str, *fields: str, module: str) -> type:
    """The named tuple (``typing.NamedTuple``) of one optimizer's step coefficients:
    ``MOTION``'s four, then ``fields``.

    Its fields are the one statement of the coefficients' order: ``_update`` reads them
    by name, the compiled kernel is handed them as one 1-D tensor in this order, and
    the native kernels index their C array by constants that ``optimizers/_native.py``
    generates from these names (``CD_TWO_C_H``, ...). The tuple belongs to ``module``
    (the caller's ``__name__``, as ``collections.namedtuple``'s ``module``), where
    pickle and ``repr`` look for it."""
    cls = NamedTuple(name, [(field, Coefficient) for field in (*MOTION, *fields)])
    cls.__module__ = module
    return cls


def named(k: Any, cls: type) -> Any:
    """``k`` as the named tuple ``cls``: itself, or, where the compiled kernel hands
    ``_update`` the coefficients as one 1-D tensor in ``cls``'s field order, its elements."""
    return k if isinstance(k, cls) else cls(*k)


def check_positive_lr(lr: float) -> None:
    """A tuned SGD's or Adam's ``lr``: a finite Python number > 0, else ValueError."""
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (0 < lr < math.inf):
        raise ValueError(f"Invalid lr: {lr!r}; expected a finite number > 0")


def sgd_time_step(lr: float, momentum: float, h_squared_factor: float) -> tuple[float, float]:
    """``(h, gamma)`` of the momentum dynamics that reproduce momentum SGD's steps:
    ``exp(-gamma h) = momentum`` and ``h^2 * h_squared_factor = lr`` (LDHD's SGD
    learning rate is ``h^2 exp(-gamma h)``, CD's and CADAM's ``h^2``)."""
    check_positive_lr(lr)
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not (0 < momentum <= 1):
        raise ValueError(f"Invalid momentum: {momentum!r}; expected a number in (0, 1]")
    h = math.sqrt(lr / h_squared_factor)
    return h, -math.log(momentum) / h


# ----------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------

# name -> (lower bound, lower bound allowed?)
_RANGES = {
    "lr": (0.0, True),
    "h": (0.0, False),
    "gamma": (0.0, True),
    "c": (0.0, True),
    "alpha": (0.0, False),
    "mu": (0.0, False),
    "eps": (0.0, True),
    "weight_decay": (0.0, True),
}


def as_scalar(value: Any) -> Any:
    """A one-element tensor of any shape (``[]``, ``[1]``, ``[1, 1]``, ...) as a 0-d view of
    it, anything else as it is.

    Every sub-step takes a coefficient as a Python number or a 0-d tensor: a
    ``[1]`` tensor would broadcast a parameter to ``[1, n]`` and the foreach ops
    refuse it. A view shares the user's storage, so an in-place change on either
    (``group["lr"].fill_(...)``, as torch's schedulers do for a tensor ``lr``)
    is seen by the other."""
    if isinstance(value, Tensor) and value.dim() != 0 and value.numel() == 1:
        return value.view(())
    return value


def check_hyperparameter(name: str, value: Any) -> Union[float, Tensor]:
    """``value`` as a float (a Python number) or as a 0-d view (``as_scalar``) of a
    one-element floating-point tensor of any shape; raise ValueError naming it and
    its valid range otherwise."""
    low, inclusive = _RANGES[name]
    valid = f"a finite number {'>=' if inclusive else '>'} {low:g}"
    if isinstance(value, Tensor):
        if value.numel() != 1 or not value.is_floating_point():
            raise ValueError(f"Invalid {name}: a tensor of shape {tuple(value.shape)} and dtype {value.dtype}; "
                             f"expected {valid}, as a Python number or a one-element floating-point tensor")
        value = as_scalar(value)
        number = float(value)
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"Invalid {name}: {value!r}; expected {valid} (a Python number or a 0-d tensor)")
    else:
        number = value = float(value)
    if not math.isfinite(number) or number < low or (number == low and not inclusive):
        raise ValueError(f"Invalid {name}: {number!r}; expected {valid}")
    return value


def _check_flag(name: str, value: Any, allowed=(None, True, False)) -> None:
    if value not in allowed or not (value is None or isinstance(value, bool)):
        names = [str(a) for a in allowed]
        raise ValueError(f"Invalid {name}: {value!r}; expected {', '.join(names[:-1])} or {names[-1]}")


# ----------------------------------------------------------------------------
# Code paths
# ----------------------------------------------------------------------------

# The implementations of one step (``PATHS``: native, compiled, foreach, single) are
# named in ``optimizers/_fused.py``; ``DampedOptimizer.code_path`` chooses among them.

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

# Where a fused kernel exists: the native one on the CPU, the compiled one on
# the CPU and CUDA (Triton); for these floating-point dtypes. ``fused=True``
# elsewhere (e.g. ``meta``, MPS) raises, as torch.optim's fused optimizers do.
FUSED_DEVICES = ("cpu", "cuda")
FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _fused_support_error(device: torch.device, dtype: torch.dtype) -> RuntimeError:
    """torch.optim's message for ``fused=True`` on tensors no fused kernel takes."""
    return RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices: "
                        f"{list(FUSED_DEVICES)} and dtypes {[str(d) for d in FUSED_DTYPES]} but {dtype} and "
                        f"{device.type}; use fused=None or False")


def _increments_lists() -> bool:
    """True where ``increment_version`` takes a list of tensors (torch >= 2.5);
    older versions take one tensor per call."""
    try:
        torch.autograd.graph.increment_version([torch.empty(0)])
        return True
    except (RuntimeError, TypeError):
        return False


_INCREMENT_LISTS = _increments_lists()


def _increment_versions(tensors: list) -> None:
    if _INCREMENT_LISTS:
        torch.autograd.graph.increment_version(tensors)
    else:
        for t in tensors:
            torch.autograd.graph.increment_version(t)


def _normalise_hyperparameters(group: dict) -> None:
    """Every one-element tensor hyperparameter of ``group`` as a 0-d view (``as_scalar``),
    also one assigned to the group after it was built."""
    for name in _RANGES:
        value = group.get(name)
        if isinstance(value, Tensor) and value.dim() != 0:
            group[name] = as_scalar(value)


def _traceable(group: dict) -> dict:
    """``group`` with every float hyperparameter as a 0-d tensor, inside a ``torch.compile``
    trace; else ``group`` itself.

    Traced as a Python float, a hyperparameter reaches ``math.exp`` and the
    ``alpha=``/``value=`` scalars of the in-place ops, which dynamo can only
    evaluate by specialising the graph on its value: every change (a scheduled
    ``lr`` or ``h``) would recompile, until dynamo's limit leaves the step
    uncompiled. As a tensor it is a graph input: dynamo then recompiles for a
    changed float once, as for torch.optim.AdamW, and never again."""
    if not torch.compiler.is_compiling():
        return group
    device = group["params"][0].device
    dtype = torch.float32 if device.type == "mps" else torch.float64
    # ``ones * x`` rather than ``torch.tensor(x)``: dynamo turns the product into a
    # graph input, while it specialises on the float handed to a tensor factory.
    one = torch.ones((), dtype=dtype, device=device)
    return {**group, **{name: one * group[name] for name in _RANGES
                        if name in group and not isinstance(group[name], Tensor)}}


def _buckets(tuples: list) -> tuple[dict, list]:
    """``(buckets, mixed)`` of tuples ``(q, g, *states)``: those whose tensors share one
    device and dtype, by ``(device, dtype)``, and the others (e.g. a gradient in
    another dtype), which no kernel takes."""
    buckets: dict = {}
    mixed = []
    for tensors in tuples:
        q = tensors[0]
        if all(t.dtype == q.dtype and t.device == q.device for t in tensors[1:]):
            buckets.setdefault((q.device, q.dtype), []).append(tensors)
        else:
            mixed.append(tensors)
    return buckets, mixed


def _local(t: Optional[Tensor]) -> Optional[Tensor]:
    """The local shard of a DTensor (FSDP2, tensor parallelism), else ``t`` itself.

    Every update here is elementwise, so updating each rank's shard in place is
    updating the whole tensor; the shard is the DTensor's own storage."""
    return t.to_local() if t is not None and hasattr(t, "to_local") and hasattr(t, "device_mesh") else t


# ----------------------------------------------------------------------------
# The optimizer base class
# ----------------------------------------------------------------------------

_FLAGS = ("foreach", "fused", "maximize")

# The arguments every optimizer shares, said once: ``{common_args}`` in a subclass's docstring.
COMMON_ARGS = """        lr: multiplier of the position update (>= 0, default 1: the paper's step);
            what LR schedulers scale (see ``DampedOptimizer``).
        weight_decay: rate lambda (>= 0) of the decoupled decay q' = -lambda q.
        maximize: follow ``+grad f`` (maximise the objective).
        foreach, fused: the code path (``DampedOptimizer``; optimizers/README.md, "Code paths").

    Every hyperparameter may be a Python number or a one-element tensor."""


class DampedOptimizer(Optimizer):
    """Base class: validation, lazy state, closure handling and path selection.

    A subclass sets ``state_names`` (the per-element state tensors, created as
    zeros the first time a parameter has a gradient) and implements

    - ``Coefficients``: the named tuple of its step's scalar coefficients
      (``coefficient_tuple``), whose first four fields are common to all (``MOTION``);
    - ``_coefficients(group)``: that tuple for a group, computed once per group and
      step, every derived value (``-h``, ``2 c h``, the exponentials) included:
      Python floats, or 0-d tensors where a hyperparameter is a tensor;
    - ``_update(q, g, *states, k)``: one step, given the coefficient tuple ``k``,
      for one parameter tensor or, on the foreach path, for lists of them. It
      strings together the sub-steps of this module and is the one statement of
      the optimizer's arithmetic: the single-tensor loop and the foreach path
      call it, and the fused path compiles it (``optimizers/_fused.py``) or runs
      its C restatement (``optimizers/_native.c``).

    ``states`` holds one list per state name, aligned with ``params``.

    Every optimizer takes ``lr`` (default 1), a multiplier of the position
    update and nothing else: the drift becomes ``q <- q + lr h p`` (CADAM's
    preconditioned too), and the decoupled weight decay ``exp(-lambda lr h)``,
    as torch's AdamW scales its decay by its learning rate. The momentum's
    dynamics (kick, friction, relaxation) keep the time step ``h``. It is what
    ``torch.optim.lr_scheduler`` and the Hugging Face Trainer schedule, and at
    ``lr = 1`` the step is bit for bit the paper's. ``maximize=True`` follows
    ``+grad f`` instead of ``-grad f`` (the kick's sign), as in ``torch.optim``.

    Code paths (``code_path``) all compute the same numbers: ``foreach=True``
    the foreach path, ``foreach=False`` (with ``fused`` not True) the
    single-tensor loop, ``fused=True`` the single-pass kernel (native C on the
    CPU, ``torch.compile`` on CUDA), and the default (``fused=None``,
    ``foreach=None``) the kernel on the CPU at any size and on CUDA from
    ``FUSED_DEFAULT_MIN_NUMEL`` elements on, else as ``torch.optim`` chooses
    (see optimizers/README.md, "Code paths").
    """

    state_names: Sequence[str] = ("momentum",)
    # The named tuple of ``_coefficients``' values (``coefficient_tuple``); each subclass its own.
    Coefficients: type
    # The name of the optimizer's kernel in optimizers/_native.c, which restates
    # ``_update`` in C; None where there is none. A subclass that overrides
    # ``_update`` without naming a kernel of its own gets None (``__init_subclass__``),
    # so the fused path compiles its ``_update`` instead of running the parent's kernel.
    native_kernel: Optional[str] = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "_update" in vars(cls) and "native_kernel" not in vars(cls):
            cls.native_kernel = None
        if cls.__doc__ and "{common_args}" in cls.__doc__:
            cls.__doc__ = cls.__doc__.replace("{common_args}", COMMON_ARGS.strip("\n"))

    def __init__(self, params: Iterable, defaults: dict, lr: Coefficient = 1.0, maximize: bool = False,
                 foreach: Optional[bool] = None, fused: Optional[bool] = None):
        _check_flag("foreach", foreach)
        _check_flag("fused", fused)
        _check_flag("maximize", maximize, (False, True))
        if foreach and fused:
            raise ValueError("Invalid foreach=True with fused=True; choose at most one of them")
        defaults = {"lr": lr, **defaults}
        for name, value in defaults.items():
            defaults[name] = check_hyperparameter(name, value)
        defaults.update(maximize=maximize, foreach=foreach, fused=fused)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        """Validate the group's hyperparameters (one-element tensors become 0-d views,
        ``as_scalar``) and flags, then add it as ``torch.optim.Optimizer`` does."""
        for name in _RANGES.keys() & param_group.keys():
            param_group[name] = check_hyperparameter(name, param_group[name])
        for name in _FLAGS & param_group.keys():
            _check_flag(name, param_group[name], (False, True) if name == "maximize" else (None, True, False))
        super().add_param_group(param_group)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # state dicts saved before these options existed
            group.setdefault("lr", 1.0)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("fused", None)
            _normalise_hyperparameters(group)  # e.g. a [1]-shaped tensor lr of an older state dict

    @staticmethod
    def _motion(group) -> tuple:
        """``MOTION``'s values ``(kick_step, drift_step, decay, linear)``, the coefficients every optimizer shares:
        the kick's step ``-h`` (``+h`` with maximize), the drift's ``lr h``, the weight
        decay's factor ``exp(-lambda lr h)`` and the linear friction's ``exp(-gamma h)``."""
        h = group["h"]
        drift_step = group["lr"] * h
        return (h if group["maximize"] else -h, drift_step, decay_factor(group["weight_decay"], drift_step),
                decay_factor(group["gamma"], h))

    def _init_group(self, group: dict, params: list, grads: list, *states: list) -> None:
        """Append the group's parameters that have a gradient, their gradients and their
        state tensors (one list per state name) to the given lists, creating the state
        (zeros) the first time a parameter has a gradient.

        The name and calling convention are torch.optim's: inside a ``torch.compile``
        trace, dynamo runs ``_init_group`` eagerly rather than tracing it, so the lazily
        created state exists before the graph is traced and the first step does not
        leave a guard on the empty state behind (which recompiled at the second step).
        """
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

    def _choose(self, group: dict, device: torch.device, dtype: torch.dtype) -> tuple[str, Optional[_fused.Backend]]:
        """``(path, backend)`` of ``group``'s tensors of ``device`` and ``dtype``: the eager
        path chosen by the flags, or the fused path's ``_fused.Backend`` and its path.
        The one place the choice is made (``code_path``, ``step``)."""
        fused, foreach = group["fused"], group["foreach"]
        if torch.compiler.is_compiling():
            # The step is being traced by an outer torch.compile: give it plain
            # tensor ops to trace rather than a nested compiled kernel.
            return (FOREACH if foreach else SINGLE), None
        fusable = device.type in FUSED_DEVICES and dtype in FUSED_DTYPES
        if fused is None:
            # An explicit foreach choice is a request for that eager path.
            if foreach is None:
                fused = _native.supports(self.native_kernel, device, dtype) or (
                    fusable and sum(p.numel() for g in self.param_groups for p in g["params"])
                    >= FUSED_DEFAULT_MIN_NUMEL)
            else:
                fused = False
        elif fused and not fusable:
            raise _fused_support_error(device, dtype)
        if fused:
            backend = _fused.backend(type(self)._update, self.native_kernel, 2 + len(self.state_names),
                                     len(self.Coefficients._fields), device, dtype)
            return backend.path, backend
        if foreach is None:
            # As torch.optim: the foreach path on devices with fast foreach kernels (CUDA).
            from torch.utils._foreach_utils import _get_foreach_kernels_supported_devices

            foreach = device.type in _get_foreach_kernels_supported_devices()
        return (FOREACH if foreach else SINGLE), None

    def code_path(self, group: Optional[dict] = None, device: Optional[torch.device] = None,
                  dtype: Optional[torch.dtype] = None, param: Optional[Tensor] = None) -> str:
        """The path (one of ``PATHS``) that ``step`` takes for ``group``'s tensors of
        ``device`` and ``dtype`` (default: the first param group, its first parameter's),
        or, given ``param``, for that parameter alone.

        ``native`` and ``compiled`` are the two implementations of the fused path,
        ``single`` where neither can be built (``_fused.backend``, which warns once).
        A tensor the fused kernel cannot take (a strided slice, a parameter whose
        gradient is laid out otherwise, a tensor subclass, a lone one-element tensor
        for the compiled kernel, a gradient of another dtype) is updated by the
        single-tensor loop inside the same step: asked for it (``param``), the answer
        is ``single``, and so it is for ``group``'s tensors of a device and dtype when
        none of them reaches the kernel. The answer is for the tensors as they stand:
        the parameters with a gradient where any has one (``step`` updates no other),
        and a parameter without a gradient yet taken to get one laid out as itself.
        """
        if param is not None:
            group = next((g for g in self.param_groups if any(p is param for p in g["params"])), None)
            if group is None:
                raise ValueError("Invalid param: not a parameter of this optimizer's param groups")
        group = self.param_groups[0] if group is None else group
        params = [p for p in group["params"] if p.grad is not None] or list(group["params"])
        if param is not None and not any(p is param for p in params):
            params.append(param)  # no gradient, while others have one: as if it had
        tuples = [tuple(_local(t) for t in (p, p.grad if p.grad is not None else p,
                                            *(self.state.get(p, {}).get(name, p) for name in self.state_names)))
                  for p in params]
        buckets, mixed = _buckets(tuples)
        if param is not None:
            tensors = tuples[next(i for i, p in enumerate(params) if p is param)]
            if any(tensors is t for t in mixed):
                return SINGLE
            device, dtype = tensors[0].device, tensors[0].dtype
        elif device is None or dtype is None:
            first = _local(group["params"][0])
            device, dtype = first.device, first.dtype
        path, backend = self._choose(group, device, dtype)
        bucket = buckets.get((device, dtype), [])
        paths = backend.paths(bucket) if backend is not None else [path] * len(bucket)
        if param is not None:
            return paths[next(i for i, t in enumerate(bucket) if t is tensors)]
        # The group's tensors of this device and dtype with a gradient of another: ``step``'s ``mixed``.
        paths += [SINGLE for t in mixed if (t[0].device, t[0].dtype) == (device, dtype)]
        return path if path in paths or not paths else SINGLE

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        """Advance the dynamics by one time step ``h`` per param group.

        ``closure`` (optional) re-evaluates the model and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        update = type(self)._update
        for index, group in enumerate(self.param_groups):
            params, grads = [], []
            states: list[list[Tensor]] = [[] for _ in self.state_names]
            self._init_group(group, params, grads, *states)
            if not params:
                continue
            # Each rank's own shard of a DTensor (FSDP2, tensor parallelism).
            params, grads = [_local(t) for t in params], [_local(t) for t in grads]
            states = [[_local(t) for t in lst] for lst in states]
            _normalise_hyperparameters(group)
            k = self._coefficients(_traceable(group))
            buckets, mixed = _buckets(list(zip(params, grads, *states)))
            for tensors in mixed:  # e.g. a gradient in another dtype: no kernel takes it
                update(*tensors, k)
            kernel_ran = False
            for (device, dtype), bucket in buckets.items():
                path, backend = self._choose(group, device, dtype)
                if backend is not None:
                    backend.run(k, bucket, cache=self._coefficient_cache(index))
                elif path == FOREACH:
                    update(*map(list, zip(*bucket)), k)
                else:
                    for tensors in bucket:
                        update(*tensors, k)
                kernel_ran |= path in (NATIVE, COMPILED)
            if kernel_ran:
                # The kernels write through data pointers and flat aliases, which do not
                # share the parameters' autograd version counters: bump them, as an
                # in-place update would, so that autograd still notices a parameter that
                # changed after being saved for backward.
                _increment_versions(params)
        return loss

    def _coefficient_cache(self, index: int) -> dict:
        """Param group ``index``'s cache of the compiled kernel's coefficient tensors
        (``_fused.Backend.run``): kept on the instance, not in the state dict."""
        caches = self.__dict__.setdefault("_coefficient_caches", {})
        return caches.setdefault(index, {})

    @staticmethod
    def _coefficients(group) -> tuple:  # pragma: no cover
        """The step's scalar coefficients for ``_update``: ``Coefficients(*_motion(group), ...)``."""
        raise NotImplementedError

    @staticmethod
    def _update(q, g, *states_and_coefficients) -> None:  # pragma: no cover
        """One step for one parameter tensor, or lists of them: ``_update(q, g, *states, k)``."""
        raise NotImplementedError

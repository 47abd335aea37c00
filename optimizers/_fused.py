"""The fused path: one pass over each tensor's elements per step.

Two implementations, tried in this order for each (device, dtype) group of tensors:

1. On the CPU, the native kernels (``optimizers/_native.py``, ``_native.c``):
   hand-written C, one call per param group and dtype, built once per machine.
   For float32, float64, bfloat16 and (compiler permitting) float16.
2. Elsewhere (CUDA, or a CPU without a C compiler that can build them):
   the optimizer's ``_update`` (the very function the single-tensor loop runs)
   compiled by ``torch.compile(update, dynamic=True, fullgraph=True)`` into a
   single elementwise loop: it reads ``q``, ``g`` and the state once, writes
   ``q`` and the state once, and materialises no temporaries (Inductor emits a
   Triton kernel on CUDA and a vectorised OpenMP loop on the CPU).

Three choices keep the compiled kernel cheap to compile and free of recompiles:

- Every tensor is passed as a flat 1-D alias of its storage with a symbolic
  length, so ONE graph per (optimizer, device type, dtype) serves every
  parameter shape. It is compiled once, on scratch tensors of
  ``WARMUP_NUMEL`` elements, so the generated code (Inductor decides on
  multithreading from the size it first sees) never depends on which
  parameter happens to come first.
- The coefficients (``h``, ``exp(-gamma h)``, ...) arrive as one small 1-D
  tensor on the parameters' device, in float32 (float64 for float64
  parameters), so a scheduler that changes a hyperparameter changes data, not
  the graph. (The native kernels take them as C doubles: nothing to recompile.)
- Low-precision parameters (bf16, fp16) are loaded into float32 registers,
  updated there and rounded once on the store; the eager paths round after
  every sub-step. State stays in the parameter's dtype. The native kernels do
  the same.

For the compiled kernel, small tensors (biases, LayerNorm weights) are
concatenated and updated in one call per batch rather than one call each (see
``fused_step``). Tensors whose layout differs between the parameter, its
gradient and its state, a lone one-element tensor (dynamo would specialise a
graph for it; the native kernels take it) and parameters whose gradient has
another dtype go through the same ``_update`` eagerly. Where neither
implementation is available (no C or C++ compiler, no Triton, an unsupported
Python) the first fused step warns once and every step runs the eager loop.
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from . import _native

__all__ = ["fused_step", "backend", "compiled_update", "WARMUP_NUMEL", "SMALL_NUMEL", "BATCH_NUMEL"]

WARMUP_NUMEL = 1 << 16
SMALL_NUMEL = 1 << 15  # tensors below this size are updated in concatenated batches...
# ...of at most this many elements. The batch's copies (parameter, gradient and
# state) are the fused path's only temporaries: at most (2 + states) * 2**16
# elements, 1 MiB for CADAM in float32, under 10% of the parameter memory of
# any model large enough for ``fused=None`` to choose this path (2**22 elements).
BATCH_NUMEL = 1 << 16

_compiled: dict[Callable, Callable] = {}  # update function -> its torch.compile wrapper
_ready: set = set()  # (update, device type, dtype) whose kernel compiled and ran
_unavailable: dict[str, str] = {}  # device type -> why compiling failed there (warned once)
_native_warned = False
# (update, device type, dtype, "native" or "compiled") for every kernel that has
# run a step: how the tests know which implementation a step took.
used: set = set()


def compiled_update(update: Callable) -> Callable:
    """The ``torch.compile`` wrapper of ``update``, shared by every optimizer instance.

    Dynamo keeps its compiled graphs on the function's code object, and each
    optimizer's ``_update`` is its own function, so each optimizer gets its own
    cache (one graph per device type and dtype).
    """
    if update not in _compiled:
        _compiled[update] = torch.compile(update, dynamic=True, fullgraph=True)
    return _compiled[update]


def coefficient_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the coefficients travel in: float64 for float64 parameters, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _why_unavailable(device: torch.device) -> Optional[str]:
    """A reason compilation cannot work on ``device``, found without compiling; else None."""
    from torch._dynamo.eval_frame import is_dynamo_supported

    if not is_dynamo_supported():
        return "torch.compile does not support this Python/platform"
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return "Triton is not installed"
    return None


def _kernel(update: Callable, device: torch.device, dtype: torch.dtype, n_tensors: int, n_coefficients: int,
            native_failure: Optional[str] = None):
    """The compiled kernel for this device and dtype, compiling it on scratch tensors
    the first time; None (after one warning per device type) where compiling fails.

    ``native_failure`` is why the native kernels could not take these tensors
    (None where they were not asked for): it is part of the one warning, either
    way, so that a machine without compilers hears of it once."""
    global _native_warned
    if device.type in _unavailable:
        return None
    kernel = compiled_update(update)
    key = (update, device.type, dtype)
    if key not in _ready:
        reason = _why_unavailable(device)
        if reason is None:
            scratch = [torch.zeros(WARMUP_NUMEL, dtype=dtype, device=device) for _ in range(n_tensors)]
            k = torch.ones(n_coefficients, dtype=coefficient_dtype(dtype), device=device)
            try:
                kernel(*scratch, k)
            except Exception as error:  # any failure to compile means: use the eager loop
                reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        if reason is not None:
            _unavailable[device.type] = reason
            if native_failure is not None:
                reason = f"native kernels: {native_failure}; torch.compile: {reason}"
            warnings.warn(
                f"fused optimizer step unavailable on {device.type} ({reason}); "
                "falling back to the single-tensor loop",
                RuntimeWarning,
                stacklevel=4,
            )
            return None
        _ready.add(key)
    if native_failure is not None and not _native_warned:
        _native_warned = True
        warnings.warn(f"native CPU optimizer kernels unavailable ({native_failure}); "
                      "the fused step uses torch.compile instead", RuntimeWarning, stacklevel=4)
    return kernel


def _flat(t: Tensor) -> Tensor:
    """A 1-D alias of ``t``'s elements (not a view, so dynamo sees a plain 1-D input)."""
    return t.new_empty(0).set_(t.untyped_storage(), t.storage_offset(), (t.numel(),), (1,))


def dense_alike(tensors: Sequence[Tensor]) -> bool:
    """True when the kernels may treat every tensor as one flat array: each dense
    (contiguous, channels-last, transposed, ...) and all with one layout, so that
    the same memory offset holds the same element of q, g and the state."""
    if all(t.is_contiguous() for t in tensors):
        return True  # same shape (a gradient has its parameter's) and contiguous: same layout
    q = tensors[0]
    expected = 1
    for size, stride in sorted(((n, s) for n, s in zip(q.shape, q.stride()) if n != 1), key=lambda d: d[1]):
        if stride != expected:
            return False
        expected *= size
    return all(t.stride() == q.stride() for t in tensors[1:])


def _flattenable(tensors: Sequence[Tensor]) -> bool:
    """True when the compiled kernel can run on flat aliases (``_flat``) of these tensors."""
    return tensors[0].numel() >= 2 and dense_alike(tensors)


def _run_batch(kernel: Callable, batch: list[tuple[Tensor, ...]], k: Tensor) -> None:
    """One kernel call for several small tensors: concatenate, update, copy back.

    The gradient is only read, so only the parameters and the state are copied back.
    """
    columns = list(zip(*batch))  # (params, grads, *states)
    # Most small tensors are 1-D already; reshaping only the others saves
    # microseconds per tensor, which is what batching is for.
    flats = [torch.cat([t if t.dim() == 1 else t.reshape(-1) for t in column]) for column in columns]
    kernel(*flats, k)
    sizes = [q.numel() for q in columns[0]]
    for i in (0, *range(2, len(columns))):
        pieces = flats[i].split(sizes)
        pieces = [piece if t.dim() == 1 else piece.view(t.shape) for piece, t in zip(pieces, columns[i])]
        torch._foreach_copy_(list(columns[i]), pieces)


def backend(native: Optional[str], device: torch.device, dtype: torch.dtype) -> str:
    """Which implementation the fused path uses for these tensors: ``"native"``
    (the C kernels), or ``"compiled"`` (``torch.compile``; it falls back to the
    eager loop where compiling fails)."""
    return "native" if _native.supports(native, device, dtype) else "compiled"


def _native_failure(native: Optional[str], device: torch.device) -> Optional[str]:
    """Why the native kernels cannot run where they would have been used; else None."""
    if native is None or device.type != "cpu" or not _native.ENABLED:
        return None
    return _native.why_unavailable()


def fused_step(
    update: Callable,
    native: Optional[str],
    coefficients: tuple,
    params: list[Tensor],
    grads: list[Tensor],
    states: list[list[Tensor]],
) -> None:
    """One optimizer step for one param group on the fused path.

    ``update(q, g, *states, k)`` is the optimizer's per-tensor update,
    ``native`` the name of its native kernel (None: it has none) and
    ``coefficients`` its coefficient tuple (Python floats) for this group.

    Native kernels take every dense tensor of a (device, dtype) bucket in one
    call. For the compiled kernel, tensors of at least ``SMALL_NUMEL`` elements
    get a kernel call each, on flat aliases (no copies); smaller ones are
    concatenated into batches of at most ``BATCH_NUMEL`` elements and updated
    by one call per batch, which saves the per-call overhead (tens of
    microseconds, and a multithreaded region) on the many bias and LayerNorm
    vectors of a transformer.
    """
    buckets: dict = {}  # (device, dtype) -> [(q, g, *state), ...]
    for tensors in zip(params, grads, *states):
        q = tensors[0]
        if all(t.dtype == q.dtype and t.device == q.device for t in tensors[1:]):
            buckets.setdefault((q.device, q.dtype), []).append(tensors)
        else:
            update(*tensors, coefficients)
    for (device, dtype), bucket in buckets.items():
        if backend(native, device, dtype) == "native":
            flat = []
            for tensors in bucket:
                if dense_alike(tensors):
                    flat.append(tensors)
                else:
                    update(*tensors, coefficients)
            if flat:
                _native.step(native, dtype, coefficients, flat)
                used.add((update, device.type, dtype, "native"))
            continue
        kernel = _kernel(update, device, dtype, len(bucket[0]), len(coefficients), _native_failure(native, device))
        if kernel is None:
            for tensors in bucket:
                update(*tensors, coefficients)
            continue
        used.add((update, device.type, dtype, "compiled"))
        k = torch.tensor(coefficients, dtype=coefficient_dtype(dtype), device=device)
        batch, batch_numel = [], 0
        for tensors in bucket:
            numel = tensors[0].numel()
            if numel < SMALL_NUMEL:
                if batch_numel + numel > BATCH_NUMEL:
                    _run_batch(kernel, batch, k)
                    batch, batch_numel = [], 0
                batch.append(tensors)
                batch_numel += numel
            elif _flattenable(tensors):
                kernel(*[_flat(t) for t in tensors], k)
            else:
                update(*tensors, coefficients)
        if batch_numel >= 2:
            _run_batch(kernel, batch, k)
        elif batch:  # a lone one-element tensor: a graph of its own is not worth compiling
            update(*batch[0], coefficients)
    # The kernels write through data pointers and flat aliases, which do not
    # share the parameters' autograd version counters: bump them, as an
    # in-place update would, so that autograd still notices a parameter that
    # changed after being saved for backward.
    torch.autograd.graph.increment_version(params)

"""The fused path: one pass over each tensor's elements per step.

Two implementations; ``DampedOptimizer.code_path`` picks one for each
(device, dtype) bucket of a param group's tensors:

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
  the graph. It is made (one host-to-device copy) only when a hyperparameter
  changed since the group's last step, and reused otherwise. (The native kernels take them as C doubles: nothing to recompile.)
  Hyperparameters given as tensors are stacked into it without leaving the device.
- Low-precision parameters (bf16, fp16) are loaded into float32 registers,
  updated there and rounded once on the store; the eager paths round after
  every sub-step. State stays in the parameter's dtype. The native kernels do
  the same.

For the compiled kernel, small tensors (biases, LayerNorm weights) are
concatenated and updated in one call per batch rather than one call each (see
``compiled_step``). Tensors whose layout differs between the parameter, its
gradient and its state, tensor subclasses other than ``nn.Parameter`` (whose
data pointer is not their elements'; DTensors arrive here as their local
shards), and, for the compiled kernel, a lone one-element tensor (dynamo would
specialise a graph for it; the native kernels take it) go through the same
``_update`` eagerly. Where neither
implementation is available (no C or C++ compiler, no Triton, an unsupported
Python) the first fused step warns once and every step runs the eager loop.
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from . import _native

__all__ = ["native_step", "compiled_step", "compile_failure", "native_failure", "compiled_update",
           "WARMUP_NUMEL", "SMALL_NUMEL", "BATCH_NUMEL"]

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


def compile_failure(device: torch.device) -> Optional[str]:
    """Why the compiled kernel failed on this device type (it then warned once); None
    where it has not failed (yet)."""
    return _unavailable.get(device.type)


def native_failure(native: Optional[str], device: torch.device) -> Optional[str]:
    """Why the native kernels cannot run where they would have been used; else None."""
    if native is None or device.type != "cpu" or not _native.ENABLED:
        return None
    return _native.why_unavailable()


def _plain(tensors: Sequence[Tensor]) -> bool:
    """True for plain tensors (and Parameters), whose data pointers address their elements."""
    return all(type(t) in (Tensor, torch.nn.Parameter) for t in tensors)


def _as_floats(coefficients: tuple) -> tuple:
    return tuple(float(c) for c in coefficients)


def _as_tensor(coefficients: tuple, dtype: torch.dtype, device: torch.device, cache: Optional[dict] = None) -> Tensor:
    """The coefficients as one 1-D tensor on ``device`` (``coefficient_dtype(dtype)``).

    Python-number coefficients are copied to the device only when they change:
    ``cache`` (a param group's, kept by the optimizer) holds the last tensor made
    for this device and dtype with the numbers it holds, so a step whose
    hyperparameters did not change reuses it, with no host-to-device copy.
    Tensor hyperparameters are stacked on the device (no copy from the host)."""
    dtype = coefficient_dtype(dtype)
    if any(isinstance(c, Tensor) for c in coefficients):
        return torch.stack([torch.as_tensor(c, dtype=dtype, device=device).reshape(()) for c in coefficients])
    key = (device, dtype)
    if cache is not None and key in cache and cache[key][0] == coefficients:
        return cache[key][1]
    k = torch.tensor(coefficients, dtype=dtype, device=device)
    if cache is not None:
        cache[key] = (coefficients, k)
    return k


def native_step(update: Callable, native: str, coefficients: tuple, bucket: list[tuple[Tensor, ...]]) -> None:
    """One step of the native kernel ``native`` on CPU tensors of one dtype, each tuple
    ``(q, g, *states)``; tensors it cannot take get ``update`` eagerly."""
    flat = []
    for tensors in bucket:
        if _plain(tensors) and dense_alike(tensors):
            flat.append(tensors)
        else:
            update(*tensors, coefficients)
    if flat:
        _native.step(native, flat[0][0].dtype, _as_floats(coefficients), flat)


def compiled_step(update: Callable, coefficients: tuple, bucket: list[tuple[Tensor, ...]],
                  device: torch.device, dtype: torch.dtype, native_failure: Optional[str] = None,
                  cache: Optional[dict] = None) -> None:
    """One step of ``update`` compiled by ``torch.compile``, on tensors of one device and dtype.

    Tensors of at least ``SMALL_NUMEL`` elements get a kernel call each, on flat
    aliases (no copies); smaller ones are concatenated into batches of at most
    ``BATCH_NUMEL`` elements and updated by one call per batch, which saves the
    per-call overhead (tens of microseconds, and a multithreaded region) on the
    many bias and LayerNorm vectors of a transformer. Where compiling fails, the
    whole bucket runs ``update`` eagerly (after one warning). ``cache`` keeps the
    coefficient tensor from step to step (``_as_tensor``).
    """
    kernel = _kernel(update, device, dtype, len(bucket[0]), len(coefficients), native_failure)
    if kernel is None:
        for tensors in bucket:
            update(*tensors, coefficients)
        return
    k = _as_tensor(coefficients, dtype, device, cache)
    batch, batch_numel = [], 0
    for tensors in bucket:
        numel = tensors[0].numel()
        if not _plain(tensors):
            update(*tensors, coefficients)
        elif numel < SMALL_NUMEL:
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

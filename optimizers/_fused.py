"""The fused path: one pass over each tensor's elements per step.

Two implementations. For each optimizer kernel, device type and dtype, one
cached ``Backend`` (``backend()``) holds the implementation that runs there and
why the others do not; ``DampedOptimizer.code_path`` reports it, tensor by
tensor (``Backend.paths``):

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
- The coefficients (the optimizer's coefficient tuple: ``-h``, ``exp(-gamma h)``,
  ...) arrive as one small 1-D tensor, in the tuple's field order, on the
  parameters' device, in float32 (float64 for float64 parameters), so a
  scheduler that changes a hyperparameter changes data, not the graph. It is
  made (one host-to-device copy) only when a hyperparameter changed since the
  group's last step, and reused otherwise. (The native kernels take them as C
  doubles: nothing to recompile.) Hyperparameters given as tensors are stacked
  into it without leaving the device.
- Low-precision parameters (bf16, fp16) are loaded into float32 registers,
  updated there and rounded once on the store; the eager paths round after
  every sub-step. State stays in the parameter's dtype. The native kernels do
  the same.

For the compiled kernel, small tensors (biases, LayerNorm weights) are
concatenated and updated in one call per batch rather than one call each (see
``Backend.schedule``). Tensors whose layout differs between the parameter, its
gradient and its state, tensor subclasses other than ``nn.Parameter`` (whose
data pointer is not their elements'; DTensors arrive here as their local
shards), and, for the compiled kernel, a lone one-element tensor (dynamo would
specialise a graph for it; the native kernels take it) go through the same
``_update`` eagerly; ``code_path`` reports them as ``single``. Where neither
implementation is available (no C or C++ compiler, no Triton, an unsupported
Python) the backend's path is the eager loop, and it warns once (``_warn``, the
one place this module warns) when it is made.
"""
from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from . import _native

__all__ = ["Backend", "backend", "compiled_update", "NATIVE", "COMPILED", "FOREACH", "SINGLE", "PATHS",
           "WARMUP_NUMEL", "SMALL_NUMEL", "BATCH_NUMEL"]

# The paths a step can take (``DampedOptimizer.code_path``): the fused path's two
# implementations, and the two eager paths.
NATIVE, COMPILED, FOREACH, SINGLE = "native", "compiled", "foreach", "single"
PATHS = (NATIVE, COMPILED, FOREACH, SINGLE)

WARMUP_NUMEL = 1 << 16
SMALL_NUMEL = 1 << 15  # tensors below this size are updated in concatenated batches...
# ...of at most this many elements. The batch's copies (parameter, gradient and
# state) are the fused path's only temporaries: at most (2 + states) * 2**16
# elements, 1 MiB for CADAM in float32, under 10% of the parameter memory of
# any model large enough for ``fused=None`` to choose this path (2**22 elements).
BATCH_NUMEL = 1 << 16

_compiled: dict[Callable, Callable] = {}  # update function -> its torch.compile wrapper
# (update, native kernel, native kernels enabled, device type, dtype) -> its Backend
_backends: dict[tuple, "Backend"] = {}
_warned: set[str] = set()  # the warnings given (``_warn``)
# Where the frames ``_warn`` skips come from: this package and torch (``step``'s wrappers).
_OWN_CODE = (os.path.dirname(__file__) + os.sep, os.path.dirname(torch.__file__) + os.sep)


def _warn(message: str) -> None:
    """The one place the fused path warns: each message once per process, attributed to
    the user's line that led to it (``opt.step()``, ``opt.code_path()``, ...): the first
    frame outside this package and torch, however deep the call came through them."""
    if message not in _warned:
        _warned.add(message)
        level, frame = 1, sys._getframe(0)
        while frame.f_back is not None and frame.f_code.co_filename.startswith(_OWN_CODE):
            frame, level = frame.f_back, level + 1
        warnings.warn(message, RuntimeWarning, stacklevel=level)


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


def _compile(update: Callable, device: torch.device, dtype: torch.dtype, n_tensors: int,
             n_coefficients: int) -> tuple[Optional[Callable], Optional[str]]:
    """``(kernel, None)``: ``update`` compiled for this device and dtype, and run once on
    scratch tensors; ``(None, why)`` where that fails."""
    reason = _why_unavailable(device)
    if reason is not None:
        return None, reason
    kernel = compiled_update(update)
    scratch = [torch.zeros(WARMUP_NUMEL, dtype=dtype, device=device) for _ in range(n_tensors)]
    try:
        kernel(*scratch, torch.ones(n_coefficients, dtype=coefficient_dtype(dtype), device=device))
    except Exception as error:  # any failure to compile means: use the eager loop
        message = str(error).strip()
        return None, f"{type(error).__name__}: {message.splitlines()[0] if message else ''}"
    return kernel, None


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


@dataclass(frozen=True)
class Backend:
    """The fused step of one optimizer kernel on one device type and dtype (``backend()``).

    ``path`` is what runs: ``NATIVE`` (the C kernel named ``native``), ``COMPILED``
    (``kernel``: ``update`` compiled by ``torch.compile``) or, where neither could be
    built, ``SINGLE`` (``update`` eagerly, tensor by tensor). ``why_not`` maps each
    implementation that was wanted here and not taken to the reason. Inside a step,
    a tensor the implementation cannot take goes through ``update`` eagerly:
    ``schedule`` decides which, and ``paths`` reports it.
    """

    path: str
    update: Callable
    native: Optional[str] = None
    kernel: Optional[Callable] = None
    why_not: dict = field(default_factory=dict)

    def schedule(self, bucket: Sequence[tuple[Tensor, ...]]) -> tuple[list[list[int]], list[int]]:
        """``(calls, eager)`` for ``bucket``, tuples ``(q, g, *states)`` of this device and
        dtype: the kernel calls, each a list of indices into ``bucket``, and the indices
        of the tuples that go through ``update`` eagerly.

        The native kernel takes every tuple of plain, dense-alike tensors in one call.
        The compiled kernel takes a tensor of ``SMALL_NUMEL`` elements or more in a call
        of its own (on flat aliases), and smaller ones in batches of at most
        ``BATCH_NUMEL`` elements (concatenated); a last batch of fewer than 2 elements
        (a lone one-element tensor: a graph of its own is not worth compiling) goes
        eagerly. Tensor subclasses, and tensors whose layouts differ, go eagerly.
        """
        calls: list[list[int]] = []
        eager: list[int] = []
        if self.path == NATIVE:
            call = []
            for i, tensors in enumerate(bucket):
                (call if _plain(tensors) and dense_alike(tensors) else eager).append(i)
            return ([call] if call else []), eager
        if self.path != COMPILED:
            return [], list(range(len(bucket)))
        batch, batch_numel = [], 0
        for i, tensors in enumerate(bucket):
            numel = tensors[0].numel()
            if not _plain(tensors):
                eager.append(i)
            elif numel < SMALL_NUMEL:
                if batch_numel + numel > BATCH_NUMEL:
                    calls.append(batch)
                    batch, batch_numel = [], 0
                batch.append(i)
                batch_numel += numel
            elif _flattenable(tensors):
                calls.append([i])
            else:
                eager.append(i)
        if batch_numel >= 2:
            calls.append(batch)
        else:
            eager.extend(batch)
        return calls, eager

    def paths(self, bucket: Sequence[tuple[Tensor, ...]]) -> list[str]:
        """The path each tuple of ``bucket`` takes (``schedule``): ``path``, or ``SINGLE``."""
        eager = set(self.schedule(bucket)[1])
        return [SINGLE if i in eager else self.path for i in range(len(bucket))]

    def run(self, coefficients: tuple, bucket: Sequence[tuple[Tensor, ...]], cache: Optional[dict] = None) -> None:
        """One step over ``bucket`` as ``schedule`` says, given the optimizer's coefficient
        tuple. ``cache`` keeps the compiled kernel's coefficient tensor from step to step
        (``_as_tensor``)."""
        calls, eager = self.schedule(bucket)
        for i in eager:
            self.update(*bucket[i], coefficients)
        if not calls:
            return
        if self.path == NATIVE:
            _native.step(self.native, bucket[0][0].dtype, _as_floats(coefficients), [bucket[i] for i in calls[0]])
            return
        q = bucket[0][0]
        k = _as_tensor(coefficients, q.dtype, q.device, cache)
        for call in calls:
            if len(call) == 1 and bucket[call[0]][0].numel() >= SMALL_NUMEL:
                self.kernel(*[_flat(t) for t in bucket[call[0]]], k)
            else:
                _run_batch(self.kernel, [bucket[i] for i in call], k)


def backend(update: Callable, native: Optional[str], n_tensors: int, n_coefficients: int, device: torch.device,
            dtype: torch.dtype) -> Backend:
    """The fused step of the optimizer whose ``_update`` is ``update`` and whose native
    kernel is ``native`` (None: none), on ``device``'s type and ``dtype``: made the first
    time it is asked for, then cached.

    The native kernel where there is one, on the CPU, unless switched off
    (``NONLINEAR_DAMPING_NATIVE=0``); else ``update`` compiled, on scratch tensors of
    ``n_tensors`` ``(q, g, *states)`` and ``n_coefficients`` coefficients, unless
    compiling already failed on this device type; else the eager loop. Making it warns
    (``_warn``) where an implementation that should exist could not be built.
    """
    key = (update, native, _native.ENABLED, device.type, dtype)
    if key in _backends:
        return _backends[key]
    why_not = {}
    native_failure = None  # why the native kernels could not be built: said in the warning
    if native is None:
        why_not[NATIVE] = "the optimizer has no native kernel (it has an _update of its own)"
    elif device.type != "cpu":
        why_not[NATIVE] = "the native kernels run on the CPU only"
    elif not _native.ENABLED:
        why_not[NATIVE] = "switched off by NONLINEAR_DAMPING_NATIVE=0"
    elif _native.supports(native, device, dtype):
        _backends[key] = Backend(NATIVE, update, native, why_not={COMPILED: "the native kernel runs here"})
        return _backends[key]
    else:
        native_failure = _native.why_unavailable()
        why_not[NATIVE] = native_failure or f"the native library has no {native} kernel for {dtype}"
    # Compiling failed on this device type before: do not spend seconds failing again.
    failed = [b.why_not[COMPILED] for k, b in _backends.items() if k[3] == device.type and b.path == SINGLE]
    if failed:
        kernel, compile_failure = None, failed[0]
    else:
        kernel, compile_failure = _compile(update, device, dtype, n_tensors, n_coefficients)
    if kernel is not None:
        if native_failure is not None:
            _warn(f"native CPU optimizer kernels unavailable ({native_failure}); "
                  "the fused step uses torch.compile instead")
        _backends[key] = Backend(COMPILED, update, native, kernel, why_not)
    else:
        why_not[COMPILED] = compile_failure
        reasons = compile_failure
        if native_failure is not None:
            reasons = f"native kernels: {native_failure}; torch.compile: {compile_failure}"
        _warn(f"fused optimizer step unavailable on {device.type} ({reasons}); falling back to the single-tensor loop")
        _backends[key] = Backend(SINGLE, update, native, None, why_not)
    return _backends[key]

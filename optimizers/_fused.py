"""The fused path: each optimizer's per-tensor update compiled into one kernel.

``torch.compile(update, dynamic=True, fullgraph=True)`` turns an optimizer's
``_update`` (the very function the single-tensor loop runs) into a single
elementwise loop: it reads ``q``, ``g`` and the state once, writes ``q`` and
the state once, and materialises no temporaries (Inductor emits a vectorised
OpenMP loop on the CPU and a Triton kernel on CUDA). Three choices keep it
cheap to compile and free of recompiles:

- Every tensor is passed as a flat 1-D alias of its storage with a symbolic
  length, so ONE graph per (optimizer, device type, dtype) serves every
  parameter shape. It is compiled once, on scratch tensors of
  ``WARMUP_NUMEL`` elements, so the generated code (Inductor decides on
  multithreading from the size it first sees) never depends on which
  parameter happens to come first.
- The coefficients (``h``, ``exp(-gamma h)``, ...) arrive as one small 1-D
  tensor on the parameters' device, in float32 (float64 for float64
  parameters), so a scheduler that changes a hyperparameter changes data, not
  the graph.
- Low-precision parameters (bf16, fp16) are loaded into float32 registers,
  updated there and rounded once on the store; the eager paths round after
  every sub-step. State stays in the parameter's dtype.

Small tensors (biases, LayerNorm weights) are concatenated and updated in one
call per batch rather than one call each (see ``fused_step``). Large tensors
whose layout differs between the parameter, its gradient and its state, a
lone one-element tensor (dynamo would specialise a graph for it) and
parameters whose gradient has another dtype go through the same ``_update``
eagerly. Where compilation is unavailable (no C++ compiler, no Triton, an
unsupported Python) the first step warns once and every step runs the eager loop.
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["fused_step", "compiled_update", "WARMUP_NUMEL", "SMALL_NUMEL", "BATCH_NUMEL"]

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


def _kernel(update: Callable, device: torch.device, dtype: torch.dtype, n_tensors: int, n_coefficients: int):
    """The compiled kernel for this device and dtype, compiling it on scratch tensors
    the first time; None (after one warning per device type) where compiling fails."""
    if device.type in _unavailable:
        return None
    kernel = compiled_update(update)
    key = (update, device.type, dtype)
    if key in _ready:
        return kernel
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
        warnings.warn(
            f"fused optimizer step unavailable on {device.type} ({reason}); "
            "falling back to the single-tensor loop",
            RuntimeWarning,
            stacklevel=4,
        )
        return None
    _ready.add(key)
    return kernel


def _flat(t: Tensor) -> Tensor:
    """A 1-D alias of ``t``'s elements (not a view, so dynamo sees a plain 1-D input)."""
    return t.new_empty(0).set_(t.untyped_storage(), t.storage_offset(), (t.numel(),), (1,))


def _dense(t: Tensor) -> bool:
    return (
        t.is_contiguous()
        or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))
        or (t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d))
    )


def _flattenable(tensors: Sequence[Tensor]) -> bool:
    """True when the kernel can run on flat aliases: the same dense layout throughout."""
    q = tensors[0]
    if q.numel() < 2 or not _dense(q):
        return False
    return all(t.stride() == q.stride() for t in tensors[1:])


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


def fused_step(
    update: Callable,
    coefficients: tuple,
    params: list[Tensor],
    grads: list[Tensor],
    states: list[list[Tensor]],
) -> None:
    """One optimizer step for one param group on the fused path.

    ``update(q, g, *states, k)`` is the optimizer's per-tensor update and
    ``coefficients`` its coefficient tuple (Python floats) for this group.
    Tensors of at least ``SMALL_NUMEL`` elements get a kernel call each, on
    flat aliases (no copies); smaller ones are concatenated into batches of
    at most ``BATCH_NUMEL`` elements and updated by one call per batch, which saves
    the per-call overhead (tens of microseconds, and a multithreaded region)
    on the many bias and LayerNorm vectors of a transformer.
    """
    buckets: dict = {}  # (device, dtype) -> [(q, g, *state), ...]
    for tensors in zip(params, grads, *states):
        q = tensors[0]
        if all(t.dtype == q.dtype and t.device == q.device for t in tensors[1:]):
            buckets.setdefault((q.device, q.dtype), []).append(tensors)
        else:
            update(*tensors, coefficients)
    for (device, dtype), bucket in buckets.items():
        kernel = _kernel(update, device, dtype, len(bucket[0]), len(coefficients))
        if kernel is None:
            for tensors in bucket:
                update(*tensors, coefficients)
            continue
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
    # The flat aliases do not share the parameters' autograd version counters:
    # bump them, as an in-place update would, so that autograd still notices a
    # parameter that changed after being saved for backward.
    torch.autograd.graph.increment_version(params)

"""The native CPU kernels of the fused path (``optimizers/_native.c``).

On the CPU the fused step of LDHD, CD, iKFAD and CADAM is a small C library:
one exported function per optimizer and dtype (float32, float64, bfloat16 and,
where the compiler has ``_Float16``, float16) that updates every tensor of a
param group in one OpenMP parallel region, reading ``q``, ``g`` and the state
once and writing ``q`` and the state once. Against the ``torch.compile``d
kernel (``_fused.py``) it saves the per-tensor call overhead (one call per
group instead of one per tensor), builds in about a second instead of ten, and
computes friction's exponential as ``2**x`` with a vectorised polynomial (at
most 0.89 ulp) where Inductor calls Sleef's ``exp`` (1 ulp), which made iKFAD's compiled step about 1.5x
fused Adam's on a CPU.

The library is built on first use with the system C compiler (``$CC``, else
``cc``, ``gcc`` or ``clang``) for the instruction set PyTorch itself dispatches
to on this CPU (``torch.backends.cpu.get_cpu_capability()``), and cached on
disk: ``$NONLINEAR_DAMPING_CACHE``, else ``$XDG_CACHE_HOME/nonlinear-damping``
(``~/.cache/nonlinear-damping``), under a name that hashes the source, the
compiler and the flags (the coefficient indices among them, below). So a machine builds it once, and nodes of a cluster
that share a home directory but differ in instruction set each get their own
build. ``NONLINEAR_DAMPING_NATIVE=0`` switches it off (the fused path then
compiles ``_update`` with ``torch.compile`` on the CPU too).

Each kernel takes its optimizer's coefficients as an array of doubles in the
order of the optimizer's coefficient tuple (``CD.Coefficients``, a named tuple),
and reads them by name: the build defines the index of each field as a constant
named after the kernel and the field (``-DCD_TWO_C_H=4``; ``coefficient_indices``).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

__all__ = ["ENABLED", "library", "why_unavailable", "supports", "step", "cache_dir", "kernels", "coefficient_indices"]

SOURCE = Path(__file__).with_name("_native.c")
DTYPES = {torch.float32: "float32", torch.float64: "float64", torch.bfloat16: "bfloat16", torch.float16: "float16"}
ENABLED = os.environ.get("NONLINEAR_DAMPING_NATIVE", "1") != "0"

_lock = threading.Lock()
_library: Optional[ctypes.CDLL] = None
_failure: Optional[str] = None  # why the library could not be built or loaded
_functions: dict[tuple[str, torch.dtype], Optional[ctypes._CFuncPtr]] = {}


def cache_dir() -> Path:
    """Where built libraries are kept (see the module docstring)."""
    if os.environ.get("NONLINEAR_DAMPING_CACHE"):
        return Path(os.environ["NONLINEAR_DAMPING_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "nonlinear-damping"


def _compiler() -> Optional[str]:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _isa_flags() -> list[str]:
    """Instruction-set flags for the vector width PyTorch's own kernels use on this CPU."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []  # AArch64 and others: the compiler's baseline (NEON on AArch64)
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX512"):
        return ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
                "-mprefer-vector-width=512"]
    if capability == "AVX2":
        return ["-mavx2", "-mfma", "-mf16c"]
    return []


def kernels() -> dict[str, type]:
    """Each kernel of ``_native.c`` (the optimizer's ``native_kernel``) -> its optimizer's
    coefficient tuple."""
    # Imported here: the optimizer modules import this one.
    from .cadam import CADAM
    from .cd import CD
    from .ikfad import iKFAD
    from .ldhd import LDHD

    return {cls.native_kernel: cls.Coefficients for cls in (LDHD, CD, iKFAD, CADAM)}


def coefficient_indices() -> dict[str, int]:
    """The C constant of each coefficient's index in a kernel's ``k`` -> that index, from
    the fields of the optimizers' coefficient tuples: ``{"CD_KICK_STEP": 0, ...,
    "CD_TWO_C_H": 4, ...}``."""
    return {f"{kernel.upper()}_{field.upper()}": index
            for kernel, coefficients in kernels().items() for index, field in enumerate(coefficients._fields)}


def _flags() -> list[str]:
    # No -ffast-math: the kernels must round as the eager paths do, NaNs included.
    # -fno-math-errno lets sqrt be one instruction; -fno-trapping-math (the
    # kernels never enable FP exceptions) lets GCC if-convert the clamps of
    # exp2_float, which it otherwise does only with AVX-512's masked moves, so
    # that the loops vectorise with AVX2 and SSE too. Neither changes a result.
    # The -D flags define the coefficient indices, and so enter the library's cache key.
    return ["-O3", "-std=gnu11", "-shared", "-fPIC", "-fno-math-errno", "-fno-trapping-math",
            "-fvisibility=hidden", *_isa_flags(),
            *(f"-D{name}={index}" for name, index in coefficient_indices().items())]


def _build(compiler: str, target: Path) -> None:
    """Compile the library into ``target``, with OpenMP if the compiler has it
    (without, e.g. Apple's clang, the kernels run on one thread)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build under a unique name and rename: several processes (DDP ranks) may
    # build at once, and none may load a half-written file.
    fd, tmp = tempfile.mkstemp(suffix=".so", prefix=".build-", dir=target.parent)
    os.close(fd)
    try:
        errors = ""
        for openmp in (["-fopenmp"], []):
            command = [compiler, *_flags(), *openmp, str(SOURCE), "-o", tmp, "-lm"]
            result = subprocess.run(command, capture_output=True, text=True, timeout=300)
            if result.returncode == 0:
                os.chmod(tmp, 0o755)  # mkstemp made it private; a shared cache folder needs it readable
                os.replace(tmp, target)
                return
            errors = result.stderr.strip() or f"{Path(compiler).name} exited with {result.returncode}"
        raise RuntimeError(errors.splitlines()[-1])
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _target(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, version, *_flags()]).encode()).hexdigest()
    return cache_dir() / f"damped-{key[:16]}.so"


def library() -> Optional[ctypes.CDLL]:
    """The loaded library, building it the first time; None where that is impossible
    (no C compiler, a failed build), with the reason in ``why_unavailable()``."""
    global _library, _failure
    if _library is not None or _failure is not None:
        return _library
    with _lock:
        if _library is None and _failure is None:
            try:
                compiler = _compiler()
                if compiler is None:
                    raise RuntimeError("no C compiler (set CC, or install cc, gcc or clang)")
                target = _target(compiler)
                if not target.exists():
                    _build(compiler, target)
                _library = ctypes.CDLL(str(target))
            except (OSError, RuntimeError, subprocess.SubprocessError) as error:
                _failure = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return _library


def why_unavailable() -> Optional[str]:
    """Why the native kernels cannot run here (building them first if needed); None if they can."""
    if not ENABLED:
        return "switched off by NONLINEAR_DAMPING_NATIVE=0"
    library()
    return _failure


def _function(kernel: str, dtype: torch.dtype):
    key = (kernel, dtype)
    if key not in _functions:
        lib = library()
        fn = getattr(lib, f"{kernel}_{DTYPES[dtype]}", None) if lib is not None and dtype in DTYPES else None
        if fn is not None:
            fn.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
            fn.restype = None
        _functions[key] = fn
    return _functions[key]


def supports(kernel: Optional[str], device: torch.device, dtype: torch.dtype) -> bool:
    """True when a native kernel exists for this optimizer kernel, device and dtype."""
    return ENABLED and kernel is not None and device.type == "cpu" and _function(kernel, dtype) is not None


def step(kernel: str, dtype: torch.dtype, coefficients: tuple, tensors: list[tuple[Tensor, ...]]) -> None:
    """One step of ``kernel`` over CPU tensors of ``dtype``, each tuple ``(q, g, *states)``
    laid out alike (``_fused.dense_alike``); ``coefficients`` are the optimizer's coefficient
    tuple for their group, as floats in its field order (which the kernel's index constants,
    ``coefficient_indices``, name)."""
    fn = _function(kernel, dtype)
    n, width = len(tensors), len(tensors[0])
    numel = (ctypes.c_int64 * n)(*[t[0].numel() for t in tensors])
    addresses = [x.data_ptr() for t in tensors for x in t]
    if not all(addresses[j] for j in range(len(addresses)) if tensors[j // width][0].numel()):
        # A tensor type whose storage is elsewhere (a DTensor is 0 here): never hand C a NULL.
        raise ValueError("native optimizer kernel: a tensor without a data pointer; expected plain CPU tensors")
    pointers = (ctypes.c_void_p * (n * width))(*addresses)
    k = (ctypes.c_double * len(coefficients))(*coefficients)
    fn(n, numel, pointers, k, torch.get_num_threads())

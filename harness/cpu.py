"""The CPU side: the cores this process may use, and a measured fp32 peak to set achieved FLOP/s against.

GPUs have datasheet peaks (``harness.loop.PEAK_FLOPS``); a CPU's depends on its
vector units, clock and thread count, which no table here knows. So the
reference is measured: the best of a few square fp32 matmuls (the operation that
comes closest to a core's arithmetic peak) on the threads PyTorch uses now,
about 0.1 s. Achieved model FLOP/s over this is the CPU analogue of MFU.
"""
from __future__ import annotations

import os
import time
from functools import lru_cache
from typing import Optional

import torch

__all__ = ["available_cpus", "matmul_peak_flops", "thread_env"]


def available_cpus() -> int:
    """The CPUs this process may run on: its affinity mask (``os.sched_getaffinity``: a SLURM
    job's or ``taskset``'s cores, not the whole machine's ``os.cpu_count()``), and no more than
    ``SLURM_CPUS_PER_TASK`` where SLURM sets it."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    per_task = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if per_task.isdigit() and int(per_task) > 0:
        cpus = min(cpus, int(per_task))
    return max(1, cpus)


def thread_env(threads: Optional[int]) -> dict[str, str]:
    """The environment that gives a child run ``threads`` CPU threads: ``OMP_NUM_THREADS``, which
    torch reads when it starts. ``None`` gives ``{}``: the child inherits this process's setting,
    else torch's default of every core. Several runs on one machine each need their share
    (cores / runs): two 2-thread runs on 2 cores spin against each other, and a small model then
    trains several times slower than on one thread each."""
    return {} if threads is None else {"OMP_NUM_THREADS": str(int(threads))}


@lru_cache(maxsize=None)
def _measure(threads: int, size: int, repeats: int) -> float:
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    torch.mm(a, b)  # warm-up: allocation, kernel selection
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best


def matmul_peak_flops(size: int = 1024, repeats: int = 5) -> float:
    """fp32 FLOP/s of a ``size`` x ``size`` matmul on ``torch.get_num_threads()`` threads
    (the best of ``repeats``; measured once per process and thread count)."""
    return _measure(torch.get_num_threads(), size, repeats)

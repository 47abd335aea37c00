"""Preflight: does every experiment train on this node's device, and how should its runs be packed?

    bash scripts/preflight.sh [--quick] [--out DIR]        # python -m harness.preflight ...

On whatever the node has (every visible GPU, else the CPU) it checks, each check on its own
(a failure never stops the others; a check whose optional package is missing is skipped, and
says which package):

- ``train <exp>``, for nano, owt, gpt2, vit, cifar, bert/sst2 and bert/qnli: the experiment's
  ``configs/smoke.yaml`` trains on its smoke data (``harness.smoke_data``, generated offline
  into a temporary folder) in the precision its ``paper.yaml`` names for this device
  (``train.precision`` on CUDA, ``train.cpu_precision`` on the CPU), with every optimizer of
  its ``best.yaml`` (``--quick``: one per experiment and fewer steps); one optimizer's run
  (``RESUMED``: Adam and the paper's four spread over the experiments) is repeated,
  interrupted after half its steps (``HARNESS_STOP_AFTER_STEPS``, the
  checkpoint-and-exit-75 path of a SLURM signal) and resumed, and its records must equal the
  uninterrupted run's: exactly on the CPU; on CUDA every number within ``CUDA_RTOL`` relative
  (or ``CUDA_ATOL`` absolute) -- atomics in the embedding backward and cuBLAS's reductions are
  not bitwise reproducible, and fp16 rounding amplifies them over the steps;
- ``step <optimizer>`` for CD, iKFAD, CADAM and LDHD: the default step (``fused=None``: the
  fused kernel on CUDA at GPT-2 small size) against the reference single-tensor loop
  (``foreach=False, fused=False``) on the device, three steps from the same state, fp32 and
  bf16 (tolerances in ``STEP_TOLERANCE``); its time against ``torch.optim.AdamW(fused=True)``
  alternated with it and its peak extra memory (``benchmarks/optimizer_step.py``), at GPT-2
  small (124M parameters) on CUDA, 10M on the CPU, 1M with ``--quick``;
- GPU only (skipped on the CPU, with the reason): ``nano packing``, the nano paper protocol
  (``nano/configs/paper.yaml``, Adam) with 1, 2, 4, 8 and 16 runs sharing one GPU
  (``harness.launch --runs-per-gpu N``, a few hundred iterations each): throughput, GPU
  utilisation and memory (``nvidia-smi``), the recommended N and the predicted wall time of
  the full protocol (8 optimizers x 10 seeds x 5001 iterations) on this node; ``owt
  throughput``, owt's paper model at one run per GPU (tokens/s, MFU against the GPU's peak);
  with two or more GPUs ``ddp``, one gpt2 smoke run on two GPUs (torchrun) against one GPU
  with the same global batch.

Writes ``<out>/<host>-<device>.md`` and ``.json`` (default ``results/preflight/``; ``--quick``
beside them, ``<host>-<device>-quick.md``): versions, device, each check's status and one-line
reason, the numbers, and a one-line verdict. An earlier report there is kept unless ``--force``
(``harness.outputs``: the one rule for what a tool may write over). Exit
status 0 when no check failed, 1 otherwise, 2 on a usage error.

``python -m harness.preflight --runs-per-gpu-for nano`` prints the N a report for this host
recommends (nothing, status 1, when there is none): ``scripts/reproduce.sh`` and the SLURM
script use it.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from . import outputs
from .config import REPO, read_yaml
from .errors import UsageError, command

EXPERIMENTS = ("nano", "owt", "gpt2", "vit", "cifar", "bert/sst2", "bert/qnli")
# The optional packages each experiment's smoke run needs beyond torch, numpy and yaml.
NEEDS = {"nano": (), "owt": ("tiktoken", "datasets"), "gpt2": ("transformers",), "vit": ("timm", "torchvision"),
         "cifar": ("torchvision",), "bert/sst2": ("transformers", "datasets", "tokenizers"),
         "bert/qnli": ("transformers", "datasets", "tokenizers")}
# The optimizer whose run is also interrupted and resumed (the only one with --quick): Adam and
# the paper's four spread over the experiments, iKFAD where a model has dropout (the resume must
# then restore the dropout RNG too).
RESUMED = {"nano": "cadam", "owt": "cd", "gpt2": "ikfad", "vit": "ikfad", "cifar": "cd",
                    "bert/sst2": "adam", "bert/qnli": "cadam"}
# --quick: fewer steps (each still interrupted at half and resumed, across an evaluation).
QUICK_SETS = {"nano": ["train.max_iters=12", "train.eval_interval=6", "train.log_interval=3"],
              "owt": ["train.max_iters=10", "train.eval_interval=5"], "gpt2": ["train.max_iters=10", "train.eval_interval=5"],
              "vit": ["train.epochs=1"], "cifar": ["train.epochs=1"], "bert/sst2": ["train.epochs=1"],
              "bert/qnli": ["train.epochs=1"]}
CUDA_RTOL, CUDA_ATOL = 2e-2, 1e-3
OURS = ("CD", "iKFAD", "CADAM", "LDHD")
# (rtol, atol) per dtype between the default and the reference step after 3 steps. fp32: as
# tests/test_fused.py (the kernels contract multiply-adds into FMAs). bf16: the fused kernel
# computes in fp32 and rounds once, the reference loop rounds every operation to bf16 (8-bit
# significand, spacing 2^-7 relative): elements may differ by a few bf16 ulps.
STEP_TOLERANCE = {"fp32": (1e-5, 1e-6), "bf16": (3e-2, 1e-4)}
PACKING = (1, 2, 4, 8, 16)
NANO_PROTOCOL = dict(optimizers=8, seeds=10, iters=5001)  # nano/configs/best.yaml x paper.yaml
PACKING_TOLERANCE = 0.05  # the smallest N within 5% of the best predicted wall time is recommended
DDP_RTOL = 1e-3  # two ranks reduce the gradient in another order than one process: fp32 rounding only
clock = time.perf_counter  # the wall clock of the packing check (a test simulates it)


class Skip(Exception):
    """The check does not apply here (its one-line reason)."""


class Failed(Exception):
    """The check ran and found a problem (its one-line reason)."""


@dataclass
class Check:
    name: str
    status: str = "ok"  # ok, failed, skipped
    reason: str = ""
    numbers: dict = field(default_factory=dict)
    seconds: float = 0.0
    # this process's CPU time (all its threads): about its wall time on idle cores (less where
    # operations use several threads), whatever else the machine is doing
    cpu_seconds: float = 0.0


@dataclass
class Context:
    device: "object"  # torch.device
    gpus: int
    quick: bool
    scratch: Path
    log: Callable[[str], None] = print
    _data: dict = field(default_factory=dict)

    def smoke_sets(self, spec: str) -> list[str]:
        """The ``--set`` overrides of ``spec``'s smoke data, generated once per preflight."""
        if spec not in self._data:
            from . import smoke_data

            self._data[spec] = smoke_data.prepare(spec, self.scratch / "data" / spec.replace("/", "-"))
        return self._data[spec]


def one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[-1] if text else ''}"[:300]


def run_check(name: str, fn: Callable[[], dict], needs=()) -> Check:
    """``fn()``'s numbers as an ok check; a ``Skip``, ``Failed`` or any other error as the
    check's status and one-line reason. Nothing propagates (KeyboardInterrupt aside)."""
    check = Check(name)
    start, cpu_start = time.perf_counter(), time.process_time()
    missing = [p for p in needs if importlib.util.find_spec(p) is None]
    try:
        if missing:
            raise Skip(f"needs the optional package(s) {', '.join(missing)}, not installed")
        check.numbers = fn() or {}
    except Skip as e:
        check.status, check.reason = "skipped", str(e)
    except Failed as e:
        check.status, check.reason = "failed", str(e)
    except (Exception, SystemExit) as e:  # noqa: BLE001 -- a failed check never stops the others
        check.status, check.reason = "failed", one_line(e)
        traceback.print_exc()
    check.seconds, check.cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return check


# ------------------------------------------------------------------------------- experiments train

def records_differ(a: list[dict], b: list[dict], rtol: float = 0.0, atol: float = 0.0) -> Optional[str]:
    """None when the record lists match (same keys, equal non-numbers, numbers within
    ``atol + rtol * |b|``; NaN equals NaN), else where they first differ."""
    if len(a) != len(b):
        return f"{len(a)} records against {len(b)}"
    for i, (x, y) in enumerate(zip(a, b)):
        if x.keys() != y.keys():
            return f"record {i}: keys {sorted(x)} against {sorted(y)}"
        for k, u in x.items():
            v = y[k]
            numbers = all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in (u, v))
            if numbers and (math.isnan(u) and math.isnan(v) or abs(u - v) <= atol + rtol * abs(v)):
                continue
            if u != v:
                return f"record {i} ({x.get('split', '')} step {x.get('step', '?')}): {k} {u!r} against {v!r}"
    return None


def run_records(folder: Path) -> list[dict]:
    """A run's records without their wall times (which differ between identical runs)."""
    from .rundir import RunDir

    return [{k: v for k, v in r.items() if k != "time_s"} for r in RunDir(folder).records()]


def experiment_check(ctx: Context, spec: str) -> dict:
    """Every optimizer of ``spec`` (``--quick``: one) trains its smoke config; one of them
    (``RESUMED``) trains again, interrupted after half its steps and resumed, and the two runs'
    records must match."""
    import torch

    from .experiments import experiment, train_command
    from .loop import EXIT_INTERRUPTED, STOP_AFTER_ENV
    from .rundir import RunDir

    exp = experiment(spec)
    resumed = RESUMED[spec]
    names = [resumed] if ctx.quick else list(dict.fromkeys([*read_yaml(exp.configs / "best.yaml"), resumed]))
    sets = ctx.smoke_sets(spec) + (QUICK_SETS[spec] if ctx.quick else [])
    main = importlib.import_module(exp.module).main
    rtol, atol = (0.0, 0.0) if ctx.device.type == "cpu" else (CUDA_RTOL, CUDA_ATOL)
    out = ctx.scratch / "runs" / spec.replace("/", "-")
    numbers = {"optimizers": names, "resumed": resumed,
               "resume": "exact" if ctx.device.type == "cpu" else f"rtol {rtol:g}, atol {atol:g}"}

    def train(name: str, folder: str, stop_after: int = 0) -> int:
        argv = train_command(exp, name, 1, out / name / folder, str(exp.configs / "smoke.yaml"), sets)[3:]
        if stop_after:
            os.environ[STOP_AFTER_ENV] = str(stop_after)
        try:
            return main(argv)
        finally:
            os.environ.pop(STOP_AFTER_ENV, None)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    cifar = contextlib.nullcontext()
    if spec in ("vit", "cifar"):
        from .fake_cifar10 import unchecked_cifar10

        cifar = unchecked_cifar10()
    problems = []
    with cifar:
        for name in names:
            if (rc := train(name, "whole")) != 0:
                problems.append(f"{name}: the run exited {rc} (log above)")
                continue
            summary = RunDir(out / name / "whole").summary()
            numbers.update(steps=summary["total_steps"], precision=summary["precision"], device=summary["device"])
            numbers.setdefault("final_val_loss", {})[name] = summary.get("final", {}).get("val", {}).get("loss")
            numbers.setdefault("steps_per_s", {})[name] = round(summary["steps_per_s"], 2)
            if torch.cuda.is_available() and not summary["device"].startswith("cuda"):
                problems.append(f"{name}: trained on {summary['device']} although CUDA is available")
            if name != resumed:
                continue
            half = max(1, summary["total_steps"] // 2)
            if (rc := train(name, "resumed", half)) != EXIT_INTERRUPTED:
                problems.append(f"{name}: interrupted after {half} steps, the run exited {rc}, not {EXIT_INTERRUPTED}")
            elif (rc := train(name, "resumed")) != 0:
                problems.append(f"{name}: the resumed run exited {rc} (log above)")
            elif diff := records_differ(run_records(out / name / "resumed"), run_records(out / name / "whole"),
                                        rtol, atol):
                problems.append(f"{name}: resumed after {half} steps differs from the uninterrupted run: {diff}")
            else:
                numbers["resumed_at_step"] = half
    if problems:
        raise Failed("; ".join(problems))
    return numbers


# ------------------------------------------------------------------------------- optimizer steps

def step_size(ctx: Context) -> str:
    """GPT-2 small on CUDA; on the CPU 10M parameters, 1M with --quick (benchmarks/optimizer_step.py sizes)."""
    return "124m" if ctx.device.type == "cuda" else ("1m" if ctx.quick else "10m")


def optimizer_step_check(ctx: Context, name: str) -> dict:
    """The default step against the single-tensor reference (fp32, bf16), its time against
    fused AdamW and its peak extra memory."""
    import torch

    import optimizers
    from benchmarks import optimizer_step as bench

    cls, size, device = getattr(optimizers, name), step_size(ctx), ctx.device
    numbers = {"size": size}
    problems = []
    for dtype_name in ("fp32", "bf16"):
        dtype = bench.DTYPES[dtype_name]
        hyper = bench.HYPERPARAMETERS[name]
        ref_params, params = bench.make_params(size, dtype, device), bench.make_params(size, dtype, device)
        reference = cls(ref_params, **hyper, foreach=False, fused=False)
        default = cls(params, **hyper)
        numbers[f"{dtype_name}_path"] = default.code_path()
        for _ in range(3):
            reference.step()
            default.step()
        rtol, atol = STEP_TOLERANCE[dtype_name]
        worst = 0.0
        for p, q in zip(params, ref_params):
            excess = ((p.float() - q.float()).abs() - atol - rtol * q.float().abs()).max().item()
            worst = max(worst, excess)
        if worst > 0 or not all(torch.isfinite(p).all() for p in params):
            problems.append(f"{dtype_name}: default ({numbers[f'{dtype_name}_path']}) and reference steps differ "
                            f"beyond rtol {rtol:g}, atol {atol:g} (by {worst:.3g})")
        del reference, ref_params
        adamw = bench.TORCH["AdamW"](params, fused=True)
        adamw.step()
        timing = bench.time_against(default, adamw, device, repeats=3 if ctx.quick else 5, max_other_load=0.1)
        numbers[f"{dtype_name}_step_ms"] = round(timing["step_ms"], 3)
        numbers[f"{dtype_name}_x_adamw_fused"] = round(timing["ratio"], 3)
        numbers[f"{dtype_name}_other_load"] = round(timing["other_load"], 2)  # CPU share of other processes
        numbers[f"{dtype_name}_peak_extra_mb"] = round(bench.peak_extra_bytes(default, device) / 2**20, 2)
        numbers[f"{dtype_name}_param_mb"] = round(sum(p.numel() * p.element_size() for p in params) / 2**20, 2)
        del default, adamw, params
    if problems:
        raise Failed("; ".join(problems))
    return numbers


# ------------------------------------------------------------------------------- GPU only

def need_gpus(ctx: Context, n: int = 1) -> None:
    if ctx.gpus < n:
        raise Skip("no CUDA device (GPU only)" if ctx.gpus == 0 else f"needs {n} GPUs, this node has {ctx.gpus}")


class GpuSampler:
    """``nvidia-smi`` every ``interval`` seconds in a thread: utilisation (%) and memory used
    (MiB) of GPU ``index``; mean utilisation and peak memory when stopped. Empty without
    ``nvidia-smi``."""

    def __init__(self, index: str = "0", interval: float = 0.5):
        self.index, self.interval, self.samples = index, interval, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        exe = shutil.which("nvidia-smi")
        while exe and not self._stop.wait(self.interval):
            try:
                out = subprocess.run([exe, "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                                      "-i", str(self.index)], capture_output=True, text=True, timeout=10).stdout
                util, mem = (float(x) for x in out.strip().split(","))
                self.samples.append((util, mem))
            except (OSError, ValueError, subprocess.SubprocessError):
                pass

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def result(self) -> dict:
        if not self.samples:
            return {"gpu_util_pct": None, "gpu_mem_peak_mib": None}
        return {"gpu_util_pct": round(sum(u for u, _ in self.samples) / len(self.samples), 1),
                "gpu_mem_peak_mib": max(m for _, m in self.samples)}


def predicted_protocol_s(run_s: float, startup_s: float, iters: int, n: int, gpus: int) -> float:
    """Wall time of the full nano protocol (``NANO_PROTOCOL``) with ``n`` runs on each of
    ``gpus`` GPUs: waves of ``n * gpus`` runs, each run ``run_s`` seconds of training for
    ``iters`` iterations scaled to the protocol's (evaluations scale with them: one per 100),
    plus its ``startup_s``."""
    runs = NANO_PROTOCOL["optimizers"] * NANO_PROTOCOL["seeds"]
    waves = math.ceil(runs / (n * gpus))
    return waves * (run_s * NANO_PROTOCOL["iters"] / iters + startup_s)


def recommend(rows: list[dict]) -> Optional[int]:
    """The smallest N whose predicted protocol time is within ``PACKING_TOLERANCE`` of the best
    among the N whose runs all finished (fewer runs per GPU: less memory, less at stake)."""
    good = [r for r in rows if r.get("predicted_protocol_s")]
    if not good:
        return None
    best = min(r["predicted_protocol_s"] for r in good)
    return min(r["runs_per_gpu"] for r in good if r["predicted_protocol_s"] <= best * (1 + PACKING_TOLERANCE))


def nano_packing_check(ctx: Context) -> dict:
    """The nano paper protocol with 1, 2, 4, 8, 16 runs on GPU 0 (harness.launch --runs-per-gpu)."""
    need_gpus(ctx)
    from . import launch
    from .rundir import RunDir

    iters = 100 if ctx.quick else 300
    gpu = launch.visible_gpus()[0]  # the first visible GPU (its id under CUDA_VISIBLE_DEVICES, if set)
    data = [s for s in ctx.smoke_sets("nano") if s.startswith("data.dir=")]
    rows = []
    for n in PACKING:
        runs_dir = ctx.scratch / "packing" / f"n{n}"
        argv = ["nano", "--optimizers", "adam", "--seeds", *map(str, range(n)), "--gpus", gpu,
                "--runs-per-gpu", str(n), "--set", f"train.max_iters={iters}", "--runs-dir", str(runs_dir),
                "--no-report"] + [a for s in data for a in ("--set", s)]
        start = clock()
        with GpuSampler(gpu) as sampler:
            rc = launch.main(argv)
        wall = clock() - start
        row = {"runs_per_gpu": n, "wall_s": round(wall, 1), "exit": rc, **sampler.result()}
        summaries = [RunDir(runs_dir / "adam" / f"seed{s}").summary() or {} for s in range(n)]
        if rc == 0 and all(s.get("status") == "completed" for s in summaries):
            run_s = max(s["wall_time_s"] for s in summaries)
            startup = max(wall - run_s, 0.0)
            row.update(run_s=round(run_s, 1), startup_s=round(startup, 1),
                       iters_per_s=round(n * iters / wall, 1),
                       predicted_protocol_s=round(predicted_protocol_s(run_s, startup, iters, n, ctx.gpus)))
        rows.append(row)
        ctx.log(f"  nano packing N={n}: {row}")
    best = recommend(rows)
    numbers = {"iters": iters, "gpus": ctx.gpus, "rows": rows, "recommended_runs_per_gpu": best}
    if best is None:
        raise Failed("no packing finished its runs (see the launch logs above)")
    numbers["predicted_protocol_h"] = round(next(r for r in rows if r["runs_per_gpu"] == best)
                                            ["predicted_protocol_s"] / 3600, 2)
    return numbers


def owt_throughput_check(ctx: Context) -> dict:
    """owt's paper model (nano/configs/paper.yaml of owt: 6 x 8 x 512, block 1024, batch 16,
    fp16) at one run per GPU: tokens/s and MFU between the 10th and the last logged step."""
    need_gpus(ctx)
    from . import launch, smoke_data
    from .rundir import RunDir

    data = smoke_data.owt_bins(ctx.scratch / "data" / "owt-long", documents=60, words_per_document=3000)
    iters = 50 if ctx.quick else 200
    runs_dir = ctx.scratch / "owt-throughput"
    argv = ["owt", "--optimizers", "adam", "--seeds", *map(str, range(ctx.gpus)), "--runs-per-gpu", "1",
            "--set", f"data.dir={data}", "--set", f"train.max_iters={iters}", "--set", "train.eval_iters=5",
            "--set", f"train.eval_interval={iters}", "--runs-dir", str(runs_dir), "--no-report"]
    with GpuSampler(launch.visible_gpus()[0]) as sampler:
        rc = launch.main(argv)
    if rc != 0:
        raise Failed(f"harness.launch owt exited {rc} (logs in {runs_dir / 'logs'})")
    run = RunDir(runs_dir / "adam" / "seed0")
    summary, cfg = run.summary(), run.config()
    train = [r for r in run.records() if r["split"] == "train" and r["step"] >= 10]
    if len(train) < 2:
        raise Failed("too few train records to time the steady state")
    steady = (train[-1]["step"] - train[0]["step"]) / (train[-1]["time_s"] - train[0]["time_s"])
    tokens = cfg["train"]["batch_size"] * cfg["model"]["block_size"]
    mfu = summary.get("mfu")
    return {"runs": ctx.gpus, "precision": summary["precision"], "steps_per_s": round(steady, 2),
            "tokens_per_s": round(steady * tokens), "tokens_per_s_per_gpu": round(steady * tokens / ctx.gpus),
            # the summary's MFU is over its whole-run steps/s (compile and evaluation included)
            "mfu": None if mfu is None else round(mfu * steady / summary["steps_per_s"], 4), **sampler.result()}


def ddp_check(ctx: Context) -> dict:
    """gpt2's smoke run on two GPUs (torchrun, DDP) against one GPU with the same global batch,
    in fp32 without dropout. (gpt2 shards one global batch order over the ranks; nano's random
    windows are drawn per rank, so its runs differ by design between world sizes.)"""
    need_gpus(ctx, 2)
    from .experiments import experiment, train_command
    from .launch import visible_gpus
    from .rundir import RunDir

    exp = experiment("gpt2")
    sets = ctx.smoke_sets("gpt2") + ["train.precision=fp32", "train.tf32=false", "model.dropout=0.0",
                                     "train.max_iters=10", "train.eval_interval=5"]
    out = ctx.scratch / "ddp"
    for nproc in (1, 2):
        cmd = train_command(exp, "adam", 1, out / f"gpus{nproc}", str(exp.configs / "smoke.yaml"), sets, nproc)
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=",".join(visible_gpus()[:nproc]))
        done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
        if done.returncode != 0:
            raise Failed(f"{nproc} GPU(s): exit {done.returncode}: {(done.stderr.strip().splitlines() or [''])[-1]}")
    # the validation records, whose blocks are split between the ranks and summed back (as the CPU
    # test of two processes, tests/test_lm_train.py, compares them)
    val = lambda rows: [r for r in rows if r["split"] == "val"]  # noqa: E731
    diff = records_differ(val(run_records(out / "gpus2")), val(run_records(out / "gpus1")), DDP_RTOL)
    if diff:
        raise Failed(f"two GPUs' validation records differ from one GPU's beyond rtol {DDP_RTOL:g}: {diff}")
    return {"rtol": DDP_RTOL, "world_size": RunDir(out / "gpus2").summary()["world_size"]}


# ------------------------------------------------------------------------------- report

def device_label(device, gpus: int) -> str:
    """``cpu`` or ``<gpus>x<gpu name>`` in lower case with dashes (``1x-nvidia-h100-80gb-hbm3``)."""
    if device.type != "cuda":
        return "cpu"
    import torch

    return f"{gpus}x-" + re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-")


def package_versions() -> dict:
    from .logging import versions

    out = versions()
    for name in ("numpy", "transformers", "tokenizers", "datasets", "timm", "torchvision", "tiktoken", "optuna"):
        try:
            out[name] = importlib.import_module(name).__version__ if importlib.util.find_spec(name) else None
        except Exception as e:  # noqa: BLE001 -- a broken install is reported, not fatal
            out[name] = f"broken ({one_line(e)})"
    import torch

    out["cuda"] = torch.version.cuda
    return out


def verdict(checks: list[Check]) -> str:
    failed = [c.name for c in checks if c.status == "failed"]
    skipped = [c.name for c in checks if c.status == "skipped"]
    if failed:
        return f"NOT READY: {len(failed)} check(s) failed ({', '.join(failed)})"
    return "READY: every applicable check passed" + (f" ({len(skipped)} skipped)" if skipped else "")


def markdown(report: dict) -> str:
    v = report["versions"]
    lines = [f"# Preflight: {report['host']}, {report['device']}", "",
             f"{report['date']}; `{report['command']}`; {report['seconds']:.0f} s ({report['cpu_seconds']:.0f} s of "
             f"CPU time in this process; load average before {report['load_before']})  ",
             "versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val is not None), "",
             f"**{report['verdict']}**", "",
             "| check | status | seconds | CPU seconds | reason / numbers |", "|---|---|---:|---:|---|"]
    for c in report["checks"]:
        detail = c["reason"] or json.dumps({k: val for k, val in c["numbers"].items() if k != "rows"})
        lines.append(f"| {c['name']} | {c['status']} | {c['seconds']:.1f} | {c['cpu_seconds']:.1f} | "
                     f"{detail.replace('|', '/')} |")
    packing = next((c for c in report["checks"] if c["name"] == "nano packing" and c["numbers"].get("rows")), None)
    if packing:
        lines += ["", "## nano paper protocol, runs packed on one GPU", "",
                  f"{packing['numbers']['iters']} iterations per run; predicted: the full protocol "
                  f"(80 runs x 5001 iterations) on {packing['numbers']['gpus']} GPU(s).", "",
                  "| runs per GPU | wall s | iterations/s | GPU util % | GPU memory MiB | predicted protocol h |",
                  "|---:|---:|---:|---:|---:|---:|"]
        for r in packing["numbers"]["rows"]:
            hours = r.get("predicted_protocol_s")
            lines.append(f"| {r['runs_per_gpu']} | {r['wall_s']} | {r.get('iters_per_s', 'failed')} | "
                         f"{r.get('gpu_util_pct')} | {r.get('gpu_mem_peak_mib')} | "
                         f"{'' if hours is None else round(hours / 3600, 2)} |")
        lines += ["", f"Recommended: `--runs-per-gpu {packing['numbers']['recommended_runs_per_gpu']}`"]
    return "\n".join(lines) + "\n"


def report_paths(out: Path, host: str, device: str) -> tuple[Path, Path]:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{host}-{device}")
    return out / f"{stem}.md", out / f"{stem}.json"


def recommended_runs_per_gpu(experiment: str, folder: Path, host: Optional[str] = None) -> Optional[int]:
    """The runs per GPU a preflight report of ``host`` (this one) in ``folder`` recommends for
    ``experiment`` (only nano's packing is measured), or None. The newest GPU report wins."""
    if experiment.strip("/") != "nano":
        return None
    host = host or platform.node()
    found = []
    for path in Path(folder).glob("*.json"):
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(report, dict) or report.get("host") != host:
            continue
        for c in report.get("checks", []):
            n = c.get("numbers", {}).get("recommended_runs_per_gpu") if isinstance(c, dict) else None
            if c.get("name") == "nano packing" and c.get("status") == "ok" and isinstance(n, int) and n >= 1:
                found.append((str(report.get("date", "")), n))
    return max(found)[1] if found else None


def run_all(ctx: Context) -> list[Check]:
    checks = []

    def add(check: Check) -> None:
        checks.append(check)
        ctx.log(f"[{check.status}] {check.name} ({check.seconds:.1f} s, {check.cpu_seconds:.1f} s CPU)"
                + (f": {check.reason}" if check.reason else ""))

    for spec in EXPERIMENTS:
        add(run_check(f"train {spec}", lambda spec=spec: experiment_check(ctx, spec), NEEDS[spec]))
    for name in OURS:
        add(run_check(f"step {name}", lambda name=name: optimizer_step_check(ctx, name)))
    add(run_check("nano packing", lambda: nano_packing_check(ctx)))
    add(run_check("owt throughput", lambda: owt_throughput_check(ctx), NEEDS["owt"]))
    add(run_check("ddp", lambda: ddp_check(ctx), NEEDS["gpt2"]))
    return checks


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bash scripts/preflight.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="one optimizer per experiment, a 1M-parameter optimizer step on the CPU (CI: ~3 min)")
    p.add_argument("--out", type=Path, default=REPO / "results" / "preflight",
                   help="folder for <host>-<device>.md and .json (default results/preflight)")
    p.add_argument("--force", action="store_true",
                   help="replace this node's earlier report (harness.outputs: a report is not replaced otherwise)")
    p.add_argument("--runs-per-gpu-for", metavar="EXPERIMENT", default=None,
                   help="print the runs per GPU this host's report recommends for EXPERIMENT and exit "
                        "(status 1 and nothing printed when there is none)")
    return p


@command
def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.runs_per_gpu_for is not None:
        n = recommended_runs_per_gpu(args.runs_per_gpu_for, args.out)
        if n is None:
            return 1
        print(n)
        return 0
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out} is a file; give a folder")
    started, cpu_started = time.perf_counter(), time.process_time()
    load_before = " ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    # The experiments and benchmarks are imported from the repository, not from the scratch
    # folder the checks run in.
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = torch.device("cuda" if gpus else "cpu")
    host, label = platform.node(), device_label(device, gpus)
    md, js = report_paths(args.out, host, label)
    if args.quick:  # beside the full report, never over it
        md, js = outputs.beside(md), outputs.beside(js)
    basis = outputs.Basis(len(EXPERIMENTS) + len(OURS) + 3)  # one measurement per check
    outputs.check(md, basis, args.force, [js])  # before the minutes of checking, not after
    print(f"preflight on {host}: {label}{' (quick)' if args.quick else ''}", flush=True)
    with tempfile.TemporaryDirectory(prefix="preflight-") as scratch:
        ctx = Context(device=device, gpus=gpus, quick=args.quick, scratch=Path(scratch),
                      log=lambda text: print(text, flush=True))
        cwd = os.getcwd()
        os.chdir(scratch)  # the experiments' default paths (runs/, data/) land in the scratch folder
        try:
            checks = run_all(ctx)
        finally:
            os.chdir(cwd)
    report = {"host": host, "device": label, "date": dt.datetime.now().isoformat(timespec="seconds"),
              "command": "bash scripts/preflight.sh" + (" --quick" if args.quick else ""), "quick": args.quick,
              "seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu_started,
              "load_before": load_before, "versions": package_versions(),
              "checks": [c.__dict__ for c in checks], "verdict": verdict(checks)}
    outputs.write_text(js, json.dumps(report, indent=1, default=str) + "\n")
    outputs.write_text(md, outputs.stamp(markdown(report), basis))
    print(f"\n{report['verdict']}\nreport: {md}, {js}", flush=True)
    return 1 if any(c.status == "failed" for c in checks) else 0


if __name__ == "__main__":
    raise SystemExit(main())

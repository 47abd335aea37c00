"""Time one optimizer step: CD, iKFAD, CADAM and LDHD in each code path against torch.optim.

    python benchmarks/optimizer_step.py                      # 1M, 10M, 124M params; fp32 and bf16
    python benchmarks/optimizer_step.py --quick              # 1M and 10M, 3 repeats, to cpu-quick.*: ~1 min
    python benchmarks/optimizer_step.py --sizes 124m --dtypes fp32 --repeats 7 --threads 1,2,4

Parameters have GPT-2 shapes (token and position embeddings, per block two
LayerNorms, attention and MLP weights and biases, a final LayerNorm) at three
sizes; gradients are fixed random tensors (standard deviation 1e-3), so only
the optimizer step is timed. Hyperparameters are the paper's tuned values for
the owt experiment (``HYPERPARAMETERS``); the step time does not depend on them
except through the size of the numbers the state holds (see ``HYPERPARAMETERS``).
Candidates: ours (LDHD, CD, iKFAD, CADAM) on the single-tensor loop, the
foreach path and the fused path (``fused=True``: on the CPU the native C
kernels, on CUDA the ``torch.compile``d kernel), on the CPU also the compiled
kernel ("compiled": the fused path with the native kernels switched off, for
comparison), and torch.optim's Adam, AdamW and SGD (momentum 0.9) with
foreach=True and fused=True. The "default" row of each of ours names the path
that ``fused=None, foreach=None`` takes at that size.

Each thread count (``--threads``, default 1 and 2 on the CPU) is measured in a
process of its own (``torch.set_num_threads`` there, before any step), so that
no thread pool or cache state carries over from one count to the next. The CPU
model (``/proc/cpuinfo``'s "model name") and the instruction set PyTorch
dispatches to head the report. Measured per candidate and thread count, all in
the same process as the reference:
- step time: the median of ``--repeats`` steps, each timed alone, after two
  untimed steps (the first creates the state and, for fused paths, may compile);
- ratio to fused Adam: the candidate's steps alternate with steps of
  ``torch.optim.Adam(fused=True)`` on the same parameters, and the ratio is the
  median over the pairs (a step of fused Adam, then one of the candidate) of
  their ratio, so load from other processes, which drifts from minute to
  minute, hits both steps of a pair alike;
- state bytes per parameter element: the optimizer state's tensors over the
  number of parameter elements;
- peak extra memory: the most memory the step holds at once beyond what
  existed before it. On the CPU, the peak of the running total of bytes
  allocated minus freed through PyTorch's CPU allocator during one step
  (torch.profiler with profile_memory=True); on CUDA, max_memory_allocated
  minus memory_allocated before the step;
- first step, cold: for each of ours on each fused implementation, a fresh
  Python process with empty caches (Inductor's, and the native kernels'
  ``NONLINEAR_DAMPING_CACHE``) runs one step at the largest size (imports
  excluded, compilation included), then a second process with the now warm
  caches does the same.

Writes ``benchmarks/results/<device>.md``, ``.json`` and ``.png`` (``--quick``: beside them,
``<device>-quick.*``). Results already there from as many measurements or more are kept unless
``--force`` is given (``harness.outputs``, harness/README.md): the committed tables stay.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import optimizers  # noqa: E402
from harness import outputs  # noqa: E402
from harness.errors import command  # noqa: E402
from optimizers import _native  # noqa: E402

# name -> GPT-2 configuration (n_layer, n_embd, vocab_size, block_size)
SIZES = {
    "1m": (4, 128, 2048, 256),
    "10m": (6, 256, 20480, 512),
    "124m": (12, 768, 50257, 1024),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
OURS = ("LDHD", "CD", "iKFAD", "CADAM")
# The paper's tuned values for the owt experiment (owt/configs/best.yaml), so the
# state holds values of a realistic size: with the constructor defaults (h = 1e-3)
# iKFAD's friction variables become so small that exp() meets subnormal numbers,
# which costs the CPU about twice the time.
HYPERPARAMETERS = {
    "LDHD": dict(h=0.1, gamma=1e-3),
    "CD": dict(h=0.09975, gamma=1.378e-3, c=1.429e6),
    "iKFAD": dict(h=0.07635, alpha=0.6737, mu=1.386e-6, gamma=9.138e-4),
    "CADAM": dict(h=6.775e-3, gamma=7.532, c=3.106e6, alpha=0.4402),
}
OUR_PATHS = {"single": dict(foreach=False, fused=False), "foreach": dict(foreach=True), "fused": dict(fused=True),
             "compiled": dict(fused=True)}  # compiled: the fused path with the native kernels switched off
TORCH = {
    "Adam": lambda params, **kw: torch.optim.Adam(params, lr=6.472e-4, betas=(0.8945, 0.9945), **kw),
    "AdamW": lambda params, **kw: torch.optim.AdamW(params, lr=6.472e-4, betas=(0.8945, 0.9945), **kw),
    "SGD": lambda params, **kw: torch.optim.SGD(params, lr=0.05362, momentum=0.9528, **kw),
}
TARGET = 1.25  # each default step at most 1.25x fused Adam (AdamW on CUDA) at GPT-2 small, fp32


def gpt2_shapes(n_layer: int, n_embd: int, vocab_size: int, block_size: int) -> list[tuple[int, ...]]:
    """Parameter shapes of a GPT-2 (nanoGPT layout, tied output head)."""
    d = n_embd
    block = [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    return [(vocab_size, d), (block_size, d), *block * n_layer, (d,), (d,)]


def make_params(size: str, dtype: torch.dtype, device: torch.device) -> list[torch.nn.Parameter]:
    g = torch.Generator(device="cpu").manual_seed(0)
    params = []
    for shape in gpt2_shapes(*SIZES[size]):
        p = torch.nn.Parameter((torch.randn(shape, generator=g) * 0.02).to(device=device, dtype=dtype))
        p.grad = (torch.randn(shape, generator=g) * 1e-3).to(device=device, dtype=dtype)
        params.append(p)
    return params


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_step(opt, device) -> float:
    sync(device)
    start = time.perf_counter()
    opt.step()
    sync(device)
    return time.perf_counter() - start


def cpu_jiffies() -> tuple[int, int, int] | None:
    """(all CPUs' busy, all CPUs' total, this process's own) clock ticks, or None off Linux."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields), int(own[11]) + int(own[12])  # utime + stime


def other_load(start, end) -> float | None:
    """Share of the machine's CPU time that other processes used between two ``cpu_jiffies``."""
    if start is None or end is None or end[1] == start[1]:
        return None
    busy, total, own = (b - a for a, b in zip(start, end))
    return max(busy - own, 0) / total


def state_bytes(opt) -> int:
    return sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values() if torch.is_tensor(t))


def peak_extra_bytes(opt, device: torch.device) -> int:
    """The most bytes one step holds at once beyond what existed before it."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        opt.step()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        opt.step()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    memory = [e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0]
    memory.sort(key=lambda e: (e["ts"], e["args"].get("Ev Idx", 0)))
    live = peak = 0
    for e in memory:
        live += e["args"]["Bytes"]
        peak = max(peak, live)
    return peak


@contextlib.contextmanager
def path_switch(path: str):
    """The process-wide setting a path needs while it runs: "compiled" switches
    the native kernels off, so that the fused path compiles ``_update``."""
    enabled = _native.ENABLED
    _native.ENABLED = enabled and path != "compiled"
    try:
        yield
    finally:
        _native.ENABLED = enabled


def our_paths(device: torch.device) -> list[str]:
    # On CUDA "fused" is the compiled kernel already.
    return [p for p in OUR_PATHS if device.type == "cpu" or p != "compiled"]


def candidates(device: torch.device):
    """(optimizer, path, constructor) for every candidate, ours first."""
    for name in OURS:
        cls = getattr(optimizers, name)
        for path in our_paths(device):
            kw = OUR_PATHS[path]
            yield name, path, (lambda params, cls=cls, kw=kw: cls(params, **HYPERPARAMETERS[cls.__name__], **kw))
    for name, make in TORCH.items():
        for path in ("foreach", "fused"):
            yield name, path, (lambda params, make=make, path=path: make(params, **{path: True}))


def default_path(name: str, params) -> str:
    """The path ``fused=None, foreach=None`` takes for these parameters: single,
    foreach, fused (native kernels on the CPU) or compiled (torch.compile)."""
    path = getattr(optimizers, name)(params).code_path()
    if path == "native" or (path == "compiled" and params[0].device.type != "cpu"):
        return "fused"
    return path


def time_against(opt, reference, device: torch.device, repeats: int, max_other_load: float) -> dict:
    """Median step times of ``opt`` and of ``reference`` (fused Adam), alternated, and the
    median of the ratios of the interleaved pairs."""
    # Other processes on a small machine can stall multithreaded kernels for
    # long stretches: re-measure a window in which they used more than
    # max_other_load of the CPUs (up to three tries; the least disturbed window
    # is kept and its disturbance reported).
    best = None
    for _ in range(3):
        start = cpu_jiffies()
        ours_t, ref_t = [], []
        for _ in range(repeats):
            ref_t.append(timed_step(reference, device))
            ours_t.append(timed_step(opt, device))
        load = other_load(start, cpu_jiffies())
        if best is None or (load is not None and load < best[2]):
            best = (ours_t, ref_t, load if load is not None else 0.0)
        if load is None or load <= max_other_load:
            break
    ours_t, ref_t, load = best
    step_ms, adam_ms = 1e3 * statistics.median(ours_t), 1e3 * statistics.median(ref_t)
    ratio = statistics.median(ours / ref for ours, ref in zip(ours_t, ref_t))
    return dict(other_load=load, step_ms=step_ms, adam_fused_ms=adam_ms, ratio=ratio)


def measure(size: str, dtype_name: str, device: torch.device, repeats: int, max_other_load: float,
            progress) -> list[dict]:
    dtype = DTYPES[dtype_name]
    params = make_params(size, dtype, device)
    numel = sum(p.numel() for p in params)
    reference = TORCH["Adam"](params, fused=True)
    for _ in range(2):
        reference.step()
    rows = []
    for name, path, make in candidates(device):
        progress.set_postfix_str(f"{size} {dtype_name} {name} {path}")
        row = dict(size=size, dtype=dtype_name, numel=numel, tensors=len(params), optimizer=name, path=path)
        try:
            with path_switch(path):
                opt = make(params)
                row["first_step_s"] = timed_step(opt, device)
                timed_step(opt, device)
                row.update(time_against(opt, reference, device, repeats, max_other_load))
                row["state_bytes_per_param"] = state_bytes(opt) / numel
                row["peak_extra_mb"] = peak_extra_bytes(opt, device) / 2**20
                row["param_mb"] = numel * params[0].element_size() / 2**20
        except (RuntimeError, ValueError) as error:  # e.g. a fused kernel that does not exist for bf16
            row["error"] = str(error).strip().splitlines()[0][:120]
        rows.append(row)
        opt = None
        gc.collect()
        progress.update(1)
    for name in OURS:
        rows.append(dict(size=size, dtype=dtype_name, numel=numel, tensors=len(params), optimizer=name,
                         path="default", resolves_to=default_path(name, params)))
    return rows


def first_step_child(name: str, size: str, dtype_name: str, device: str) -> None:
    """In a fresh process: one fused step of ``name``, timed including compilation."""
    params = make_params(size, DTYPES[dtype_name], torch.device(device))
    opt = getattr(optimizers, name)(params, **HYPERPARAMETERS[name], fused=True)
    first = timed_step(opt, torch.device(device))
    second = timed_step(opt, torch.device(device))
    print(json.dumps(dict(first_step_s=first, second_step_s=second)))


def fused_paths(device: torch.device) -> list[str]:
    return [p for p in our_paths(device) if OUR_PATHS[p].get("fused")]


def cold_first_steps(size: str, dtype_name: str, device: torch.device, progress) -> list[dict]:
    rows = []
    for path in fused_paths(device):
        for name in OURS:
            with tempfile.TemporaryDirectory() as cache:
                env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.path.join(cache, "inductor"),
                           NONLINEAR_DAMPING_CACHE=os.path.join(cache, "native"))
                if path == "compiled":
                    env["NONLINEAR_DAMPING_NATIVE"] = "0"
                row = dict(optimizer=name, path=path, size=size, dtype=dtype_name)
                for kind in ("cold", "warm"):
                    progress.set_postfix_str(f"first step {name} {path} {kind} cache")
                    out = subprocess.run(
                        [sys.executable, __file__, "--first-step", name, "--sizes", size, "--dtypes", dtype_name,
                         "--device", device.type],
                        env=env, capture_output=True, text=True,
                    )
                    if out.returncode != 0:
                        row["error"] = (out.stderr.strip().splitlines() or ["failed"])[-1][:120]
                        break
                    result = json.loads(out.stdout.strip().splitlines()[-1])
                    row[f"{kind}_first_step_s"] = result["first_step_s"]
                    row["step_s"] = result["second_step_s"]
                    progress.update(1)
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------- report

def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = dict(cpu=cpu, cores=os.cpu_count(), torch=torch.__version__, python=platform.python_version(),
                isa=torch.backends.cpu.get_cpu_capability())
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def load_average() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def threads_text(counts) -> str:
    return ", ".join(map(str, counts)) + (" thread" if list(counts) == [1] else " threads")


def sections(results: dict) -> list[tuple[str, str, int]]:
    """(size, dtype, threads) of each table, in the order measured."""
    return [(size, dtype, threads) for size in results["sizes"] for threads in results["threads"]
            for dtype in results["dtypes"]]


def fmt(x, spec):
    return "" if x is None else format(x, spec)


def markdown(results: dict) -> str:
    m = results["machine"]
    reference = "AdamW" if results["device"] == "cuda" else "Adam"
    lines = [
        f"# Optimizer step benchmark: {results['device']}",
        "",
        f"{results['date']}; `{results['command']}`  ",
        f"{m.get('gpu', m['cpu'])} ({m['isa']}, {m['cores']} logical CPUs); measured at "
        f"{threads_text(results['threads'])}, each count in a process of its own; torch {m['torch']}, Python {m['python']}  ",
        f"load average (1, 5, 15 min) before: {results['load_before']}, after: {results['load_after']} "
        "(other processes on the machine slow every candidate; ratios are measured interleaved with fused Adam)",
        "",
        "Step time is the median of the timed steps; **x fused Adam** is the median, over pairs of "
        "interleaved steps, of its step time over that of `torch.optim.Adam(fused=True)`; state is optimizer-state bytes per "
        "parameter element; peak extra is the most memory one step holds beyond what existed before it "
        "(CPU: PyTorch CPU-allocator bytes, via torch.profiler), also as a share of the parameters' memory; "
        "first step includes creating the state (and compiling, the first time a fused kernel is needed "
        "in the process); other load is the share of the CPUs other processes used while the steps were timed.",
        "",
    ]
    summary = []
    for size, dtype, threads in sections(results):
        rows = [r for r in results["rows"]
                if r["size"] == size and r["dtype"] == dtype and r.get("threads") == threads]
        if not rows:
            continue
        timed = {(r["optimizer"], r["path"]): r for r in rows if "path" in r and r["path"] != "default"}
        first = rows[0]
        lines += [f"## {size.upper()}: {first['numel'] / 1e6:.1f}M parameters in {first['tensors']} tensors, "
                  f"{dtype}, {threads_text([threads])}", ""]
        lines += ["| optimizer | path | step ms | x fused Adam | state B/param | peak extra MB | peak extra / params | first step s | other load |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            if r["path"] == "default":
                t = timed.get((r["optimizer"], r["resolves_to"]), {})
                ratio = t.get("ratio")
                mark = "" if ratio is None else (" ok" if ratio <= TARGET else " **over**")
                lines.append(f"| **{r['optimizer']}** | **default = {r['resolves_to']}** | {fmt(t.get('step_ms'), '.1f')} | "
                             f"**{fmt(ratio, '.2f')}**{mark} | {fmt(t.get('state_bytes_per_param'), '.1f')} | "
                             f"{fmt(t.get('peak_extra_mb'), '.1f')} | | | |")
                summary.append((size, dtype, threads, r["optimizer"], r["resolves_to"], ratio))
                continue
            if "error" in r:
                lines.append(f"| {r['optimizer']} | {r['path']} | unavailable: {r['error']} | | | | | | |")
                continue
            share = r["peak_extra_mb"] / r["param_mb"]
            lines.append(f"| {r['optimizer']} | {r['path']} | {r['step_ms']:.1f} | {r['ratio']:.2f} | "
                         f"{r['state_bytes_per_param']:.1f} | {r['peak_extra_mb']:.1f} | {100 * share:.0f}% | "
                         f"{r['first_step_s']:.2f} | {100 * r['other_load']:.0f}% |")
        lines.append("")
    if results.get("first_steps"):
        lines += ["## First fused step, including compilation", "",
                  "A fresh process per row; cold: empty caches (Inductor's and the native kernels'), "
                  "warm: the caches the cold run left. fused: the native kernels on the CPU "
                  "(torch.compile on CUDA); compiled: torch.compile.", "",
                  "| optimizer | path | size | dtype | cold first step s | warm first step s | next step s |",
                  "|---|---|---|---|---:|---:|---:|"]
        for r in results["first_steps"]:
            head = f"| {r['optimizer']} | {r.get('path', 'fused')} | {r['size']} | {r['dtype']}"
            if "error" in r:
                lines.append(f"{head} | failed: {r['error']} | | |")
            else:
                lines.append(f"{head} | {r['cold_first_step_s']:.1f} | "
                             f"{fmt(r.get('warm_first_step_s'), '.1f')} | {r['step_s']:.3f} |")
        lines.append("")
    if summary:
        lines += [f"## Default step against the target (at most {TARGET}x fused {reference})", "",
                  "The target is set for GPT-2 small (124m) in fp32, the default dtype; the other rows are for information.", "",
                  "| size | dtype | threads | optimizer | default path | x fused Adam |", "|---|---|---:|---|---|---:|"]
        for size, dtype, threads, name, path, ratio in summary:
            verdict = "" if ratio is None else ("ok" if ratio <= TARGET else "over")
            lines.append(f"| {size} | {dtype} | {threads} | {name} | {path} | {fmt(ratio, '.2f')} {verdict} |")
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """Ratio to fused Adam per candidate: one panel per (size, dtype), sizes down, dtypes across."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    panels = [(s, t) for s in results["sizes"] for t in results["threads"]
              if any(r["size"] == s and r["threads"] == t and "ratio" in r for r in results["rows"])]
    dtypes = [d for d in results["dtypes"] if any(r["dtype"] == d and "ratio" in r for r in results["rows"])]
    if not panels or not dtypes:
        return
    fig, axes = plt.subplots(len(panels), len(dtypes), figsize=(5.5 * len(dtypes), 5.0 * len(panels)),
                             squeeze=False, sharey=True)
    for i, (size, threads) in enumerate(panels):
        for j, dtype in enumerate(dtypes):
            ax = axes[i][j]
            rows = [r for r in results["rows"] if r["size"] == size and r["dtype"] == dtype
                    and r["threads"] == threads and "ratio" in r]
            shade = {"fused": "tab:blue", "compiled": "lightsteelblue"}
            colors = ["tab:orange" if r["optimizer"] in TORCH else shade.get(r["path"], "tab:gray") for r in rows]
            ax.barh(range(len(rows)), [r["ratio"] for r in rows], color=colors)
            ax.set_yticks(range(len(rows)), [f"{r['optimizer']} {r['path']}" for r in rows], fontsize=8)
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.axvline(1.0, color="black", lw=0.8)
            ax.axvline(TARGET, color="red", lw=0.8, ls="--")
            ax.set_title(f"{size} parameters, {dtype}, {threads_text([threads])}", fontsize=10)
            if i == len(panels) - 1:
                ax.set_xlabel("step time / fused Adam step time (log scale)")
    axes[0][0].invert_yaxis()  # the y axis is shared: invert it once, first candidate on top
    m = results["machine"]
    fig.suptitle(f"One optimizer step, {results['device']} ({m.get('gpu', m['cpu'])})\n"
                 f"blue: our fused path (light: torch.compile), grey: our eager paths, orange: torch.optim; "
                 f"red: the {TARGET}x target",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.975))
    outputs.save_figure(fig, path, dpi=100)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Time one optimizer step of ours and torch.optim's at GPT-2 shapes.")
    p.add_argument("--sizes", default=None, help=f"comma-separated, from {', '.join(SIZES)} (default: all; --quick: 1m,10m)")
    p.add_argument("--dtypes", default="fp32,bf16", help=f"comma-separated, from {', '.join(DTYPES)}")
    p.add_argument("--repeats", type=int, default=None, help="timed steps per candidate (default 5; --quick: 3)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", default=None,
                   help="comma-separated CPU thread counts, each measured in a process of its own "
                        "(default: 1,2 on the CPU; on CUDA the current count)")
    p.add_argument("--quick", action="store_true", help="1m and 10m only, 3 repeats")
    p.add_argument("--max-other-load", type=float, default=0.1,
                   help="re-measure (up to 3 tries) when other processes used more than this share of the CPUs")
    p.add_argument("--no-first-step", action="store_true", help="skip the fresh-process compile-time measurement")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"),
                   help="folder for <device>.md/.json/.png (--quick: <device>-quick.*)")
    p.add_argument("--force", action="store_true", help="replace results there from as many measurements or more")
    p.add_argument("--first-step", default=None, help=argparse.SUPPRESS)  # internal: the child process
    p.add_argument("--rows-out", default=None, help=argparse.SUPPRESS)  # internal: one thread count's process
    args = p.parse_args(argv)
    args.sizes = (args.sizes or ("1m,10m" if args.quick else ",".join(SIZES))).lower().split(",")
    args.dtypes = args.dtypes.lower().split(",")
    args.repeats = args.repeats or (3 if args.quick else 5)
    default_threads = "1,2" if args.device == "cpu" else str(torch.get_num_threads())
    try:
        args.threads = [int(t) for t in (args.threads or default_threads).split(",")]
    except ValueError:
        p.error(f"--threads must be comma-separated whole numbers, got {args.threads!r}")
    if min(args.threads) < 1:
        p.error(f"--threads must be at least 1, got {min(args.threads)}")
    for kind, values, valid in (("size", args.sizes, SIZES), ("dtype", args.dtypes, DTYPES)):
        bad = [v for v in values if v not in valid]
        if bad:
            p.error(f"unknown {kind} {', '.join(bad)}; valid: {', '.join(valid)}")
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    return args


def report_path(args, device: str) -> Path:
    """Where the table goes: ``<out>/<device>.md``, or beside it for ``--quick`` (``<device>-quick.md``);
    the ``.json`` and ``.png`` take the same name."""
    md = Path(args.out) / f"{device}.md"
    return outputs.beside(md) if args.quick else md


def thread_count_rows(args, threads: int) -> list[dict]:
    """Every candidate's rows at ``threads`` CPU threads, measured in a fresh process."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        child = [sys.executable, __file__, "--sizes", ",".join(args.sizes), "--dtypes", ",".join(args.dtypes),
                 "--repeats", str(args.repeats), "--device", args.device, "--max-other-load", str(args.max_other_load),
                 "--threads", str(threads), "--rows-out", str(out)]
        done = subprocess.run(child, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
            raise RuntimeError(f"the measuring process at {threads_text([threads])} failed: {last}")
        return json.loads(out.read_text())


def thread_count_child(args, device: torch.device, total: int) -> int:
    """In the process of one thread count: measure every size and dtype, write the rows to --rows-out."""
    from tqdm import tqdm

    torch.set_num_threads(args.threads[0])
    rows = []
    with tqdm(total=total, desc=f"{threads_text(args.threads)}", unit="candidate", leave=False) as progress:
        for size in args.sizes:
            for dtype in args.dtypes:
                rows += measure(size, dtype, device, args.repeats, args.max_other_load, progress)
                gc.collect()
    for r in rows:  # the count torch ran at, and which process measured it
        r.update(threads=torch.get_num_threads(), pid=os.getpid())
    Path(args.rows_out).write_text(json.dumps(rows))
    return 0


@command
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.first_step:
        first_step_child(args.first_step, args.sizes[0], args.dtypes[0], args.device)
        return 0
    from tqdm import tqdm

    device = torch.device(args.device)
    per_config = len(OURS) * len(our_paths(device)) + len(TORCH) * 2
    if args.rows_out:
        return thread_count_child(args, device, per_config * len(args.sizes) * len(args.dtypes))
    first_steps = 0 if args.no_first_step else 2 * len(OURS) * len(fused_paths(device))
    total = per_config * len(args.sizes) * len(args.dtypes) * len(args.threads) + first_steps
    md = report_path(args, device.type)  # checked before an hour of measuring, not after
    basis = outputs.Basis(total)
    outputs.check(md, basis, args.force, [md.with_suffix(".json"), md.with_suffix(".png")])
    results = dict(device=device.type, date=dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
                   command="python benchmarks/optimizer_step.py " + " ".join(sys.argv[1:] if argv is None else argv),
                   machine=machine(), sizes=args.sizes, dtypes=args.dtypes, threads=args.threads,
                   repeats=args.repeats, load_before=load_average(), rows=[], first_steps=[])
    with tqdm(total=total, desc="optimizer steps", unit="candidate") as progress:
        for threads in args.threads:
            progress.set_postfix_str(f"{threads_text([threads])}, in a process of its own")
            results["rows"] += thread_count_rows(args, threads)
            progress.update(per_config * len(args.sizes) * len(args.dtypes))
        if not args.no_first_step:
            results["first_steps"] = cold_first_steps(args.sizes[-1], args.dtypes[0], device, progress)
    results["load_after"] = load_average()

    outputs.write_text(md.with_suffix(".json"), json.dumps(results, indent=1))
    outputs.write_text(md, outputs.stamp(markdown(results), basis))
    plot(results, md.with_suffix(".png"))
    print(markdown(results))
    print(f"wrote {md}, .json, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

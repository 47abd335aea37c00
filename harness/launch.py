"""Run many trainings of one experiment: every optimizer x seed, a few at a time.

    python -m harness.launch nano [--optimizers adam cadam] [--seeds 1337 1338]
                                  [--gpus 0,1] [--runs-per-gpu N] [--parallel N] [--config FILE]
                                  [--set k=v ...] [--runs-dir runs/nano] [--report results/nano]

Each run is an ordinary ``python -m <exp>.train`` subprocess writing
``<runs-dir>/<optimizer>/seed<S>`` (its console output goes to
``<runs-dir>/logs/<optimizer>-seed<S>.log``). Finished runs are skipped and
interrupted ones resume, so the same command can be repeated after a crash or
preemption. With GPUs, ``--runs-per-gpu`` runs on each GPU at a time (default
1; ``CUDA_VISIBLE_DEVICES``): a small model (nano's 0.8M parameters) uses a
fraction of a modern GPU, so several runs can share one. On the CPU,
``--parallel`` runs at a time sharing the cores. Either way each run gets an
equal share of the cores (``OMP_NUM_THREADS``). One progress bar follows the
whole set. Afterwards ``harness.report`` draws the figures and table.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from tqdm.auto import tqdm

from .config import read_yaml, resolve
from .errors import UsageError
from .experiments import experiment, paper_seeds, train_command
from .run import run_status
from .signals import EXIT_INTERRUPTED, StopFlag


def _progress(run_dir: Path, train_cfg: dict) -> float:
    """How far a run is, from 0 to 1, by its last logged record."""
    path = run_dir / "metrics.jsonl"
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - 4096))
            last = json.loads(f.read().decode(errors="ignore").strip().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        return 0.0
    if "epoch" in last and train_cfg.get("epochs"):
        return min(1.0, last["epoch"] / train_cfg["epochs"])
    return min(1.0, last.get("step", 0) / max(1, train_cfg.get("max_iters", 1)))


def _gpus(arg: str | None) -> list[str]:
    if arg:
        return [g for g in arg.split(",") if g != ""]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g for g in visible.split(",") if g != ""]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        return []


def plan_slots(gpus: list[str], runs_per_gpu: int = 1, parallel: Optional[int] = None,
               cpus: Optional[int] = None) -> tuple[list[Optional[str]], int]:
    """The places runs go, one entry per run that may be running at once (its GPU id,
    or None for a CPU run), and the threads each gets: ``runs_per_gpu`` entries per GPU;
    without GPUs ``parallel`` entries (default one per core, at most 8)."""
    cpus = cpus or os.cpu_count() or 1
    if runs_per_gpu < 1:
        raise UsageError(f"--runs-per-gpu must be at least 1, got {runs_per_gpu}")
    if parallel is not None and parallel < 1:
        raise UsageError(f"--parallel must be at least 1, got {parallel}")
    # GPUs round-robin, so that fewer runs than slots still spread over every GPU. Small
    # models use one core far better than several: on the CPU, one run per core.
    slots = [g for _ in range(runs_per_gpu) for g in gpus] or [None] * (parallel or max(1, min(8, cpus)))
    return slots, max(1, cpus // len(slots))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.launch", description=__doc__.split("\n\n")[0])
    p.add_argument("experiment", help="nano, owt, gpt2, vit, cifar, bert/sst2, bert/qnli")
    p.add_argument("--optimizers", nargs="+", default=None, help="default: those in the experiment's best.yaml")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="default: the seeds of paper.yaml")
    p.add_argument("--gpus", default=None, help="comma-separated GPU ids (default: all visible)")
    p.add_argument("--runs-per-gpu", type=int, default=1,
                   help="runs sharing each GPU at a time (default 1; small models: several)")
    p.add_argument("--parallel", type=int, default=None,
                   help="CPU runs at a time, each with cores/N threads (default: one per core, at most 8)")
    p.add_argument("--config", default=None)
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--runs-dir", type=Path, default=None, help="default runs/<experiment>")
    p.add_argument("--report", type=Path, default=None, help="where harness.report writes (default results/<experiment>)")
    p.add_argument("--no-report", action="store_true", help="skip the report at the end")
    p.add_argument("--list", action="store_true", help="print the runs (index optimizer seed) and exit")
    p.add_argument("--index", type=int, default=None,
                   help="do only run number INDEX of --list (a SLURM array task); exit 0 if out of range")
    p.add_argument("--runs-per-task", type=int, default=1,
                   help="with --index: do runs INDEX*N .. INDEX*N+N-1 (several runs in one array task)")
    args = p.parse_args(argv)

    try:
        exp = experiment(args.experiment)
        names = [n.lower() for n in (args.optimizers or list(read_yaml(exp.configs / "best.yaml")))]
        seeds = args.seeds or paper_seeds(exp)
        # Fails fast, before launching anything, on any bad name, key or value.
        train_cfg = {n: resolve(exp.name, n, seeds[0], args.config, args.sets, exp.configs).get("train", {})
                     for n in names}
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    runs_dir = args.runs_dir or Path("runs") / exp.runs_subdir
    everything = list(itertools.product(names, seeds))
    if args.list:
        for i, (name, seed) in enumerate(everything):
            print(i, name, seed)
        return 0
    if args.index is not None:
        if args.runs_per_task < 1:
            print(f"error: --runs-per-task must be at least 1, got {args.runs_per_task}", file=sys.stderr)
            return 2
        first = args.index * args.runs_per_task
        if args.index < 0 or first >= len(everything):
            tasks = -(-len(everything) // args.runs_per_task)
            print(f"task index {args.index} is out of range (0-{tasks - 1} for {len(everything)} runs, "
                  f"{args.runs_per_task} per task): nothing to do")
            return 0
        everything = everything[first: first + args.runs_per_task]
    try:
        slots, threads = plan_slots(_gpus(args.gpus), args.runs_per_gpu, args.parallel)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    (runs_dir / "logs").mkdir(parents=True, exist_ok=True)
    jobs = [(n, s) for n, s in everything if run_status(runs_dir / n / f"seed{s}") not in ("completed", "diverged")]
    done_before = len(everything) - len(jobs)
    gpus = list(dict.fromkeys(g for g in slots if g is not None))
    print(f"{exp.name}: {len(jobs)} runs to do ({done_before} already finished) on "
          + (f"GPUs {','.join(gpus)}, {args.runs_per_gpu} at a time on each x {threads} threads" if gpus
             else f"the CPU, {len(slots)} at a time x {threads} threads")
          + f"; runs in {runs_dir}", flush=True)

    bar = tqdm(total=len(jobs), dynamic_ncols=True, desc=exp.name,
               bar_format="{l_bar}{bar}| {n:.2f}/{total} runs [{elapsed}<{remaining}]")
    running: dict = {}  # slot -> (process, run_dir, name, seed, log file)
    queue, failed, finished = list(jobs), [], 0
    # A stop request reaches every running run (each checkpoints and exits 75); no new one starts.
    with StopFlag() as stop:
        while (queue and not stop.flag) or running:
            for slot in range(len(slots)):
                if slot in running or not queue or stop.flag:
                    continue
                name, seed = queue.pop(0)
                run_dir = runs_dir / name / f"seed{seed}"
                env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads)}
                if slots[slot] is not None:
                    env["CUDA_VISIBLE_DEVICES"] = slots[slot]
                log = open(runs_dir / "logs" / f"{name}-seed{seed}.log", "a")
                log.write(f"# harness.launch: slot {slot}, CUDA_VISIBLE_DEVICES={slots[slot] or ''}, "
                          f"OMP_NUM_THREADS={threads}\n")
                log.flush()
                cmd = train_command(exp, name, seed, run_dir, args.config, args.sets)
                proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
                stop.children.append(proc)
                running[slot] = (proc, run_dir, name, seed, log)
            time.sleep(1.0)
            for slot, (proc, run_dir, name, seed, log) in list(running.items()):
                if proc.poll() is not None:
                    log.close()
                    del running[slot]
                    stop.children.remove(proc)
                    finished += 1
                    status = run_status(run_dir)
                    tqdm.write(f"  {name} seed {seed}: {status or 'failed'} (exit {proc.returncode})")
                    if status not in ("completed", "diverged"):
                        failed.append((name, seed, proc.returncode))
            bar.n = finished + sum(_progress(r[1], train_cfg[r[2]]) for r in running.values())
            bar.refresh()
    bar.close()

    if failed:
        print(f"{len(failed)} runs did not finish (see {runs_dir / 'logs'}): "
              + ", ".join(f"{n} seed {s} (exit {rc})" for n, s, rc in failed), file=sys.stderr)
    if stop.flag:
        print("interrupted: re-run the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    if not args.no_report and any(run_status(runs_dir / n / f"seed{s}") for n, s in everything):
        from .report import report

        written = report(runs_dir, args.report or Path("results") / exp.runs_subdir, title=exp.name)
        print("Results: " + ", ".join(str(p) for p in written), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

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
equal share of the cores this process may use (``OMP_NUM_THREADS``; its CPU
affinity, e.g. a SLURM job's cores, not the whole machine's). Each run is started in its own
session (``harness.processes``): Ctrl-C or SIGTERM reaches this process, which
forwards one SIGTERM to every running run (each checkpoints and exits 75) and
starts no new one. One line per finished run, with the count done and the time
elapsed; on a terminal a progress bar follows the whole set as well (none when
stderr is a file or a pipe: nohup, SLURM ``.out`` files). Afterwards
``harness.report`` draws the figures and table.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from tqdm.auto import tqdm

from . import processes
from .config import TrainConfig, read_yaml, resolve_run
from .cpu import available_cpus, thread_env
from .errors import UsageError, command
from .experiments import Experiment, experiment, paper_seeds, train_command
from .rundir import FINISHED, RunDir, check_folder
from .signals import EXIT_INTERRUPTED, StopFlag


def visible_gpus() -> list[str]:
    """The ids of the GPUs this process sees, as ``CUDA_VISIBLE_DEVICES`` names them (``0..n-1``
    when it is unset); none without CUDA."""
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def _gpus(arg: str | None) -> list[str]:
    """The GPUs runs go to: ``--gpus`` (a one-line error unless each id is a visible GPU: never
    a silent CPU run), else every visible GPU (none: the runs use the CPU)."""
    visible = visible_gpus()
    if arg is None:
        return visible
    ids = [g.strip() for g in arg.split(",") if g.strip()]
    if not visible:
        raise UsageError(f"--gpus {arg}: no CUDA GPU is visible here (torch.cuda.is_available() is False); "
                         "leave --gpus out to run on the CPU")
    unknown = [g for g in ids if g not in visible]
    if unknown or not ids:
        many = len(unknown) > 1
        problem = f"GPU{'s' if many else ''} {','.join(unknown)} {'are' if many else 'is'} not visible here" \
            if unknown else "names no GPU"
        raise UsageError(f"--gpus {arg}: {problem}; valid ids (comma-separated): {','.join(visible)}")
    return ids


def plan_slots(gpus: list[str], runs_per_gpu: int = 1, parallel: Optional[int] = None,
               cpus: Optional[int] = None) -> tuple[list[Optional[str]], int]:
    """The places runs go, one entry per run that may be running at once (its GPU id,
    or None for a CPU run), and the threads each gets: ``runs_per_gpu`` entries per GPU;
    without GPUs ``parallel`` entries (default one per core, at most 8). ``cpus`` defaults to
    ``available_cpus()`` (this process's affinity, within ``SLURM_CPUS_PER_TASK``)."""
    cpus = cpus or available_cpus()  # the job's cores, not the machine's: never more threads than it has
    if runs_per_gpu < 1:
        raise UsageError(f"--runs-per-gpu must be at least 1, got {runs_per_gpu}")
    if parallel is not None and parallel < 1:
        raise UsageError(f"--parallel must be at least 1, got {parallel}")
    # GPUs round-robin, so that fewer runs than slots still spread over every GPU. Small
    # models use one core far better than several: on the CPU, one run per core.
    slots = [g for _ in range(runs_per_gpu) for g in gpus] or [None] * (parallel or max(1, min(8, cpus)))
    return slots, max(1, cpus // len(slots))


class Progress:
    """What a launch prints as it goes: one line per finished run (``  cd seed 1337: completed
    (exit 0) [3/24 done, elapsed 0:41:10]``, flushed at once) and, when stderr is a terminal,
    a progress bar counting runs with fractions (from each running run's last record). On a
    file or a pipe there is no bar: no carriage-return frames in logs."""

    def __init__(self, total: int, desc: str):
        self.total, self.done, self.started = total, 0, time.time()
        self.bar = processes.progress_bar(total=total, desc=desc,
                                          bar_format="{l_bar}{bar}| {n:.2f}/{total} runs [{elapsed}<{remaining}]")

    def finished(self, text: str) -> None:
        self.done += 1
        elapsed = datetime.timedelta(seconds=int(time.time() - self.started))
        tqdm.write(f"  {text} [{self.done}/{self.total} done, elapsed {elapsed}]")
        sys.stdout.flush()

    def update(self, running_fraction: float) -> None:
        self.bar.n = self.done + running_fraction
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


# Shown by --help; each runs as written (tests/test_newuser.py checks them with --list).
EXAMPLES = """examples:
  python -m harness.launch nano --list
  python -m harness.launch nano --optimizers adam cadam --seeds 1337 1338 --gpus 0,1
  python -m harness.launch nano --runs-per-gpu 4
  python -m harness.launch cifar --seeds 1 2 --set train.epochs=2
  python -m harness.launch bert/sst2 --set train.epochs=1"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m harness.launch", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    p.add_argument("experiment", help="nano, owt, gpt2, vit, cifar, bert/sst2, bert/qnli")
    p.add_argument("--optimizers", nargs="+", default=None, help="default: those in the experiment's best.yaml")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="default: the seeds of paper.yaml")
    p.add_argument("--gpus", default=None, help="comma-separated ids of visible GPUs (default: all visible; none: the CPU)")
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
    return p


def _task_runs(everything: list, index: int, per_task: int) -> Optional[list]:
    """Runs ``index * per_task`` .. ``+ per_task - 1`` of ``everything`` (a SLURM array task's);
    None, after saying so, when the index is out of range."""
    if per_task < 1:
        raise UsageError(f"--runs-per-task must be at least 1, got {per_task}")
    first = index * per_task
    if index < 0 or first >= len(everything):
        tasks = -(-len(everything) // per_task)
        print(f"task index {index} is out of range (0-{tasks - 1} for {len(everything)} runs, "
              f"{per_task} per task): nothing to do")
        return None
    return everything[first: first + per_task]


def _start_run(exp: Experiment, name: str, seed: int, runs_dir: Path, slot: int, gpu: Optional[str],
               threads: int, args) -> subprocess.Popen:
    """One run in its own session, its output in ``<runs-dir>/logs/<optimizer>-seed<S>.log``."""
    env = {"TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1", **thread_env(threads)}
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    note = f"# harness.launch: slot {slot}, CUDA_VISIBLE_DEVICES={gpu or ''}, OMP_NUM_THREADS={threads}"
    cmd = train_command(exp, name, seed, runs_dir / name / f"seed{seed}", args.config, args.sets)
    return processes.start(cmd, runs_dir / "logs" / f"{name}-seed{seed}.log", env, note)


def run_all(exp: Experiment, jobs: list, slots: list, threads: int, runs_dir: Path, train_cfg: dict[str, TrainConfig],
            args) -> tuple[list, bool]:
    """Run ``jobs`` (optimizer, seed) on ``slots``; returns (the runs that did not finish as
    (optimizer, seed, exit status), whether a stop request ended it). A stop request reaches
    every running run (each checkpoints and exits 75); no new one starts."""
    progress = Progress(len(jobs), exp.name)
    running: dict = {}  # slot -> (process, run directory, optimizer, seed)
    queue, failed = list(jobs), []
    with StopFlag() as stop:
        while (queue and not stop.flag) or running:
            for slot in range(len(slots)):
                if slot in running or not queue or stop.flag:
                    continue
                name, seed = queue.pop(0)
                proc = _start_run(exp, name, seed, runs_dir, slot, slots[slot], threads, args)
                stop.children.append(proc)
                running[slot] = (proc, RunDir(runs_dir / name / f"seed{seed}"), name, seed)
            time.sleep(1.0)
            for slot, (proc, run, name, seed) in list(running.items()):
                if proc.poll() is not None:
                    del running[slot]
                    stop.children.remove(proc)
                    status = run.status()
                    progress.finished(f"{name} seed {seed}: {status or 'failed'} (exit {proc.returncode})")
                    if status not in FINISHED:
                        failed.append((name, seed, proc.returncode))
            progress.update(sum(run.progress(train_cfg[name]) for _, run, name, _ in running.values()))
    progress.close()
    return failed, stop.flag


@command
def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    exp = experiment(args.experiment)
    names = [n.lower() for n in (args.optimizers or list(read_yaml(exp.configs / "best.yaml")))]
    seeds = args.seeds or paper_seeds(exp)
    # Fails fast, before launching anything, on any bad name, key or value.
    train_cfg = {n: resolve_run(exp.name, n, seeds[0], args.config, args.sets, exp.configs)[1] for n in names}
    everything = list(itertools.product(names, seeds))
    if args.list:
        for i, (name, seed) in enumerate(everything):
            print(i, name, seed)
        return 0
    if args.index is not None:
        everything = _task_runs(everything, args.index, args.runs_per_task)
        if everything is None:
            return 0
    slots, threads = plan_slots(_gpus(args.gpus), args.runs_per_gpu, args.parallel)

    runs_dir = args.runs_dir or Path("runs") / exp.runs_subdir
    check_folder(runs_dir, "--runs-dir")
    if args.report and not args.no_report:
        check_folder(args.report, "--report")
    (runs_dir / "logs").mkdir(parents=True, exist_ok=True)
    jobs = [(n, s) for n, s in everything if not RunDir(runs_dir / n / f"seed{s}").finished()]
    gpus = list(dict.fromkeys(g for g in slots if g is not None))
    print(f"{exp.name}: {len(jobs)} runs to do ({len(everything) - len(jobs)} already finished) on "
          + (f"GPUs {','.join(gpus)}, {args.runs_per_gpu} at a time on each x {threads} threads" if gpus
             else f"the CPU, {len(slots)} at a time x {threads} threads")
          + f"; runs in {runs_dir}", flush=True)
    failed, stopped = run_all(exp, jobs, slots, threads, runs_dir, train_cfg, args)

    if failed:
        print(f"{len(failed)} runs did not finish (see {runs_dir / 'logs'}): "
              + ", ".join(f"{n} seed {s} (exit {rc})" for n, s, rc in failed), file=sys.stderr)
    if stopped:
        print("interrupted: re-run the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    if not args.no_report and any(RunDir(runs_dir / n / f"seed{s}").status() for n, s in everything):
        from .outputs import Kept
        from .report import report

        try:
            written = report(runs_dir, args.report or Path("results") / exp.runs_subdir, title=exp.name)
            print("Results: " + ", ".join(str(p) for p in written), flush=True)
        except Kept as kept:  # the runs are done; only their report waits for another folder or --force
            print(f"report not written: {kept} (python -m harness.report {runs_dir} --out DIR)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""One training run: command line, run directory, seeding, device, precision, distributed.

Every experiment's ``train.py`` starts with ``run = harness.run.start("<exp>", argv)``
and gets back a :class:`Run` holding the resolved config, the run directory and
the execution context (device, autocast, ranks). The same command works under
``torchrun`` (it reads RANK/WORLD_SIZE/LOCAL_RANK) and under ``srun`` without
torchrun (it maps SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID when MASTER_ADDR is set).
A rank's GPU is ``cuda:<local rank % visible GPUs>``: torchrun's ranks each see the
node's GPUs, while srun binding one GPU per task leaves each rank ``cuda:0``.
"""
from __future__ import annotations

import argparse
import importlib.util
import atexit
import contextlib
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch
import torch.distributed as dist

import optimizers

from . import config as config_lib
from .checkpoint import load_latest, previous, remove_stale_temps, write_text_atomic
from .config import TrainConfig, config_mismatch
from .errors import OtherRankFailed, UsageError
from .experiments import Experiment, experiment
from .rundir import RunDir, check_folder


@dataclass
class Run:
    cfg: dict
    dir: Path
    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    precision: str = "fp32"  # what is actually used on this device
    experiment: Optional[Experiment] = None  # what was started: its task, configs, runs folder
    train: Optional[TrainConfig] = None  # the train section's schema (start() passes resolve_run's)

    def __post_init__(self):
        if self.train is None and "train" in self.cfg:
            self.train = TrainConfig.from_section(self.cfg["train"])

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def seed(self) -> int:
        return int(self.cfg["seed"])

    def autocast(self):
        """The forward-pass precision context: fp16/bf16 autocast (CUDA; bf16 on the CPU too),
        else a no-op."""
        if self.precision in ("fp16", "bf16"):
            dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
            return torch.autocast(self.device.type, dtype=dtype)
        return contextlib.nullcontext()

    @property
    def parallel(self) -> str:
        """``train.parallel``: ``ddp`` (replicas, the default) or ``fsdp2`` (sharded, see
        ``harness/parallel.py``); it matters only with more than one process."""
        return self.train.parallel

    def micro_batch_size(self) -> int:
        """Examples one rank feeds forward at a time: ``train.batch_size`` (the global batch,
        whatever the number of processes) / (ranks x ``train.gradient_accumulation_steps``).

        So a run on K GPUs takes the same optimizer steps on as many examples as on one.
        """
        batch, accumulation = self.train.batch_size, self.train.gradient_accumulation_steps
        parts = self.world_size * accumulation
        if batch < 1 or accumulation < 1 or batch % parts:
            raise UsageError(f"train.batch_size {batch} (the global batch) must be a positive multiple of "
                             f"ranks x train.gradient_accumulation_steps = {self.world_size} x {accumulation}")
        return batch // parts

    def any_rank(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any rank (a collective: all ranks call it)."""
        if not self.distributed:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(t)
        return bool(t.item())

    def build_optimizer(self, params):
        hp = {k: v for k, v in self.cfg["optimizer"].items() if k != "name"}
        return optimizers.build(self.cfg["optimizer"]["name"], params, **hp)

    def open(self, usable: Optional[Callable[[dict], Optional[str]]] = None, mmap: bool = False) -> Optional[dict]:
        """``open_run_dir`` for this run, on every rank (rank 0 writes): the checkpoint to resume
        from, or None. When it fails on any rank, every rank stops (the others would wait at
        rank 0's next collective)."""
        error, saved = None, None
        try:
            saved = open_run_dir(self.dir, self.cfg, writer=self.is_main, usable=usable, mmap=mmap)
        except UsageError as e:
            error = e
        if self.any_rank(error is not None):
            raise error or OtherRankFailed(f"another rank could not open {self.dir}")
        return saved

    def print(self, *args, **kwargs):
        if self.is_main:
            print(*args, **kwargs, flush=True)


def set_example(exp: Experiment) -> str:
    """A ``--set`` the experiment accepts, for its help: its length, ``train.max_iters`` for the
    experiments that count iterations and ``train.epochs`` for those that count epochs (vit,
    cifar, bert), read from its (first task's) ``paper.yaml``."""
    configs = exp.configs / exp.tasks[0] if exp.tasks and exp.task is None else exp.configs
    train = config_lib.read_yaml(configs / "paper.yaml").get("train") or {}
    return "train.max_iters=200" if "max_iters" in train else "train.epochs=1"


def parser(exp: Experiment) -> argparse.ArgumentParser:
    """The command line of ``python -m <exp>.train`` (with ``--task`` for a folder of tasks)."""
    p = argparse.ArgumentParser(
        prog=f"python -m {exp.module}",
        description=f"Train the {exp.folder} experiment with one optimizer and one seed.",
    )
    if exp.tasks:
        p.add_argument("--task", required=True, choices=exp.tasks, help="the task")
    p.add_argument("--optimizer", required=True, help=f"one of {', '.join(optimizers.NAMES)}")
    p.add_argument("--seed", type=int, default=None, help="run seed (default: the first of configs/paper.yaml's seeds)")
    p.add_argument("--config", default=None, help="YAML overriding paper.yaml sections and/or best.yaml entries")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override one config value, dotted keys (repeatable): --set {set_example(exp)}")
    default = exp.default_out.replace(f"runs/{exp.folder}/", f"runs/{exp.folder}/<task>/") \
        if exp.tasks and exp.task is None else exp.default_out
    p.add_argument("--out", default=None, help=f"run directory (default {default})")
    return p


def _with_task(exp: Experiment, argv: Optional[list[str]]) -> tuple[Experiment, list[str]]:
    """A folder of tasks (bert): its ``--task`` from ``argv`` (a one-line error when missing or
    unknown; ``--help`` prints the whole command line), and the rest of ``argv``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if exp.task is not None or not exp.tasks:
        return exp, argv
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--task")
    known, rest = pre.parse_known_args(argv)
    if any(a in ("-h", "--help") for a in rest):
        parser(exp).parse_args(["--help"])  # prints the help and exits, as argparse does
    if known.task is None:
        raise UsageError(f"--task is required; valid tasks: {', '.join(exp.tasks)}")
    return experiment(f"{exp.folder}/{known.task}"), rest


def _distributed_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's or SLURM's environment."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"])
    ntasks = int(os.environ.get("SLURM_NTASKS", 1))
    if ntasks > 1 and "MASTER_ADDR" in os.environ and "SLURM_PROCID" in os.environ:
        rank, local = int(os.environ["SLURM_PROCID"]), int(os.environ.get("SLURM_LOCALID", 0))
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(local), WORLD_SIZE=str(ntasks))
        os.environ.setdefault("MASTER_PORT", "29500")
        return rank, local, ntasks
    return 0, 0, 1


def set_tf32(matmuls: bool) -> None:
    """TF32 per experiment, as the release: ``train.tf32`` true (nano, owt: nanoGPT's
    ``train.py`` sets ``torch.backends.cuda.matmul.allow_tf32 = True``) lets float32
    matmuls use TF32 tensor cores (10-bit mantissa inputs, fp32 accumulation); false
    keeps torch's default, full fp32 matmuls (the release's vit, sst2, qnli and cifar
    set nothing). cuDNN convolutions use TF32 either way: ``torch.backends.cudnn.allow_tf32``
    is True by default in torch, and neither the release nor nanoGPT turns it off."""
    torch.backends.cuda.matmul.allow_tf32 = bool(matmuls)
    torch.backends.cudnn.allow_tf32 = True


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all CUDA devices too)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def saved_config(saved: RunDir, warn: bool = True) -> Optional[dict]:
    """The directory's ``config.yaml``; None when it is missing or damaged (not YAML, not
    UTF-8, empty, or cut short: the resolved config is written with ``optimizer`` last, so a
    file without ``optimizer.name`` is a torn one), with a one-line warning for the latter:
    the other files are checked instead, and it is rewritten."""
    if not saved.config_file.exists():
        return None
    try:
        config = saved.config()
    except UsageError as error:
        problem = str(error)
    else:
        if isinstance((config or {}).get("optimizer"), dict) and "name" in config["optimizer"]:
            return config
        problem = f"{saved.config_file} is incomplete (no optimizer.name)"
    if warn:
        print(f"warning: {problem}; checking the checkpoint and summary instead, and rewriting it",
              file=sys.stderr, flush=True)
    return None


def check_records(saved: RunDir) -> None:
    """A finished run's records must be there: a one-line UsageError when ``metrics.jsonl`` is
    missing, empty or damaged (nothing can rebuild it: the run must be redone)."""
    status, redo = saved.status(), f"delete {saved.path} to redo the run"
    try:
        records = saved.records()
    except UsageError as error:
        raise UsageError(f"{error}; the run is {status} but its records are damaged: {redo}") from None
    if not records:
        raise UsageError(f"{saved.metrics_file} holds no record but the run is {status}: {redo}")
    with open(saved.metrics_file, "rb") as f:  # a finished run wrote whole lines: a torn end is damage
        f.seek(-1, 2)
        if f.read(1) != b"\n":
            raise UsageError(f"{saved.metrics_file} ends in a torn line but the run is {status}: {redo}")


def _stamp(saved: RunDir) -> tuple:
    """What identifies the files a start reads before it takes the lock (config, checkpoints,
    summary) and the records another process would have appended meanwhile."""
    files = (saved.config_file, saved.checkpoint_file, previous(saved.checkpoint_file), saved.summary_file,
             saved.metrics_file)
    stats = [f.stat() if f.exists() else None for f in files]
    return tuple(s and (s.st_ino, s.st_size, s.st_mtime_ns) for s in stats)


def open_run_dir(run_dir: Path, cfg: dict, writer: bool = True, finished: bool = False,
                 usable: Optional[Callable[[dict], Optional[str]]] = None, mmap: bool = False) -> Optional[dict]:
    """Open the run directory ``run_dir`` for the run of ``cfg``: the one place where a run
    directory's saved configs are compared, its config written and its checkpoint read. Called
    once per start: by the training loop (``Run.open``), or by ``start`` for a finished run.

    1. ``cfg`` is compared with every config the directory records, a one-line UsageError
       naming the keys that differ (a resume must use the same arguments): ``config.yaml``
       (unless damaged: ``saved_config``, with a warning), the copy in the checkpoint, and what
       ``summary.json`` records (experiment, optimizer, seed, hyperparameters: all a completed
       sweep trial keeps once its checkpoint is deleted). The checkpoint is read here, once,
       weights-only onto the CPU (``checkpoint.load_latest``; ``mmap``: its tensors stay on disk
       until used; ``usable``: why one cannot be resumed from, to fall back to the previous).
    2. A ``finished`` run (completed or diverged: not redone) must have whole records
       (``check_records``); its ``config.yaml``, when missing or damaged, is rewritten (after
       the checks of 1) by a single process. Nothing else is written.
    3. Else the ``writer`` (rank 0) takes the directory's lock (``RunDir.lock``, creating it: a
       second process is refused before it writes anything), checks that no other process
       changed the files read in 1 meanwhile, removes the temp files of killed writers and
       saves ``config.yaml``.

    Returns the checkpoint of 1 (None without one): the one a training run resumes from.
    """
    saved = RunDir(run_dir)
    older = getattr(config_lib.experiment_module(cfg["experiment"]), "BEHAVIOUR_OF_OLDER_RUNS", {})
    before = _stamp(saved)
    config = saved_config(saved, warn=writer)
    config_mismatch(saved.path, config, cfg, older)
    checkpoint = None
    if saved.checkpoint_file.exists() or previous(saved.checkpoint_file).exists():
        checkpoint = load_latest(saved.checkpoint_file, mmap=mmap or finished, usable=usable)
        config_mismatch(saved.checkpoint_file, checkpoint.get("config"), cfg, older)
    summary = saved.summary()
    if summary is not None:
        recorded = {"experiment": summary.get("experiment"), "seed": summary.get("seed"),
                    "optimizer": {"name": summary.get("optimizer"), **(summary.get("hyperparameters") or {})}}
        config_mismatch(saved.summary_file, recorded, {k: cfg.get(k) for k in recorded}, older)
    if finished:
        check_records(saved)
        if config is None and int(os.environ.get("WORLD_SIZE", 1)) == 1:
            saved.lock()
            write_text_atomic(saved.config_file, config_lib.dump(cfg))
        return checkpoint
    if writer:
        saved.lock()
        if _stamp(saved) != before:
            raise UsageError(f"{saved.path} was changed by another process while this one started; "
                             "run the command again")
        remove_stale_temps(saved.path)
        write_text_atomic(saved.config_file, config_lib.dump(cfg))
    return checkpoint


def start(exp: Union[str, Experiment], argv: Optional[list[str]] = None) -> Optional[Run]:
    """Parse the command line, resolve the config and set up the process.

    ``exp`` is an :class:`~harness.experiments.Experiment` or its name (``"nano"``,
    ``"bert"``, ``"bert/sst2"``): it gives the run its name (in the config and summary),
    its config folder and its default run directory (``runs/<exp>/{optimizer}/seed{seed}``);
    for a folder of tasks (``bert``) the command line names the task (``--task sst2``).

    Returns None when the run directory already holds a completed or diverged run
    (nothing to do), after checking it was made with this config (``open_run_dir``: a
    one-line UsageError naming the keys that differ; its ``config.yaml``, if missing or
    damaged, is rewritten). Bad input raises a one-line ``UsageError`` (the command exits
    with status 2; see ``harness.errors.command``). Otherwise nothing is read from the run
    directory but whether it is the kit's (``RunDir.check_own``) and holds a finished run,
    and nothing is written: the training loop opens it (``Run.open``), so a start that fails
    later (a missing dataset, say) leaves no trace.
    """
    exp = experiment(exp, task_required=False) if isinstance(exp, str) else exp
    exp, argv = _with_task(exp, argv)
    args = parser(exp).parse_args(["--task", exp.task, *argv] if exp.task else argv)
    if args.seed is None:
        seeds = config_lib.read_yaml(exp.configs / "paper.yaml").get("seeds") or [0]
        args.seed = int(seeds[0])
    cfg, train = config_lib.resolve_run(exp.name, args.optimizer, args.seed, args.config, args.sets, exp.configs)
    run_dir = Path(args.out or exp.default_out.format(optimizer=cfg["optimizer"]["name"], seed=args.seed))
    if cfg.get("wandb") and importlib.util.find_spec("wandb") is None:
        raise UsageError("wandb=true but wandb is not installed: pip install wandb (or --set wandb=false)")
    check_folder(run_dir, "--out")
    saved = RunDir(run_dir)
    saved.check_own("--out")
    if saved.finished():
        open_run_dir(run_dir, cfg, finished=True)
        print(f"{run_dir}: already {saved.status()}; nothing to do", flush=True)
        return None

    rank, local_rank, world_size = _distributed_env()
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())  # srun binding 1 GPU per task: cuda:0
        torch.cuda.set_device(device)
        set_tf32(train.tf32)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        # Tear the group down before the interpreter does: a rank that exits with its
        # connections still open can make its peers abort (SIGABRT in gloo/NCCL).
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    precision = train.precision if device.type == "cuda" else train.cpu_precision
    seed_everything(args.seed)
    return Run(cfg=cfg, dir=run_dir, device=device, rank=rank, local_rank=local_rank,
               world_size=world_size, precision=precision, experiment=exp, train=train)

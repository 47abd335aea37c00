"""The training loop every experiment shares.

    fit(run, model, data, loss_fn, evaluate, total_steps=..., eval_interval=...)
    # = Trainer(run, model, data, ...).fit(): resume, then (evaluate_and_log, checkpoint,
    #   train_step) until the budget, divergence or a stop request, then finish

``step`` counts finished optimizer updates. Evaluation happens whenever
``step % eval_interval == 0`` for ``0 <= step <= total_steps`` (nanoGPT's
cadence: with 5,001 iterations and an interval of 100 the last evaluation is at
step 5,000), and at the steps of ``also_evaluate_at`` (e.g. each epoch's end and
the last step, where the interval does not reach them), each evaluation is preceded by a ``train`` record (the mean
training-batch loss since the previous evaluation) and followed by a
checkpoint. A NaN/inf loss ends the run as ``diverged``; SIGTERM, SIGUSR1 or
Ctrl-C end it as ``interrupted`` after checkpointing at the next step boundary
(with several processes, the next multiple of ``log_interval``: ``Trainer._interrupted``)
(``Interrupted``; the entry point exits with status 75, "try again":
re-running the same command resumes). A resumed
run logs exactly what the uninterrupted run would have (bit for bit on CPU).
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from . import parallel as par
from .cpu import matmul_peak_flops
from .data import move
from .errors import UsageError
from .logging import MetricsLog, start_wandb, versions, write_summary
from .run import Run
from .rundir import RunDir, best_record
from .signals import EXIT_INTERRUPTED, Interrupted, StopFlag  # noqa: F401 (EXIT_INTERRUPTED: for callers)

# For tests and preemption drills: behave as if SIGTERM arrived after this many steps.
STOP_AFTER_ENV = "HARNESS_STOP_AFTER_STEPS"


def _gather(run: Run, obj: Any) -> list:
    if not run.distributed:
        return [obj]
    out = [None] * run.world_size
    dist.all_gather_object(out, obj)
    return out


def _finite(*values: float) -> bool:
    return all(math.isfinite(v) for v in values)


@dataclass
class TrainState:
    """What the loop carries from step to step; all of it goes into the checkpoint.

    ``step`` counts finished optimizer updates, ``wall_time_s`` the training time of
    earlier processes of this run, ``best`` the best ``select`` record so far
    (``{"split", "key", "value", "step"}``), and ``running``/``running_n`` this rank's
    sums of the training statistics since the last evaluation and how many steps they cover.
    """

    step: int = 0
    wall_time_s: float = 0.0
    best: Optional[dict] = None
    first_eval: Optional[float] = None  # the first evaluation's loss (``train.diverge_factor``)
    running: dict = field(default_factory=dict)
    running_n: int = 0

    def add(self, stats: dict[str, torch.Tensor], weight: float) -> None:
        for name, value in stats.items():
            value = value.detach().float() * weight
            self.running[name] = self.running[name] + value if name in self.running else value

    def take_means(self, run: Run) -> dict[str, float]:
        """The running means over every rank's steps since the last evaluation; resets them."""
        names = sorted(self.running)
        totals = torch.stack([self.running[k] for k in names]) / self.running_n
        if run.distributed:
            dist.all_reduce(totals)
            totals /= run.world_size
        self.running, self.running_n = {}, 0
        return dict(zip(names, totals.tolist()))

    def improves(self, record: dict, select: tuple[str, str, str]) -> bool:
        """True (and ``best`` updated) when ``record`` beats ``best`` on ``select``."""
        split, key, mode = select
        if record.get("split") != split or key not in record:
            return False
        value = float(record[key])
        if not _finite(value) or not (self.best is None or (value < self.best["value"] if mode == "min"
                                                              else value > self.best["value"])):
            return False
        self.best = {"split": split, "key": key, "value": value, "step": self.step}
        return True

    def state_dict(self, run: Run) -> dict:
        """Checkpoint keys; ``running`` holds every rank's sums (a collective)."""
        return {"step": self.step, "wall_time_s": self.wall_time_s, "best": self.best, "first_eval": self.first_eval,
                "running": _gather(run, {k: v.cpu() for k, v in self.running.items()}), "running_n": self.running_n}

    def load_state_dict(self, state: dict, run: Run) -> None:
        self.step, self.wall_time_s, self.best = state["step"], state["wall_time_s"], state["best"]
        self.first_eval = state.get("first_eval")  # older checkpoints: None (the rule restarts)
        # One dict per rank (older checkpoints: rank 0's alone). Resumed on another number of
        # ranks, every rank takes the mean over the saved ones, so the next train record still
        # averages every rank's batches since the previous evaluation.
        saved = [state["running"]] if isinstance(state["running"], dict) else state["running"]
        mine = saved[run.rank] if len(saved) == run.world_size else {
            k: sum(s[k] for s in saved) / len(saved) for k in saved[0]}
        self.running = {k: v.to(run.device) for k, v in mine.items()}
        self.running_n = state["running_n"]


class Trainer:
    """The training loop every experiment shares; ``fit()`` runs it (see the module docstring).

    Args:
        data: the training batches: ``data.batches(start)`` yields micro-batches from
            micro-batch number ``start`` on; ``state_dict()``/``load_state_dict()`` hold
            whatever else fixes the data position (e.g. a generator's state).
        loss_fn: ``(model, batch) -> (loss, stats)``; ``stats`` maps names (e.g. ``acc``)
            to scalar tensors averaged into the ``train`` records.
        evaluate: ``(model, step) -> [{"split": ..., "loss": ..., ...}, ...]``, called with the
            model in eval mode under ``torch.no_grad`` and the run's autocast, on every rank.
            If it has ``state_dict``/``load_state_dict`` (e.g. the generator of fresh validation
            batches), that state is checkpointed with the rest.
        total_steps, eval_interval: optimizer updates in all; evaluate when ``step % eval_interval == 0``.
        also_evaluate_at: further steps at which to evaluate (e.g. the epochs' ends, so that the
            last evaluation comes after the last step whatever the interval).
        steps_per_epoch: adds ``epoch`` to records; ``tokens_per_step`` adds ``tokens``;
            ``flops_per_step`` (model FLOPs of one optimizer step on one rank) adds ``mfu``
            on GPUs with a known peak (on the CPU, the summary's ``cpu_flops_utilization``).
        select: (split, key, "min"|"max") of the headline "best" metric, e.g. ("val", "acc", "max").
        on_best: called on rank 0 with the model's full ``state_dict()`` (as one process holds
            it, whether the model is replicated or sharded) and the (stamped) record when
            ``select`` improves (e.g. to keep the best-validation weights for a final test evaluation).
        optimizer: ``model -> param groups or an optimizer``, called with the model on its device
            (sharded under FSDP2). Param groups (an iterable of parameters or of dicts, as
            ``torch.optim`` takes them: e.g. no weight decay on norms and biases) get the run's
            optimizer and hyperparameters, which a group's own keys override; an optimizer is
            used as it is. Default: the run's optimizer on ``model.parameters()``.
    """

    def __init__(self, run: Run, model: nn.Module, data, loss_fn: Callable, evaluate: Callable, *,
                 total_steps: int, eval_interval: int, also_evaluate_at: Iterable[int] = (),
                 steps_per_epoch: Optional[int] = None,
                 tokens_per_step: Optional[int] = None, flops_per_step: Optional[float] = None,
                 select: tuple[str, str, str] = ("val", "loss", "min"),
                 on_best: Optional[Callable[[dict, dict], None]] = None,
                 optimizer: Optional[Callable[[nn.Module], Any]] = None):
        self.run, self.data, self.loss_fn, self.evaluate = run, data, loss_fn, evaluate
        self.total_steps, self.eval_interval, self.select, self.on_best = total_steps, eval_interval, select, on_best
        self.also_evaluate_at = frozenset(also_evaluate_at)
        self.steps_per_epoch, self.tokens_per_step, self.flops_per_step = steps_per_epoch, tokens_per_step, flops_per_step
        self.cfg = run.train
        # FSDP2 shards the parameters (DTensors) before the optimizer sees them; a single
        # process has nothing to shard or replicate.
        self.fsdp = run.distributed and self.cfg.parallel == "fsdp2"
        # The run starts here: its directory is opened (checked, locked, config saved) and its
        # checkpoint read, once; resume() loads it.
        self.resume_from = run.open(usable=self._records_kept, mmap=self.fsdp)
        self.raw = model.to(run.device)
        if self.fsdp:
            par.fully_shard_model(self.raw, run.device, run.world_size)
        made = optimizer(self.raw) if optimizer else self.raw.parameters()
        self.optimizer = made if isinstance(made, torch.optim.Optimizer) else run.build_optimizer(made)
        self.buffers = list(self.raw.buffers())
        self.scaler = torch.amp.GradScaler(run.device.type, enabled=run.precision == "fp16")
        self.wandb = start_wandb(run.cfg, run.dir) if run.is_main else None
        self.log = MetricsLog(run.dir, enabled=run.is_main, wandb_run=self.wandb)
        self.ckpt_path = RunDir(run.dir).checkpoint_file
        self.state = TrainState()
        self.model = self.raw  # what the forward pass calls: compiled and/or DDP-wrapped in fit()
        self.saved_at = -1  # the step of the last checkpoint
        self.resumed_at: Optional[int] = None
        self.t_start = time.time()
        self.pbar = None
        self.window = (time.time(), 0)  # (time, step) where the current throughput window started

    # ---------------------------------------------------------------- the loop

    def fit(self) -> Optional[dict]:
        """Train for ``total_steps`` updates; returns the summary (rank 0; None elsewhere).

        Raises ``Interrupted`` after checkpointing when a stop was requested."""
        self.resume()
        status, state = "completed", self.state
        batches = iter(self.data.batches(state.step * self.cfg.gradient_accumulation_steps))
        with StopFlag() as interrupt, self._progress():
            self.model.train()
            while True:
                evaluates = state.step % self.eval_interval == 0 or state.step in self.also_evaluate_at
                if evaluates and state.step != self.resumed_at:
                    if not self.evaluate_and_log():
                        status = "diverged"
                        break
                    self.checkpoint()
                if state.step >= self.total_steps:
                    break
                if self._stop_requested() or self._interrupted(interrupt.flag):
                    self.checkpoint()
                    status = "interrupted"
                    break
                if not self.train_step(batches):
                    status = "diverged"
                    break
        if status == "completed":
            self.checkpoint()
        summary = self.finish(status)
        if status == "interrupted":
            raise Interrupted(f"{self.run.dir}: interrupted at step {state.step}")
        return summary

    # ---------------------------------------------------------------- its steps

    def resume(self) -> None:
        """Load the checkpoint ``Run.open`` read if there was one (else start the metrics afresh),
        then wrap the model.

        The checkpoint was read weights-only onto the CPU (``ckpt.load``; under FSDP2 memory-mapped,
        so a rank reads little more than its shards): ``load_state_dict`` copies the model and
        optimizer tensors to the run's device (under FSDP2 each rank copies only its shards,
        ``par.load_full_state_dicts``: the full state never reaches a GPU), and the data,
        evaluation and RNG states stay CPU byte tensors, as ``Generator.set_state`` needs them.
        Of ``checkpoint.pt`` and ``checkpoint.prev.pt``, it is the newest whose records are all in
        ``metrics.jsonl`` (``_records_kept``: a node crash can lose records a checkpoint counted;
        the records are fsynced before a checkpoint counts them since); neither: a one-line error.
        """
        run, state = self.run, self.state
        saved, self.resume_from = self.resume_from, None  # held no longer than needed
        if saved is not None:
            self._check_scaler(saved["scaler"])
            if self.fsdp:  # the full state dicts, as saved: each rank keeps its shards
                par.load_full_state_dicts(self.raw, self.optimizer, saved["model"], saved["optimizer"])
            else:
                self.raw.load_state_dict(saved["model"])
                self.optimizer.load_state_dict(saved["optimizer"])
            self.scaler.load_state_dict(saved["scaler"])
            mine = min(run.rank, len(saved["data"]) - 1)  # another world size: ranks beyond the saved reuse the last
            self.data.load_state_dict(saved["data"][mine])
            if hasattr(self.evaluate, "load_state_dict"):
                self.evaluate.load_state_dict(saved["evaluate"])
            ckpt.set_rng_state(saved["rng"][min(run.rank, len(saved["rng"]) - 1)])
            state.load_state_dict(saved, run)
            self.log.truncate(saved["metrics_offset"])
            self.saved_at = self.resumed_at = state.step
            run.print(f"Resuming {run.dir} from step {state.step}")
        else:
            self.log.truncate(0)
        self.start_step, self.window = state.step, (time.time(), state.step)
        if self.cfg.compile:
            self.model = torch.compile(self.model)
        if run.distributed and not self.fsdp:
            self.model = DistributedDataParallel(
                self.model, device_ids=[run.device] if run.device.type == "cuda" else None)

    def _records_kept(self, saved: dict) -> Optional[str]:
        """Why ``saved`` cannot be resumed from: the records it counts (``metrics_offset`` bytes
        of metrics.jsonl) are not all on disk; None when they are. Every rank reads the same file."""
        metrics = RunDir(self.run.dir).metrics_file
        size = metrics.stat().st_size if metrics.exists() else None
        if saved["metrics_offset"] and (size is None or size < saved["metrics_offset"]):
            held = "is missing" if size is None else f"holds {size} bytes"
            return f"counts {saved['metrics_offset']} bytes of {metrics.name}, which {held} (records lost)"
        return None

    def _check_scaler(self, saved: dict) -> None:
        """A checkpoint of a run without fp16 loss scaling (its GradScaler disabled, saved as
        ``{}``: a CPU run, or fp32/bf16) cannot feed an enabled GradScaler (the same config on
        CUDA in fp16): a one-line UsageError. The other way round the scale is dropped, with a warning."""
        enabled = self.scaler.is_enabled()
        if enabled and not saved:
            raise UsageError(f"{self.ckpt_path} was saved by a process without fp16 loss scaling (on the CPU, or "
                             f"not in fp16) but this one trains in fp16 with loss scaling on {self.run.device}: "
                             "resume it where it ran (on the CPU: CUDA_VISIBLE_DEVICES=), or start a new --out")
        if saved and not enabled:
            if self.run.is_main:
                print(f"warning: {self.ckpt_path} was saved with fp16 loss scaling; this process runs "
                      f"{self.run.precision} on {self.run.device} without it", file=sys.stderr, flush=True)

    def train_step(self, batches) -> bool:
        """One optimizer update over ``gradient_accumulation_steps`` micro-batches; False if the
        loss went non-finite (checked every ``log_interval`` steps)."""
        run, state, accumulation = self.run, self.state, self.cfg.gradient_accumulation_steps
        for micro in range(accumulation):
            batch = move(next(batches), run.device)
            last = micro == accumulation - 1
            if self.fsdp:  # FSDP2 has no no_sync(): reduce-scatter only after the last micro-batch
                self.raw.set_requires_gradient_sync(last)
            no_sync = run.distributed and not self.fsdp and not last
            with self.model.no_sync() if no_sync else contextlib.nullcontext():
                with run.autocast():
                    loss, stats = self.loss_fn(self.model, batch)
                self.scaler.scale(loss / accumulation).backward()
            if self.fsdp:
                self._broadcast_buffers()
            state.add({"loss": loss, **stats}, 1 / accumulation)
        if self.cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.raw.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.running_n += 1
        self.pbar.update(1)
        if state.step % self.cfg.log_interval:
            return True
        loss_now = loss.item()
        if not _finite(loss_now, state.running["loss"].item()):
            self.log.log(self._stamp({"split": "train", "loss": loss_now}))
            return False
        self.pbar.set_postfix(self._throughput(loss_now))
        return True

    def evaluate_and_log(self) -> bool:
        """The ``train`` record (means since the last evaluation), then the evaluation's records,
        the best so far; False if an evaluated loss is not finite."""
        run, state = self.run, self.state
        if state.running_n:
            means = state.take_means(run)
            if self.flops_per_step and state.step > self.window[1]:  # on GPUs: MFU since the last eval
                mfu = estimate_mfu(self.flops_per_step * (state.step - self.window[1])
                                   / (time.time() - self.window[0]), run.device)
                if mfu is not None:
                    means["mfu"] = mfu
            self.log.log(self._stamp({"split": "train", **means}))
        self.model.eval()
        with torch.no_grad(), run.autocast():
            records = [self._stamp(r) for r in self.evaluate(self.model, state.step)]
        self.model.train()
        improved = None
        for record in records:
            self.log.log(record)
            improved = record if state.improves(record, self.select) else improved
        if self.on_best is not None:
            self._call_on_best(improved)
        self.window = (time.time(), state.step)
        if not _finite(*(float(r["loss"]) for r in records if "loss" in r)) or self._blew_up(records):
            return False
        key = self.select[1]
        self.pbar.set_postfix({f"{r['split']}_{key}": f"{r[key]:.4f}" for r in records if key in r})
        return True

    def checkpoint(self) -> None:
        """Save everything a resume needs, atomically (rank 0 writes; every rank takes part)."""
        run = self.run
        if self.saved_at == self.state.step:
            return
        self.saved_at = self.state.step
        data_states, rng_states = _gather(run, self.data.state_dict()), _gather(run, ckpt.rng_state())
        train_state = self.state.state_dict(run)
        if self.fsdp:  # gathered to full tensors on rank 0 (a collective), the format of a 1-process run
            model_state, optim_state = par.full_state_dicts(self.raw, self.optimizer)
        elif run.is_main:
            model_state, optim_state = self.raw.state_dict(), self.optimizer.state_dict()
        if run.is_main:
            ckpt.save_atomic({
                "model": model_state, "optimizer": optim_state, "scaler": self.scaler.state_dict(),
                "data": data_states, "rng": rng_states, **train_state, "wall_time_s": self.elapsed(),
                "metrics_offset": self.log.offset(), "config": run.cfg,
                "evaluate": self.evaluate.state_dict() if hasattr(self.evaluate, "state_dict") else None,
            }, self.ckpt_path, keep_previous=True)
        if run.distributed:
            dist.barrier()

    def finish(self, status: str) -> Optional[dict]:
        """Write ``summary.json`` (rank 0) and close wandb; returns the summary."""
        run, state = self.run, self.state
        summary = None
        if run.is_main:
            summary = self._summary(status)
            write_summary(run.dir, summary)
            if self.wandb is not None:
                self.wandb.finish({"status": status, **({"best": state.best["value"]} if state.best else {})})
            best = state.best
            run.print(f"{run.dir}: {status} after {state.step} steps"
                      + (f", best {best['split']} {best['key']} {best['value']:.4f} at step {best['step']}"
                         if best else ""))
        if run.distributed:
            dist.barrier()
        return summary

    # ---------------------------------------------------------------- helpers

    def elapsed(self) -> float:
        return self.state.wall_time_s + time.time() - self.t_start

    def _stamp(self, record: dict) -> dict:
        step = self.state.step
        out = {"step": step, **record}
        if self.steps_per_epoch:
            out["epoch"] = step / self.steps_per_epoch
        if self.tokens_per_step:
            out["tokens"] = step * self.tokens_per_step
        out["time_s"] = self.elapsed()
        return out

    def _blew_up(self, records: list[dict]) -> bool:
        """``train.diverge_factor`` f > 0: True when the selected split's loss (``select``'s
        split, key ``loss``) is above f x the first evaluation's (a finite blow-up, which
        clipping can keep finite). Remembers the first evaluation's loss (it is checkpointed)."""
        losses = [float(r["loss"]) for r in records if r.get("split") == self.select[0] and "loss" in r]
        if not losses:
            return False
        if self.state.first_eval is None:
            self.state.first_eval = losses[0]
            return False
        factor = self.cfg.diverge_factor
        return factor > 0 and losses[0] > factor * self.state.first_eval

    def _stop_requested(self) -> bool:
        """``STOP_AFTER_ENV`` steps done in this process (the same on every rank: no collective)."""
        stop_after = int(os.environ.get(STOP_AFTER_ENV, 0) or 0)
        return bool(stop_after) and self.state.step - self.start_step >= stop_after

    def _interrupted(self, flag: bool) -> bool:
        """Whether any rank was asked to stop (``flag``: this rank's signal). Across ranks this
        is an all-reduce whose result the host must read, waiting for the GPU to finish every
        step queued so far; so a distributed run asks only every ``log_interval`` steps (where
        the loss is read anyway), and stops there: the host runs ahead between them, as in nanoGPT."""
        if self.run.distributed and self.state.step % self.cfg.log_interval:
            return False
        return self.run.any_rank(flag)

    @contextlib.contextmanager
    def _progress(self):
        run = self.run
        quiet = not run.is_main or os.environ.get("TQDM_DISABLE", "") not in ("", "0")
        self.pbar = tqdm(total=self.total_steps, initial=self.state.step, disable=quiet, dynamic_ncols=True,
                         desc=f"{run.cfg['experiment']} {run.cfg['optimizer']['name']} s{run.seed}")
        self._rate_from = (time.time(), self.state.step)
        try:
            yield self.pbar
        finally:
            self.pbar.close()

    def _throughput(self, loss: float) -> dict:
        """The progress bar's postfix: loss, iterations per second since the last call, MFU."""
        now, step = time.time(), self.state.step
        rate = (step - self._rate_from[1]) / max(now - self._rate_from[0], 1e-9)
        self._rate_from = (now, step)
        postfix = {"loss": f"{loss:.4f}", "it/s": f"{rate:.2f}"}
        mfu = estimate_mfu(self.flops_per_step * rate, self.run.device) if self.flops_per_step else None
        if mfu is not None:
            postfix["mfu"] = f"{100 * mfu:.1f}%"
        return postfix

    def _broadcast_buffers(self) -> None:
        # DDP broadcasts rank 0's buffers (BatchNorm's running statistics) before every
        # forward; FSDP2 leaves them per rank. Broadcasting after each forward gives every
        # later forward, training or evaluation, rank 0's, as under DDP.
        for buffer in self.buffers:
            dist.broadcast(buffer, src=0)

    def _call_on_best(self, improved: Optional[dict]) -> None:
        run = self.run
        if self.fsdp:  # gathering the full weights is a collective: every rank takes part
            if run.any_rank(improved is not None):
                model_state = par.full_model_state_dict(self.raw)
                if run.is_main:
                    self.on_best(model_state, improved)
        elif improved is not None and run.is_main:
            self.on_best(self.raw.state_dict(), improved)

    def _summary(self, status: str) -> dict:
        run, state = self.run, self.state
        records = RunDir(run.dir).records()
        steps_per_s = (state.step - self.start_step) / max(time.time() - self.t_start, 1e-9)
        summary = {
            "status": status, "experiment": run.cfg["experiment"], "optimizer": run.cfg["optimizer"]["name"],
            "seed": run.seed, "steps": state.step, "total_steps": self.total_steps,
            "best": state.best, "final": {r["split"]: {k: v for k, v in r.items() if k != "split"} for r in records},
            "wall_time_s": self.elapsed(), "steps_per_s": steps_per_s,
            "hyperparameters": {k: v for k, v in run.cfg["optimizer"].items() if k != "name"},
            "world_size": run.world_size, "device": str(run.device), "precision": run.precision,
            "versions": versions(),
        }
        if run.device.type == "cpu":  # what the wall time ran on
            summary["cpu_threads"] = torch.get_num_threads()
        estimators = [k for r in records if r.get("split") == "val" for k in r if k.startswith("loss_")]
        for key, mode in (("loss", "min"), ("acc", "max"), *((k, "min") for k in dict.fromkeys(estimators))):
            best = best_record(records, "val", key, mode)
            if best is not None:
                summary[f"best_val_{key}"] = best[key]
        if hasattr(self.evaluate, "estimators"):  # which estimator "loss" is, then the others recorded
            summary["val_estimators"] = list(self.evaluate.estimators)
        if self.tokens_per_step:
            summary["tokens_per_s"] = self.tokens_per_step * steps_per_s
        if self.flops_per_step and state.step > self.start_step:
            achieved = self.flops_per_step * steps_per_s
            summary["mfu"] = estimate_mfu(achieved, run.device)
            if run.device.type == "cpu":  # against this machine's measured matmul throughput
                summary["cpu_flops_per_s"] = achieved
                summary["cpu_flops_utilization"] = achieved / matmul_peak_flops()
        return summary


def fit(run: Run, model: nn.Module, data, loss_fn: Callable, evaluate: Callable, **kwargs) -> Optional[dict]:
    """``Trainer(run, model, data, loss_fn, evaluate, **kwargs).fit()``: see ``Trainer``."""
    return Trainer(run, model, data, loss_fn, evaluate, **kwargs).fit()


# Dense bf16/fp16 tensor-core peak per GPU, FLOP/s (vendor datasheets).
PEAK_FLOPS = {"A100": 312e12, "H100": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H200": 989e12,
              "A10": 125e12, "L40": 181e12, "L40S": 362e12, "V100": 125e12}


def peak_flops(device: torch.device) -> Optional[float]:
    """The detected GPU's peak (the longest matching name), or None (CPU, unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_FLOPS[key]
    return None


def estimate_mfu(flops_per_s: float, device: torch.device) -> Optional[float]:
    """Model FLOPs utilisation: achieved model FLOP/s over the device's peak."""
    peak = peak_flops(device)
    return flops_per_s / peak if peak else None

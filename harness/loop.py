"""The training loop every experiment shares.

    fit(run, model, data, loss_fn, evaluate, total_steps=..., eval_interval=...)

``step`` counts finished optimizer updates. Evaluation happens whenever
``step % eval_interval == 0`` for ``0 <= step <= total_steps`` (nanoGPT's
cadence: with 5,001 iterations and an interval of 100 the last evaluation is at
step 5,000), each evaluation is preceded by a ``train`` record (the mean
training-batch loss since the previous evaluation) and followed by a
checkpoint. A NaN/inf loss ends the run as ``diverged``; SIGTERM, SIGUSR1 or
Ctrl-C end it as ``interrupted`` after checkpointing at the next step boundary
(exit status 75, "try again": re-running the same command resumes). A resumed
run logs exactly what the uninterrupted run would have (bit for bit on CPU).
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from . import parallel as par
from .logging import MetricsLog, start_wandb, versions, write_summary
from .run import Run
from .rundir import RunDir, best_record
from .signals import EXIT_INTERRUPTED, StopFlag

# For tests and preemption drills: behave as if SIGTERM arrived after this many steps.
STOP_AFTER_ENV = "HARNESS_STOP_AFTER_STEPS"


def move(batch: Any, device: torch.device) -> Any:
    """Tensors in (nested) tuples/lists/dicts to ``device`` (asynchronously from pinned memory)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=batch.is_pinned())
    if isinstance(batch, (list, tuple)):
        return type(batch)(move(b, device) for b in batch)
    if hasattr(batch, "items"):
        return {k: move(v, device) for k, v in batch.items()}
    return batch


def _gather(run: Run, obj: Any) -> list:
    if not run.distributed:
        return [obj]
    out = [None] * run.world_size
    dist.all_gather_object(out, obj)
    return out


def _my_running(saved, run: Run) -> dict:
    """This rank's running training sums from a checkpoint's ``running``: one dict per rank
    (a dict alone in checkpoints that kept rank 0's only). Resumed on another number of
    ranks, every rank takes the mean over the saved ranks, so the next train record still
    averages every rank's batches since the previous evaluation."""
    saved = [saved] if isinstance(saved, dict) else saved
    if len(saved) == run.world_size:
        return saved[run.rank]
    return {k: sum(s[k] for s in saved) / len(saved) for k in saved[0]}


def fit(
    run: Run,
    model: torch.nn.Module,
    data,
    loss_fn: Callable[[torch.nn.Module, Any], tuple[torch.Tensor, dict]],
    evaluate: Callable[[torch.nn.Module, int], list[dict]],
    *,
    total_steps: int,
    eval_interval: int,
    steps_per_epoch: Optional[int] = None,
    tokens_per_step: Optional[int] = None,
    flops_per_step: Optional[float] = None,
    select: tuple[str, str, str] = ("val", "loss", "min"),
    on_best: Optional[Callable[[dict, dict], None]] = None,
) -> Optional[dict]:
    """Train ``model`` for ``total_steps`` optimizer updates; returns the summary (rank 0).

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
        steps_per_epoch: adds ``epoch`` to records; ``tokens_per_step`` adds ``tokens``;
            ``flops_per_step`` (model FLOPs of one optimizer step on one rank) adds ``mfu``
            on GPUs with a known peak.
        select: (split, key, "min"|"max") of the headline "best" metric, e.g. ("val", "acc", "max").
        on_best: called on rank 0 with the model's full ``state_dict()`` (as one process holds
            it, whether the model is replicated or sharded) and the (stamped) record when
            ``select`` improves (e.g. to keep the best-validation weights for a final test evaluation).
    """
    tcfg = run.cfg.get("train", {})
    accumulation = int(tcfg.get("gradient_accumulation_steps", 1) or 1)
    grad_clip = float(tcfg.get("grad_clip", 0.0) or 0.0)
    log_interval = int(tcfg.get("log_interval", 10) or 10)
    # FSDP2 shards the parameters (DTensors) before the optimizer sees them; a single
    # process has nothing to shard or replicate.
    fsdp = run.distributed and run.parallel == "fsdp2"
    sel_split, sel_key, sel_mode = select

    run.write_config()
    raw = model.to(run.device)
    if fsdp:
        par.fully_shard_model(raw, run.device, run.world_size)
    optimizer = run.build_optimizer(raw.parameters())
    buffers = list(raw.buffers())
    scaler = torch.amp.GradScaler(run.device.type, enabled=run.precision == "fp16")
    wandb_run = start_wandb(run.cfg, run.dir) if run.is_main else None
    log = MetricsLog(run.dir, enabled=run.is_main, wandb_run=wandb_run)
    ckpt_path = RunDir(run.dir).checkpoint_file

    step, wall, best = 0, 0.0, None
    running: dict[str, torch.Tensor] = {}
    running_n = 0
    resumed = ckpt_path.exists()
    if resumed:
        state = ckpt.load(ckpt_path, run.device)
        if fsdp:  # the full state dicts, as saved: each rank keeps its shards
            par.load_full_state_dicts(raw, optimizer, state["model"], state["optimizer"])
        else:
            raw.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        mine = min(run.rank, len(state["data"]) - 1)  # a different world size reuses rank 0's stream
        data.load_state_dict(state["data"][mine])
        if hasattr(evaluate, "load_state_dict"):
            evaluate.load_state_dict(state["evaluate"])
        ckpt.set_rng_state(state["rng"][mine])
        step, wall, best = state["step"], state["wall_time_s"], state["best"]
        running = {k: v.to(run.device) for k, v in _my_running(state["running"], run).items()}
        running_n = state["running_n"]
        log.truncate(state["metrics_offset"])
        run.print(f"Resuming {run.dir} from step {step}")
    else:
        log.truncate(0)
    start_step = step

    if tcfg.get("compile"):
        model = torch.compile(model)
    if run.distributed and not fsdp:
        model = DistributedDataParallel(model, device_ids=[run.local_rank] if run.device.type == "cuda" else None)

    saved_at = [step if resumed else -1]

    def save_checkpoint() -> None:
        if saved_at[0] == step:
            return
        saved_at[0] = step
        data_states, rng_states = _gather(run, data.state_dict()), _gather(run, ckpt.rng_state())
        # Each rank's sums since the last evaluation: the train record averages them over the ranks.
        running_states = _gather(run, {k: v.cpu() for k, v in running.items()})
        if fsdp:  # gathered to full tensors on rank 0 (a collective), the format of a 1-process run
            model_state, optim_state = par.full_state_dicts(raw, optimizer)
        elif run.is_main:
            model_state, optim_state = raw.state_dict(), optimizer.state_dict()
        if run.is_main:
            ckpt.save_atomic({
                "model": model_state, "optimizer": optim_state, "scaler": scaler.state_dict(),
                "data": data_states, "rng": rng_states, "step": step, "wall_time_s": elapsed(),
                "best": best, "running": running_states, "running_n": running_n, "metrics_offset": log.offset(),
                "config": run.cfg, "evaluate": evaluate.state_dict() if hasattr(evaluate, "state_dict") else None,
            }, ckpt_path)
        if run.distributed:
            dist.barrier()

    def stamp(record: dict) -> dict:
        out = {"step": step, **record}
        if steps_per_epoch:
            out["epoch"] = step / steps_per_epoch
        if tokens_per_step:
            out["tokens"] = step * tokens_per_step
        out["time_s"] = elapsed()
        return out

    t_start = time.time()

    def elapsed() -> float:
        return wall + time.time() - t_start

    def finite(*values) -> bool:
        return all(math.isfinite(v) for v in values)

    quiet = not run.is_main or os.environ.get("TQDM_DISABLE", "") not in ("", "0")
    status, pbar = "completed", tqdm(total=total_steps, initial=step, disable=quiet, dynamic_ncols=True,
                                     desc=f"{run.cfg['experiment']} {run.cfg['optimizer']['name']} s{run.seed}")
    stop_after = int(os.environ.get(STOP_AFTER_ENV, 0) or 0)
    batches = iter(data.batches(step * accumulation))
    t_last, step_last = time.time(), step
    window = (time.time(), step)  # (time, step) where the current MFU window started
    model.train()
    with StopFlag() as interrupt:
        while True:
            if step % eval_interval == 0 and not (resumed and step == start_step):
                if running_n:
                    names = sorted(running)
                    totals = torch.stack([running[k] for k in names]) / running_n
                    if run.distributed:  # the mean over every rank's batches
                        dist.all_reduce(totals)
                        totals /= run.world_size
                    means = dict(zip(names, totals.tolist()))
                    if flops_per_step and step > window[1]:  # on GPUs: MFU over the training since the last eval
                        mfu = estimate_mfu(flops_per_step * (step - window[1]) / (time.time() - window[0]), run.device)
                        if mfu is not None:
                            means["mfu"] = mfu
                    log.log(stamp({"split": "train", **means}))
                    running, running_n = {}, 0
                model.eval()
                with torch.no_grad(), run.autocast():
                    records = evaluate(model, step)
                model.train()
                records = [stamp(record) for record in records]
                improved = None
                for record in records:
                    log.log(record)
                    if record.get("split") == sel_split and sel_key in record:
                        value = float(record[sel_key])
                        better = best is None or (value < best["value"] if sel_mode == "min" else value > best["value"])
                        if finite(value) and better:
                            best = {"split": sel_split, "key": sel_key, "value": value, "step": step}
                            improved = record
                if on_best is not None:
                    if fsdp:  # gathering the full weights is a collective: every rank takes part
                        if run.any_rank(improved is not None):
                            model_state = par.full_model_state_dict(raw)
                            if run.is_main:
                                on_best(model_state, improved)
                    elif improved is not None and run.is_main:
                        on_best(raw.state_dict(), improved)
                if not finite(*(float(r["loss"]) for r in records if "loss" in r)):
                    status = "diverged"
                    break
                pbar.set_postfix({f"{r['split']}_{sel_key}": f"{r[sel_key]:.4f}" for r in records if sel_key in r})
                save_checkpoint()
                window = (time.time(), step)
            if step >= total_steps:
                break
            if run.any_rank(interrupt.flag or (stop_after and step - start_step >= stop_after)):
                save_checkpoint()
                status = "interrupted"
                break

            for micro in range(accumulation):
                batch = move(next(batches), run.device)
                last = micro == accumulation - 1
                if fsdp:  # FSDP2 has no no_sync(): reduce-scatter only after the last micro-batch
                    raw.set_requires_gradient_sync(last)
                sync = model.no_sync() if run.distributed and not fsdp and not last else contextlib.nullcontext()
                with sync:
                    with run.autocast():
                        loss, stats = loss_fn(model, batch)
                    scaler.scale(loss / accumulation).backward()
                if fsdp and buffers:
                    # DDP broadcasts rank 0's buffers (BatchNorm's running statistics) before every
                    # forward; FSDP2 leaves them per rank. Broadcasting after each forward gives every
                    # later forward, training or evaluation, rank 0's, as under DDP.
                    for buffer in buffers:
                        dist.broadcast(buffer, src=0)
                for name, value in {"loss": loss, **stats}.items():
                    value = value.detach().float() / accumulation
                    running[name] = running[name] + value if name in running else value
            if grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(raw.parameters(), grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            running_n += 1
            pbar.update(1)

            if step % log_interval == 0:
                loss_now = loss.item()
                if not finite(loss_now, running["loss"].item()):
                    log.log(stamp({"split": "train", "loss": loss_now}))
                    status = "diverged"
                    break
                now = time.time()
                rate = (step - step_last) / max(now - t_last, 1e-9)
                t_last, step_last = now, step
                postfix = {"loss": f"{loss_now:.4f}", "it/s": f"{rate:.2f}"}
                if flops_per_step:
                    mfu = estimate_mfu(flops_per_step * rate, run.device)
                    if mfu is not None:
                        postfix["mfu"] = f"{100 * mfu:.1f}%"
                pbar.set_postfix(postfix)
    pbar.close()
    if status == "completed":
        save_checkpoint()

    summary = None
    if run.is_main:
        records = RunDir(run.dir).records()
        finals = {}
        for r in records:
            finals[r["split"]] = {k: v for k, v in r.items() if k != "split"}
        wall_time = elapsed()
        summary = {
            "status": status, "experiment": run.cfg["experiment"], "optimizer": run.cfg["optimizer"]["name"],
            "seed": run.seed, "steps": step, "total_steps": total_steps,
            "best": best, "final": finals, "wall_time_s": wall_time,
            "steps_per_s": (step - start_step) / max(time.time() - t_start, 1e-9),
            "hyperparameters": {k: v for k, v in run.cfg["optimizer"].items() if k != "name"},
            "world_size": run.world_size, "device": str(run.device), "precision": run.precision,
            "versions": versions(),
        }
        estimators = [k for r in records if r.get("split") == "val" for k in r if k.startswith("loss_")]
        for key, mode in (("loss", "min"), ("acc", "max"), *((k, "min") for k in dict.fromkeys(estimators))):
            best_rec = best_record(records, "val", key, mode)
            if best_rec is not None:
                summary[f"best_val_{key}"] = best_rec[key]
        if hasattr(evaluate, "estimators"):  # which estimator "loss" is, then the others recorded
            summary["val_estimators"] = list(evaluate.estimators)
        if tokens_per_step:
            summary["tokens_per_s"] = tokens_per_step * summary["steps_per_s"]
        if flops_per_step and step > start_step:
            summary["mfu"] = estimate_mfu(flops_per_step * summary["steps_per_s"], run.device)
            if run.device.type == "cpu":  # against this machine's measured matmul throughput
                from .cpu import matmul_peak_flops

                achieved = flops_per_step * summary["steps_per_s"]
                summary["cpu_flops_per_s"] = achieved
                summary["cpu_flops_utilization"] = achieved / matmul_peak_flops()
        write_summary(run.dir, summary)
        if wandb_run is not None:
            wandb_run.finish({"status": status, **({"best": best["value"]} if best else {})})
        run.print(f"{run.dir}: {status} after {step} steps"
                  + (f", best {sel_split} {sel_key} {best['value']:.4f} at step {best['step']}" if best else ""))
    if run.distributed:
        dist.barrier()
    if status == "interrupted":
        raise SystemExit(EXIT_INTERRUPTED)
    return summary


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

"""Writing run records: ``metrics.jsonl`` (one JSON object per evaluation or log point),
``summary.json`` (status and headline numbers), optional Weights & Biases. Reading them
is ``harness.rundir``'s."""
from __future__ import annotations

import errno
import json
import math
import os
import platform
import secrets
import subprocess
from pathlib import Path
from typing import Optional

from .checkpoint import write_text_atomic
from .config import REPO
from .errors import DISK_FULL, UsageError
from .rundir import RunDir


def _clean(value):
    """JSON-safe: floats that are not finite become strings ("nan", "inf")."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # a 0-d tensor or numpy scalar
        return _clean(value.item())
    return value


class MetricsLog:
    """Appends records to ``metrics.jsonl`` (rank 0 only) and mirrors each one to wandb.

    Each record has an index, its line number in ``metrics.jsonl`` (0, 1, ...). With a
    ``wandb_run`` (a :class:`WandbRun`), record ``i`` becomes wandb history row ``i``; see
    there for the mapping. ``truncate`` (called once at the start of every run, fresh or
    resumed) first sends wandb any kept record it does not have yet, so wandb catches up
    with ``metrics.jsonl`` before the run goes on.
    """

    def __init__(self, run_dir: Path, enabled: bool = True, wandb_run: Optional["WandbRun"] = None):
        self.path = RunDir(run_dir).metrics_file
        self.enabled = enabled
        self.wandb = wandb_run
        self.count = self._lines() if enabled else 0  # records in the file: the next record's index

    def _lines(self) -> int:
        return self.path.read_bytes().count(b"\n") if self.path.exists() else 0

    def offset(self) -> int:
        """Bytes written so far, made durable first (fsync): a checkpoint stores it so a resume
        can drop later records, and must never count records a crash of the node can still lose."""
        if not (self.enabled and self.path.exists()):
            return 0
        with open(self.path, "rb") as f:
            os.fsync(f.fileno())
            return os.fstat(f.fileno()).st_size

    def truncate(self, offset: int) -> None:
        """Drop records written after ``offset`` (they belong to steps that will be redone),
        then send wandb the kept records it lacks."""
        if not self.enabled:
            return
        restart = "delete checkpoint.pt and checkpoint.prev.pt to restart the run"
        if offset == 0:
            self.path.write_text("")
        else:
            size = self.path.stat().st_size if self.path.exists() else None
            if size is None or size < offset:  # the records up to the checkpoint are gone (never pad with NULs)
                raise UsageError(f"{self.path} is " + ("missing" if size is None else f"shorter ({size} bytes)")
                                 + f" but the checkpoint holds {offset} bytes of records: it was damaged; {restart}")
            with open(self.path, "r+b") as f:
                f.truncate(offset)
            try:  # damage inside the kept records would outlive the resume
                RunDir(self.path.parent).records()
            except UsageError as error:
                raise UsageError(f"{error}: it was damaged; {restart}") from None
        self.count = self._lines()
        if self.wandb is not None and self.wandb.logged < self.count:
            for index, record in enumerate(RunDir(self.path.parent).records()):
                if index >= self.wandb.logged:
                    self.wandb.log(index, record)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {k: _clean(v) for k, v in record.items()}
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:  # a torn line it leaves is dropped by the resume (it truncates to the checkpoint)
            if e.errno == errno.ENOSPC:
                raise UsageError(f"{self.path}: {DISK_FULL}") from None
            raise
        index, self.count = self.count, self.count + 1
        if self.wandb is not None:
            self.wandb.log(index, record)


def versions() -> dict:
    import torch

    import optimizers

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "optimizers": optimizers.__version__, "host": platform.node()}
    try:
        out["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                    text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["git"] = None
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
    return out


def write_summary(run_dir: Path, summary: dict) -> None:
    write_text_atomic(RunDir(run_dir).summary_file,
                      json.dumps({k: _clean(v) for k, v in summary.items()}, indent=2) + "\n")


WANDB_STATE = "wandb.json"
_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


class WandbRun:
    """The wandb run of one run directory, kept across interruptions and resumes.

    Mapping: the record with index ``i`` in ``metrics.jsonl`` is wandb history row
    ``_step = i``, holding the training step as ``step`` and every other numeric field
    as ``<split>/<field>`` (``train/loss``, ``val/loss``, ``val/loss_fixed``, ``val/time_s``,
    ...; ``nan``/``inf`` as floats), and each ``<split>/*`` is plotted against ``step``
    (``define_metric``). So the ``train`` and ``val`` records of one evaluation are two
    rows with the same ``step``, never merged or overwritten, and ``_step`` grows by one per
    record, as wandb requires, in every process of the run.

    ``<run_dir>/wandb.json`` holds the wandb run id (random, made on the first start; a
    deleted and re-made run directory is a new wandb run) and ``logged``, the number of
    records handed to wandb so far: every later start resumes that id
    (``resume="allow"``), and ``log`` skips a record whose index is below ``logged``. A
    resumed training run truncates ``metrics.jsonl`` to its checkpoint and logs the steps
    after it again: records the interrupted process had already sent (possible only when it
    ended without its final checkpoint, e.g. a crash between an evaluation and the
    checkpoint after it) are not sent twice; wandb keeps the first copy (the same values on
    the CPU, bit for bit; its ``time_s`` is the first attempt's). A process killed outright
    (SIGKILL) may lose what wandb had not yet written itself.

    In offline mode (the default) each process of a run writes its own
    ``<run_dir>/wandb/offline-run-<time>-<id>/`` folder with that id and the next
    ``_step``s, for ``wandb sync``.
    """

    def __init__(self, run, state_path: Path, logged: int):
        self.run, self.state_path, self.logged = run, Path(state_path), logged
        self.splits: set[str] = set()
        run.define_metric("step")

    def log(self, index: int, record: dict) -> None:
        """Send record ``index`` unless wandb already has it."""
        if index < self.logged:
            return
        split = record.get("split", "train")
        if split not in self.splits:
            self.splits.add(split)
            self.run.define_metric(f"{split}/*", step_metric="step")
        row = {"step": int(record["step"])}
        for key, value in record.items():
            value = _NON_FINITE.get(value, value) if isinstance(value, str) else value
            if key not in ("split", "step") and isinstance(value, (int, float)):
                row[f"{split}/{key}"] = value
        self.run.log(row, step=index)
        self.logged = index + 1
        write_text_atomic(self.state_path, json.dumps({"id": self.run.id, "logged": self.logged}) + "\n")

    def finish(self, summary: dict) -> None:
        self.run.summary.update(summary)
        self.run.finish()


def start_wandb(cfg: dict, run_dir: Path) -> Optional[WandbRun]:
    """A :class:`WandbRun` when ``wandb: true`` (offline unless WANDB_MODE says otherwise), else None.

    The id comes from ``<run_dir>/wandb.json`` (made here on the first start), and wandb's
    files go to ``<run_dir>/wandb/``.
    """
    if not cfg.get("wandb"):
        return None
    try:
        import wandb
    except ImportError:
        raise UsageError("wandb=true but wandb is not installed: pip install wandb (or --set wandb=false)") from None
    state_path = Path(run_dir) / WANDB_STATE
    try:
        state = json.loads(state_path.read_text())
        run_id, logged = str(state["id"]), int(state["logged"])
    except FileNotFoundError:
        run_id, logged = secrets.token_hex(8), 0
        write_text_atomic(state_path, json.dumps({"id": run_id, "logged": logged}) + "\n")
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{state_path} is not a wandb state file ({e}); expected "
                         '{"id": ..., "logged": N}: delete it to start a new wandb run') from None
    run = wandb.init(
        project=os.environ.get("WANDB_PROJECT", "nonlinear-damping"),
        group=f"{cfg['experiment']}-{cfg['optimizer']['name']}",
        name=Path(run_dir).name if Path(run_dir).name.startswith("trial") else
        f"{cfg['experiment']}-{cfg['optimizer']['name']}-s{cfg['seed']}",
        id=run_id, resume="allow", dir=str(run_dir), config=cfg,
        mode=os.environ.get("WANDB_MODE", "offline"),
        tags=[t for t in (os.environ.get("SLURM_JOB_ID"),) if t],
    )
    return WandbRun(run, state_path, logged)


"""Writing run records: ``metrics.jsonl`` (one JSON object per evaluation or log point),
``summary.json`` (status and headline numbers), optional Weights & Biases. Reading them
is ``harness.rundir``'s."""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import subprocess
from pathlib import Path

from .checkpoint import write_text_atomic
from .config import REPO
from .errors import UsageError
from .rundir import RunDir


def _clean(value):
    """JSON-safe: floats that are not finite become strings ("nan", "inf")."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # a 0-d tensor or numpy scalar
        return _clean(value.item())
    return value


class MetricsLog:
    """Appends records to ``metrics.jsonl`` (rank 0 only) and mirrors them to wandb."""

    def __init__(self, run_dir: Path, enabled: bool = True, wandb_run=None):
        self.path = RunDir(run_dir).metrics_file
        self.enabled = enabled
        self.wandb = wandb_run

    def offset(self) -> int:
        """Bytes written so far: a checkpoint stores it so a resume can drop later records."""
        return self.path.stat().st_size if self.enabled and self.path.exists() else 0

    def truncate(self, offset: int) -> None:
        """Drop records written after ``offset`` (they belong to steps that will be redone)."""
        if not self.enabled:
            return
        if offset == 0 or not self.path.exists():
            self.path.write_text("")
        else:
            with open(self.path, "r+b") as f:
                f.truncate(offset)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {k: _clean(v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            split = record.get("split", "train")
            self.wandb.log({f"{split}/{k}": v for k, v in record.items()
                            if k not in ("split", "step") and isinstance(v, (int, float))},
                           step=int(record["step"]))


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


def start_wandb(cfg: dict, run_dir: Path):
    """A wandb run when ``wandb: true`` (offline unless WANDB_MODE says otherwise), else None."""
    if not cfg.get("wandb"):
        return None
    try:
        import wandb
    except ImportError:
        raise UsageError("wandb=true but wandb is not installed: pip install wandb (or --set wandb=false)") from None
    run_id = hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]
    return wandb.init(
        project=os.environ.get("WANDB_PROJECT", "nonlinear-damping"),
        group=f"{cfg['experiment']}-{cfg['optimizer']['name']}",
        name=Path(run_dir).name if Path(run_dir).name.startswith("trial") else
        f"{cfg['experiment']}-{cfg['optimizer']['name']}-s{cfg['seed']}",
        id=run_id, resume="allow", dir=str(run_dir), config=cfg,
        mode=os.environ.get("WANDB_MODE", "offline"),
        tags=[t for t in (os.environ.get("SLURM_JOB_ID"),) if t],
    )


"""The run directory: the files of one run and the one way they are read.

A run directory (``runs/<exp>/<optimizer>/seed<S>/``, a sweep's ``trial-<k>/``, ...) holds

- ``config.yaml``: the resolved config;
- ``metrics.jsonl``: one JSON object per line, appended as the run goes;
- ``summary.json``: written (atomically) when the run stops, with its ``status``
  (completed | diverged | interrupted);
- ``checkpoint.pt``: the latest checkpoint (atomic), and ``checkpoint.prev.pt`` the one before
  it (the fallback when the latest cannot be read);
- ``train.log``: the console output, where a sweep or a robustness scan started the run;
- ``.lock``: the writer's lock (``RunDir.lock``), holding its host and pid.

Reading ``metrics.jsonl``. A line that parses as a JSON object is a record (blank lines
are not). The last line may lack its newline: a record still being written, or torn by a
crash or a full disk. Such a line is a record if it parses and is skipped if it does not.
Any other line that does not parse (a complete line, or a torn line followed by more) is
a corrupt file: a one-line ``UsageError`` naming the file and line. Every reader of run
records (the training loop's summary, the report, sweeps, robustness scans, launch's
progress) goes through this module, so all of them agree.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Optional

from .errors import UsageError

if TYPE_CHECKING:
    from .config import TrainConfig

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CHECKPOINT = "checkpoint.pt"
PREVIOUS_CHECKPOINT = "checkpoint.prev.pt"  # checkpoint.previous(CHECKPOINT)
LOG = "train.log"
LOCK = ".lock"
WANDB_STATE = "wandb.json"  # harness.logging's
BEST_MODEL = "best_model.pt"  # harness.image_classification's
# Every file the kit writes into a run directory: the only names whose temp files
# (``.<name>.tmp<pid>``) ``checkpoint.remove_stale_temps`` removes.
RUN_FILES = (CONFIG, METRICS, SUMMARY, CHECKPOINT, PREVIOUS_CHECKPOINT, LOG, LOCK, WANDB_STATE, BEST_MODEL)
_HELD: dict[str, int] = {}  # run directory -> the open lock file this process holds (until it exits)
FINISHED = ("completed", "diverged")  # statuses of a run that is not redone
TAIL_BYTES = 4096  # what ``progress`` reads of metrics.jsonl: a few records


_TEMP = re.compile(r"^\.(?P<name>.+)\.tmp[0-9]+$")


def stale_temp(name: str, files=RUN_FILES) -> bool:
    """True for exactly the temp names the atomic writer makes for one of ``files`` (by default
    a run file: ``.<run file>.tmp<pid>``, ``checkpoint.temp_name``): the only files the kit removes unasked."""
    match = _TEMP.fullmatch(name)  # not match: its $ also matches before a final newline
    return bool(match) and match["name"] in files


def parse_records(data: bytes, where: str = METRICS) -> list[dict]:
    """The records in ``data``, the bytes of a metrics.jsonl, by the rule of this module's docstring."""
    lines = data.decode(errors="replace").split("\n")  # after the last newline: "" or an unfinished line
    out = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            out.append(record)
        elif number < len(lines):  # a complete line that is not a record
            raise UsageError(f"{where}: line {number} is not a JSON record (only an unfinished last line may be)")
    return out


def finite_values(records: Iterable[dict], split: str, key: str) -> list[float]:
    """The finite numeric ``key`` values of the ``split`` records, in order (``"nan"``/``"inf"``
    strings, which the log writes for non-finite numbers, and NaN/inf floats are left out)."""
    return [float(r[key]) for r in records if r.get("split") == split and finite(r.get(key))]


def best_record(records: Iterable[dict], split: str, key: str, mode: str = "min") -> Optional[dict]:
    """The ``split`` record with the lowest (``mode="min"``) or highest (``"max"``) finite ``key``;
    the first such record on ties; None when there is none."""
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be min or max, got {mode!r}")
    rows = [r for r in records if r.get("split") == split and finite(r.get(key))]
    if not rows:
        return None
    return (min if mode == "min" else max)(rows, key=lambda r: float(r[key]))


def finite(value) -> bool:
    """A number (not a bool) that is neither NaN nor infinite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class RunDir:
    """One run directory: its file names and its records. Nothing is read until asked for;
    a missing or unreadable file reads as None (``summary``, ``config``) or no records."""

    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS

    @property
    def summary_file(self) -> Path:
        return self.path / SUMMARY

    @property
    def checkpoint_file(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def log_file(self) -> Path:
        return self.path / LOG

    @property
    def lock_file(self) -> Path:
        return self.path / LOCK

    def lock(self) -> None:
        """Take this directory's exclusive writer lock (creating the directory), held until the
        process exits; a no-op if this process holds it already.

        ``fcntl.flock`` on ``.lock``, which then holds ``<host> <pid>``. The kernel releases the
        lock when its holder dies, so a stale ``.lock`` of a dead process never blocks (it is
        simply taken over). Held by another process: a one-line ``UsageError`` naming it.
        """
        key = str(self.path.resolve())
        if key in _HELD:
            return
        self.check_own()
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 256, 0).decode(errors="replace").split() or ["?", "?"]
            os.close(fd)
            raise UsageError(f"{self.path} is in use by another run (host {holder[0]}, pid {holder[-1]}); "
                             "wait for it to finish or stop it, or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{socket.gethostname()} {os.getpid()}\n".encode(), 0)
        _HELD[key] = fd

    def is_own(self) -> bool:
        """True when the folder is missing, empty, or holds a run of this kit: its ``.lock``, a
        checkpoint, a ``summary.json`` with a ``status``, a ``config.yaml`` naming the
        experiment and optimizer, the ``train.log`` a launcher makes before the run starts, or
        the temp file of a run file (``stale_temp``).
        Files that merely have a run file's name (a ``config.yaml`` or ``metrics.jsonl`` of
        one's own) are not a run."""
        if not self.path.is_dir() or not any(self.path.iterdir()):
            return True
        if any((self.path / name).is_file() for name in (LOCK, CHECKPOINT, PREVIOUS_CHECKPOINT, LOG)):
            return True
        if any(stale_temp(p.name) for p in self.path.iterdir()):  # a kill during the first write
            return True
        if "status" in (self.summary() or {}):
            return True
        try:
            config = self.config() or {}
        except UsageError:
            return False
        return isinstance(config, dict) and "experiment" in config and "name" in (config.get("optimizer") or {})

    def check_own(self, option: str = "--out") -> None:
        """A one-line UsageError, before anything is written, when the folder is not empty and
        holds no run of this kit (``is_own``): the kit writes, replaces and deletes files only
        in folders it made."""
        if not self.is_own():
            names = sorted(p.name + ("/" if p.is_dir() else "") for p in self.path.iterdir())
            shown = ", ".join(names[:4]) + (f", ... ({len(names)} entries)" if len(names) > 4 else "")
            raise UsageError(f"{option} {self.path} is not empty and holds no run ({shown}): "
                             f"the run would write over its files; choose an empty or new folder")

    def summary(self) -> Optional[dict]:
        """``summary.json`` as a dict; None while the run has not stopped (or if it is unreadable)."""
        try:
            summary = json.loads(self.summary_file.read_text())
        except (OSError, ValueError):
            return None
        return summary if isinstance(summary, dict) else None

    def status(self) -> Optional[str]:
        """The summary's ``status`` (completed | diverged | interrupted), or None."""
        return (self.summary() or {}).get("status")

    def finished(self) -> bool:
        """Completed or diverged: a run that is never redone."""
        return self.status() in FINISHED

    def config(self) -> Optional[dict]:
        """``config.yaml`` as a dict, or None when there is none."""
        from .config import read_yaml

        return read_yaml(self.config_file) if self.config_file.is_file() else None

    def records(self) -> list[dict]:
        """Every record of ``metrics.jsonl`` (none when it is missing)."""
        try:
            data = self.metrics_file.read_bytes()
        except OSError:
            return []
        return parse_records(data, str(self.metrics_file))

    def records_after(self, offset: int) -> tuple[list[dict], int]:
        """The records on complete lines from byte ``offset`` on, and the offset after the last
        complete line (where the next look starts: an unfinished line is left for it). A file
        shorter than ``offset`` was truncated by a resumed run: it is read from the start."""
        try:
            data = self.metrics_file.read_bytes()
        except OSError:
            return [], 0
        if len(data) < offset:
            offset = 0
        end = max(offset, data.rfind(b"\n") + 1)
        return parse_records(data[offset:end], str(self.metrics_file)), end

    def last_record(self) -> Optional[dict]:
        """The last record, from the file's last ``TAIL_BYTES`` only (cheap on a long run);
        None when there is none or the tail cannot be read."""
        try:
            with open(self.metrics_file, "rb") as f:
                start = max(0, f.seek(0, 2) - TAIL_BYTES)
                f.seek(start)
                data = f.read()
        except OSError:
            return None
        if start > 0:  # the tail starts inside a line: drop that piece
            data = data[data.find(b"\n") + 1:] if b"\n" in data else b""
        try:
            records = parse_records(data, str(self.metrics_file))
        except UsageError:
            return None
        return records[-1] if records else None

    def best(self, split: str = "val", key: str = "loss", mode: str = "min") -> Optional[dict]:
        """The record of ``split`` with the best finite ``key`` (see ``best_record``), or None."""
        return best_record(self.records(), split, key, mode)

    def progress(self, train: "TrainConfig") -> float:
        """How far the run is, 0 to 1, from its last record: ``epoch / train.epochs`` where both
        exist, else ``step / train.max_iters``; 0 with no readable record."""
        last = self.last_record()
        if last is None:
            return 0.0
        if "epoch" in last and train.epochs:
            return min(1.0, last["epoch"] / train.epochs)
        return min(1.0, last.get("step", 0) / max(1, train.max_iters or 1))

    @staticmethod
    def find(root: Path, unfinished: bool = False) -> list["RunDir"]:
        """Every run directory below ``root`` that holds a ``summary.json``, sorted by path;
        with ``unfinished``, also those with a ``config.yaml`` but no summary yet (a run still
        going, or killed before it could write one)."""
        names = (SUMMARY, CONFIG) if unfinished else (SUMMARY,)
        found = {p.parent for name in names for p in Path(root).rglob(name)}
        return [RunDir(d) for d in sorted(found)]


def check_folder(path: Path, option: str) -> None:
    """A one-line UsageError when ``path`` (a folder this command would create or write into)
    or the nearest of its parents that exists is not a folder."""
    existing = next((p for p in (Path(path), *Path(path).absolute().parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise UsageError(f"{option} {path}: {existing} is a file, not a folder; choose another {option}")

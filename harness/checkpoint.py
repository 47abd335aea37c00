"""Checkpoints: atomic writes and the random-number-generator states of a process."""
from __future__ import annotations

import errno
import os
import random
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import DISK_FULL, UsageError

# torch is imported inside the functions that use it: the report and sweep tools read
# run directories (write_text_atomic) without paying for a torch import.


def previous(path: Path) -> Path:
    """Where ``save_atomic(..., keep_previous=True)`` keeps the file it replaces:
    ``checkpoint.pt`` -> ``checkpoint.prev.pt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def _write_atomic(path: Path, write: Callable, keep_previous: bool = False) -> None:
    """``write(f)`` to ``.<name>.tmp<pid>`` in the same folder, fsync, then rename over
    ``path`` (with ``keep_previous``, the old ``path`` is first hard-linked to ``previous(path)``).

    A kill at any moment leaves the previous file or the new one, never a torn one. On any
    failure the temp file is removed; a full disk is a one-line ``UsageError`` naming the file
    (the last good file is intact: free space and re-run to resume)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and path.exists():
            link = previous(path).with_name(f".{previous(path).name}.tmp{os.getpid()}")
            link.unlink(missing_ok=True)
            os.link(path, link)
            os.replace(link, previous(path))
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise UsageError(f"{path}: {DISK_FULL}") from None
        raise


def save_atomic(obj: Any, path: Path, keep_previous: bool = False) -> None:
    """``torch.save`` atomically (see ``_write_atomic``)."""
    import torch

    _write_atomic(path, lambda f: torch.save(obj, f), keep_previous)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` atomically (see ``_write_atomic``)."""
    _write_atomic(path, lambda f: f.write(text.encode()))


def remove_stale_temps(folder: Path) -> None:
    """Remove the temp files (``.<name>.tmp<pid>``) that killed writers left in ``folder``; call
    it only while holding the folder's lock (``RunDir.lock``), when no other writer is there."""
    for tmp in Path(folder).glob(".*.tmp*"):
        tmp.unlink(missing_ok=True)


def load(path: Path, device="cpu", mmap: bool = False) -> dict:
    """The checkpoint at ``path``; with ``mmap``, its tensors stay on disk until used (cheap
    when only the config or the step is wanted)."""
    import torch

    # Checkpoints hold numpy RNG states and plain containers: not weights-only.
    return torch.load(path, map_location=device, weights_only=False, mmap=mmap)


def load_latest(path: Path, device="cpu", mmap: bool = False) -> dict:
    """``load(path)``; when it cannot be read (truncated, damaged), the previous checkpoint
    (``previous(path)``) with a one-line warning; when neither can, a one-line ``UsageError``."""
    path = Path(path)
    for candidate in (path, previous(path)):
        if not candidate.exists():
            continue
        try:
            saved = load(candidate, device, mmap)
        except Exception:  # torch's zip reader, unpickling: a torn or damaged file
            print(f"warning: {candidate} cannot be read", file=sys.stderr, flush=True)
            continue
        if candidate != path:
            print(f"warning: resuming from the previous checkpoint {candidate}", file=sys.stderr, flush=True)
        return saved
    raise UsageError(f"{path} cannot be read (damaged or truncated) and no readable {previous(path).name}: "
                     f"delete both to restart the run from scratch")


def rng_state() -> dict:
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])

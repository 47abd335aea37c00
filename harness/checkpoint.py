"""Checkpoints: atomic writes and the random-number-generator states of a process."""
from __future__ import annotations

import errno
import os
import random
import re
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np

from .errors import DISK_FULL, UsageError

# torch is imported inside the functions that use it: the report and sweep tools read
# run directories (write_text_atomic) without paying for a torch import.


def previous(path: Path) -> Path:
    """Where ``save_atomic(..., keep_previous=True)`` keeps the file it replaces:
    ``checkpoint.pt`` -> ``checkpoint.prev.pt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def fsync_folder(folder: Path) -> None:
    """fsync ``folder`` itself, so that a rename or new file in it survives a crash of the node
    (the file's own fsync does not make its name durable)."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(path: Path) -> Path:
    """The temp file ``write_atomic`` writes ``path`` through: ``.<name>.tmp<pid>`` beside it
    (the only names ``remove_stale_temps`` ever removes)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def write_atomic(path: Path, write: Union[Callable, bytes], keep_previous: bool = False) -> None:
    """Write ``path`` atomically and durably: ``write(f)`` (or the bytes ``write``) to
    ``temp_name(path)``, fsync it, rename it over ``path`` (with ``keep_previous``, the old
    ``path`` is first hard-linked to ``previous(path)``), then fsync the folder.

    The one atomic writer of the project (run files, reports, study tables, exports, prepared
    data): a kill or a node crash at any moment leaves the previous file or the new one, never
    a torn one. On any failure the temp file is removed; a full disk is a one-line
    ``UsageError`` naming the file (the last good file is intact: free space and re-run)."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:
            if isinstance(write, (bytes, bytearray)):
                f.write(write)
            else:
                write(f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and path.exists():
            link = temp_name(previous(path))
            link.unlink(missing_ok=True)
            os.link(path, link)
            os.replace(link, previous(path))
        os.replace(tmp, path)
        fsync_folder(path.parent)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise UsageError(f"{path}: {DISK_FULL}") from None
        raise


def save_atomic(obj: Any, path: Path, keep_previous: bool = False) -> None:
    """``torch.save`` atomically (see ``write_atomic``). ``obj`` must hold only tensors and
    plain containers (dict, list, tuple, str, int, float, bool, None), so that ``load`` reads
    it back weights-only."""
    import torch

    write_atomic(path, lambda f: torch.save(obj, f), keep_previous)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) atomically (see ``write_atomic``)."""
    write_atomic(path, text.encode())


def remove_stale_temps(folder: Path, files: Optional[tuple[str, ...]] = None) -> None:
    """Remove the temp files that killed writers left in ``folder``: exactly the names
    ``temp_name`` makes for one of ``files`` (by default the run files of a run directory,
    ``rundir.stale_temp``; a prepare step passes its data files), regular files only (never a
    link, a folder or anyone else's file). Call it only when no other writer is there (a run
    directory: while holding its lock, ``RunDir.lock``)."""
    from .rundir import RUN_FILES, stale_temp

    for entry in os.scandir(folder):
        if stale_temp(entry.name, RUN_FILES if files is None else files) and entry.is_file(follow_symlinks=False):
            Path(entry.path).unlink(missing_ok=True)


class UnsafeCheckpoint(UsageError):
    """A checkpoint that holds objects no checkpoint of this kit holds (``load`` refused it)."""


def _legacy_globals() -> list:
    """What checkpoints of earlier versions held besides tensors and plain containers, and
    nothing else: the numpy RNG state's ``uint32`` array (``numpy.ndarray`` rebuilt by
    ``_reconstruct``, its ``numpy.dtype``), under numpy 1's and numpy 2's module names."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    reconstruct = core.multiarray._reconstruct
    allowed = [np.ndarray, np.dtype, (reconstruct, "numpy.core.multiarray._reconstruct"),
               (reconstruct, "numpy._core.multiarray._reconstruct")]
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25 may name the dtype's class
    if dtypes is not None:
        allowed.append(dtypes.UInt32DType)
    return allowed


def load(path: Path, mmap: bool = False) -> dict:
    """The checkpoint at ``path``, read weights-only (``torch.load(weights_only=True)``: tensors
    and plain containers; nothing in the file can run code) onto the CPU; with ``mmap``, its
    tensors stay on disk until used (cheap when only the config or the step is wanted, or when
    each rank takes only its shards). The caller moves what it needs to its device (model and
    optimizer tensors; RNG states stay CPU byte tensors).

    Checkpoints of earlier versions also held the numpy RNG state as a numpy array: exactly
    those types are allowed besides (``_legacy_globals``). A file holding anything else is
    refused with a one-line ``UnsafeCheckpoint`` naming it."""
    import pickle

    import torch

    try:
        with torch.serialization.safe_globals(_legacy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e)) or re.search(r"Unsupported operand \S+", str(e))
        if "Weights only load failed" not in str(e) or not found:
            raise  # a torn or damaged file, not a forbidden object
        what = found[1] if found.re.groups else found[0]
        raise UnsafeCheckpoint(f"{path} holds objects no checkpoint of this kit holds ({what}): refused to load "
                               "it, nothing in it was run; it was written by something else: delete it (and the "
                               "run, if you did not put it there)") from None


def load_latest(path: Path, mmap: bool = False, usable: Optional[Callable[[dict], Optional[str]]] = None) -> dict:
    """``load(path)``; when it cannot be read (truncated, damaged), or ``usable(saved)`` gives a
    reason it cannot be used, the previous checkpoint (``previous(path)``) with a one-line
    warning; when neither will do, a one-line ``UsageError``. A file ``load`` refuses as unsafe
    is never passed over: that is an error at once."""
    path = Path(path)
    reasons = []
    for candidate in (path, previous(path)):
        if not candidate.exists():
            continue
        try:
            saved = load(candidate, mmap)
        except UnsafeCheckpoint:
            raise
        except Exception:  # torch's zip reader: a torn or damaged file
            reason = "cannot be read (damaged or truncated)"
        else:
            reason = usable(saved) if usable is not None else None
            if reason is None:
                for skipped in reasons:  # warnings only when a fallback is taken; else one error line
                    print(f"warning: {skipped}", file=sys.stderr, flush=True)
                if candidate != path:
                    print(f"warning: resuming from the previous checkpoint {candidate}", file=sys.stderr, flush=True)
                return saved
        reasons.append(f"{candidate} {reason}")
    raise UsageError(f"{'; '.join(reasons) or f'{path} is missing'}: no checkpoint to resume from; "
                     f"delete {path.name} and {previous(path).name} to restart the run from scratch")


def rng_state() -> dict:
    """This process's random-number-generator states, as tensors and plain containers (what
    ``load`` reads weights-only): ``python`` (``random.getstate()``: a tuple of ints),
    ``numpy`` (``np.random.get_state(legacy=False)``, its uint32 key as an int64 tensor),
    ``torch`` (the CPU generator's byte tensor) and, when CUDA is available, ``cuda``: the
    byte tensor of this process's own device (``torch.cuda.current_device()``, which the run
    set to its ``cuda:<local rank>``). One device per rank, so a run saved on N GPUs resumes
    on M: each rank restores its own (``set_rng_state``)."""
    import torch

    numpy = np.random.get_state(legacy=False)
    state = {"python": random.getstate(),
             "numpy": {"bit_generator": numpy["bit_generator"], "has_gauss": int(numpy["has_gauss"]),
                       "gauss": float(numpy["gauss"]), "pos": int(numpy["state"]["pos"]),
                       "key": torch.from_numpy(numpy["state"]["key"].astype(np.int64))},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def set_rng_state(state: dict) -> None:
    """Restore ``rng_state()``'s states (or those of checkpoints of earlier versions: the numpy
    state as ``np.random.get_state()``'s tuple, ``cuda`` as a list with one state per visible
    device, of which this process's own device's is restored when there is one)."""
    import torch

    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    numpy = state["numpy"]
    if isinstance(numpy, dict):
        np.random.set_state({"bit_generator": numpy["bit_generator"], "has_gauss": numpy["has_gauss"],
                             "gauss": numpy["gauss"],
                             "state": {"key": numpy["key"].numpy().astype(np.uint32), "pos": numpy["pos"]}})
    else:
        np.random.set_state(numpy)
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda is None or not torch.cuda.is_available():
        return
    device = torch.cuda.current_device()
    if isinstance(cuda, (list, tuple)):  # earlier versions: every visible device's state
        if device >= len(cuda):
            return
        cuda = cuda[device]
    torch.cuda.set_rng_state(cuda.cpu(), device)

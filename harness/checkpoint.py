"""Checkpoints: atomic writes and the random-number-generator states of a process."""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np

# torch is imported inside the functions that use it: the report and sweep tools read
# run directories (write_text_atomic) without paying for a torch import.


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to a temp file in the same folder, fsync, then rename over ``path``.

    A kill at any moment leaves either the previous file or the new one, never a torn one.
    """
    import torch

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def load(path: Path, device="cpu") -> dict:
    import torch

    # Checkpoints hold numpy RNG states and plain containers: not weights-only.
    return torch.load(path, map_location=device, weights_only=False)


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

"""Random-offset batches from nanoGPT-style token files (``train.bin`` / ``val.bin``).

A prepared folder holds each split as one flat array of uint16 token ids and a
marker file written last by its prepare step (``meta.pkl`` for nano), so that
a half-written folder is never read. A batch is ``batch_size`` windows of
``block_size + 1`` consecutive tokens at uniformly random offsets; the inputs
are the first ``block_size`` tokens of each window and the targets the last
``block_size`` (the next token at every position).

The offsets come from a caller-owned ``torch.Generator``: its state is the
data position, so a checkpoint that saves ``generator.get_state()`` resumes
with the same batches.
"""
import pickle
from pathlib import Path

import numpy as np
import torch

from .errors import UsageError

SPLITS = ("train", "val")


class TokenBins:
    """The ``train.bin`` and ``val.bin`` of a prepared folder, read through ``np.memmap``.

    ``prepare_hint`` is the command that prepares ``data_dir``; it is named in
    the error when a bin or the ``marker`` (the file the prepare step writes
    last) is missing.
    """

    def __init__(self, data_dir, prepare_hint, marker="meta.pkl"):
        self.data_dir = Path(data_dir)
        self.prepare_hint = prepare_hint
        self.marker = marker
        for name in (*(f"{split}.bin" for split in SPLITS), marker):
            if not (self.data_dir / name).is_file():
                state = "is not prepared" if not self.data_dir.exists() else f"is unfinished (no {name})"
                raise UsageError(f"dataset {self.data_dir} {state}; run `{prepare_hint}`")
        self._meta = None
        meta_path = self.data_dir / "meta.pkl"
        if meta_path.is_file():
            with open(meta_path, "rb") as f:
                self._meta = pickle.load(f)

    @property
    def vocab_size(self):
        """``meta.pkl``'s vocab_size, or None when the folder has no meta.pkl (e.g. GPT-2 BPE data)."""
        return None if self._meta is None else self._meta["vocab_size"]

    @property
    def meta(self):
        """The contents of ``meta.pkl`` (``vocab_size``, ``itos``, ``stoi``), or None."""
        return self._meta

    def _memmap(self, split):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
        return np.memmap(self.data_dir / f"{split}.bin", dtype=np.uint16, mode="r")

    def num_tokens(self, split):
        """Number of tokens in ``split``."""
        return len(self._memmap(split))

    def get_batch(self, split, batch_size, block_size, generator):
        """``(x, y)``: int64 tensors of shape (batch_size, block_size), ``y`` = ``x`` shifted by one token.

        Offsets ``i`` are drawn uniformly from ``[0, n - block_size)`` with
        ``torch.randint(..., generator=generator)``; then ``x[b] = data[i_b : i_b + T]`` and
        ``y[b] = data[i_b + 1 : i_b + 1 + T]``, as nanoGPT's ``get_batch``.
        """
        # A fresh memmap per batch, as nanoGPT does: a long-lived one keeps every page it
        # touched mapped, and the process's memory grows over a run.
        data = self._memmap(split)
        if len(data) <= block_size:
            raise UsageError(
                f"{self.data_dir / f'{split}.bin'} has {len(data)} tokens, fewer than block_size + 1 = {block_size + 1}; "
                f"lower block_size or prepare more data (`{self.prepare_hint}`)"
            )
        ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
        windows = data[ix.numpy()[:, None] + np.arange(block_size + 1)].astype(np.int64)  # (B, T + 1)
        windows = torch.from_numpy(windows)
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


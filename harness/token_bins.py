"""Random-offset batches from nanoGPT-style token files (``train.bin`` / ``val.bin``).

A prepared folder holds each split as one flat array of uint16 token ids and a
JSON metadata file written last by its prepare step, the folder's marker, so that
a half-written folder is never read. A character-level folder's metadata
(nano's) holds its vocabulary (``vocab_size``, ``itos``, ``stoi``) and what it
was prepared from (``source``, ...). A batch is ``batch_size`` windows of
``block_size + 1`` consecutive tokens at uniformly random offsets; the inputs
are the first ``block_size`` tokens of each window and the targets the last
``block_size`` (the next token at every position).

What an experiment's folders are called and hold is the experiment's to say, once:
its package's ``DATA``, a ``TokenData`` (the prepare command, the metadata file,
an earlier version's files, what the paper's folder holds), by which its
``prepare.py`` writes and which its ``train.py`` passes to ``TokenBins``. This
module imports no experiment.

Nothing in a data folder can run code: the metadata is JSON, and an earlier
version's pickled metadata (nano's ``meta.pkl``, as nanoGPT writes it) is read
through an unpickler that builds plain builtins only (``read_legacy_meta``).

The offsets come from a caller-owned ``torch.Generator``: its state is the
data position, so a checkpoint that saves ``generator.get_state()`` resumes
with the same batches.
"""
import io
import json
import pickle
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch

from .errors import UsageError

SPLITS = ("train", "val")


@dataclass(frozen=True)
class TokenData:
    """What an experiment states about its prepared token folders, once (its package's ``DATA``).

    ``prepare``: the command that prepares the paper's folder, named in every error about a
    folder (missing, unfinished, unreadable, too short, not the paper's data).
    ``meta``: the JSON metadata file its prepare step writes last: the folder's marker (a
    folder without it is unfinished) and its vocabulary and source.
    ``legacy_meta``: the pickled metadata of folders prepared by an earlier version (or by
    nanoGPT), read through ``read_legacy_meta`` when ``meta`` is absent; None: there are none.
    ``legacy_provenance``: the JSON file in which that earlier version recorded the source.
    ``paper``: what the paper config's data folder holds, as metadata keys and values
    (nano's ``{"source": "tinyshakespeare", "vocab_size": 65}``; ``expect_paper_data``).
    ``folders``: the other folders the experiment's configs name, each with the command that
    prepares it (``data/nano-smoke``: the packaged plays), named instead of ``prepare`` when one
    of them is missing.
    """

    prepare: str
    meta: str
    legacy_meta: Optional[str] = None
    legacy_provenance: Optional[str] = None
    paper: Mapping[str, Any] = field(default_factory=dict)
    folders: Mapping[str, str] = field(default_factory=dict)

    def prepare_for(self, folder) -> str:
        """The command that prepares ``folder``: its own where the configs name it, else ``prepare``."""
        folder = Path(folder)
        for known, command in self.folders.items():
            if folder == Path(known) or folder.resolve() == Path(known).resolve():
                return command
        return self.prepare


# What an old meta.pkl may build: plain builtins. Protocol 2+ pickles of dicts, lists,
# tuples, str, int, float and bool need no global at all; older protocols name these.
# Python 2's module name, __builtin__, is what protocols 0 to 2 write for either (sets, frozensets).
_PLAIN = {(module, name) for module in ("builtins", "__builtin__")
          for name in ("dict", "list", "str", "int", "float", "tuple", "bool", "set", "frozenset")}


class _Refused(pickle.UnpicklingError):
    """A class the pickle names that is not plain (a torn pickle is an UnpicklingError too)."""


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _PLAIN:
            return super().find_class(module, name)
        raise _Refused(f"{module}.{name}")


def read_legacy_meta(path, prepare_hint) -> dict:
    """An old pickled metadata file (nano's ``meta.pkl``), unpickled with nothing but plain
    builtins (dict, list, tuple, str, int, float, bool): no object of any other type is built
    and no function called. Anything else is a one-line ``UsageError`` saying to prepare the
    folder again with ``prepare_hint`` (which writes the JSON metadata)."""
    path = Path(path)
    try:
        meta = _PlainUnpickler(io.BytesIO(path.read_bytes())).load()
    except _Refused as e:
        raise UsageError(f"{path} holds objects a {path.name} never holds ({e}): refused to read it (nothing in it "
                         f"was run); prepare the folder again with `{prepare_hint} --force`") from None
    except Exception as e:  # torn or not a pickle at all
        raise UsageError(f"{path} cannot be read ({type(e).__name__}); prepare the folder again with "
                         f"`{prepare_hint} --force`") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("vocab_size"), int):
        raise UsageError(f"{path} is not a vocabulary ({{'vocab_size': int, ...}}); prepare the folder again with "
                         f"`{prepare_hint} --force`")
    return meta


class TokenBins:
    """The ``train.bin`` and ``val.bin`` of a folder prepared as ``data`` says, read through ``np.memmap``.

    ``data`` (a ``TokenData``, the experiment's ``DATA``) names the metadata file (the
    marker: without it, or without a bin, the folder is refused in one line naming
    ``data.prepare``) and, where the experiment had them, an earlier version's files: a
    folder with ``data.legacy_meta`` in place of ``data.meta`` is read too
    (``read_legacy_meta``), its source from ``data.legacy_provenance``.
    """

    def __init__(self, data_dir, data: TokenData):
        self.data_dir = Path(data_dir)
        self.data = data
        hint = data.prepare_for(self.data_dir)
        legacy = (data.legacy_meta is not None and not (self.data_dir / data.meta).is_file()
                  and (self.data_dir / data.legacy_meta).is_file())
        for name in (*(f"{split}.bin" for split in SPLITS), data.legacy_meta if legacy else data.meta):
            if not (self.data_dir / name).is_file():
                state = "is not prepared" if not self.data_dir.exists() else f"is unfinished (no {name})"
                raise UsageError(f"dataset {self.data_dir} {state}; run `{hint}`")
        if legacy:
            self._meta = read_legacy_meta(self.data_dir / data.legacy_meta, hint)
            recorded = {}
            if data.legacy_provenance and (self.data_dir / data.legacy_provenance).is_file():
                try:
                    recorded = json.loads((self.data_dir / data.legacy_provenance).read_text())
                except (OSError, ValueError):
                    pass  # unreadable: the folder is taken on its vocabulary, as one without it
            if isinstance(recorded, dict) and "source" in recorded:
                self._meta = {**self._meta, "source": recorded["source"]}
            return
        meta = self.data_dir / data.meta
        try:
            self._meta = json.loads(meta.read_text())
        except (OSError, ValueError) as e:
            raise UsageError(f"{meta} is not JSON ({type(e).__name__}); prepare the folder "
                             f"again with `{hint} --force`") from None
        if not isinstance(self._meta, dict):
            raise UsageError(f"{meta} is not a JSON object; prepare the folder again with "
                             f"`{hint} --force`")

    @property
    def vocab_size(self):
        """The character vocabulary's size (a folder whose metadata has ``itos``: nano's), or
        None (e.g. GPT-2 BPE bins, whose model pads the vocabulary itself)."""
        if "itos" not in self._meta:
            return None
        return int(self._meta["vocab_size"])

    @property
    def meta(self):
        """The folder's metadata (``data.meta``, or an earlier version's ``data.legacy_meta``)."""
        return self._meta

    def check_source(self, expected: dict, strict: bool, override: str) -> None:
        """Say in one line when the folder is not what a config expects: ``expected`` maps
        metadata keys (``source``, ``vocab_size``) to the values the experiment's paper config
        names. ``strict`` (training under the paper's config): a ``UsageError`` naming
        ``override`` (how to train on it anyway); else a warning. A folder that does not record
        its source (prepared by an earlier version or by nanoGPT) is taken on its vocabulary,
        with a note."""
        meta = self._meta
        differ = [f"{key} {meta[key]!r}, not {value!r}" for key, value in expected.items()
                  if key in meta and meta[key] != value]
        if differ:
            message = (f"{self.data_dir} holds data prepared with {', '.join(differ)} (the paper's); "
                       f"prepare the paper's data with `{self.data.prepare}`")
            if strict:
                raise UsageError(f"{message}, or pass {override} to train on it anyway")
            print(f"warning: {message}", file=sys.stderr, flush=True)
        elif "source" in expected and "source" not in meta:
            print(f"note: {self.data_dir} does not record its source (prepared by an earlier version); "
                  f"taking it as {expected['source']!r}, its vocabulary matches", file=sys.stderr, flush=True)

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
                f"lower block_size or prepare more data (`{self.data.prepare}`)"
            )
        ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
        windows = data[ix.numpy()[:, None] + np.arange(block_size + 1)].astype(np.int64)  # (B, T + 1)
        windows = torch.from_numpy(windows)
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


CHECK_SOURCE = "data.check_source"  # the config key that lets a run train on other data in the paper's folder


def expect_paper_data(bins, run) -> None:
    """Refuse (one line) to train under the paper's config on data that is not the paper's.

    The experiment states what its paper config's data folder holds (``bins.data.paper``,
    e.g. nano's ``{"source": "tinyshakespeare", "vocab_size": 65}``); a run whose
    ``data.dir`` is that folder (``data.dir`` of the experiment's ``paper.yaml``) checks
    the folder's recorded source and vocabulary against it (``TokenBins.check_source``): a
    ``UsageError``, or with ``--set data.check_source=false`` a warning. Other folders are
    the user's choice."""
    from .config import read_yaml

    expected = bins.data.paper
    if not expected:
        return
    paper_dir = (read_yaml(run.experiment.configs / "paper.yaml").get("data") or {}).get("dir")
    if paper_dir is None or Path(paper_dir).resolve() != bins.data_dir.resolve():
        return
    strict = bool(run.cfg["data"].get("check_source", True))
    bins.check_source(expected, strict=strict, override=f"--set {CHECK_SOURCE}=false")

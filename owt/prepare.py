"""OpenWebText -> GPT-2 token bins, as nanoGPT's ``data/openwebtext/prepare.py``.

    python -m owt.prepare                                  # Skylion007/openwebtext from the hub
    python -m owt.prepare --data-files 'corpus/*.txt'      # local text files, one document each
    python -m owt.prepare --out data/owt --num-proc 8 [--force]

Steps (nanoGPT's, with its constants):

1. documents: the hub dataset (8,013,769 documents), or local files: ``.txt``
   files hold one document each (read as UTF-8, universal newlines);
   ``.parquet``/``.json``/``.jsonl`` files hold one document per row in a
   ``text`` column (the hub's parquet export, for example);
2. split: ``train_test_split(test_size=0.0005, seed=2357, shuffle=True)``, the
   test part renamed ``val``; a split takes ``ceil(0.0005 * n)`` documents, so
   any corpus of two or more documents has at least one validation document;
3. tokens: ``tiktoken`` GPT-2 BPE, ``encode_ordinary`` (special-token text is
   ordinary text) followed by ``<|endoftext|>`` = 50256 after every document,
   in ``num_proc`` processes;
4. bins: ``train.bin`` and ``val.bin``, each the flat concatenation of its
   split's token ids as ``uint16`` (raw, no header; read with
   ``np.memmap(path, dtype=np.uint16, mode="r")``), written in
   ``min(1024, n_documents)`` contiguous shards so the ~9B-token corpus
   (train ~17 GB, val ~8.5 MB) never sits in memory.

Finish: each bin and then the marker ``meta.json`` (``owt.DATA.meta``) are
written with ``harness.checkpoint``'s atomic writer (a temp file renamed when
complete, fsynced with its folder; a bin's temp file left by a killed prepare
is removed by the next, ``remove_stale_temps``); the marker comes last and
records the source and the token counts, so a directory without a valid marker
is unfinished and readers must refuse it (``read_meta``). Re-running with a finished directory
does nothing unless ``--force``; re-running an unfinished one starts the bins
again (the tokenized dataset is reused from the Hugging Face datasets cache).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from harness.checkpoint import remove_stale_temps, write_atomic, write_text_atomic
from harness.errors import UsageError, command
from harness.gpt2_tokenizer import EOT_TOKEN, VOCAB_SIZE, tiktoken_gpt2
from owt import DATA

__all__ = [
    "DATASET",
    "SEED",
    "VAL_FRACTION",
    "load_documents",
    "main",
    "prepare",
    "read_meta",
    "split_documents",
    "tokenize_splits",
    "write_bin",
]

DATASET = "Skylion007/openwebtext"
VAL_FRACTION = 0.0005  # nanoGPT's test_size
SEED = 2357  # nanoGPT's split seed
TOTAL_BATCHES = 1024  # nanoGPT's number of write shards per bin
DTYPE = np.uint16  # GPT-2 ids are < 2**16
SPLITS = ("train", "val")
_TEXT_BUILDERS = {".txt": "text", ".parquet": "parquet", ".json": "json", ".jsonl": "json"}


def _why(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__


def default_num_proc() -> int:
    """nanoGPT uses 8 workers; never more than the CPUs we have."""
    return max(1, min(8, os.cpu_count() or 1))


def _as_list(data_files) -> list:
    return [data_files] if isinstance(data_files, (str, os.PathLike)) else list(data_files)


def _expand(data_files) -> list[str]:
    files: list[str] = []
    for pattern in _as_list(data_files):
        matches = sorted(glob.glob(os.path.expanduser(str(pattern)), recursive=True))
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise UsageError(f"--data-files {pattern!r} matches no file; give text files or globs, e.g. 'corpus/*.txt'")
        files.extend(m for m in matches if m not in files)
    return files


def load_documents(data_files=None, num_proc: int | None = None, cache_dir=None):
    """The corpus as a ``datasets.Dataset`` with one ``text`` row per document.

    ``data_files=None`` loads ``Skylion007/openwebtext`` from the Hugging Face hub;
    otherwise a glob or list of globs of local files (see the module docstring).
    ``cache_dir`` is the Hugging Face datasets cache (default: datasets' own).
    """
    import datasets

    num_proc = num_proc if num_proc and num_proc > 1 else None
    if data_files is None:
        try:
            dataset = datasets.load_dataset(DATASET, num_proc=num_proc, cache_dir=cache_dir)
        except Exception as e:
            raise UsageError(
                f"cannot load {DATASET} from the Hugging Face hub ({_why(e)}); "
                "download the corpus and run: python -m owt.prepare --data-files 'DIR/*.txt'"
            ) from e
        documents = dataset["train"]
    else:
        files = _expand(data_files)
        kinds = {_TEXT_BUILDERS.get(Path(f).suffix.lower(), "text") for f in files}
        if len(kinds) > 1:
            raise UsageError(f"--data-files mixes formats {sorted(kinds)}; give only .txt, only .parquet or only .json/.jsonl files")
        builder = kinds.pop()
        options = {"sample_by": "document"} if builder == "text" else {}
        dataset = datasets.load_dataset(
            builder, data_files=files, cache_dir=cache_dir, num_proc=num_proc, **options
        )
        documents = dataset["train"]
        if "text" not in documents.column_names:
            raise UsageError(f"--data-files rows need a 'text' column; found columns {documents.column_names}")
        documents = documents.select_columns(["text"])
    if len(documents) < 2:
        raise UsageError(f"the corpus has {len(documents)} document(s); a train/val split needs at least 2")
    return documents


def split_documents(documents):
    """nanoGPT's split: ``DatasetDict(train=..., val=...)`` with ``ceil(0.0005 n)`` val documents."""
    split = documents.train_test_split(test_size=VAL_FRACTION, seed=SEED, shuffle=True)
    split["val"] = split.pop("test")
    return split


def _tokenize(example: dict) -> dict:
    # Looks the encoding up in the worker (lru-cached per process) rather than
    # capturing it, so `map` pickles and fingerprints only this function's name.
    enc = tiktoken_gpt2()
    ids = enc.encode_ordinary(example["text"])  # ignores special tokens in the text
    ids.append(enc.eot_token)  # 50256 ends every document
    return {"ids": ids, "len": len(ids)}


def tokenize_splits(splits, num_proc: int | None = None):
    """Adds ``ids`` (GPT-2 ids + end-of-text) and ``len`` per document, in ``num_proc`` processes."""
    import datasets

    tiktoken_gpt2()  # build once in the parent so forked workers inherit it
    tokenized = {}
    for name, split in splits.items():
        procs = min(num_proc or 1, len(split))  # datasets refuses more workers than rows
        tokenized[name] = split.map(
            _tokenize,
            remove_columns=["text"],
            desc=f"tokenizing {name}",
            num_proc=procs if procs > 1 else None,
        )
    return datasets.DatasetDict(tokenized)


def write_bin(tokenized, path, total_batches: int = TOTAL_BATCHES) -> int:
    """Concatenate a tokenized split's ``ids`` into ``path`` as flat uint16; returns the token count.

    Written one contiguous shard at a time (nanoGPT's shards), so memory holds one shard,
    not the split, through the harness's atomic writer (``harness.checkpoint.write_atomic``):
    ``path`` appears only when every shard is in, and is never a half-written bin.
    """
    path = Path(path)
    n_tokens = int(np.sum(tokenized.with_format("numpy")["len"], dtype=np.uint64))
    total_batches = max(1, min(total_batches, len(tokenized)))

    def write(f):
        written = 0
        for batch_idx in tqdm(range(total_batches), desc=f"writing {path}"):
            batch = tokenized.shard(num_shards=total_batches, index=batch_idx, contiguous=True)
            ids = np.concatenate(batch.with_format("numpy")["ids"]).astype(DTYPE)
            f.write(ids.tobytes())
            written += len(ids)
        if written != n_tokens:
            raise RuntimeError(f"wrote {written} tokens to {path}, expected {n_tokens}")

    write_atomic(path, write)
    return n_tokens


def read_meta(out_dir) -> dict | None:
    """The marker (``DATA.meta``) of a finished prepare in ``out_dir``, or None if it is not finished.

    Finished means: the marker parses and every bin it names exists with exactly
    ``2 * tokens`` bytes. A missing marker, a temp-file leftover or a bin of the
    wrong size (interrupted, truncated or replaced) all read as unfinished.
    """
    out_dir = Path(out_dir)
    try:
        meta = json.loads((out_dir / DATA.meta).read_text())
        for split in SPLITS:
            size = (out_dir / meta[f"{split}_file"]).stat().st_size
            if size != meta[f"{split}_tokens"] * np.dtype(meta["dtype"]).itemsize:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return meta


def prepare(
    out_dir="data/owt",
    data_files=None,
    num_proc: int | None = None,
    force: bool = False,
    cache_dir=None,
) -> Path:
    """Write ``train.bin``, ``val.bin`` and the marker ``meta.json`` into ``out_dir``; returns ``out_dir``.

    A no-op when ``out_dir`` already holds a finished prepare, unless ``force``.
    ``num_proc`` defaults to ``min(8, cpu_count)``; ``cache_dir`` is the Hugging
    Face datasets cache (default: datasets' own).
    """
    out_dir = Path(out_dir)
    if read_meta(out_dir) is not None and not force:
        print(f"{out_dir} is already prepared ({DATA.meta} present); use --force to redo it")
        return out_dir
    num_proc = default_num_proc() if num_proc is None else int(num_proc)
    if num_proc < 1:
        raise UsageError(f"--num-proc must be >= 1, got {num_proc}")
    enc = tiktoken_gpt2()
    if enc.n_vocab != VOCAB_SIZE or enc.eot_token != EOT_TOKEN or enc.max_token_value >= 2**16:
        raise RuntimeError(f"unexpected GPT-2 encoding: n_vocab {enc.n_vocab}, eot {enc.eot_token}")

    documents = load_documents(data_files, num_proc=num_proc, cache_dir=cache_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Retract the old marker before touching any bin: from here until the new
    # marker lands, the directory reads as unfinished.
    (out_dir / DATA.meta).unlink(missing_ok=True)
    remove_stale_temps(out_dir, tuple(f"{split}.bin" for split in SPLITS))  # a killed prepare's (~17 GB)
    tokenized = tokenize_splits(split_documents(documents), num_proc=num_proc)

    meta = {
        "format": "flat uint16 GPT-2 token ids, <|endoftext|> after every document (nanoGPT bins)",
        "dtype": "uint16",
        "tokenizer": "gpt2",
        "vocab_size": VOCAB_SIZE,
        "eot_token": EOT_TOKEN,
        "source": DATASET if data_files is None else [str(p) for p in _as_list(data_files)],
        "documents": len(documents),
        "val_fraction": VAL_FRACTION,
        "seed": SEED,
    }
    for split in SPLITS:
        meta[f"{split}_file"] = f"{split}.bin"
        meta[f"{split}_documents"] = len(tokenized[split])
        meta[f"{split}_tokens"] = write_bin(tokenized[split], out_dir / f"{split}.bin")
    write_text_atomic(out_dir / DATA.meta, json.dumps(meta, indent=2) + "\n")
    print(f"wrote {out_dir}: train {meta['train_tokens']:,} tokens, val {meta['val_tokens']:,} tokens")
    return out_dir


@command
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m owt.prepare", description=__doc__.splitlines()[0])
    parser.add_argument("--data-files", nargs="+", default=None, metavar="GLOB",
                        help=f"local corpus files (.txt one document each, or .parquet/.json/.jsonl with a "
                             f"'text' column); default: {DATASET} from the Hugging Face hub")
    parser.add_argument("--out", default="data/owt", help="output directory (default: data/owt)")
    parser.add_argument("--num-proc", type=int, default=None,
                        help=f"tokenizer processes (default: min(8, CPUs) = {default_num_proc()})")
    parser.add_argument("--cache-dir", default=None, help="Hugging Face datasets cache directory")
    parser.add_argument("--force", action="store_true", help="redo a finished output directory")
    args = parser.parse_args(argv)
    prepare(args.out, data_files=args.data_files, num_proc=args.num_proc, force=args.force,
            cache_dir=args.cache_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())

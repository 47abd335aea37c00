"""WikiText-103 (raw) as blocks of GPT-2 tokens for fine-tuning GPT-2 small.

    python -m gpt2.data                          # download, tokenize, cache to data/gpt2
    python -m gpt2.data --raw DIR                # offline: DIR holds wiki.train.raw, wiki.valid.raw

Source: ``datasets.load_dataset("Salesforce/wikitext", "wikitext-103-raw-v1")``
(the hub's parquet copy; the old script name ``"wikitext"`` only redirects
there, and datasets >= 4 no longer runs loading scripts), splits ``train`` and
``validation``. Each row is one line of the original files: ``""`` for a blank
line, otherwise the line with its ``"\\n"``. ``raw=DIR`` reads the same lines
from the files of ``wikitext-103-raw-v1.zip`` with the same convention.

Documents: rows are grouped into Wikipedia articles, each starting at a
top-level heading row `` = Title = ``; an article's text is its rows joined.
Tokens: GPT-2 tokenizer (``hf_gpt2_tokenizer``) on each article, followed by
``<|endoftext|>`` (50256), all articles of a split concatenated in order; then
cut into ``block_size`` blocks, dropping the final partial block (the
``group_texts`` of transformers' ``run_clm.py``, with end-of-text between
articles as in GPT-2 pretraining).

Cache: the token stream of each split is saved once (``train.npy``,
``val.npy``, uint16 for GPT-2) and the marker ``meta.json`` last, each with the
harness's atomic writer (``harness.checkpoint.write_atomic``: a temp file renamed
when complete; one a killed build left is removed by the next), so an
interrupted first run is redone and never half-read. Later calls (any
``block_size``) memory-map the cache and need neither network nor tokenizer.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from harness.checkpoint import remove_stale_temps, write_atomic, write_text_atomic
from harness.errors import UsageError, command
from harness.gpt2_tokenizer import hf_gpt2_tokenizer

__all__ = ["DATASET", "CONFIG", "MARKER", "LMBlocks", "articles", "lm_splits", "main", "read_meta", "tokenize_stream"]

DATASET, CONFIG = "Salesforce/wikitext", "wikitext-103-raw-v1"
MARKER = "meta.json"
SPLITS = {"train": "train", "val": "validation"}  # our name -> the hub's split name
RAW_FILES = {"train": "wiki.train.raw", "val": "wiki.valid.raw"}  # inside wikitext-103-raw-v1.zip
_ARTICLE_START = re.compile(r"^ = [^=].* = \n?$")  # " = Title = ", not " = = Section = = "


def _why(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__


class LMBlocks(torch.utils.data.Dataset):
    """Consecutive ``block_size`` blocks of a token stream.

    ``blocks`` is the (N, block_size) numpy view (no copy; memory-mapped from the
    cache), N = len(tokens) // block_size. Item i is
    ``dict(input_ids=LongTensor(block_size), labels=LongTensor(block_size))``
    with labels equal to input_ids: ``GPT2LMHeadModel`` shifts them itself.
    """

    def __init__(self, tokens: np.ndarray, block_size: int):
        n = len(tokens) // block_size
        self.block_size = block_size
        self.blocks = tokens[: n * block_size].reshape(n, block_size)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict:
        ids = torch.from_numpy(self.blocks[i].astype(np.int64))
        return {"input_ids": ids, "labels": ids.clone()}


def articles(rows) -> list[str]:
    """WikiText rows -> article texts, split before each top-level heading row."""
    docs: list[list[str]] = []
    for row in rows:
        if _ARTICLE_START.match(row) or not docs:
            docs.append([])
        docs[-1].append(row)
    return ["".join(doc) for doc in docs if any(r.strip() for r in doc)]


def tokenize_stream(docs: list[str], tokenizer, desc: str = "tokenizing", batch_size: int = 256) -> np.ndarray:
    """``tokens(doc_0) + [eos] + tokens(doc_1) + [eos] + ...`` as uint16 (int32 if the vocabulary needs it)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UsageError("the tokenizer has no eos_token; give a GPT-2 style tokenizer (eos <|endoftext|>)")
    dtype = np.uint16 if len(tokenizer) <= 2**16 else np.int32
    pieces = []
    for start in tqdm(range(0, len(docs), batch_size), desc=desc, unit="batch"):
        # split_special_tokens: text that spells "<|endoftext|>" is ordinary text (tiktoken's
        # encode_ordinary, as owt); only the eos we append separates documents.
        # verbose=False: documents are longer than model_max_length on purpose (we chunk later).
        batch = tokenizer(docs[start : start + batch_size], add_special_tokens=False,
                          split_special_tokens=True, verbose=False)["input_ids"]
        for ids in batch:
            pieces.append(np.asarray(ids + [eos], dtype=dtype))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)


def _rows(raw, split: str) -> list[str]:
    """The text rows of one split of ``raw`` (None = the hub; a directory; or a mapping)."""
    if raw is None:
        import datasets

        try:
            dataset = datasets.load_dataset(DATASET, CONFIG, split=SPLITS[split])
        except Exception as e:
            raise UsageError(
                f"cannot load {DATASET} ({CONFIG}) from the Hugging Face hub ({_why(e)}); run "
                "`python -m gpt2.data` once online, or `python -m gpt2.data --raw DIR` with DIR holding "
                "wiki.train.raw and wiki.valid.raw"
            ) from e
        return dataset["text"][:]
    if isinstance(raw, (str, os.PathLike)):
        path = Path(raw) / RAW_FILES[split]
        if not path.is_file():
            raise UsageError(f"{path} not found; --raw must be a directory holding {' and '.join(RAW_FILES.values())}")
        with open(path, encoding="utf-8") as f:
            # the hub dataset's convention: a blank line is "", other lines keep their "\n"
            return [line if line.strip() else "" for line in f]
    names = (split, SPLITS[split])
    key = next((k for k in names if k in raw), None)
    if key is None:
        raise UsageError(f"raw has no {split!r} split; give a mapping with keys train and val (or validation)")
    rows = raw[key]
    return list(rows["text"]) if hasattr(rows, "column_names") else list(rows)


def _read_cache(cache_dir: Path, tokenizer) -> dict | None:
    """The cached token streams, or None when missing, unfinished or from another tokenizer."""
    try:
        meta = json.loads((cache_dir / MARKER).read_text())
        streams = {split: np.load(cache_dir / meta[f"{split}_file"], mmap_mode="r") for split in SPLITS}
    except (OSError, ValueError, KeyError):
        return None
    if any(len(streams[s]) != meta[f"{s}_tokens"] for s in SPLITS):
        return None
    if tokenizer is not None and (len(tokenizer), tokenizer.eos_token_id) != (meta["vocab_size"], meta["eos_token_id"]):
        return None
    return streams


def read_meta(cache_dir) -> dict | None:
    """The marker (``meta.json``) of a finished cache in ``cache_dir``, or None when there is none.

    Finished means what ``lm_splits`` requires to reuse it: the marker parses and every
    split's array holds the number of tokens it records. Training reads only finished
    caches and never builds one (``python -m gpt2.data`` does).
    """
    cache_dir = Path(cache_dir)
    if _read_cache(cache_dir, None) is None:
        return None
    return json.loads((cache_dir / MARKER).read_text())


def _build_cache(cache_dir: Path, raw, tokenizer) -> dict:
    docs = {split: articles(_rows(raw, split)) for split in SPLITS}  # fail on input before writing
    cache_dir.mkdir(parents=True, exist_ok=True)
    (cache_dir / MARKER).unlink(missing_ok=True)  # the directory reads as unfinished from here on
    remove_stale_temps(cache_dir, tuple(f"{split}.npy" for split in SPLITS))  # a killed build's
    meta = {
        "source": f"{DATASET} {CONFIG}" if raw is None else (str(raw) if isinstance(raw, (str, os.PathLike)) else "in-memory"),
        "tokenizer": getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "documents": "WikiText articles (split at ' = Title = ' rows), eos after each, concatenated in order",
    }
    for split, split_docs in docs.items():
        tokens = tokenize_stream(split_docs, tokenizer, desc=f"tokenizing {split}")
        # np.save to a file object (write_atomic's temp file) adds no ".npy" to the name
        write_atomic(cache_dir / f"{split}.npy", lambda f: np.save(f, tokens))
        meta.update({f"{split}_file": f"{split}.npy", f"{split}_documents": len(split_docs),
                     f"{split}_tokens": int(len(tokens)), "dtype": str(tokens.dtype)})
    write_text_atomic(cache_dir / MARKER, json.dumps(meta, indent=2) + "\n")
    return _read_cache(cache_dir, None)


def lm_splits(cache_dir="data/gpt2", block_size: int = 1024, raw=None, tokenizer=None, force: bool = False) -> dict:
    """``dict(train=LMBlocks, val=LMBlocks)``: WikiText-103 in ``block_size``-token blocks.

    The first call tokenizes ``raw`` (None: the hub dataset; a directory with
    ``wiki.train.raw``/``wiki.valid.raw``; or a mapping with ``train`` and
    ``val``/``validation`` rows, lists of str or datasets with a ``text`` column)
    with ``tokenizer`` (default ``hf_gpt2_tokenizer()``) and caches the token
    streams in ``cache_dir``; later calls reuse the cache whatever ``raw`` is,
    unless ``force`` or the given tokenizer differs (vocab size or eos id).
    """
    if not isinstance(block_size, int) or block_size < 1:
        raise UsageError(f"block_size must be a positive integer, got {block_size!r}")
    if isinstance(tokenizer, str):
        tokenizer = hf_gpt2_tokenizer(tokenizer)
    cache_dir = Path(cache_dir)
    streams = None if force else _read_cache(cache_dir, tokenizer)
    if streams is None:
        streams = _build_cache(cache_dir, raw, tokenizer if tokenizer is not None else hf_gpt2_tokenizer())
    splits = {split: LMBlocks(tokens, block_size) for split, tokens in streams.items()}
    for split, blocks in splits.items():
        if len(blocks) == 0:
            raise UsageError(
                f"the {split} split has {len(streams[split])} tokens, fewer than block_size {block_size}; "
                "use a smaller block_size or more data"
            )
    return splits


@command
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpt2.data", description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default="data/gpt2", help="where the token cache goes (default: data/gpt2)")
    parser.add_argument("--raw", default=None, metavar="DIR",
                        help=f"offline source: a directory holding {' and '.join(RAW_FILES.values())}")
    parser.add_argument("--tokenizer", default="gpt2", help="tokenizer name or directory (default: gpt2)")
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--force", action="store_true", help="rebuild the cache")
    args = parser.parse_args(argv)
    splits = lm_splits(args.cache_dir, args.block_size, raw=args.raw, tokenizer=args.tokenizer, force=args.force)
    for split, blocks in splits.items():
        print(f"{split}: {len(blocks):,} blocks of {args.block_size} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())

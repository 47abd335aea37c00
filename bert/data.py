"""GLUE SST-2 and QNLI for the bert experiment: load, split 70/15/15, tokenize, cache, collate.

The pipeline follows the released code except for padding:

1. ``load_raw``: GLUE's train and validation splits merged into one labelled pool
   (GLUE's test split has no labels: every label there is -1).
2. ``split``: 70/15/15 by sklearn's ``train_test_split(random_state=42)`` applied
   twice, as the release's ``sst2/dataloader.py`` and ``qnli/dataloader.py`` (lines
   38-39) do: 70/30 first, then the 30 halved, the first half being the test split
   and the second the validation split (``test_df, valid_df = ...``).
3. ``tokenize``: the distilbert-base-uncased WordPiece tokenizer; single sentences
   for SST-2, (question, sentence) pairs for QNLI; truncated to 512 tokens and NOT
   padded.
4. ``collate_fn``: pads each batch to its own longest sequence. The release padded
   each whole split to that split's longest sequence; the loss is the same, since
   padded positions are masked out of attention and the classifier reads only the
   [CLS] position, but short batches cost far less.

``glue_splits`` runs 1-3 once and caches the tokenized splits under
``data/bert/<key>/`` (``datasets`` Arrow files); later calls read the cache and
need neither the network nor the tokenizer's time.
"""
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import datasets
import numpy as np
from sklearn.model_selection import train_test_split
from transformers import AutoTokenizer, DataCollatorWithPadding

from bert import TASKS  # the package states its tasks, in the paper's order
from harness.errors import UsageError

# The GLUE columns holding text, in the order they are fed to the tokenizer.
TEXT_COLUMNS = {"sst2": ("sentence",), "qnli": ("question", "sentence")}
GLUE_NAME = "nyu-mll/glue"  # the Hub id of GLUE (the old alias "glue" redirects here)
DEFAULT_TOKENIZER = "distilbert-base-uncased"
SPLIT_SEED = 42
# In the cache key: caches written before the validation and test halves followed the
# release (key without it) held them swapped, and are not read.
SPLIT_LAYOUT = "testfirst"
SPLITS = ("train", "val", "test")
MODEL_COLUMNS = ("input_ids", "attention_mask", "labels")


def check_task(task):
    """Return ``task`` if it is one of ``TASKS``, else raise UsageError."""
    if task not in TASKS:
        raise UsageError(f"unknown bert task {task!r}; valid tasks: {', '.join(TASKS)}")
    return task


def load_raw(task, raw=None):
    """The labelled pool of a GLUE task: its train and validation splits merged.

    ``raw`` replaces the download: ``None`` loads GLUE from the Hugging Face Hub (or
    the local ``datasets`` cache); a ``datasets.Dataset`` is used as is; a
    ``DatasetDict`` has its ``train`` and ``validation`` splits merged; a path is a
    directory written by ``save_to_disk`` holding either of those. The result has
    GLUE's columns (sst2: sentence, label, idx; qnli: question, sentence, label, idx)
    with labels in {0, 1}. ``idx`` restarts at 0 in each GLUE split, so it is not
    unique in the merged pool.
    """
    check_task(task)
    if raw is None:
        try:
            raw = datasets.load_dataset(GLUE_NAME, task)
        except OSError as e:  # ConnectionError, missing cache, Hub errors are all OSErrors
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UsageError(
                f"could not load the dataset {GLUE_NAME}/{task} ({reason}); it needs network "
                f"access once to fill the local Hugging Face cache, or pass raw= a directory "
                f"written by save_to_disk"
            ) from e
    elif isinstance(raw, (str, os.PathLike)):
        path = Path(raw)
        if not path.is_dir():
            raise UsageError(
                f"raw {task} data {str(path)!r} is not a directory; give one written by "
                f"Dataset.save_to_disk or DatasetDict.save_to_disk"
            )
        raw = datasets.load_from_disk(str(path))
    if isinstance(raw, datasets.DatasetDict):
        parts = [raw[name] for name in ("train", "validation") if name in raw]
        if not parts:
            raise UsageError(
                f"raw {task} data has splits {sorted(raw)}; it needs 'train' and/or 'validation'"
            )
        raw = datasets.concatenate_datasets(parts)
    if not isinstance(raw, datasets.Dataset):
        raise UsageError(
            f"raw {task} data is a {type(raw).__name__}; give None, a datasets.Dataset, "
            f"a DatasetDict or a save_to_disk directory"
        )
    required = (*TEXT_COLUMNS[task], "label")
    missing = [c for c in required if c not in raw.column_names]
    if missing:
        raise UsageError(
            f"raw {task} data lacks column(s) {', '.join(missing)}; it has "
            f"{', '.join(raw.column_names)} and needs {', '.join(required)}"
        )
    labels = set(raw.unique("label"))
    if not labels <= {0, 1}:
        raise UsageError(
            f"raw {task} labels must be 0 or 1, found {sorted(labels)} "
            f"(GLUE's test split is unlabelled (-1): use train and validation)"
        )
    return raw


def split(dataset, seed=SPLIT_SEED):
    """Split ``dataset`` 70/15/15 into ``{"train", "val", "test"}``, as the release does.

    The release (``sst2/dataloader.py``, ``qnli/dataloader.py``, lines 38-39)::

        train_df, temp_df = train_test_split(merged_df, test_size=0.3, random_state=42)
        test_df, valid_df = train_test_split(temp_df, test_size=0.5, random_state=42)

    sklearn returns ``(train part, test part)``; each call draws
    ``p = np.random.RandomState(seed).permutation(n)``, its test part being the rows
    ``p[:ceil(test_size n)]`` and its train part the rest, ``p[ceil(test_size n):]``.
    So with ``h`` the ``ceil(0.3 n)`` held-out rows, the test split is the second
    call's *first* output (``floor(h / 2)`` rows) and validation its second
    (``ceil(h / 2)`` rows). The split depends only on the number of rows, their order
    and ``seed``: deterministic, disjoint and complete. Rows keep sklearn's shuffled
    order.
    """
    n = len(dataset)
    if n < 4:
        raise UsageError(f"the 70/15/15 split needs at least 4 rows, the dataset has {n}")
    train_rows, held_out = train_test_split(np.arange(n), test_size=0.3, random_state=seed)
    test_rows, val_rows = train_test_split(held_out, test_size=0.5, random_state=seed)
    return {
        "train": dataset.select(train_rows),
        "val": dataset.select(val_rows),
        "test": dataset.select(test_rows),
    }


def load_tokenizer(name_or_path=DEFAULT_TOKENIZER):
    """``AutoTokenizer.from_pretrained(name_or_path)``: a Hub id or a local directory."""
    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except OSError as e:
        raise UsageError(
            f"could not load the tokenizer {name_or_path!r}; a Hub id needs network access "
            f"once to fill the local Hugging Face cache, a local path must be a directory "
            f"written by save_pretrained"
        ) from e


def tokenize(splits, task, tokenizer, max_length=512):
    """Tokenize each split of ``splits`` for ``task``; no padding (see ``collate_fn``).

    SST-2 encodes ``[CLS] sentence [SEP]``, QNLI ``[CLS] question [SEP] sentence [SEP]``,
    truncated to ``max_length`` tokens (longest text first for pairs). The result has
    exactly the columns the model takes: ``input_ids``, ``attention_mask`` and
    ``labels`` (int, 0/1); rows are python lists of varying length. DistilBERT has
    no segment embeddings, so no ``token_type_ids`` are produced.
    """
    check_task(task)
    columns = TEXT_COLUMNS[task]

    def encode(batch):
        texts = [batch[c] for c in columns]
        return tokenizer(*texts, truncation=True, max_length=max_length,
                         return_token_type_ids=False)

    out = {}
    for name, ds in splits.items():
        ds = ds.map(encode, batched=True, remove_columns=[c for c in ds.column_names if c != "label"],
                    desc=f"tokenize {task} {name}")
        out[name] = ds.rename_column("label", "labels")
    return out


def collate_fn(tokenizer):
    """Batch collator: pads ``input_ids``/``attention_mask`` to the batch's longest row.

    Returns torch tensors ``input_ids`` (B, L) long, ``attention_mask`` (B, L) long
    (0 on padding) and ``labels`` (B,) long, where L is the longest row in the batch.
    """
    return DataCollatorWithPadding(tokenizer, return_tensors="pt")


def tokenizer_id(tokenizer):
    """A short stable name for the tokenizer: its name plus a hash of vocab and casing."""
    name = Path(str(tokenizer.name_or_path or "tokenizer").rstrip("/")).name or "tokenizer"
    name = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
    # The name alone is not enough: a local directory can hold any vocabulary.
    vocab = sorted(tokenizer.get_vocab().items())
    blob = json.dumps([type(tokenizer).__name__, getattr(tokenizer, "do_lower_case", None), vocab])
    return f"{name}-v{len(tokenizer)}-{hashlib.sha1(blob.encode()).hexdigest()[:10]}"


def raw_id(raw, task):
    """``"glue"`` for the Hub's GLUE, else a hash of the task's columns of ``raw``."""
    if raw is None:
        return "glue"
    columns = list((*TEXT_COLUMNS[task], "label"))
    digest = hashlib.sha1()
    for column in columns:
        for value in raw[column]:
            digest.update(repr(value).encode())
            digest.update(b"\0")
    return "raw" + digest.hexdigest()[:12]


def cache_key(task, tokenizer, seed=SPLIT_SEED, max_length=512, raw=None):
    """The cache directory name: task, data source, tokenizer, split seed and layout, max length."""
    return f"{task}-{raw_id(raw, task)}-{tokenizer_id(tokenizer)}-seed{seed}-{SPLIT_LAYOUT}-len{max_length}"


def glue_splits(task, tokenizer, cache_dir="data/bert", raw=None, seed=SPLIT_SEED, max_length=512):
    """Tokenized ``{"train", "val", "test"}`` splits of a GLUE task, cached on disk.

    On the first call: ``load_raw`` -> ``split(seed)`` -> ``tokenize``, saved under
    ``cache_dir/<cache_key>/`` (written to a temporary directory, then renamed, so a
    crash never leaves a half-written cache). Later calls with the same task, data,
    tokenizer, seed and max length read that directory and touch neither the network
    nor the tokenizer. With ``raw=None`` the cache key does not depend on the data,
    so a filled cache stands in for the download.
    """
    check_task(task)
    if raw is not None:
        raw = load_raw(task, raw)  # the cache key hashes the data's content
    cache_dir = Path(cache_dir)
    path = cache_dir / cache_key(task, tokenizer, seed, max_length, raw)
    if not path.is_dir():
        pool = load_raw(task, raw)
        splits = tokenize(split(pool, seed), task, tokenizer, max_length)
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{path.name}.tmp-"))
        datasets.DatasetDict(splits).save_to_disk(str(tmp))
        try:
            os.rename(tmp, path)
        except OSError:
            # Another process (e.g. another rank) finished the same cache first.
            shutil.rmtree(tmp, ignore_errors=True)
            if not path.is_dir():
                raise
    cached = datasets.load_from_disk(str(path))
    return {name: cached[name] for name in SPLITS}

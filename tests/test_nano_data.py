"""nano's data preparation, the shared TokenBins batches and nanoGPT's GPT."""
import json
import math
import pickle
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import nano
import owt
from harness.errors import UsageError
from harness.token_bins import TokenBins, TokenData
from nano import prepare as prep
from nano.model import GPT, GPTConfig

ROOT = Path(__file__).resolve().parents[1]
HINT = "python -m nano.prepare --source packaged"
DATA = replace(nano.DATA, prepare=HINT)  # nano's files, with the offline command in the errors


@pytest.fixture(autouse=True)
def one_torch_thread():
    # The models here are tiny: with several intra-op threads on a busy 2-core machine they
    # spend their time waiting for each other (a forward+backward goes from 0.05 s to 2 s).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def read_split(out, split, meta):
    ids = np.fromfile(out / f"{split}.bin", dtype=np.uint16)
    assert (out / f"{split}.bin").stat().st_size == 2 * len(ids)  # raw uint16, no header
    return "".join(meta["itos"][i] for i in ids.tolist())


def load_meta(out):
    return json.loads((out / "meta.json").read_text())


# --------------------------------------------------------------------------- prepare

def test_markdown_to_text_layout():
    markdown = (
        "# A Play\n\n## ACT I\n\n### SCENE I. A street. Some\n\noverflow of the heading.\n\n"
        "_Enter a company of mutinous Citizens, with staves, clubs, and other\nweapons_\n\n"
        "**First Citizen**  \nBefore we proceed any further, hear me speak.\n\n"
        "**All**  \nSpeak, speak.\n\n"
        "**First Citizen**  \n_\\[Aside]_  \nYou are all resolved\\-- rather to die  \nthan to famish?\n\n"
        "_Shouts within_\n\n"
        "What shouts are these?\n\n"
        "1\\. A lively flourish of Trumpets.  \n2\\. Then, two Judges.\n\n"
        "**MENENIUS**  \n*[Reads.]*  \nWhat work\u2014my countrymen?\n"
    )
    assert prep.markdown_to_text(markdown) == (
        "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
        "All:\nSpeak, speak.\n\n"
        "First Citizen:\nYou are all resolved-- rather to die\nthan to famish?\nWhat shouts are these?\n\n"
        "MENENIUS:\nWhat work--my countrymen?\n"
    )


def test_prepare_packaged_subset_is_nanogpt_format(tmp_path, capsys):
    out = prep.prepare(source="packaged", out_dir=tmp_path / "nano", plays=2)
    assert out == tmp_path / "nano"
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]

    text = prep.packaged_text(2)
    meta = load_meta(out)
    assert set(meta) == {"vocab_size", "itos", "stoi", "source", "plays", "input_file", "chars", "train_tokens",
                         "val_tokens"}
    assert (meta["source"], meta["plays"], meta["chars"]) == ("packaged", 2, len(text))
    chars = sorted(set(text))
    assert meta["vocab_size"] == len(chars) and [meta["itos"][i] for i in range(len(chars))] == chars
    assert all(meta["stoi"][ch] == i for i, ch in enumerate(meta["itos"]))

    train, val = read_split(out, "train", meta), read_split(out, "val", meta)
    assert train + val == text  # decode(encode(text)) round trip
    assert len(train) == int(0.9 * len(text)) and len(val) == len(text) - len(train)
    assert len(text) > 100_000  # two whole plays

    # tiny Shakespeare's layout: "NAME:\nline\n...\n\n", no Markdown left
    blocks = text.rstrip("\n").split("\n\n")
    assert text.startswith("THESEUS:\nNow, fair Hippolyta, our nuptial hour\n")
    assert len(blocks) > 1000
    assert all(b.split("\n")[0].endswith(":") and len(b.split("\n")) >= 2 for b in blocks)
    assert not set("*_#\\[]") & set(text)
    printed = capsys.readouterr().out
    assert f"{len(text):,} characters" in printed and f"vocab size {len(chars)}" in printed
    assert f"train {len(train):,} tokens, val {len(val):,} tokens" in printed


def test_prepare_rerun_is_noop_force_redoes_other_source_refused(tmp_path):
    out = prep.prepare(source="packaged", out_dir=tmp_path / "d", plays=1)
    stamp = (out / "train.bin").stat().st_mtime_ns
    prep.prepare(source="packaged", out_dir=out, plays=1)
    assert (out / "train.bin").stat().st_mtime_ns == stamp
    with pytest.raises(UsageError, match="--force"):
        prep.prepare(source="packaged", out_dir=out, plays=2)
    prep.prepare(source="packaged", out_dir=out, plays=2, force=True)
    assert len(read_split(out, "train", load_meta(out))) == int(0.9 * len(prep.packaged_text(2)))
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_prepare_killed_midway_leaves_folder_unfinished(tmp_path, monkeypatch):
    out = prep.prepare(source="packaged", out_dir=tmp_path / "d", plays=1)
    write = prep.write_atomic

    def crash_on_val(path, fn):
        if path.name == "val.bin":
            raise KeyboardInterrupt
        write(path, fn)

    monkeypatch.setattr(prep, "write_atomic", crash_on_val)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare(source="packaged", out_dir=out, plays=2, force=True)
    assert not (out / "meta.json").exists() and not list(out.glob(".*.tmp*"))
    with pytest.raises(UsageError, match=r"unfinished \(no meta\.json\)"):
        TokenBins(out, DATA)
    monkeypatch.setattr(prep, "write_atomic", write)
    prep.prepare(source="packaged", out_dir=out, plays=2)  # an unfinished folder is prepared again
    assert TokenBins(out, DATA).num_tokens("val") == len(prep.packaged_text(2)) - int(0.9 * len(prep.packaged_text(2)))


def test_prepare_from_input_file(tmp_path, capsys):
    rng = np.random.default_rng(0)
    text = "".join(rng.choice(list("abc XYZ:\n!"), size=1003)) + "\n"
    src = tmp_path / "input.txt"
    src.write_text(text, encoding="utf-8")
    out = prep.prepare(source="tinyshakespeare", out_dir=tmp_path / "nano", input_file=src)
    meta = load_meta(out)
    assert meta["vocab_size"] == 10
    train, val = read_split(out, "train", meta), read_split(out, "val", meta)
    assert (len(train), len(val)) == (903, 101) and train + val == text
    assert "not the canonical tiny Shakespeare" in capsys.readouterr().out


def test_failed_download_names_offline_source(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(UsageError, match="--source packaged") as err:
        prep.prepare(source="tinyshakespeare", out_dir=tmp_path / "nano")
    assert "could not download" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "nano" / "meta.json").exists()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(source="wikipedia"), "unknown --source 'wikipedia'; valid: tinyshakespeare, packaged"),
        (dict(source="packaged", plays=39), r"--plays 39 is out of range; valid: 1\.\.38"),
        (dict(source="packaged", plays=0), r"valid: 1\.\.38"),
        (dict(source="tinyshakespeare", plays=2), "use it with --source packaged"),
        (dict(source="tinyshakespeare", input_file="/nonexistent/input.txt"), "does not exist"),
    ],
)
def test_prepare_rejects_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(UsageError, match=match):
        prep.prepare(out_dir=tmp_path / "nano", **kwargs)
    assert not (tmp_path / "nano").exists()


def test_cli_help_and_error_exit(tmp_path):
    help_run = subprocess.run([sys.executable, "-m", "nano.prepare", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert help_run.returncode == 0 and "--source" in help_run.stdout and "--plays" in help_run.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "nano.prepare", "--plays", "99", "--out", str(tmp_path / "x")],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == ["error: --plays 99 is out of range; valid: 1..38 (the packaged plays)"]


# --------------------------------------------------------------------------- TokenBins

def write_bins(folder, n_train=1000, n_val=200, marker="meta.json"):
    folder.mkdir(parents=True, exist_ok=True)
    np.arange(n_train, dtype=np.uint16).tofile(folder / "train.bin")
    (np.arange(n_val, dtype=np.uint16) + 5000).tofile(folder / "val.bin")
    if marker == "meta.json":
        (folder / "meta.json").write_text(json.dumps({"vocab_size": 6000, "itos": [], "stoi": {}}))
    elif marker == "meta.pkl":  # an earlier version's
        with open(folder / "meta.pkl", "wb") as f:
            pickle.dump({"vocab_size": 6000, "itos": {}, "stoi": {}}, f)
    elif marker:  # BPE bins' metadata (owt's): no character vocabulary
        (folder / marker).write_text(json.dumps({"vocab_size": 50257, "tokenizer": "gpt2"}))
    return folder


def test_token_bins_reject_unfinished_or_missing_folder(tmp_path):
    write_bins(tmp_path / "d", marker=None)  # bins without meta.json: a prepare that did not finish
    with pytest.raises(UsageError, match=r"unfinished \(no meta\.json\); run `python -m nano\.prepare --source packaged`"):
        TokenBins(tmp_path / "d", DATA)
    with pytest.raises(UsageError, match=r"is not prepared; run `python -m nano\.prepare --source packaged`"):
        TokenBins(tmp_path / "missing", DATA)
    (tmp_path / "d" / "val.bin").unlink()
    write_bins(tmp_path / "d", marker="meta.json")
    (tmp_path / "d" / "val.bin").unlink()
    with pytest.raises(UsageError, match=r"no val\.bin"):
        TokenBins(tmp_path / "d", DATA)


def test_token_bins_custom_marker_and_vocab_size(tmp_path):
    bins = TokenBins(write_bins(tmp_path / "nano"), DATA)
    assert bins.vocab_size == 6000 and bins.num_tokens("train") == 1000 and bins.num_tokens("val") == 200
    bpe = TokenData(prepare="python -m owt.prepare", meta="DONE")
    bins = TokenBins(write_bins(tmp_path / "owt", marker="DONE"), bpe)
    assert bins.vocab_size is None and bins.meta == {"vocab_size": 50257, "tokenizer": "gpt2"}
    with pytest.raises(UsageError, match=r"no DONE\); run `python -m owt\.prepare`"):
        TokenBins(write_bins(tmp_path / "owt2", marker=None), bpe)


def test_the_legacy_files_are_the_experiments_own(tmp_path):
    # meta.pkl is nano's earlier format (nanoGPT's), read only where the experiment names it:
    # owt's data never had one, so a folder holding only a meta.pkl is unfinished for owt.
    folder = write_bins(tmp_path / "d", marker="meta.pkl")
    assert TokenBins(folder, nano.DATA).vocab_size == 6000
    with pytest.raises(UsageError, match=r"unfinished \(no meta\.json\); run `python -m owt\.prepare`"):
        TokenBins(folder, owt.DATA)
    (folder / "meta.pkl").rename(folder / "vocab.pickle")  # another experiment's name for it
    assert TokenBins(folder, TokenData(prepare=HINT, meta="meta.json", legacy_meta="vocab.pickle")).vocab_size == 6000


def test_the_harness_learns_no_data_fact_from_an_experiment_package():
    # harness.experiments finds every one-task experiment, and harness.token_bins reads a folder,
    # without importing an experiment's package: the experiment passes its facts (nano.DATA).
    code = ("import sys\n"
            "import harness.experiments as e, harness.token_bins\n"
            "for name in ('nano', 'owt', 'gpt2', 'vit', 'cifar'):\n"
            "    e.experiment(name)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('nano', 'owt', 'gpt2', 'vit', 'cifar')))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_get_batch_shapes_shift_and_generator_determinism(tmp_path):
    bins = TokenBins(write_bins(tmp_path / "nano"), DATA)
    gen = torch.Generator().manual_seed(1337)
    state = gen.get_state()
    x, y = bins.get_batch("train", batch_size=8, block_size=16, generator=gen)
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    assert x.is_contiguous() and y.is_contiguous()
    # train.bin holds 0..999, so a window starting at i is i, i+1, ...; y is x one token on
    assert torch.equal(x - x[:, :1], torch.arange(16).expand(8, 16))
    assert torch.equal(y, x + 1)
    offsets = torch.randint(1000 - 16, (8,), generator=torch.Generator().manual_seed(1337))
    assert torch.equal(x[:, 0], offsets)

    # the generator's state is the data position: restoring it redraws the same batches
    x2, _ = bins.get_batch("train", 8, 16, gen)
    restored = torch.Generator()
    restored.set_state(state)
    assert torch.equal(bins.get_batch("train", 8, 16, restored)[0], x)
    assert torch.equal(bins.get_batch("train", 8, 16, restored)[0], x2)
    assert not torch.equal(x, x2)

    xv, yv = bins.get_batch("val", 4, 16, torch.Generator().manual_seed(0))
    assert xv.min() >= 5000 and yv.max() < 5200 and torch.equal(yv, xv + 1)
    with pytest.raises(UsageError, match="fewer than block_size"):
        bins.get_batch("val", 4, 200, gen)


def test_token_bins_read_prepared_text(tmp_path):
    out = prep.prepare(source="packaged", out_dir=tmp_path / "nano", plays=1)
    bins = TokenBins(out, DATA)
    x, y = bins.get_batch("val", 4, 64, torch.Generator().manual_seed(0))
    val = np.fromfile(out / "val.bin", dtype=np.uint16)
    i = int(torch.randint(len(val) - 64, (4,), generator=torch.Generator().manual_seed(0))[0])
    assert x[0].tolist() == val[i:i + 64].tolist() and y[0].tolist() == val[i + 1:i + 65].tolist()
    assert bins.vocab_size == load_meta(out)["vocab_size"] and int(x.max()) < bins.vocab_size


# --------------------------------------------------------------------------- GPT

PAPER = GPTConfig(block_size=64, vocab_size=65, n_layer=4, n_head=4, n_embd=128, dropout=0.0, bias=False)


def test_gpt_paper_config_parameters_and_init():
    torch.manual_seed(0)
    model = GPT(PAPER)
    # per block: c_attn 128*384 + c_proj 128*128 + c_fc 128*512 + mlp c_proj 512*128 + 2 LayerNorm 128
    # = 196,864; x4 = 787,456; + wte 65*128 (tied with lm_head) + wpe 64*128 + ln_f 128
    assert sum(p.numel() for p in model.parameters()) == 804_096
    assert model.get_num_params(non_embedding=False) == 804_096
    assert model.get_num_params() == 804_096 - 64 * 128
    assert model.lm_head.weight is model.transformer.wte.weight
    assert all(m.bias is None for m in model.modules() if isinstance(m, torch.nn.Linear))
    c_proj = torch.cat([p.flatten() for n, p in model.named_parameters() if n.endswith("c_proj.weight")])
    assert abs(c_proj.std().item() - 0.02 / math.sqrt(8)) < 0.001
    assert abs(model.transformer.h[0].mlp.c_fc.weight.std().item() - 0.02) < 0.001
    # 6 N + 12 L H Q T FLOPs per token, T tokens per sequence, 16 sequences
    assert model.estimate_flops_per_iter(16) == (6 * 795_904 + 12 * 4 * 4 * 32 * 64) * 64 * 16 == 5_292_687_360


def test_gpt_forward_loss_at_init_and_backward():
    torch.manual_seed(0)
    model = GPT(PAPER)
    idx = torch.randint(65, (3, 64))
    targets = torch.randint(65, (3, 64))
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 64, 65)
    # small init: near-uniform predictions, cross entropy ~ ln(vocab)
    assert abs(loss.item() - math.log(65)) < 0.05
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())

    model.eval()
    last, none = model(idx[:, :10])
    assert last.shape == (3, 1, 65) and none is None
    full, _ = model(idx[:, :10], targets[:, :10])
    assert torch.allclose(last[:, 0], full[:, -1], atol=1e-5)
    # causal: changing a later token leaves earlier logits unchanged
    changed = idx[:, :10].clone()
    changed[:, 9] = (changed[:, 9] + 1) % 65
    assert torch.allclose(model(changed, targets[:, :10])[0][:, :9], full[:, :9], atol=1e-5)
    with pytest.raises(ValueError, match="block size"):
        model(torch.zeros(1, 65, dtype=torch.long))

    out = model.generate(idx[:1, :5], max_new_tokens=70, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 75) and int(out.max()) < 65


@pytest.mark.parametrize("bad, match", [(dict(n_head=3), "multiple of model.n_head = 3"), (dict(n_layer=0), "model.n_layer must be an integer >= 1, got 0")])
def test_gpt_rejects_bad_config(bad, match):
    with pytest.raises(UsageError, match=match):
        GPT(GPTConfig(**{**PAPER.__dict__, **bad}))

"""Training the language-model experiments: owt (nano's GPT on GPT-2 token bins) and gpt2
(Hugging Face GPT2LMHeadModel on WikiText blocks), on generated corpora, offline, CPU."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import gpt2.data as gpt2_data
from gpt2 import train as gpt2_train
from harness import smoke_data
from harness.config import resolve
from harness.loop import EXIT_INTERRUPTED, STOP_AFTER_ENV
from owt import train as owt_train
from conftest import records

ROOT = Path(__file__).resolve().parents[1]
OWT_SMOKE = str(ROOT / "owt" / "configs" / "smoke.yaml")
GPT2_SMOKE = str(ROOT / "gpt2" / "configs" / "smoke.yaml")
OPTIMIZER_ROWS = {"adam", "msgd", "cd", "cd0", "ikfad", "ikfad0", "cadam", "cadam0"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models on a shared 2-core machine: one thread avoids oversubscription.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def owt_data(tmp_path_factory):
    """nanoGPT bins of 40 generated documents, made by owt.prepare as a user would."""
    return smoke_data.owt_bins(tmp_path_factory.mktemp("owt"))


@pytest.fixture(scope="module")
def gpt2_cache(tmp_path_factory):
    """A WikiText-layout corpus (articles with headings), tokenized into gpt2.data's cache."""
    return smoke_data.gpt2_cache(tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="module")
def tiny_pretrained(tmp_path_factory):
    """A 'pretrained' checkpoint directory in Hugging Face's format: a one-block GPT-2."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(7)
    out = tmp_path_factory.mktemp("pretrained") / "tiny-gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=64)).save_pretrained(out)
    return out


def owt_args(data, out, optimizer="adam", *extra):
    return ["--optimizer", optimizer, "--seed", "1", "--config", OWT_SMOKE, "--set", f"data.dir={data}",
            "--out", str(out), *extra]


def gpt2_args(cache, out, optimizer="adam", *extra):
    return ["--optimizer", optimizer, "--seed", "1", "--config", GPT2_SMOKE, "--set", f"data.cache_dir={cache}",
            "--out", str(out), *extra]


def weights(run_dir) -> dict:
    return torch.load(Path(run_dir) / "checkpoint.pt", weights_only=True)["model"]


# ---------------------------------------------------------------------------------------------- configs


def test_owt_paper_config_is_the_papers_protocol():
    cfg = resolve("owt", "cadam", 1337)
    assert cfg["model"] == {"n_layer": 6, "n_head": 8, "n_embd": 512, "block_size": 1024, "vocab_size": 50304,
                            "dropout": 0.0, "bias": False, "scaled_init": "all"}
    t = cfg["train"]
    assert (t["batch_size"], t["max_iters"], t["eval_interval"], t["eval_iters"]) == (16, 50001, 1000, 200)
    assert (t["grad_clip"], t["gradient_accumulation_steps"], t["precision"]) == (1.0, 1, "fp16")
    assert cfg["seeds"] == list(range(1337, 1347))
    assert cfg["optimizer"] == {"name": "cadam", "h": 6.775e-3, "gamma": 7.532, "c": 3.106e6, "alpha": 0.4402}
    big = resolve("owt", "adam", 1337, str(ROOT / "owt" / "configs" / "gpt2-124m.yaml"))
    assert (big["model"]["n_layer"], big["model"]["n_head"], big["model"]["n_embd"]) == (12, 12, 768)
    # nanoGPT's ~0.5M tokens per optimizer step (batch_size is the global batch), 12 per micro-batch on one GPU
    assert big["train"]["batch_size"] * 1024 == 491_520
    assert big["train"]["batch_size"] // big["train"]["gradient_accumulation_steps"] == 12


@pytest.mark.parametrize("exp", ["owt", "gpt2"])
def test_best_and_space_cover_all_eight_optimizers(exp):
    from harness.sweep import experiment, load_space

    best = yaml.safe_load((ROOT / exp / "configs" / "best.yaml").read_text())
    assert set(best) == OPTIMIZER_ROWS
    owt_best = yaml.safe_load((ROOT / "owt" / "configs" / "best.yaml").read_text())
    assert best == owt_best  # gpt2 starts from owt's values (and says so)
    space = load_space(experiment(exp))
    assert set(space["optimizers"]) == OPTIMIZER_ROWS
    cd = space["optimizers"]["cd"]
    assert (cd["h"].low, cd["h"].high, cd["c"].low, cd["c"].high) == (1e-4, 0.1, 1e4, 1e10)
    assert all(r.log for hps in space["optimizers"].values() for r in hps.values())
    assert "gamma" not in space["optimizers"]["cadam0"] and "gamma" in space["optimizers"]["cadam"]
    assert set(space["budget"]) == {"train.max_iters"}
    if exp == "gpt2":
        assert "NOT TUNED FOR gpt2" in (ROOT / "gpt2" / "configs" / "best.yaml").read_text()


# ---------------------------------------------------------------------------------------------- owt


def test_owt_smoke_runs_write_the_run_contract(owt_data, tmp_path):
    for name in ("adam", "cadam"):
        out = tmp_path / name
        assert owt_train.main(owt_args(owt_data, out, name)) == 0
        cfg = yaml.safe_load((out / "config.yaml").read_text())
        assert cfg["experiment"] == "owt" and cfg["optimizer"]["name"] == name
        rows = records(out)
        val = [r for r in rows if r["split"] == "val"]
        assert [r["step"] for r in val] == [0, 10, 20]
        assert [r["step"] for r in rows if r["split"] == "train"] == [10, 20]
        assert all(r["tokens"] == r["step"] * 4 * 32 for r in rows)
        assert all(math.isfinite(r["loss"]) for r in rows)
        assert val[0]["loss"] == pytest.approx(math.log(50304), abs=0.1)  # untrained: uniform over the vocab
        assert val[-1]["loss"] < val[0]["loss"] - 0.05, name  # it learned something
        summary = json.loads((out / "summary.json").read_text())
        assert (summary["status"], summary["steps"], summary["experiment"]) == ("completed", 20, "owt")
        assert summary["best_val_loss"] == min(r["loss"] for r in val)
        # GPT-2's vocabulary padded to 50304, as the paper's model; the head is tied to it
        assert weights(out)["transformer.wte.weight"].shape == (50304, 32)


@pytest.mark.parametrize("exp", ["owt", "gpt2"])
def test_gradient_accumulation_equals_a_k_times_larger_batch(exp, owt_data, gpt2_cache, tmp_path):
    """k micro-batches per update give the update of one batch k times larger (same examples).

    batch_size is the global batch: 8 sequences as 2 micro-batches of 4 vs 1 x 8. owt's windows
    come from one generator, so the 8 offsets of one draw are the 4 + 4 of two draws; gpt2's
    blocks come from the same shuffle. A third run with half the batch and no accumulation
    shows the comparison can tell.
    """
    if exp == "owt":
        main, base = owt_train.main, lambda out, *s: owt_args(owt_data, out, "adam", *s)
    else:
        main, base = gpt2_train.main, lambda out, *s: gpt2_args(gpt2_cache, out, "adam", "--set", "model.dropout=0.0", *s)
    setups = {"one": (8, 1), "accumulated": (8, 2), "half": (4, 1)}
    for name, (batch, k) in setups.items():
        assert main(base(tmp_path / name, "--set", "train.max_iters=3", "--set", "train.eval_interval=3",
                         "--set", "train.eval_iters=1", "--set", f"train.batch_size={batch}",
                         "--set", f"train.gradient_accumulation_steps={k}")) == 0
    one, acc, half = (weights(tmp_path / n) for n in setups)
    train_loss = {n: [r for r in records(tmp_path / n) if r["split"] == "train"][0] for n in setups}
    assert train_loss["accumulated"]["loss"] == pytest.approx(train_loss["one"]["loss"], rel=1e-5)
    assert train_loss["accumulated"]["tokens"] == train_loss["one"]["tokens"] == 3 * 8 * 32
    worst = max((acc[k] - one[k]).abs().max().item() for k in one)
    control = max((half[k] - one[k]).abs().max().item() for k in one)
    assert worst < 1e-5, worst
    assert control > 100 * max(worst, 1e-7), (control, worst)


def test_owt_missing_or_unfinished_dataset_is_a_one_line_error(tmp_path, capsys):
    assert owt_train.main(owt_args(tmp_path / "nowhere", tmp_path / "run")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "python -m owt.prepare" in err[0]
    half = tmp_path / "half"
    half.mkdir()
    for name in ("train.bin", "val.bin"):  # bins without the marker: an interrupted prepare
        (half / name).write_bytes(b"\0\0" * 100)
    assert owt_train.main(owt_args(half, tmp_path / "run")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unfinished (no meta.json)" in err[0] and "python -m owt.prepare" in err[0]
    assert not (tmp_path / "run").exists()


def test_owt_slurm_script_parses():
    script = ROOT / "owt" / "slurm.sbatch"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    for piece in ("#SBATCH --requeue", "--signal=B:USR1@", "--rdzv-backend c10d", "--nnodes", "-m owt.train",
                  "trap", "scontrol requeue"):
        assert piece in text, piece


# ---------------------------------------------------------------------------------------------- gpt2


def _first_blocks_loss(pretrained, cache, n_blocks):
    """Mean next-token cross entropy of a checkpoint on the first validation blocks, computed directly."""
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(pretrained).eval()
    x = torch.from_numpy(gpt2_data.lm_splits(cache, 32)["val"].blocks[:n_blocks].astype("int64"))
    with torch.no_grad():
        logits = model(input_ids=x).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1)).item()


def test_gpt2_smoke_runs_fine_tune_and_report_perplexity(gpt2_cache, tiny_pretrained, tmp_path):
    n_val = len(gpt2_data.lm_splits(gpt2_cache, 32)["val"])
    for name, extra in (("adam", ["--set", "model.from_scratch=false", "--set", f"model.pretrained={tiny_pretrained}"]),
                        ("cd", [])):
        out = tmp_path / name
        assert gpt2_train.main(gpt2_args(gpt2_cache, out, name, *extra)) == 0
        cfg = yaml.safe_load((out / "config.yaml").read_text())
        assert cfg["experiment"] == "gpt2" and cfg["optimizer"]["name"] == name
        rows = records(out)
        val = [r for r in rows if r["split"] == "val"]
        assert [r["step"] for r in val] == [0, 10, 20]
        assert all(r["perplexity"] == pytest.approx(math.exp(r["loss"]), rel=1e-9) for r in val)
        assert all(r["tokens"] == r["step"] * 4 * 32 for r in rows)
        steps_per_epoch = math.ceil(len(gpt2_data.lm_splits(gpt2_cache, 32)["train"]) / 4)
        assert all(r["epoch"] == pytest.approx(r["step"] / steps_per_epoch) for r in rows)
        assert val[-1]["loss"] < val[0]["loss"], name
        summary = json.loads((out / "summary.json").read_text())
        assert (summary["status"], summary["steps"]) == ("completed", 20)
        assert summary["best_val_loss"] == min(r["loss"] for r in val)
        assert summary["final"]["val"]["perplexity"] == val[-1]["perplexity"]
        if name == "adam":
            # step 0 is the pretrained checkpoint, evaluated on the first eval_iters x batch_size blocks
            expected = _first_blocks_loss(tiny_pretrained, gpt2_cache, min(n_val, 2 * 4))
            assert val[0]["loss"] == pytest.approx(expected, rel=1e-5)
        else:  # from scratch: about uniform over GPT-2's 50,257 tokens
            assert val[0]["loss"] == pytest.approx(math.log(50257), abs=0.1)


def test_gpt2_kill_and_resume_mid_epoch_is_exact(gpt2_cache, tmp_path, monkeypatch):
    # dropout on (0.1, GPT-2's): the resumed run must draw the same masks
    args = lambda out: gpt2_args(gpt2_cache, out, "ikfad", "--set", "train.max_iters=8", "--set", "train.eval_interval=4",
                                 "--set", "model.dropout=0.1")
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert gpt2_train.main(args(whole)) == 0
    monkeypatch.setenv(STOP_AFTER_ENV, "6")  # between evaluations, mid-epoch
    assert gpt2_train.main(args(parts)) == EXIT_INTERRUPTED
    monkeypatch.delenv(STOP_AFTER_ENV)
    assert gpt2_train.main(args(parts)) == 0
    assert records(parts) == records(whole)
    assert all(torch.equal(a, b) for a, b in zip(weights(parts).values(), weights(whole).values()))


def test_gpt2_bad_input_is_a_one_line_error(gpt2_cache, tmp_path, capsys):
    cases = [
        (gpt2_args(tmp_path / "nowhere", tmp_path / "run"), "python -m gpt2.data --cache-dir"),
        (gpt2_args(gpt2_cache, tmp_path / "run", "adam", "--set", "train.gradient_accumulation_steps=3"),
         "train.batch_size 4 (the global batch) must be a positive multiple"),
        (gpt2_args(gpt2_cache, tmp_path / "run", "adam", "--set", "model.from_scratch=false",
                   "--set", f"model.pretrained={tmp_path / 'no-model'}"), "could not load the pretrained model"),
    ]
    for argv, message in cases:
        assert gpt2_train.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "run").exists()


def test_gpt2_two_processes_take_the_same_updates_as_one(gpt2_cache, tmp_path):
    """batch_size is the global batch: 2 ranks x 2 blocks train and evaluate as 1 process x 4 blocks."""
    args = lambda out: gpt2_args(gpt2_cache, out, "adam", "--set", "model.dropout=0.0", "--set", "train.max_iters=4",
                                 "--set", "train.eval_interval=2")
    assert gpt2_train.main(args(tmp_path / "one")) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "gpt2.train", *args(tmp_path / "two")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["world_size"] == 2
    one, two = ([r for r in records(tmp_path / n) if r["split"] == "val"] for n in ("one", "two"))
    assert [r["step"] for r in two] == [r["step"] for r in one] == [0, 2, 4]
    assert [r["tokens"] for r in two] == [r["tokens"] for r in one]
    for a, b in zip(one, two):  # the validation blocks are split between the ranks and summed back
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    w1, w2 = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-5

"""bert.train end to end on its smoke configs: generated GLUE-shaped data (bert.prepare --smoke),
the offline distilbert-base-uncased tokenizer, a tiny DistilBERT; offline, CPU."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from bert import train as bert_train
from bert.data import collate_fn, glue_splits, load_tokenizer
from bert.model import build_model
from bert.prepare import TINY_CONFIG, prepare_smoke
from harness.loop import EXIT_INTERRUPTED, STOP_AFTER_ENV
from conftest import records

ROOT = Path(__file__).resolve().parents[1]
RUNS = [("sst2", "adam"), ("sst2", "ikfad"), ("qnli", "cadam"), ("qnli", "msgd")]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert")
    paths = prepare_smoke(root / "data")
    paths["cache"] = root / "cache"
    return paths


def args(smoke, task, optimizer, out=None, seed=1, *extra):
    argv = ["--task", task, "--optimizer", optimizer, "--seed", str(seed),
            "--config", str(ROOT / "bert" / "configs" / task / "smoke.yaml"),
            "--set", f"data.raw={smoke[task]}", "--set", f"data.tokenizer={smoke['tokenizer']}",
            "--set", f"data.cache_dir={smoke['cache']}"]
    if task == "qnli":
        argv += ["--set", f"model.pretrained={smoke['pretrained']}"]
    return argv + (["--out", str(out)] if out else []) + list(extra)


@pytest.fixture(scope="module")
def runs(smoke, tmp_path_factory):
    """The four smoke runs, each in its default run directory under a scratch working directory."""
    cwd = tmp_path_factory.mktemp("cwd")
    old = os.getcwd()
    os.chdir(cwd)
    try:
        for task, optimizer in RUNS:
            assert bert_train.main(args(smoke, task, optimizer)) == 0
    finally:
        os.chdir(old)
    return {(task, opt): cwd / "runs" / "bert" / task / opt / "seed1" for task, opt in RUNS}


@pytest.mark.parametrize("task, optimizer", RUNS)
def test_smoke_runs_write_the_run_contract(runs, task, optimizer):
    out = runs[(task, optimizer)]
    # .lock: the writer lock; checkpoint.prev.pt: the one before the last, kept as a fallback
    assert sorted(p.name for p in out.iterdir()) == [".lock", "checkpoint.prev.pt", "checkpoint.pt", "config.yaml",
                                                     "metrics.jsonl", "summary.json"]
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    best = yaml.safe_load((ROOT / "bert" / "configs" / task / "best.yaml").read_text())
    assert cfg["experiment"] == f"bert-{task}" and cfg["optimizer"] == {"name": optimizer, **best[optimizer]}
    assert cfg["train"]["epochs"] == 2 and cfg["train"]["evals_per_epoch"] == 10 and cfg["train"]["batch_size"] == 4
    rows = records(out)
    # 40 training examples in batches of 4: 10 steps per epoch, 2 epochs, 10 evaluations per epoch
    # (20 points per curve) after the untrained model's at step 0.
    for split in ("val", "test"):
        evals = [r for r in rows if r["split"] == split]
        assert [r["step"] for r in evals] == list(range(21))
        assert [r["epoch"] for r in evals] == [s / 10 for s in range(21)]
        assert all(math.isfinite(r["loss"]) and 0 <= r["acc"] <= 1 for r in evals)
        assert all(round(r["acc"] * 9) == r["acc"] * 9 for r in evals)  # 9 examples per split
    train = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 21)) and all("acc" in r for r in train)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == summary["total_steps"] == 20
    assert summary["experiment"] == f"bert-{task}" and summary["optimizer"] == optimizer
    val = [r for r in rows if r["split"] == "val"]
    assert summary["best_val_loss"] == min(r["loss"] for r in val)
    assert summary["final"]["test"]["step"] == 20


@pytest.mark.parametrize("task", ["sst2", "qnli"])
def test_final_test_record_is_the_checkpoints_test_accuracy(smoke, runs, task):
    # Recompute the last test point by hand from the saved weights: the logged numbers are
    # the model's loss and accuracy on the test split, not on something else.
    out = runs[(task, RUNS[0][1] if task == "sst2" else RUNS[2][1])]
    tokenizer = load_tokenizer(smoke["tokenizer"])
    test = glue_splits(task, tokenizer, cache_dir=smoke["cache"], raw=smoke[task], max_length=64)["test"]
    overrides = dict(TINY_CONFIG, vocab_size=len(tokenizer)) if task == "sst2" else {}
    model = build_model(task, pretrained=str(smoke["pretrained"]), config_overrides=overrides)
    model.load_state_dict(torch.load(out / "checkpoint.pt", weights_only=True)["model"])
    model.eval()
    with torch.no_grad():
        batch = collate_fn(tokenizer)([test[i] for i in range(len(test))])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    last = [r for r in records(out) if r["split"] == "test"][-1]
    assert last["acc"] == (logits.argmax(-1) == batch["labels"]).sum().item() / len(test)
    assert last["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, batch["labels"]).item(), rel=1e-5)


def test_kill_and_resume_gives_identical_metrics(smoke, runs, tmp_path, monkeypatch):
    parts = tmp_path / "parts"
    monkeypatch.setenv(STOP_AFTER_ENV, "7")  # stop mid-epoch
    assert bert_train.main(args(smoke, "qnli", "cadam", parts)) == EXIT_INTERRUPTED
    assert json.loads((parts / "summary.json").read_text())["status"] == "interrupted"
    assert max(r["step"] for r in records(parts)) == 7
    monkeypatch.delenv(STOP_AFTER_ENV)
    assert bert_train.main(args(smoke, "qnli", "cadam", parts)) == 0
    assert records(parts) == records(runs[("qnli", "cadam")])
    # A completed run is not redone.
    before = (parts / "metrics.jsonl").read_bytes()
    assert bert_train.main(args(smoke, "qnli", "cadam", parts)) == 0
    assert (parts / "metrics.jsonl").read_bytes() == before


def test_sst2_from_scratch_learns_the_generated_sentiment(smoke, tmp_path):
    # 500 + 100 generated rows whose label is carried by mood words: a tiny DistilBERT from
    # random init gets them right after 2 epochs of Adam, so texts, labels, padding and the
    # attention mask reach the model as they should.
    import datasets
    from bert.prepare import glue_like

    raw = tmp_path / "sst2-600"
    datasets.DatasetDict(train=glue_like("sst2", 500, seed=5), validation=glue_like("sst2", 100, seed=6)).save_to_disk(str(raw))
    out = tmp_path / "run"
    assert bert_train.main(args(smoke, "sst2", "adam", out, 1, "--set", f"data.raw={raw}", "--set", "optimizer.lr=3e-3",
                                "--set", "train.batch_size=16", "--set", "train.evals_per_epoch=1")) == 0
    test = [r for r in records(out) if r["split"] == "test"]
    assert [r["step"] for r in test] == [0, 27, 54]  # 420 examples: 27 batches of 16 per epoch
    assert test[0]["acc"] < 0.7 and test[-1]["acc"] >= 0.9 and test[-1]["loss"] < 0.5 * test[0]["loss"]


def test_global_batch_is_the_same_examples_on_any_number_of_ranks():
    # train.batch_size counts examples per update: 2 ranks x 2 micro-batches of 2 (accumulation)
    # take exactly the single process's batches of 8, epoch after epoch.
    from harness.data import EpochBatches

    items = list(range(37))
    from harness.run import Run

    cfg = {"train": {"batch_size": 8, "gradient_accumulation_steps": 2}}
    assert Run(cfg=cfg, dir=None, device=torch.device("cpu"), world_size=2).micro_batch_size() == 2
    one = EpochBatches(items, 8, seed=3)
    ranks = [EpochBatches(items, 2, seed=3, rank=r, world_size=2) for r in range(2)]
    for epoch in range(2):
        single = [[i for i, _ in b] for b in one.epoch_batches(epoch)]
        split = [[[i for i, _ in b] for b in r.epoch_batches(epoch)] for r in ranks]
        for step, batch in enumerate(single[:-1]):  # the last, partial batch is dealt unevenly
            micro = [split[r][2 * step + a] for r in range(2) for a in range(2)]
            assert sorted(sum(micro, [])) == sorted(batch)


def one_line_error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.mark.parametrize("argv", [["--task", "mnli"], ["--task=SST2"], []])
def test_unknown_or_missing_task_is_a_one_line_error(argv, capsys, tmp_path):
    assert bert_train.main([*argv, "--optimizer", "adam", "--out", str(tmp_path / "x")]) == 2
    line = one_line_error(capsys)
    assert "sst2" in line and "qnli" in line and ("unknown" in line or "required" in line)
    assert not (tmp_path / "x").exists()


def test_help_lists_task_and_the_standard_arguments(capsys):
    with pytest.raises(SystemExit) as done:
        bert_train.main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "python -m bert.train" in text and "{sst2,qnli}" in text and "--optimizer" in text


@pytest.mark.parametrize("task, extra, message", [
    ("sst2", ["--set", "data.raw={tmp}/nowhere"], "is not a directory"),
    ("qnli", ["--set", "model.pretrained={tmp}/no-model"], "could not load the pretrained model"),
    ("sst2", ["--set", "train.batch_size=6", "--set", "train.gradient_accumulation_steps=4"],
     r"train.batch_size 6 \(the global batch\) must be a positive multiple of ranks x train.gradient_accumulation_steps = 1 x 4"),
    ("qnli", ["--set", "model.dim=64"], "unknown key 'model.dim'; valid keys: .*model.pretrained"),
])
def test_bad_data_model_or_batch_is_a_one_line_error(smoke, tmp_path, capsys, task, extra, message):
    extra = [e.format(tmp=tmp_path) for e in extra]
    out = tmp_path / "run"
    assert bert_train.main(args(smoke, task, "adam", out, 1, *extra)) == 2
    assert re.search(message, one_line_error(capsys))
    assert not out.exists()


def test_missing_glue_offline_is_a_one_line_error_naming_the_prepare_command(smoke, tmp_path):
    # The real command, in a fresh process: GLUE from the Hub (data.raw null) is not cached
    # and the Hub is unreachable (offline mode).
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run(
        [sys.executable, "-m", "bert.train", "--task", "sst2", "--optimizer", "adam",
         "--set", f"data.tokenizer={smoke['tokenizer']}", "--set", f"data.cache_dir={tmp_path / 'cache'}",
         "--out", str(tmp_path / "run")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: could not load the dataset nyu-mll/glue/sst2"), proc.stderr
    assert "`python -m bert.prepare --task sst2` fetches it" in lines[0] and "--set data.raw=DIR" in lines[0]
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_prepare_fills_the_cache_that_training_reads(smoke, tmp_path, monkeypatch, capsys):
    from bert import data as bert_data
    from bert.prepare import main as prepare_main

    cache = tmp_path / "cache"
    for task in ("sst2", "qnli"):
        sets = args(smoke, task, "adam")[8:]  # the --set pairs of a smoke run
        sets = [s.replace(str(smoke["cache"]), str(cache)) for s in sets]
        config = str(ROOT / "bert" / "configs" / task / "smoke.yaml")
        assert prepare_main(["--task", task, "--config", config, *sets]) == 0
    assert "qnli: train 40, val 9, test 9 examples" in capsys.readouterr().out
    assert sorted(p.name.split("-")[0] for p in cache.iterdir()) == ["qnli", "sst2"]

    def fail(*a, **k):
        raise AssertionError("training tokenized again instead of reading the prepared cache")
    monkeypatch.setattr(bert_data, "tokenize", fail)
    out = tmp_path / "run"
    run_args = [a.replace(str(smoke["cache"]), str(cache)) for a in args(smoke, "sst2", "adam", out)]
    assert bert_train.main([*run_args, "--set", "train.epochs=1", "--set", "train.evals_per_epoch=1"]) == 0
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"


def test_training_does_not_depend_on_the_evaluation_cadence(smoke, runs, tmp_path):
    # Evaluations draw nothing from the generator that drives dropout: evaluating 5 times
    # per epoch instead of 10 leaves the training trajectory, and so the shared points, unchanged.
    out = tmp_path / "sparse"
    assert bert_train.main(args(smoke, "sst2", "adam", out, 1, "--set", "train.evals_per_epoch=5")) == 0
    dense = {(r["step"], r["split"]): r for r in records(runs[("sst2", "adam")]) if r["split"] != "train"}
    sparse = [r for r in records(out) if r["split"] != "train"]
    assert [r["step"] for r in sparse if r["split"] == "val"] == list(range(0, 21, 2))
    assert all(r == dense[(r["step"], r["split"])] for r in sparse)


def test_last_evaluation_follows_the_last_step_when_the_interval_does_not_divide_an_epoch(smoke, runs, tmp_path):
    # 10 steps per epoch, 3 evaluations per epoch: every 10 // 3 = 3 steps from the start (the
    # release's global_step % log_interval, qnli/train.py:166), and at each epoch's end (the
    # release's validation after each epoch, qnli/train.py:185; its test after the last step,
    # qnli/train.py:215): 0, 3, 6, 9, 10, 12, 15, 18, 20. Training is the dense run's.
    out = tmp_path / "uneven"
    assert bert_train.main(args(smoke, "sst2", "adam", out, 1, "--set", "train.evals_per_epoch=3")) == 0
    rows = records(out)
    expected = [0, 3, 6, 9, 10, 12, 15, 18, 20]
    for split in ("val", "test"):
        assert [r["step"] for r in rows if r["split"] == split] == expected
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final"]["test"]["step"] == summary["steps"] == 20
    dense = {(r["step"], r["split"]): r for r in records(runs[("sst2", "adam")]) if r["split"] != "train"}
    assert all(r == dense[(r["step"], r["split"])] for r in rows if r["split"] != "train")

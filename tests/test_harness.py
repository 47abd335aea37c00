"""The shared harness, exercised through the nano experiment's smoke config."""
import hashlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import nano
import optimizers
from harness.loop import EXIT_INTERRUPTED, STOP_AFTER_ENV
from conftest import records
from nano import train as nano_train

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "nano" / "configs" / "smoke.yaml")


def nano_args(data, out, optimizer="adam", seed=1, *extra):
    return ["--optimizer", optimizer, "--seed", str(seed), "--config", SMOKE,
            "--set", f"data.dir={data}", "--out", str(out), *extra]


def test_every_optimizer_writes_the_run_contract(nano_data, tmp_path):
    for name in optimizers.NAMES:
        out = tmp_path / name
        assert nano_train.main(nano_args(nano_data, out, name)) == 0
        cfg = yaml.safe_load((out / "config.yaml").read_text())
        assert cfg["optimizer"]["name"] == name and cfg["train"]["max_iters"] == 30
        rows = records(out)
        val = [r for r in rows if r["split"] == "val"]
        assert [r["step"] for r in val] == [0, 10, 20, 30]
        assert all(math.isfinite(r["loss"]) for r in rows) and {"train", "val"} == {r["split"] for r in rows}
        assert all(r["tokens"] == r["step"] * 8 * 32 for r in rows)
        summary = json.loads((out / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["steps"] == 30
        assert summary["best_val_loss"] == min(r["loss"] for r in val)
        assert val[-1]["loss"] < val[0]["loss"], name  # it learned something
        assert (out / "checkpoint.pt").stat().st_size > 0


def test_tuned_hyperparameters_come_from_best_yaml_and_set_overrides(nano_data, tmp_path):
    best = yaml.safe_load((ROOT / "nano" / "configs" / "best.yaml").read_text())
    out = tmp_path / "a"
    nano_train.main(nano_args(nano_data, out, "cadam", 1, "--set", "train.max_iters=2", "--set", "optimizer.c=5"))
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["optimizer"] == {"name": "cadam", **best["cadam"], "c": 5.0}
    from harness.config import resolve

    assert resolve("nano", "cd", 1, sets=["optimizer.fused=false", "optimizer.foreach=true"])["optimizer"]["fused"] is False


def test_kill_and_resume_gives_identical_metrics(nano_data, tmp_path, monkeypatch):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert nano_train.main(nano_args(nano_data, whole, "ikfad")) == 0
    monkeypatch.setenv(STOP_AFTER_ENV, "13")  # stop mid-interval, between evaluations
    assert nano_train.main(nano_args(nano_data, parts, "ikfad")) == EXIT_INTERRUPTED
    assert json.loads((parts / "summary.json").read_text())["status"] == "interrupted"
    monkeypatch.delenv(STOP_AFTER_ENV)
    assert nano_train.main(nano_args(nano_data, parts, "ikfad")) == 0
    assert records(parts) == records(whole)
    # A completed run is not redone.
    before = (parts / "metrics.jsonl").read_bytes()
    assert nano_train.main(nano_args(nano_data, parts, "ikfad")) == 0
    assert (parts / "metrics.jsonl").read_bytes() == before


def test_sigterm_checkpoints_and_exits_cleanly(nano_data, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "nano.train", *nano_args(nano_data, out, "cd", 1, "--set", "train.max_iters=100000")],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "checkpoint.pt").exists():
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == EXIT_INTERRUPTED
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["steps"] > 0
    import torch

    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == summary["steps"]


def test_divergence_ends_the_run_and_keeps_the_log(nano_data, tmp_path):
    out = tmp_path / "boom"
    assert nano_train.main(nano_args(nano_data, out, "msgd", 1, "--set", "optimizer.lr=1e6", "--set", "train.grad_clip=0.0")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["steps"] < 30
    assert records(out)[0]["split"] == "val" and math.isfinite(records(out)[0]["loss"])
    assert nano_train.main(nano_args(nano_data, out, "msgd", 1, "--set", "optimizer.lr=1e6", "--set", "train.grad_clip=0.0")) == 0
    assert json.loads((out / "summary.json").read_text()) == summary  # not redone


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir())}


@pytest.mark.parametrize("extra,message", [
    (["--set", "train.max_itres=5"], "unknown key 'train.max_itres'; valid keys: .*train.max_iters"),
    (["--set", "train.max_iters=many"], "bad type for train.max_iters: 'many' is str, expected int"),
    (["--set", "optimizer.lr=-1"], r"Invalid learning rate"),
    (["--set", "optimizer.momentum=0.9"], "unknown key optimizer.momentum for optimizer adam; valid: optimizer.lr"),
    (["--set", "model.bias=yes please"], "bad type for model.bias"),
    (["--set", "train.eval_interval=0"], r"train.eval_interval must be an integer >= 1, got 0"),
    (["--set", "model.n_head=3"], r"model.n_embd = 32 must be a multiple of model.n_head = 3"),
])
def test_config_errors_are_one_line_and_leave_the_run_untouched(nano_data, tmp_path, extra, message):
    out = tmp_path / "run"
    nano_train.main(nano_args(nano_data, out, "adam", 1, "--set", "train.max_iters=3"))
    before = digest(out)
    proc = subprocess.run([sys.executable, "-m", "nano.train", *nano_args(nano_data, out, "adam", 1), *extra],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    import re

    assert re.search(message, lines[0]), lines[0]
    assert digest(out) == before


@pytest.mark.parametrize("key,value,message", [
    ("train.batch_size", 0, "train.batch_size must be an integer >= 1, got 0"),
    ("train.eval_iters", -1, "train.eval_iters must be an integer >= 1, got -1"),
    ("train.log_interval", 0, "train.log_interval must be an integer >= 1, got 0"),
    ("train.gradient_accumulation_steps", 0, "train.gradient_accumulation_steps must be an integer >= 1"),
    ("train.max_iters", -5, "train.max_iters must be a number >= 0, got -5"),
    ("train.grad_clip", -1.0, "train.grad_clip must be a number >= 0, got -1.0"),
    ("model.dropout", 1.0, r"model.dropout must be in \[0, 1\), got 1.0"),
    ("model.block_size", 0, "model.block_size must be an integer >= 1, got 0"),
    ("train.diverge_factor", 0.5, r"train.diverge_factor must be 0 \(off\) or above 1"),
])
def test_values_no_run_can_use_are_refused_when_the_config_is_resolved(key, value, message):
    from harness.config import resolve
    from harness.errors import UsageError

    with pytest.raises(UsageError, match=message):
        resolve("nano", "adam", 1, None, [f"{key}={value}"], ROOT / "nano" / "configs")
    assert resolve("nano", "adam", 1, None, ["train.diverge_factor=3", "train.max_iters=0"],
                   ROOT / "nano" / "configs")["train"]["diverge_factor"] == 3.0


def test_an_output_folder_that_is_a_file_is_a_one_line_error(nano_data, tmp_path, capsys):
    from harness import launch, report, robustness

    taken = tmp_path / "notes.txt"
    taken.write_text("mine")
    for main, args in ((nano_train.main, nano_args(nano_data, taken, "adam")),
                       (nano_train.main, nano_args(nano_data, taken / "run", "adam")),
                       (launch.main, ["nano", "--config", SMOKE, "--set", f"data.dir={nano_data}",
                                      "--optimizers", "adam", "--seeds", "1", "--runs-dir", str(taken)]),
                       (report.main, [str(tmp_path), "--out", str(taken)]),
                       (robustness.main, ["nano", "--optimizers", "adam", "--seeds", "1", "--points", "1",
                                          "--root", str(taken / "scan")])):
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{taken} is a file, not a folder" in err[0], err
    assert taken.read_text() == "mine" and sorted(tmp_path.iterdir()) == [taken]


def test_unknown_optimizer_and_missing_data_are_one_line_errors(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "nano.train", "--optimizer", "rmsprop", "--out", str(tmp_path / "x")],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown optimizer 'rmsprop'; valid: adam, msgd" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "nano.train", "--optimizer", "adam", "--config", SMOKE,
                           "--set", f"data.dir={tmp_path / 'nowhere'}", "--out", str(tmp_path / "y")],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "python -m nano.prepare" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_torchrun_two_processes_log_once_and_resume_in_one(nano_data, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, STOP_AFTER_ENV: "20", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
                           "-m", "nano.train", *nano_args(nano_data, out, "cadam")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0  # interrupted as asked (exit status 75 on both ranks)
    rows = records(out)
    assert [r["step"] for r in rows if r["split"] == "val"] == [0, 10, 20]  # logged once, not per rank
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["world_size"] == 2
    assert all(r["tokens"] == r["step"] * 8 * 32 for r in rows)  # batch_size is the global batch
    assert nano_train.main(nano_args(nano_data, out, "cadam")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 30 and summary["world_size"] == 1


def test_report_draws_figures_and_a_table(nano_data, tmp_path):
    runs = tmp_path / "runs"
    for name in ("adam", "cadam"):
        for seed in (1, 2):
            nano_train.main(nano_args(nano_data, runs / name / f"seed{seed}", name, seed))
    from harness.report import main as report_main

    assert report_main([str(runs), "--out", str(tmp_path / "results"), "--with-records"]) == 0
    copied = sorted(p.relative_to(tmp_path / "results" / "runs") for p in (tmp_path / "results" / "runs").rglob("*.*"))
    assert copied == sorted(Path(n) / f"seed{s}" / f for n in ("adam", "cadam") for s in (1, 2)
                            for f in ("config.yaml", "metrics.jsonl", "summary.json"))
    assert (tmp_path / "results" / "runs" / "adam" / "seed1" / "metrics.jsonl").read_bytes() == \
        (runs / "adam" / "seed1" / "metrics.jsonl").read_bytes()
    png = tmp_path / "results" / "val_loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    table = (tmp_path / "results" / "results.md").read_text()
    assert "| Adam | 2 |" in table and "| CADAM | 2 |" in table and "±" in table
    assert "![val_loss](val_loss.png)" in table
    # Both validation estimators, each named, the paper's (fresh batches) first.
    assert "| optimizer | runs | best val loss (fresh) | best val loss (fixed) | final val loss (fresh) |" in table
    assert "fresh: fresh random validation batches at every evaluation (nanoGPT's estimator, the paper's)" in table
    assert "![val_loss_fixed](val_loss_fixed.png)" in table


def test_launch_runs_a_grid_skips_finished_runs_and_reports(nano_data, tmp_path):
    runs, results = tmp_path / "runs", tmp_path / "results"
    cmd = [sys.executable, "-m", "harness.launch", "nano", "--config", SMOKE, "--set", f"data.dir={nano_data}",
           "--optimizers", "adam", "cadam0", "--seeds", "1", "--runs-dir", str(runs), "--report", str(results)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("adam", "cadam0"):
        assert json.loads((runs / name / "seed1" / "summary.json").read_text())["status"] == "completed"
    assert (results / "val_loss.png").exists() and "| CADAM0 | 1 |" in (results / "results.md").read_text()
    stamp = (runs / "adam" / "seed1" / "metrics.jsonl").stat().st_mtime_ns
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "0 runs to do (2 already finished)" in again.stdout
    assert (runs / "adam" / "seed1" / "metrics.jsonl").stat().st_mtime_ns == stamp
    listing = subprocess.run([*cmd[:4], "--optimizers", "adam", "cadam0", "--seeds", "1", "2", "--list"],
                             cwd=ROOT, capture_output=True, text=True).stdout.split("\n")
    assert listing[:4] == ["0 adam 1", "1 adam 2", "2 cadam0 1", "3 cadam0 2"]


# nano.train in a process where wandb is not installed (hidden from every import finder),
# whether or not it is installed here.
WITHOUT_WANDB = """
import runpy, sys
class Hidden:
    def __init__(self, finder):
        self.finder = finder
    def find_spec(self, name, path=None, target=None):
        return None if name.split(".")[0] == "wandb" else self.finder.find_spec(name, path, target)
    def __getattr__(self, name):
        return getattr(self.finder, name)
sys.meta_path[:] = [Hidden(f) for f in sys.meta_path]
sys.argv[0] = "nano.train"
runpy.run_module("nano.train", run_name="__main__")
"""


def test_wandb_is_optional_and_checked_before_anything_is_written(nano_data, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", WITHOUT_WANDB, *nano_args(nano_data, out), "--set", "wandb=true"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "pip install wandb" in proc.stderr and not out.exists(), proc.stderr[-2000:]
    proc = subprocess.run([sys.executable, "-c", WITHOUT_WANDB, *nano_args(nano_data, out, "adam", 1, "--set",
                                                                          "train.max_iters=2")],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and (out / "summary.json").exists(), proc.stderr[-2000:]  # wandb=false needs none


def test_launch_under_a_pipe_writes_one_line_per_run(nano_data, tmp_path):
    """Not on a terminal (nohup, SLURM .out files): no progress-bar frames, one line per finished run."""
    cmd = [sys.executable, "-m", "harness.launch", "nano", "--config", SMOKE, "--set", f"data.dir={nano_data}",
           "--set", "train.max_iters=4", "--set", "train.eval_interval=2", "--optimizers", "adam", "cd",
           "--seeds", "1", "--parallel", "1", "--runs-dir", str(tmp_path / "runs"), "--no-report"]
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}  # the bar would be on
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "\r" not in proc.stdout + proc.stderr and proc.stderr == ""
    header, *lines = proc.stdout.splitlines()
    assert header.startswith("nano: 2 runs to do (0 already finished) on the CPU, 1 at a time")
    assert len(lines) == 2
    for k, (line, name) in enumerate(zip(lines, ("adam", "cd")), 1):
        assert re.fullmatch(rf"  {name} seed 1: completed \(exit 0\) \[{k}/2 done, elapsed 0:\d\d:\d\d\]", line), line


def test_ctrl_c_reaches_the_runs_of_a_launch(nano_data, tmp_path):
    """Runs have their own session, so a terminal's Ctrl-C (SIGINT to launch's process group)
    reaches only launch, which forwards SIGTERM: the run checkpoints and launch exits 75."""
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "harness.launch", "nano", "--config", SMOKE, "--set", f"data.dir={nano_data}",
           "--set", "train.max_iters=1000000", "--set", "train.eval_interval=2", "--optimizers", "adam",
           "--seeds", "1", "--runs-dir", str(runs), "--no-report"]
    launch = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)  # its own process group, as a terminal's foreground job
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (runs / "adam" / "seed1" / "metrics.jsonl").exists():
            time.sleep(0.1)
        children = Path(f"/proc/{launch.pid}/task/{launch.pid}/children")
        if children.exists():
            (child,) = [int(pid) for pid in children.read_text().split()]
            assert os.getsid(child) != os.getsid(launch.pid)
        os.killpg(launch.pid, signal.SIGINT)
        assert launch.wait(timeout=120) == EXIT_INTERRUPTED
    finally:
        if launch.poll() is None:
            launch.kill()
    summary = json.loads((runs / "adam" / "seed1" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and (runs / "adam" / "seed1" / "checkpoint.pt").exists()


def test_runs_per_gpu_plans_round_robin_slots():
    from harness.launch import plan_slots
    from harness.errors import UsageError

    assert plan_slots(["0", "1"], runs_per_gpu=3, cpus=12) == (["0", "1", "0", "1", "0", "1"], 2)
    assert plan_slots(["3"], cpus=8) == (["3"], 8)
    assert plan_slots([], parallel=2, cpus=2) == ([None, None], 1)
    assert plan_slots([], cpus=32) == ([None] * 8, 4)
    with pytest.raises(UsageError, match="--runs-per-gpu must be at least 1, got 0"):
        plan_slots(["0"], runs_per_gpu=0)


def test_several_runs_per_gpu_and_per_array_task(nano_data, tmp_path, monkeypatch, capsys):
    """Array task 1 of 3 runs per task takes runs 3-5 of --list; with two (pretend: the
    launcher's torch.cuda answers patched) GPUs and two runs per GPU, they start on GPUs
    0, 1, 0 (CUDA_VISIBLE_DEVICES in each log; without CUDA the runs use the CPU) and all complete."""
    import torch

    from harness import launch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.chdir(ROOT)
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "harness.launch", "nano", "--config", SMOKE, "--set", f"data.dir={nano_data}",
           "--optimizers", "adam", "cd", "cadam", "--seeds", "1", "2", "--runs-dir", str(runs), "--no-report",
           "--gpus", "0,1", "--runs-per-gpu", "2", "--index", "1", "--runs-per-task", "3"]
    assert launch.main(cmd[3:]) == 0
    out = capsys.readouterr().out
    assert "3 runs to do" in out and "GPUs 0,1, 2 at a time on each" in out
    expected = [("cd", 2, "0"), ("cadam", 1, "1"), ("cadam", 2, "0")]  # runs 3, 4, 5 of the listing
    for name, seed, gpu in expected:
        assert json.loads((runs / name / f"seed{seed}" / "summary.json").read_text())["status"] == "completed"
        header = (runs / "logs" / f"{name}-seed{seed}.log").read_text().splitlines()[0]
        assert f"CUDA_VISIBLE_DEVICES={gpu}," in header
    assert sorted(p.name for p in runs.iterdir()) == ["cadam", "cd", "logs"]
    assert launch.main([*cmd[3:-3], "2", "--runs-per-task", "3"]) == 0
    assert "task index 2 is out of range (0-1 for 6 runs, 3 per task)" in capsys.readouterr().out


def test_validation_estimators_fresh_and_fixed(nano_data, tmp_path):
    """paper.yaml's estimators: `loss` is the paper's (fresh random batches at every
    evaluation), `loss_fixed` the same batches every time; `--set train.eval_batches=[fixed]`
    alone gives exactly those fixed-batch numbers, as the one `loss`."""
    both, fixed = tmp_path / "both", tmp_path / "fixed"
    assert nano_train.main(nano_args(nano_data, both, "cd")) == 0
    assert nano_train.main(nano_args(nano_data, fixed, "cd", 1, "--set", "train.eval_batches=[fixed]")) == 0
    val_both = [r for r in records(both) if r["split"] == "val"]
    val_fixed = [r for r in records(fixed) if r["split"] == "val"]
    assert [r["loss_fixed"] for r in val_both] == [r["loss"] for r in val_fixed]
    assert all(r["loss"] == r["loss_fresh"] != r["loss_fixed"] for r in val_both)
    assert all(set(r) == {"step", "split", "loss", "tokens"} for r in val_fixed)
    summary = json.loads((both / "summary.json").read_text())
    assert summary["val_estimators"] == ["fresh", "fixed"]
    assert summary["best_val_loss"] == summary["best_val_loss_fresh"] == min(r["loss_fresh"] for r in val_both)
    assert summary["best_val_loss_fixed"] == min(r["loss_fixed"] for r in val_both)
    bad = subprocess.run([sys.executable, "-m", "nano.train", *nano_args(nano_data, tmp_path / "bad", "cd"),
                          "--set", "train.eval_batches=[fresh, random]"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "train.eval_batches must be a non-empty list of distinct estimators" in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_fresh_batches_change_every_evaluation_and_resume_from_their_state(nano_data):
    from harness.data import LMEvaluation
    from harness.run import Run
    from harness.token_bins import TokenBins
    from nano.model import GPT, GPTConfig

    import torch

    run = Run(cfg={"seed": 3}, dir=Path("unused"), device=torch.device("cpu"))
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=70)).eval()
    evaluate = LMEvaluation(run, TokenBins(nano_data, nano.DATA), 4, 8, 5, ["fresh", "fixed"])
    with torch.no_grad():
        first = evaluate(model, 0)[0]
        state = evaluate.state_dict()
        second = evaluate(model, 1)[0]
        evaluate.load_state_dict(state)
        again = evaluate(model, 1)[0]
    assert first["loss_fixed"] == second["loss_fixed"] and first["loss_fresh"] != second["loss_fresh"]
    assert again == second



def test_batched_evaluation_gives_the_per_batch_losses_to_rounding(nano_data, monkeypatch):
    """Several batches per forward pass (the GPU setting) changes no loss beyond rounding."""
    import torch

    from harness import data
    from harness.run import Run
    from harness.token_bins import TokenBins
    from nano.model import GPT, GPTConfig

    run = Run(cfg={"seed": 3}, dir=Path("unused"), device=torch.device("cpu"))
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=70)).eval()
    evaluate = lambda: data.LMEvaluation(run, TokenBins(nano_data, nano.DATA), 4, 8, 7, ["fixed"])(model, 0)
    with torch.no_grad():
        one = evaluate()[0]["loss"]
        monkeypatch.setitem(data.EVAL_TOKENS_PER_FORWARD, "cpu", 3 * 4 * 8)  # 3 batches a pass, then 1
        batched = evaluate()[0]["loss"]
    assert abs(batched - one) <= 1e-6 * one


def test_trainer_takes_param_groups_or_an_optimizer(nano_data, tmp_path):
    """An experiment hands the Trainer param groups (the run's optimizer and hyperparameters,
    a group's own keys winning) or a ready optimizer; the run resumes with them exactly."""
    import torch

    from harness.data import LMEvaluation, RandomTokenBatches
    from harness.loop import Trainer
    from harness.run import start
    from harness.signals import Interrupted
    from harness.token_bins import TokenBins
    from nano.model import GPT, GPTConfig

    def groups(model):  # the usual split: no weight decay on biases and norms
        matrices = [p for p in model.parameters() if p.dim() >= 2]
        return [{"params": matrices}, {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]

    def trainer(out, optimizer, extra=()):
        run = start("nano", nano_args(nano_data, out, "cd", 1, "--set", "optimizer.weight_decay=0.05", *extra))
        bins = TokenBins(nano_data, nano.DATA)
        m = run.cfg["model"]
        model = GPT(GPTConfig(**{**m, "vocab_size": bins.vocab_size}))
        return Trainer(run, model, RandomTokenBatches(bins, 8, m["block_size"], run.seed),
                       loss_fn=lambda model, xy: (model(*xy)[1], {}),
                       evaluate=LMEvaluation(run, bins, 8, m["block_size"], 2), total_steps=12, eval_interval=4,
                       optimizer=optimizer)

    t = trainer(tmp_path / "groups", groups)
    assert [g["weight_decay"] for g in t.optimizer.param_groups] == [0.05, 0.0]
    assert [g["c"] for g in t.optimizer.param_groups] == [t.run.cfg["optimizer"]["c"]] * 2
    assert t.fit()["status"] == "completed"
    os.environ[STOP_AFTER_ENV] = "6"
    try:
        with pytest.raises(Interrupted, match="interrupted at step 6"):
            trainer(tmp_path / "parts", groups).fit()
    finally:
        del os.environ[STOP_AFTER_ENV]
    trainer(tmp_path / "parts", groups).fit()
    assert records(tmp_path / "parts") == records(tmp_path / "groups")
    ready = trainer(tmp_path / "ready", lambda model: torch.optim.SGD(model.parameters(), lr=0.1))
    assert isinstance(ready.optimizer, torch.optim.SGD) and ready.fit()["status"] == "completed"


def test_cpu_precision_bf16_autocasts_on_the_cpu_and_says_so(nano_data, tmp_path):
    runs = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        assert nano_train.main(nano_args(nano_data, out, "adam", 1, "--set", f"train.cpu_precision={precision}")) == 0
        assert json.loads((out / "summary.json").read_text())["precision"] == precision
        runs[precision] = [r["loss"] for r in records(out) if r["split"] == "val"]
    # bf16 rounds the forward pass (8 significant bits): close to fp32, not the same numbers.
    assert runs["bf16"] != runs["fp32"]
    assert all(abs(a - b) < 0.05 for a, b in zip(runs["bf16"], runs["fp32"]))
    with pytest.raises(Exception, match="train.cpu_precision must be fp32 or bf16, got 'fp16'"):
        from harness.run import start

        start("nano", nano_args(nano_data, tmp_path / "fp16", "adam", 1, "--set", "train.cpu_precision=fp16"))

"""harness/loop.py in-process with a one-weight model and batches that are just numbers (a few
milliseconds per step): the evaluation cadence, the ``train`` records' means, the best record, the
divergence rules, stopping and resuming, the checkpoint and the summary. The expected values are
worked out by hand from the module's docstrings: batch ``i`` has loss ``i`` (or a loss set per
batch), so every mean in a record is a small sum."""
import contextlib
import json
import math
import sys

import pytest
import torch
import torch._dynamo  # noqa: F401  the first optimizer imports it (3 s): here, mutmut's fork server holds it
from torch import nn

from harness import checkpoint as ckpt
from harness import config as config_lib
from harness import loop
from harness import run as harness_run
from harness.errors import UsageError
from harness.loop import STOP_AFTER_ENV, Trainer, TrainState
from harness.run import Run
from harness.signals import Interrupted


class Batches:
    """Micro-batch ``i`` is the number ``values[i]`` (default ``i``); remembers where each pass started."""

    def __init__(self, values=None):
        self.values, self.starts, self.extra = values, [], torch.tensor([0])

    def batches(self, start):
        self.starts.append(start)
        i = start
        while True:
            yield torch.tensor(float(self.values[i] if self.values else i))
            i += 1

    def state_dict(self):
        return {"extra": self.extra.clone()}

    def load_state_dict(self, state):
        self.extra = state["extra"].clone()


def loss_fn(model, batch):
    """The batch's number as the loss (plus 0 x the weight, so that there is a gradient path)."""
    loss = model.weight.sum() * 0 + batch
    return loss, {"acc": batch / 10}


class Evaluate:
    """``val`` records with the loss ``losses[k]`` at the k-th evaluation (default 10 - step)."""

    def __init__(self, losses=None, estimators=None):
        self.losses, self.calls, self.training = losses, [], []
        if estimators:
            self.estimators = estimators

    def __call__(self, model, step):
        self.training.append(model.training)
        self.calls.append(step)
        loss = self.losses[len(self.calls) - 1] if self.losses else 10.0 - step
        return [{"split": "val", "loss": loss, "acc": -loss}, {"split": "test", "loss": 100.0 + step}]


def make_run(tmp_path, optimizer="msgd", precision="fp32", sets=(), name="run"):
    cfg = config_lib.resolve("nano", optimizer, 1, None, ["train.batch_size=2", *sets])
    return Run(cfg=cfg, dir=tmp_path / name, device=torch.device("cpu"), precision=precision)


def model():
    torch.manual_seed(0)
    return nn.Linear(1, 1, bias=False)


def records(run):
    return [json.loads(line) for line in (run.dir / "metrics.jsonl").read_text().splitlines()]


def strip(rs):
    return [{k: v for k, v in r.items() if k != "time_s"} for r in rs]


def fit(run, data=None, evaluate=None, **kwargs):
    kwargs.setdefault("total_steps", 5)
    kwargs.setdefault("eval_interval", 2)
    return Trainer(run, model(), data or Batches(), loss_fn, evaluate or Evaluate(), **kwargs).fit()


# ---------------------------------------------------------------- the loop

def test_fit_evaluates_on_the_interval_and_logs_the_mean_training_loss(tmp_path):
    run, data, evaluate = make_run(tmp_path), Batches(), Evaluate()
    summary = fit(run, data, evaluate, also_evaluate_at=[5, 9], steps_per_epoch=4, tokens_per_step=3)
    assert evaluate.calls == [0, 2, 4, 5] and evaluate.training == [False] * 4  # evaluated in eval mode
    assert data.starts == [0]
    rs = strip(records(run))
    assert [(r["step"], r["split"]) for r in rs] == [
        (0, "val"), (0, "test"), (2, "train"), (2, "val"), (2, "test"), (4, "train"), (4, "val"), (4, "test"),
        (5, "train"), (5, "val"), (5, "test")]
    # steps 1, 2 took batches 0, 1; steps 3, 4 took 2, 3; step 5 took 4
    assert rs[2] == {"step": 2, "split": "train", "loss": 0.5, "acc": pytest.approx(0.05), "epoch": 0.5,
                     "tokens": 6}
    assert [r["loss"] for r in rs if r["split"] == "train"] == [0.5, 2.5, 4.0]
    assert rs[0] == {"step": 0, "split": "val", "loss": 10.0, "acc": -10.0, "epoch": 0.0, "tokens": 0}
    assert all(r["time_s"] >= 0 for r in records(run))
    assert summary["status"] == "completed" and summary["steps"] == 5 and summary["total_steps"] == 5
    assert summary["best"] == {"split": "val", "key": "loss", "value": 5.0, "step": 5}
    assert summary["final"] == {"train": {"step": 5, "loss": 4.0, "acc": pytest.approx(0.4), "epoch": 1.25,
                                          "tokens": 15, "time_s": summary["final"]["train"]["time_s"]},
                                "val": {**{k: v for k, v in records(run)[-2].items() if k != "split"}},
                                "test": {**{k: v for k, v in records(run)[-1].items() if k != "split"}}}
    assert (summary["best_val_loss"], summary["best_val_acc"]) == (5.0, -5.0)
    assert summary["tokens_per_s"] == pytest.approx(3 * summary["steps_per_s"])
    assert (summary["experiment"], summary["optimizer"], summary["seed"]) == ("nano", "msgd", 1)
    assert summary["hyperparameters"] == {"lr": 0.09791, "momentum": 0.9005}
    assert (summary["world_size"], summary["device"], summary["precision"]) == (1, "cpu", "fp32")
    assert "val_estimators" not in summary and "mfu" not in summary
    assert summary["versions"]["torch"] == torch.__version__  # what ran it
    assert json.loads((run.dir / "summary.json").read_text())["status"] == "completed"
    saved = ckpt.load(run.dir / "checkpoint.pt")
    assert saved["step"] == 5 and saved["metrics_offset"] == (run.dir / "metrics.jsonl").stat().st_size
    assert saved["config"] == run.cfg and saved["evaluate"] is None and saved["running_n"] == 0
    assert saved["best"] == summary["best"] and saved["first_eval"] == 10.0
    assert ckpt.load(run.dir / "checkpoint.prev.pt")["step"] == 4  # step 5 saved once (after its evaluation)
    assert 0 < saved["wall_time_s"] <= summary["wall_time_s"]


def test_gradient_accumulation_averages_the_micro_batches(tmp_path):
    run, data = make_run(tmp_path, sets=["train.gradient_accumulation_steps=2"]), Batches()
    fit(run, data, total_steps=4, eval_interval=2)
    # step 1: batches 0, 1; step 2: 2, 3 -> the first train record is the mean of 0.5 and 2.5
    assert [r["loss"] for r in records(run) if r["split"] == "train"] == [1.5, 5.5]
    assert data.starts == [0]


def noisy_loss(model, batch):
    """The batch's number plus a draw of torch's generator: a resume must restore its state."""
    loss = model.weight.sum() * 0 + batch + torch.rand(())
    return loss, {"acc": batch / 10}


def test_a_resume_logs_what_the_uninterrupted_run_would_have(tmp_path, monkeypatch, capsys):
    sets = ["train.gradient_accumulation_steps=2"]
    whole = make_run(tmp_path, sets=sets, name="whole")
    torch.manual_seed(0)
    Trainer(whole, model(), Batches(), noisy_loss, Evaluate(), total_steps=6, eval_interval=4).fit()
    run, data = make_run(tmp_path, sets=sets), Batches()
    monkeypatch.setenv(STOP_AFTER_ENV, "3")
    torch.manual_seed(0)
    with pytest.raises(Interrupted, match=f"{run.dir}: interrupted at step 3"):
        Trainer(run, model(), data, noisy_loss, Evaluate(), total_steps=6, eval_interval=4).fit()
    assert json.loads((run.dir / "summary.json").read_text())["status"] == "interrupted"
    assert ckpt.load(run.dir / "checkpoint.pt")["step"] == 3 and ckpt.load(run.dir / "checkpoint.pt")["running_n"] == 3
    monkeypatch.setenv(STOP_AFTER_ENV, "")
    with open(run.dir / "metrics.jsonl", "a") as f:  # a record the checkpoint does not count (a crash after it)
        f.write('{"step": 3, "split": "val", "loss": 0.0}\n')
    saved = ckpt.load(run.dir / "checkpoint.pt")
    data, evaluate = Batches(), Evaluate()
    torch.manual_seed(123)  # not the interrupted process's state: the checkpoint's is restored
    summary = Trainer(run, model(), data, noisy_loss, evaluate, total_steps=6, eval_interval=4).fit()
    assert summary["status"] == "completed" and f"Resuming {run.dir} from step 3\n" in capsys.readouterr().out
    assert data.starts == [6]  # 3 steps x 2 micro-batches
    assert evaluate.calls == [4]  # step 0's evaluation was before the stop
    assert strip(records(run)) == strip(records(whole))
    assert summary["wall_time_s"] >= saved["wall_time_s"] > 0


def test_a_resume_does_not_redo_the_evaluation_it_stopped_at(tmp_path, monkeypatch):
    run = make_run(tmp_path)
    monkeypatch.setenv(STOP_AFTER_ENV, "2")
    with pytest.raises(Interrupted):
        fit(run, total_steps=4, eval_interval=2)
    monkeypatch.delenv(STOP_AFTER_ENV)
    evaluate = Evaluate()
    fit(run, evaluate=evaluate, total_steps=4, eval_interval=2)
    assert evaluate.calls == [4]
    assert [(r["step"], r["split"]) for r in records(run)].count((2, "val")) == 1


def test_stop_after_counts_the_steps_of_this_process(tmp_path, monkeypatch):
    run = make_run(tmp_path)
    for value, steps in (("0", 5), ("", 5)):  # 0 or empty: no stop
        monkeypatch.setenv(STOP_AFTER_ENV, value)
        assert fit(make_run(tmp_path, name=f"r{value}"))["steps"] == steps
    monkeypatch.setenv(STOP_AFTER_ENV, "1")
    with pytest.raises(Interrupted, match="at step 1$"):
        fit(run)
    with pytest.raises(Interrupted, match="at step 2$"):  # one more step in the next process
        fit(run)


def test_a_non_finite_training_loss_ends_the_run_as_diverged(tmp_path, capsys):
    run = make_run(tmp_path, sets=["train.log_interval=2"])
    values = [0.0, 1.0, math.nan, 3.0, 4.0, 5.0, 6.0, 7.0]
    summary = fit(run, Batches(values), total_steps=8, eval_interval=8)
    # checked every 2 steps: step 4 took batch 3 (finite) but the running mean holds step 3's NaN
    assert summary["status"] == "diverged" and summary["steps"] == 4
    last = records(run)[-1]
    assert (last["step"], last["split"], last["loss"]) == (4, "train", 3.0)  # the step's own loss
    assert f"{run.dir}: diverged after 4 steps, best val loss 10.0000 at step 0" in capsys.readouterr().out
    run = make_run(tmp_path, sets=["train.log_interval=2"], name="late")
    values = [0.0, 1.0, 2.0, 3.0, 4.0, math.inf, 6.0, 7.0]
    assert fit(run, Batches(values), total_steps=8, eval_interval=8)["steps"] == 6
    assert records(run)[-1]["loss"] == "inf" and records(run)[-1]["step"] == 6  # step 6 took batch 5


def test_a_non_finite_or_blown_up_evaluated_loss_ends_the_run(tmp_path):
    run = make_run(tmp_path)
    summary = fit(run, evaluate=Evaluate([3.0, math.nan]), total_steps=6, eval_interval=2)
    assert summary["status"] == "diverged" and summary["steps"] == 2
    assert not (run.dir / "checkpoint.pt").exists() or ckpt.load(run.dir / "checkpoint.pt")["step"] == 0
    # diverge_factor 2: above 2 x the first evaluation's loss (3.0) diverged; 6.0 is not above
    run = make_run(tmp_path, sets=["train.diverge_factor=2"], name="factor")
    assert fit(run, evaluate=Evaluate([3.0, 6.0, 6.5, 1.0]), total_steps=6, eval_interval=2)["steps"] == 4
    run = make_run(tmp_path, name="off")  # 0: off
    assert fit(run, evaluate=Evaluate([3.0, 6.0, 600.0, 1.0]), total_steps=6, eval_interval=2)["status"] == "completed"


def test_blew_up_reads_the_selected_splits_loss():
    t = Trainer.__new__(Trainer)
    t.select, t.state = ("val", "acc", "max"), TrainState()
    t.cfg = config_lib.TrainConfig(batch_size=2, diverge_factor=2.0)
    assert not t._blew_up([{"split": "test", "loss": 1.0}, {"split": "val", "acc": 3}])  # no val loss: no rule
    assert t.state.first_eval is None
    assert not t._blew_up([{"split": "test", "loss": 50.0}, {"split": "val", "loss": 4.0}])
    assert t.state.first_eval == 4.0
    assert not t._blew_up([{"split": "val", "loss": 8.0}]) and t._blew_up([{"split": "val", "loss": 8.5}])
    assert not t._blew_up([{"split": "test", "loss": 80.0}, {"split": "val", "loss": 1.0}])


def test_grad_clip_clips_the_global_norm(tmp_path):
    sets = ["optimizer.lr=1", "optimizer.momentum=0", "train.log_interval=1"]

    def steep(model, batch):  # gradient 3 per step on the single weight
        return model.weight.sum() * 3, {}

    for clip, accumulation, move in ((0.0, 1, 3.0), (0.5, 1, 0.5), (5.0, 1, 3.0), (0.0, 2, 3.0)):
        # with 2 micro-batches the gradient is their mean: still 3
        run = make_run(tmp_path, sets=[*sets, f"train.grad_clip={clip}",
                                       f"train.gradient_accumulation_steps={accumulation}"], name=f"c{clip}-{accumulation}")
        trainer = Trainer(run, model(), Batches(), steep, Evaluate(), total_steps=1, eval_interval=5)
        before = trainer.raw.weight.item()
        trainer.fit()
        assert before - trainer.raw.weight.item() == pytest.approx(move), clip


def test_select_max_keeps_the_best_and_calls_on_best(tmp_path):
    run, kept = make_run(tmp_path), []
    losses = [5.0, 3.0, 4.0, 1.0]  # acc = -loss: best at the 4th evaluation (step 6)
    summary = fit(run, evaluate=Evaluate(losses), total_steps=6, eval_interval=2, select=("val", "acc", "max"),
                  on_best=lambda state, record: kept.append((sorted(state), record["step"], record["acc"])))
    assert kept == [(["weight"], 0, -5.0), (["weight"], 2, -3.0), (["weight"], 6, -1.0)]
    assert summary["best"] == {"split": "val", "key": "acc", "value": -1.0, "step": 6}


def test_an_optimizer_or_param_groups_from_the_caller(tmp_path):
    run = make_run(tmp_path)
    trainer = Trainer(run, model(), Batches(), loss_fn, Evaluate(), total_steps=1, eval_interval=1,
                      optimizer=lambda m: [{"params": list(m.parameters()), "lr": 0.25}])
    assert isinstance(trainer.optimizer, torch.optim.SGD) and trainer.optimizer.param_groups[0]["lr"] == 0.25
    assert trainer.optimizer.param_groups[0]["momentum"] == 0.9005  # the run's other hyperparameters
    own = torch.optim.Adam(model().parameters())
    run = make_run(tmp_path, name="own")
    assert Trainer(run, model(), Batches(), loss_fn, Evaluate(), total_steps=1, eval_interval=1,
                   optimizer=lambda m: own).optimizer is own
    run = make_run(tmp_path, name="default")
    t = Trainer(run, model(), Batches(), loss_fn, Evaluate(), total_steps=1, eval_interval=1)
    assert [p for g in t.optimizer.param_groups for p in g["params"]] == list(t.raw.parameters())
    assert t.optimizer.param_groups[0]["lr"] == 0.09791


def test_the_summary_names_the_estimators_and_the_cpus_flops(tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "matmul_peak_flops", lambda: 4e9)

    class Estimators(Evaluate):
        def __call__(self, model, step):
            return [{"split": "val", "loss": 9.0 - step, "loss_fixed": 20.0 + step, "loss_fresh": 9.0 - step}]

    run = make_run(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)  # not this machine's core count: the summary must read torch's setting
    try:
        summary = fit(run, evaluate=Estimators(estimators=("fresh", "fixed")), flops_per_step=2e6)
    finally:
        torch.set_num_threads(threads)
    assert summary["val_estimators"] == ["fresh", "fixed"]
    assert (summary["best_val_loss"], summary["best_val_loss_fixed"], summary["best_val_loss_fresh"]) == (5.0, 20.0, 5.0)
    assert summary["mfu"] is None  # no GPU peak on the CPU
    assert summary["cpu_flops_per_s"] == pytest.approx(2e6 * summary["steps_per_s"])
    assert summary["cpu_flops_utilization"] == pytest.approx(summary["cpu_flops_per_s"] / 4e9)
    assert "tokens_per_s" not in summary
    assert summary["cpu_threads"] == 3  # what the wall time ran on


def test_the_evaluate_state_goes_into_the_checkpoint(tmp_path, monkeypatch):
    class Stateful(Evaluate):
        def __init__(self):
            super().__init__()
            self.state = torch.tensor([1])

        def state_dict(self):
            return {"s": self.state.clone()}

        def load_state_dict(self, state):
            self.state = state["s"]

    run, evaluate = make_run(tmp_path), Stateful()
    evaluate.state = torch.tensor([7])
    monkeypatch.setenv(STOP_AFTER_ENV, "1")
    data = Batches()
    data.extra = torch.tensor([42])
    with pytest.raises(Interrupted):
        fit(run, data, evaluate)
    saved = ckpt.load(run.dir / "checkpoint.pt")
    assert saved["evaluate"]["s"].tolist() == [7] and saved["data"][0]["extra"].tolist() == [42]
    monkeypatch.delenv(STOP_AFTER_ENV)
    evaluate, data = Stateful(), Batches()
    fit(run, data, evaluate)
    assert evaluate.state.tolist() == [7] and data.extra.tolist() == [42]


def test_a_checkpoint_whose_records_were_lost_falls_back_or_is_refused(tmp_path, monkeypatch):
    run = make_run(tmp_path)
    monkeypatch.setenv(STOP_AFTER_ENV, "3")
    with pytest.raises(Interrupted):
        fit(run)
    trainer = Trainer(make_run(tmp_path), model(), Batches(), loss_fn, Evaluate(), total_steps=5, eval_interval=2)
    size = (run.dir / "metrics.jsonl").stat().st_size
    assert trainer._records_kept({"metrics_offset": size}) is None
    assert trainer._records_kept({"metrics_offset": 0}) is None
    assert trainer._records_kept({"metrics_offset": size + 1}) == \
        f"counts {size + 1} bytes of metrics.jsonl, which holds {size} bytes (records lost)"
    (run.dir / "metrics.jsonl").unlink()
    assert trainer._records_kept({"metrics_offset": 7}) == "counts 7 bytes of metrics.jsonl, which is missing (records lost)"
    assert trainer._records_kept({"metrics_offset": 0}) is None


def test_an_fp16_run_cannot_resume_a_checkpoint_without_loss_scaling(tmp_path, monkeypatch, capsys):
    run = make_run(tmp_path)
    monkeypatch.setenv(STOP_AFTER_ENV, "1")
    with pytest.raises(Interrupted):
        fit(run)
    monkeypatch.delenv(STOP_AFTER_ENV)
    half = make_run(tmp_path, precision="fp16")
    trainer = Trainer(half, model(), Batches(), loss_fn, Evaluate(), total_steps=5, eval_interval=2)
    assert trainer.scaler.is_enabled()
    with pytest.raises(UsageError, match="was saved by a process without fp16 loss scaling"):
        trainer.fit()  # the resume checks the checkpoint's scaler
    trainer = Trainer(half, model(), Batches(), loss_fn, Evaluate(), total_steps=5, eval_interval=2)
    assert refused(trainer._check_scaler, {}) == (
        f"{half.dir / 'checkpoint.pt'} was saved by a process without fp16 loss scaling (on the CPU, or not in fp16) "
        "but this one trains in fp16 with loss scaling on cpu: resume it where it ran (on the CPU: "
        "CUDA_VISIBLE_DEVICES=), or start a new --out")
    trainer._check_scaler({"scale": 1.0})
    plain = Trainer(make_run(tmp_path), model(), Batches(), loss_fn, Evaluate(), total_steps=5, eval_interval=2)
    capsys.readouterr()
    plain._check_scaler({})
    assert capsys.readouterr().err == ""
    plain._check_scaler({"scale": 1.0})
    assert capsys.readouterr().err == (f"warning: {plain.ckpt_path} was saved with fp16 loss scaling; this process "
                                       "runs fp32 on cpu without it\n")
    plain.run.rank = 1  # only rank 0 warns
    plain._check_scaler({"scale": 1.0})
    assert capsys.readouterr().err == ""


def refused(call, *args):
    with pytest.raises(UsageError) as error:
        call(*args)
    return str(error.value)


# ---------------------------------------------------------------- the train state

def test_train_state_means_and_best():
    s = TrainState()
    s.add({"loss": torch.tensor(2.0), "acc": torch.tensor(1.0)}, 0.5)
    s.add({"loss": torch.tensor(4.0), "acc": torch.tensor(0.0)}, 0.5)
    s.running_n = 1
    s.add({"loss": torch.tensor(6.0), "acc": torch.tensor(1.0)}, 1.0)
    s.running_n = 2
    run = Run(cfg={"seed": 0}, dir=None, device=torch.device("cpu"))
    assert s.take_means(run) == {"acc": 0.75, "loss": 4.5}
    assert (s.running, s.running_n) == ({}, 0)
    s.step = 3
    assert not s.improves({"split": "test", "loss": 1.0}, ("val", "loss", "min"))
    assert not s.improves({"split": "val", "acc": 1.0}, ("val", "loss", "min"))
    assert not s.improves({"split": "val", "loss": math.nan}, ("val", "loss", "min"))
    assert s.improves({"split": "val", "loss": "2.5"}, ("val", "loss", "min"))
    assert s.best == {"split": "val", "key": "loss", "value": 2.5, "step": 3}
    assert not s.improves({"split": "val", "loss": 2.5}, ("val", "loss", "min"))  # a tie is no improvement
    assert not s.improves({"split": "val", "loss": 3.0}, ("val", "loss", "min"))
    s.step = 4
    assert s.improves({"split": "val", "loss": 2.0}, ("val", "loss", "min")) and s.best["step"] == 4
    m = TrainState()
    assert m.improves({"split": "val", "acc": 0.5}, ("val", "acc", "max"))
    assert not m.improves({"split": "val", "acc": 0.4}, ("val", "acc", "max"))
    assert not m.improves({"split": "val", "acc": math.inf}, ("val", "acc", "max"))
    assert m.improves({"split": "val", "acc": 0.6}, ("val", "acc", "max")) and m.best["value"] == 0.6
    m.step = 9
    assert not m.improves({"split": "val", "acc": 0.6}, ("val", "acc", "max")) and m.best["step"] == 0  # a tie


def test_train_state_round_trips_and_resumes_on_another_number_of_ranks():
    run = Run(cfg={"seed": 0}, dir=None, device=torch.device("cpu"))
    s = TrainState(step=7, wall_time_s=3.5, best={"value": 1.0}, first_eval=2.0)
    s.add({"loss": torch.tensor(3.0)}, 1.0)
    s.running_n = 1
    state = s.state_dict(run)
    assert state == {"step": 7, "wall_time_s": 3.5, "best": {"value": 1.0}, "first_eval": 2.0,
                     "running": [{"loss": torch.tensor(3.0)}], "running_n": 1}
    back = TrainState()
    back.load_state_dict(state, run)
    assert (back.step, back.wall_time_s, back.best, back.first_eval, back.running_n) == (7, 3.5, {"value": 1.0}, 2.0, 1)
    assert back.running == {"loss": torch.tensor(3.0)}
    older = {**state, "running": {"loss": torch.tensor(5.0)}}  # rank 0's dict alone, no first_eval
    del older["first_eval"]
    back.load_state_dict(older, run)
    assert back.running == {"loss": torch.tensor(5.0)} and back.first_eval is None
    two = {**state, "running": [{"loss": torch.tensor(2.0)}, {"loss": torch.tensor(6.0)}]}
    back.load_state_dict(two, run)  # saved by 2 ranks, resumed by 1: their mean
    assert back.running == {"loss": torch.tensor(4.0)}
    run.rank, run.world_size = 1, 2
    back.load_state_dict(two, run)  # the same number of ranks: its own
    assert back.running == {"loss": torch.tensor(6.0)}


# ---------------------------------------------------------------- helpers

def test_peak_flops_and_mfu(monkeypatch):
    assert loop.peak_flops(torch.device("cpu")) is None and loop.estimate_mfu(1e12, torch.device("cpu")) is None
    cuda = torch.device("cuda", 1)
    for name, peak in (("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
                       ("NVIDIA A100-SXM4-40GB", 312e12), ("NVIDIA L40S", 362e12), ("NVIDIA L40", 181e12),
                       ("Tesla T4", None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name if device == cuda else "?")
        assert loop.peak_flops(cuda) == peak, name
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    assert loop.estimate_mfu(156e12, cuda) == 0.5


def test_throughput_postfix(tmp_path, monkeypatch):
    t = Trainer(make_run(tmp_path), model(), Batches(), loss_fn, Evaluate(), total_steps=5, eval_interval=2)
    t.state.step = 30
    t._rate_from = (100.0, 10)
    monkeypatch.setattr(loop.time, "time", lambda: 108.0)
    assert t._throughput(1.23456) == {"loss": "1.2346", "it/s": "2.50"}
    assert t._rate_from == (108.0, 30)
    monkeypatch.setattr(loop, "estimate_mfu", lambda flops, device: flops / 1e3 if device == torch.device("cpu") else 0)
    t.flops_per_step, t._rate_from = 40.0, (100.0, 10)
    assert t._throughput(2.0) == {"loss": "2.0000", "it/s": "2.50", "mfu": "10.0%"}
    t._rate_from = (107.5, 20)  # 10 steps in half a second
    assert t._throughput(2.0)["it/s"] == "20.00"


# ---------------------------------------------------------------- several processes, with fakes of torch.distributed
# (the real multi-process runs are test_sharded.py's and test_gpu_path.py's, in subprocesses)

class Bar:
    def __init__(self):
        self.updates, self.postfixes = 0, []

    def update(self, n):
        self.updates += n

    def set_postfix(self, postfix):
        self.postfixes.append(postfix)


def test_gather_and_take_means_over_ranks(monkeypatch):
    run = Run(cfg={"seed": 0}, dir=None, device=torch.device("cpu"), world_size=3)
    monkeypatch.setattr(loop.dist, "all_gather_object", lambda out, obj: out.__setitem__(slice(None), [obj, 1, 2]))
    assert loop._gather(run, "mine") == ["mine", 1, 2]
    run.world_size = 1
    assert loop._gather(run, "mine") == ["mine"]
    run.world_size = 2
    monkeypatch.setattr(loop.dist, "all_reduce", lambda t: t.add_(torch.tensor([4.0, 8.0])))  # the other rank's
    s = TrainState(running={"acc": torch.tensor(2.0), "loss": torch.tensor(4.0)}, running_n=2)
    # this rank's means 1 and 2 (sums over 2 steps), the other's 4 and 8: the mean over both ranks
    assert s.take_means(run) == {"acc": 2.5, "loss": 5.0}


def test_interrupted_asks_the_other_ranks_only_every_log_interval(tmp_path, monkeypatch):
    t = Trainer.__new__(Trainer)
    t.run, t.state = make_run(tmp_path), TrainState(step=3)
    t.cfg = config_lib.TrainConfig(batch_size=2, log_interval=10)
    asked = []
    monkeypatch.setattr(Run, "any_rank", lambda self, flag: asked.append(flag) or flag)
    assert t._interrupted(True) is True and asked == [True]  # one process: at every step
    t.run.world_size = 2
    assert t._interrupted(True) is False and asked == [True]
    t.state.step = 20
    assert t._interrupted(True) is True and t._interrupted(False) is False and asked == [True, True, False]


def test_broadcast_buffers_sends_rank_0s(monkeypatch):
    t = Trainer.__new__(Trainer)
    t.buffers = [torch.zeros(1), torch.ones(2)]
    sent = []
    monkeypatch.setattr(loop.dist, "broadcast", lambda tensor, src: sent.append((tensor, src)))
    t._broadcast_buffers()
    assert [(b is t.buffers[i], src) for i, (b, src) in enumerate(sent)] == [(True, 0), (True, 0)]


def test_on_best_under_fsdp2_gathers_the_weights_on_every_rank(tmp_path, monkeypatch):
    t = Trainer.__new__(Trainer)
    t.run, t.fsdp, t.raw, called, gathered = make_run(tmp_path), True, "sharded model", [], []
    t.on_best = lambda state, record: called.append((state, record))
    monkeypatch.setattr(loop.par, "full_model_state_dict", lambda m: gathered.append(m) or {"full": m})
    t._call_on_best(None)
    assert (called, gathered) == ([], [])  # no rank improved: no collective
    t._call_on_best({"step": 2})
    assert called == [({"full": "sharded model"}, {"step": 2})] and gathered == ["sharded model"]
    t.run.rank = 1  # another rank improved (any_rank says so): this one gathers too, and keeps nothing
    monkeypatch.setattr(Run, "any_rank", lambda self, flag: True)
    t._call_on_best(None)
    assert len(called) == 1 and gathered == ["sharded model"] * 2


def test_train_step_syncs_gradients_only_after_the_last_micro_batch(tmp_path, monkeypatch):
    run = make_run(tmp_path, sets=["train.gradient_accumulation_steps=3", "train.log_interval=1"])
    t = Trainer(run, model(), Batches(), loss_fn, Evaluate(), total_steps=2, eval_interval=2)
    t.pbar, t._rate_from, syncs, sent = Bar(), (0.0, 0), [], []
    t.fsdp = True  # FSDP2: the module's own switch, and rank 0's buffers after each forward
    t.raw.set_requires_gradient_sync = syncs.append
    t.buffers = [torch.zeros(1)]
    monkeypatch.setattr(loop.dist, "broadcast", lambda tensor, src: sent.append(src))
    assert t.train_step(iter(Batches().batches(0)))
    assert syncs == [False, False, True] and sent == [0, 0, 0]
    assert t.pbar.updates == 1 and t.pbar.postfixes[0]["loss"] == "2.0000"  # the last micro-batch's loss
    t.fsdp, syncs[:] = False, []
    run.world_size = 2  # DDP: no_sync() around every micro-batch but the last
    entered = []

    class DDP(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.weight = inner.weight

        def no_sync(self):
            entered.append(True)
            return contextlib.nullcontext()

    t.model = DDP(t.raw)
    assert t.train_step(iter(Batches().batches(3)))
    assert entered == [True, True] and syncs == [] and t.state.step == 2


class Progress:
    """A stand-in for tqdm: what the loop shows."""

    made = []

    def __init__(self, **kwargs):
        self.kwargs, self.updates, self.postfixes, self.closed = kwargs, 0, [], False
        Progress.made.append(self)

    def update(self, n):
        self.updates += n

    def set_postfix(self, postfix):
        self.postfixes.append(postfix)

    def close(self):
        self.closed = True


def test_the_progress_bar_and_the_modes_of_training_and_evaluation(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(loop, "tqdm", Progress)
    monkeypatch.setenv("TQDM_DISABLE", "")
    Progress.made.clear()
    seen = []

    def watched_loss(model, batch):
        seen.append(("train", model.training, torch.is_grad_enabled(), torch.is_autocast_enabled("cpu")))
        return loss_fn(model, batch)

    class Watched(Evaluate):
        def __call__(self, model, step):
            seen.append(("eval", model.training, torch.is_grad_enabled(), torch.is_autocast_enabled("cpu")))
            return super().__call__(model, step) + [{"split": "val2", "acc": 0.5}]  # a record without a loss

    run = make_run(tmp_path, precision="bf16", sets=["train.log_interval=2"])
    Trainer(run, model(), Batches(), watched_loss, Watched(), total_steps=4, eval_interval=2).fit()
    assert set(seen) == {("train", True, True, True), ("eval", False, False, True)}
    bar, = Progress.made
    assert bar.kwargs == {"total": 4, "initial": 0, "disable": False, "dynamic_ncols": True, "desc": "nano msgd s1"}
    assert bar.updates == 4 and bar.closed
    evals = [p for p in bar.postfixes if "val_loss" in p]
    assert evals == [{"val_loss": "10.0000", "test_loss": "100.0000"}, {"val_loss": "8.0000", "test_loss": "102.0000"},
                     {"val_loss": "6.0000", "test_loss": "104.0000"}]
    steps = [p for p in bar.postfixes if "loss" in p]
    assert [p["loss"] for p in steps] == ["1.0000", "3.0000"] and all("it/s" in p for p in steps)
    assert capsys.readouterr().out.endswith(f"{run.dir}: completed after 4 steps, best val loss 6.0000 at step 4\n")
    # rank 1 shows no bar; nor does rank 0 with TQDM_DISABLE set
    monkeypatch.setenv("TQDM_DISABLE", "1")
    fit(make_run(tmp_path, name="quiet"), total_steps=1)
    assert Progress.made[-1].kwargs["disable"] is True
    monkeypatch.setenv("TQDM_DISABLE", "0")
    fit(make_run(tmp_path, name="zero"), total_steps=1)
    assert Progress.made[-1].kwargs["disable"] is False


def test_a_run_without_a_best_says_so_in_one_line(tmp_path, capsys):
    class NoVal(Evaluate):
        def __call__(self, model, step):
            return [{"split": "test", "loss": 1.0}]

    run = make_run(tmp_path)
    summary = fit(run, evaluate=NoVal(), total_steps=2)
    assert summary["best"] is None and "best_val_loss" not in summary
    assert capsys.readouterr().out.endswith(f"{run.dir}: completed after 2 steps\n")


def test_a_fresh_start_drops_records_no_checkpoint_counts(tmp_path):
    run = make_run(tmp_path)
    run.dir.mkdir()
    (run.dir / ".lock").write_text("")  # a run that was killed before its first checkpoint
    (run.dir / "metrics.jsonl").write_text('{"step": 0, "split": "val", "loss": 99.0}\n')
    fit(run, total_steps=2)
    assert [r["loss"] for r in records(run) if r["split"] == "val"] == [10.0, 8.0]


def quarter_second_steps(monkeypatch):
    """``loss_fn`` as a step that takes a quarter of a second on the loop's clock (a fake
    ``time`` module, starting at 100 s)."""
    clock = {"t": 100.0}
    monkeypatch.setattr(loop, "time", type(sys)("clock"))
    loop.time.time = lambda: clock["t"]

    def timed(model, batch):
        clock["t"] += 0.25
        return loss_fn(model, batch)

    return timed


def test_the_train_record_has_the_mfu_since_the_last_evaluation(tmp_path, monkeypatch):
    asked = []
    monkeypatch.setattr(loop, "estimate_mfu", lambda flops, device: asked.append((flops, device)) or 0.25)
    timed = quarter_second_steps(monkeypatch)

    run = make_run(tmp_path)
    Trainer(run, model(), Batches(), timed, Evaluate(), total_steps=4, eval_interval=2, flops_per_step=1e6).fit()
    trains = [r for r in records(run) if r["split"] == "train"]
    assert [r["mfu"] for r in trains] == [0.25, 0.25]
    # 2 steps of 1e6 FLOPs in the half second since each previous evaluation
    assert asked[:2] == [(4e6, torch.device("cpu")), (4e6, torch.device("cpu"))]
    run = make_run(tmp_path, name="none")
    fit(run, total_steps=4, eval_interval=2)  # no FLOPs given: no MFU
    assert all("mfu" not in r for r in records(run))


def test_a_rank_other_than_0_trains_and_writes_nothing(tmp_path):
    run = make_run(tmp_path)
    run.rank = 1  # one process acting as rank 1 (no group: every collective is its own)
    assert fit(run) is None  # the summary is rank 0's
    assert not run.dir.exists()


def test_one_process_never_shards(tmp_path):
    t = Trainer(make_run(tmp_path, sets=["train.parallel=fsdp2"]), model(), Batches(), loss_fn, Evaluate(),
                total_steps=1, eval_interval=1)
    assert t.fsdp is False and t.model is t.raw


def test_a_resume_falls_back_to_the_previous_checkpoint_when_records_were_lost(tmp_path, monkeypatch, capsys):
    run = make_run(tmp_path)
    monkeypatch.setenv(STOP_AFTER_ENV, "3")
    with pytest.raises(Interrupted):
        fit(run, eval_interval=3)  # checkpoints after the evaluations at steps 0 and 3, then it stops
    monkeypatch.delenv(STOP_AFTER_ENV)
    previous = ckpt.load(run.dir / "checkpoint.prev.pt")
    assert previous["step"] == 0 and ckpt.load(run.dir / "checkpoint.pt")["metrics_offset"] > previous["metrics_offset"]
    with open(run.dir / "metrics.jsonl", "r+b") as f:  # a node crash lost the records after step 0's checkpoint
        f.truncate(previous["metrics_offset"])
    capsys.readouterr()
    assert fit(run, eval_interval=3)["status"] == "completed"
    assert f"Resuming {run.dir} from step 0\n" in capsys.readouterr().out
    whole = make_run(tmp_path, name="whole")
    fit(whole, eval_interval=3)
    assert strip(records(run)) == strip(records(whole))


def test_fit_is_the_trainers_fit(tmp_path):
    run, data, evaluate = make_run(tmp_path), Batches(), Evaluate()
    summary = loop.fit(run, model(), data, loss_fn, evaluate, total_steps=3, eval_interval=2, tokens_per_step=5)
    assert summary["steps"] == 3 and evaluate.calls == [0, 2] and data.starts == [0]
    assert summary["tokens_per_s"] == pytest.approx(5 * summary["steps_per_s"])
    assert ckpt.load(run.dir / "checkpoint.pt")["step"] == 3  # no evaluation at step 3: saved as completed


def test_a_signal_stops_the_run_at_the_next_step_boundary_after_a_checkpoint(tmp_path):
    import os
    import signal

    def signalled(model, batch):  # the scheduler's SIGUSR1 arrives during step 3 (batch 2)
        if batch.item() == 2:
            os.kill(os.getpid(), signal.SIGUSR1)
        return loss_fn(model, batch)

    run = make_run(tmp_path)
    with pytest.raises(Interrupted, match="at step 3$"):
        Trainer(run, model(), Batches(), signalled, Evaluate(), total_steps=5, eval_interval=2).fit()
    assert ckpt.load(run.dir / "checkpoint.pt")["step"] == 3
    assert json.loads((run.dir / "summary.json").read_text())["status"] == "interrupted"


def interrupted_after_one_step(tmp_path, monkeypatch):
    """``(run, checkpoint)`` of a run stopped after its first step (``STOP_AFTER_ENV``)."""
    run = make_run(tmp_path)
    monkeypatch.setenv(STOP_AFTER_ENV, "1")
    with pytest.raises(Interrupted):
        fit(run)
    monkeypatch.delenv(STOP_AFTER_ENV)
    return run, ckpt.load(run.dir / "checkpoint.pt")


def test_a_resume_under_fsdp2_hands_the_full_states_to_the_shards(tmp_path, monkeypatch):
    run, saved = interrupted_after_one_step(tmp_path, monkeypatch)
    t = Trainer(make_run(tmp_path), model(), Batches(), loss_fn, Evaluate(), total_steps=5, eval_interval=2)
    t.fsdp, handed = True, []  # as on several processes with train.parallel fsdp2
    monkeypatch.setattr(loop.par, "load_full_state_dicts", lambda *args: handed.append(args))
    t.resume()
    (m, o, model_state, optim_state), = handed
    assert m is t.raw and o is t.optimizer and t.state.step == 1
    assert {k: v.tolist() for k, v in model_state.items()} == {k: v.tolist() for k, v in saved["model"].items()}
    assert optim_state["param_groups"] == saved["optimizer"]["param_groups"]


def test_a_checkpoint_of_several_processes_gathers_and_waits_for_every_rank(tmp_path, monkeypatch):
    t = Trainer(make_run(tmp_path), model(), Batches(), loss_fn, Evaluate(), total_steps=5, eval_interval=2)
    t.resume()
    t.run.world_size, t.fsdp, waits = 2, True, []  # rank 0 of 2 under FSDP2, the other rank faked
    full = ({"weight": torch.tensor([[7.0]])}, {"state": {}, "param_groups": [{"lr": 0.5, "params": [0]}]})
    monkeypatch.setattr(loop.par, "full_state_dicts",
                        lambda raw, optimizer: full if raw is t.raw and optimizer is t.optimizer else None)
    monkeypatch.setattr(loop.dist, "all_gather_object", lambda out, obj: out.__setitem__(slice(None), [obj, obj]))
    monkeypatch.setattr(loop.dist, "barrier", lambda: waits.append(1))
    t.state.step = 4
    t.checkpoint()
    saved = ckpt.load(t.ckpt_path)
    assert saved["model"]["weight"].tolist() == [[7.0]] and saved["optimizer"]["param_groups"][0]["lr"] == 0.5
    assert len(saved["data"]) == len(saved["rng"]) == len(saved["running"]) == 2 and waits == [1]
    t.checkpoint()  # the same step again: nothing
    assert waits == [1]
    summary = t.finish("interrupted")
    assert waits == [1, 1] and summary["world_size"] == 2 and summary["status"] == "interrupted"


def test_resume_wraps_the_model_as_configured(tmp_path, monkeypatch):
    compiled, wrapped = [], []
    monkeypatch.setattr(torch, "compile", lambda m: compiled.append(m) or ("compiled", m))
    monkeypatch.setattr(loop, "DistributedDataParallel", lambda m, device_ids: wrapped.append((m, device_ids)) or "ddp")
    t = Trainer(make_run(tmp_path, sets=["train.compile=true"]), model(), Batches(), loss_fn, Evaluate(),
                total_steps=1, eval_interval=1)
    t.resume()
    assert t.model == ("compiled", t.raw) and compiled == [t.raw] and wrapped == []
    for device, ids in ((torch.device("cpu"), None), (torch.device("cuda", 1), [torch.device("cuda", 1)])):
        t = Trainer(make_run(tmp_path, name=str(device)), model(), Batches(), loss_fn, Evaluate(), total_steps=1,
                    eval_interval=1)
        t.run.world_size, t.run.device = 2, device  # one of 2 processes, DDP (the default)
        t.resume()
        assert t.model == "ddp" and wrapped[-1] == (t.raw, ids)
    t = Trainer(make_run(tmp_path, name="fsdp"), model(), Batches(), loss_fn, Evaluate(), total_steps=1, eval_interval=1)
    t.run.world_size, t.fsdp = 2, True  # FSDP2 shards the module itself: no wrapper
    t.resume()
    assert t.model is t.raw and len(wrapped) == 2


def test_a_rank_beyond_the_saved_ones_resumes_from_the_last(tmp_path, monkeypatch):
    run, saved = interrupted_after_one_step(tmp_path, monkeypatch)
    torch.manual_seed(98)
    first = ckpt.rng_state()
    torch.manual_seed(99)
    second = ckpt.rng_state()
    saved.update(data=[{"extra": torch.tensor([1])}, {"extra": torch.tensor([2])}], rng=[first, second])
    ckpt.save_atomic(saved, run.dir / "checkpoint.pt")  # as saved by 2 ranks
    later = make_run(tmp_path)
    later.rank, later.world_size = 2, 3  # rank 2 of a run on 3 processes (the others faked)
    monkeypatch.setattr(loop.dist, "all_reduce", lambda t: t)
    monkeypatch.setattr(loop, "DistributedDataParallel", lambda m, device_ids: m)
    data = Batches()
    t = Trainer(later, model(), data, loss_fn, Evaluate(), total_steps=5, eval_interval=2)
    t.resume()
    assert data.extra.tolist() == [2]
    draw = torch.rand(1)
    torch.manual_seed(99)
    assert torch.equal(draw, torch.rand(1))


def test_an_fp16_run_resumes_its_loss_scale(tmp_path, monkeypatch):
    run = make_run(tmp_path, precision="fp16")
    monkeypatch.setenv(STOP_AFTER_ENV, "1")
    with pytest.raises(Interrupted):
        fit(run)
    monkeypatch.delenv(STOP_AFTER_ENV)
    saved = ckpt.load(run.dir / "checkpoint.pt")
    saved["scaler"]["scale"] = 1024.0
    ckpt.save_atomic(saved, run.dir / "checkpoint.pt")
    t = Trainer(make_run(tmp_path, precision="fp16"), model(), Batches(), loss_fn, Evaluate(), total_steps=5,
                eval_interval=2)
    t.resume()
    assert t.scaler.get_scale() == 1024.0


def test_steps_per_second_count_this_processs_steps_over_its_time(tmp_path, monkeypatch):
    timed = quarter_second_steps(monkeypatch)

    run = make_run(tmp_path)
    summary = Trainer(run, model(), Batches(), timed, Evaluate(), total_steps=2, eval_interval=10).fit()
    assert summary["steps_per_s"] == 4.0  # 2 steps in half a second
    run = make_run(tmp_path, name="resumed")
    monkeypatch.setenv(STOP_AFTER_ENV, "1")
    with pytest.raises(Interrupted):
        Trainer(run, model(), Batches(), timed, Evaluate(), total_steps=3, eval_interval=10).fit()
    monkeypatch.delenv(STOP_AFTER_ENV)
    summary = Trainer(run, model(), Batches(), timed, Evaluate(), total_steps=3, eval_interval=10).fit()
    assert summary["steps_per_s"] == 4.0  # steps 2 and 3 in this process's half second


def test_wall_time_adds_this_processs_time_to_the_earlier_processes(tmp_path, monkeypatch):
    timed = quarter_second_steps(monkeypatch)
    run = make_run(tmp_path)
    summary = Trainer(run, model(), Batches(), timed, Evaluate(), total_steps=2, eval_interval=10).fit()
    assert summary["wall_time_s"] == 0.5 and [r["time_s"] for r in records(run)] == [0.0, 0.0]  # step 0's evaluation
    run = make_run(tmp_path, name="resumed")
    monkeypatch.setenv(STOP_AFTER_ENV, "1")
    with pytest.raises(Interrupted):
        Trainer(run, model(), Batches(), timed, Evaluate(), total_steps=3, eval_interval=2).fit()
    monkeypatch.delenv(STOP_AFTER_ENV)
    assert ckpt.load(run.dir / "checkpoint.pt")["wall_time_s"] == 0.25  # the first process: one step
    summary = Trainer(run, model(), Batches(), timed, Evaluate(), total_steps=3, eval_interval=2).fit()
    # the second process: 0.25 s before, then step 2 (its records at 0.5 s), then step 3
    assert summary["wall_time_s"] == 0.75
    assert [(r["step"], r["time_s"]) for r in records(run)] == [(0, 0.0), (0, 0.0), (2, 0.5), (2, 0.5), (2, 0.5)]


def test_the_summary_has_the_mfu_of_this_processs_steps(tmp_path, monkeypatch):
    asked = []
    monkeypatch.setattr(loop, "estimate_mfu", lambda flops, device: asked.append((flops, device)) or flops / 16e6)
    monkeypatch.setattr(loop, "matmul_peak_flops", lambda: 8e6)
    timed = quarter_second_steps(monkeypatch)
    run = make_run(tmp_path)
    summary = Trainer(run, model(), Batches(), timed, Evaluate(), total_steps=2, eval_interval=10,
                      flops_per_step=1e6).fit()
    # 2 steps of 1e6 FLOPs in half a second: 4e6 FLOP/s, a quarter of the (faked) GPU peak, half the CPU's
    assert summary["mfu"] == 0.25 and asked == [(4e6, torch.device("cpu"))]
    assert (summary["cpu_flops_per_s"], summary["cpu_flops_utilization"]) == (4e6, 0.5)
    run = make_run(tmp_path, name="no-steps")
    summary = fit(run, total_steps=0, flops_per_step=1e6)  # no step in this process: no throughput to report
    assert summary["steps"] == 0 and not {"mfu", "cpu_flops_per_s", "cpu_flops_utilization"} & set(summary)


def test_a_parameter_the_steps_loss_does_not_reach_is_left_alone_by_that_step(tmp_path):
    # torch's convention (zero_grad(set_to_none=True)): such a parameter has no gradient and the
    # optimizer skips it; a zero gradient would move it by its momentum
    run = make_run(tmp_path, sets=["optimizer.lr=1", "optimizer.momentum=0.5", "train.grad_clip=0"])

    def alternate(model, batch):  # batch 0 reaches only the weight (gradient 3), batch 1 only the bias
        return (model.weight.sum() * 3 if batch.item() == 0 else model.bias.sum()), {}

    torch.manual_seed(0)
    m = nn.Linear(1, 1)
    w, b = m.weight.item(), m.bias.item()
    Trainer(run, m, Batches(), alternate, Evaluate(), total_steps=2, eval_interval=5).fit()
    # step 1 moves the weight by lr x 3; step 2 moves only the bias, by lr x 1 (not the weight by 0.5 x 3)
    assert (w - m.weight.item(), b - m.bias.item()) == pytest.approx((3.0, 1.0))


class Sharded(nn.Linear):
    """A one-weight model with a buffer, which records where it was moved to."""

    def __init__(self):
        torch.manual_seed(0)
        super().__init__(1, 1, bias=False)
        self.register_buffer("running", torch.zeros(1))
        self.moved = []

    def to(self, *args, **kwargs):
        self.moved.append(args)
        return super().to(*args, **kwargs)


def test_several_processes_under_fsdp2_shard_the_model_on_the_runs_device(tmp_path, monkeypatch):
    opened, sharded, sent = [], [], []
    real_open = harness_run.open_run_dir
    monkeypatch.setattr(harness_run, "open_run_dir", lambda *a, **k: opened.append(k["mmap"]) or real_open(*a, **k))
    monkeypatch.setattr(loop.par, "fully_shard_model", lambda m, device, world_size: sharded.append((m, device, world_size)))
    monkeypatch.setattr(Run, "any_rank", lambda self, flag: flag)
    monkeypatch.setattr(loop.dist, "broadcast", lambda tensor, src: sent.append(tensor))
    run, m = make_run(tmp_path, sets=["train.parallel=fsdp2"]), Sharded()
    run.world_size = 2  # rank 0 of 2, the other rank faked
    t = Trainer(run, m, Batches(), loss_fn, Evaluate(), total_steps=1, eval_interval=1)
    assert t.fsdp and opened == [True]  # the checkpoint memory-mapped: a rank reads little more than its shards
    assert m.moved == [(run.device,)] and sharded == [(m, run.device, 2)]
    t._broadcast_buffers()  # the model's buffers: rank 0's after each forward
    assert len(sent) == 1 and sent[0] is m.running
    run = make_run(tmp_path, name="ddp")  # the default, replicas: nothing sharded or memory-mapped
    run.world_size = 2
    assert not Trainer(run, Sharded(), Batches(), loss_fn, Evaluate(), total_steps=1, eval_interval=1).fsdp
    assert opened == [True, False] and len(sharded) == 1


class FakeWandb:
    """A stand-in for ``logging.WandbRun``: the rows it was sent and how it was finished."""

    def __init__(self):
        self.logged, self.rows, self.finished = 0, [], []

    def log(self, index, record):
        self.rows.append((index, record["step"], record["split"]))

    def finish(self, summary):
        self.finished.append(summary)


def test_wandb_gets_every_record_and_the_runs_end_from_rank_0(tmp_path, monkeypatch):
    started = []

    def start(cfg, run_dir):
        started.append((cfg, run_dir, FakeWandb()))
        return started[-1][2]

    monkeypatch.setattr(loop, "start_wandb", start)
    run = make_run(tmp_path)
    fit(run, total_steps=2, eval_interval=2)
    (cfg, run_dir, wandb), = started
    assert (cfg, run_dir) == (run.cfg, run.dir)
    assert wandb.rows == [(0, 0, "val"), (1, 0, "test"), (2, 2, "train"), (3, 2, "val"), (4, 2, "test")]
    assert wandb.finished == [{"status": "completed", "best": 8.0}]  # val loss 10 - step

    class NoVal(Evaluate):
        def __call__(self, model, step):
            return [{"split": "test", "loss": 1.0}]

    fit(make_run(tmp_path, name="no-best"), evaluate=NoVal(), total_steps=1)
    assert started[-1][2].finished == [{"status": "completed"}]
    run = make_run(tmp_path, name="rank1")
    run.rank = 1  # only rank 0 has a wandb run
    fit(run, total_steps=1)
    assert len(started) == 2

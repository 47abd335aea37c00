"""Promises no other test pinned, each written against a realistic bug that passed the rest of
the suite (issue "Tests that fail when a promise breaks"):

1. every param group steps with its own hyperparameters (fine-tuning's "no weight decay on
   biases and norms" is two groups), on the default (native) path and the foreach path;
2. ``load_state_dict`` keeps the saved ``lr`` (what a scheduler set), not the default 1;
3. a run with gradient accumulation resumes at the right batch: killed and resumed, it logs
   exactly what the uninterrupted run logs;
4. a sweep minimises the validation loss: its best (and exported) trial is the lowest one;
5. the launcher resumes an interrupted run and skips only finished ones.

And promises the mutation run (results/mutation/README.md) found unpinned: the optimizers' default
hyperparameters are the authors', and ``from_sgd`` / ``from_adam`` pass their other keywords on.

The expected values come from the promise itself (a group stepped alone, the run that was
never interrupted, the lowest value of the study), never from the code under test.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import records
import harness.cifar10
from harness import launch, sweep
from harness.loop import EXIT_INTERRUPTED, STOP_AFTER_ENV
from nano import train as nano_train
import optimizers
from optimizers import CADAM, CD, LDHD, _native, iKFAD
from tests.cifar_fixture import UncheckedCIFAR10, make_fake_cifar10
from vit import train as vit_train

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "nano" / "configs" / "smoke.yaml")

# ---------------------------------------------------------------- 1. per-group hyperparameters

# Two groups of each optimizer that differ in every hyperparameter it has, lr and weight_decay too.
GROUPS = {
    LDHD: (dict(h=0.1, gamma=0.5, lr=1.0, weight_decay=0.0), dict(h=0.03, gamma=2.0, lr=0.4, weight_decay=0.3)),
    CD: (dict(h=0.1, gamma=0.5, c=1.0, lr=1.0, weight_decay=0.0),
         dict(h=0.03, gamma=2.0, c=20.0, lr=0.4, weight_decay=0.3)),
    iKFAD: (dict(h=0.1, alpha=1.0, mu=1.0, gamma=0.5, lr=1.0, weight_decay=0.0),
            dict(h=0.03, alpha=3.0, mu=0.2, gamma=2.0, lr=0.4, weight_decay=0.3)),
    CADAM: (dict(h=0.01, gamma=0.5, c=1.0, alpha=1.0, eps=1e-8, lr=1.0, weight_decay=0.0),
            dict(h=0.003, gamma=2.0, c=20.0, alpha=3.0, eps=1e-3, lr=0.4, weight_decay=0.3)),
}
DEFAULT_AND_FOREACH = {"default": {}, "foreach": dict(foreach=True)}


def _loss(x, weight):
    """A loss of one tensor; the total is a sum over tensors, so each group's gradients
    depend on its own parameters only."""
    return weight * (x**2).sum() + x.sin().sum()


def _train(cls, groups, steps=15):
    """``steps`` steps of ``cls(groups)``; returns the parameters."""
    opt = cls(groups)
    params = [p for g in opt.param_groups for p in g["params"]]
    for _ in range(steps):
        opt.zero_grad()
        sum(_loss(p, i + 1) for i, p in enumerate(params)).backward()
        opt.step()
    return opt, [p.detach() for p in params]


@pytest.mark.parametrize("path", list(DEFAULT_AND_FOREACH))
@pytest.mark.parametrize("cls", list(GROUPS), ids=lambda c: c.__name__)
def test_each_param_group_steps_with_its_own_hyperparameters(cls, path):
    """Two groups in one optimizer take the steps each group takes alone."""
    if path == "default" and _native.why_unavailable() is not None:
        pytest.skip(f"the default CPU path is the native kernels, unavailable here: {_native.why_unavailable()}")
    extra = DEFAULT_AND_FOREACH[path]
    g = torch.Generator().manual_seed(3)
    start = [torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(7, generator=g, dtype=torch.float64)]
    first, second = GROUPS[cls]

    def fresh(i):
        return start[i].clone().requires_grad_()

    together, out = _train(cls, [{"params": [fresh(0)], **first, **extra}, {"params": [fresh(1)], **second, **extra}])
    assert together.code_path(together.param_groups[1]) == ("native" if path == "default" else "foreach")
    # Each group alone; the loss weights stay those of the run above (1 and 2).
    _, (alone0,) = _train(cls, [{"params": [fresh(0)], **first, **extra}])
    opt1 = cls([{"params": [fresh(1)], **second, **extra}])
    (q,) = opt1.param_groups[0]["params"]
    for _ in range(15):
        opt1.zero_grad()
        _loss(q, 2).backward()
        opt1.step()
    torch.testing.assert_close(out[0], alone0, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(out[1], q.detach(), rtol=1e-13, atol=1e-13)
    assert not torch.equal(out[1], start[1])


# ---------------------------------------------------------------- 2. load_state_dict keeps lr

def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()


def _steps(net, opt, sched, n, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        opt.zero_grad()
        net(torch.randn(16, 4, generator=g, dtype=torch.float64)).pow(2).mean().backward()
        opt.step()
        sched.step()


@pytest.mark.parametrize("cls", list(GROUPS), ids=lambda c: c.__name__)
def test_load_state_dict_keeps_a_scheduled_lr(cls, tmp_path):
    """A scheduler lowered lr below its default 1; a resume through a file must step with the
    lowered lr, as the run that was never interrupted does."""
    hp = GROUPS[cls][0]

    def make(net):
        opt = cls(net.parameters(), **hp)
        return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)

    net = _net()
    opt, sched = make(net)
    _steps(net, opt, sched, 8, seed=1)
    assert opt.param_groups[0]["lr"] == 0.25  # 1 * 0.5 ** (8 // 3)
    torch.save({"net": net.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, tmp_path / "ck.pt")
    _steps(net, opt, sched, 6, seed=2)
    uninterrupted = [p.detach().clone() for p in net.parameters()]

    saved = torch.load(tmp_path / "ck.pt", weights_only=True)
    net = _net()
    net.load_state_dict(saved["net"])
    opt, sched = make(net)
    opt.load_state_dict(saved["opt"])
    sched.load_state_dict(saved["sched"])
    assert opt.param_groups[0]["lr"] == 0.25
    _steps(net, opt, sched, 6, seed=2)
    for a, b in zip(uninterrupted, net.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)


# ---------------------------------------------------------------- 3. resume with gradient accumulation

@pytest.fixture
def cifar_root(tmp_path, monkeypatch):
    """A generated miniature CIFAR-10 (tests/cifar_fixture.py): 180 train images, 6 steps of 32 per epoch."""
    monkeypatch.setattr(harness.cifar10, "DATASET_CLASS", UncheckedCIFAR10)
    return make_fake_cifar10(tmp_path / "cifar10", n_train=200, n_test=50, seed=7)


def test_kill_and_resume_with_gradient_accumulation_gives_identical_metrics(cifar_root, tmp_path, monkeypatch,
                                                                          capsys):
    """vit takes its batches in shuffled passes over the data, so the resumed run must continue
    at micro-batch 2 x 8 = 16 of the stream (epoch 1, its 5th micro-batch of 16 images), not at
    micro-batch 8: then its records equal those of the run that was never interrupted."""
    def argv(out):
        return ["--optimizer", "adam", "--seed", "0", "--config", str(ROOT / "vit" / "configs" / "smoke.yaml"),
                "--set", f"data.root={cifar_root}", "--set", "model.drop_rate=0",
                "--set", "train.gradient_accumulation_steps=2", "--out", str(out)]

    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert vit_train.main(argv(whole)) == 0
    assert "batch 32 (16 per rank and micro-batch), 6 steps/epoch" in capsys.readouterr().out
    monkeypatch.setenv(STOP_AFTER_ENV, "8")  # mid second epoch, between evaluations
    assert vit_train.main(argv(parts)) == EXIT_INTERRUPTED
    monkeypatch.delenv(STOP_AFTER_ENV)
    assert vit_train.main(argv(parts)) == 0
    assert "from step 8" in capsys.readouterr().out
    rows = records(whole)
    assert [r["step"] for r in rows if r["split"] == "train"] == [6, 12]
    assert records(parts) == rows


# ---------------------------------------------------------------- 4. a sweep minimises

class _KnownObjective:
    """Stands in for the trial's training run: a value known by hand, ``(log10 h + 2)^2``
    (lowest at h = 0.01), so the study's best trial must be the one with the lowest value."""

    def __init__(self, exp, optimizer, space, **kwargs):
        self.space, self.current = space, None

    def __call__(self, trial):
        params = {hp: trial.suggest_float(hp, r.low, r.high, log=r.log) for hp, r in self.space.items()}
        return (math.log10(params["h"]) + 2) ** 2


def test_a_sweep_minimises_and_exports_the_lowest_trial(nano_data, tmp_path, monkeypatch):
    monkeypatch.setattr(sweep.worker, "Objective", _KnownObjective)
    out_root = tmp_path / "sweeps"
    assert sweep.main(["nano", "cd", "--config", SMOKE, "--set", f"data.dir={nano_data}", "--trials", "6",
                       "--out-root", str(out_root), "--no-plot"]) == 0
    study = sweep.load_study(sweep.experiment("nano"), "cd", out_root=out_root)
    values = {t.number: t.value for t in study.trials}
    assert len(values) == 6 and len(set(values.values())) == 6
    lowest = min(values, key=values.get)
    assert study.best_trial.number == lowest
    exported = tmp_path / "best.yaml"
    assert sweep.main(["export", "nano", "cd", "--out-root", str(out_root), "--out", str(exported)]) == 0
    assert yaml.safe_load(exported.read_text()) == {"cd": study.trials[lowest].params}


# ---------------------------------------------------------------- 5. the launcher resumes

def nano_args(data, out, optimizer, *sets):
    return ["--optimizer", optimizer, "--seed", "1", "--config", SMOKE, "--set", f"data.dir={data}",
            *[a for s in sets for a in ("--set", s)], "--out", str(out)]


def test_launch_resumes_an_interrupted_run_and_skips_a_finished_one(nano_data, tmp_path, capsys):
    sets = ["train.max_iters=6", "train.eval_interval=2", "train.eval_iters=2"]
    runs = tmp_path / "runs"
    finished, interrupted = runs / "adam" / "seed1", runs / "cd" / "seed1"
    assert nano_train.main(nano_args(nano_data, finished, "adam", *sets)) == 0
    # In its own process: a run directory stays locked by the process that ran it.
    stopped = subprocess.run([sys.executable, "-m", "nano.train", *nano_args(nano_data, interrupted, "cd", *sets)],
                             cwd=ROOT, env={**os.environ, STOP_AFTER_ENV: "3"}, capture_output=True, text=True)
    assert stopped.returncode == EXIT_INTERRUPTED, stopped.stderr[-2000:]
    assert json.loads((interrupted / "summary.json").read_text())["status"] == "interrupted"
    stamp = (finished / "metrics.jsonl").stat().st_mtime_ns
    capsys.readouterr()

    argv = ["nano", "--config", SMOKE, "--set", f"data.dir={nano_data}", *[a for s in sets for a in ("--set", s)],
            "--optimizers", "adam", "cd", "--seeds", "1", "--parallel", "1", "--runs-dir", str(runs), "--no-report"]
    assert launch.main(argv) == 0
    assert "1 runs to do (1 already finished)" in capsys.readouterr().out
    assert (finished / "metrics.jsonl").stat().st_mtime_ns == stamp
    summary = json.loads((interrupted / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 6
    assert "from step 3" in (runs / "logs" / "cd-seed1.log").read_text()


# ---------------------------------------------------------------- build: adam and msgd are torch's

def _group(opt):
    return {k: v for k, v in opt.param_groups[0].items() if k != "params"}


@pytest.mark.parametrize("switch", [dict(maximize=True, foreach=True), dict(fused=True)], ids=["foreach", "fused"])
def test_build_gives_every_key_to_torchs_adam_and_sgd(switch):
    """``build("adam"|"msgd", ...)`` is torch.optim.Adam / SGD with the same settings
    (optimizers/README.md: keys lr, beta1, beta2, eps for Adam's betas; lr, momentum), every
    key passed on; with no keys, Adam is torch's default Adam."""
    p = [torch.zeros(3, requires_grad=True)]
    adam = dict(lr=0.02, eps=1e-5, weight_decay=0.1, **switch)
    assert _group(optimizers.build("adam", p, beta1=0.8, beta2=0.95, **adam)) == \
        _group(torch.optim.Adam(p, betas=(0.8, 0.95), **adam))
    sgd = dict(lr=0.03, momentum=0.7, weight_decay=0.2, **switch)
    assert _group(optimizers.build("msgd", p, **sgd)) == _group(torch.optim.SGD(p, **sgd))
    assert _group(optimizers.build("adam", p)) == _group(torch.optim.Adam(p))


def test_build_of_an_ablation_passes_every_key_but_gamma():
    p = [torch.zeros(3, requires_grad=True)]
    group = optimizers.build("cd0", p, h=0.2, c=3.0, lr=0.5, weight_decay=0.1).param_groups[0]
    assert (group["h"], group["c"], group["lr"], group["weight_decay"], group["gamma"]) == (0.2, 3.0, 0.5, 0.1, 0.0)
    with pytest.raises(ValueError, match=r"^Unknown hyperparameter\(s\) beta1, gamma for optimizer 'cd0'; valid: h, c, lr"):
        optimizers.build("cd0", p, gamma=1.0, beta1=0.9)


# ---------------------------------------------------------------- constructors: defaults and keywords

# The authors' defaults, and ours for the keys the paper has not (lr 1, no weight decay).
OURS_DEFAULTS = {
    LDHD: dict(h=1e-3, gamma=0.1),
    CD: dict(h=1e-3, gamma=1.0, c=1.0),
    iKFAD: dict(h=1e-3, alpha=1.0, mu=1.0, gamma=1.0),
    CADAM: dict(h=1e-3, gamma=1.0, c=1.0, alpha=1.0, eps=1e-8),
}


@pytest.mark.parametrize("cls", list(OURS_DEFAULTS), ids=lambda c: c.__name__)
def test_defaults_are_the_authors(cls):
    group = _group(cls([torch.zeros(3, requires_grad=True)]))
    assert group == dict(OURS_DEFAULTS[cls], lr=1.0, weight_decay=0.0, maximize=False, foreach=None, fused=None)


@pytest.mark.parametrize("make", [lambda p, **kw: CD.from_sgd(p, lr=0.01, momentum=0.9, **kw),
                                  lambda p, **kw: LDHD.from_sgd(p, lr=0.01, momentum=0.9, **kw),
                                  lambda p, **kw: CADAM.from_adam(p, **kw)], ids=["CD", "LDHD", "CADAM"])
def test_from_sgd_and_from_adam_pass_the_other_keywords_on(make):
    group = make([torch.zeros(3, requires_grad=True)], weight_decay=0.1, maximize=True, foreach=True).param_groups[0]
    assert (group["weight_decay"], group["maximize"], group["foreach"]) == (0.1, True, True)

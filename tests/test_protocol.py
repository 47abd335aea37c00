"""The protocol as the authors' release ran it: each sweep's trial seed and objective (read from
its ``space.yaml`` and honoured by the trial's objective), owt's sweep budget, and the switch to
the release's GPT init.

Expected values come from the release (rajit906/higher-order-damping-in-ml-v0, file:line in the
comments) and from hand computation on synthetic metrics records.
"""
import json
import math

import pytest
import torch

from harness.errors import UsageError
from harness.rundir import RunDir
from harness.signals import StopFlag
from harness.sweep import experiment, load_space
from harness.sweep.objective import Objective, objective_record

# val losses of a 2-epoch run of 10 updates per epoch, evaluated every 5 updates (epoch = step / 10),
# with train and test records that no rule may read.
RECORDS = [
    {"split": "val", "step": 0, "epoch": 0.0, "loss": 2.0},    # the untrained model: not an epoch's end
    {"split": "val", "step": 5, "epoch": 0.5, "loss": 0.9},    # lowest of all
    {"split": "train", "step": 10, "epoch": 1.0, "loss": 0.1},
    {"split": "val", "step": 10, "epoch": 1.0, "loss": 1.1},   # end of epoch 1
    {"split": "test", "step": 10, "epoch": 1.0, "loss": 0.2},
    {"split": "val", "step": 15, "epoch": 1.5, "loss": 1.0},
    {"split": "val", "step": 20, "epoch": 2.0, "loss": 1.2},   # end of epoch 2, the last evaluation
]
# By hand: best = min(2.0, 0.9, 1.1, 1.0, 1.2) = 0.9 at step 5; final = the step-20 loss 1.2;
# best_epoch_end = min over epochs 1.0 and 2.0 = min(1.1, 1.2) = 1.1 at step 10.
EXPECTED = {"best": (0.9, 5), "final": (1.2, 20), "best_epoch_end": (1.1, 10)}


@pytest.mark.parametrize("rule", sorted(EXPECTED))
def test_objective_rules_on_synthetic_records(rule):
    record = objective_record(RECORDS, rule)
    assert (record["loss"], record["step"]) == EXPECTED[rule]


def test_objective_rules_without_a_usable_record():
    nan_last = RECORDS + [{"split": "val", "step": 25, "epoch": 2.5, "loss": float("nan")}]
    assert objective_record(nan_last, "final") is None            # a NaN at the end: no final loss
    assert objective_record(nan_last, "best")["loss"] == 0.9      # NaNs are skipped by the minimum
    no_epoch_end = [r for r in RECORDS if r["step"] in (0, 5, 15)]
    assert objective_record(no_epoch_end, "best_epoch_end") is None
    with pytest.raises(ValueError, match="objective must be one of best, final, best_epoch_end"):
        objective_record(RECORDS, "median")


class FakeTrial:
    """What ``Objective._result`` reads and writes of an Optuna trial."""

    def __init__(self, number=0):
        self.number, self.user_attrs = number, {}

    def set_user_attr(self, key, value):
        self.user_attrs[key] = value


def finished_run(path, records, status="completed"):
    run = RunDir(path)
    path.mkdir(parents=True)
    run.metrics_file.write_text("".join(json.dumps(r) + "\n" for r in records))
    run.summary_file.write_text(json.dumps({"status": status}))
    return run


@pytest.mark.parametrize("rule", sorted(EXPECTED))
def test_trial_value_follows_the_space_yaml_rule(tmp_path, rule):
    space_file = tmp_path / "space.yaml"
    space_file.write_text(f"seed: 7\nobjective: {rule}\noptimizers:\n  adam: {{lr: [1.0e-6, 1.0e-2, log]}}\n")
    space = load_space(experiment("vit"), str(space_file))
    assert (space["seed"], space["objective"], space["seed_per_trial"]) == (7, rule, False)
    objective = Objective(experiment("vit"), "adam", space["optimizers"]["adam"], seed=space["seed"],
                          out=tmp_path, config=None, sets=[], signals=StopFlag(), objective=space["objective"],
                          seed_per_trial=space["seed_per_trial"])
    trial = FakeTrial()
    value = objective._result(trial, finished_run(tmp_path / "trial-0", RECORDS), 0, False)
    assert (value, trial.user_attrs["best_step"]) == EXPECTED[rule]
    assert objective.trial_seed(3) == 7


def test_a_trial_without_a_record_for_its_rule_is_pruned(tmp_path):
    import optuna

    objective = Objective(experiment("vit"), "adam", {}, seed=0, out=tmp_path, config=None, sets=[],
                          signals=StopFlag(), objective="best_epoch_end")
    run = finished_run(tmp_path / "trial-0", [r for r in RECORDS if r["step"] in (0, 5, 15)])
    with pytest.raises(optuna.TrialPruned, match="no finite validation loss for the objective best_epoch_end"):
        objective._result(FakeTrial(), run, 0, False)


def test_per_trial_seeds():
    """owt's release runs trial k with seed 1337 + k (owt/sweeps/sweep_engine.py:35)."""
    space = load_space(experiment("owt"))
    objective = Objective(experiment("owt"), "cd", {}, seed=space["seed"], out=None, config=None, sets=[],
                          signals=StopFlag(), seed_per_trial=space["seed_per_trial"])
    assert [objective.trial_seed(k) for k in (0, 1, 79)] == [1337, 1338, 1416]


# (experiment, trial seed, per-trial seeds, objective, trials, budget), from the release:
# vit/sweep.py:162 (seed 123), vit/train.py:179-180,197 (returns the best val loss), vit/scripts/sweep_*.sh
# (100 trials, 25 epochs); cifar/train.py:188 (seed 123), :180 (returns valid_losses[-1]), no sweep script
# (budget ours); sst2/sweep.py:162 and qnli/sweep.py:157 (seed 123), sst2/train.py:151-191 and
# qnli/train.py:185-222 (best of the end-of-epoch val losses), their scripts/sweep_*.sh (80 trials of
# 2 epochs); owt/sweeps/sweep_engine.py:13,35,44 (80 trials, seed 1337 + trial number, 50,001 iterations),
# owt/train.py:161-162,197 (best val loss). nano keeps the kit's settings (its long runs are in flight).
SWEEPS = [
    ("vit", 123, False, "best", 100, {"train.epochs": 25}),
    ("cifar", 123, False, "final", 100, {"train.epochs": 20}),
    ("bert/sst2", 123, False, "best_epoch_end", 80, {"train.epochs": 2}),
    ("bert/qnli", 123, False, "best_epoch_end", 80, {"train.epochs": 2}),
    ("owt", 1337, True, "best", 80, {"train.max_iters": 50001}),
    ("nano", 1337, False, "best", 80, {"train.max_iters": 2001}),
]


@pytest.mark.parametrize("exp, seed, per_trial, rule, trials, budget", SWEEPS)
def test_each_space_yaml_sets_the_release_sweep(exp, seed, per_trial, rule, trials, budget):
    space = load_space(experiment(exp))
    assert (space["seed"], space["seed_per_trial"], space["objective"]) == (seed, per_trial, rule)
    assert (space["trials"], space["budget"]) == (trials, budget)


def test_owt_short_preset_changes_only_the_budget():
    paper = load_space(experiment("owt"))
    short = load_space(experiment("owt"), str(experiment("owt").configs / "space-short.yaml"))
    assert (short["trials"], short["budget"]) == (50, {"train.max_iters": 5001})
    assert {k: short[k] for k in ("seed", "seed_per_trial", "objective", "optimizers")} == \
        {k: paper[k] for k in ("seed", "seed_per_trial", "objective", "optimizers")}
    assert paper["optimizers"]["cd0"]["c"].high == 1e12  # owt/sweeps/sweep_cd0.py:8


def test_bad_sweep_settings_are_one_line_errors(tmp_path):
    bad = tmp_path / "space.yaml"
    for text, match in (("objective: last\n", "objective must be one of best, final, best_epoch_end, got 'last'"),
                        ("seed: -1\n", "seed must be a non-negative integer, got -1"),
                        ("seed_per_trial: 1\n", "seed_per_trial must be true or false, got 1"),
                        ("base: space.yaml\n", "base must name another space file beside it")):
        bad.write_text(text)
        with pytest.raises(UsageError, match=match):
            load_space(experiment("nano"), str(bad))


# ------------------------------------------------------------------------------------ GPT init

def tiny_gpt(**overrides):
    from nano.model import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=8, vocab_size=11, n_layer=2, n_head=2, n_embd=16, **overrides))


def test_default_init_is_unchanged():
    """The kit's default draws bit for bit the weights it drew before the switch existed (values
    printed by the model of commit 9ccfaa0 at seed 0)."""
    sd = tiny_gpt().state_dict()
    before = {"transformer.h.0.attn.c_proj.weight": [-0.012955445796251297, 0.0007509448914788663, -0.01507276389747858],
              "transformer.h.1.mlp.c_proj.weight": [-0.006082449574023485, 0.006811188999563456, 0.0015706574777141213],
              "transformer.h.1.attn.c_attn.weight": [-0.03975328430533409, 0.01322515495121479, -0.004758674651384354],
              "lm_head.weight": [-0.02579144388437271, 0.01782388798892498, -0.0007064923993311822]}
    for name, values in before.items():
        assert sd[name].flatten()[:3].tolist() == values, name
    assert all(torch.equal(a, b) for a, b in zip(sd.values(), tiny_gpt(scaled_init="all").state_dict().values()))


@pytest.mark.parametrize("mode, attn_std", [("all", 0.02 / math.sqrt(2 * 8)), ("mlp", 0.02)])
def test_scaled_init_modes(mode, attn_std):
    """"mlp" (the release's model, owt/model.py:166-170: only names ending in c_proj.weight, which its
    attention projection `wo` is not): the attention projection keeps std 0.02; the MLP's projection
    gets 0.02 / sqrt(2 n_layer) = 0.02 / 4 at 8 layers in both modes."""
    from nano.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=11, n_layer=8, n_head=4, n_embd=256, scaled_init=mode))
    for name, p in model.named_parameters():
        want = {"attn.c_proj.weight": attn_std, "mlp.c_proj.weight": 0.005, "c_attn.weight": 0.02}
        for suffix, std in want.items():
            if name.endswith(suffix):  # 65,536 or more draws: the sample std is within 2% of the true one
                assert abs(p.std().item() / std - 1) < 0.02, (name, p.std().item(), std)


def test_scaled_init_is_a_config_switch():
    from harness import config as config_lib
    from nano.model import GPT, SCALED_INIT, GPTConfig

    for exp in ("nano", "owt"):
        assert config_lib.resolve(exp, "adam", 1337)["model"]["scaled_init"] == "all"
        for mode in SCALED_INIT:  # the config check knows every mode
            assert config_lib.resolve(exp, "adam", 1337, sets=[f"model.scaled_init={mode}"])["model"]["scaled_init"] == mode
    with pytest.raises(UsageError, match="model.scaled_init must be one of all, mlp, got 'attn'"):
        config_lib.resolve("owt", "adam", 1337, sets=["model.scaled_init=attn"])  # before any run directory
    with pytest.raises(UsageError, match="model.scaled_init must be one of all, mlp, got 'attn'"):
        GPT(GPTConfig(scaled_init="attn"))  # the same check: the model config's

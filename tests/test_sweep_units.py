"""harness.sweep's search spaces (space.py) and its export to best.yaml (export.py) on their own:
no trial is run, so each test takes milliseconds (the modules' mutation runs,
results/mutation/README.md). The expected texts are the formats the modules' docstrings give:
``space.yaml`` as documented in harness/sweep/space.py, ``best.yaml``'s one flow mapping per optimizer."""
from types import SimpleNamespace

import optuna
import pytest
import yaml
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from harness import sweep
from harness.config import as_number
from harness.errors import UsageError
from harness.sweep import export, space as space_lib

NANO = sweep.experiment("nano")  # its paper.yaml's first seed is 1337


# --------------------------------------------------------------------------- set_arg

@pytest.mark.parametrize("value,text", [
    (0.1, "0.1"), (1e-05, "1e-05"), (2.0, "2.0"), (3, "3"), (True, "true"), (None, "null"), ([1, 2], "[1, 2]"),
    ("adamw", "adamw"),
])
def test_set_arg_is_text_yaml_reads_back_as_the_value(value, text):
    assert space_lib.set_arg("optimizer.h", value) == f"optimizer.h={text}"
    assert as_number(yaml.safe_load(text)) == value  # as --set reads it


# --------------------------------------------------------------------------- load_space

def write(tmp_path, text, name="space.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_load_space_reads_every_key(tmp_path):
    path = write(tmp_path, "budget: {train: {max_iters: 10}, data.dir: d}\ntrials: 1\nseed: 0\nseed_per_trial: true\n"
                           "objective: final\noptimizers:\n  cd: {h: [1.0e-4, 0.5], gamma: [0, 10, uniform]}\n"
                           "  adam: {lr: [1e-5, '1e-2', log]}\n  msgd:\n")
    assert sweep.load_space(NANO, str(path)) == {
        "budget": {"train.max_iters": 10, "data.dir": "d"}, "trials": 1, "seed": 0, "seed_per_trial": True,
        "objective": "final", "path": path,
        "optimizers": {"cd": {"h": sweep.Range(1e-4, 0.5, True), "gamma": sweep.Range(0.0, 10.0, False)},
                       "adam": {"lr": sweep.Range(1e-5, 1e-2, True)}, "msgd": {}}}


def test_load_space_defaults(tmp_path):
    path = write(tmp_path, "optimizers:\n  cd: {h: [0.1, 0.5, log]}\n")
    space = sweep.load_space(NANO, str(path))
    assert (space["budget"], space["trials"], space["seed"], space["seed_per_trial"], space["objective"]) == \
        ({}, 100, 1337, False, "best")
    assert sweep.load_space(NANO, str(write(tmp_path, "trials: 5\n")))["optimizers"] == {}
    assert sweep.load_space(NANO)["path"] == NANO.configs / "space.yaml"  # the experiment's own


def test_a_preset_takes_the_other_keys_from_its_base(tmp_path):
    write(tmp_path, "budget: {train.max_iters: 2001}\ntrials: 80\noptimizers:\n  cd: {h: [0.1, 0.5]}\n")
    preset = write(tmp_path, "base: space.yaml\ntrials: 3\n", "quick.yaml")
    space = sweep.load_space(NANO, str(preset))
    assert (space["budget"], space["trials"], space["optimizers"]) == \
        ({"train.max_iters": 2001}, 3, {"cd": {"h": sweep.Range(0.1, 0.5, True)}})
    for base in ("missing.yaml", "quick.yaml"):  # no such file; the preset itself
        preset.write_text(f"base: {base}\n")
        with pytest.raises(UsageError) as e:
            sweep.load_space(NANO, str(preset))
        assert str(e.value) == f"{preset}: base must name another space file beside it, got {base!r}"


@pytest.mark.parametrize("text,message", [
    ("nope: 1\ntrial: 2\n", "unknown top-level key(s) nope, trial; valid: budget, trials, seed, seed_per_trial, "
                            "objective, optimizers, base"),
    ("trials: 0\n", "trials must be a positive integer, got 0"),
    ("trials: true\n", "trials must be a positive integer, got True"),
    ("trials: 2.0\n", "trials must be a positive integer, got 2.0"),
    ("seed: -1\n", "seed must be a non-negative integer, got -1"),
    ("seed: true\n", "seed must be a non-negative integer, got True"),
    ("seed: 1.0\n", "seed must be a non-negative integer, got 1.0"),
    ("seed_per_trial: 1\n", "seed_per_trial must be true or false, got 1"),
    ("objective: worst\n", "objective must be one of best, final, best_epoch_end, got 'worst'"),
    ("optimizers:\n  adamw: {lr: [0.1, 1]}\n",
     "unknown optimizer 'adamw'; valid: adam, msgd, ldhd, cd, cd0, ikfad, ikfad0, cadam, cadam0"),
    ("optimizers:\n  cd: {momentum: [0.1, 1]}\n", "cd.momentum: cd has no hyperparameter momentum; valid: h, gamma, c, lr, weight_decay, maximize, foreach, fused"),
    ("optimizers:\n  cd: {h: 0.1}\n", "cd.h: expected [low, high] or [low, high, log|uniform], got 0.1"),
    ("optimizers:\n  cd: {h: [0.1]}\n", "cd.h: expected [low, high] or [low, high, log|uniform], got [0.1]"),
    ("optimizers:\n  cd: {h: [0.1, 1, log, x]}\n",
     "cd.h: expected [low, high] or [low, high, log|uniform], got [0.1, 1, 'log', 'x']"),
    ("optimizers:\n  cd: {h: [0.5, 0.5]}\n", "cd.h: expected numbers low < high, got [0.5, 0.5]"),
    ("optimizers:\n  cd: {h: [0.5, 0.1]}\n", "cd.h: expected numbers low < high, got [0.5, 0.1]"),
    ("optimizers:\n  cd: {h: [0.5, 0.1, log]}\n", "cd.h: expected numbers low < high, got [0.5, 0.1]"),
    ("optimizers:\n  cd: {h: [a, 1]}\n", "cd.h: expected numbers low < high, got ['a', 1]"),
    ("optimizers:\n  cd: {h: [0.1, b]}\n", "cd.h: expected numbers low < high, got [0.1, 'b']"),
    ("optimizers:\n  cd: {h: [false, true]}\n", "cd.h: expected numbers low < high, got [False, True]"),
    ("optimizers:\n  cd: {h: [0.1, 1, linear]}\n", "cd.h: scale must be log or uniform, got 'linear'"),
    ("optimizers:\n  cd: {h: [0, 1, log]}\n", "cd.h: a log range needs low > 0, got 0"),
    ("optimizers:\n  cd: {h: [0, 1]}\n", "cd.h: a log range needs low > 0, got 0"),
    ("optimizers:\n  cd: {gamma: [-1, 1, log]}\n", "cd.gamma: a log range needs low > 0, got -1"),
])
def test_a_bad_space_is_one_line_naming_the_file_and_the_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(UsageError) as e:
        sweep.load_space(NANO, str(path))
    assert str(e.value) == f"{path}: {message}"


def test_a_missing_space_names_the_file(tmp_path):
    with pytest.raises(UsageError) as e:
        sweep.load_space(NANO, str(tmp_path / "none.yaml"))
    assert str(e.value) == f"nano has no search space: {tmp_path / 'none.yaml'} is missing"


def test_optimizer_space(tmp_path):
    space = sweep.load_space(NANO, str(write(tmp_path, "optimizers:\n  adam: {lr: [0.1, 1]}\n  cd: {h: [0.1, 1]}\n")))
    assert sweep.optimizer_space(space, "cd") == {"h": sweep.Range(0.1, 1.0, True)}
    with pytest.raises(UsageError) as e:
        sweep.optimizer_space(space, "ldhd")
    assert str(e.value) == f"{tmp_path / 'space.yaml'} has no search space for 'ldhd'; valid: adam, cd"


def test_budget_sets_leaves_out_what_the_users_config_sets(tmp_path):
    budget = {"train.max_iters": 2001, "train.eval_interval": 50, "data": "x", "cd.h": 0.3}
    assert sweep.budget_sets(budget, None) == ["train.max_iters=2001", "train.eval_interval=50", "data=x", "cd.h=0.3"]
    # The config's own keys win; its optimizer sections (cd: ...) set optimizer hyperparameters, not budget keys.
    config = write(tmp_path, "train: {max_iters: 4}\ndata: mine\ncd: {h: 0.1}\n", "smoke.yaml")
    assert sweep.budget_sets(budget, str(config)) == ["train.eval_interval=50", "cd.h=0.3"]


# --------------------------------------------------------------------------- export

@pytest.mark.parametrize("value,text", [(1e-05, "1.0e-05"), (0.25, "0.25"), (3, "3.0"), (1e20, "1.0e+20"),
                                        (1.5e-07, "1.5e-07"), (123456.0, "123456.0")])
def test_yaml_float_is_read_back_as_the_float(value, text):
    assert export.yaml_float(value) == text
    assert yaml.safe_load(text) == float(value) and isinstance(yaml.safe_load(text), float)


def test_flow_entry():
    assert export.flow_entry({"h": 0.25, "c": 3, "gamma": 1e-05}) == "{h: 0.25, c: 3.0, gamma: 1.0e-05}"


def study_with(values, rule=None, run_dirs=True, config=None):
    study = optuna.create_study(study_name="nano-cd")
    for k, value in enumerate(values):
        state = TrialState.COMPLETE if value is not None else TrialState.PRUNED
        attrs = {"run_dir": f"/runs/trial-{k}"} if run_dirs else {}
        if rule:
            attrs["objective"] = rule
        if config:
            attrs["config"] = config
        study.add_trial(create_trial(params={"h": 0.1 * (k + 1)}, value=value, state=state, user_attrs=attrs,
                                     distributions={"h": FloatDistribution(1e-4, 1.0, log=True)}))
    return study


def test_best_params_is_the_lowest_completed_trials():
    assert sweep.best_params(study_with([3.0, 2.5, None, 2.75])) == {"h": 0.2}
    with pytest.raises(UsageError) as e:
        sweep.best_params(study_with([None, None]))
    assert str(e.value) == "study nano-cd has no completed trial yet"


def test_export_best_writes_the_documented_file(tmp_path):
    out = tmp_path / "new" / "deeper" / "tuned.yaml"  # folders made as needed
    assert sweep.export_best(study_with([3.0, 2.5]), NANO, "cd", out) == out
    assert out.read_text() == ("# Best of study nano-cd: trial 1, best val loss 2.5, run /runs/trial-1.\n"
                               f"# Use with: python -m nano.train --optimizer cd --config {out}\n"
                               "cd: {h: 0.2}\n")
    with pytest.raises(UsageError) as e:
        sweep.export_best(study_with([1.0]), NANO, "cd", out)
    assert str(e.value) == f"{out} exists; choose a new --out or pass --force to overwrite it"
    assert out.read_text().endswith("cd: {h: 0.2}\n")  # untouched
    task = SimpleNamespace(module="bert.train", args=("--task", "sst2"))
    sweep.export_best(study_with([1.25], rule="final", run_dirs=False), task, "adam", out, force=True)
    assert out.read_text() == ("# Best of study nano-cd: trial 0, final val loss 1.25, run ?.\n"
                               f"# Use with: python -m bert.train --task sst2 --optimizer adam --config {out}\n"
                               "adam: {h: 0.1}\n")


def test_export_best_of_a_sweep_on_another_config_says_to_run_with_that_config(tmp_path):
    """Values tuned on the smoke model are for runs with the smoke config: the file says to run
    with that config and the values as --set, not with the paper config (a new user did)."""
    out = tmp_path / "tuned.yaml"
    sweep.export_best(study_with([3.0, 2.5], config="nano/configs/smoke.yaml"), NANO, "cd", out)
    assert out.read_text() == ("# Best of study nano-cd: trial 1, best val loss 2.5, run /runs/trial-1.\n"
                               "# Use with: python -m nano.train --optimizer cd --config nano/configs/smoke.yaml "
                               "--set optimizer.h=0.2\n"
                               "cd: {h: 0.2}\n")


def test_write_best_replaces_a_block_entry_and_keeps_every_other_line(tmp_path):
    path = write(tmp_path, "# tuned\ncd0: {h: 0.3}\ncd:\n  h: 0.5\n  c: 1e3\n\nikfad: {h: 0.1}  # kept\n", "best.yaml")
    sweep.write_best(path, "cd", {"h": 0.25})
    # c (read by YAML 1.1 as the string "1e3") is kept, as the float it means.
    assert path.read_text() == "# tuned\ncd0: {h: 0.3}\ncd: {h: 0.25, c: 1000.0}\n\nikfad: {h: 0.1}  # kept\n"
    sweep.write_best(path, "cd0", {"h": 0.5})  # a flow entry
    assert path.read_text() == "# tuned\ncd0: {h: 0.5}\ncd: {h: 0.25, c: 1000.0}\n\nikfad: {h: 0.1}  # kept\n"
    # A block entry of one indented line right before the next entry, and one that ends the file.
    path.write_text("cd:\n  h: 0.5\nikfad: {h: 0.1}\nldhd:\n  h: 0.2\n  gamma: 1.0\n")
    sweep.write_best(path, "cd", {"h": 0.25})
    sweep.write_best(path, "ldhd", {"gamma": 2})
    assert path.read_text() == "cd: {h: 0.25}\nikfad: {h: 0.1}\nldhd: {h: 0.2, gamma: 2.0}\n"


def test_write_best_appends_a_new_entry(tmp_path):
    path = write(tmp_path, "adam: {lr: 0.001}", "best.yaml")  # no newline at the end
    sweep.write_best(path, "cd", {"h": 0.25, "c": 3})
    assert path.read_text() == "adam: {lr: 0.001}\ncd: {h: 0.25, c: 3.0}\n"
    sweep.write_best(path, "ldhd", {"h": 0.5})  # after a last line that has its newline: no blank line
    assert path.read_text() == "adam: {lr: 0.001}\ncd: {h: 0.25, c: 3.0}\nldhd: {h: 0.5}\n"
    new = tmp_path / "none.yaml"
    sweep.write_best(new, "cd", {"h": 0.25})
    assert new.read_text() == "cd: {h: 0.25}\n"


def test_write_best_refuses_an_edit_it_cannot_make_exactly(tmp_path):
    text = "cd: {h: 0.5}\ncd: {h: 0.7}\n"  # YAML keeps the second: replacing the first would change nothing
    path = write(tmp_path, text, "best.yaml")
    with pytest.raises(UsageError) as e:
        sweep.write_best(path, "cd", {"h": 0.25})
    assert str(e.value) == f"could not edit {path} in place; write the entry by hand: cd: {{h: 0.25}}"
    assert path.read_text() == text

"""harness/config.py piece by piece, in-process and without training (milliseconds each): reading
a config file, the overrides and their order, the type rules, the train schema, the value checks
and the comparison of a saved config with a new one. The expected values are the rules stated in
the module's docstrings (and the paper's protocol files), worked out by hand."""
import math
from pathlib import Path

import pytest
import torch._dynamo  # noqa: F401  the first optimizer imports it (3 s): here, mutmut's fork server holds it
import yaml

import optimizers
from harness import config as c
from harness.config import TrainConfig
from harness.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]
NANO = ROOT / "nano" / "configs"


def refused(call, *args, **kwargs) -> str:
    with pytest.raises(UsageError) as error:
        call(*args, **kwargs)
    return str(error.value)


# ---------------------------------------------------------------- reading a config file

def test_read_yaml_refuses_in_one_line_what_is_not_a_mapping(tmp_path):
    missing = tmp_path / "none.yaml"
    assert refused(c.read_yaml, missing) == f"config file not found: {missing}"
    assert refused(c.read_yaml, str(missing)) == f"config file not found: {missing}"  # a str path too
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"a: caf\xe9\n")
    assert refused(c.read_yaml, latin) == f"{latin} is not valid YAML: not UTF-8 text"
    broken = tmp_path / "broken.yaml"
    broken.write_text("a: [1, 2\nb: 3\n")
    with pytest.raises(yaml.YAMLError) as parser:  # what the parser says, of which the first line is kept
        yaml.safe_load(broken.read_text())
    assert "\n" in str(parser.value)
    assert refused(c.read_yaml, broken) == f"{broken} is not valid YAML: {str(parser.value).splitlines()[0]}"
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    assert refused(c.read_yaml, listed) == f"{listed} must hold a mapping at top level, got list"
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    assert c.read_yaml(empty) == {}
    good = tmp_path / "good.yaml"
    good.write_text("train:\n  max_iters: 20\nwandb: false\n")
    assert c.read_yaml(str(good)) == {"train": {"max_iters": 20}, "wandb": False}


def test_flatten_dots_nested_keys_and_keeps_empty_mappings_as_leaves():
    tree = {"a": {"b": 1, "c": {"d": [1, 2]}, "e": {}}, "f": None}
    assert c.flatten(tree) == {"a.b": 1, "a.c.d": [1, 2], "a.e": {}, "f": None}
    assert c.flatten({"x": {"y": 2}}, "p.") == {"p.x.y": 2}


def test_as_number_reads_yaml_1_1s_exponents_without_a_dot():
    assert c.as_number("1e-3") == 0.001 and isinstance(c.as_number("1e-3"), float)
    assert c.as_number("12") == 12 and isinstance(c.as_number("12"), int)
    assert c.as_number("1.5") == 1.5
    assert c.as_number("fp16") == "fp16"
    assert c.as_number(7) == 7 and c.as_number(None) is None


def test_check_type_widens_ints_to_floats_and_refuses_other_types_in_one_line():
    assert c._check_type("k", 3, 0.5) == 3.0 and isinstance(c._check_type("k", 3, 0.5), float)
    assert c._check_type("k", "1e-3", 0.5) == 0.001
    assert c._check_type("k", "7", 3) == 7
    assert c._check_type("k", "bf16", "fp32") == "bf16"
    assert c._check_type("data.dir", "12", "data/nano") == "12"  # a str key's value is not read as a number
    assert c._check_type("k", ["fresh"], ["fixed"]) == ["fresh"]
    assert c._check_type("k", False, True) is False
    assert c._check_type("k", "anything", None) == "anything"  # a null default takes any value
    assert c._check_type("k", None, 3) is None  # and null replaces any default
    assert refused(c._check_type, "train.max_iters", 2.5, 3) == \
        "bad type for train.max_iters: 2.5 is float, expected int (like the default 3)"
    assert refused(c._check_type, "train.grad_clip", "abc", 1.0) == \
        "bad type for train.grad_clip: 'abc' is str, expected float (like the default 1.0)"
    assert refused(c._check_type, "train.compile", 1, False) == \
        "bad type for train.compile: 1 is int, expected bool (like the default False)"
    assert refused(c._check_type, "train.compile", "true", False) == \
        "bad type for train.compile: 'true' is str, expected bool (like the default False)"
    assert refused(c._check_type, "train.compile", "1", False) == \
        "bad type for train.compile: '1' is str, expected bool (like the default False)"  # not read as a number
    assert refused(c._check_type, "train.max_iters", True, 3) == \
        "bad type for train.max_iters: True is bool, expected int (like the default 3)"
    assert refused(c._check_type, "train.grad_clip", True, 1.0) == \
        "bad type for train.grad_clip: True is bool, expected float (like the default 1.0)"
    assert refused(c._check_type, "train.precision", 16, "fp32") == \
        "bad type for train.precision: 16 is int, expected str (like the default 'fp32')"


def test_set_makes_the_missing_levels_and_keeps_the_others():
    tree = {"a": {"x": 1}}
    c._set(tree, "a.b.c", 2)
    c._set(tree, "top", 3)
    assert tree == {"a": {"x": 1, "b": {"c": 2}}, "top": 3}


def test_parse_set_reads_the_value_as_yaml():
    assert c.parse_set("train.max_iters=200") == ("train.max_iters", 200)
    assert c.parse_set(" optimizer.h = 1e-3") == ("optimizer.h", "1e-3")  # YAML 1.1: a str; as_number reads it
    assert c.parse_set("train.eval_batches=[fresh, fixed]") == ("train.eval_batches", ["fresh", "fixed"])
    assert c.parse_set("a=b=c") == ("a", "b=c")
    assert c.parse_set("data.dir=") == ("data.dir", "")
    assert c.parse_set("data.dir=  ") == ("data.dir", "")
    assert c.parse_set("data.dir=[1, 2") == ("data.dir", "[1, 2")  # not YAML: the text itself
    assert refused(c.parse_set, "max_iters") == "--set expects key=value, got 'max_iters'"
    assert refused(c.parse_set, "=3") == "--set expects key=value, got '=3'"


# ---------------------------------------------------------------- optimizer values and overrides

def test_optimizer_value_checks_the_chosen_optimizers_keys_and_types():
    adam = optimizers.info("adam")
    assert c._optimizer_value(adam, "optimizer.lr", "1e-3", "f.yaml") == 0.001
    assert c._optimizer_value(adam, "optimizer.beta1", 0.8, "f.yaml") == 0.8
    assert c._optimizer_value(adam, "optimizer.maximize", True, "f.yaml") is True
    assert c._optimizer_value(adam, "optimizer.foreach", None, "f.yaml") is None  # null: its default
    assert refused(c._optimizer_value, adam, "optimizer.name", "sgd", "--set") == \
        "--set: choose the optimizer with --optimizer, not optimizer.name"
    assert refused(c._optimizer_value, adam, "optimizer.h", 0.1, "--set") == (
        "--set: unknown key optimizer.h for optimizer adam; valid: optimizer.lr, optimizer.beta1, "
        "optimizer.beta2, optimizer.eps, optimizer.weight_decay, optimizer.maximize, optimizer.foreach, "
        "optimizer.fused")
    assert refused(c._optimizer_value, adam, "optimizer.maximize", None, "f.yaml") == \
        "f.yaml: bad type for optimizer.maximize: None, expected true, false"
    assert refused(c._optimizer_value, adam, "optimizer.maximize", "yes", "f.yaml") == \
        "f.yaml: bad type for optimizer.maximize: 'yes', expected true, false"
    assert refused(c._optimizer_value, adam, "optimizer.fused", 1, "f.yaml") == \
        "f.yaml: bad type for optimizer.fused: 1, expected true, false or null"
    assert refused(c._optimizer_value, adam, "optimizer.lr", True, "--set") == \
        "--set: bad type for optimizer.lr: True, expected a number"
    assert refused(c._optimizer_value, adam, "optimizer.lr", "fast", "--set") == \
        "--set: bad type for optimizer.lr: 'fast', expected a number"
    assert refused(c._optimizer_value, adam, "optimizer.lr", None, "--set") == \
        "--set: bad type for optimizer.lr: None, expected a number"


def test_overrides_come_in_order_file_then_sets_and_skip_other_optimizers(tmp_path):
    f = tmp_path / "over.yaml"
    f.write_text("train: {max_iters: 20, eval_iters: 2}\nwandb: true\ncadam: {h: 0.01}\nadam: {lr: 0.5}\n"
                 "msgd:\nmodel: {}\n")
    got = list(c._overrides(str(f), ["train.max_iters=30", "optimizer.h=0.2"], "cadam", optimizers.NAMES))
    assert got == [("train.max_iters", 20, str(f)), ("train.eval_iters", 2, str(f)), ("wandb", True, str(f)),
                   ("optimizer.h", 0.01, str(f)), ("model", {}, str(f)),
                   ("train.max_iters", 30, "--set"), ("optimizer.h", 0.2, "--set")]
    # the chosen optimizer's entry left empty (null) gives nothing; no file, only the --sets
    assert list(c._overrides(str(f), [], "msgd", optimizers.NAMES))[3:] == [("model", {}, str(f))]
    assert list(c._overrides(None, ["seed=3"], "adam", optimizers.NAMES)) == [("seed", 3, "--set")]


# ---------------------------------------------------------------- resolving a run's config

def configs(tmp_path, best="cadam: {h: 0.02, gamma: 2.0}\n", wandb=""):
    folder = tmp_path / "configs"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "paper.yaml").write_text(
        "seeds: [5]\ndata: {dir: data/nano}\nmodel: {n_layer: 1, n_head: 2, n_embd: 8, block_size: 8}\n"
        "train: {batch_size: 4, max_iters: 10, grad_clip: 1.0, eval_batches: [fixed]}\n" + wandb)
    (folder / "best.yaml").write_text(best)
    return folder


def test_resolve_run_builds_the_config_in_order_of_precedence(tmp_path):
    folder = configs(tmp_path)
    over = tmp_path / "over.yaml"
    over.write_text("train: {max_iters: 20, grad_clip: 2}\ncadam: {gamma: 3.0, c: 0.5}\n")
    cfg, train = c.resolve_run("nano", "CADAM", "7", str(over), ["train.max_iters=30", "optimizer.c=0.25"], folder)
    assert cfg == {"seeds": [5], "data": {"dir": "data/nano"},
                   "model": {"n_layer": 1, "n_head": 2, "n_embd": 8, "block_size": 8},
                   "train": {"batch_size": 4, "max_iters": 30, "grad_clip": 2.0, "eval_batches": ["fixed"]},
                   "experiment": "nano", "seed": 7, "wandb": False,
                   "optimizer": {"name": "cadam", "h": 0.02, "gamma": 3.0, "c": 0.25}}
    assert list(cfg["optimizer"]) == ["name", "h", "gamma", "c"]  # the name first (a torn file lacks it)
    assert isinstance(cfg["train"]["grad_clip"], float) and isinstance(cfg["seed"], int)
    assert train == TrainConfig(batch_size=4, max_iters=30, grad_clip=2.0)
    assert c.resolve("nano", "cadam", 7, str(over), ["train.max_iters=30", "optimizer.c=0.25"], folder) == cfg
    # paper.yaml's own wandb is kept; the file on disk is not changed by resolving
    cfg, _ = c.resolve_run("nano", "adam", 1, configs_dir=configs(tmp_path, "", "wandb: true\n"))
    assert cfg["wandb"] is True and cfg["optimizer"] == {"name": "adam"}
    assert c.read_yaml(folder / "paper.yaml")["train"]["max_iters"] == 10


def test_resolve_run_reads_the_experiments_own_configs_by_default():
    cfg, train = c.resolve_run("nano", "cadam", 1337)
    # nano/configs/best.yaml: cadam {h: 8.276e-3, gamma: 9.474, c: 0.9520, alpha: 8.829}
    assert cfg["optimizer"] == {"name": "cadam", "h": 8.276e-3, "gamma": 9.474, "c": 0.952, "alpha": 8.829}
    assert train.max_iters == 5001 and train.eval_batches == ("fresh", "fixed")


def test_resolve_run_refuses_a_bad_key_or_value_in_one_line(tmp_path):
    folder = configs(tmp_path)
    assert refused(c.resolve_run, "nano", "sgd", 1, configs_dir=folder) == \
        f"unknown optimizer 'sgd'; valid: {', '.join(optimizers.NAMES)}"
    assert refused(c.resolve_run, "nano", "adam", 1, None, ["train.max_itres=3"], folder) == (
        "--set: unknown key 'train.max_itres'; valid keys: data.dir, experiment, model.block_size, "
        "model.n_embd, model.n_head, model.n_layer, seed, seeds, train.batch_size, train.eval_batches, "
        "train.grad_clip, train.max_iters, wandb, optimizer.lr, optimizer.beta1, optimizer.beta2, "
        "optimizer.eps, optimizer.weight_decay, optimizer.maximize, optimizer.foreach, optimizer.fused")
    assert refused(c.resolve_run, "nano", "adam", 1, None, ["train.max_iters=ten"], folder) == \
        "bad type for train.max_iters: 'ten' is str, expected int (like the default 10)"
    assert refused(c.resolve_run, "nano", "cadam", 1, None, ["optimizer.h=fast"], folder) == \
        "--set: bad type for optimizer.h: 'fast', expected a number"  # where the bad value came from
    over = tmp_path / "over.yaml"
    over.write_text("cadam: {zeta: 1}\n")
    assert refused(c.resolve_run, "nano", "cadam", 1, str(over), (), folder).startswith(
        f"{over}: unknown key optimizer.zeta for optimizer cadam; valid: optimizer.h, ")
    # The constructor's check, as a UsageError naming where the value came from.
    assert refused(c.resolve_run, "nano", "cadam", 1, None, ["optimizer.h=-1"], folder) == \
        "--set: optimizer.h: Invalid h: -1.0; expected a finite number > 0"
    assert refused(c.resolve_run, "nano", "adam", 1, None, ["optimizer.lr=-1"], folder) == \
        "--set: optimizer.lr: Invalid learning rate: -1"  # torch's own Adam
    over.write_text("cadam: {alpha: 0}\n")
    assert refused(c.resolve_run, "nano", "cadam", 1, str(over), (), folder) == \
        f"{over}: optimizer.alpha: Invalid alpha: 0.0; expected a finite number > 0"
    assert refused(c.resolve_run, "nano", "adam", 1, None, ["train.batch_size=0"], folder) == \
        "train.batch_size must be an integer >= 1, got 0"  # the schema
    assert refused(c.resolve_run, "nano", "adam", 1, None, ["model.n_embd=9"], folder) == \
        "model.n_embd = 9 must be a multiple of model.n_head = 2"  # the experiment's model config
    bad_best = configs(tmp_path / "b", "cadam: {h: 0.02, zeta: 1}\n")
    assert refused(c.resolve_run, "nano", "cadam", 1, configs_dir=bad_best) == \
        ("best.yaml: unknown hyperparameter zeta for cadam; valid: h, gamma, c, alpha, eps, lr, weight_decay, "
         "maximize, foreach, fused")


def test_resolve_run_reads_best_yaml_numbers_and_empty_entries(tmp_path):
    folder = configs(tmp_path, "cadam: {h: 1e-2, c: '5', foreach: false}\nadam:\n")
    cfg, _ = c.resolve_run("nano", "cadam", 1, configs_dir=folder)
    assert cfg["optimizer"] == {"name": "cadam", "h": 0.01, "c": 5, "foreach": False}
    assert isinstance(cfg["optimizer"]["h"], float)
    cfg, _ = c.resolve_run("nano", "adam", 1, configs_dir=folder)  # `adam:` with no value: no keys
    assert cfg["optimizer"] == {"name": "adam"}


def test_experiment_module_is_the_folders_training_module():
    assert c.experiment_module("nano").__name__ == "nano.train"
    assert c.experiment_module("owt-anything").__name__ == "owt.train"


# ---------------------------------------------------------------- the value checks

def test_the_value_checks_say_the_rule_and_the_value_in_one_line():
    for ok in (None, 1, 64):
        c.check_count("k", ok)
    for bad in (0, -1, 1.0, "2"):
        assert refused(c.check_count, "train.eval_iters", bad) == \
            f"train.eval_iters must be an integer >= 1, got {bad!r}"
    for ok in (None, 0, 0.0, 3.5):
        c.check_amount("k", ok)
    for bad in (-1, -0.5, math.nan):
        assert refused(c.check_amount, "train.grad_clip", bad) == f"train.grad_clip must be a number >= 0, got {bad!r}"
    for ok in (None, 0, 0.0, 0.5, 0.999):
        c.check_probability("k", ok)
    for bad in (1, 1.0, -0.1, math.nan):
        assert refused(c.check_probability, "model.dropout", bad) == f"model.dropout must be in [0, 1), got {bad!r}"
    for width, heads in ((8, 2), (8, 8), (0, 3), (None, 3), (30, None), (30, 0)):
        c.check_multiple("w", width, "h", heads)
    assert refused(c.check_multiple, "model.n_embd", 30, "model.n_head", 4) == \
        "model.n_embd = 30 must be a multiple of model.n_head = 4"
    c.check_choice("k", "b", ("a", "b"))
    assert refused(c.check_choice, "data.normalize", "mean", ("fixed", "computed")) == \
        "data.normalize must be one of fixed, computed, got 'mean'"


# ---------------------------------------------------------------- the train schema

def test_train_config_defaults_are_the_documented_ones():
    t = TrainConfig(batch_size=4)
    assert (t.batch_size, t.gradient_accumulation_steps, t.grad_clip, t.log_interval, t.compile, t.parallel,
            t.precision, t.cpu_precision, t.diverge_factor, t.tf32, t.max_iters, t.epochs, t.eval_interval,
            t.eval_iters, t.eval_batches, t.eval_batch_size, t.evals_per_epoch, t.keep_best) == \
        (4, 1, 0.0, 10, False, "ddp", "fp32", "fp32", 0.0, False, None, None, None, None, ("fixed",), None,
         None, False)


@pytest.mark.parametrize("name", ["batch_size", "eval_interval", "eval_iters", "eval_batch_size", "log_interval",
                                  "gradient_accumulation_steps", "epochs", "evals_per_epoch"])
def test_train_config_checks_every_count(name):
    values = {"batch_size": 4, name: 0}
    assert refused(TrainConfig, **values) == f"train.{name} must be an integer >= 1, got 0"
    TrainConfig(**{**values, name: 1})


@pytest.mark.parametrize("name", ["max_iters", "grad_clip"])
def test_train_config_checks_every_amount(name):
    assert refused(TrainConfig, batch_size=4, **{name: -1}) == f"train.{name} must be a number >= 0, got -1"
    TrainConfig(batch_size=4, **{name: 0})


def test_train_config_refuses_each_bad_choice_in_one_line():
    for ok in (0, 0.0, 1.5, 10):
        assert TrainConfig(batch_size=4, diverge_factor=ok).diverge_factor == ok
    for bad in (1, 1.0, 0.5, -2):
        assert refused(TrainConfig, batch_size=4, diverge_factor=bad) == (
            f"train.diverge_factor must be 0 (off) or above 1 (x the first evaluated loss), got {bad!r}")
    assert TrainConfig(batch_size=4, parallel="fsdp2").parallel == "fsdp2"
    assert refused(TrainConfig, batch_size=4, parallel="zero3") == "train.parallel must be ddp or fsdp2, got 'zero3'"
    for ok in ("fp32", "fp16", "bf16"):
        assert TrainConfig(batch_size=4, precision=ok).precision == ok
    assert refused(TrainConfig, batch_size=4, precision="fp8") == \
        "train.precision must be fp32, fp16 or bf16, got 'fp8'"
    assert TrainConfig(batch_size=4, cpu_precision="bf16").cpu_precision == "bf16"
    assert refused(TrainConfig, batch_size=4, cpu_precision="fp16") == \
        "train.cpu_precision must be fp32 or bf16, got 'fp16'"


def test_train_config_reads_the_estimators_as_a_tuple():
    assert TrainConfig(batch_size=4, eval_batches="fresh").eval_batches == ("fresh",)
    assert TrainConfig(batch_size=4, eval_batches=["fresh", "fixed"]).eval_batches == ("fresh", "fixed")
    for bad in ([], None, ["fresh", "fresh"], ["fixed", "random"], "random"):
        assert refused(TrainConfig, batch_size=4, eval_batches=bad) == (
            "train.eval_batches must be a non-empty list of distinct estimators from fixed, fresh, "
            f"got {bad!r}")


def test_from_section_names_the_first_unknown_key_and_the_valid_ones():
    valid = ("train.batch_size, train.compile, train.cpu_precision, train.diverge_factor, train.epochs, "
             "train.eval_batch_size, train.eval_batches, train.eval_interval, train.eval_iters, "
             "train.evals_per_epoch, train.grad_clip, train.gradient_accumulation_steps, train.keep_best, "
             "train.log_interval, train.max_iters, train.parallel, train.precision, train.tf32")
    assert refused(TrainConfig.from_section, {"batch_size": 4, "zz": 1, "max_itres": 3}) == \
        f"train.max_itres is not a key of the train schema (harness.config.TrainConfig); valid: {valid}"
    assert refused(TrainConfig.from_section, {"max_iters": 3}) == "train.batch_size must be an integer >= 1, got None"
    assert refused(TrainConfig.from_section, {"batch_size": None}) == \
        "train.batch_size must be an integer >= 1, got None"
    t = TrainConfig.from_section({"batch_size": 8, "log_interval": None, "precision": "bf16", "epochs": 2})
    assert t == TrainConfig(batch_size=8, precision="bf16", epochs=2) and t.log_interval == 10


# ---------------------------------------------------------------- a saved config against a new one

def saved(**train):
    return {"experiment": "nano", "seed": 1, "optimizer": {"name": "adam", "lr": 0.1},
            "train": {"batch_size": 4, "max_iters": 10, **train}}


def test_config_mismatch_names_every_key_that_differs_sorted(tmp_path):
    c.config_mismatch(tmp_path, None, saved())  # nothing saved: nothing to compare
    c.config_mismatch(tmp_path, saved(), saved())
    new = saved(max_iters=20)
    new["optimizer"]["lr"] = 0.2
    new["seed"] = 2
    assert refused(c.config_mismatch, tmp_path / "config.yaml", saved(grad_clip=1.0), new) == (
        f"{tmp_path / 'config.yaml'} holds a run with a different config (optimizer.lr, seed, train.grad_clip, "
        "train.max_iters); resume it with the same arguments or choose another --out")


def test_config_mismatch_lets_an_older_run_lack_a_later_key_with_its_old_behaviour(tmp_path):
    # Older runs did what these values do (harness.config.BEHAVIOUR_OF_OLDER_RUNS): no early stop
    # on divergence, DDP, the fixed estimator only, fp32 on the CPU, TF32 on CUDA.
    later = {"diverge_factor": 0.0, "parallel": "ddp", "eval_batches": ["fixed"], "cpu_precision": "fp32",
             "tf32": True}
    c.config_mismatch(tmp_path, saved(), saved(**later))
    for key, other in {"diverge_factor": 2.0, "parallel": "fsdp2", "eval_batches": ["fresh"],
                       "cpu_precision": "bf16", "tf32": False}.items():
        assert f"(train.{key});" in refused(c.config_mismatch, tmp_path, saved(), saved(**{**later, key: other}))
    # the other way round: a key the saved config has and the new one lacks is a difference
    assert "(train.tf32);" in refused(c.config_mismatch, tmp_path, saved(tf32=True), saved())
    # a key set to null in one config and absent from the other is a difference too (both ways)
    nulled = saved()
    nulled["train"]["epochs"] = None
    assert "(train.epochs);" in refused(c.config_mismatch, tmp_path, nulled, saved())
    assert "(train.epochs);" in refused(c.config_mismatch, tmp_path, saved(), nulled)
    # the experiment's own later keys, passed as `older`
    new = {**saved(), "model": {"scaled_init": "all"}}
    c.config_mismatch(tmp_path, saved(), new, {"model.scaled_init": "all"})
    assert "(model.scaled_init);" in refused(c.config_mismatch, tmp_path, saved(), new)
    assert "(model.scaled_init);" in refused(c.config_mismatch, tmp_path, saved(), new, {"model.scaled_init": "mlp"})


def test_dump_keeps_the_order_and_writes_lists_in_flow_style():
    assert c.dump({"seed": 1, "train": {"eval_batches": ["fresh", "fixed"], "max_iters": 3}, "a": None}) == \
        "seed: 1\ntrain:\n  eval_batches: [fresh, fixed]\n  max_iters: 3\na: null\n"
    cfg = {"optimizer": {"name": "cadam", "h": 0.008276}, "seed": 7}
    assert yaml.safe_load(c.dump(cfg)) == cfg

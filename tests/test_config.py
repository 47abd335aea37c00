"""One config schema and one resume path: the ``train`` section is typed, defaulted and checked
once (``harness.config.TrainConfig``, kept on ``Run.train``), each experiment checks its own
``model`` keys in its model config, and a start opens its run directory in one place
(``harness.run.open_run_dir``), reading its checkpoint once."""
import re
from pathlib import Path

import pytest

from harness import checkpoint as ckpt
from harness import config as config_lib
from harness.config import TrainConfig
from harness.errors import EXIT_USAGE, UsageError
from harness.loop import EXIT_INTERRUPTED, STOP_AFTER_ENV
from harness.run import start
from nano import train as nano_train
from test_harness import nano_args

ROOT = Path(__file__).resolve().parents[1]


def test_the_train_schema_is_built_once_and_kept_on_the_run(nano_data, tmp_path):
    run = start("nano", nano_args(nano_data, tmp_path / "run"))
    assert isinstance(run.train, TrainConfig) and run.train is run.train
    assert run.train == TrainConfig.from_section(run.cfg["train"])
    # smoke.yaml over paper.yaml: the values a run acts on, typed.
    assert (run.train.batch_size, run.train.max_iters, run.train.eval_batches) == (8, 30, ("fresh", "fixed"))


@pytest.mark.parametrize("key,value,message", [
    ("precision", "fp8", "train.precision must be fp32, fp16 or bf16, got 'fp8'"),
    ("cpu_precision", "fp16", "train.cpu_precision must be fp32 or bf16, got 'fp16'"),
    ("parallel", "zero3", "train.parallel must be ddp or fsdp2, got 'zero3'"),
    ("eval_batches", ["fresh", "fresh"], "train.eval_batches must be a non-empty list of distinct estimators "
                                         "from fixed, fresh, got"),
    ("eval_batches", [], "train.eval_batches must be a non-empty list"),
    ("evals_per_epoch", 0, "train.evals_per_epoch must be an integer >= 1, got 0"),
    ("epochs", 0, "train.epochs must be an integer >= 1, got 0"),
    ("eval_batch_size", 0, "train.eval_batch_size must be an integer >= 1, got 0"),
    ("diverge_factor", 1.0, r"train.diverge_factor must be 0 \(off\) or above 1"),
])
def test_the_schema_refuses_what_no_run_can_use(key, value, message):
    with pytest.raises(UsageError, match=message):
        TrainConfig.from_section({"batch_size": 4, key: value})


@pytest.mark.parametrize("key,value,message", [
    ("train.precision", "fp8", "train.precision must be fp32, fp16 or bf16, got 'fp8'"),
    ("train.cpu_precision", "fp16", "train.cpu_precision must be fp32 or bf16, got 'fp16'"),
    ("train.parallel", "zero3", "train.parallel must be ddp or fsdp2, got 'zero3'"),
    ("train.eval_batches", "[fresh, fresh]", "train.eval_batches must be a non-empty list of distinct "
                                             "estimators from fixed, fresh, got ['fresh', 'fresh']"),
])
def test_resolving_a_config_refuses_a_bad_train_value_in_one_line(key, value, message):
    # resolve() is what launch, the sweep and the robustness study check a config with before
    # they start anything: a train value no run can use is refused there, in one line.
    with pytest.raises(UsageError) as refused:
        config_lib.resolve("nano", "adam", 1, None, [f"{key}={value}"], ROOT / "nano" / "configs")
    assert str(refused.value) == message


def test_the_schema_defaults_what_a_config_leaves_out():
    train = TrainConfig.from_section({"batch_size": 4, "grad_clip": None})  # null: the default
    assert (train.gradient_accumulation_steps, train.grad_clip, train.precision, train.parallel,
            train.eval_batches, train.diverge_factor) == (1, 0.0, "fp32", "ddp", ("fixed",), 0.0)
    with pytest.raises(UsageError, match="train.max_itres is not a key of the train schema"):
        TrainConfig.from_section({"batch_size": 4, "max_itres": 3})


@pytest.mark.parametrize("exp,key,value,message", [
    ("nano", "model.n_embd", 30, "model.n_embd = 30 must be a multiple of model.n_head = 4"),
    ("owt", "model.vocab_size", 0, "model.vocab_size must be an integer >= 1, got 0"),
    ("vit", "model.patch_size", 5, "model.img_size = 32 must be a multiple of model.patch_size = 5"),
    ("vit", "model.drop_rate", 1.0, r"model.drop_rate must be in \[0, 1\), got 1.0"),
    ("cifar", "model.width", 0, "model.width must be an integer >= 1, got 0"),
    ("cifar", "data.subset", -1, "data.subset must be a number >= 0, got -1"),
    ("vit", "data.normalize", "mean", "data.normalize must be one of fixed, computed, got 'mean'"),
    ("bert/sst2", "model.dim", 30, "model.dim = 30 must be a multiple of model.n_heads = 4"),
    ("bert/qnli", "model.seq_classif_dropout", 1.5, r"model.seq_classif_dropout must be in \[0, 1\), got 1.5"),
    ("bert/qnli", "data.max_length", 0, "data.max_length must be an integer >= 1, got 0"),
    ("gpt2", "model.n_head", 5, "model.n_embd = 768 must be a multiple of model.n_head = 5"),
    ("gpt2", "data.block_size", 0, "data.block_size must be an integer >= 1, got 0"),
])
def test_each_experiment_checks_its_own_keys_when_the_config_is_resolved(exp, key, value, message):
    from harness.experiments import experiment

    e = experiment(exp)
    sets = [f"{key}={value}"] + (["model.n_heads=4"] if key == "model.dim" else [])
    with pytest.raises(UsageError, match=message):
        config_lib.resolve(e.name, "adam", 0, None, sets, e.configs)


def test_the_model_configs_state_the_checks_themselves():
    from bert.model import ModelConfig as BertConfig
    from cifar.model import ResNetConfig
    from gpt2.model import ModelConfig as GPT2Config
    from nano.model import GPTConfig
    from vit.model import ViTConfig

    for make, message in ((lambda: GPTConfig(n_embd=30, n_head=4), "model.n_embd = 30 must be a multiple of "
                                                                   "model.n_head = 4"),
                          (lambda: GPTConfig(dropout=1.0), r"model.dropout must be in \[0, 1\), got 1.0"),
                          (lambda: ViTConfig(embed_dim=100, num_heads=3), "model.embed_dim = 100 must be a multiple"),
                          (lambda: ResNetConfig(width=0), "model.width must be an integer >= 1, got 0"),
                          (lambda: BertConfig(n_layers=0), "model.n_layers must be an integer >= 1, got 0"),
                          (lambda: GPT2Config(dropout=-0.1), r"model.dropout must be in \[0, 1\), got -0.1")):
        with pytest.raises(UsageError, match=message):
            make()
    assert BertConfig() == BertConfig(dim=None)  # null: DistilBERT's default, not checked


def test_the_harness_names_no_experiments_model_keys():
    for name in ("config.py", "run.py", "loop.py", "data.py", "rundir.py"):
        source = (ROOT / "harness" / name).read_text()
        assert not re.findall(r"[\"']model\.\w+", source), name


def test_a_start_reads_its_checkpoint_once(nano_data, tmp_path, monkeypatch):
    out, reads = tmp_path / "run", []
    monkeypatch.setenv(STOP_AFTER_ENV, "13")
    assert nano_train.main(nano_args(nano_data, out, "ikfad")) == EXIT_INTERRUPTED
    monkeypatch.delenv(STOP_AFTER_ENV)
    real_load = ckpt.load
    monkeypatch.setattr(ckpt, "load", lambda *a, **k: (reads.append(a[0]), real_load(*a, **k))[1])
    assert nano_train.main(nano_args(nano_data, out, "ikfad")) == 0
    assert [Path(p).name for p in reads] == ["checkpoint.pt"]
    reads.clear()
    assert nano_train.main(nano_args(nano_data, out, "ikfad")) == 0  # completed: checked, nothing to do
    assert [Path(p).name for p in reads] == ["checkpoint.pt"]


def test_an_older_run_without_an_experiments_later_key_resumes(nano_data, tmp_path, monkeypatch, capsys):
    # nano's runs started before model.scaled_init and data.check_source existed did what "all"
    # and true do now (nano.train.BEHAVIOUR_OF_OLDER_RUNS): their config.yaml matches.
    import yaml

    out = tmp_path / "run"
    monkeypatch.setenv(STOP_AFTER_ENV, "5")
    assert nano_train.main(nano_args(nano_data, out)) == EXIT_INTERRUPTED
    monkeypatch.delenv(STOP_AFTER_ENV)
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    del cfg["model"]["scaled_init"], cfg["data"]["check_source"]
    (out / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert nano_train.main(nano_args(nano_data, out)) == 0
    assert nano_train.main(nano_args(nano_data, tmp_path / "mlp", "adam", 1, "--set", "model.scaled_init=mlp")) == 0
    older = yaml.safe_load((tmp_path / "mlp" / "config.yaml").read_text())
    del older["model"]["scaled_init"]
    (tmp_path / "mlp" / "config.yaml").write_text(yaml.safe_dump(older, sort_keys=False))
    (tmp_path / "mlp" / "summary.json").unlink()  # not finished: the training loop opens it
    capsys.readouterr()
    assert nano_train.main(nano_args(nano_data, tmp_path / "mlp", "adam", 1, "--set", "model.scaled_init=mlp")) == EXIT_USAGE
    assert "(model.scaled_init)" in capsys.readouterr().err

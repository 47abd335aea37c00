"""harness/run.py piece by piece, in-process and without training (milliseconds each): the Run's
properties, the command line, the distributed environment, seeding, and the one place a run
directory is opened (``open_run_dir``: compared, locked, its config written, its checkpoint read).
The expected values are the rules stated in the module's docstrings, worked out by hand."""
import contextlib
import importlib.util
import json
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch._dynamo  # noqa: F401  the first optimizer imports it (3 s): here, mutmut's fork server holds it
import yaml

from harness import checkpoint as ckpt
from harness import config as config_lib
from harness import run as run_lib
from harness.config import TrainConfig
from harness.errors import OtherRankFailed, UsageError
from harness.experiments import experiment
from harness.run import Run, open_run_dir

ROOT = Path(__file__).resolve().parents[1]


def refused(call, *args, **kwargs) -> str:
    with pytest.raises(UsageError) as error:
        call(*args, **kwargs)
    return str(error.value)


def a_run(tmp_path, world_size=1, rank=0, precision="fp32", **train):
    cfg = {"experiment": "nano", "seed": "3", "optimizer": {"name": "adam", "lr": 0.5},
           "train": {"batch_size": 8, **train}}
    return Run(cfg=cfg, dir=tmp_path / "run", device=torch.device("cpu"), rank=rank, world_size=world_size,
               precision=precision)


# ---------------------------------------------------------------- the Run

def test_run_keeps_the_train_schema_and_reads_its_keys(tmp_path):
    run = a_run(tmp_path, gradient_accumulation_steps=2, parallel="fsdp2")
    assert run.train == TrainConfig(batch_size=8, gradient_accumulation_steps=2, parallel="fsdp2")
    assert run.parallel == "fsdp2" and run.seed == 3 and isinstance(run.seed, int)
    given = TrainConfig(batch_size=4)
    assert Run(cfg=run.cfg, dir=run.dir, device=run.device, train=given).train is given  # start()'s, not rebuilt
    assert Run(cfg={"seed": 1}, dir=run.dir, device=run.device).train is None  # no train section: none
    assert (run.is_main, run.distributed) == (True, False)
    assert (a_run(tmp_path, 2, 1).is_main, a_run(tmp_path, 2, 1).distributed) == (False, True)
    assert a_run(tmp_path, 2, 0).is_main


def test_autocast_is_the_runs_precision():
    run = Run(cfg={"seed": 0}, dir=Path("."), device=torch.device("cpu"))
    assert isinstance(run.autocast(), contextlib.nullcontext)  # fp32: nothing
    for precision, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        run.precision = precision
        cast = run.autocast()
        assert isinstance(cast, torch.autocast) and (cast.device, cast.fast_dtype) == ("cpu", dtype)
        with cast:
            assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == dtype


def test_micro_batch_size_splits_the_global_batch_over_ranks_and_micro_batches(tmp_path):
    assert a_run(tmp_path, 2, gradient_accumulation_steps=2).micro_batch_size() == 2
    assert a_run(tmp_path, 1).micro_batch_size() == 8 and isinstance(a_run(tmp_path, 2).micro_batch_size(), int)
    assert a_run(tmp_path, 8).micro_batch_size() == 1
    one = a_run(tmp_path)
    object.__setattr__(one.train, "batch_size", 1)  # the smallest batch there is
    assert one.micro_batch_size() == 1
    assert refused(a_run(tmp_path, 1, gradient_accumulation_steps=3).micro_batch_size) == (
        "train.batch_size 8 (the global batch) must be a positive multiple of ranks x "
        "train.gradient_accumulation_steps = 1 x 3")
    assert refused(a_run(tmp_path, 3).micro_batch_size).endswith("= 3 x 1")
    for key in ("batch_size", "gradient_accumulation_steps"):  # what the schema refuses, refused here too
        run = a_run(tmp_path)
        object.__setattr__(run.train, key, 0)
        assert "must be a positive multiple" in refused(run.micro_batch_size)


def test_any_rank_alone_is_the_flag_and_build_optimizer_uses_the_config(tmp_path, monkeypatch):
    run = a_run(tmp_path)
    assert run.any_rank(True) is True and run.any_rank(False) is False
    run = a_run(tmp_path, 2)  # two ranks, the other one faked: its flag is added by the all-reduce (a sum)
    for other in (0.0, 1.0):
        monkeypatch.setattr(run_lib.dist, "all_reduce", lambda t, other=other: t.add_(other))
        assert run.any_rank(True) is True and run.any_rank(False) is bool(other)
    p = torch.nn.Parameter(torch.zeros(2))
    opt = run.build_optimizer([p])
    assert isinstance(opt, torch.optim.Adam) and opt.param_groups[0]["lr"] == 0.5


class Out:
    """A pipe to a launcher's log: what is not flushed waits in the buffer."""

    def __init__(self):
        self.text, self.flushed = "", ""

    def write(self, text):
        self.text += text

    def flush(self):
        self.flushed = self.text


def test_only_rank_0_prints_and_at_once(tmp_path, monkeypatch):
    out = Out()
    monkeypatch.setattr(sys, "stdout", out)
    a_run(tmp_path, 2, 0).print("hello", 1, sep="-")
    a_run(tmp_path, 2, 1).print("not me")
    assert out.flushed == out.text == "hello-1\n"


def test_run_open_passes_its_role_on_and_raises_the_error(tmp_path, monkeypatch):
    calls = []

    def fake(run_dir, cfg, writer=True, finished=False, usable=None, mmap=False):
        assert cfg is run.cfg
        calls.append((run_dir, writer, finished, usable, mmap))
        if run_dir.name == "bad":
            raise UsageError("bad folder")
        return {"step": 4}

    monkeypatch.setattr(run_lib, "open_run_dir", fake)
    usable = lambda saved: None  # noqa: E731
    run = a_run(tmp_path, 2, 1)
    run.world_size = 1  # one process (any_rank without a group), acting as rank 1
    assert run.open(usable=usable, mmap=True) == {"step": 4}
    assert calls == [(run.dir, False, False, usable, True)]
    main = run = a_run(tmp_path)
    assert main.open() == {"step": 4} and calls[-1] == (main.dir, True, False, None, False)
    main.dir = tmp_path / "bad"
    assert refused(main.open) == "bad folder"
    # another rank failed (this one's any_rank says so): every rank stops
    monkeypatch.setattr(Run, "any_rank", lambda self, flag: True)
    main.dir = tmp_path / "run"
    with pytest.raises(OtherRankFailed, match=f"another rank could not open {main.dir}"):
        main.open()


# ---------------------------------------------------------------- the command line

def test_set_example_names_the_experiments_length_key():
    assert run_lib.set_example(experiment("nano")) == "train.max_iters=200"
    assert run_lib.set_example(experiment("vit")) == "train.epochs=1"
    assert run_lib.set_example(experiment("bert", task_required=False)) == "train.epochs=1"  # its first task's
    assert run_lib.set_example(experiment("bert/qnli")) == "train.epochs=1"


def test_parser_is_the_documented_command_line():
    p = run_lib.parser(experiment("nano"))
    assert p.prog == "python -m nano.train"
    assert p.description == "Train the nano experiment with one optimizer and one seed."
    args = p.parse_args(["--optimizer", "cd"])
    assert vars(args) == {"optimizer": "cd", "seed": None, "config": None, "sets": [], "out": None}
    args = p.parse_args(["--optimizer", "cd", "--seed", "7", "--set", "a=1", "--set", "b=2", "--config", "c.yaml",
                         "--out", "o"])
    assert vars(args) == {"optimizer": "cd", "seed": 7, "config": "c.yaml", "sets": ["a=1", "b=2"], "out": "o"}
    with pytest.raises(SystemExit):
        p.parse_args([])  # --optimizer is required
    text = " ".join(p.format_help().split())
    for part in ("--optimizer OPTIMIZER one of adam, msgd, ldhd, cd, cd0, ikfad, ikfad0, cadam, cadam0",
                 "--seed SEED run seed (default: the first of configs/paper.yaml's seeds)",
                 "--config CONFIG YAML overriding paper.yaml sections and/or best.yaml entries",
                 "--set KEY=VALUE override one config value, dotted keys (repeatable): --set train.max_iters=200",
                 "--out OUT run directory (default runs/nano/{optimizer}/seed{seed})"):
        assert part in text, part
    bert = run_lib.parser(experiment("bert", task_required=False))
    text = " ".join(bert.format_help().split())
    assert "--task {sst2,qnli} the task" in text and "(default runs/bert/<task>/{optimizer}/seed{seed})" in text
    with pytest.raises(SystemExit):
        bert.parse_args(["--optimizer", "cd"])  # --task is required
    assert bert.parse_args(["--task", "qnli", "--optimizer", "cd"]).task == "qnli"
    sst2 = run_lib.parser(experiment("bert/sst2"))
    assert "--task" in sst2.format_help() and "(default runs/bert/sst2/{optimizer}/seed{seed})" in \
        " ".join(sst2.format_help().split())


def test_with_task_reads_the_task_of_a_folder_of_tasks(monkeypatch, capsys):
    nano = experiment("nano")
    argv = ["--optimizer", "cd"]
    exp, rest = run_lib._with_task(nano, argv)
    assert exp is nano and rest == argv and rest is not argv
    monkeypatch.setattr(sys, "argv", ["train.py", "--optimizer", "adam"])
    assert run_lib._with_task(nano, None)[1] == ["--optimizer", "adam"]
    bert = experiment("bert", task_required=False)
    exp, rest = run_lib._with_task(bert, ["--optimizer", "cd", "--task", "qnli", "--seed", "1"])
    assert exp == experiment("bert/qnli") and rest == ["--optimizer", "cd", "--seed", "1"]
    assert refused(run_lib._with_task, bert, ["--optimizer", "cd"]) == "--task is required; valid tasks: sst2, qnli"
    assert refused(run_lib._with_task, bert, ["--ta", "qnli"]) == "--task is required; valid tasks: sst2, qnli"
    sst2 = experiment("bert/sst2")
    assert run_lib._with_task(sst2, ["--seed", "1"]) == (sst2, ["--seed", "1"])  # named already
    with pytest.raises(SystemExit) as done:
        run_lib._with_task(bert, ["--optimizer", "cd", "-h"])
    assert done.value.code == 0 and "--task {sst2,qnli}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as done:
        run_lib._with_task(bert, ["--help", "--task", "sst2"])
    assert done.value.code == 0 and "--task {sst2,qnli}" in capsys.readouterr().out


# ---------------------------------------------------------------- the process

@pytest.mark.parametrize("env,expected,exported", [
    ({}, (0, 0, 1), {}),
    ({"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "1"}, (2, 1, 4), {}),
    ({"WORLD_SIZE": "2"}, (0, 0, 2), {}),
    ({"SLURM_NTASKS": "4", "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "MASTER_ADDR": "n1"}, (3, 1, 4),
     {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_PORT": "29500"}),
    ({"SLURM_NTASKS": "2", "SLURM_PROCID": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "1234"}, (1, 0, 2),
     {"RANK": "1", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "1234"}),
    ({"SLURM_NTASKS": "4", "SLURM_PROCID": "3", "SLURM_LOCALID": "1"}, (0, 0, 1), {}),  # no MASTER_ADDR
    ({"SLURM_NTASKS": "4", "MASTER_ADDR": "n1"}, (0, 0, 1), {}),  # no SLURM_PROCID
    ({"SLURM_PROCID": "1", "MASTER_ADDR": "n1"}, (0, 0, 1), {}),  # no SLURM_NTASKS: one task
    ({"SLURM_NTASKS": "1", "SLURM_PROCID": "0", "MASTER_ADDR": "n1"}, (0, 0, 1), {}),  # one task
])
def test_distributed_env_reads_torchrun_then_slurm(monkeypatch, env, expected, exported):
    monkeypatch.setattr(os, "environ", dict(env))  # exactly these variables (and what it exports kept here)
    assert run_lib._distributed_env() == expected
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT"):
        assert os.environ.get(key) == exported.get(key, env.get(key)), key


def test_set_tf32_sets_matmuls_and_leaves_cudnn_on():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = False
        run_lib.set_tf32(1)
        assert torch.backends.cuda.matmul.allow_tf32 is True and torch.backends.cudnn.allow_tf32 is True
        torch.backends.cudnn.allow_tf32 = False
        run_lib.set_tf32(False)
        assert torch.backends.cuda.matmul.allow_tf32 is False and torch.backends.cudnn.allow_tf32 is True
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_seed_everything_seeds_python_numpy_and_torch():
    def draw():
        return random.random(), np.random.rand(), torch.rand(1).item()

    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    expected = draw()
    run_lib.seed_everything(5)
    assert draw() == expected
    run_lib.seed_everything(2**32 + 7)  # numpy takes seeds below 2^32: the same seed mod 2^32
    assert torch.initial_seed() == 2**32 + 7
    numpy_draw = np.random.rand()
    np.random.seed(7)
    assert np.random.rand() == numpy_draw


# ---------------------------------------------------------------- the run directory

def nano_cfg(**sets):
    return config_lib.resolve("nano", "adam", 1, None, [f"{k}={v}" for k, v in sets.items()])


def test_saved_config_is_none_with_a_warning_when_damaged(tmp_path, capsys):
    saved = run_lib.RunDir(tmp_path)
    assert run_lib.saved_config(saved) is None and capsys.readouterr().err == ""  # none: no warning
    cfg = nano_cfg()
    saved.config_file.write_text(config_lib.dump(cfg))
    assert run_lib.saved_config(saved) == cfg
    for text in ("experiment: nano\nseed: 1\n", "optimizer: adam\n", "", "optimizer: {lr: 1}\n"):
        saved.config_file.write_text(text)
        assert run_lib.saved_config(saved) is None
        assert capsys.readouterr().err == (f"warning: {saved.config_file} is incomplete (no optimizer.name); checking "
                                           "the checkpoint and summary instead, and rewriting it\n")
    saved.config_file.write_bytes(b"a: [1\n")
    assert run_lib.saved_config(saved) is None
    err = capsys.readouterr().err
    assert err.startswith(f"warning: {saved.config_file} is not valid YAML: ") and err.endswith(
        "; checking the checkpoint and summary instead, and rewriting it\n") and err.count("\n") == 1
    assert run_lib.saved_config(saved, warn=False) is None and capsys.readouterr().err == ""


def finished(folder: Path, metrics: bytes = b'{"step": 0, "split": "val", "loss": 1.0}\n', status="completed",
             cfg=None):
    folder.mkdir(parents=True, exist_ok=True)
    cfg = cfg or nano_cfg()
    (folder / "summary.json").write_text(json.dumps({
        "status": status, "experiment": cfg["experiment"], "seed": cfg["seed"], "optimizer": cfg["optimizer"]["name"],
        "hyperparameters": {k: v for k, v in cfg["optimizer"].items() if k != "name"}}))
    if metrics is not None:
        (folder / "metrics.jsonl").write_bytes(metrics)
    return run_lib.RunDir(folder)


def test_check_records_wants_whole_records_of_a_finished_run(tmp_path):
    run_lib.check_records(finished(tmp_path / "ok"))
    saved = finished(tmp_path / "none", None)
    assert refused(run_lib.check_records, saved) == (
        f"{saved.metrics_file} holds no record but the run is completed: delete {saved.path} to redo the run")
    saved = finished(tmp_path / "empty", b"", "diverged")
    assert refused(run_lib.check_records, saved) == (
        f"{saved.metrics_file} holds no record but the run is diverged: delete {saved.path} to redo the run")
    saved = finished(tmp_path / "torn", b'{"step": 0, "loss": 1.0}\n{"step": 1, "lo')
    assert refused(run_lib.check_records, saved) == (
        f"{saved.metrics_file} ends in a torn line but the run is completed: delete {saved.path} to redo the run")
    saved = finished(tmp_path / "corrupt", b'{"step": 0}\nnot json\n{"step": 2}\n')
    message = refused(run_lib.check_records, saved)
    assert message.endswith(f"; the run is completed but its records are damaged: delete {saved.path} to redo the run")
    assert message.startswith(str(saved.metrics_file)) and "\n" not in message


def test_stamp_changes_with_each_file_read_before_the_lock(tmp_path):
    saved = run_lib.RunDir(tmp_path)
    assert run_lib._stamp(saved) == (None,) * 5
    names = ["config.yaml", "checkpoint.pt", "checkpoint.prev.pt", "summary.json", "metrics.jsonl"]
    stamps = [run_lib._stamp(saved)]
    for name in names:
        (tmp_path / name).write_text("x")
        stamps.append(run_lib._stamp(saved))
    assert len(set(stamps)) == len(stamps)  # each file counts
    path = tmp_path / "metrics.jsonl"
    st = path.stat()
    before = run_lib._stamp(saved)
    path.write_text("yy")  # grown
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert run_lib._stamp(saved) != before
    before = run_lib._stamp(saved)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched
    assert run_lib._stamp(saved) != before
    before, st = run_lib._stamp(saved), path.stat()
    other = tmp_path / "other"
    other.write_text("yy")
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(other, path)  # another file: same size and time, another inode
    assert run_lib._stamp(saved) != before


def checkpoint(path: Path, cfg: dict, step: int = 5):
    ckpt.save_atomic({"step": step, "config": cfg, "metrics_offset": 0}, path)


def test_open_run_dir_starts_a_new_run(tmp_path):
    cfg, out = nano_cfg(), tmp_path / "run"
    out.mkdir()
    (out / ".config.yaml.tmp123").write_text("a killed writer's")
    assert open_run_dir(out, cfg) is None
    assert (out / "config.yaml").read_text() == config_lib.dump(cfg)
    assert (out / ".lock").is_file() and not (out / ".config.yaml.tmp123").exists()
    assert open_run_dir(out, cfg) is None  # the same config again: a resume


def test_open_run_dir_of_another_rank_writes_nothing(tmp_path):
    out = tmp_path / "run"
    assert open_run_dir(out, nano_cfg(), writer=False) is None
    assert not out.exists()


def test_open_run_dir_refuses_another_config_in_any_file(tmp_path):
    cfg, out = nano_cfg(), tmp_path / "run"
    open_run_dir(out, cfg)
    assert refused(open_run_dir, out, nano_cfg(**{"train.max_iters": 7})) == (
        f"{out} holds a run with a different config (train.max_iters); resume it with the same arguments or "
        "choose another --out")
    checkpoint(out / "checkpoint.pt", nano_cfg(**{"train.grad_clip": 0.5}))
    assert refused(open_run_dir, out, cfg).startswith(f"{out / 'checkpoint.pt'} holds a run with a different "
                                                      "config (train.grad_clip);")
    (out / "checkpoint.pt").unlink()
    (out / "summary.json").write_text(json.dumps({"status": "interrupted", "experiment": "nano", "seed": 2,
                                                  "optimizer": "adam", "hyperparameters": None}))
    assert refused(open_run_dir, out, cfg).startswith(
        f"{out / 'summary.json'} holds a run with a different config (optimizer.beta1, optimizer.beta2, "
        "optimizer.lr, seed);")
    hp = {k: v for k, v in cfg["optimizer"].items() if k != "name"}
    (out / "summary.json").write_text(json.dumps({"status": "interrupted", "experiment": "nano", "seed": 1,
                                                  "optimizer": "cd", "hyperparameters": hp}))
    assert f"{out / 'summary.json'} holds a run with a different config (optimizer.name);" in \
        refused(open_run_dir, out, cfg)
    (out / "summary.json").write_text(json.dumps({"status": "interrupted", "experiment": "nano", "seed": 1,
                                                  "optimizer": "adam", "hyperparameters": hp}))
    assert open_run_dir(out, cfg) is None


def test_open_run_dir_reads_the_checkpoint_once_and_passes_the_options(tmp_path, monkeypatch):
    cfg, out = nano_cfg(), tmp_path / "run"
    open_run_dir(out, cfg)
    checkpoint(out / "checkpoint.prev.pt", cfg, 3)  # only the previous one: still read
    calls, real = [], run_lib.load_latest
    monkeypatch.setattr(run_lib, "load_latest", lambda *a, **k: (calls.append((a, k)), real(*a, **k))[1])
    usable = lambda saved: None  # noqa: E731
    assert open_run_dir(out, cfg, usable=usable)["step"] == 3
    assert calls == [((out / "checkpoint.pt",), {"mmap": False, "usable": usable})]
    checkpoint(out / "checkpoint.pt", cfg, 5)
    assert open_run_dir(out, cfg, mmap=True)["step"] == 5 and calls[-1][1]["mmap"] is True
    finished(out)
    assert open_run_dir(out, cfg, finished=True)["step"] == 5 and calls[-1][1]["mmap"] is True  # read-only: mapped


def test_open_run_dir_lets_an_older_run_lack_the_experiments_later_keys(tmp_path):
    cfg, out = nano_cfg(), tmp_path / "run"
    open_run_dir(out, cfg)
    old = yaml.safe_load((out / "config.yaml").read_text())
    del old["model"]["scaled_init"]  # nano's runs before it existed did what "all" does
    (out / "config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    assert open_run_dir(out, cfg) is None
    checkpoint(out / "checkpoint.pt", old)  # its checkpoint's copy too
    assert open_run_dir(out, cfg)["step"] == 5


def test_open_run_dir_of_an_experiment_without_later_keys(tmp_path, monkeypatch):
    stub = type(sys)("train_stub")  # an experiment whose training module names no later keys
    stub.check_config = lambda cfg: None
    monkeypatch.setattr(config_lib, "experiment_module", lambda name: stub)
    cfg, out = nano_cfg(), tmp_path / "run"
    assert open_run_dir(out, cfg) is None and open_run_dir(out, cfg) is None


def test_open_run_dir_rewrites_a_damaged_config_once_checked(tmp_path, capsys):
    cfg, out = nano_cfg(), tmp_path / "run"
    open_run_dir(out, cfg)
    (out / "config.yaml").write_text("experiment: nano\n")  # torn
    assert open_run_dir(out, cfg) is None
    assert (out / "config.yaml").read_text() == config_lib.dump(cfg) and "warning:" in capsys.readouterr().err
    (out / "config.yaml").write_text("experiment: nano\n")
    open_run_dir(out, cfg, writer=False)  # another rank: no warning (rank 0 gives it), nothing written
    assert (out / "config.yaml").read_text() == "experiment: nano\n" and capsys.readouterr().err == ""


def test_open_run_dir_of_a_finished_run_checks_and_writes_only_a_missing_config(tmp_path, monkeypatch):
    cfg, out = nano_cfg(), tmp_path / "run"
    saved = finished(out)
    assert open_run_dir(out, cfg, finished=True) is None
    assert (out / "config.yaml").read_text() == config_lib.dump(cfg)  # missing: rewritten
    (out / "config.yaml").write_text(config_lib.dump(cfg) + "# mine\n")
    open_run_dir(out, cfg, finished=True)
    assert (out / "config.yaml").read_text().endswith("# mine\n")  # there: left alone
    (out / "config.yaml").unlink()
    monkeypatch.setenv("WORLD_SIZE", "2")  # several processes: none rewrites it
    open_run_dir(out, cfg, finished=True)
    assert not (out / "config.yaml").exists()
    monkeypatch.delenv("WORLD_SIZE")
    saved.metrics_file.unlink()
    assert refused(open_run_dir, out, cfg, finished=True).startswith(f"{saved.metrics_file} holds no record")
    assert not (out / "config.yaml").exists()


def test_open_run_dir_refuses_files_changed_while_it_took_the_lock(tmp_path, monkeypatch):
    cfg, out = nano_cfg(), tmp_path / "run"
    real = run_lib.RunDir.lock

    def lock_and_meanwhile(self):
        real(self)
        (self.path / "metrics.jsonl").write_text('{"step": 0}\n')  # another process wrote meanwhile

    monkeypatch.setattr(run_lib.RunDir, "lock", lock_and_meanwhile)
    assert refused(open_run_dir, out, cfg) == (f"{out} was changed by another process while this one started; "
                                               "run the command again")
    assert not (out / "config.yaml").exists()


# ---------------------------------------------------------------- start

def test_start_resolves_the_config_and_sets_up_the_process(tmp_path, monkeypatch):
    out = tmp_path / "run"
    run = run_lib.start("nano", ["--optimizer", "ADAM", "--out", str(out), "--set", "train.cpu_precision=bf16"])
    assert (run.dir, run.device, run.rank, run.local_rank, run.world_size) == (out, torch.device("cpu"), 0, 0, 1)
    assert run.cfg == nano_cfg(**{"train.cpu_precision": "bf16"}) | {"seed": 1337}  # paper.yaml's first seed
    assert run.precision == "bf16" and run.experiment == experiment("nano") and run.train.cpu_precision == "bf16"
    assert torch.initial_seed() == 1337 and not out.exists()  # nothing written: the loop opens it
    run = run_lib.start("nano", ["--optimizer", "adam", "--seed", "4", "--out", str(out)])
    assert run.seed == 4 and torch.initial_seed() == 4 and run.precision == "fp32"
    monkeypatch.chdir(tmp_path)
    assert run_lib.start(experiment("nano"), ["--optimizer", "cd", "--seed", "2"]).dir == Path("runs/nano/cd/seed2")


def test_start_refuses_in_one_line_what_it_cannot_run(tmp_path, monkeypatch):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("x")
    assert refused(run_lib.start, "nano", ["--optimizer", "adam", "--out", str(mine)]).startswith(
        f"--out {mine} is not empty and holds no run (notes.txt)")
    assert refused(run_lib.start, "nano", ["--optimizer", "adam", "--out", str(mine / "notes.txt" / "x")]).startswith(
        "--out ")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    assert refused(run_lib.start, "nano", ["--optimizer", "adam", "--set", "wandb=true", "--out", str(tmp_path / "w")]) \
        == "wandb=true but wandb is not installed: pip install wandb (or --set wandb=false)"
    assert run_lib.start("nano", ["--optimizer", "adam", "--out", str(tmp_path / "w")]) is not None  # wandb off: fine
    monkeypatch.setattr(importlib.util, "find_spec", real)
    if real("wandb") is not None:  # installed (environments/*.txt): wandb=true is fine
        assert run_lib.start("nano", ["--optimizer", "adam", "--set", "wandb=true", "--out", str(tmp_path / "w")])


def test_start_of_a_finished_run_does_nothing(tmp_path, monkeypatch):
    out, stdout = tmp_path / "run", Out()
    finished(out, status="diverged")
    monkeypatch.setattr(sys, "stdout", stdout)
    assert run_lib.start("nano", ["--optimizer", "adam", "--seed", "1", "--out", str(out)]) is None
    assert stdout.flushed == stdout.text == f"{out}: already diverged; nothing to do\n"
    monkeypatch.undo()
    done = finished(tmp_path / "lost", None)  # finished, but its records are gone: checked, refused
    assert refused(run_lib.start, "nano", ["--optimizer", "adam", "--seed", "1", "--out", str(done.path)]) == (
        f"{done.metrics_file} holds no record but the run is completed: delete {done.path} to redo the run")
    assert (out / "config.yaml").read_text() == config_lib.dump(nano_cfg())  # checked, and its config rewritten
    assert "(seed)" in refused(run_lib.start, "nano", ["--optimizer", "adam", "--seed", "2", "--out", str(out)])


def test_start_on_a_gpu_takes_its_local_ranks_device_and_the_gpu_precision(tmp_path, monkeypatch):
    # A CUDA machine, faked: 2 GPUs, this process local rank 3 of a 1-process torchrun.
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch, "manual_seed", lambda seed: None)  # torch's would seed the (fake) GPUs too
    monkeypatch.setattr(os, "environ", {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "3"})
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        run = run_lib.start("nano", ["--optimizer", "adam", "--out", str(tmp_path / "run")])
        assert run.device == torch.device("cuda", 1) and chosen == [torch.device("cuda", 1)]  # 3 % 2 GPUs
        assert (run.rank, run.local_rank, run.world_size) == (0, 3, 1)
        assert run.precision == "fp16"  # nano's train.precision (its cpu_precision is fp32)
        assert torch.backends.cuda.matmul.allow_tf32 is True  # nano's train.tf32
        run_lib.start("nano", ["--optimizer", "adam", "--out", str(tmp_path / "run"), "--set", "train.tf32=false"])
        assert torch.backends.cuda.matmul.allow_tf32 is False
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.parametrize("cuda,backend", [(False, "gloo"), (True, "nccl")])
def test_start_of_one_of_several_processes_joins_the_group_and_leaves_it_at_exit(tmp_path, monkeypatch, cuda, backend):
    joined, at_exit, left, up = [], [], [], []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch, "manual_seed", lambda seed: None)
    monkeypatch.setattr(os, "environ", {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "0"})
    monkeypatch.setattr(run_lib.dist, "is_initialized", lambda: bool(up))
    monkeypatch.setattr(run_lib.dist, "init_process_group", lambda backend: (joined.append(backend), up.append(1)))
    monkeypatch.setattr(run_lib.dist, "destroy_process_group", lambda: left.append(1))
    monkeypatch.setattr(run_lib.atexit, "register", at_exit.append)
    run = run_lib.start("nano", ["--optimizer", "adam", "--out", str(tmp_path / "run")])
    assert (run.rank, run.local_rank, run.world_size, run.is_main) == (1, 0, 2, False)
    assert joined == [backend] and len(at_exit) == 1
    at_exit[0]()
    assert left == [1]
    up.clear()
    at_exit[0]()  # the group already gone: nothing to tear down
    assert left == [1]
    up.append(1)  # a group someone else made: not made again
    run_lib.start("nano", ["--optimizer", "adam", "--out", str(tmp_path / "run")])
    assert joined == [backend] and len(at_exit) == 1


def test_start_of_a_folder_of_tasks_and_of_a_task(tmp_path, monkeypatch):
    # bert's own config checks (bert.train, which imports transformers) are not what is tested here
    stub = type(sys)("bert_train_stub")
    stub.check_config, stub.BEHAVIOUR_OF_OLDER_RUNS = (lambda cfg: None), {}
    monkeypatch.setattr(config_lib, "experiment_module", lambda name: stub)
    run = run_lib.start("bert", ["--optimizer", "adam", "--task", "qnli", "--out", str(tmp_path / "q")])
    assert run.experiment == experiment("bert/qnli") and run.cfg["experiment"] == "bert-qnli"
    run = run_lib.start(experiment("bert/sst2"), ["--optimizer", "adam", "--out", str(tmp_path / "s")])
    assert run.experiment == experiment("bert/sst2") and run.cfg["experiment"] == "bert-sst2"


def test_start_reads_the_config_file_and_defaults_the_seed_to_0(tmp_path):
    configs = tmp_path / "configs"
    configs.mkdir()
    paper = config_lib.read_yaml(ROOT / "nano" / "configs" / "paper.yaml")
    del paper["seeds"]
    paper["train"]["eval_iters"] = 3  # not nano's own configs: these
    (configs / "paper.yaml").write_text(yaml.safe_dump(paper))
    (configs / "best.yaml").write_text("")
    exp = run_lib.Experiment("nano", "nano.train", (), configs, "nano", "nano")
    over = tmp_path / "over.yaml"
    over.write_text("train: {max_iters: 12}\n")
    run = run_lib.start(exp, ["--optimizer", "adam", "--config", str(over), "--out", str(tmp_path / "run")])
    assert run.seed == 0 and run.train.max_iters == 12 and run.train.eval_iters == 3

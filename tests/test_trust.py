"""Trust: nothing a run or data folder holds runs code, checkpoints resume across devices and
GPU counts, the kit deletes and replaces only what it made, records are durable (see
harness/README.md, "Security")."""
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import records
from harness import checkpoint as ckpt
from harness import launch
from harness import loop as harness_loop
from harness import run as run_lib
from harness.errors import EXIT_USAGE, UsageError
from harness.loop import EXIT_INTERRUPTED, STOP_AFTER_ENV, TrainState, Trainer
from harness.token_bins import TokenBins
import nano
from nano import prepare as prep
from nano import train as nano_train
from test_harness import SMOKE, nano_args

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "old_nano"


class Planted:
    """Unpickling it creates ``marker`` (as a planted ``os.system(...)`` would run a command)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant_checkpoint(path, marker, config=None):
    torch.save({"config": config, "step": 3, "payload": Planted(marker)}, path)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# --------------------------------------------------------------------------- no code from a run folder

@pytest.mark.parametrize("name", ["checkpoint.pt", "checkpoint.prev.pt"])
def test_a_planted_checkpoint_runs_nothing_and_is_one_line(nano_data, tmp_path, capsys, name):
    out, marker = tmp_path / "run", tmp_path / "marker"
    out.mkdir()
    plant_checkpoint(out / name, marker)
    for _ in range(2):  # the start's config check, and again: nothing changed
        assert nano_train.main(nano_args(nano_data, out)) == EXIT_USAGE
        line = one_error_line(capsys)
        assert name in line and "refused" in line and "io.open" in line
    assert not marker.exists()
    assert sorted(p.name for p in out.iterdir()) == [name]  # nothing written


def test_a_planted_checkpoint_beside_a_torn_one_is_refused_not_skipped(tmp_path):
    marker = tmp_path / "marker"
    (tmp_path / "checkpoint.pt").write_bytes(b"PK\x03\x04 torn")
    plant_checkpoint(tmp_path / "checkpoint.prev.pt", marker)
    with pytest.raises(ckpt.UnsafeCheckpoint, match="checkpoint.prev.pt holds objects"):
        ckpt.load_latest(tmp_path / "checkpoint.pt")
    assert not marker.exists()


def test_a_launch_over_a_planted_checkpoint_runs_nothing(nano_data, tmp_path):
    runs, marker = tmp_path / "runs", tmp_path / "marker"
    (runs / "adam" / "seed1").mkdir(parents=True)
    plant_checkpoint(runs / "adam" / "seed1" / "checkpoint.pt", marker)
    code = launch.main(["nano", "--optimizers", "adam", "--seeds", "1", "--config", str(SMOKE), "--set",
                        f"data.dir={nano_data}", "--runs-dir", str(runs), "--no-report", "--parallel", "1"])
    assert code == 1 and not marker.exists()
    log = (runs / "logs" / "adam-seed1.log").read_text().strip().splitlines()
    assert log[-1].startswith("error: ") and "checkpoint.pt holds objects" in log[-1]


def test_a_sweep_over_a_planted_trial_checkpoint_runs_nothing(nano_data, tmp_path, capsys):
    from harness.sweep.cli import main as sweep_main
    from test_sweep import sweep_args

    runs, marker = tmp_path / "runs", tmp_path / "marker"
    trial = runs / "sweeps" / "nano" / "cd" / "trial-0"
    trial.mkdir(parents=True)
    plant_checkpoint(trial / "checkpoint.pt", marker)
    assert sweep_main(["run", *sweep_args(nano_data, runs, "--trials", "1", "--no-plot")]) == EXIT_USAGE
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: ") and "checkpoint.pt holds objects" in line
    assert not marker.exists()


def test_checkpoints_load_weights_only_without_any_allow_list(nano_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv(STOP_AFTER_ENV, "3")
    assert nano_train.main(nano_args(nano_data, out, "cadam")) == EXIT_INTERRUPTED
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        saved = torch.load(out / name, weights_only=True)  # plain torch: no extra globals
        assert saved["step"] in (0, 3) and isinstance(saved["rng"][0]["numpy"]["key"], torch.Tensor)


def test_a_checkpoint_of_an_earlier_version_resumes_identically(tmp_path, monkeypatch, capsys):
    # tests/fixtures/old_nano: a run interrupted at step 13 by commit 9ccfaa0 (numpy RNG state as
    # a numpy array, data with meta.pkl), and the records that code's resume gave.
    shutil.copytree(FIXTURE / "data", tmp_path / "data" / "tiny")
    shutil.copytree(FIXTURE / "run", tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    args = ["--optimizer", "ikfad", "--seed", "1", "--config", str(SMOKE), "--set", "data.dir=data/tiny", "--out", "run"]
    assert nano_train.main(args) == 0
    assert "Resuming run from step 13" in capsys.readouterr().out
    expected = [json.loads(line) for line in (FIXTURE / "expected.jsonl").read_text().splitlines()]
    assert records(tmp_path / "run") == expected


# --------------------------------------------------------------------------- no code from a data folder

def test_a_planted_meta_pkl_runs_nothing_and_is_one_line(nano_data, tmp_path, capsys):
    data, marker = tmp_path / "data", tmp_path / "marker"
    data.mkdir()
    for name in ("train.bin", "val.bin"):
        shutil.copy(Path(nano_data) / name, data / name)
    with open(data / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": 65, "itos": Planted(marker)}, f)
    with pytest.raises(UsageError, match=r"meta\.pkl holds objects.*refused.*--force"):
        TokenBins(data, nano.DATA)
    assert nano_train.main(nano_args(data, tmp_path / "run")) == EXIT_USAGE
    line = one_error_line(capsys)
    assert "meta.pkl" in line and "python -m nano.prepare" in line
    assert not marker.exists()


def test_an_old_meta_pkl_of_plain_values_is_still_read(tmp_path):
    for name, ids in (("train.bin", range(50)), ("val.bin", range(20))):
        np.array(ids, dtype=np.uint16).tofile(tmp_path / name)
    meta = {"vocab_size": 3, "itos": {0: "a", 1: "b", 2: "c"}, "stoi": {"a": 0, "b": 1, "c": 2}}
    for protocol in (0, 2, pickle.HIGHEST_PROTOCOL):
        (tmp_path / "meta.pkl").write_bytes(pickle.dumps(meta, protocol=protocol))
        bins = TokenBins(tmp_path, nano.DATA)
        assert bins.meta == meta and bins.vocab_size == 3


# --------------------------------------------------------------------------- data that cannot be confused

def test_prepare_without_input_file_never_writes_the_papers_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert prep.main(["--plays", "1"]) == 0
    assert not (tmp_path / "data" / "nano").exists()
    meta = json.loads((tmp_path / "data" / "nano-packaged" / "meta.json").read_text())
    assert (meta["source"], meta["plays"]) == ("packaged", 1) and meta["vocab_size"] == len(meta["itos"])
    with pytest.raises(UsageError, match="paper's data folder"):
        prep.prepare(source="packaged", out_dir="data/nano", plays=1)
    assert not (tmp_path / "data" / "nano").exists()


def test_a_run_on_the_papers_folder_refuses_other_data_unless_told(nano_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(nano_data, tmp_path / "data" / "nano")  # two packaged plays where tiny Shakespeare belongs
    args = ["--optimizer", "adam", "--seed", "1", "--config", str(SMOKE), "--set", "data.dir=data/nano",
            "--set", "train.max_iters=2", "--out", "run"]
    assert nano_train.main(args) == EXIT_USAGE
    line = one_error_line(capsys)
    assert "'packaged', not 'tinyshakespeare'" in line and "--set data.check_source=false" in line
    assert not (tmp_path / "run").exists()
    assert nano_train.main([*args, "--set", "data.check_source=false"]) == 0
    assert "warning: " in capsys.readouterr().err


def test_an_old_folder_without_a_source_is_taken_on_its_vocabulary(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data" / "nano"
    data.mkdir(parents=True)
    chars = [chr(c) for c in range(32, 97)]  # 65 characters, as tiny Shakespeare's
    (np.arange(2000) % 65).astype(np.uint16).tofile(data / "train.bin")
    (np.arange(300) % 65).astype(np.uint16).tofile(data / "val.bin")
    (data / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": 65, "itos": dict(enumerate(chars)),
                                                  "stoi": {c: i for i, c in enumerate(chars)}}))
    args = ["--optimizer", "adam", "--seed", "1", "--config", str(SMOKE), "--set", "data.dir=data/nano",
            "--set", "train.max_iters=2", "--out", "run"]
    assert nano_train.main(args) == 0
    assert "does not record its source" in capsys.readouterr().err


# --------------------------------------------------------------------------- the GPU path, on the CPU

@pytest.fixture(scope="module")
def stopped20(nano_data, tmp_path_factory):
    """A smoke run stopped at step 20: checkpoint.pt at step 20, checkpoint.prev.pt at step 10."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    os.environ[STOP_AFTER_ENV] = "20"
    try:
        assert nano_train.main(nano_args(nano_data, out, "ikfad")) == EXIT_INTERRUPTED
    finally:
        del os.environ[STOP_AFTER_ENV]
    return out


@pytest.fixture(scope="module")
def whole(nano_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    assert nano_train.main(nano_args(nano_data, out, "ikfad")) == 0
    return records(out)


def _trainer(nano_data, run_dir):
    """The Trainer ``nano.train`` builds for the smoke run in ``run_dir`` (resume() not yet called)."""
    from harness.data import LMEvaluation, RandomTokenBatches
    from harness.run import start
    from nano.model import GPT, GPTConfig

    run = start("nano", nano_args(nano_data, run_dir, "ikfad"))
    bins = TokenBins(nano_data, nano.DATA)
    m, t = run.cfg["model"], run.cfg["train"]
    evaluate = LMEvaluation(run, bins, t["batch_size"], m["block_size"], t["eval_iters"], t["eval_batches"])
    model = GPT(GPTConfig(**{**m, "vocab_size": bins.vocab_size}))
    return Trainer(run, model, RandomTokenBatches(bins, 8, m["block_size"], run.seed, run.rank), lambda *a: None,
                   evaluate, total_steps=t["max_iters"], eval_interval=t["eval_interval"])


class Restored(Exception):
    pass


def test_a_resume_on_cuda_loads_to_the_cpu_and_restores_the_generators(nano_data, stopped20, tmp_path, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(stopped20, out)
    saved = ckpt.load(out / "checkpoint.pt")
    trainer = _trainer(nano_data, out)
    trainer.run.device = torch.device("cuda", 0)  # what the run of a GPU node holds
    seen = []

    def set_rng_state(state):  # the last restore before the model is used on the (absent) GPU
        seen.append(state)
        raise Restored

    monkeypatch.setattr(ckpt, "set_rng_state", set_rng_state)
    with pytest.raises(Restored):
        trainer.resume()
    assert torch.equal(trainer.data.state_dict()["generator"], saved["data"][0]["generator"])
    assert all(torch.equal(trainer.evaluate.state_dict()[k], v) for k, v in saved["evaluate"].items())
    assert seen[0]["torch"].device.type == "cpu" and seen[0]["torch"].dtype == torch.uint8


def test_an_fsdp2_resume_loads_to_the_cpu(nano_data, stopped20, monkeypatch):
    saved = ckpt.load(stopped20 / "checkpoint.pt")
    trainer = Trainer.__new__(Trainer)
    trainer.run = SimpleNamespace(device=torch.device("cuda", 0), rank=1, world_size=2, distributed=True,
                                  cfg=saved["config"], dir=stopped20, is_main=False)
    trainer.state, trainer.ckpt_path, trainer.fsdp = TrainState(), stopped20 / "checkpoint.pt", True
    trainer.raw, trainer.optimizer = object(), object()
    trainer.scaler = torch.amp.GradScaler("cpu", enabled=False)
    devices, loads = set(), []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: (loads.append(k), real_load(*a, **k))[1])
    # What Run.open reads on a rank of an FSDP2 run (rank 1: reads, writes nothing), then resumes from.
    trainer.resume_from = run_lib.open_run_dir(stopped20, saved["config"], writer=False, mmap=True)

    def spy(model, optimizer, model_state, optim_state):
        devices.update(v.device.type for v in model_state.values())
        devices.update(v.device.type for s in optim_state["state"].values() for v in s.values())
        raise Restored

    monkeypatch.setattr(harness_loop.par, "load_full_state_dicts", spy)
    with pytest.raises(Restored):
        trainer.resume()
    assert devices == {"cpu"} and [k["map_location"] for k in loads] == ["cpu"] and loads[0]["mmap"]


class FakeCuda:
    """``torch.cuda`` with ``count`` devices, this process on ``current``: each device's RNG
    state a distinct byte tensor; ``set_rng_state`` calls recorded."""

    def __init__(self, monkeypatch, count, current, offset=0):
        self.states = {i: torch.tensor([offset + i] * 4, dtype=torch.uint8) for i in range(count)}
        self.set = []
        for name, fn in (("is_available", lambda: True), ("device_count", lambda: count),
                         ("current_device", lambda: current),
                         ("get_rng_state", lambda device="cuda": self.states[self._index(device, current)]),
                         ("set_rng_state", lambda state, device="cuda": self.set.append(
                             (state.clone(), self._index(device, current))))):
            monkeypatch.setattr(torch.cuda, name, fn)

    @staticmethod
    def _index(device, current):
        if isinstance(device, int):
            return device
        device = torch.device(device)
        return current if device.index is None else device.index


@pytest.mark.parametrize("saved_on, restored_on", [((8, 5), (1, 0)), ((1, 0), (4, 3)), ((2, 1), (2, 1))])
def test_cuda_rng_states_resume_on_another_gpu_count(tmp_path, monkeypatch, saved_on, restored_on):
    (n, rank), (m, device) = saved_on, restored_on
    with monkeypatch.context() as patch:
        FakeCuda(patch, n, rank, offset=10)
        ckpt.save_atomic({"rng": [ckpt.rng_state()]}, tmp_path / "c.pt")  # rank `rank` of n
    state = ckpt.load(tmp_path / "c.pt")["rng"][0]
    assert torch.equal(state["cuda"], torch.tensor([10 + rank] * 4, dtype=torch.uint8))  # its own device's only
    fake = FakeCuda(monkeypatch, m, device)
    ckpt.set_rng_state(state)
    assert len(fake.set) == 1 and fake.set[0][1] == device and torch.equal(fake.set[0][0], state["cuda"])


def test_an_earlier_versions_cuda_states_restore_this_devices_own(monkeypatch):
    states = [torch.tensor([i] * 4, dtype=torch.uint8) for i in range(8)]
    fake = FakeCuda(monkeypatch, 1, 0)
    ckpt.set_rng_state({"python": __import__("random").getstate(), "numpy": np.random.get_state(),
                        "torch": torch.get_rng_state(), "cuda": states})
    assert len(fake.set) == 1 and fake.set[0][1] == 0 and torch.equal(fake.set[0][0], states[0])


def test_a_cpu_checkpoint_resumed_with_fp16_loss_scaling_is_one_line(nano_data, stopped20, tmp_path, monkeypatch,
                                                                     capsys):
    out = tmp_path / "run"
    shutil.copytree(stopped20, out)
    real = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", lambda device, enabled: real(device, enabled=True))  # CUDA fp16
    assert nano_train.main(nano_args(nano_data, out, "ikfad")) == EXIT_USAGE
    line = one_error_line(capsys)
    assert "checkpoint.pt" in line and "fp16 loss scaling" in line and "CUDA_VISIBLE_DEVICES=" in line


# --------------------------------------------------------------------------- only what the kit made

def test_a_folder_of_ones_own_files_is_refused_and_left_as_it_was(nano_data, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    files = {".bashrc.tmpl": b"alias x=y\n", ".notes.tmp": b"notes\n", "config.yaml": b"my: own\n",
             "metrics.jsonl": b'{"my": 1}\n'}
    for name, data in files.items():
        (out / name).write_bytes(data)
    (out / ".cache.tmpdir").mkdir()
    (out / ".cache.tmpdir" / "x").write_bytes(b"x")
    before = sorted(p.name for p in out.rglob("*"))
    assert nano_train.main(nano_args(nano_data, out)) == EXIT_USAGE
    line = one_error_line(capsys)
    assert str(out) in line and "holds no run" in line
    assert sorted(p.name for p in out.rglob("*")) == before
    assert all((out / name).read_bytes() == data for name, data in files.items())


def test_stale_temp_cleanup_removes_only_the_writers_own_temp_files(tmp_path):
    (tmp_path / ".lock").write_text("host 1\n")
    mine = [".checkpoint.pt.tmp123", ".checkpoint.prev.pt.tmp9", ".summary.json.tmp77", ".config.yaml.tmp5"]
    others = [".bashrc.tmpl", ".notes.tmp", ".config.yaml.tmp5x", ".mydata.tmp12", "checkpoint.pt.tmp3"]
    for name in mine + others:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / ".cache.tmpdir").mkdir()
    (tmp_path / ".metrics.jsonl.tmp4").mkdir()  # a folder with a temp name: not a file
    (tmp_path / ".wandb.json.tmp8").symlink_to(tmp_path / ".bashrc.tmpl")  # a link: never followed or removed
    ckpt.remove_stale_temps(tmp_path)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([".lock", *others, ".cache.tmpdir", ".metrics.jsonl.tmp4", ".wandb.json.tmp8"])


# --------------------------------------------------------------------------- durable records

def test_atomic_writes_fsync_the_file_then_the_folder(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd))[1])
    ckpt.write_text_atomic(tmp_path / "study.md", "rows\n")
    assert (tmp_path / "study.md").read_text() == "rows\n"
    assert synced[-2].endswith(".study.md.tmp" + str(os.getpid())) and synced[-1] == str(tmp_path)


def test_metrics_are_fsynced_before_a_checkpoint_counts_them(nano_data, tmp_path, monkeypatch):
    events = []
    real_fsync, real_save = os.fsync, torch.save
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(Path(os.readlink(f"/proc/self/fd/{fd}")).name),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: (events.append(("save", obj.get("metrics_offset"))),
                                                                 real_save(obj, f, *a, **k))[1])
    out = tmp_path / "run"
    assert nano_train.main(nano_args(nano_data, out, "adam", 1, "--set", "train.max_iters=2")) == 0
    saves = [i for i, e in enumerate(events) if isinstance(e, tuple) and e[1]]
    assert saves and all("metrics.jsonl" in events[:i] for i in saves)


def test_a_checkpoint_past_the_end_of_the_records_resumes_from_the_previous(nano_data, stopped20, whole, tmp_path,
                                                                            capsys):
    out = tmp_path / "run"
    shutil.copytree(stopped20, out)
    prev = ckpt.load(out / "checkpoint.prev.pt")["metrics_offset"]
    latest = ckpt.load(out / "checkpoint.pt")["metrics_offset"]
    assert prev < latest
    with open(out / "metrics.jsonl", "r+b") as f:  # a node crash lost the records of step 20
        f.truncate(prev + 7)
    assert nano_train.main(nano_args(nano_data, out, "ikfad")) == 0
    err = capsys.readouterr().err
    assert "records lost" in err and "previous checkpoint" in err
    assert records(out) == whole

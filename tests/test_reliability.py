"""Run-directory reliability: one writer per directory, configs checked against everything
the directory holds (see harness/README.md, "Reliability")."""
import errno
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import records
from harness.errors import EXIT_USAGE
from harness.loop import EXIT_INTERRUPTED, STOP_AFTER_ENV
from nano import train as nano_train
from test_harness import nano_args

ROOT = Path(__file__).resolve().parents[1]
HOLD = ("import sys, time; from harness.rundir import RunDir; RunDir(sys.argv[1]).lock(); "
        "print('held', flush=True); time.sleep(600)")


def test_a_second_process_on_a_run_directory_is_refused_naming_the_holder(nano_data, tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert nano_train.main(nano_args(nano_data, out)) == EXIT_USAGE
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"pid {holder.pid}" in err and socket.gethostname() in err
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The holder died: its stale .lock does not block, and the run writes its contract.
    assert nano_train.main(nano_args(nano_data, out)) == 0
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"
    assert (out / ".lock").read_text().split() == [socket.gethostname(), str(os.getpid())]


def test_a_completed_run_without_checkpoint_refuses_another_config(nano_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert nano_train.main(nano_args(nano_data, out, "adam", 1, "--set", "train.max_iters=2")) == 0
    (out / "checkpoint.pt").unlink()  # as a sweep does after a trial
    config = (out / "config.yaml").read_bytes()
    capsys.readouterr()
    assert nano_train.main(nano_args(nano_data, out, "adam", 1, "--set", "train.max_iters=3")) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train.max_iters" in err
    assert (out / "config.yaml").read_bytes() == config


def test_the_checkpoints_config_is_checked_too(nano_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert nano_train.main(nano_args(nano_data, out, "adam", 1, "--set", "train.max_iters=2")) == 0
    (out / "summary.json").unlink()  # a checkpointed run, not finished
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    saved["config"]["optimizer"]["lr"] = 123.0  # a checkpoint of another config
    torch.save(saved, out / "checkpoint.pt")
    config = (out / "config.yaml").read_bytes()
    capsys.readouterr()
    assert nano_train.main(nano_args(nano_data, out, "adam", 1, "--set", "train.max_iters=2")) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "optimizer.lr" in err and "checkpoint.pt" in err
    assert (out / "config.yaml").read_bytes() == config
    (out / "config.yaml").unlink()  # and without config.yaml: checked before anything is written
    assert nano_train.main(nano_args(nano_data, out, "adam", 1, "--set", "train.max_iters=2")) == EXIT_USAGE
    assert "optimizer.lr" in capsys.readouterr().err and not (out / "config.yaml").exists()


def test_a_summary_alone_is_checked_too(nano_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert nano_train.main(nano_args(nano_data, out, "adam", 1, "--set", "train.max_iters=2")) == 0
    for name in ("checkpoint.pt", "checkpoint.prev.pt", "config.yaml"):
        (out / name).unlink(missing_ok=True)  # all a pruned sweep trial may keep is its records
    summary = (out / "summary.json").read_bytes()
    capsys.readouterr()
    for other in (["--set", "optimizer.lr=0.5"], ["--seed", "2"]):
        args = nano_args(nano_data, out, "adam", 1, "--set", "train.max_iters=2") + other
        assert nano_train.main(args) == EXIT_USAGE
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "summary.json" in err and ("optimizer.lr" in err or "seed" in err), err
    assert (out / "summary.json").read_bytes() == summary and not (out / "config.yaml").exists()
    # The same arguments: already completed, nothing to do.
    assert nano_train.main(nano_args(nano_data, out, "adam", 1, "--set", "train.max_iters=2")) == 0
    assert "already completed" in capsys.readouterr().out


@pytest.fixture(scope="module")
def whole(nano_data, tmp_path_factory):
    """The records of an uninterrupted smoke run, to compare recovered runs with."""
    out = tmp_path_factory.mktemp("whole") / "run"
    assert nano_train.main(nano_args(nano_data, out, "ikfad")) == 0
    return records(out)


def _interrupted(nano_data, out, monkeypatch):
    """A run stopped at step 13: checkpoint.pt at step 13, checkpoint.prev.pt at step 10."""
    monkeypatch.setenv(STOP_AFTER_ENV, "13")
    assert nano_train.main(nano_args(nano_data, out, "ikfad")) == EXIT_INTERRUPTED
    monkeypatch.delenv(STOP_AFTER_ENV)
    assert (out / "checkpoint.prev.pt").exists()


def test_a_truncated_checkpoint_falls_back_to_the_previous_one(nano_data, whole, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _interrupted(nano_data, out, monkeypatch)
    data = (out / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    assert nano_train.main(nano_args(nano_data, out, "ikfad")) == 0
    assert "previous checkpoint" in capsys.readouterr().err
    assert records(out) == whole


def test_unreadable_checkpoints_are_a_one_line_error(nano_data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _interrupted(nano_data, out, monkeypatch)
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        (out / name).write_bytes(b"PK\x03\x04 torn")
    capsys.readouterr()
    assert nano_train.main(nano_args(nano_data, out, "ikfad")) == EXIT_USAGE
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "checkpoint.pt" in last and "delete" in last


def test_metrics_shorter_than_the_checkpoint_says_are_refused_without_nul_bytes(nano_data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _interrupted(nano_data, out, monkeypatch)
    (out / "metrics.jsonl").write_bytes(b"")
    capsys.readouterr()
    assert nano_train.main(nano_args(nano_data, out, "ikfad")) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "metrics.jsonl" in err
    assert b"\0" not in (out / "metrics.jsonl").read_bytes()


@pytest.mark.parametrize("damage", ["missing", "garbage in the kept records"])
def test_metrics_lost_or_damaged_before_the_checkpoint_are_refused(nano_data, tmp_path, monkeypatch, capsys, damage):
    out = tmp_path / "run"
    _interrupted(nano_data, out, monkeypatch)
    metrics = out / "metrics.jsonl"
    if damage == "missing":  # resuming would silently lose the first records
        metrics.unlink()
    else:  # same length, a line in the middle destroyed
        data = bytearray(metrics.read_bytes())
        data[5:25] = b"#" * 20
        metrics.write_bytes(bytes(data))
    capsys.readouterr()
    for _ in range(2):  # and again: the directory is not changed by the refusal
        assert nano_train.main(nano_args(nano_data, out, "ikfad")) == EXIT_USAGE
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "metrics.jsonl" in err and "delete checkpoint.pt" in err, err


@pytest.mark.parametrize("damage", [b"", b"\xff\xfe not yaml {[", b"seeds: [1, 2\n"])
def test_a_damaged_config_yaml_is_rebuilt_after_checking_the_checkpoint(nano_data, whole, tmp_path, monkeypatch,
                                                                         capsys, damage):
    out = tmp_path / "run"
    _interrupted(nano_data, out, monkeypatch)
    good = (out / "config.yaml").read_bytes()
    (out / "config.yaml").write_bytes(damage)
    capsys.readouterr()
    # Another config is still refused: the checkpoint's copy is checked instead.
    assert nano_train.main(nano_args(nano_data, out, "ikfad", 1, "--set", "optimizer.h=0.1")) == EXIT_USAGE
    assert "optimizer.h" in capsys.readouterr().err
    assert nano_train.main(nano_args(nano_data, out, "ikfad")) == 0
    assert "config.yaml" in capsys.readouterr().err  # the one-line warning
    assert records(out) == whole and (out / "config.yaml").read_bytes() == good
    # Damaged once the run is completed: rewritten too, nothing redone.
    (out / "config.yaml").write_bytes(damage)
    assert nano_train.main(nano_args(nano_data, out, "ikfad")) == 0
    assert "already completed" in capsys.readouterr().out and (out / "config.yaml").read_bytes() == good


@pytest.mark.parametrize("damage", ["missing", "torn end", "garbage"])
def test_a_completed_run_with_damaged_records_is_a_one_line_error(nano_data, tmp_path, capsys, damage):
    out = tmp_path / "run"
    assert nano_train.main(nano_args(nano_data, out, "adam", 1, "--set", "train.max_iters=2")) == 0
    metrics = out / "metrics.jsonl"
    if damage == "missing":
        metrics.unlink()
    elif damage == "torn end":
        metrics.write_bytes(metrics.read_bytes()[:-30])
    else:
        metrics.write_bytes(b"\xff\xfe" * 50)
    capsys.readouterr()
    assert nano_train.main(nano_args(nano_data, out, "adam", 1, "--set", "train.max_iters=2")) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "metrics.jsonl" in err and f"delete {out}" in err, err


def test_a_full_disk_at_a_checkpoint_is_one_line_and_resumable(nano_data, whole, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real_save, calls = torch.save, []

    def full_disk_at_the_second(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk_at_the_second)
    assert nano_train.main(nano_args(nano_data, out, "ikfad")) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "checkpoint.pt" in err and "disk is full" in err
    assert not list(out.glob(".*.tmp*"))  # the temp file is removed
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 0  # the last good one
    monkeypatch.setattr(torch, "save", real_save)  # space freed
    assert nano_train.main(nano_args(nano_data, out, "ikfad")) == 0
    assert records(out) == whole


def test_a_full_disk_at_a_record_is_one_line_and_resumable(nano_data, whole, tmp_path, monkeypatch, capsys):
    import builtins

    from harness import logging as run_logging

    out, real_open, appends = tmp_path / "run", builtins.open, []

    class FullDisk:  # the file as a full disk leaves it: part of the line written, then ENOSPC
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            self.f.write(text[:7])
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

    def open_full_at_the_fifth_append(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if mode == "a":
            appends.append(1)
            if len(appends) == 5:
                return FullDisk(f)
        return f

    monkeypatch.setattr(run_logging, "open", open_full_at_the_fifth_append, raising=False)
    assert nano_train.main(nano_args(nano_data, out, "ikfad")) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "metrics.jsonl" in err and "disk is full" in err, err
    assert not (out / "metrics.jsonl").read_bytes().endswith(b"\n")  # a torn line was left
    monkeypatch.setattr(run_logging, "open", real_open, raising=False)  # space freed
    assert nano_train.main(nano_args(nano_data, out, "ikfad")) == 0
    assert records(out) == whole


def test_stale_temp_files_are_removed_when_a_run_starts(nano_data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".checkpoint.pt.tmp999999").write_bytes(b"torn")
    assert nano_train.main(nano_args(nano_data, out, "adam", 1, "--set", "train.max_iters=2")) == 0
    assert not list(out.glob(".*.tmp*"))


def test_diverge_factor_ends_a_finite_blow_up_as_diverged_across_a_resume(nano_data, tmp_path, monkeypatch):
    # Momentum SGD at 3,000x its tuned step with clipping: the loss climbs from 4.1 to about 500
    # by the second evaluation and stays finite. Without the rule that run is "completed".
    out, blow_up = tmp_path / "run", ("--set", "optimizer.lr=30", "--set", "train.grad_clip=1.0")
    rule = (*blow_up, "--set", "train.diverge_factor=10")
    monkeypatch.setenv(STOP_AFTER_ENV, "5")  # the first evaluation's loss must survive the resume
    assert nano_train.main(nano_args(nano_data, out, "msgd", 1, *rule)) == EXIT_INTERRUPTED
    monkeypatch.delenv(STOP_AFTER_ENV)
    assert nano_train.main(nano_args(nano_data, out, "msgd", 1, *rule)) == 0
    assert json.loads((out / "summary.json").read_text())["status"] == "diverged"
    val = [r for r in records(out) if r["split"] == "val"]
    assert [r["step"] for r in val] == [0, 10] and 10 * val[0]["loss"] < val[1]["loss"] < float("inf")
    off = tmp_path / "off"
    assert nano_train.main(nano_args(nano_data, off, "msgd", 1, *blow_up)) == 0
    assert json.loads((off / "summary.json").read_text())["status"] == "completed"


def test_a_key_added_later_at_its_old_behaviour_is_no_difference(tmp_path):
    from harness.errors import UsageError
    from harness.config import config_mismatch

    new = {"train": {"max_iters": 5, "diverge_factor": 0.0, "eval_batches": ["fresh", "fixed"]}}
    config_mismatch(tmp_path, {"train": {"max_iters": 5, "eval_batches": ["fresh", "fixed"]}}, new)  # no error
    with pytest.raises(UsageError, match=r"different config \(train.eval_batches\)"):
        config_mismatch(tmp_path, {"train": {"max_iters": 5, "diverge_factor": 0.0}}, new)


def test_any_other_write_on_a_full_disk_is_one_line(tmp_path, capsys):
    from harness.errors import command

    @command
    def writes_a_figure() -> int:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "val_loss.png"))

    @command
    def other_error() -> int:
        raise OSError(errno.EACCES, "Permission denied")

    assert writes_a_figure() == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "val_loss.png" in err[0] and "disk is full" in err[0]
    with pytest.raises(PermissionError):  # only a full disk: other faults keep their traceback
        other_error()

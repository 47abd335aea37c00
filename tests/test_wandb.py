"""Weights & Biases, offline: nano smoke runs with ``--set wandb=true``, read back from the
``.wandb`` files wandb wrote (tests/wandb_offline.py), against ``metrics.jsonl``.

The mapping under test (harness/logging.py, ``WandbRun``): record ``i`` of metrics.jsonl is
wandb history row ``_step = i`` with the training step as ``step`` and its numeric fields as
``<split>/<field>``; every record arrives exactly once, across interruptions, crashes and
resumes, in one wandb run whose id is kept in ``<run_dir>/wandb.json``.
"""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("wandb")

import wandb_offline  # noqa: E402
from harness import sweep  # noqa: E402
from harness.loop import EXIT_INTERRUPTED, STOP_AFTER_ENV  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "nano" / "configs" / "smoke.yaml")
WALL_CLOCK = "time_s"  # the one field a redone step does not reproduce


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """Offline, no server, and wandb's own folders (settings, cache, staging) under tmp_path."""
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv(STOP_AFTER_ENV, raising=False)
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    monkeypatch.delenv("WANDB_RESUME", raising=False)
    return os.environ.copy()


def train(data, out, env, *, stop_after=None, wrapper=None):
    """``python -m nano.train`` (or ``python -c WRAPPER`` with the same arguments) with wandb on."""
    args = ["--optimizer", "adam", "--seed", "1", "--config", SMOKE, "--set", f"data.dir={data}",
            "--set", "wandb=true", "--out", str(out)]
    cmd = [sys.executable, *(["-c", wrapper] if wrapper else ["-m", "nano.train"]), *args]
    run_env = {**env, **({STOP_AFTER_ENV: str(stop_after)} if stop_after else {})}
    return subprocess.run(cmd, cwd=ROOT, env=run_env, capture_output=True, text=True, timeout=300)


def metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def expected_row(record):
    row = {"step": record["step"]}
    for key, value in record.items():
        if value in ("nan", "inf", "-inf"):  # metrics.jsonl spells non-finite floats as strings
            value = float(value)
        if key not in ("split", "step") and isinstance(value, (int, float)):
            row[f"{record['split']}/{key}"] = value
    return row


def same(a, b):
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def check_mirror(run_dir, processes, redone_wall_clock=False):
    """Every metrics.jsonl record is in the run's wandb history exactly once, as row
    ``_step = index``, in one wandb run (the id of wandb.json) written by ``processes``
    processes; returns the rows. ``redone_wall_clock``: records redone after a crash keep
    the first attempt's time_s in wandb."""
    run_id = json.loads((Path(run_dir) / "wandb.json").read_text())["id"]
    files = wandb_offline.run_files(run_dir)
    assert len(files) == processes, files
    assert all(wandb_offline.run_ids(f) == {run_id} for f in files)
    rows = [row for f in files for row in wandb_offline.history(f)]
    records = metrics(run_dir)
    assert [row["_step"] for row in rows] == list(range(len(records))), "missing, duplicated or reordered rows"
    for row, record in zip(rows, records):
        got = {k: v for k, v in row.items() if not k.startswith("_")}
        want = expected_row(record)
        assert set(got) == set(want), (row["_step"], sorted(got), sorted(want))
        for key in want:
            if not (redone_wall_clock and key.endswith(f"/{WALL_CLOCK}")):
                assert same(got[key], want[key]), (row["_step"], key, got[key], want[key])
    assert json.loads((Path(run_dir) / "wandb.json").read_text())["logged"] == len(records)
    return rows


def step_metrics(path):
    """The globs defined with ``step`` as their x-axis in one .wandb file."""
    return {r.metric.glob_name for r in wandb_offline.records(path)
            if r.WhichOneof("record_type") == "metric" and r.metric.glob_name and r.metric.step_metric == "step"}


def summary_status(path):
    status = None
    for r in wandb_offline.records(path):
        if r.WhichOneof("record_type") == "summary":
            for item in r.summary.update:
                if item.key == "status":
                    status = json.loads(item.value_json)
    return status


def test_a_run_logs_every_record_once_train_and_val_apart(nano_data, tmp_path, wandb_env):
    out = tmp_path / "run"
    proc = train(nano_data, out, wandb_env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = check_mirror(out, processes=1)
    # The train and val records of each evaluation share a step but are two rows.
    assert [(row["step"], "train/loss" in row, "val/loss" in row) for row in rows] == \
        [(0, False, True)] + [(s, t, not t) for s in (10, 20, 30) for t in (True, False)]
    assert {"val/loss_fixed", "val/loss_fresh", "train/tokens"} <= set().union(*rows)
    (path,) = wandb_offline.run_files(out)
    assert step_metrics(path) == {"train/*", "val/*"}
    assert summary_status(path) == "completed"


def test_kill_and_resume_is_one_wandb_run_without_duplicates(nano_data, tmp_path, wandb_env):
    out = tmp_path / "run"
    stopped = train(nano_data, out, wandb_env, stop_after=13)
    assert stopped.returncode == EXIT_INTERRUPTED, stopped.stderr[-2000:]
    assert summary_status(wandb_offline.run_files(out)[0]) == "interrupted"
    first_id = json.loads((out / "wandb.json").read_text())["id"]
    check_mirror(out, processes=1)  # what it logged before the stop (steps 0-10)
    # A copy whose wandb state is deleted starts a new wandb run, which catches up first.
    fresh = tmp_path / "fresh"
    shutil.copytree(out, fresh)
    shutil.rmtree(fresh / "wandb")
    (fresh / "wandb.json").unlink()

    resumed = train(nano_data, out, wandb_env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((out / "wandb.json").read_text())["id"] == first_id
    rows = check_mirror(out, processes=2)
    assert [row["step"] for row in rows] == [0, 10, 10, 20, 20, 30, 30]
    assert summary_status(wandb_offline.run_files(out)[1]) == "completed"

    again = train(nano_data, fresh, wandb_env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((fresh / "wandb.json").read_text())["id"] != first_id
    check_mirror(fresh, processes=1)  # all 7 records, the 3 from before the copy included


# A crash between an evaluation's records and the checkpoint after it (a full disk, say):
# wandb already has records that the resumed run truncates from metrics.jsonl and redoes.
CRASH_AT_SECOND_CHECKPOINT = """
import runpy, sys
import harness.checkpoint as checkpoint
real, calls = checkpoint.save_atomic, []
def save_atomic(obj, path, **kwargs):
    calls.append(path)
    if len(calls) == 2:
        raise OSError(28, "No space left on device")
    real(obj, path, **kwargs)
checkpoint.save_atomic = save_atomic
sys.argv[0] = "nano.train"
runpy.run_module("nano.train", run_name="__main__")
"""


def test_records_sent_before_a_crash_are_not_sent_again(nano_data, tmp_path, wandb_env):
    out = tmp_path / "run"
    crashed = train(nano_data, out, wandb_env, wrapper=CRASH_AT_SECOND_CHECKPOINT)
    assert crashed.returncode == 2 and "error: the disk is full" in crashed.stderr, crashed.stderr[-2000:]
    assert [r["step"] for r in metrics(out)] == [0, 10, 10]  # the step-10 records, not checkpointed
    assert json.loads((out / "wandb.json").read_text())["logged"] == 3
    resumed = train(nano_data, out, wandb_env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Resuming" in resumed.stdout + resumed.stderr
    rows = check_mirror(out, processes=2, redone_wall_clock=True)
    first, second = (wandb_offline.history(f) for f in wandb_offline.run_files(out))
    assert [r["_step"] for r in first] == [0, 1, 2] and [r["_step"] for r in second] == [3, 4, 5, 6]
    assert len(rows) == 7


def test_a_sweep_trial_logs_its_records_once(nano_data, tmp_path, wandb_env):
    study = sweep.run_sweep(sweep.SweepOptions("nano", "adam", trials=1, config=SMOKE, poll_s=0.2,
                                               out_root=tmp_path / "sweeps", plot=False,
                                               sets=[f"data.dir={nano_data}", "wandb=true", "train.max_iters=4",
                                                     "train.eval_interval=2", "train.eval_iters=2"]))
    (trial,) = study.get_trials()
    run_dir = Path(trial.user_attrs["run_dir"])
    assert trial.state.name == "COMPLETE", (run_dir / "train.log").read_text()[-2000:]
    rows = check_mirror(run_dir, processes=1)
    assert [row["step"] for row in rows] == [0, 2, 2, 4, 4]
    (path,) = wandb_offline.run_files(run_dir)
    names = {r.run.display_name for r in wandb_offline.records(path) if r.WhichOneof("record_type") == "run"}
    assert names == {run_dir.name}


def test_a_diverged_run_logs_its_non_finite_loss_as_a_float(nano_data, tmp_path, wandb_env):
    out = tmp_path / "run"
    args = ["--optimizer", "msgd", "--seed", "1", "--config", SMOKE, "--set", f"data.dir={nano_data}",
            "--set", "optimizer.lr=1e6", "--set", "train.grad_clip=0.0", "--set", "wandb=true", "--out", str(out)]
    proc = subprocess.run([sys.executable, "-m", "nano.train", *args], cwd=ROOT, env=wandb_env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and json.loads((out / "summary.json").read_text())["status"] == "diverged"
    rows = check_mirror(out, processes=1)
    last = rows[-1]
    assert isinstance(last["train/loss"], float) and not math.isfinite(last["train/loss"]), last

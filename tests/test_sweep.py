"""Optuna sweeps, step-size robustness scans and scripts/figures.sh on the nano smoke config.

Every trial and every scan point is a real ``python -m nano.train`` subprocess (a few seconds
each), so the scenarios share module-scoped fixtures and use 4-iteration runs.
"""
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from harness import robustness, sweep
from harness.errors import UsageError
from harness.loop import EXIT_INTERRUPTED, STOP_AFTER_ENV
from harness.rundir import RunDir
from nano import train as nano_train

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "nano" / "configs" / "smoke.yaml")
TINY = ["--set", "train.max_iters=4", "--set", "train.eval_interval=2", "--set", "train.eval_iters=2"]


@pytest.fixture(scope="module")
def child_env():
    """One torch thread per child run: the trials of these tests are run one at a time on 2 cores."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        mp.delenv(STOP_AFTER_ENV, raising=False)
        yield


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A runs/ folder shared by the scenarios below (and rendered by scripts/figures.sh)."""
    return tmp_path_factory.mktemp("repo") / "runs"


def sweep_args(data, runs, *extra, optimizer="cd"):
    return ["nano", optimizer, "--config", SMOKE, "--set", f"data.dir={data}", *TINY,
            "--out-root", str(runs / "sweeps"), "--poll", "0.2", *extra]


def study_of(runs, optimizer="cd"):
    url = f"sqlite:///{runs / 'sweeps' / 'nano' / optimizer / 'study.db'}"
    return optuna.load_study(study_name=f"nano-{optimizer}", storage=url)


def val_steps(run_dir):
    rows = [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if r["split"] == "val"]


def wait_for(predicate, timeout=90.0):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def cd_study(child_env, nano_data, runs):
    """A 6-trial cd sweep stopped three ways before it finishes:
    1. a worker asked for 3 trials (then finished);
    2. a worker whose trial's run is stopped as by SIGTERM mid-run (exit 75): the worker fails the
       trial, re-enqueues it and exits 75;
    3. a worker SIGKILLed while its trial's run starts: the next worker on this host fails the trial
       (its pid is gone) and re-enqueues it;
    then a last worker completes the study."""
    assert sweep.main(sweep_args(nano_data, runs, "--trials", "3", "--no-plot")) == 0
    after_first = study_of(runs).get_trials()

    worker = [sys.executable, "-m", "harness.sweep", *sweep_args(nano_data, runs, "--trials", "6", "--no-plot")]
    stopped = subprocess.run(worker, cwd=ROOT, env={**os.environ, STOP_AFTER_ENV: "2"}, capture_output=True, text=True)
    after_stop = study_of(runs).get_trials()

    killed = subprocess.Popen(worker, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: (runs / "sweeps" / "nano" / "cd" / "trial-5" / "train.log").exists())
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert [t.state for t in study_of(runs).get_trials() if t.number == 5] == [TrialState.RUNNING]

    assert sweep.main(sweep_args(nano_data, runs, "--trials", "6")) == 0
    return {"after_first": after_first, "stopped": stopped, "after_stop": after_stop, "study": study_of(runs)}


def test_sweep_survives_interruptions_and_runs_no_trial_twice(cd_study, runs):
    assert [t.state for t in cd_study["after_first"]] == [TrialState.COMPLETE] * 3

    # The SIGTERM-like stop: trial 3 failed, its retry (trial 4) queued with the same parameters.
    assert cd_study["stopped"].returncode == EXIT_INTERRUPTED, cd_study["stopped"].stderr
    t3, t4 = cd_study["after_stop"][3], cd_study["after_stop"][4]
    assert (t3.state, t4.state) == (TrialState.FAIL, TrialState.WAITING)
    assert t4.params == t3.params and t4.user_attrs["root"] == 3

    study = cd_study["study"]
    by_state = {s: sorted(t.number for t in study.get_trials() if t.state == s) for s in TrialState}
    # 0-2 (first worker), 4 = retry of 3, 6 = retry of 5 (the killed worker's trial), 7 new.
    assert by_state[TrialState.COMPLETE] == [0, 1, 2, 4, 6, 7]
    assert by_state[TrialState.FAIL] == [3, 5] and not by_state[TrialState.RUNNING]
    assert by_state[TrialState.WAITING] == []

    # No run directory serves two finished trials, and every one ran its schedule exactly once.
    complete = [t for t in study.get_trials() if t.state == TrialState.COMPLETE]
    dirs = sorted(Path(t.user_attrs["run_dir"]).name for t in complete)
    assert dirs == ["trial-0", "trial-1", "trial-2", "trial-3", "trial-5", "trial-7"]
    assert sorted(p.name for p in (runs / "sweeps" / "nano" / "cd").glob("trial-*")) == dirs
    for t in complete:
        run_dir = Path(t.user_attrs["run_dir"])
        assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
        assert val_steps(run_dir) == [0, 2, 4]
        assert t.value == pytest.approx(RunDir(run_dir).best("val", "loss", "min")["loss"])
        assert t.user_attrs["seed"] == 1337  # nano's first paper seed, for every trial
        assert not (run_dir / "checkpoint.pt").exists()  # finished trials keep no checkpoint
    # The stopped trial's run resumed from its checkpoint instead of starting again.
    log = (runs / "sweeps" / "nano" / "cd" / "trial-3" / "train.log").read_text()
    assert log.count("$ ") == 2 and "Resuming" in log
    # The figures next to the study.
    for name in ("history.png", "importances.png", "study.md"):
        assert (runs / "sweeps" / "nano" / "cd" / name).stat().st_size > 0


def test_a_finished_study_runs_nothing_more(cd_study, nano_data, runs):
    before = len(study_of(runs).trials)
    assert sweep.main(sweep_args(nano_data, runs, "--trials", "6", "--no-plot")) == 0
    assert len(study_of(runs).trials) == before


def test_export_writes_best_yaml_format_that_nano_train_accepts(cd_study, nano_data, runs, tmp_path):
    best = cd_study["study"].best_params
    out = tmp_path / "tuned.yaml"
    base = ["export", "nano", "cd", "--out-root", str(runs / "sweeps"), "--out", str(out)]
    assert sweep.main(base) == 0
    assert yaml.safe_load(out.read_text()) == {"cd": best}
    assert sweep.main(base) == 2  # never overwritten without --force
    assert sweep.main(base + ["--force"]) == 0

    run_dir = tmp_path / "run"
    assert nano_train.main(["--optimizer", "cd", "--config", str(out), "--set", f"data.dir={nano_data}", *TINY,
                            "--out", str(run_dir)]) == 0
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["optimizer"] == {"name": "cd", **best}
    # The sweep ran on the smoke config: the file's command runs these values on that model.
    (use,) = [line for line in out.read_text().splitlines() if line.startswith("# Use with: ")]
    command = shlex.split(use[len("# Use with: "):])
    assert command[:3] == ["python", "-m", "nano.train"] and ["--config", SMOKE] == command[5:7]
    run_dir = tmp_path / "as-said"
    assert nano_train.main([*command[3:], "--set", f"data.dir={nano_data}", *TINY, "--out", str(run_dir)]) == 0
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["optimizer"] == {"name": "cd", **best}
    smoke = yaml.safe_load(Path(SMOKE).read_text())["model"]
    assert {k: cfg["model"][k] for k in smoke} == smoke


def test_write_best_replaces_one_entry_and_keeps_the_rest(tmp_path):
    path = tmp_path / "best.yaml"
    text = (ROOT / "nano" / "configs" / "best.yaml").read_text()
    path.write_text(text)
    sweep.write_best(path, "cd", {"h": 0.25, "gamma": 1.0e-5, "c": 3.0})
    new = path.read_text()
    assert yaml.safe_load(new) == {**yaml.safe_load(text), "cd": {"h": 0.25, "gamma": 1.0e-5, "c": 3.0}}
    assert [l for l in new.splitlines() if not l.startswith("cd:")] == \
        [l for l in text.splitlines() if not l.startswith("cd:")]  # comments and other entries untouched
    sweep.write_best(path, "ldhd", {"h": 0.1, "gamma": 0.5})  # an optimizer with no entry yet is appended
    assert yaml.safe_load(path.read_text())["ldhd"] == {"h": 0.1, "gamma": 0.5}


def test_nan_trials_are_pruned_and_the_study_completes(child_env, nano_data, runs, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("trials: 2\noptimizers:\n  msgd: {lr: [1.0e+30, 1.0e+35, log]}  # NaN within 2 steps\n")
    assert sweep.main(sweep_args(nano_data, runs, "--space", str(space), "--no-plot", optimizer="msgd")) == 0
    trials = study_of(runs, "msgd").get_trials()
    assert [t.state for t in trials] == [TrialState.PRUNED, TrialState.PRUNED]
    for t in trials:
        assert json.loads((Path(t.user_attrs["run_dir"]) / "summary.json").read_text())["status"] == "diverged"
    # Drawing a study without a completed trial is not an error.
    assert sweep.main(["plot", "nano", "msgd", "--out-root", str(runs / "sweeps")]) == 0


def test_a_pruner_stops_the_run_of_a_hopeless_trial(child_env, nano_data, tmp_path):
    """The worker reads the running trial's metrics, reports them, and SIGTERMs the run on a prune.
    Its run has the worker's --threads, not this process's OMP_NUM_THREADS (1, ``child_env``)."""
    options = sweep.SweepOptions("nano", "adam", trials=1, config=SMOKE, poll_s=0.2, out_root=tmp_path, plot=False,
                                 threads=2,
                                 sets=[f"data.dir={nano_data}", "train.max_iters=100000", "train.eval_interval=2",
                                       "train.eval_iters=2"])
    study = sweep.run_sweep(options, pruner_obj=optuna.pruners.ThresholdPruner(upper=0.0))  # any loss > 0 prunes
    (trial,) = study.get_trials()
    assert trial.state == TrialState.PRUNED and 0 in trial.intermediate_values
    summary = json.loads((Path(trial.user_attrs["run_dir"]) / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["steps"] < 100000
    assert summary["cpu_threads"] == 2


def test_bad_input_is_one_line_usage_error(tmp_path, capsys):
    with pytest.raises(UsageError, match="unknown experiment 'nope'; valid: .*nano"):
        sweep.experiment("nope")
    bad = tmp_path / "space.yaml"
    bad.write_text("optimizers:\n  cd: {h: [0.5, 1.0e-4, log]}\n")
    with pytest.raises(UsageError, match="low < high"):
        sweep.load_space(sweep.experiment("nano"), str(bad))
    with pytest.raises(UsageError, match="no search space for 'ldhd'"):
        sweep.optimizer_space(sweep.load_space(sweep.experiment("nano")), "ldhd")
    assert sweep.main(["nano", "cd", "--set", "train.nope=1", "--out-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --set: unknown key 'train.nope'")
    assert not (tmp_path / "nano").exists()  # nothing written


def test_nano_space_is_the_papers():
    space = sweep.load_space(sweep.experiment("nano"))
    assert space["trials"] == 80 and space["budget"] == {"train.max_iters": 2001}
    assert set(space["optimizers"]) == {"adam", "msgd", "cd", "cd0", "ikfad", "ikfad0", "cadam", "cadam0"}
    cd = space["optimizers"]["cd"]
    assert cd["gamma"] == sweep.Range(1e-6, 10.0, log=False) and cd["h"] == sweep.Range(1e-4, 0.5, log=True)
    assert "gamma" not in space["optimizers"]["cd0"]


def test_experiment_specs_map_tasks_to_folders(tmp_path, monkeypatch):
    from harness import config as config_lib

    monkeypatch.setattr(config_lib, "REPO", tmp_path)
    (tmp_path / "bert" / "configs" / "sst2").mkdir(parents=True)
    (tmp_path / "bert" / "train.py").write_text("")
    (tmp_path / "bert" / "configs" / "sst2" / "paper.yaml").write_text("seeds: [0]\n")
    for spec in ("bert/sst2", "bert-sst2"):
        exp = sweep.experiment(spec)
        assert (exp.name, exp.module, exp.args) == ("bert-sst2", "bert.train", ("--task", "sst2"))
        assert exp.configs == tmp_path / "bert" / "configs" / "sst2"
    with pytest.raises(UsageError, match="several tasks: name one of bert/sst2"):
        sweep.experiment("bert")


@pytest.fixture(scope="module")
def cd_scan(child_env, nano_data, runs):
    args = ["nano", "--optimizers", "cd", "--seeds", "1", "--points", "3", "--config", SMOKE,
            "--set", f"data.dir={nano_data}", *TINY, "--root", str(runs / "robustness")]
    assert robustness.main(args) == 0
    return args


def test_robustness_scan_runs_the_grid_and_draws_it(cd_scan, runs):
    exp_root = runs / "robustness" / "nano"
    tuned = yaml.safe_load((ROOT / "nano" / "configs" / "best.yaml").read_text())["cd"]
    for mult in (0.1, 1, 10):
        run_dir = exp_root / "cd" / f"x{mult:g}" / "seed1"
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert cfg["optimizer"] == {"name": "cd", **tuned, "h": pytest.approx(tuned["h"] * mult)}
        assert val_steps(run_dir) == [0, 2, 4]
    assert (exp_root / "robustness.png").stat().st_size > 0
    md = (exp_root / "robustness.md").read_text()
    assert "| CD | h | 0.4992 |" in md and "0.1x | 1x | 10x" in md
    # Finished runs are not redone.
    stamp = (exp_root / "cd" / "x1" / "seed1" / "metrics.jsonl").stat().st_mtime_ns
    assert robustness.main(cd_scan) == 0
    assert (exp_root / "cd" / "x1" / "seed1" / "metrics.jsonl").stat().st_mtime_ns == stamp


def test_robustness_table_marks_diverged_points():
    results = {"cd": {"hp": "h", "tuned": 0.5, "points": {0.1: [("completed", 2.0), ("completed", 2.2)],
                                                          10.0: [("diverged", 4.1), ("completed", 3.0)]}},
               "adam": {"hp": "lr", "tuned": 1e-3, "points": {0.1: [("completed", 2.5)], 10.0: [("diverged", None)]}}}
    md = robustness.table(results, "loss")
    assert "| Adam | lr | 0.001 | 2.5000 (1 seed) | diverged |" in md  # one seed where CD has two
    assert "| CD | h | 0.5 | 2.1000 ± 0.1414 | 3.0000 (1/2 diverged) |" in md
    assert robustness.log_grid(7)[0] == 0.1 and robustness.log_grid(7)[3] == 1.0 and robustness.log_grid(7)[-1] == 10.0


def test_figures_sh_renders_everything_and_indexes_it(cd_study, cd_scan, nano_data, runs, tmp_path):
    for name in ("adam", "cd"):
        assert nano_train.main(["--optimizer", name, "--seed", "1", "--config", SMOKE, "--set", f"data.dir={nano_data}",
                                *TINY, "--out", str(runs / "nano" / name / "seed1")]) == 0
    results = tmp_path / "results"
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "figures.sh")], capture_output=True, text=True,
                          env={**os.environ, "RUNS": str(runs), "RESULTS": str(results), "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr
    index = (results / "README.md").read_text()
    links = re.findall(r"\]\(([^)]+)\)", index)
    assert links and all((results / link).is_file() for link in links)
    for expected in ("nano/results.md", "nano/val_loss.png", "robustness/nano/robustness.png",
                     "sweeps/nano/cd/history.png", "sweeps/nano/cd/study.md"):
        assert expected in links, expected
    assert "| Adam | 1 |" in (results / "nano" / "results.md").read_text()


@pytest.mark.parametrize("option,value,message", [
    ("--trials", "0", "--trials must be at least 1, got 0"),
    ("--heartbeat", "-1", "--heartbeat must be at least 1, got -1"),
    ("--grace", "30", r"--grace \(30 s\) must be longer than --heartbeat \(60 s\)"),
    ("--poll", "0", "--poll must be a positive number of seconds, got 0.0"),
    ("--nproc", "0", "--nproc must be at least 1, got 0"),
    ("--prune-startup", "-1", "--prune-startup must be at least 0, got -1"),
])
def test_sweep_numbers_no_worker_can_use_are_one_line_errors(tmp_path, capsys, option, value, message):
    from harness.sweep.cli import main

    assert main(["run", "nano", "adam", "--out-root", str(tmp_path / "sweeps"), option, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(message, err[0]), err
    assert not (tmp_path / "sweeps").exists()  # nothing created


def closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("form", ["userinfo", "query", "at-inside"])
def test_storage_passwords_are_never_printed(tmp_path, capsys, monkeypatch, form):
    """A password in the URL's userinfo, in ``?password=``, or holding an ``@`` (which SQLAlchemy
    alone reads as the end of the password: the rest would be printed as the host): refused as an
    argument (every user reads command lines), and masked in every message when the URL comes from
    $SWEEP_STORAGE, also in the error of a server that cannot be reached."""
    from harness.sweep.cli import main

    port = closed_port()
    url, pieces = {
        "userinfo": (f"postgresql://optuna:hunter2x@127.0.0.1:{port}/optuna", ["hunter2x"]),
        "query": (f"postgresql://optuna@127.0.0.1:{port}/optuna?password=hunter2y", ["hunter2y"]),
        "at-inside": (f"postgresql://optuna:hun@ter2z@127.0.0.1:{port}/optuna", ["hun", "ter2z"]),
    }[form]
    shown = {"userinfo": f"postgresql://optuna:***@127.0.0.1:{port}/optuna",
             "query": f"postgresql://optuna@127.0.0.1:{port}/optuna?password=***",
             "at-inside": f"postgresql://optuna:***@127.0.0.1:{port}/optuna"}[form]
    monkeypatch.delenv("SWEEP_STORAGE", raising=False)
    assert main(["run", "nano", "cd", "--storage", url, "--out-root", str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert err == f"error: --storage {shown} holds a password, which every user of this machine can read on a " \
                  "command line; pass the URL in $SWEEP_STORAGE instead, or the password in a PGPASSFILE (mode 0600)\n"
    assert not any(p in out + err for p in pieces)

    monkeypatch.setenv("SWEEP_STORAGE", url)
    for command in (["run", "nano", "cd"], ["plot", "nano", "cd"], ["export", "nano", "cd", "--out", "x.yaml"]):
        assert main([*command, "--out-root", str(tmp_path)]) == 2
        out, err = capsys.readouterr()
        assert err.startswith(f"error: cannot connect to --storage {shown}: ") and err.count("\n") == 1, err
        assert "Connection refused" in err and not any(p in out + err for p in pieces), err


def test_a_planted_running_trial_never_gets_an_unrelated_process_killed(tmp_path):
    """Anyone who can write to a study can add a RUNNING trial naming this host, a dead worker and,
    as its run, any live process (here a `sleep` of this user, with its true start time, which
    /proc shows to all). A worker's start recovers such trials: it must not signal the process."""
    import socket

    from harness import processes
    from harness.sweep import study as study_lib

    url = f"sqlite:///{tmp_path / 'study.db'}"
    store = study_lib.storage(url)
    study = optuna.create_study(study_name="nano-cd", storage=store)
    gone = subprocess.Popen(["true"])
    gone.wait()
    victim = subprocess.Popen(["sleep", "300"])
    try:
        wait_for(lambda: processes.start_time(victim.pid) is not None)
        planted = [{},  # no start time recorded
                   {"child_start": processes.start_time(victim.pid)},  # its true start time, no run folder
                   {"child_start": processes.start_time(victim.pid), "run_dir": str(tmp_path / "trial-0")},
                   {"child_start": "1"}]  # a wrong start time
        for attrs in planted:
            trial = study.ask()
            for key, value in {"host": socket.gethostname(), "pid": gone.pid, "pid_start": "1",
                               "child_pid": victim.pid, **attrs}.items():
                trial.set_user_attr(key, value)
        assert len(study_lib.recover_dead_trials(study, store)) == len(planted)  # the trials are failed...
        time.sleep(0.5)
        assert victim.poll() is None  # ...and the process lives
    finally:
        victim.kill()
        victim.wait()


def test_study_md_and_export_force_replace_a_file_whole_or_not_at_all(tmp_path, monkeypatch):
    """A write that fails before it is complete (here: at its fsync) leaves the previous study.md
    or exported file as it was; before, both were rewritten in place, so a kill or a full disk
    left them torn."""
    study = optuna.create_study(study_name="nano-cd")
    study.add_trial(optuna.trial.create_trial(
        params={"h": 0.1}, distributions={"h": optuna.distributions.FloatDistribution(1e-4, 1.0, log=True)},
        value=2.5, user_attrs={"run_dir": str(tmp_path / "trial-0")}))
    out, md = tmp_path / "tuned.yaml", tmp_path / "study.md"
    out.write_text("cd: {h: 0.3}\n")
    md.write_text("# the previous summary\n")

    def broken_fsync(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        sweep.export_best(study, sweep.experiment("nano"), "cd", out, force=True)
    with pytest.raises(OSError):
        sweep.plot_study(study, tmp_path)
    assert out.read_text() == "cd: {h: 0.3}\n" and md.read_text() == "# the previous summary\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.png", "study.md", "tuned.yaml"]  # no temp left
    monkeypatch.undo()
    sweep.export_best(study, sweep.experiment("nano"), "cd", out, force=True)
    assert yaml.safe_load(out.read_text()) == {"cd": {"h": 0.1}}

"""harness.robustness on its own: the grid, the plan, the scan's loop (its runs played by fakes
of ``processes.start``), the collection of finished runs, the table and the command line (no
training: each test takes well under a second, for the module's mutation run,
results/mutation/README.md). The real scan is in test_sweep.py. Expected values are computed by
hand from the docstrings (e.g. the grid: 10**(-1 + 2k/(n-1)) to 3 significant digits)."""
import dataclasses
import json
import math
import os
import signal
from pathlib import Path

import pytest
from matplotlib.collections import PathCollection
from matplotlib.colors import to_rgba
from matplotlib.markers import MarkerStyle

from harness import robustness
from harness.errors import UsageError
from harness.experiments import experiment, train_command
from harness.outputs import Kept
from harness.signals import Interrupted

NANO = experiment("nano")
TUNED_CD_H = 0.4992  # nano/configs/best.yaml
BEST_NAMES = ["adam", "msgd", "cd", "cd0", "ikfad", "ikfad0", "cadam", "cadam0"]  # best.yaml's entries


def test_step_size_names():
    assert [robustness.step_size_name(n) for n in ("adam", "msgd", "cd", "ikfad0", "cadam", "ldhd")] == \
        ["lr", "lr", "h", "h", "h", "h"]


def test_log_grid():
    assert robustness.log_grid(7) == [0.1, 0.215, 0.464, 1.0, 2.15, 4.64, 10.0]
    assert robustness.log_grid(3) == [0.1, 1.0, 10.0]
    assert robustness.log_grid(2, 1.0, 100.0) == [1.0, 100.0]
    assert robustness.log_grid(1) == [1.0]
    with pytest.raises(UsageError) as e:
        robustness.log_grid(0)
    assert str(e.value) == "--points must be at least 1, got 0"


def test_mult_dir():
    assert [robustness.mult_dir(m) for m in (0.1, 1, 3.16227766, 10.0, 0.215)] == ["x0.1", "x1", "x3.16", "x10", "x0.215"]


def test_plan_lists_every_run_with_its_step_size(tmp_path):
    runs = robustness.plan(NANO, ["cd", "adam"], ["3", 4], [0.1, 10.0], tmp_path)
    expected = [(name, m, seed, hp, tuned * m) for name, hp, tuned in (("cd", "h", TUNED_CD_H), ("adam", "lr", 1.680e-3))
                for m in (0.1, 10.0) for seed in (3, 4)]
    assert [(r["optimizer"], r["multiplier"], r["seed"], r["hp"], r["value"]) for r in runs] == expected
    assert runs[0]["dir"] == tmp_path / "nano" / "cd" / "x0.1" / "seed3"
    assert runs[-1]["dir"] == tmp_path / "nano" / "adam" / "x10" / "seed4"
    with pytest.raises(UsageError) as e:
        robustness.plan(NANO, ["ldhd"], [1], [1.0], tmp_path)
    assert str(e.value) == (f"{NANO.configs / 'best.yaml'} has no tuned h for ldhd; valid optimizers: "
                            "adam, cadam, cadam0, cd, cd0, ikfad, ikfad0, msgd")


def test_plan_names_as_valid_only_the_optimizers_with_a_tuned_step_size(tmp_path):
    (tmp_path / "best.yaml").write_text("cd: {gamma: 1.0}\nadam: {lr: 0.001}\nmsgd: {lr: 0.1, momentum: 0.9}\n")
    exp = dataclasses.replace(NANO, configs=tmp_path)
    assert [r["value"] for r in robustness.plan(exp, ["msgd"], [1], [2.0], tmp_path)] == [0.2]
    with pytest.raises(UsageError) as e:
        robustness.plan(exp, ["cd"], [1], [1.0], tmp_path)
    assert str(e.value) == f"{tmp_path / 'best.yaml'} has no tuned h for cd; valid optimizers: adam, msgd"


# --------------------------------------------------------------------------- run directories written by hand

def write_run(folder: Path, status="completed", seed=1, hyperparameters=None, val=(), key="loss"):
    folder.mkdir(parents=True, exist_ok=True)
    summary = {"status": status, "seed": seed}
    if hyperparameters is not None:
        summary["hyperparameters"] = hyperparameters
    (folder / "summary.json").write_text(json.dumps(summary))
    rows = [{"split": "train", "step": 0, key: 0.0}] + [{"split": "val", "step": 10 * i, key: v} for i, v in enumerate(val)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return summary


def test_collect_reads_the_finished_runs(tmp_path):
    root = tmp_path / "nano"
    write_run(root / "cd" / "x0.1" / "seed1", seed=1, val=[3.0, 2.5, 2.7])  # no hyperparameters recorded
    write_run(root / "cd" / "x0.1" / "seed2", "diverged", 2, {"h": TUNED_CD_H * 0.1}, [4.0, math.nan])
    write_run(root / "cd" / "x10" / "seed1", seed=1, hyperparameters={"h": TUNED_CD_H * 10}, val=[])
    write_run(root / "cd" / "x1" / "seed1", "interrupted", val=[2.0])  # not finished
    write_run(root / "cd" / "xabc" / "seed1", val=[2.0])  # not a multiplier
    write_run(root / "rmsprop" / "x1" / "seed1", val=[2.0])  # not an optimizer
    summaries = []
    results = robustness.collect(root, summaries=summaries)
    assert list(results) == ["cd"]
    cd = results["cd"]
    assert (cd["hp"], dict(cd["points"])) == ("h", {0.1: [("completed", 2.5, 1), ("diverged", 4.0, 2)],
                                                     10.0: [("completed", None, 1)]})
    assert cd["tuned"] == pytest.approx(TUNED_CD_H)  # from the first run that recorded its h
    assert [name for name, _ in summaries] == ["cd/x0.1/seed1", "cd/x0.1/seed2", "cd/x10/seed1"]
    assert summaries[0][1] == {"status": "completed", "seed": 1}
    assert robustness.collect(root, summaries=None)["cd"]["tuned"] == pytest.approx(TUNED_CD_H)

    acc = tmp_path / "acc"
    write_run(acc / "adam" / "x1" / "seed1", hyperparameters={"lr": 0.002}, val=[0.5, 0.7, 0.6], key="acc")
    assert dict(robustness.collect(acc, "acc")["adam"]["points"]) == {1.0: [("completed", 0.7, 1)]}  # the highest


def test_collect_skips_a_folder_that_is_not_a_multiplier_and_reads_on(tmp_path):
    write_run(tmp_path / "adam" / "xabc" / "seed1", val=[2.0])  # sorted first
    write_run(tmp_path / "cd" / "x2" / "seed1", hyperparameters={"h": 1.0}, val=[3.0])
    results = robustness.collect(tmp_path)
    assert list(results) == ["cd"] and results["cd"]["tuned"] == 0.5 and dict(results["cd"]["points"]) == {
        2.0: [("completed", 3.0, 1)]}


def test_summarise():
    s = robustness._summarise
    mean, std, ok, div = s([("completed", 2.0), ("completed", 2.2)])
    assert (mean, ok, div) == (pytest.approx(2.1), 2, 0) and std == pytest.approx(math.sqrt(0.02))  # ddof 1
    assert s([("completed", 3.0, 1)]) == (3.0, 0.0, 1, 0)
    assert s([("completed", 3.0, 1), ("diverged", 4.1, 2), ("completed", None, 3)]) == (3.0, 0.0, 1, 2)
    assert s([("diverged", 4.1), ("interrupted", 2.0)]) == (None, None, 0, 1)


def test_table():
    results = {
        "cd": {"hp": "h", "tuned": TUNED_CD_H,
               "points": {0.1: [("completed", 2.0, 1), ("completed", 2.2, 2)],
                          10.0: [("diverged", 4.1, 1), ("completed", 3.0, 2), ("diverged", 5.0, 3)]}},
        "adam": {"hp": "lr", "tuned": None,
                 "points": {0.1: [("completed", 2.5, 1)], 1.0: [("diverged", None, 1), ("completed", None, 2)],
                            10.0: [("diverged", 5.0, 7)]}},
        "msgd": {"hp": "lr", "tuned": 0.1, "points": {1.0: [("completed", 2.0), ("diverged", 9.0)],
                                                       10.0: [("diverged", 4.0, None)]}},
    }
    assert robustness.table(results, "loss").splitlines() == [
        "| optimizer | step size | tuned | 0.1x | 1x | 10x |",
        "|---|---|---|---|---|---|",
        "| Adam | lr | – | 2.5000 (1 seed) | diverged (seeds 1, 2) | diverged (seed 7) |",
        "| mSGD | lr | 0.1 | – | 2.0000 (1/2 diverged) | diverged |",
        "| CD | h | 0.4992 | 2.1000 ± 0.1414 (2 seeds) | – | 3.0000 (2/3 diverged: seeds 1, 3) |"]
    # every cell as full as the fullest: no counts
    assert robustness.table({"cd": {"hp": "h", "tuned": 0.5, "points": {1.0: [("completed", 2.0, 1)]}}},
                            "loss").splitlines()[-1] == "| CD | h | 0.5 | 2.0000 |"


def test_experiment_root(tmp_path):
    assert robustness.experiment_root(tmp_path, "nano") == tmp_path / "nano"  # nothing there yet
    write_run(tmp_path / "cd" / "x1" / "seed1")  # a folder of runs itself
    assert robustness.experiment_root(tmp_path, "nano") == tmp_path
    (tmp_path / "nano").mkdir()
    assert robustness.experiment_root(tmp_path, "nano") == tmp_path / "nano"


def test_render_writes_the_figure_and_the_table(tmp_path):
    root, out = tmp_path / "nano", tmp_path / "out"
    with pytest.raises(UsageError) as e:
        robustness.render("nano", root, out)
    assert str(e.value) == f"no finished robustness runs under {root}; run `bash scripts/robustness.sh nano`"
    for m in (0.1, 1, 10):
        for seed in (1, 2):
            write_run(root / "cd" / robustness.mult_dir(m) / f"seed{seed}", "diverged" if m == 10 and seed == 2
                      else "completed", seed, {"h": TUNED_CD_H * m}, [2.0 + m + seed / 10, 2.0 + m])
    written = robustness.render("nano", root, out)
    assert written == [out / "robustness.png", out / "robustness.md"]
    assert (out / "robustness.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "robustness.md").read_text()
    assert md.startswith("# nano: step-size robustness\n\nBest validation loss (mean ± std over seeds that did not "
                         f"diverge) with the step size at a multiple of its tuned value and every other hyperparameter "
                         f"tuned; runs under `{root}`.")
    assert "\n\n| optimizer | step size | tuned | 0.1x | 1x | 10x |\n" in md
    assert "| CD | h | 0.4992 | 2.1000 ± 0.0000 | 3.0000 ± 0.0000 | 12.0000 (1/2 diverged: seed 2) |" in md
    assert "\n\n![robustness](robustness.png)\n\n<!-- built from 6 runs; records sha256:" in md
    # A table from fewer runs is kept unless forced.
    (root / "cd" / "x1" / "seed2" / "summary.json").unlink()
    with pytest.raises(Kept):
        robustness.render("nano", root, out)
    assert robustness.render("nano", root, out, force=True) == written
    assert "<!-- built from 5 runs;" in (out / "robustness.md").read_text()
    acc = robustness.render("nano", root, tmp_path / "acc", metric="acc")  # no acc records: every point is empty
    assert "Best validation acc (mean" in acc[-1].read_text()


def test_render_makes_its_folder_labels_the_figure_and_keeps_a_figure_it_did_not_write(monkeypatch, tmp_path):
    root, out = tmp_path / "nano", tmp_path / "a" / "b"
    write_run(root / "cd" / "x1" / "seed1", hyperparameters={"h": TUNED_CD_H}, val=[0.5], key="acc")
    figures = []
    monkeypatch.setattr(robustness.outputs, "save_figure", lambda fig, path, **kw: figures.append(fig))
    assert robustness.render("nano", root, out, metric="acc") == [out / "robustness.png", out / "robustness.md"]
    (ax,) = figures[0].axes
    assert (ax.get_title(), ax.get_ylabel()) == ("nano: step-size robustness", "best val acc")
    mine = tmp_path / "mine" / "robustness.png"  # a figure with no table recording what it was built from
    mine.parent.mkdir()
    mine.write_bytes(b"not ours")
    with pytest.raises(Kept):
        robustness.render("nano", root, mine.parent, metric="acc")
    assert mine.read_bytes() == b"not ours" and figures[1:] == []


def test_parse_shard():
    assert [robustness.parse_shard(t) for t in (None, "", "0/1", "3/4")] == [(0, 1), (0, 1), (0, 1), (3, 4)]
    for text in ("4/4", "-1/4", "1/0"):
        with pytest.raises(UsageError) as e:
            robustness.parse_shard(text)
        assert str(e.value) == f"--shard K/N needs 0 <= K < N, got {text!r}"
    for text in ("a/b", "1/2/3", "1"):
        with pytest.raises(UsageError) as e:
            robustness.parse_shard(text)
        assert str(e.value) == f"--shard expects K/N (e.g. 0/4), got {text!r}"


# --------------------------------------------------------------------------- the scan's loop, runs played by fakes

class FakeRun:
    def __init__(self, rc, status, log, error):
        self.rc, self.status, self.log, self.error = rc, status, Path(log), error

    def wait(self):
        run_dir = self.log.parent
        run_dir.mkdir(parents=True, exist_ok=True)
        self.log.write_text(f"training\nerror: {self.error}\nTraceback ...\n" if self.error else "training\n")
        if self.status:
            write_run(run_dir, self.status, hyperparameters={}, val=[2.0])
        return self.rc


class StartedRuns(list):
    """(command, log) of each run started; ``envs``: the environment each was given."""

    def __init__(self):
        super().__init__()
        self.envs = []


def fake_runs(monkeypatch, outcome=None):
    """``processes.start`` replaced: run k (in the order started) exits as ``outcome[k]``
    (exit status, summary status or None, error line or None), else completes."""
    started = StartedRuns()

    def start(cmd, log, env=None):
        rc, status, error = (outcome or {}).get(len(started), (0, "completed", None))
        started.append((cmd, Path(log)))
        started.envs.append(env)
        return FakeRun(rc, status, log, error)

    monkeypatch.setattr(robustness.processes, "start", start)
    return started


def test_run_scan_runs_each_unfinished_run_with_its_step_size(monkeypatch, tmp_path, capsys):
    runs = robustness.plan(NANO, ["cd"], [1], [0.1, 1.0, 10.0], tmp_path)
    write_run(runs[1]["dir"])  # finished: not redone
    started = fake_runs(monkeypatch, {1: (1, None, "boom")})
    assert robustness.run_scan(NANO, runs, "c.yaml", ["train.max_iters=4"]) == 1  # one crashed
    assert started.envs == [{}, {}]  # no threads given: each run inherits OMP_NUM_THREADS
    assert started == [(train_command(NANO, "cd", 1, r["dir"], "c.yaml", ["train.max_iters=4", f"optimizer.h={v!r}"]),
                        r["dir"] / "train.log") for r, v in ((runs[0], TUNED_CD_H * 0.1), (runs[2], TUNED_CD_H * 10))]
    out = capsys.readouterr().out.splitlines()
    assert out == [f"{runs[0]['dir']}: completed", f"{runs[2]['dir']}: exited with status 1: boom"]


def test_run_scan_gives_each_run_its_threads(monkeypatch, tmp_path):
    runs = robustness.plan(NANO, ["cd"], [1], [0.1, 1.0], tmp_path)
    started = fake_runs(monkeypatch)
    assert robustness.run_scan(NANO, runs, None, [], threads=1) == 0
    assert started.envs == [{"OMP_NUM_THREADS": "1"}] * 2


@pytest.mark.parametrize("rc,error", [(2, UsageError), (75, Interrupted)])
def test_run_scan_stops_at_a_run_that_cannot_start_or_was_interrupted(monkeypatch, tmp_path, rc, error):
    runs = robustness.plan(NANO, ["cd"], [1], [0.1, 1.0], tmp_path)
    started = fake_runs(monkeypatch, {0: (rc, None, "no data: run python -m nano.prepare")})
    with pytest.raises(error) as e:
        robustness.run_scan(NANO, runs, None, [])
    assert len(started) == 1
    assert str(e.value) == (f"{runs[0]['dir']} could not start: no data: run python -m nano.prepare" if rc == 2
                            else f"{runs[0]['dir']}: interrupted")


def test_run_scan_counts_every_crashed_run(monkeypatch, tmp_path, capsys):
    runs = robustness.plan(NANO, ["cd"], [1], [0.1, 1.0, 10.0], tmp_path)
    fake_runs(monkeypatch, {0: (1, None, "boom"), 2: (139, None, "segfault")})
    assert robustness.run_scan(NANO, runs, None, []) == 2
    assert capsys.readouterr().out.splitlines() == [f"{runs[0]['dir']}: exited with status 1: boom",
                                                    f"{runs[1]['dir']}: completed",
                                                    f"{runs[2]['dir']}: exited with status 139: segfault"]


class SignalledRun(FakeRun):
    """A run during which the scan gets SIGUSR1: the scan must pass it on to the run as SIGTERM
    (the run then checkpoints and exits with EXIT_INTERRUPTED, 75)."""

    def __init__(self, log):
        super().__init__(75, None, log, None)
        self.signals = []

    def poll(self):
        return None  # still running

    def send_signal(self, sig):
        self.signals.append(sig)

    def wait(self):
        os.kill(os.getpid(), signal.SIGUSR1)
        return super().wait()


def test_run_scan_passes_a_signal_on_to_the_run_in_flight(monkeypatch, tmp_path):
    runs = robustness.plan(NANO, ["cd"], [1], [0.1, 1.0], tmp_path)
    started = []
    monkeypatch.setattr(robustness.processes, "start",
                        lambda cmd, log, env=None: started.append(SignalledRun(log)) or started[-1])
    with pytest.raises(Interrupted) as e:
        robustness.run_scan(NANO, runs, None, [])
    assert str(e.value) == f"{runs[0]['dir']}: interrupted"
    assert len(started) == 1 and started[0].signals == [signal.SIGTERM]


def test_run_scan_stops_before_the_next_run_at_a_signal_between_runs(monkeypatch, tmp_path):
    """A signal that arrives once a run has finished (here while its status is read) starts no
    further run, and goes to no process: the finished run is not signalled again."""
    runs = robustness.plan(NANO, ["cd"], [1], [0.1, 1.0], tmp_path)
    started = fake_runs(monkeypatch)
    status = robustness.RunDir.status

    def status_then_signal(self):  # the scan's report of run 0 (not its look for finished runs)
        if started and not sent:
            sent.append(signal.SIGUSR1)
            os.kill(os.getpid(), signal.SIGUSR1)
        return status(self)

    sent = []

    monkeypatch.setattr(robustness.RunDir, "status", status_then_signal)
    with pytest.raises(Interrupted) as e:
        robustness.run_scan(NANO, runs, None, [])
    assert str(e.value) == "nano robustness: interrupted between runs"
    assert [log for _, log in started] == [runs[0]["dir"] / "train.log"]


# --------------------------------------------------------------------------- scan and the command line

@pytest.fixture
def scans(monkeypatch):
    """``run_scan`` replaced: records its runs and sets, and writes each run as finished."""
    calls = []

    def run_scan(exp, runs, config, sets, threads=None):
        calls.append({"exp": exp.name, "runs": runs, "config": config, "sets": sets, "threads": threads})
        for r in runs:
            write_run(r["dir"], hyperparameters={r["hp"]: r["value"]}, val=[2.0])
        return len(runs) - 1

    monkeypatch.setattr(robustness, "run_scan", run_scan)
    return calls


def test_scan_defaults(scans, tmp_path, capsys):
    written = robustness.scan("nano", root=tmp_path)
    (call,) = scans
    assert call["exp"] == "nano" and call["config"] is None and call["sets"] == ["train.max_iters=2001"]  # space.yaml's budget
    assert call["threads"] is None
    assert call["runs"] == robustness.plan(NANO, BEST_NAMES, [1337, 1338, 1339], robustness.log_grid(7), tmp_path)
    assert written == [tmp_path / "nano" / "robustness.png", tmp_path / "nano" / "robustness.md"]
    assert capsys.readouterr().err == f"{len(call['runs']) - 1} run(s) crashed; see their train.log\n"


def test_scan_options(scans, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("train: {max_iters: 4}\n")  # the budget's key is the config's own
    out = tmp_path / "out"
    written = robustness.scan("nano", ["CD", "adam"], ["5"], ["0.5", 2], budget="sweep", config=str(config),
                              sets=["train.eval_interval=2"], metric="acc", root=tmp_path / "r", out=out, shard="1/3",
                              threads=1)
    (call,) = scans
    assert call["config"] == str(config) and call["sets"] == ["train.eval_interval=2"] and call["threads"] == 1
    assert call["runs"] == robustness.plan(NANO, ["cd", "adam"], [5], [0.5, 2.0], tmp_path / "r")[1::3]
    assert written == [out / "robustness.png", out / "robustness.md"] and "validation acc" in written[1].read_text()
    robustness.scan("nano", ["cd"], [1], [1], budget="paper", root=tmp_path / "p")
    assert scans[-1]["sets"] == []  # the full protocol: no budget
    assert capsys.readouterr().err == ""  # one run each time: none crashed


def test_scan_puts_runs_under_runs_robustness_and_keeps_a_fuller_table(scans, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    written = robustness.scan("nano", ["cd"], [1, 2], [1.0])
    root = Path("runs") / "robustness" / "nano"
    assert written == [root / "robustness.png", root / "robustness.md"]
    assert [r["dir"] for r in scans[0]["runs"]] == [root / "cd" / "x1" / "seed1", root / "cd" / "x1" / "seed2"]
    assert (tmp_path / root / "cd" / "x1" / "seed2" / "summary.json").is_file()
    assert (root / "robustness.md").read_text().startswith("# nano: step-size robustness\n")
    (root / "cd" / "x1" / "seed2" / "summary.json").unlink()
    with pytest.raises(Kept):  # a table from 2 runs is not replaced by one from 1 unless forced
        robustness.scan("nano", plot_only=True)
    assert robustness.scan("nano", plot_only=True, force=True) == written


@pytest.mark.parametrize("kwargs,message", [
    (dict(metric="f1"), "--metric must be loss or acc, got 'f1'"),
    (dict(multipliers=[0, 1]), "--multipliers must be positive, got [0.0, 1.0]"),
    (dict(multipliers=[-1]), "--multipliers must be positive, got [-1.0]"),
    (dict(budget="full"), "--budget must be sweep or paper, got 'full'"),
    (dict(threads=0), "--threads must be at least 1, got 0"),
])
def test_scan_refuses_bad_options_before_running_anything(scans, tmp_path, kwargs, message):
    with pytest.raises(UsageError) as e:
        robustness.scan("nano", ["cd"], [1], **{"root": tmp_path, **kwargs})
    assert str(e.value) == message and scans == []


@pytest.mark.parametrize("option", ["root", "out"])
def test_scan_refuses_a_folder_under_a_file_naming_the_option(scans, tmp_path, option):
    (tmp_path / "file").write_text("")
    bad = tmp_path / "file" / "folder"
    with pytest.raises(UsageError) as e:
        robustness.scan("nano", ["cd"], [1], **{"root": tmp_path / "r", option: bad})
    assert str(e.value) == f"--{option} {bad}: {tmp_path / 'file'} is a file, not a folder; choose another --{option}"
    assert scans == []


def test_scan_checks_the_config_file_before_running_anything(scans, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("train: {max_itres: 4}\n")
    with pytest.raises(UsageError) as e:
        robustness.scan("nano", ["cd"], [1], [1.0], config=str(config), root=tmp_path)
    assert "max_itres" in str(e.value) and scans == []


def test_scan_of_a_task_checks_its_runs_with_the_tasks_configs(scans, tmp_path):
    robustness.scan("bert/sst2", ["adam"], [1], [1.0], budget="paper", root=tmp_path)
    assert [r["dir"] for r in scans[0]["runs"]] == [tmp_path / "bert-sst2" / "adam" / "x1" / "seed1"]


def test_scan_plot_only_reads_a_folder_of_runs_itself(scans, tmp_path):
    write_run(tmp_path / "committed" / "cd" / "x1" / "seed1", hyperparameters={"h": TUNED_CD_H}, val=[2.0])
    written = robustness.scan("nano", root=tmp_path / "committed", plot_only=True, out=tmp_path / "fig")
    assert scans == [] and written == [tmp_path / "fig" / "robustness.png", tmp_path / "fig" / "robustness.md"]
    (tmp_path / "fig" / "robustness.md").unlink()
    written = robustness.scan("nano", root=tmp_path / "committed", plot_only=True)
    assert written[-1] == tmp_path / "committed" / "robustness.md"


def test_scan_reads_a_folder_of_runs_itself_only_with_plot_only(scans, tmp_path):
    write_run(tmp_path / "cd" / "x1" / "seed1", hyperparameters={"h": TUNED_CD_H}, val=[2.0])
    with pytest.raises(UsageError) as e:  # shard 1/2 of one run: nothing run under <root>/nano
        robustness.scan("nano", ["cd"], [1], [1.0], root=tmp_path, shard="1/2")
    assert str(e.value) == f"no finished robustness runs under {tmp_path / 'nano'}; run `bash scripts/robustness.sh nano`"
    assert scans[0]["runs"] == []


def test_main_passes_every_option_on(monkeypatch, capsys):
    calls = []

    def scan(*args):
        calls.append(args)
        return [Path("a.png"), Path("a.md")]

    monkeypatch.setattr(robustness, "scan", scan)
    assert robustness.main(["nano"]) == 0
    assert calls[-1] == ("nano", None, None, None, 7, "sweep", None, [], "loss", "runs/robustness", None, None,
                         False, False, None)
    assert capsys.readouterr().out == "a.png\na.md\n"
    assert robustness.main(["nano", "--optimizers", "cd", "adam", "--seeds", "1", "2", "--multipliers", "0.5", "2",
                            "--points", "3", "--budget", "paper", "--config", "c.yaml", "--set", "a=1", "--set", "b=2",
                            "--metric", "acc", "--root", "r", "--out", "o", "--shard", "1/2", "--plot-only",
                            "--force", "--threads", "2"]) == 0
    assert calls[-1] == ("nano", ["cd", "adam"], [1, 2], [0.5, 2.0], 3, "paper", "c.yaml", ["a=1", "b=2"], "acc", "r",
                         "o", "1/2", True, True, 2)


def test_the_figure_draws_mean_and_std_per_optimizer_and_marks_diverged_points(monkeypatch, tmp_path):
    """robustness.png: one curve per optimizer (mean +- std of the seeds that did not diverge) on a
    log x axis, a dotted line at the tuned value, and an x at the top for a multiplier at which a
    seed diverged, one row per optimizer, named in the legend."""
    figures = []
    monkeypatch.setattr(robustness.outputs, "save_figure", lambda fig, path, **kw: figures.append((fig, path)))
    results = {"cd": {"hp": "h", "tuned": 0.5, "points": {0.1: [("completed", 2.0), ("completed", 2.2)],
                                                          10.0: [("diverged", None), ("completed", 3.0)]}},
               "adam": {"hp": "lr", "tuned": 1e-3, "points": {1.0: [("completed", 2.5)], 10.0: [("diverged", None)]}}}
    assert robustness.plot({}, tmp_path / "none.png", "loss", "t") is False and figures == []
    assert robustness.plot(results, tmp_path / "r.png", "loss", "nano: step-size robustness") is True
    ((fig, path),) = figures
    (ax,) = fig.axes
    assert path == tmp_path / "r.png"
    assert ax.get_xscale() == "log" and ax.get_title() == "nano: step-size robustness"
    assert ax.get_xlabel() == "step size / tuned step size (h; lr for Adam and mSGD)" and ax.get_ylabel() == "best val loss"
    adam, cd = ax.containers  # the registry's order
    assert list(adam.lines[0].get_xdata()) == [1.0] and list(adam.lines[0].get_ydata()) == [2.5]
    assert list(cd.lines[0].get_xdata()) == [0.1, 10.0] and list(cd.lines[0].get_ydata()) == pytest.approx([2.1, 3.0])
    (cd_bars,) = cd.lines[2]  # the std of 2.0 and 2.2 (ddof 1) is sqrt(0.02); one seed: no spread
    assert [segment.tolist() for segment in cd_bars.get_segments()] == [
        [[0.1, pytest.approx(2.1 - math.sqrt(0.02))], [0.1, pytest.approx(2.1 + math.sqrt(0.02))]], [[10.0, 3.0], [10.0, 3.0]]]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["Adam", "CD", "diverged (a seed)"]
    marks = [c for c in ax.collections if isinstance(c, PathCollection)]  # adam's row, then cd's, in axes y
    assert [c.get_offsets().tolist() for c in marks] == [[[10.0, 0.975]], [[10.0, 0.96]]]
    assert [to_rgba(curve.lines[0].get_color()) for curve in (adam, cd)] == [tuple(c.get_facecolor()[0]) for c in marks]
    assert any(list(line.get_xdata()) == [1.0, 1.0] for line in ax.lines)  # the tuned value
    lo, hi = ax.get_ylim()  # room above the curves for the marks, and not much more
    low, top = ((y - lo) / (hi - lo) for y in (2.1 - math.sqrt(0.02), 3.0))  # lowest and highest point, axes y
    assert 0 < low and 0.8 < top < 0.96 - 0.02


def test_the_figure_lists_the_optimizers_in_the_registrys_order(monkeypatch, tmp_path):
    figures = []
    monkeypatch.setattr(robustness.outputs, "save_figure", lambda fig, path, **kw: figures.append(fig))
    point = {1.0: [("completed", 2.0)]}
    robustness.plot({"cd": {"hp": "h", "tuned": 0.5, "points": point},
                     "msgd": {"hp": "lr", "tuned": 0.1, "points": point}}, tmp_path / "r.png", "loss", "t")
    (ax,) = figures[0].axes
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["mSGD", "CD"]  # as in the table, not a-z


def test_the_marks_of_a_diverged_seed_are_xs_at_the_top_in_their_curves_colour(monkeypatch, tmp_path):
    figures = []
    monkeypatch.setattr(robustness.outputs, "save_figure", lambda fig, path, **kw: figures.append(fig))
    robustness.plot({"adam": {"hp": "lr", "tuned": 1e-3, "points": {1.0: [("completed", 2.5)]}},
                     "cd": {"hp": "h", "tuned": 0.5, "points": {1.0: [("completed", 2.0)], 10.0: [("diverged", None)]}}},
                    tmp_path / "r.png", "loss", "t")
    (ax,) = figures[0].axes
    (marks,) = [c for c in ax.collections if isinstance(c, PathCollection)]  # cd's only, the second curve
    assert to_rgba(ax.containers[1].lines[0].get_color()) == tuple(marks.get_edgecolor()[0])
    assert marks.get_offset_transform() == ax.get_xaxis_transform()  # x in data, y in axes coordinates
    x = MarkerStyle("x")
    assert marks.get_paths()[0].vertices.tolist() == x.get_path().transformed(x.get_transform()).vertices.tolist()
    key = ax.get_legend().legend_handles[-1]  # the legend's entry for the marks: a grey x, no line
    assert (key.get_marker(), key.get_linestyle(), to_rgba(key.get_color())) == ("x", "None", to_rgba("0.3"))

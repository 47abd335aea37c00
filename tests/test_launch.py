"""harness.launch on its own, its runs played by fakes of ``processes.start`` (no training: each
test takes well under a second, for the module's mutation run, results/mutation/README.md). The
real runs are in test_harness.py and test_promises.py; the expected lines and errors here are the
ones harness/launch.py's docstrings promise."""
import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

from harness import launch
from harness.errors import UsageError
from harness.experiments import experiment, train_command
from harness.signals import EXIT_INTERRUPTED

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "nano" / "configs" / "smoke.yaml")


@pytest.fixture
def gpus(monkeypatch):
    """Pretend CUDA with ``n`` devices (the launcher's torch.cuda answers patched)."""
    def pretend(n, visible=None):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        if visible is None:
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        else:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    return pretend


def test_visible_gpus(gpus, monkeypatch):
    gpus(0)
    assert launch.visible_gpus() == []
    gpus(3)
    assert launch.visible_gpus() == ["0", "1", "2"]
    gpus(2, visible=" 5, 7,,")
    assert launch.visible_gpus() == ["5", "7"]
    monkeypatch.setitem(sys.modules, "torch", None)  # torch not installed
    assert launch.visible_gpus() == []


def test_gpus_takes_visible_ids_only(gpus):
    gpus(2)
    assert launch._gpus(None) == ["0", "1"]
    assert launch._gpus(" 1,0 ") == ["1", "0"]
    for arg, problem in (("0,7", "GPU 7 is not visible here"), ("7,8,0", "GPUs 7,8 are not visible here"),
                         (",", "names no GPU")):
        with pytest.raises(UsageError) as e:
            launch._gpus(arg)
        assert str(e.value) == f"--gpus {arg}: {problem}; valid ids (comma-separated): 0,1"
    gpus(0)
    assert launch._gpus(None) == []
    with pytest.raises(UsageError) as e:
        launch._gpus("0")
    assert str(e.value) == ("--gpus 0: no CUDA GPU is visible here (torch.cuda.is_available() is False); "
                            "leave --gpus out to run on the CPU")


def test_plan_slots_limits(monkeypatch):
    monkeypatch.setattr(launch, "available_cpus", lambda: 6)
    assert launch.plan_slots([]) == ([None] * 6, 1)  # one CPU run per core of this process
    assert launch.plan_slots([], cpus=1) == ([None], 1)
    assert launch.plan_slots([], cpus=32) == ([None] * 8, 4)  # at most 8 CPU runs by default
    assert launch.plan_slots([], parallel=1, cpus=5) == ([None], 5)
    assert launch.plan_slots(["0"], runs_per_gpu=1) == (["0"], 6)
    assert launch.plan_slots(["0", "1"]) == (["0", "1"], 3)  # one run per GPU by default
    assert launch.plan_slots(["0", "1", "2", "3"], runs_per_gpu=2, cpus=4) == (["0", "1", "2", "3"] * 2, 1)
    with pytest.raises(UsageError) as e:
        launch.plan_slots([], parallel=0)
    assert str(e.value) == "--parallel must be at least 1, got 0"
    with pytest.raises(UsageError) as e:
        launch.plan_slots([], runs_per_gpu=-1)
    assert str(e.value) == "--runs-per-gpu must be at least 1, got -1"


def test_task_runs(capsys):
    everything = list(range(7))
    assert launch._task_runs(everything, 0, 1) == [0]
    assert launch._task_runs(everything, 1, 3) == [3, 4, 5]
    assert launch._task_runs(everything, 2, 3) == [6]
    assert capsys.readouterr().out == ""
    assert launch._task_runs(everything, 3, 3) is None
    assert capsys.readouterr().out == "task index 3 is out of range (0-2 for 7 runs, 3 per task): nothing to do\n"
    assert launch._task_runs(everything[:6], 2, 3) is None  # its first run would be the 7th of 6
    assert capsys.readouterr().out == "task index 2 is out of range (0-1 for 6 runs, 3 per task): nothing to do\n"
    assert launch._task_runs(everything, -1, 1) is None
    assert capsys.readouterr().out == "task index -1 is out of range (0-6 for 7 runs, 1 per task): nothing to do\n"
    with pytest.raises(UsageError) as e:
        launch._task_runs(everything, 0, 0)
    assert str(e.value) == "--runs-per-task must be at least 1, got 0"


def test_progress_prints_one_line_per_finished_run(capsys, monkeypatch):
    progress = launch.Progress(3, "nano")
    assert progress.bar.disable and progress.bar.total == 3  # stderr is no terminal here: no bar
    now = [progress.started + 0.9]  # a clock of our own: a loaded machine's pauses change no line
    monkeypatch.setattr(launch.time, "time", lambda: now[0])
    progress.finished("adam seed 1: completed (exit 0)")
    now[0] = progress.started + 41 * 60 + 10.5  # whole seconds, as h:mm:ss
    progress.finished("cd seed 1: failed (exit 1)")
    progress.update(0.25)
    assert progress.bar.n == 2.25
    progress.close()
    assert capsys.readouterr().out == ("  adam seed 1: completed (exit 0) [1/3 done, elapsed 0:00:00]\n"
                                       "  cd seed 1: failed (exit 1) [2/3 done, elapsed 0:41:10]\n")


# --------------------------------------------------------------------------- runs played by fakes

class FakeRun:
    """A run started by ``processes.start``: it writes one record (step 15) at once, is alive for
    ``world.lengths[(optimizer, seed)]`` polls less one (default 2), then it writes its summary
    (``status``; none when it crashed) and exits ``rc``; a SIGTERM makes it exit 75, interrupted."""

    def __init__(self, world, cmd, log, env, note):
        self.world, self.cmd, self.log, self.env, self.note = world, cmd, Path(log), env, note
        self.name, self.seed = cmd[cmd.index("--optimizer") + 1], int(cmd[cmd.index("--seed") + 1])
        self.out = Path(cmd[cmd.index("--out") + 1])
        self.status, self.returncode, self.polls = *world.outcome.get((self.name, self.seed), ("completed", 0)), 0
        world.started.append(self)
        world.running += 1
        self.length = world.lengths.get((self.name, self.seed), 2)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "metrics.jsonl").write_text(json.dumps({"split": "train", "step": 15}) + "\n")
        world.most = max(world.most, world.running)

    def _finish(self):
        self.world.running -= 1
        if self.status:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "summary.json").write_text(json.dumps({"status": self.status}))

    def poll(self):
        self.polls += 1
        if self.polls < self.length:
            return None
        if self.polls == self.length:
            self._finish()
        return self.returncode

    def send_signal(self, sig):
        assert sig == signal.SIGTERM
        self.status, self.returncode = "interrupted", EXIT_INTERRUPTED


class World:
    def __init__(self, monkeypatch, outcome=None, on_sleep=None, lengths=None):
        self.outcome, self.on_sleep, self.lengths = outcome or {}, on_sleep, lengths or {}
        self.started, self.running, self.most, self.sleeps, self.updates = [], 0, 0, 0, []
        progress = launch.Progress
        world = self

        class Watched(progress):  # what the launch shows as it goes
            def __init__(self, total, desc):
                world.progress = (total, desc)
                super().__init__(total, desc)

            def update(self, running_fraction):
                world.updates.append(running_fraction)
                super().update(running_fraction)

        monkeypatch.setattr(launch, "Progress", Watched)
        monkeypatch.setattr(launch.processes, "start", lambda *a: FakeRun(self, *a))
        monkeypatch.setattr(launch.time, "sleep", self.sleep)
        monkeypatch.setattr(launch, "available_cpus", lambda: 4)

    def sleep(self, seconds):
        # Each fake run ends by its second poll: a launch still looping after 1000 looks never ends.
        assert isinstance(seconds, float) and 0 < seconds <= 5, seconds  # what time.sleep takes; runs polled often
        self.sleeps += 1
        if self.sleeps > 1000:
            raise AssertionError("the launch kept polling runs that had all ended")
        if self.on_sleep:
            self.on_sleep(self)


def finish(run_dir, status):
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps({"status": status}))


def argv(runs, *extra):
    return ["nano", "--config", SMOKE, "--optimizers", "adam", "cd", "--seeds", "1", "2", "--runs-dir", str(runs),
            "--no-report", *extra]


def test_start_run_gives_each_run_its_gpu_threads_and_log(monkeypatch, tmp_path):
    started = []
    monkeypatch.setattr(launch.processes, "start", lambda *a: started.append(a))
    args = launch._parser().parse_args(["nano", "--config", "c.yaml", "--set", "train.max_iters=3"])
    exp = experiment("nano")
    launch._start_run(exp, "cd", 5, tmp_path, 2, "1", 3, args)
    launch._start_run(exp, "adam", 6, tmp_path, 0, None, 4, args)
    assert started == [
        (train_command(exp, "cd", 5, tmp_path / "cd" / "seed5", "c.yaml", ["train.max_iters=3"]),
         tmp_path / "logs" / "cd-seed5.log",
         {"TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "3", "CUDA_VISIBLE_DEVICES": "1"},
         "# harness.launch: slot 2, CUDA_VISIBLE_DEVICES=1, OMP_NUM_THREADS=3"),
        (train_command(exp, "adam", 6, tmp_path / "adam" / "seed6", "c.yaml", ["train.max_iters=3"]),
         tmp_path / "logs" / "adam-seed6.log",
         {"TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "4"},
         "# harness.launch: slot 0, CUDA_VISIBLE_DEVICES=, OMP_NUM_THREADS=4")]


def test_launch_runs_what_is_not_finished_a_few_at_a_time(monkeypatch, tmp_path, capsys):
    world = World(monkeypatch, outcome={("cd", 1): ("diverged", 0), ("cd", 2): (None, 1)})
    runs = tmp_path / "runs"
    finish(runs / "adam" / "seed2", "completed")  # skipped
    finish(runs / "adam" / "seed1", "interrupted")  # resumed
    assert launch.main(argv(runs, "--parallel", "2")) == 1
    assert [(r.name, r.seed) for r in world.started] == [("adam", 1), ("cd", 1), ("cd", 2)]
    assert world.most == 2 and all(r.env["OMP_NUM_THREADS"] == "2" for r in world.started)
    assert [r.note for r in world.started] == [f"# harness.launch: slot {k}, CUDA_VISIBLE_DEVICES=, OMP_NUM_THREADS=2"
                                               for k in (0, 1, 0)]
    # Each poll shows the running runs' fractions, 15 of smoke.yaml's 30 steps each.
    assert world.progress == (3, "nano") and world.updates == [1.0, 0.0, 0.5, 0.0]
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0] == f"nano: 3 runs to do (1 already finished) on the CPU, 2 at a time x 2 threads; runs in {runs}"
    assert [line.split(" [")[0] for line in lines[1:]] == [
        "  adam seed 1: completed (exit 0)", "  cd seed 1: diverged (exit 0)", "  cd seed 2: failed (exit 1)"]
    assert [line.split(" [")[1].split(",")[0] for line in lines[1:]] == ["1/3 done", "2/3 done", "3/3 done"]
    assert err == f"1 runs did not finish (see {runs / 'logs'}): cd seed 2 (exit 1)\n"
    assert (runs / "logs").is_dir()


def test_a_free_slot_takes_the_next_run_while_the_others_still_run(monkeypatch, tmp_path, capsys):
    World(monkeypatch, lengths={("adam", 1): 5})  # adam seed 1 runs long; cd seed 1 ends at its second poll
    runs = tmp_path / "runs"
    assert launch.main(argv(runs, "--parallel", "2", "--optimizers", "adam", "cd", "--seeds", "1", "2")) == 0
    finished = [line.split(":")[0].strip() for line in capsys.readouterr().out.splitlines()[1:]]
    # adam 1 (slot 0) and adam 2 (slot 1) start; adam 2 ends, slot 1 takes cd 1, then cd 2, while adam 1 runs.
    assert finished == ["adam seed 2", "cd seed 1", "adam seed 1", "cd seed 2"]


def test_launch_spreads_runs_over_the_gpus(monkeypatch, tmp_path, capsys, gpus):
    gpus(2)
    world = World(monkeypatch)
    runs = tmp_path / "runs"
    assert launch.main(argv(runs, "--gpus", "1,0", "--runs-per-gpu", "2")) == 0
    assert [r.env["CUDA_VISIBLE_DEVICES"] for r in world.started] == ["1", "0", "1", "0"]
    assert capsys.readouterr().out.splitlines()[0] == \
        f"nano: 4 runs to do (0 already finished) on GPUs 1,0, 2 at a time on each x 1 threads; runs in {runs}"
    runs = tmp_path / "one-each"
    assert launch.main(argv(runs)) == 0  # default: every visible GPU, one run on each at a time
    assert [r.env["CUDA_VISIBLE_DEVICES"] for r in world.started[4:]] == ["0", "1", "0", "1"]
    assert capsys.readouterr().out.splitlines()[0] == \
        f"nano: 4 runs to do (0 already finished) on GPUs 0,1, 1 at a time on each x 2 threads; runs in {runs}"


def test_launch_list_and_array_tasks(monkeypatch, tmp_path, capsys):
    world = World(monkeypatch)
    runs = tmp_path / "runs"
    assert launch.main(argv(runs, "--list")) == 0
    assert capsys.readouterr().out == "0 adam 1\n1 adam 2\n2 cd 1\n3 cd 2\n"
    assert launch.main(["nano", "--optimizers", "Adam", "--seeds", "1", "--list"]) == 0
    assert capsys.readouterr().out == "0 adam 1\n"
    assert launch.main(["nano", "--list"]) == 0  # default: best.yaml's optimizers x paper.yaml's seeds
    listing = capsys.readouterr().out.splitlines()
    assert len(listing) == 8 * 10 and listing[:2] == ["0 adam 1337", "1 adam 1338"] and listing[-1] == "79 cadam0 1346"
    assert launch.main(argv(runs, "--index", "3")) == 0  # one run per task by default
    assert launch.main(argv(runs, "--index", "1", "--runs-per-task", "3")) == 0
    assert [(r.name, r.seed) for r in world.started] == [("cd", 2)]  # done by the first: not redone
    assert launch.main(argv(runs, "--index", "2", "--runs-per-task", "3")) == 0
    assert "task index 2 is out of range (0-1 for 4 runs, 3 per task)" in capsys.readouterr().out
    assert len(world.started) == 1 and not world.running


def test_launch_defaults_to_runs_of_the_experiment_and_checks_its_folders(monkeypatch, tmp_path, capsys):
    world = World(monkeypatch)
    monkeypatch.chdir(tmp_path)
    assert launch.main(["nano", "--config", SMOKE, "--optimizers", "cd", "--seeds", "1", "--no-report"]) == 0
    assert [r.out for r in world.started] == [Path("runs") / "nano" / "cd" / "seed1"]
    assert (tmp_path / "runs" / "nano" / "cd" / "seed1" / "summary.json").is_file()
    taken = tmp_path / "taken"
    taken.write_text("")
    for option, extra in (("--runs-dir", []), ("--report", ["--runs-dir", "r"])):
        capsys.readouterr()
        assert launch.main(["nano", "--optimizers", "cd", "--seeds", "1", option, str(taken), *extra]) == 2
        assert capsys.readouterr().err == f"error: {option} {taken}: {taken} is a file, not a folder; choose another {option}\n"
    assert len(world.started) == 1


def test_a_stop_request_reaches_every_running_run_and_starts_no_new_one(monkeypatch, tmp_path, capsys):
    def stop_once_two_run(world):
        if len(world.started) == 2 and world.running == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # as SLURM's preemption signal would

    world = World(monkeypatch, on_sleep=stop_once_two_run)
    runs = tmp_path / "runs"
    assert launch.main(argv(runs, "--parallel", "2")) == EXIT_INTERRUPTED
    assert [(r.name, r.seed, r.returncode) for r in world.started] == [("adam", 1, 75), ("adam", 2, 75)]
    assert capsys.readouterr().err.splitlines()[-1] == "interrupted: re-run the same command to resume"


def test_launch_reports_at_the_end(monkeypatch, tmp_path, capsys):
    import harness.report
    from harness.outputs import Kept

    World(monkeypatch)
    reports = []

    def report(runs_dir, out, title):
        reports.append((runs_dir, out, title))
        return [out / "results.md", out / "val_loss.png"]

    monkeypatch.setattr(harness.report, "report", report)
    monkeypatch.chdir(tmp_path)
    runs, results = tmp_path / "runs", tmp_path / "results" / "mine"
    args = argv(runs)[:-1]  # with the report
    assert launch.main([*args, "--report", str(results)]) == 0
    assert reports == [(runs, results, "nano")]
    assert capsys.readouterr().out.splitlines()[-1] == f"Results: {results / 'results.md'}, {results / 'val_loss.png'}"
    assert launch.main(args) == 0  # nothing to do; the report is drawn again, to results/<experiment>
    assert reports[-1] == (runs, Path("results") / "nano", "nano")

    def kept(runs_dir, out, title):
        raise Kept("results/nano/results.md was built from more runs")

    monkeypatch.setattr(harness.report, "report", kept)
    assert launch.main(args) == 0
    assert capsys.readouterr().err.splitlines()[-1] == \
        f"report not written: results/nano/results.md was built from more runs (python -m harness.report {runs} --out DIR)"


def test_no_report_without_a_finished_run_or_with_no_report(monkeypatch, tmp_path):
    import harness.report

    World(monkeypatch, outcome={(n, s): (None, 1) for n in ("adam", "cd") for s in (1, 2)})
    monkeypatch.setattr(harness.report, "report", lambda *a, **k: pytest.fail("no report expected"))
    runs = tmp_path / "runs"
    assert launch.main(argv(runs)[:-1]) == 1  # every run crashed: nothing to report
    taken = tmp_path / "taken"
    taken.write_text("")
    assert launch.main([*argv(runs), "--report", str(taken)]) == 1  # --no-report: --report is not even checked


def test_help_names_the_command_every_option_and_the_examples(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")  # argparse wraps the usage to the terminal's width
    text = launch._parser().format_help()
    lines = text.splitlines()
    assert text.startswith("usage: python -m harness.launch [-h]")
    assert "[--set KEY=VALUE]" in text
    assert lines[lines.index("") + 1] == "Run many trainings of one experiment: every optimizer x seed, a few at a time."
    assert "Each run is an ordinary" not in text  # the module docstring's first paragraph only
    # The examples as written, one per line (not re-wrapped), at the end.
    assert lines[-6:] == ["examples:", "  python -m harness.launch nano --list",
                          "  python -m harness.launch nano --optimizers adam cadam --seeds 1337 1338 --gpus 0,1",
                          "  python -m harness.launch nano --runs-per-gpu 4",
                          "  python -m harness.launch cifar --seeds 1 2 --set train.epochs=2",
                          "  python -m harness.launch bert/sst2 --set train.epochs=1"]
    # Every option but --config and --set says what it does; those with a default say which.
    helps = {a.dest: a.help for a in launch._parser()._actions}
    assert all(helps[d] for d in ("experiment", "optimizers", "seeds", "gpus", "runs_per_gpu", "parallel", "runs_dir",
                                  "report", "no_report", "list", "index", "runs_per_task"))
    for dest, default in (("optimizers", "best.yaml"), ("seeds", "paper.yaml"), ("gpus", "default: all visible"),
                          ("runs_per_gpu", "default 1"), ("parallel", "default: one per core, at most 8"),
                          ("runs_dir", "default runs/<experiment>"), ("report", "default results/<experiment>"),
                          ("runs_per_task", "INDEX*N .. INDEX*N+N-1")):
        assert default in helps[dest], dest
    assert "nano" in helps["experiment"] and "bert/sst2" in helps["experiment"]


def test_seeds_are_numbers(capsys):
    assert launch.main(["nano", "--optimizers", "cd", "--seeds", "007", "+8", "--list"]) == 0
    assert capsys.readouterr().out == "0 cd 7\n1 cd 8\n"


def test_an_index_alone_is_one_run(monkeypatch, tmp_path):
    world = World(monkeypatch)
    assert launch.main(argv(tmp_path / "runs", "--index", "2")) == 0  # the third of --list's 0 adam 1, 1 adam 2, 2 cd 1, 3 cd 2
    assert [(r.name, r.seed) for r in world.started] == [("cd", 1)]

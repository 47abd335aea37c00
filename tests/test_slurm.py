"""The SLURM scripts on a real one-node SLURM cluster (``scripts/slurm/cluster.sh``), submitted from a
fresh copy of the repository the way the README tells a CPU-only user to: the GPU, cores and memory
requests overridden on the sbatch command line.

Needs slurmctld, slurmd, sbatch and munged (cluster.sh installs them with apt-get when run as root).
Without them these tests are skipped, unless ND_REQUIRE_SERVERS=1 (CI: .ci/run), where they fail.
Not part of the default run (``-m "not slurm ..."`` in pyproject.toml): ``bash scripts/test.sh -m slurm``.
"""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import records

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "scripts" / "slurm" / "cluster.sh"
# What the README tells CPU-only users to add: the scripts ask for a GPU, 8 cores and 32G.
CPU_NODE = ["--gres=none", "--cpus-per-task=1", "--mem=1G"]
# Long enough (a few seconds of training) to signal a run while it trains, past its first checkpoint.
LONGER = ["--set", "train.max_iters=2000", "--set", "train.eval_interval=100", "--set", "train.log_interval=50"]
TINY = ["--set", "train.max_iters=4", "--set", "train.eval_interval=2", "--set", "train.eval_iters=2"]
JOB_TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, state: Path):
        self.state = state
        self.env = {**os.environ, "ND_SLURM_DIR": str(state),
                    "ND_SLURMCTLD_PORT": str(_free_port()), "ND_SLURMD_PORT": str(_free_port())}

    def script(self, action: str, timeout: float = 900) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(CLUSTER), action], env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def client_env(self) -> dict:
        """A user's shell on the login node: SLURM_CONF set, the venv's python as PYTHON; nothing
        that would make a job import this repository instead of the checkout it was submitted from."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "PYTHONPATH"}
        env.pop("HARNESS_STOP_AFTER_STEPS", None)
        return {**env, "SLURM_CONF": str(self.state / "slurm.conf"), "PYTHON": sys.executable}

    def run(self, *cmd, cwd=None) -> str:
        out = subprocess.run(cmd, cwd=cwd, env=self.client_env(), capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, f"{' '.join(cmd)}: exit {out.returncode}: {out.stderr.strip()}"
        return out.stdout

    def sbatch(self, checkout: Path, *args) -> str:
        return self.run("sbatch", "--parsable", *args, cwd=checkout).strip().split(";")[0]

    def job(self, task: str) -> dict:
        """``scontrol show job`` of one array task as a dict (kept MinJobAge = 5 min after its end;
        there is no accounting, hence no sacct)."""
        fields = {}
        for item in self.run("scontrol", "show", "job", "-o", task).split():
            key, _, value = item.partition("=")
            fields.setdefault(key, value)
        return fields

    def queued(self, job: str) -> str:
        return self.run("squeue", "-h", "-j", job, "-o", "%i %T %r").strip()


@pytest.fixture(scope="module")
def cluster():
    state = Path(tempfile.mkdtemp(prefix="nd-slurm-test-"))  # short: the munge socket's path must fit
    c = Cluster(state)
    try:
        up = c.script("up")
        if up.returncode != 0:
            why = (up.stderr.strip() or up.stdout.strip() or f"exit {up.returncode}").splitlines()[-1]
            if os.environ.get("ND_REQUIRE_SERVERS") == "1":
                pytest.fail(f"ND_REQUIRE_SERVERS=1 but no SLURM cluster: scripts/slurm/cluster.sh up: {why}")
            pytest.skip(f"no SLURM cluster (scripts/slurm/cluster.sh up: {why})")
        yield c
    finally:
        c.script("down", timeout=60)  # stops the daemons by the pids in the state folder
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture
def checkout(tmp_path):
    """A fresh clone of this working tree: git's files only (tracked, or new and not ignored);
    no runs/ outputs, no data/, no .venv."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    dest = tmp_path / "checkout"
    for name in filter(None, listed):
        src = ROOT / name
        if src.is_file():  # a tracked file deleted in the working tree is listed too
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def wait_for(predicate, what: str, timeout: float = JOB_TIMEOUT_S, diagnose=lambda: ""):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out after {timeout:.0f} s waiting for {what}\n{diagnose()}"
        time.sleep(0.1)


def logs(folder: Path) -> str:
    return "\n".join(f"==> {p} <==\n{p.read_text(errors='replace')}" for p in sorted(folder.glob("*")) if p.is_file())


def test_reproduce_array_task_signalled_mid_run_requeues_and_resumes_exactly(cluster, checkout, nano_data, tmp_path):
    before = sorted(p.name for p in checkout.iterdir())
    launch = ["nano", "--optimizers", "adam", "cd", "--seeds", "1", "--config", "nano/configs/smoke.yaml",
              "--set", f"data.dir={nano_data}", *LONGER]
    job = cluster.sbatch(checkout, *CPU_NODE, "--array=0-1", "scripts/slurm/reproduce.sbatch", *launch)
    task = f"{job}_1"  # `python -m harness.launch ... --list`: 0 adam seed 1, 1 cd seed 1
    run = checkout / "runs" / "nano" / "cd" / "seed1"
    slurm_log = checkout / "runs" / "slurm" / f"nd-reproduce-{job}_1.out"

    def diagnose():
        return f"squeue: {cluster.queued(job)}\n{logs(checkout / 'runs' / 'slurm')}\n{logs(checkout / 'runs' / 'nano' / 'logs')}"

    def checkpointed():
        if (run / "checkpoint.pt").exists() and (run / "metrics.jsonl").stat().st_size > 0:
            return True
        assert cluster.queued(task), ("task 1 ended before its first checkpoint: "
                                   + " ".join(f"{k}={v}" for k, v in cluster.job(task).items()
                                              if k in ("JobState", "Reason", "ExitCode")) + f"\n{diagnose()}")
        return False

    wait_for(checkpointed, "task 1's first checkpoint", diagnose=diagnose)
    assert not (run / "summary.json").exists(), "the run finished before it could be signalled: make LONGER longer"
    # What SLURM does 120 s before the time limit (--signal=B:USR1@120): USR1 to the batch shell alone.
    cluster.run("scancel", "-b", "--signal=USR1", task)

    def requeued():
        info = cluster.job(task)
        return info.get("Restarts") == "1" and info.get("JobState") in ("PENDING", "RUNNING", "COMPLETED")

    wait_for(requeued, "task 1 to requeue itself", diagnose=diagnose)
    # SLURM holds a requeued job back 2 minutes (its EligibleTime); an administrator's nudge spares the
    # wait. Not to `now`: slurmd refuses to launch a job again in the second its credential was revoked
    # ("Job credential revoked"), and the job fails instead of running.
    if cluster.job(task)["JobState"] == "PENDING":
        cluster.run("scontrol", "update", f"JobId={task}", "StartTime=now+3")
    wait_for(lambda: cluster.queued(job) == "", "both tasks to finish", diagnose=diagnose)

    for index, restarts in ((0, "0"), (1, "1")):
        info = cluster.job(f"{job}_{index}")
        assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", restarts), diagnose()
    for name in ("adam", "cd"):
        summary = json.loads((checkout / "runs" / "nano" / name / "seed1" / "summary.json").read_text())
        assert summary["status"] == "completed"
    # The task really stopped mid-run at a checkpoint and the second attempt resumed it.
    run_log = (checkout / "runs" / "nano" / "logs" / "cd-seed1.log").read_text()
    assert run_log.count("$ ") == 2 and "interrupted at step" in run_log and "Resuming" in run_log, run_log

    # One log per task in runs/slurm/, holding both attempts: --open-mode=append.
    text = slurm_log.read_text()
    first, second = text.split(f"task 1 of job {job}, restart 1", 1)
    assert f"task 1 of job {job}, restart 0" in first and "USR1" in first and f"requeueing {task}" in first, text
    assert "1 runs to do (0 already finished)" in second and "completed" in second, text
    assert sorted(p.name for p in (checkout / "runs" / "slurm").iterdir()) == sorted(
        [".gitkeep", f"nd-reproduce-{job}_0.out", f"nd-reproduce-{job}_1.out"])

    # The interrupted and resumed run is the uninterrupted one, record for record (but wall times).
    whole = tmp_path / "whole"
    direct = subprocess.run([sys.executable, "-m", "harness.launch", *launch, "--runs-dir", str(whole),
                             "--optimizers", "cd", "--no-report"], cwd=checkout, env=cluster.client_env(),
                            capture_output=True, text=True, timeout=300)
    assert direct.returncode == 0, direct.stderr
    assert records(run) == records(whole / "cd" / "seed1")
    assert sorted(p.name for p in checkout.iterdir()) == before  # nothing written into the checkout's root


def test_sweep_array_workers_finish_one_study_together(cluster, checkout, nano_data):
    optuna = pytest.importorskip("optuna")
    before = sorted(p.name for p in checkout.iterdir())
    job = cluster.sbatch(checkout, *CPU_NODE, "--array=0-1", "scripts/slurm/sweep.sbatch", "nano", "cd",
                         "--trials", "4", "--config", "nano/configs/smoke.yaml", "--set", f"data.dir={nano_data}",
                         *TINY, "--poll", "0.2", "--no-plot")
    wait_for(lambda: cluster.queued(job) == "", "both workers to finish",
             diagnose=lambda: f"squeue: {cluster.queued(job)}\n{logs(checkout / 'runs' / 'slurm')}")

    for index in (0, 1):
        info = cluster.job(f"{job}_{index}")
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), logs(checkout / "runs" / "slurm")
    study = optuna.load_study(study_name="nano-cd",
                              storage=f"sqlite:///{checkout / 'runs' / 'sweeps' / 'nano' / 'cd' / 'study.db'}")
    complete = sorted(t.number for t in study.get_trials() if t.state == optuna.trial.TrialState.COMPLETE)
    # A worker mid-trial when the other reaches 4 finishes its trial: up to workers - 1 over.
    assert 4 <= len(complete) <= 5 and len(complete) == len(study.get_trials()), study.get_trials()
    ran = {}
    for index in (0, 1):
        text = (checkout / "runs" / "slurm" / f"sweep-{job}_{index}.out").read_text()
        ran[index] = [int(n) for n in re.findall(r"^trial (\d+) \(.*\): complete", text, re.M)]
    assert ran[0] and ran[1], ran  # both workers ran trials of the one study
    assert sorted(ran[0] + ran[1]) == complete
    assert sorted(p.name for p in checkout.iterdir()) == before


def cluster_sh(state: Path, *action: str) -> subprocess.CompletedProcess:
    """``cluster.sh <action>`` on the state folder ``state`` (ports nothing else uses)."""
    env = {**os.environ, "ND_SLURM_DIR": str(state), "ND_SLURMCTLD_PORT": str(_free_port()),
           "ND_SLURMD_PORT": str(_free_port())}
    return subprocess.run(["bash", str(CLUSTER), *action], env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def bystander():
    """A live process that is no daemon of cluster.sh: what a planted pid file names."""
    proc = subprocess.Popen(["sleep", "300"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def plant(state: Path, victim: Path, pid: int) -> dict:
    """What another user leaves in a state folder: slurm.conf a link to ``victim`` (a file the
    caller may write), pid files naming ``pid``, a munge key. Returns every file's bytes."""
    state.mkdir(exist_ok=True)
    (state / "slurm.conf").symlink_to(victim)
    for name in ("munged", "slurmctld", "slurmd"):
        (state / f"{name}.pid").write_text(f"{pid}\n")
    (state / "munge.key").write_bytes(b"k" * 1024)
    return {p.name: p.read_bytes() for p in state.iterdir() if p.is_file()}


@pytest.mark.parametrize("how", ["foreign owner", "link", "group-writable"])
def test_a_state_folder_planted_by_another_user_is_refused(tmp_path, bystander, how):
    """Before: the state folder defaulted to /tmp/nd-slurm-$USER, used whoever made it: `up` wrote
    slurm.conf through a planted link, `down` killed whatever pid a planted pid file named."""
    victim = tmp_path / "victim.txt"
    victim.write_text("the caller's own file\n")
    state = tmp_path / "state"
    if how == "link":  # the state folder a link to another folder, which holds the plants
        target = tmp_path / "elsewhere"
        files = plant(target, victim, bystander.pid)
        state.symlink_to(target)
        expected = f"cluster.sh: state folder {state} is a symbolic link; refusing it"
    else:
        files = plant(state, victim, bystander.pid)
        if how == "foreign owner":
            os.chown(state, 65534, 65534)  # nobody's
            expected = f"cluster.sh: state folder {state} belongs to user nobody, not to you; refusing it"
        else:
            state.chmod(0o775)
            expected = f"cluster.sh: state folder {state} is writable by group or others (mode 775); refusing it"
    for action in ("up", "down", "status"):
        done = cluster_sh(state, action)
        assert done.returncode == 1 and done.stderr.startswith(expected), (action, done.stderr)
        assert done.stderr.count("\n") == 1, done.stderr
    assert victim.read_text() == "the caller's own file\n"
    assert bystander.poll() is None
    folder = state.resolve()
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == files


def test_down_signals_no_process_it_did_not_start(tmp_path, bystander):
    """A state folder of the caller's (0700) whose pid files name a live process that `up` did not
    start (a stale pid since reused, or the record of another start): `down` leaves it alone."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    for name in ("munged", "slurmctld", "slurmd"):
        (state / f"{name}.pid").write_text(f"{bystander.pid}\n")
    # slurmd's record names the process's owner and executable, with another start time.
    stat = Path(f"/proc/{bystander.pid}/stat").read_text().rsplit(")", 1)[1].split()
    (state / "slurmd.id").write_text(f"{os.getuid()} {os.path.realpath(f'/proc/{bystander.pid}/exe')} "
                                     f"{int(stat[19]) - 1}\n")
    status = cluster_sh(state, "status")
    assert status.returncode == 3 and "munged: stopped" in status.stdout and "slurmd: stopped" in status.stdout
    done = cluster_sh(state, "down")
    assert done.returncode == 0, done.stderr
    time.sleep(0.5)
    assert bystander.poll() is None

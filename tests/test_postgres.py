"""Sweeps on a real PostgreSQL server (made private by scripts/postgres.sh): workers that start
together on an empty database, a worker SIGKILLed mid-trial, the one-line errors of a missing
driver or an unreachable server, and what the server admits.

The server tests (marked ``postgres``; ``.ci/run`` runs them with ``-m postgres``) start a
private server with ``scripts/postgres.sh up`` for the session: PostgreSQL's binaries must be
installed (``bash scripts/postgres.sh install``). Without them the tests skip, unless
``ND_REQUIRE_SERVERS=1``, which makes that a failure. Each test gets an empty database. The
server admits only its role with its password, which no command line may hold.
"""
import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from harness.sweep import study as study_lib

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "nano" / "configs" / "smoke.yaml")
TINY = ["--set", "train.max_iters=4", "--set", "train.eval_interval=2", "--set", "train.eval_iters=2"]
REQUIRED = os.environ.get("ND_REQUIRE_SERVERS") == "1"


def unavailable(reason: str):
    if REQUIRED:
        pytest.fail(f"{reason} (ND_REQUIRE_SERVERS=1)")
    pytest.skip(reason)


PG = ["bash", str(ROOT / "scripts" / "postgres.sh")]


@pytest.fixture(scope="session")
def postgres():
    """A private server for the session, made by ``postgres.sh up``: a dict with its printed URL
    (which names its password file), ``address`` (host:port), ``password`` and ``dir``."""
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        unavailable("psycopg2 is not installed (environments/test.txt has it)")
    # Not pytest's tmp_path: its folders are private to the test's user, and as root the server
    # runs as `postgres`, which must reach DIR (0711 lets it pass, not list). Short, too: the
    # socket path must fit 107 bytes. A space in DIR: every path must be quoted, also for pg_ctl.
    parent = Path(tempfile.mkdtemp(prefix="nd-pg-"))
    parent.chmod(0o711)
    folder = parent / "pg dir"
    up = subprocess.run([*PG, "up", str(folder)], capture_output=True, text=True,
                        env={**os.environ, "PG_OPTS": "-c fsync=off"})  # a server of minutes
    if up.returncode != 0:
        shutil.rmtree(parent, ignore_errors=True)
        if "no PostgreSQL server binaries" in up.stderr:
            unavailable("PostgreSQL is not installed (bash scripts/postgres.sh install)")
        pytest.fail(f"scripts/postgres.sh up failed: {up.stderr.strip()}")
    url = up.stdout.strip().splitlines()[-1]
    address = re.match(r"postgresql://optuna@([^/]+)/optuna\?passfile=(.+)$", url).group(1)
    try:
        yield {"url": url, "address": address, "password": (folder / "password").read_text().strip(), "dir": folder}
    finally:
        subprocess.run([*PG, "down", str(folder)], check=True)
        shutil.rmtree(parent, ignore_errors=True)


def connect(postgres, **kwargs):
    import psycopg2

    host, port = postgres["address"].split(":")
    return psycopg2.connect(**{"host": host, "port": port, "user": "optuna", "dbname": "optuna",
                               "passfile": "/nonexistent", **kwargs})


@pytest.fixture
def empty_db(postgres):
    """The server's database, emptied (the role may create no other database, but owns the schema
    ``public`` of its own): the printed URL."""
    db = connect(postgres, password=postgres["password"])
    db.autocommit = True
    with db.cursor() as cursor:
        cursor.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    db.close()
    return postgres["url"]


def worker(url, out_root, data, trials, index, *extra, optimizer="cd", env=None):
    """A worker on ``url`` (None: the URL comes in ``env``, as $SWEEP_STORAGE)."""
    storage = ["--storage", url] if url else []
    cmd = [sys.executable, "-m", "harness.sweep", "run", "nano", optimizer, *storage, "--trials", str(trials),
           "--worker", str(index), "--config", SMOKE, "--set", f"data.dir={data}", "--out-root", str(out_root),
           "--poll", "0.2", "--no-plot", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def command_lines() -> list[bytes]:
    """Every process's command line."""
    lines = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            lines.append(cmdline.read_bytes())
        except OSError:
            pass  # gone
    return lines


def load(url, optimizer="cd"):
    return optuna.load_study(study_name=f"nano-{optimizer}", storage=study_lib.engine_url(url))


def by_state(study):
    return {s: sorted(t.number for t in study.get_trials() if t.state == s) for s in TrialState}


def val_steps(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if r["split"] == "val"]


@pytest.mark.postgres
def test_workers_started_together_on_an_empty_database_all_work(postgres, empty_db, nano_data, tmp_path):
    """All of them create the tables and the study at once (Optuna's CREATE TYPE/TABLE collide
    without the harness's lock: all but one worker died of a duplicate key). One worker is given
    the URL printed by ``postgres.sh up`` (its password in a file it names), the other the URL with
    the password in $SWEEP_STORAGE: no process's command line ever holds the password."""
    n = 3
    with_password = {"SWEEP_STORAGE": f"postgresql://optuna:{postgres['password']}@{postgres['address']}/optuna"}
    workers = [worker(empty_db, tmp_path, nano_data, n, 0, *TINY),
               worker(None, tmp_path, nano_data, n, 1, *TINY, env=with_password)]
    seen = 0
    while any(w.poll() is None for w in workers):
        lines = command_lines()
        seen += sum(b"harness.sweep" in line for line in lines)
        assert not [line for line in lines if postgres["password"].encode() in line]
        time.sleep(0.05)
    assert seen  # the workers' command lines were read
    outputs = [w.communicate(timeout=600) for w in workers]
    for w, (out, err) in zip(workers, outputs):
        assert w.returncode == 0, err
        assert "Traceback" not in err and postgres["password"] not in out + err
        assert re.search(r"^trial \d+ \(.*\): complete", out, re.M), out  # each worker ran a trial
    assert "in postgresql://optuna:***@127.0.0.1:" in outputs[1][0]
    study = load(empty_db)
    states = by_state(study)
    # A worker mid-trial when the study reaches n finishes that trial: at most W - 1 = 1 over.
    assert n <= len(states[TrialState.COMPLETE]) <= n + 1
    assert not states[TrialState.FAIL] and not states[TrialState.RUNNING] and not states[TrialState.WAITING]
    assert {t.user_attrs["pid"] for t in study.get_trials()} == {w.pid for w in workers}
    # Nothing the sweep wrote holds the password.
    assert not [f for f in tmp_path.rglob("*") if f.is_file() and postgres["password"].encode() in f.read_bytes()]

    # The study recorded its search space once; a worker with another space is still refused.
    space = tmp_path / "space.yaml"
    space.write_text("trials: 1\noptimizers:\n  cd: {h: [1.0e-3, 0.5, log], gamma: [0.1, 1, uniform], "
                     "c: [1, 2, log]}\n")
    other = worker(None, tmp_path, nano_data, n, 2, "--space", str(space), env=with_password)
    out, err = other.communicate(timeout=300)
    assert other.returncode == 2 and err.count("\n") == 1, err
    assert re.match(r"error: study nano-cd in postgresql://optuna:\*\*\*@.* was made with the search space", err)
    assert postgres["password"] not in err


@pytest.mark.postgres
def test_a_worker_killed_mid_trial_is_retried_by_the_other_one(empty_db, nano_data, tmp_path):
    """SIGKILL, as a node that dies: its trial keeps RUNNING until its heartbeat is older than
    --grace; then the surviving worker fails it, re-enqueues it and resumes its run directory."""
    n = 3
    # Long enough runs to be killed mid-run; heartbeat and grace small.
    run = ["--set", "train.max_iters=600", "--set", "train.eval_interval=100", "--set", "train.eval_iters=2",
           "--heartbeat", "1", "--grace", "3"]
    survivor, victim = (worker(empty_db, tmp_path, nano_data, n, i, *run) for i in range(2))
    try:
        deadline = time.time() + 300
        # Until a run writes metrics the study exists; the database is the workers' till then.
        while not list((tmp_path / "nano" / "cd").glob("trial-*/metrics.jsonl")):
            assert time.time() < deadline and victim.poll() is None, "no trial started"
            time.sleep(0.1)
        study, killed = load(empty_db), None
        while killed is None:
            assert time.time() < deadline, "the victim's trial never started training"
            assert victim.poll() is None, victim.communicate()
            time.sleep(0.1)
            for t in study.get_trials(states=(TrialState.RUNNING,)):
                if t.user_attrs.get("pid") == victim.pid and "run_dir" in t.user_attrs:
                    metrics = Path(t.user_attrs["run_dir"]) / "metrics.jsonl"
                    if metrics.exists() and any('"val"' in line for line in metrics.read_text().splitlines()):
                        killed = t
        victim.send_signal(signal.SIGKILL)
        victim.communicate(timeout=60)
        out, err = survivor.communicate(timeout=600)
    finally:
        for w in (survivor, victim):
            if w.poll() is None:
                w.kill()
                w.communicate()
    assert victim.returncode == -signal.SIGKILL
    assert survivor.returncode == 0 and "Traceback" not in err, err

    study = load(empty_db)
    states = by_state(study)
    assert len(states[TrialState.COMPLETE]) == n  # the survivor was alone at the end: no extra trial
    assert states[TrialState.FAIL] == [killed.number] and not states[TrialState.RUNNING]
    (retried,) = [t for t in study.get_trials()
                  if t.user_attrs.get("root") == killed.number and t.number != killed.number]
    assert retried.state == TrialState.COMPLETE and retried.params == killed.params
    assert retried.system_attrs["retry_history"] == [killed.number]
    # The retry resumed the killed run's directory (the run checkpointed on its parent's death)
    # and the run trained its schedule once.
    run_dir = Path(retried.user_attrs["run_dir"])
    assert run_dir == Path(killed.user_attrs["run_dir"]) == tmp_path / "nano" / "cd" / f"trial-{killed.number}"
    assert re.search(r"^Resuming .* from step \d+", (run_dir / "train.log").read_text(), re.M)
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    assert val_steps(run_dir) == [0, 100, 200, 300, 400, 500, 600]


BLOCK_PSYCOPG2 = """
import runpy, sys
class Missing:  # as if psycopg2 were not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "psycopg2":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Missing())
sys.argv[0] = "harness.sweep"
runpy.run_module("harness.sweep", run_name="__main__", alter_sys=True)
"""


def cli(*args, code=None, env=None):
    cmd = [sys.executable, *(["-c", code] if code else ["-m", "harness.sweep"]), *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_missing_driver_is_one_line_naming_the_package(tmp_path):
    url = f"postgresql://optuna:secret@127.0.0.1:{closed_port()}/optuna"
    done = cli("run", "nano", "cd", "--out-root", str(tmp_path), code=BLOCK_PSYCOPG2, env={"SWEEP_STORAGE": url})
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("error: --storage postgresql://optuna:***@127.0.0.1:")
    assert "needs the database driver psycopg2" in done.stderr and "pip install psycopg2-binary" in done.stderr
    # mysql://'s driver is in no environment.
    done = cli("export", "nano", "cd", "--out", str(tmp_path / "x"),
               env={"SWEEP_STORAGE": "mysql://u:secret@127.0.0.1/optuna"})
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "pip install mysqlclient" in done.stderr and "secret" not in done.stderr
    assert not (tmp_path / "nano").exists()


def test_an_unreachable_server_is_one_line_naming_the_masked_url(tmp_path):
    for command in (["run", "nano", "cd"], ["plot", "nano", "cd"]):
        url = f"postgresql://optuna:secret@127.0.0.1:{closed_port()}/optuna"
        done = cli(*command, "--out-root", str(tmp_path), env={"SWEEP_STORAGE": url})
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
        assert re.match(r"error: cannot connect to --storage postgresql://optuna:\*\*\*@127\.0\.0\.1:\d+/optuna: "
                        r".*Connection refused", done.stderr), done.stderr


@pytest.mark.postgres
def test_a_missing_database_is_one_line(postgres, tmp_path):
    done = cli("run", "nano", "cd", "--out-root", str(tmp_path),
               env={"SWEEP_STORAGE": f"postgresql://optuna:{postgres['password']}@{postgres['address']}/nope"})
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert 'database "nope" does not exist' in done.stderr and postgres["password"] not in done.stderr


@pytest.mark.postgres
def test_the_server_admits_only_the_role_with_its_password_and_no_superuser(postgres, tmp_path):
    """Before: trust authentication and the role a superuser, so any local user could connect as
    it and run a shell command as the server's OS user (COPY ... TO PROGRAM)."""
    import psycopg2

    host, port = postgres["address"].split(":")
    for password in (None, "wrong"):
        with pytest.raises(psycopg2.OperationalError, match="no password supplied|password authentication failed"):
            connect(postgres, **({"password": password} if password else {}))
    # Another OS user: no password, and the server's socket folder is closed to it.
    psql = shutil.which("psql") or sorted(glob.glob("/usr/lib/postgresql/*/bin/psql"))[-1]
    socket_dir = postgres["dir"] / "server" / "socket"
    for target in ("127.0.0.1", str(socket_dir)):
        done = subprocess.run(["runuser", "-u", "nobody", "--", psql, "-w", "-h", target, "-p", port, "-U", "optuna",
                               "-d", "optuna", "-c", "SELECT 1"], capture_output=True, text=True, cwd="/")
        assert done.returncode != 0 and re.search("no password supplied|Permission denied", done.stderr), done.stderr
    assert (socket_dir.stat().st_mode & 0o777) == 0o700
    for secret in ("password", "pgpass"):
        assert (postgres["dir"] / secret).stat().st_mode & 0o777 == 0o600

    db = connect(postgres, password=postgres["password"])
    db.autocommit = True
    with db.cursor() as cursor:
        cursor.execute("SELECT rolsuper, rolcreatedb, rolcreaterole FROM pg_roles WHERE rolname = 'optuna'")
        assert cursor.fetchall() == [(False, False, False)]
        cursor.execute("SELECT datname FROM pg_database WHERE datdba = (SELECT oid FROM pg_roles "
                       "WHERE rolname = 'optuna')")
        assert cursor.fetchall() == [("optuna",)]
        cursor.execute("SHOW listen_addresses")
        assert cursor.fetchall() == [("127.0.0.1",)]
        marker = tmp_path / "marker"
        with pytest.raises(psycopg2.errors.InsufficientPrivilege):
            cursor.execute(f"COPY (SELECT 1) TO PROGRAM 'touch {marker}'")
    db.close()
    assert not marker.exists()


@pytest.mark.postgres
def test_up_refuses_a_folder_that_is_not_new(postgres):
    """Before: ``up DIR`` chowned any existing DIR to postgres (``up ~`` would hand over a home)."""
    parent = Path(tempfile.mkdtemp(prefix="nd-pg-"))
    try:
        (parent / "notes.txt").write_text("mine\n")
        os.chown(parent, 65534, 65534)  # nobody's
        before = parent.stat()
        done = subprocess.run([*PG, "up", str(parent)], capture_output=True, text=True)
        assert done.returncode == 2 and done.stderr == \
            f"error: DIR {parent} exists and is not empty; give a new folder (nothing in it was changed)\n"
        after = parent.stat()
        assert (after.st_uid, after.st_gid, after.st_mode) == (before.st_uid, before.st_gid, before.st_mode)
        assert sorted(p.name for p in parent.iterdir()) == ["notes.txt"]
    finally:
        shutil.rmtree(parent, ignore_errors=True)

"""harness.sweep's study, objective, worker, command line and figures on their own: no trial's
training run is started (``processes.start`` and the study's trials are played by fakes or by
``create_trial``), so each test takes milliseconds (the modules' mutation runs,
results/mutation/README.md). Expected values come from the modules' documented behaviour
(harness/sweep/__init__.py, each function's docstring) and hand computation."""
import argparse
import contextlib
import dataclasses
import fcntl
import json
import math
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import matplotlib.pyplot as plt
import numpy as np
import optuna
import pytest
import sqlalchemy
import torch._dynamo  # noqa: F401  (see below)
import yaml
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from harness import sweep
from harness.errors import UsageError
from harness.signals import StopFlag
from harness.sweep import cli as cli_lib
from harness.sweep import objective as objective_lib
from harness.sweep import plots as plots_lib
from harness.sweep import study as study_lib
from harness.sweep import worker as worker_lib

# run_sweep checks its config by building the optimizer once, and torch imports torch._dynamo at
# the first optimizer it builds (seconds). Imported above with this module, so that the test
# processes forked from a server that imported the tests (mutmut's) do not each pay for it.


# --------------------------------------------------------------------------- objective_record

def val(step, loss, epoch=None, split="val"):
    r = {"split": split, "step": step, "loss": loss}
    if epoch is not None:
        r["epoch"] = epoch
    return r


def test_objective_record_picks_by_its_rule():
    rows = [val(0, 3.0, 0.0), val(1, 9.0, split="train"), val(2, 2.0, 0.5), val(4, 2.5, 1.0), val(6, 2.25, 1.5),
            val(8, 2.75, 2.0)]
    assert objective_lib.objective_record(rows) == rows[2]  # best: the lowest val loss
    assert objective_lib.objective_record(rows, "best") == rows[2]
    assert objective_lib.objective_record(rows, "final") == rows[5]  # the highest step
    assert objective_lib.objective_record(rows, "best_epoch_end") == rows[3]  # epochs 1.0 and 2.0 only


# --------------------------------------------------------------------------- study: URLs and secrets


NANO = sweep.experiment("nano")


def test_quiet_optuna_turns_down_its_logging_and_warnings():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optuna.logging.set_verbosity(optuna.logging.INFO)
        assert study_lib.quiet_optuna() is optuna
        assert optuna.logging.get_verbosity() == optuna.logging.ERROR
        warnings.warn("experimental", optuna.exceptions.ExperimentalWarning)
        warnings.warn_explicit("future", FutureWarning, "optuna/x.py", 1, module="optuna")
        warnings.warn_explicit("future elsewhere", FutureWarning, "other.py", 1, module="other")
        warnings.warn_explicit("any other", UserWarning, "optuna/x.py", 1, module="optuna")
    assert [str(w.message) for w in caught] == ["future elsewhere", "any other"]


def test_retry_callback_retries_ten_times_under_the_name_optuna_has(monkeypatch):
    callback, keyword = study_lib._retry_callback()
    assert type(callback.optuna) is optuna.storages.RetryHeartbeatStaleTrialCallback
    assert callback.optuna._max_retry == 10 and keyword == "heartbeat_stale_trial_callback"
    monkeypatch.delattr(optuna.storages, "RetryHeartbeatStaleTrialCallback")  # Optuna before 4.9
    callback, keyword = study_lib._retry_callback()
    assert type(callback.optuna) is optuna.storages.RetryFailedTrialCallback and callback.optuna._max_retry == 10
    assert keyword == "failed_trial_callback"


def test_a_retry_inherits_its_run_but_not_the_dead_workers_identity():
    """A retry kept the dead worker's host and pid: from the moment a worker took it until it set
    its own, another worker saw a running trial of a dead pid and failed it (the SLURM array test)."""
    study = optuna.create_study()
    worker = {"host": socket.gethostname(), "pid": 10, "pid_start": "s10", "child_pid": 11, "child_start": "s11"}
    failed = add(study, TrialState.FAIL, {"h": 0.1}, {"root": 0, "run_dir": "/r/trial-0", "seed": 7, **worker})
    callback, _ = study_lib._retry_callback()
    callback(study, study.trials[failed])
    (waiting,) = study.get_trials(states=(TrialState.WAITING,))
    assert waiting.user_attrs == {"root": 0, "run_dir": "/r/trial-0", "seed": 7} and waiting.params == {"h": 0.1}
    assert waiting.system_attrs["retry_history"] == [failed]
    assert study.trials[failed].user_attrs["pid"] == 10  # the failed trial keeps its record


def test_the_studys_folder_storage_and_name(tmp_path):
    assert study_lib.sweep_dir(NANO, "cd") == Path("runs/sweeps").resolve() / "nano" / "cd"
    assert study_lib.sweep_dir(NANO, "cd", tmp_path) == tmp_path / "nano" / "cd"
    assert study_lib.default_storage(NANO, "cd", tmp_path) == f"sqlite:///{tmp_path}/nano/cd/study.db"
    assert study_lib.default_storage(NANO, "adam") == f"sqlite:///{Path('runs/sweeps').resolve()}/nano/adam/study.db"
    assert study_lib.study_name(NANO, "cd") == "nano-cd"


@pytest.mark.parametrize("url,quoted", [
    ("postgresql://u:p@ss@host:5432/db", "postgresql://u:p%40ss@host:5432/db"),
    ("postgresql://u:a@b@c@host/db?sslmode=require", "postgresql://u:a%40b%40c@host/db?sslmode=require"),
    ("postgresql://u:pw@host/db?x=a@b", "postgresql://u:pw@host/db?x=a@b"),  # the "@" in the query is left
    ("postgresql://host/db?user=a@b", "postgresql://host/db?user=a@b"),  # no userinfo at all
    ("postgresql://user@host/db", "postgresql://user@host/db"),
    ("postgresql://u:p@@host/db", "postgresql://u:p%40@host/db"),  # a password that ends in "@"
    ("postgresql://u:p@s:s@host/db", "postgresql://u:p%40s:s@host/db"),  # the user ends at the first ":"
    ("postgresql://u:p@ss@host/db?x=http://a", "postgresql://u:p%40ss@host/db?x=http://a"),  # the first "://"
    ("postgresql://u:p@ss@host/db?x=a@b?y=1", "postgresql://u:p%40ss@host/db?x=a@b?y=1"),  # the query's first "?"
    ("postgresql://host/db?opt=x:y@z@w", "postgresql://host/db?opt=x:y@z@w"),  # "@"s in the query only
    ("sqlite:///runs/study.db", "sqlite:///runs/study.db"),
    ("no scheme u:p@ss@host", "no scheme u:p@ss@host"),
])
def test_quoted_userinfo_quotes_only_the_passwords_at(url, quoted):
    assert study_lib.quoted_userinfo(url) == quoted


@pytest.mark.parametrize("key,secret", [
    ("password", True), ("PASSWORD", True), ("passwd", True), ("pass", True), ("sslpassword", True),
    ("client_secret", True), ("Token", True), ("access_token_x", True),
    ("passage", False), ("user", False), ("sslmode", False), ("passwords", False),
])
def test_secret_query_keys(key, secret):
    assert bool(study_lib.SECRET_QUERY.search(key)) is secret


@pytest.mark.parametrize("url,shown", [
    ("postgresql://u:hunter2@db.example:5432/optuna", "postgresql://u:***@db.example:5432/optuna"),
    ("postgresql://u:hun@ter2@db/optuna", "postgresql://u:***@db/optuna"),
    ("postgresql://u@db/optuna?password=hunter2", "postgresql://u@db/optuna?password=***"),
    ("postgresql://u@db/optuna?sslmode=require&token=abc", "postgresql://u@db/optuna?sslmode=require&token=***"),
    ("sqlite:///runs/study.db", "sqlite:///runs/study.db"),
    ("postgresql://u:hunter2@db:notaport/optuna", "postgresql://(not a valid URL)"),
    ("postgresql://u:hunter2@db:notaport/x?r=http://y", "postgresql://(not a valid URL)"),
    ("hunter2", "(not a valid URL)"),
    ("a b://hunter2", "(not a valid URL)"),
])
def test_masked_hides_every_secret(url, shown):
    assert study_lib.masked(url) == shown


def test_secrets_and_holds_password():
    assert study_lib.secrets("postgresql://u:pw1@db/x?password=pw2&sslmode=require&token=t") == ["pw1", "pw2", "t"]
    assert study_lib.secrets("postgresql://u@db/x?password=a&password=b") == ["a", "b"]  # a repeated key
    assert study_lib.secrets("postgresql://u:@db/x?password=") == []  # empty ones are no secrets
    assert study_lib.secrets("postgresql://u@db/x") == []
    assert study_lib.secrets("not a url") == ["not a url"]
    assert study_lib.holds_password("postgresql://u:pw@db/x") is True
    assert study_lib.holds_password("postgresql://u@db/x?passwd=pw") is True
    assert study_lib.holds_password("postgresql://u@db/x") is False
    assert study_lib.holds_password("not a url") is False


def test_scrubbed_replaces_the_longer_secret_first():
    url = "postgresql://u:abc@db/x?password=ab"
    assert study_lib.scrubbed("failed for abc and ab", url) == "failed for *** and ***"
    assert study_lib.scrubbed("nothing secret", url) == "nothing secret"
    # By length, not by text: "b" sorts after "abc", and replaced first it would leave "a***c".
    assert study_lib.scrubbed("login abc", "postgresql://u:abc@db/x?password=b") == "login ***"


def test_engine_url_names_psycopg2_and_quotes_the_password():
    assert study_lib.engine_url("postgresql://u:p@ss@db/x") == "postgresql+psycopg2://u:p%40ss@db/x"
    assert study_lib.engine_url("postgresql+psycopg://db/x") == "postgresql+psycopg://db/x"
    assert study_lib.engine_url("mysql://db/postgresql://") == "mysql://db/postgresql://"
    assert study_lib.engine_url("sqlite:///x.db") == "sqlite:///x.db"


@pytest.mark.parametrize("url,package,driver,module", [
    ("mysql://u@db/x", "mysqlclient (or use mysql+pymysql:// and pip install PyMySQL)", "mysqldb", "MySQLdb"),
    ("mysql+pymysql://u@db/x", "PyMySQL", "pymysql", "pymysql"),
    ("mysql+mysqlconnector://u@db/x", "mysql-connector-python", "mysqlconnector", "mysql"),
    ("postgresql+pg8000://u@db/x", "pg8000", "pg8000", "pg8000"),
    ("postgresql+psycopg://u@db/x", "psycopg[binary]", "psycopg", "psycopg"),
])
def test_check_driver_names_the_package_to_install(url, package, driver, module):
    with pytest.raises(UsageError) as e:
        study_lib.check_driver(url)
    assert str(e.value) == (f"--storage {url} needs the database driver {driver} (Python module {module}), "
                            f"which is not installed: pip install {package}")


def test_check_driver_passes_an_installed_driver_and_names_an_unknown_one():
    study_lib.check_driver("sqlite:///x.db")
    study_lib.check_driver("postgresql://u:pw@db/x")  # psycopg2, which the environments install
    with pytest.raises(UsageError) as e:
        study_lib.check_driver("postgresql+nope://u:hunter2@db/x")
    assert str(e.value) == ("--storage postgresql+nope://u:***@db/x: "
                            "Can't load plugin: sqlalchemy.dialects:postgresql.nope")


def test_check_driver_of_an_unlisted_driver_names_it_as_the_package(monkeypatch):
    from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite

    def missing(cls):
        raise ImportError("gone")  # no module name

    monkeypatch.setattr(SQLiteDialect_pysqlite, "import_dbapi", classmethod(missing))
    with pytest.raises(UsageError) as e:
        study_lib.check_driver("sqlite:///x.db")
    assert str(e.value) == ("--storage sqlite:///x.db needs the database driver pysqlite (Python module ?), "
                            "which is not installed: pip install pysqlite")


class _Err(Exception):
    def __init__(self, text, orig=None):
        super().__init__(text)
        self.orig = orig


def test_unreachable_is_the_first_line_of_the_drivers_reason_without_secrets():
    url = "postgresql://u:hunter2@db/x"
    err = _Err("(psycopg2.OperationalError) wrapped", orig="connection refused for hunter2\n  detail\n")
    assert str(study_lib._unreachable(url, err)) == \
        "cannot connect to --storage postgresql://u:***@db/x: connection refused for ***"
    assert str(study_lib._unreachable(url, _Err("  timeout\nmore"))) == \
        "cannot connect to --storage postgresql://u:***@db/x: timeout"
    assert str(study_lib._unreachable(url, _Err(" \n "))) == "cannot connect to --storage postgresql://u:***@db/x: _Err"
    # An error that is not SQLAlchemy's (no ``orig``): its own text.
    assert str(study_lib._unreachable(url, TimeoutError("timed out after 30 s"))) == \
        "cannot connect to --storage postgresql://u:***@db/x: timed out after 30 s"


def test_engine_kwargs():
    assert study_lib._engine_kwargs("sqlite:///x.db") == {"connect_args": {"timeout": 120}}
    assert study_lib._engine_kwargs("postgresql://db/x") == {"connect_args": {"connect_timeout": 30}}
    assert study_lib._engine_kwargs("postgresql://db/x?connect_timeout=5") == {}
    assert study_lib._engine_kwargs("mysql://db/x") == {}


# --------------------------------------------------------------------------- study: the creation lock

def locked(path) -> bool:
    """Whether another open file description cannot take ``path``'s lock now."""
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


@pytest.mark.parametrize("scheme", ["sqlite", "sqlite+pysqlite"])
def test_creation_lock_of_a_sqlite_file_is_a_lock_file_beside_it(tmp_path, scheme):
    lock = tmp_path / "study.db.lock"
    with study_lib.creation_lock(f"{scheme}:///{tmp_path / 'study.db'}"):
        assert locked(lock)
        assert lock.stat().st_mode & 0o777 == 0o644 & ~_umask()
    assert not locked(lock)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:"])
def test_creation_lock_of_a_database_in_memory_is_none(tmp_path, monkeypatch, url):
    monkeypatch.chdir(tmp_path)
    with study_lib.creation_lock(url):
        pass
    assert list(tmp_path.iterdir()) == []


class _Engine:
    """sqlalchemy.create_engine's engine, recording what the lock does with it."""

    def __init__(self, log, fail=None):
        self.log, self.fail = log, fail

    def connect(self):
        self.log.append("connect")
        if self.fail:
            raise self.fail
        return self

    def execute(self, statement, params):
        self.log.append(("execute", str(statement), params))

    def commit(self):
        self.log.append("commit")

    def close(self):
        self.log.append("close")

    def dispose(self):
        self.log.append("dispose")


@pytest.mark.parametrize("url,statement,key,engine_url", [
    ("postgresql://u@db/x", "SELECT pg_advisory_lock(:key)", 0x6E6F6E6C, "postgresql+psycopg2://u@db/x"),
    ("mysql+pymysql://u@db/x", "SELECT GET_LOCK(:key, -1)", f"nonlinear-damping-{0x6E6F6E6C}", "mysql+pymysql://u@db/x"),
])
def test_creation_lock_of_a_server_is_a_session_lock_held_until_the_connection_closes(monkeypatch, url, statement,
                                                                                       key, engine_url):
    from sqlalchemy.pool import NullPool

    log, made = [], []

    def create_engine(u, **kwargs):
        made.append((u, kwargs))
        return _Engine(log)

    monkeypatch.setattr(sqlalchemy, "create_engine", create_engine)
    with study_lib.creation_lock(url):
        log.append("inside")
    assert made == [(engine_url, {"poolclass": NullPool, **study_lib._engine_kwargs(url)})]
    assert log == ["connect", ("execute", statement, {"key": key}), "commit", "inside", "close", "dispose"]
    log.clear()
    with pytest.raises(RuntimeError):
        with study_lib.creation_lock(url):
            raise RuntimeError("the creation failed")
    assert log[-2:] == ["close", "dispose"]  # released all the same


def test_creation_lock_of_an_unreachable_server_is_a_usage_error(monkeypatch):
    from sqlalchemy.exc import OperationalError

    log = []
    refused = OperationalError("connect", {}, Exception("connection refused by hunter2"))
    monkeypatch.setattr(sqlalchemy, "create_engine", lambda u, **kwargs: _Engine(log, fail=refused))
    with pytest.raises(UsageError) as e:
        with study_lib.creation_lock("postgresql://u:hunter2@db/x"):
            pass
    assert str(e.value) == "cannot connect to --storage postgresql://u:***@db/x: connection refused by ***"
    assert log == ["connect", "dispose"]


# --------------------------------------------------------------------------- study: storage and the study

def test_storage_of_a_sqlite_file_makes_its_folder_and_waits_for_the_lock(tmp_path):
    db = tmp_path / "new" / "study.db"
    store = study_lib.storage(f"sqlite:///{db}")
    assert db.parent.is_dir()
    assert isinstance(store, optuna.storages.RDBStorage)
    assert store.engine_kwargs == {"connect_args": {"timeout": 120}}
    assert store.heartbeat_interval is None and store.grace_period is None


def test_storage_with_a_heartbeat_retries_stale_trials(tmp_path):
    store = study_lib.storage(f"sqlite:///{tmp_path / 'study.db'}", heartbeat_s=7)
    assert (store.heartbeat_interval, store.grace_period) == (7, 21)  # default grace: 3 heartbeats
    callback = store.heartbeat_stale_trial_callback if hasattr(store, "heartbeat_stale_trial_callback") \
        else store.failed_trial_callback
    assert callback.optuna._max_retry == 10 and callback.__name__ == "retry_unowned"
    store = study_lib.storage(f"sqlite:///{tmp_path / 'study.db'}", heartbeat_s=7, grace_s=30)
    assert (store.heartbeat_interval, store.grace_period) == (7, 30)


def test_storage_refuses_what_it_cannot_use(tmp_path):
    with pytest.raises(UsageError) as e:
        study_lib.storage("redis://u:hunter2@db/0")
    assert str(e.value) == "--storage must be an sqlite:///, postgresql:// or mysql:// URL, got 'redis://u:***@db/0'"
    with pytest.raises(UsageError) as e:
        study_lib.storage("xsqlite:///x.db")
    assert str(e.value).startswith("--storage must be")
    db = tmp_path / "none" / "study.db"
    with pytest.raises(UsageError) as e:
        study_lib.storage(f"sqlite:///{db}", create=False)
    assert str(e.value) == f"no study at {db}; run `bash scripts/sweep.sh <exp> <optimizer>` first or pass --storage"
    assert not db.parent.exists()
    with pytest.raises(UsageError) as e:
        study_lib.storage("mysql://u@db/x")  # a driver that is not installed
    assert "pip install mysqlclient" in str(e.value)


def test_storage_of_an_unreachable_server_is_a_usage_error(monkeypatch):
    from sqlalchemy.exc import OperationalError

    @contextlib.contextmanager
    def no_lock(url):
        yield

    def refused(*args, **kwargs):
        raise OperationalError("connect", {}, Exception("refused for hunter2"))

    monkeypatch.setattr(study_lib, "creation_lock", no_lock)
    monkeypatch.setattr(optuna.storages, "RDBStorage", refused)
    with pytest.raises(UsageError) as e:
        study_lib.storage("postgresql://u:hunter2@db/x")
    assert str(e.value) == "cannot connect to --storage postgresql://u:***@db/x: refused for ***"


SPACE = {"h": sweep.Range(1e-4, 0.5, True), "gamma": sweep.Range(0.0, 10.0, False)}


def test_open_study_minimises_and_records_its_space(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    store = study_lib.storage(url)
    pruner = optuna.pruners.MedianPruner()
    study = study_lib.open_study(NANO, "cd", SPACE, 1337, store, url, pruner)
    assert study.study_name == "nano-cd" and study.direction == optuna.study.StudyDirection.MINIMIZE
    assert study.pruner is pruner
    assert study.user_attrs == {"space": {"h": [1e-4, 0.5, "log"], "gamma": [0.0, 10.0, "uniform"]},
                                "experiment": "nano", "optimizer": "cd", "seed": 1337}
    study.add_trial(create_trial(params={"h": 0.1}, distributions={"h": FloatDistribution(1e-4, 0.5, log=True)},
                                 value=1.0))
    # A second worker with the same space opens the same study and changes no attribute.
    again = study_lib.open_study(NANO, "cd", dict(SPACE), 7, store, url, optuna.pruners.NopPruner())
    assert len(again.trials) == 1 and again.user_attrs["seed"] == 1337
    other = {**SPACE, "h": sweep.Range(1e-3, 0.5, True)}
    with pytest.raises(UsageError) as e:
        study_lib.open_study(NANO, "cd", other, 1337, store, url, pruner)
    assert str(e.value) == (f"study nano-cd in {url} was made with the search space "
                            "{'h': [0.0001, 0.5, 'log'], 'gamma': [0.0, 10.0, 'uniform']}, not "
                            "{'h': [0.001, 0.5, 'log'], 'gamma': [0.0, 10.0, 'uniform']}; use another --storage")


def test_open_study_fills_in_the_attributes_an_older_study_lacks(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    store = study_lib.storage(url)
    old = optuna.create_study(study_name="nano-cd", storage=store)
    old.set_user_attr("seed", 5)
    study = study_lib.open_study(NANO, "cd", SPACE, 1337, store, url, None)
    assert study.user_attrs == {"space": {"h": [1e-4, 0.5, "log"], "gamma": [0.0, 10.0, "uniform"]},
                                "experiment": "nano", "optimizer": "cd", "seed": 5}


def test_load_study_finds_the_study_or_says_how_to_make_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError) as e:
        study_lib.load_study(NANO, "cd")  # under runs/sweeps by default
    assert str(e.value).startswith(f"no study at {tmp_path / 'runs' / 'sweeps' / 'nano' / 'cd' / 'study.db'}; ")
    with pytest.raises(UsageError) as e:
        study_lib.load_study(NANO, "cd", out_root=tmp_path)
    assert str(e.value).startswith(f"no study at {tmp_path / 'nano' / 'cd' / 'study.db'}; ")
    url = f"sqlite:///{tmp_path / 'other.db'}"
    optuna.create_study(study_name="nano-adam", storage=url)
    with pytest.raises(UsageError) as e:
        study_lib.load_study(NANO, "cd", url)
    assert str(e.value) == f"no study named nano-cd in {url}; run `bash scripts/sweep.sh nano cd`"
    assert study_lib.load_study(NANO, "adam", url).study_name == "nano-adam"
    (tmp_path / "nano" / "cd").mkdir(parents=True)
    made = optuna.create_study(study_name="nano-cd", storage=study_lib.default_storage(NANO, "cd", tmp_path))
    assert study_lib.load_study(NANO, "cd", out_root=tmp_path)._study_id == made._study_id


def tpe_draws(sampler, n=3):
    return [sampler._rng.rng.random() for _ in range(n)]


def test_seed_sampler_gives_each_worker_and_restart_its_own_reproducible_tpe_seed():
    def seeded(sampler_seed, worker, trials=0):
        study = optuna.create_study()
        for k in range(trials):
            study.add_trial(create_trial(params={}, distributions={}, value=float(k)))
        seed = study_lib.seed_sampler(study, sampler_seed, worker)
        assert isinstance(study.sampler, optuna.samplers.TPESampler) and study.sampler._constant_liar
        assert tpe_draws(study.sampler) == tpe_draws(optuna.samplers.TPESampler(seed=seed))
        return seed

    first = seeded(0, 0)
    assert isinstance(first, int) and 0 <= first < 2 ** 32
    assert seeded(0, 0) == first  # reproducible
    assert len({first, seeded(1, 0), seeded(0, 1), seeded(0, 0, trials=2)}) == 4


def add(study, state, params=None, attrs=None, value=None):
    study.add_trial(create_trial(state=state, params=params or {}, value=value, user_attrs=attrs or {},
                                 distributions={k: FloatDistribution(1e-4, 1e6, log=True) for k in (params or {})}))
    return study.trials[-1].number


def test_finished_counts_complete_and_pruned_trials():
    study = optuna.create_study()
    add(study, TrialState.COMPLETE, value=1.0)
    add(study, TrialState.PRUNED)
    add(study, TrialState.PRUNED)
    for state in (TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING):
        add(study, state)
    assert study_lib.finished(study) == 3


def test_retry_enqueues_the_same_parameters_and_attributes():
    study = optuna.create_study()
    add(study, TrialState.COMPLETE, {"h": 0.5}, value=1.0)
    number = add(study, TrialState.FAIL, {"h": 0.25}, {"root": 1, "run_dir": "/r/trial-1"})
    add(study, TrialState.FAIL)  # stopped before it sampled anything
    study_lib.retry(study, number)
    study_lib.retry(study, 2)
    (waiting,) = study.get_trials(states=(TrialState.WAITING,))
    assert waiting.params == {"h": 0.25} and waiting.user_attrs == {"root": 1, "run_dir": "/r/trial-1"}
    assert waiting.system_attrs["failed_trial"] == 1 and waiting.system_attrs["retry_history"] == [1]


def test_fail_and_retry_fails_a_running_trial_once():
    store = optuna.storages.InMemoryStorage()
    study = optuna.create_study(study_name="nano-cd", storage=store)
    add(study, TrialState.COMPLETE, {"h": 0.5}, value=1.0)
    running = add(study, TrialState.RUNNING, {"h": 0.25}, {"root": 1})
    assert study_lib.fail_and_retry(study, store, running) is True
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING]
    assert study.trials[2].params == {"h": 0.25}
    # Another worker got there first: the trial is finished, nothing more is enqueued.
    assert study_lib.fail_and_retry(study, store, running) is False
    assert study_lib.fail_and_retry(study, store, 0) is False
    assert len(study.trials) == 3


def test_fail_and_retry_enqueues_nothing_when_the_state_was_not_set(monkeypatch):
    store = optuna.storages.InMemoryStorage()
    study = optuna.create_study(study_name="nano-cd", storage=store)
    running = add(study, TrialState.RUNNING, {"h": 0.25})
    monkeypatch.setattr(store, "set_trial_state_values", lambda *args, **kwargs: False)
    assert study_lib.fail_and_retry(study, store, running) is False
    assert [t.state for t in study.trials] == [TrialState.RUNNING]


def test_recover_dead_trials_fails_this_hosts_dead_workers_trials_and_stops_their_runs(monkeypatch):
    store = optuna.storages.InMemoryStorage()
    study = optuna.create_study(study_name="nano-cd", storage=store)
    host = socket.gethostname()
    alive = {(11, "s11")}  # (pid, start) of the live workers
    stopped = []
    monkeypatch.setattr(study_lib.processes, "alive", lambda pid, start: (pid, start) in alive)
    monkeypatch.setattr(study_lib.processes, "stop_pid",
                        lambda pid, start, argument=None: stopped.append((pid, start, argument)))
    run = {"child_pid": 21, "child_start": "s21"}
    dead = add(study, TrialState.RUNNING, {"h": 0.1}, {"host": host, "pid": 10, "pid_start": "s10", **run,
                                                        "run_dir": "/r/trial-0"})
    add(study, TrialState.RUNNING, {"h": 0.2}, {"host": host, "pid": 11, "pid_start": "s11", **run})  # alive
    add(study, TrialState.RUNNING, {"h": 0.3}, {"host": host + "x", "pid": 10, "pid_start": "s10", **run})
    no_dir = add(study, TrialState.RUNNING, {"h": 0.4}, {"host": host, "pid": 12, "pid_start": "s12", **run,
                                                          "run_dir": ""})
    not_str = add(study, TrialState.RUNNING, {"h": 0.5}, {"host": host, "pid": 13, **run, "run_dir": 5})
    # Not running: a failed trial, and a queued retry (which inherits its original's attributes).
    finished_attrs = {"host": host, "pid": 14, "pid_start": "s14", **run, "run_dir": "/r/trial-9"}
    add(study, TrialState.FAIL, {"h": 0.6}, finished_attrs)
    add(study, TrialState.WAITING, {"h": 0.7}, finished_attrs)
    # A trial a worker is starting: its host set, its pid not yet (a worker sets the host last,
    # but an older one did not).
    add(study, TrialState.RUNNING, {"h": 0.8}, {"host": host, "run_dir": "/r/trial-8"})
    assert study_lib.recover_dead_trials(study, store) == [dead, no_dir, not_str]
    assert stopped == [(21, "s21", "/r/trial-0")]  # only a run with its folder recorded is signalled
    assert [t.state for t in study.trials[:8]] == [TrialState.FAIL, TrialState.RUNNING, TrialState.RUNNING,
                                                   TrialState.FAIL, TrialState.FAIL, TrialState.FAIL,
                                                   TrialState.WAITING, TrialState.RUNNING]
    assert [t.params["h"] for t in study.trials[8:]] == [0.1, 0.4, 0.5]  # the retries


def test_recover_dead_trials_skips_a_trial_another_worker_recovered(monkeypatch):
    store = optuna.storages.InMemoryStorage()
    study = optuna.create_study(study_name="nano-cd", storage=store)
    monkeypatch.setattr(study_lib.processes, "alive", lambda pid, start: False)
    add(study, TrialState.RUNNING, {"h": 0.1}, {"host": socket.gethostname(), "pid": 10})
    monkeypatch.setattr(study_lib, "fail_and_retry", lambda study, store, number: False)
    assert study_lib.recover_dead_trials(study, store) == []


# --------------------------------------------------------------------------- objective


def test_objective_record_edges():
    nan = float("nan")
    assert objective_lib.objective_record([]) is None
    assert objective_lib.objective_record([], "final") is None
    assert objective_lib.objective_record([val(1, 2.0, split="train")], "best") is None  # train records never count
    assert objective_lib.objective_record([val(0, 2.0), val(2, nan)], "final") is None  # the last loss is not finite
    assert objective_lib.objective_record([val(0, 2.0), val(2, "inf")], "final") is None
    assert objective_lib.objective_record([val(2, 2.0), val(0, 1.0)], "final") == val(2, 2.0)  # by step, not order
    assert objective_lib.objective_record([val(0, nan), val(2, 2.0), val(4, 2.0)]) == val(2, 2.0)  # first on ties
    # best_epoch_end: whole positive epochs only (not 0, not 1.5, not a missing, bool or non-finite epoch).
    rows = [val(0, 1.0, 0.0), val(1, 1.1, 1.5), val(2, 1.2), val(3, 1.3, True), val(4, 1.4, float("inf")),
            val(5, 1.5, 2), val(6, 1.45, 3.0), val(7, 0.5, -1.0)]
    assert objective_lib.objective_record(rows, "best_epoch_end") == rows[6]
    assert objective_lib.objective_record(rows[:5], "best_epoch_end") is None
    with pytest.raises(ValueError) as e:
        objective_lib.objective_record(rows, "worst")
    assert str(e.value) == "objective must be one of best, final, best_epoch_end, got 'worst'"


class FakeTrial:
    """An Optuna trial as the objective uses it: sampled values given, what it is told recorded."""

    def __init__(self, number=3, attrs=None, values=None, prune=()):
        self.number, self.user_attrs = number, dict(attrs or {})
        self.values = values or {"h": 0.01, "gamma": 2.5}
        self.suggested, self.reports, self.prune = [], [], list(prune)

    def suggest_float(self, name, low, high, log=False):
        self.suggested.append((name, low, high, log))
        return self.values[name]

    def set_user_attr(self, key, value):
        self.user_attrs[key] = value

    def report(self, value, step):
        self.reports.append((value, step))

    def should_prune(self):
        return self.prune.pop(0) if self.prune else False


def line(**record):
    return json.dumps(record) + "\n"


class FakeRun:
    """The run's process: ``script`` is what each ``wait`` does: a callable run while the run goes
    on (then the wait times out) or the exit status it ends with."""

    pid = 4242

    def __init__(self, script, signals=None):
        self.script, self.rc, self.waits, self.signals = list(script), None, [], signals
        self.child_during_wait = []

    def wait(self, timeout=None):
        self.waits.append(timeout)
        self.child_during_wait.append(self.signals.child if self.signals else None)
        if self.rc is not None:
            return self.rc
        step = self.script.pop(0)
        if callable(step):
            step()
            raise subprocess.TimeoutExpired("run", timeout)
        self.rc = step
        return step

    def poll(self):
        return self.rc


@pytest.fixture
def fake_runs(monkeypatch):
    """processes.start/stop/start_time played: ``fake_runs.procs`` are handed out in turn."""
    state = SimpleNamespace(procs=[], started=[], stopped=[], envs=[])

    def start(cmd, log, env=None, note=None):
        state.started.append((cmd, log))
        state.envs.append(env)
        return state.procs.pop(0)

    def stop(proc, timeout=None):
        state.stopped.append(proc)
        proc.rc = 75 if proc.rc is None else proc.rc
        return proc.rc

    monkeypatch.setattr(objective_lib.processes, "start", start)
    monkeypatch.setattr(objective_lib.processes, "stop", stop)
    monkeypatch.setattr(objective_lib.processes, "start_time", lambda pid: f"t{pid}")
    return state


def make_objective(tmp_path, signals=None, **kwargs):
    options = dict(seed=1337, out=tmp_path, config="c.yaml", sets=["train.max_iters=4"], poll_s=0.5)
    options.update(kwargs)
    return objective_lib.Objective(NANO, "cd", SPACE, signals=signals or StopFlag(), **options)


def finish(run_dir, status="completed", lines=(), checkpoints=True):
    """What a run leaves: its metrics, its summary, its checkpoints."""
    def write():
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.writelines(lines)
        (run_dir / "summary.json").write_text(json.dumps({"status": status}))
        if checkpoints:
            (run_dir / "checkpoint.pt").write_bytes(b"x")
            (run_dir / "checkpoint.prev.pt").write_bytes(b"x")
    return write


def test_a_trial_runs_its_command_reports_its_losses_and_returns_the_best(tmp_path, fake_runs):
    run_dir = tmp_path / "trial-3"
    signals = StopFlag()
    objective = make_objective(tmp_path, signals)
    first = [line(split="train", step=0, loss=9.0), line(split="val", step=0, loss=3), line(split="val", step=2, loss="nan")]
    rest = [line(split="val", step=2, loss=2.5), line(split="val", step=0, loss=3.1), line(split="val", step=4, loss=2.75)]
    proc = FakeRun([finish(run_dir, lines=first), finish(run_dir, lines=rest[:2]), 0], signals)
    proc.script.insert(2, finish(run_dir, lines=rest[2:]))
    fake_runs.procs.append(proc)
    trial = FakeTrial()
    assert objective(trial) == 2.5
    cmd, log = fake_runs.started[0]
    assert cmd == [sys.executable, "-m", "nano.train", "--optimizer", "cd", "--seed", "1337", "--config", "c.yaml",
                   "--set", "train.max_iters=4", "--set", "optimizer.h=0.01", "--set", "optimizer.gamma=2.5",
                   "--out", str(run_dir)]
    assert log == run_dir / "train.log"
    assert fake_runs.envs == [{}]  # no --threads: the run inherits this process's OMP_NUM_THREADS
    assert trial.suggested == [("h", 1e-4, 0.5, True), ("gamma", 0.0, 10.0, False)]
    # The host after the pid: another worker that sees this host sees the pid (recover_dead_trials).
    assert list(trial.user_attrs).index("host") > list(trial.user_attrs).index("pid_start")
    assert trial.user_attrs == {"root": 3, "seed": 1337, "objective": "best", "run_dir": str(run_dir),
                                "config": "c.yaml", "host": socket.gethostname(), "pid": os.getpid(), "pid_start": f"t{os.getpid()}",
                                "child_pid": 4242, "child_start": "t4242", "status": "completed", "best_step": 2}
    # Each step's finite val loss reported once, as floats and ints, as the run logs it.
    assert trial.reports == [(3.0, 0), (2.5, 2), (2.75, 4)]
    assert all(type(v) is float and type(s) is int for v, s in trial.reports)
    assert proc.waits == [0.5] * 4 and proc.child_during_wait == [proc] * 4
    assert signals.child is None and objective.current == 3
    assert fake_runs.stopped == []
    assert not (run_dir / "checkpoint.pt").exists() and not (run_dir / "checkpoint.prev.pt").exists()


def test_a_retry_runs_in_its_originals_folder_and_seed(tmp_path, fake_runs):
    objective = make_objective(tmp_path, seed_per_trial=True, objective="final", keep_checkpoints=True, nproc=2,
                               config=None, sets=[], threads=3)
    run_dir = tmp_path / "trial-1"
    fake_runs.procs.append(FakeRun([0]))
    finish(run_dir, lines=[line(split="val", step=0, loss=2.0), line(split="val", step=2, loss=2.5)])()
    trial = FakeTrial(number=4, attrs={"root": 1})
    assert objective(trial) == 2.5  # final: the last one
    cmd, _ = fake_runs.started[0]
    assert cmd == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   "-m", "nano.train", "--optimizer", "cd", "--seed", "1338",
                   "--set", "optimizer.h=0.01", "--set", "optimizer.gamma=2.5", "--out", str(run_dir)]
    assert fake_runs.envs == [{"OMP_NUM_THREADS": "3"}]
    assert (trial.user_attrs["root"], trial.user_attrs["seed"], trial.user_attrs["objective"]) == (1, 1338, "final")
    assert trial.user_attrs["best_step"] == 2 and objective.current == 4
    assert (run_dir / "checkpoint.pt").exists() and (run_dir / "checkpoint.prev.pt").exists()  # kept


def test_objective_defaults_match_the_commands():
    objective = objective_lib.Objective(NANO, "cd", SPACE, seed=1, out=Path("."), config=None, sets=(),
                                        signals=StopFlag())
    assert (objective.poll_s, objective.keep_checkpoints, objective.nproc, objective.threads, objective.objective,
            objective.seed_per_trial) == (10.0, False, 1, None, "best", False)  # --poll 10, as SweepOptions


def test_trial_seed():
    assert make_objective(Path("."), seed=5).trial_seed(7) == 5
    assert make_objective(Path("."), seed=5, seed_per_trial=True).trial_seed(7) == 12


def test_an_unknown_objective_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError) as e:
        make_objective(tmp_path, objective="worst")
    assert str(e.value) == "objective must be one of best, final, best_epoch_end, got 'worst'"


def test_no_trial_starts_after_a_stop_request(tmp_path, fake_runs):
    signals = StopFlag()
    objective = make_objective(tmp_path, signals)
    objective.current = 2  # the previous trial's
    signals.flag = True
    with pytest.raises(objective_lib.WorkerInterrupted) as e:
        objective(FakeTrial())
    assert str(e.value) == "stop requested before the trial started"
    assert objective.current is None and fake_runs.started == []


def test_the_pruner_stops_the_run(tmp_path, fake_runs):
    run_dir = tmp_path / "trial-3"
    proc = FakeRun([finish(run_dir, "interrupted", [line(split="val", step=0, loss=3.0)]), lambda: None, 0])
    fake_runs.procs.append(proc)
    trial = FakeTrial(prune=[False, True])
    with pytest.raises(optuna.TrialPruned) as e:
        make_objective(tmp_path)(trial)
    assert str(e.value) == f"median pruner stopped the run at {run_dir}"
    assert fake_runs.stopped == [proc] and proc.waits == [0.5, 0.5]
    assert trial.user_attrs["status"] == "interrupted" and trial.reports == [(3.0, 0)]
    assert not (run_dir / "checkpoint.pt").exists()


def test_a_stop_request_while_the_run_goes_on_waits_for_its_checkpoint(tmp_path, fake_runs):
    signals = StopFlag()
    run_dir = tmp_path / "trial-3"

    def signalled():
        signals.flag = True  # StopFlag forwards SIGTERM to the run, which checkpoints and exits 75
        finish(run_dir, "interrupted")()

    proc = FakeRun([signalled, lambda: None, 75], signals)
    fake_runs.procs.append(proc)
    trial = FakeTrial(prune=[True, True])  # a pruner's answer is not asked for then
    with pytest.raises(objective_lib.WorkerInterrupted) as e:
        make_objective(tmp_path, signals)(trial)
    assert str(e.value) == f"{run_dir} interrupted (exit status 75); the trial will be retried"
    assert fake_runs.stopped == [] and trial.prune == [True, True] and len(proc.waits) == 3
    assert (run_dir / "checkpoint.pt").exists()  # the retry resumes from it


@pytest.mark.parametrize("rc,flag,raised,message", [
    (75, False, objective_lib.WorkerInterrupted, "{run} interrupted (exit status 75); the trial will be retried"),
    (1, True, objective_lib.WorkerInterrupted, "{run} interrupted (exit status 1); the trial will be retried"),
    (2, False, UsageError, "trial 3 could not start: --set: unknown key 'train.nope'"),
    (1, False, objective_lib.TrialCrashed, "{run} exited with status 1: RuntimeError: boom"),
    (-9, False, objective_lib.TrialCrashed, "{run} exited with status -9: RuntimeError: boom"),
])
def test_how_a_run_that_did_not_finish_ends_its_trial(tmp_path, fake_runs, rc, flag, raised, message):
    signals = StopFlag()
    run_dir = tmp_path / "trial-3"
    run_dir.mkdir()
    (run_dir / "train.log").write_text("$ python -m nano.train\nerror: --set: unknown key 'train.nope'\n"
                                       if rc == 2 else "step 1\nRuntimeError: boom\n\n")
    (run_dir / "checkpoint.pt").write_bytes(b"x")
    signals.flag = flag
    objective = make_objective(tmp_path, signals)
    trial = FakeTrial()
    with pytest.raises(raised) as e:
        objective._result(trial, objective_lib.RunDir(run_dir), rc, False)
    assert type(e.value) is raised and str(e.value) == message.format(run=run_dir)
    if raised is objective_lib.TrialCrashed:
        assert trial.user_attrs["error"] == f"exit status {rc}: RuntimeError: boom"
    else:
        assert "error" not in trial.user_attrs
    assert trial.user_attrs["status"] is None
    assert (run_dir / "checkpoint.pt").exists()


def test_a_run_that_finished_despite_a_stop_request_counts(tmp_path):
    signals = StopFlag()
    signals.flag = True
    run_dir = tmp_path / "trial-3"
    finish(run_dir, lines=[line(split="val", step=4, loss=1.5)])()
    assert make_objective(tmp_path, signals)._result(FakeTrial(), objective_lib.RunDir(run_dir), 0, False) == 1.5


@pytest.mark.parametrize("files", [(), ("checkpoint.pt",), ("checkpoint.prev.pt",)])
def test_a_run_with_no_or_one_checkpoint_finishes_its_trial(tmp_path, files):
    """A run that never reached a checkpoint, or has no previous one, ends its trial all the same."""
    run_dir = tmp_path / "trial-3"
    finish(run_dir, lines=[line(split="val", step=2, loss=1.5)], checkpoints=False)()
    for name in files:
        (run_dir / name).write_bytes(b"x")
    assert make_objective(tmp_path)._result(FakeTrial(), objective_lib.RunDir(run_dir), 0, False) == 1.5
    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.jsonl", "summary.json"]


@pytest.mark.parametrize("status,lines,message", [
    ("diverged", [line(split="val", step=0, loss=3.0)], "{run} diverged"),
    ("completed", [line(split="val", step=0, loss="nan")],
     "{run} has no finite validation loss for the objective best"),
    ("completed", [], "{run} has no finite validation loss for the objective best"),
])
def test_a_diverged_run_or_one_without_a_loss_is_pruned(tmp_path, status, lines, message):
    run_dir = tmp_path / "trial-3"
    finish(run_dir, status, lines)()
    trial = FakeTrial()
    with pytest.raises(optuna.TrialPruned) as e:
        make_objective(tmp_path)._result(trial, objective_lib.RunDir(run_dir), 0, False)
    assert str(e.value) == message.format(run=run_dir)
    assert trial.user_attrs == {"status": status}
    assert not (run_dir / "checkpoint.pt").exists() and not (run_dir / "checkpoint.prev.pt").exists()


def test_a_failure_while_waiting_never_leaves_the_run_behind(tmp_path, fake_runs):
    signals = StopFlag()
    run_dir = tmp_path / "trial-3"
    proc = FakeRun([finish(run_dir, lines=[line(split="val", step=0, loss=3.0)])], signals)
    fake_runs.procs.append(proc)
    trial = FakeTrial()

    def lost(value, step):
        raise ConnectionError("the study's database went away")

    trial.report = lost
    with pytest.raises(ConnectionError):
        make_objective(tmp_path, signals)(trial)
    assert fake_runs.stopped == [proc] and signals.child is None


def test_reports_read_on_from_where_they_stopped(tmp_path):
    run_dir = tmp_path / "trial-0"
    run_dir.mkdir()
    trial = FakeTrial()
    reports = objective_lib._Reports(trial, objective_lib.RunDir(run_dir))
    reports.send()  # no metrics yet
    with open(run_dir / "metrics.jsonl", "w") as f:
        f.write(line(split="val", step=0, loss=3.0) + line(split="train", step=1, loss=1.0) + '{"split": "val", "st')
    reports.send()
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('ep": 2, "loss": 2.0}\n' + line(split="val", step=4, loss=float("inf")) + line(split="val", step=6))
    reports.send()
    reports.send()
    assert trial.reports == [(3.0, 0), (2.0, 2)]


# --------------------------------------------------------------------------- worker


OPTIONS = dict(trials=None, heartbeat_s=60, grace_s=None, nproc=1, prune_startup=5, prune_warmup=0, poll_s=10.0)


@pytest.mark.parametrize("changes,message", [
    ({"trials": 0}, "--trials must be at least 1, got 0"),
    ({"heartbeat_s": 0}, "--heartbeat must be at least 1, got 0"),
    ({"grace_s": 0, "heartbeat_s": 1}, "--grace must be at least 1, got 0"),
    ({"nproc": 0}, "--nproc must be at least 1, got 0"),
    ({"threads": 0}, "--threads must be at least 1, got 0"),
    ({"prune_startup": -1}, "--prune-startup must be at least 0, got -1"),
    ({"prune_warmup": -1}, "--prune-warmup must be at least 0, got -1"),
    ({"poll_s": 0.0}, "--poll must be a positive number of seconds, got 0.0"),
    ({"poll_s": -1.0}, "--poll must be a positive number of seconds, got -1.0"),
    ({"poll_s": float("nan")}, "--poll must be a positive number of seconds, got nan"),
    ({"grace_s": 60}, "--grace (60 s) must be longer than --heartbeat (60 s)"),
    ({"grace_s": 30}, "--grace (30 s) must be longer than --heartbeat (60 s)"),
])
def test_sweep_options_check_names_the_option(changes, message):
    with pytest.raises(UsageError) as e:
        worker_lib.SweepOptions("nano", "cd", **{**OPTIONS, **changes}).check()
    assert str(e.value) == message


def test_sweep_options_check_passes_the_least_usable_numbers():
    worker_lib.SweepOptions("nano", "cd").check()  # the defaults
    worker_lib.SweepOptions("nano", "cd", trials=1, heartbeat_s=1, grace_s=2, nproc=1, threads=1, prune_startup=0,
                            prune_warmup=0, poll_s=0.01).check()


def test_sweep_options_defaults_and_from_args():
    options = worker_lib.SweepOptions("nano", "cd")
    assert (options.trials, options.storage_url, options.seed, options.sampler_seed, options.worker, options.pruner,
            options.prune_startup, options.prune_warmup, options.config, tuple(options.sets), options.space_file,
            options.out_root, options.poll_s, options.heartbeat_s, options.grace_s, options.keep_checkpoints,
            options.nproc, options.threads, options.plot) == (None, None, None, 0, None, "none", 5, 0, None, (), None,
                                                              "runs/sweeps", 10.0, 60, None, False, 1, None, True)
    values = {f.name: f"v{k}" for k, f in enumerate(worker_lib.fields(worker_lib.SweepOptions))}
    args = argparse.Namespace(**values, command="run", extra=1)
    assert worker_lib.SweepOptions.from_args(args) == worker_lib.SweepOptions(**values)


def test_pruner():
    assert type(worker_lib._pruner(worker_lib.SweepOptions("nano", "cd"))) is optuna.pruners.NopPruner
    median = worker_lib._pruner(worker_lib.SweepOptions("nano", "cd", pruner="median", prune_startup=3, prune_warmup=7))
    assert type(median) is optuna.pruners.MedianPruner
    assert (median._n_startup_trials, median._n_warmup_steps) == (3, 7)
    with pytest.raises(UsageError) as e:
        worker_lib._pruner(worker_lib.SweepOptions("nano", "cd", pruner="hyperband"))
    assert str(e.value) == "--pruner must be none or median, got 'hyperband'"


class FakeProgress:
    def __init__(self):
        self.lines, self.n, self.refreshed = [], 0, 0

    def write(self, text):
        self.lines.append(text)

    def refresh(self):
        self.refreshed += 1


class StudyView:
    """A study whose ``stop`` is recorded (Optuna's works only inside ``optimize``)."""

    def __init__(self, study=None):
        self.study, self.stops = study or optuna.create_study(), 0

    def __getattr__(self, name):
        return getattr(self.study, name)

    def stop(self):
        self.stops += 1


def frozen(study, state, value=None, attrs=None, params=None):
    add(study.study, state, params if params is not None else {"h": 0.012345, "gamma": 2.5}, attrs, value)
    return study.study.trials[-1]


def test_after_trial_writes_one_line_per_trial_and_counts_crashes_in_a_row():
    study, progress, signals = StudyView(), FakeProgress(), StopFlag()
    after = worker_lib._AfterTrial(progress, signals, study.study._storage, 10)
    after(study, frozen(study, TrialState.COMPLETE, 2.5, {"run_dir": "/r/trial-0"}))
    after(study, frozen(study, TrialState.FAIL, attrs={"error": "exit status 1: boom", "run_dir": "/r/trial-1"}))
    assert after.crashes == 1
    after(study, frozen(study, TrialState.FAIL))
    assert after.crashes == 2
    after(study, frozen(study, TrialState.PRUNED, attrs={"status": "diverged"}))
    assert after.crashes == 0
    after(study, frozen(study, TrialState.PRUNED, params={}))
    assert progress.lines == [
        "trial 0 (/r/trial-0): complete objective 2.5000; h=0.01235, gamma=2.5",
        "trial 1 (/r/trial-1): fail (exit status 1: boom); h=0.01235, gamma=2.5",
        "trial 2 (?): fail (?); h=0.01235, gamma=2.5",
        "trial 3 (?): pruned (run diverged); h=0.01235, gamma=2.5",
        "trial 4 (?): pruned (run stopped early); ",
    ]
    assert (progress.n, progress.refreshed, study.stops) == (3, 5, 0)  # 1 complete + 2 pruned of 10


def test_after_trial_stops_the_study():
    study, progress, signals = StudyView(), FakeProgress(), StopFlag()
    after = worker_lib._AfterTrial(progress, signals, study.study._storage, 2)
    after(study, frozen(study, TrialState.COMPLETE, 1.0))
    assert study.stops == 0
    after(study, frozen(study, TrialState.PRUNED))  # the study holds its 2 finished trials
    assert study.stops == 1
    after = worker_lib._AfterTrial(FakeProgress(), signals, study.study._storage, 10)
    for k in range(3):
        assert study.stops == 1
        after(study, frozen(study, TrialState.FAIL))
    assert study.stops == 2  # 3 crashes in a row
    after = worker_lib._AfterTrial(FakeProgress(), signals, study.study._storage, 10)
    signals.flag = True
    after(study, frozen(study, TrialState.COMPLETE, 1.0))
    assert study.stops == 3  # a stop request


def test_after_trial_counts_the_other_workers_running_trials():
    """With N-1 finished and another worker's trial running, the worker starts no N+1st (the nano
    CADAM0 study, two workers, ended with 81 of 80)."""
    study, progress = StudyView(), FakeProgress()
    after = worker_lib._AfterTrial(progress, StopFlag(), study.study._storage, 3)
    after(study, frozen(study, TrialState.COMPLETE, 1.0))
    study.study.ask()  # another worker's trial, running
    assert study.stops == 0
    after(study, frozen(study, TrialState.COMPLETE, 2.0))  # 2 finished + 1 running = 3
    assert (progress.n, study.stops) == (2, 1)


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_after_trial_retries_a_dead_workers_trial_rather_than_count_it(tmp_path):
    """A worker killed mid-trial leaves its trial RUNNING; counted as one that will finish, it made
    the survivor stop a trial short (the PostgreSQL kill test). Dead on this host (its pid is gone)
    or silent on any host (heartbeat older than the grace period): failed, re-enqueued, run here."""
    store = study_lib.storage(f"sqlite:///{tmp_path / 'study.db'}", heartbeat_s=1, grace_s=1)
    study, progress = StudyView(optuna.create_study(storage=store)), FakeProgress()
    add(study.study, TrialState.COMPLETE, {"h": 0.5}, value=1.0)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = add(study.study, TrialState.RUNNING, {"h": 0.1},
               {"host": socket.gethostname(), "pid": gone.pid, "pid_start": "1"})

    def elsewhere():
        trial = study.study.ask()
        trial.suggest_float("h", 1e-4, 1.0, log=True)
        store.record_heartbeat(trial._trial_id)
        return trial.number

    silent = elsewhere()
    time.sleep(2.5)  # older than the grace period
    live = elsewhere()
    after = worker_lib._AfterTrial(progress, StopFlag(), store, 5)
    after(study, frozen(study, TrialState.COMPLETE, 2.0))
    # 2 finished + 1 live running < 5: the worker goes on, and runs the two retries first.
    assert study.stops == 0 and progress.lines[-1] == f"retrying interrupted trial(s) {[dead, silent]}"
    states = {t.number: t.state for t in study.study.trials}
    assert (states[dead], states[silent], states[live]) == (TrialState.FAIL, TrialState.FAIL, TrialState.RUNNING)
    waiting = study.study.get_trials(states=(TrialState.WAITING,))
    assert [t.params for t in waiting] == [study.study.trials[dead].params, study.study.trials[silent].params]
    # The other worker's live trial still counts: 2 finished + 1 running make a study of 3.
    after = worker_lib._AfterTrial(progress, StopFlag(), store, 3)
    after(study, study.study.trials[0])
    assert study.stops == 1


def test_run_sweep_starts_nothing_when_running_trials_complete_the_study(recorded, capsys):
    options = worker_lib.SweepOptions("nano", "cd", space_file=recorded.space, out_root=recorded.root, trials=2,
                                      seed=3, plot=False)
    worker_lib.run_sweep(dataclasses.replace(options, trials=1))
    study = optuna.load_study(study_name="nano-cd", storage=f"sqlite:///{recorded.root.resolve() / 'nano/cd/study.db'}")
    study.ask()  # a live trial of another worker (its heartbeat is fresh)
    capsys.readouterr()
    RecordedObjective.made = []
    study = worker_lib.run_sweep(options)
    assert RecordedObjective.made == [] and [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.RUNNING]
    assert capsys.readouterr().out.endswith(
        "the other workers' 1 running trial(s) complete the study's 2; no trial for this worker to start\n")


class Scripted:
    """An objective that plays ``outcomes`` in turn: a value, an exception to raise, or a callable."""

    def __init__(self, outcomes, current=None):
        self.outcomes, self.current, self.calls = list(outcomes), current, 0

    def __call__(self, trial):
        self.calls += 1
        trial.suggest_float("h", 1e-4, 1.0, log=True)
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome(trial) if callable(outcome) else outcome


def test_optimize_runs_until_the_study_holds_its_trials(tmp_path):
    study = optuna.create_study()
    add(study, TrialState.COMPLETE, {"h": 0.5}, value=1.0)
    objective = Scripted([2.0, optuna.TrialPruned(), objective_lib.TrialCrashed("boom"), 3.0, 4.0])
    seen = []
    worker_lib._optimize(study, study._storage, 4, tmp_path, lambda signals: seen.append(signals) or objective)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED,
                                               TrialState.FAIL, TrialState.COMPLETE]
    assert isinstance(seen[0], StopFlag) and objective.calls == 4


class FakeBar(FakeProgress):
    """tqdm's bar (the tests run with TQDM_DISABLE=1, which hides a real one): its arguments recorded."""

    made = []

    def __init__(self, **kwargs):
        super().__init__()
        self.kwargs = kwargs
        FakeBar.made.append(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_optimize_shows_a_bar_of_the_studys_finished_trials(tmp_path, monkeypatch):
    import tqdm.auto

    FakeBar.made = []
    monkeypatch.setattr(tqdm.auto, "tqdm", FakeBar)
    study = optuna.create_study(study_name="nano-cd")
    add(study, TrialState.COMPLETE, {"h": 0.5}, value=1.0)
    add(study, TrialState.FAIL, {"h": 0.5})
    worker_lib._optimize(study, study._storage, 3, tmp_path, lambda signals: Scripted([2.0, 3.0]))
    (bar,) = FakeBar.made
    # stderr is a file here (a nohup log, a SLURM .out): no bar frames, only the lines per trial
    assert bar.kwargs == {"total": 3, "initial": 1, "desc": "nano-cd", "dynamic_ncols": True, "disable": True}
    assert bar.n == 3 and len(bar.lines) == 2
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)  # a terminal: the bar is drawn
    worker_lib._optimize(study, study._storage, 4, tmp_path, lambda signals: Scripted([4.0]))
    assert FakeBar.made[1].kwargs == {"total": 4, "initial": 3, "desc": "nano-cd", "dynamic_ncols": True}


def test_optimize_gives_up_after_three_crashes_in_a_row(tmp_path):
    study = optuna.create_study()
    crash = objective_lib.TrialCrashed
    objective = Scripted([crash("a"), crash("b"), 1.0, crash("c"), crash("d"), crash("e"), 2.0])
    with pytest.raises(objective_lib.TrialCrashed) as e:
        worker_lib._optimize(study, study._storage, 10, tmp_path, lambda signals: objective)
    assert str(e.value) == f"3 trials in a row crashed; see the train.log of the last trials under {tmp_path}"
    assert objective.calls == 6


def test_optimize_retries_the_trial_a_stop_interrupted(tmp_path):
    study = optuna.create_study()

    def interrupted(trial):
        objective.current = trial.number
        trial.set_user_attr("root", trial.number)
        raise objective_lib.WorkerInterrupted("stopped")

    objective = Scripted([1.0, interrupted])
    with pytest.raises(objective_lib.WorkerInterrupted):
        worker_lib._optimize(study, study._storage, 5, tmp_path, lambda signals: objective)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING]
    assert study.trials[2].params == study.trials[1].params and study.trials[2].user_attrs == {"root": 1}
    # Stopped before its trial started: nothing to retry.
    objective = Scripted([objective_lib.WorkerInterrupted("before")])
    with pytest.raises(objective_lib.WorkerInterrupted):
        worker_lib._optimize(study, study._storage, 5, tmp_path, lambda signals: objective)
    assert len(study.trials) == 3


def test_optimize_stops_after_the_trial_in_flight_at_a_stop_request(tmp_path):
    study = optuna.create_study()
    flags = []

    def objective_for(signals):
        flags.append(signals)
        return Scripted([lambda trial: setattr(flags[0], "flag", True) or 1.0, 2.0])

    worker_lib._optimize(study, study._storage, 5, tmp_path, objective_for)
    assert len(study.trials) == 1


SPACE_FILE = ("budget: {train.max_iters: 4, train.eval_interval: 2}\ntrials: 2\nseed: 7\nseed_per_trial: true\n"
              "objective: final\noptimizers:\n  cd: {h: [1.0e-4, 0.5, log]}\n")


class RecordedObjective:
    """Stands in for ``Objective``: its arguments recorded, a value known by hand per trial."""

    made = []

    def __init__(self, exp, optimizer, space, **kwargs):
        self.args, self.current = (exp, optimizer, space, kwargs), None
        RecordedObjective.made.append(self)

    def __call__(self, trial):
        h = trial.suggest_float("h", 1e-4, 0.5, log=True)
        return (math.log10(h) + 2) ** 2


@pytest.fixture
def recorded(monkeypatch, tmp_path):
    RecordedObjective.made = []
    monkeypatch.setattr(worker_lib, "Objective", RecordedObjective)
    plotted = []
    monkeypatch.setattr(worker_lib, "plot_study", lambda study, out: plotted.append((study.study_name, out)) or
                        [out / "history.png", out / "study.md"])
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    space = tmp_path / "space.yaml"
    space.write_text(SPACE_FILE)
    return SimpleNamespace(plotted=plotted, space=str(space), root=tmp_path / "sweeps")


def test_run_sweep_runs_the_space_files_study(recorded, capsys, monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    options = worker_lib.SweepOptions("nano", "CD", space_file=recorded.space, out_root=recorded.root,
                                      sets=["train.eval_iters=1"], poll_s=0.5, keep_checkpoints=True, nproc=2,
                                      threads=2, heartbeat_s=5, grace_s=9)
    study = worker_lib.run_sweep(options)
    out = recorded.root.resolve() / "nano" / "cd"
    url = f"sqlite:///{out / 'study.db'}"
    assert study.study_name == "nano-cd" and len(study.trials) == 2
    assert study._storage._backend.heartbeat_interval == 5 and study._storage._backend.grace_period == 9
    assert study.user_attrs["seed"] == 7 and study.user_attrs["space"] == {"h": [1e-4, 0.5, "log"]}
    ((exp, optimizer, space, kwargs),) = [o.args for o in RecordedObjective.made]
    assert (exp.name, optimizer, space) == ("nano", "cd", {"h": sweep.Range(1e-4, 0.5, True)})
    assert kwargs == dict(seed=7, out=out, config=None, signals=kwargs["signals"], poll_s=0.5, keep_checkpoints=True,
                          nproc=2, threads=2, objective="final", seed_per_trial=True,
                          sets=["train.max_iters=4", "train.eval_interval=2", "train.eval_iters=1"])
    assert isinstance(kwargs["signals"], StopFlag)
    stdout = capsys.readouterr().out.splitlines()
    tpe_seed = int(np.random.SeedSequence([0, 3, 0]).generate_state(1)[0])
    assert stdout[0] == (f"study nano-cd in {url}: 0/2 finished, worker 3, TPE seed {tpe_seed}, trial seed 7 + trial "
                         f"number, objective final, runs in {out}")
    assert stdout[-2:] == [str(out / "history.png"), str(out / "study.md")]
    assert recorded.plotted == [("nano-cd", out)]


def test_run_sweep_of_a_finished_study_runs_no_trial(recorded, capsys):
    options = worker_lib.SweepOptions("nano", "cd", space_file=recorded.space, out_root=recorded.root, trials=1,
                                      seed=3, worker=1, sampler_seed=2, plot=False)
    worker_lib.run_sweep(options)
    capsys.readouterr()
    RecordedObjective.made = []
    study = worker_lib.run_sweep(options)
    assert len(study.trials) == 1 and RecordedObjective.made == [] and recorded.plotted == []
    tpe_seed = int(np.random.SeedSequence([2, 1, 1]).generate_state(1)[0])
    out = recorded.root.resolve() / "nano" / "cd"
    assert capsys.readouterr().out == (f"study nano-cd in sqlite:///{out / 'study.db'}: 1/1 finished, worker 1, "
                                       f"TPE seed {tpe_seed}, trial seed 3 + trial number, objective final, "
                                       f"runs in {out}\n")


def test_run_sweep_retries_this_hosts_dead_trials_first(recorded, capsys, monkeypatch, tmp_path):
    url = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    space = tmp_path / "same_seed.yaml"
    space.write_text(SPACE_FILE.replace("seed_per_trial: true", "seed_per_trial: false"))
    options = worker_lib.SweepOptions("nano", "cd", space_file=str(space), out_root=recorded.root,
                                      storage_url=url, trials=1, plot=False)
    looked = []
    monkeypatch.setattr(study_lib, "recover_dead_trials",
                        lambda study, store: looked.append(store) or ([4, 6] if len(looked) == 1 else []))
    worker_lib.run_sweep(options, pruner_obj=optuna.pruners.ThresholdPruner(upper=1.0))
    # The study's own storage, at the start and after its one trial.
    assert [(type(s), s.url) for s in looked] == [(optuna.storages.RDBStorage, url)] * 2
    first = capsys.readouterr().out.splitlines()[0]
    tpe_seed = int(np.random.SeedSequence([0, 0, 0]).generate_state(1)[0])
    assert first == (f"study nano-cd in {url}: 0/1 finished, worker 0, TPE seed {tpe_seed}, trial seed 7, "
                     f"objective final, runs in {recorded.root.resolve() / 'nano' / 'cd'}; "
                     "retrying interrupted trial(s) [4, 6]")
    assert not (recorded.root / "nano" / "cd" / "study.db").exists()


def test_run_sweep_passes_the_pruner_to_the_study(recorded, monkeypatch):
    opened = []
    real = worker_lib.open_study
    monkeypatch.setattr(worker_lib, "open_study", lambda *args: opened.append(args[-1]) or real(*args))
    base = dict(space_file=recorded.space, out_root=recorded.root, trials=1, plot=False)
    worker_lib.run_sweep(worker_lib.SweepOptions("nano", "cd", pruner="median", prune_startup=2, **base))
    given = optuna.pruners.ThresholdPruner(upper=1.0)
    worker_lib.run_sweep(worker_lib.SweepOptions("nano", "cd", pruner="median", **base), pruner_obj=given)
    assert type(opened[0]) is optuna.pruners.MedianPruner and opened[0]._n_startup_trials == 2
    assert opened[1] is given


def test_run_sweep_lets_the_users_config_win_over_the_budget(recorded, tmp_path):
    config = tmp_path / "mine.yaml"
    config.write_text("train: {max_iters: 3}\n")
    worker_lib.run_sweep(worker_lib.SweepOptions("nano", "cd", space_file=recorded.space, out_root=recorded.root,
                                                 trials=1, plot=False, config=str(config)))
    ((_, _, _, kwargs),) = [o.args for o in RecordedObjective.made]
    assert kwargs["config"] == str(config) and kwargs["sets"] == ["train.eval_interval=2"]


class CrashingObjective(RecordedObjective):
    def __call__(self, trial):
        raise objective_lib.TrialCrashed("boom")


def test_run_sweep_stops_when_trials_keep_crashing_and_says_where_to_look(recorded, monkeypatch):
    monkeypatch.setattr(worker_lib, "Objective", CrashingObjective)
    with pytest.raises(objective_lib.TrialCrashed) as e:
        worker_lib.run_sweep(worker_lib.SweepOptions("nano", "cd", space_file=recorded.space, out_root=recorded.root,
                                                     trials=5, plot=False))
    assert str(e.value) == ("3 trials in a row crashed; see the train.log of the last trials under "
                            f"{recorded.root.resolve() / 'nano' / 'cd'}")


def test_run_sweep_checks_the_config_against_the_experiments_own_configs(recorded, tmp_path, monkeypatch):
    configs = tmp_path / "configs"
    shutil.copytree(NANO.configs, configs)
    (configs / "best.yaml").write_text("cd: {nope: 1}\n")
    monkeypatch.setattr(worker_lib, "experiment", lambda spec: dataclasses.replace(NANO, configs=configs))
    with pytest.raises(UsageError) as e:
        worker_lib.run_sweep(worker_lib.SweepOptions("nano", "cd", space_file=recorded.space, out_root=recorded.root))
    assert str(e.value).startswith("best.yaml: unknown hyperparameter nope for cd; ")
    assert not recorded.root.exists()


def write_config(folder, text):
    path = folder / "config.yaml"
    path.write_text(text)
    return path


def test_run_sweep_refuses_bad_input_before_it_writes_anything(recorded, tmp_path):
    base = dict(space_file=recorded.space, out_root=recorded.root)
    for options, message in [
        (worker_lib.SweepOptions("nano", "cd", trials=0, **base), "--trials must be at least 1, got 0"),
        (worker_lib.SweepOptions("nano", "ldhd", **base), "has no search space for 'ldhd'"),
        (worker_lib.SweepOptions("nano", "cd", sets=["train.nope=1"], **base), "unknown key 'train.nope'"),
        (worker_lib.SweepOptions("nano", "cd", config=str(write_config(tmp_path, "train: {nope: 1}\n")), **base),
         "unknown key 'train.nope'"),
    ]:
        with pytest.raises(UsageError, match=re.escape(message)):
            worker_lib.run_sweep(options)
    assert not (recorded.root / "nano").exists()
    with pytest.raises(UsageError, match="--pruner must be none or median, got 'x'"):
        worker_lib.run_sweep(worker_lib.SweepOptions("nano", "cd", pruner="x", **base))
    shutil.rmtree(recorded.root)
    recorded.root.write_text("a file")
    with pytest.raises(UsageError) as e:
        worker_lib.run_sweep(worker_lib.SweepOptions("nano", "cd", **base))
    assert str(e.value) == (f"--out-root {recorded.root.resolve() / 'nano' / 'cd'}: {recorded.root.resolve()} is a "
                            f"file, not a folder; choose another --out-root")


# --------------------------------------------------------------------------- cli


def test_storage_url_comes_from_the_argument_or_the_environment(monkeypatch):
    monkeypatch.delenv("SWEEP_STORAGE", raising=False)
    assert cli_lib.storage_url(None) is None
    monkeypatch.setenv("SWEEP_STORAGE", "")
    assert cli_lib.storage_url(None) is None
    monkeypatch.setenv("SWEEP_STORAGE", "postgresql://u:pw@db/x")  # a password is fine in the environment
    assert cli_lib.storage_url(None) == "postgresql://u:pw@db/x"
    assert cli_lib.storage_url("sqlite:///x.db") == "sqlite:///x.db"  # the argument wins
    with pytest.raises(UsageError) as e:
        cli_lib.storage_url("postgresql://u@db/x?password=pw")
    assert str(e.value) == ("--storage postgresql://u@db/x?password=*** holds a password, which every user of this "
                            "machine can read on a command line; pass the URL in $SWEEP_STORAGE instead, or the "
                            "password in a PGPASSFILE (mode 0600)")


def test_run_options_default_to_sweep_options(monkeypatch):
    monkeypatch.delenv("SWEEPS", raising=False)
    args = cli_lib.parser().parse_args(["run", "nano", "cd"])
    assert args.command == "run"
    assert worker_lib.SweepOptions.from_args(args) == worker_lib.SweepOptions("nano", "cd", sets=[])
    monkeypatch.setenv("SWEEPS", "/elsewhere")
    assert cli_lib.parser().parse_args(["run", "nano", "cd"]).out_root == "/elsewhere"


def test_run_options_are_sweep_options_fields():
    argv = ["run", "bert/sst2", "cd", "--storage", "sqlite:///s.db", "--out-root", "r", "--trials", "7", "--seed", "3",
            "--sampler-seed", "4", "--worker", "5", "--pruner", "median", "--prune-startup", "6", "--prune-warmup",
            "8", "--config", "c.yaml", "--set", "a=1", "--set", "b=2", "--space", "s.yaml", "--poll", "0.5",
            "--heartbeat", "9", "--grace", "30", "--nproc", "2", "--threads", "3", "--keep-checkpoints", "--no-plot"]
    assert worker_lib.SweepOptions.from_args(cli_lib.parser().parse_args(argv)) == worker_lib.SweepOptions(
        "bert/sst2", "cd", trials=7, storage_url="sqlite:///s.db", seed=3, sampler_seed=4, worker=5, pruner="median",
        prune_startup=6, prune_warmup=8, config="c.yaml", sets=["a=1", "b=2"], space_file="s.yaml", out_root="r",
        poll_s=0.5, heartbeat_s=9, grace_s=30, keep_checkpoints=True, nproc=2, threads=3, plot=False)
    with pytest.raises(SystemExit):
        cli_lib.parser().parse_args(["run", "nano", "cd", "--pruner", "hyperband"])
    with pytest.raises(SystemExit):
        cli_lib.parser().parse_args(["run", "nano", "cd", "--poll", "often"])


def test_export_and_plot_options(monkeypatch):
    monkeypatch.delenv("SWEEPS", raising=False)
    args = cli_lib.parser().parse_args(["export", "nano", "cd"])
    assert (args.command, args.experiment, args.optimizer, args.storage_url, args.out_root, args.out, args.force,
            args.write_best) == ("export", "nano", "cd", None, "runs/sweeps", None, False, False)
    args = cli_lib.parser().parse_args(["export", "nano", "cd", "--storage", "s", "--out", "o", "--force",
                                        "--write-best", "--out-root", "r"])
    assert (args.storage_url, args.out_root, args.out, args.force, args.write_best) == ("s", "r", "o", True, True)
    args = cli_lib.parser().parse_args(["plot", "nano", "cd"])
    assert (args.command, args.out, args.storage_url, args.out_root) == ("plot", None, None, "runs/sweeps")
    assert cli_lib.parser().parse_args(["plot", "nano", "cd", "--out", "d"]).out == "d"
    for argv in (["nano", "cd"], []):  # the parser needs the command; main puts in "run"
        with pytest.raises(SystemExit):
            cli_lib.parser().parse_args(argv)


def help_of(*argv):
    with pytest.raises(SystemExit):
        cli_lib.parser().parse_args([*argv, "--help"])


COMMON_HELP = ("experiment experiment folder (nano, vit, ...; bert/sst2 for a task) optimizer "
               "options: -h, --help show this help message and exit "
               "--storage STORAGE Optuna storage URL without a password (default $SWEEP_STORAGE, else "
               "sqlite:///runs/sweeps/<exp>/<optimizer>/study.db); a password goes in $SWEEP_STORAGE or a "
               "PGPASSFILE, never on the command line "
               "--out-root OUT_ROOT where trial run directories go (default runs/sweeps, or $SWEEPS)")


def test_help_names_every_command_and_option(capsys, monkeypatch):
    # Each screen from "positional arguments:" on, whole: every option with its value's name and
    # its help right after it, so that a help text is checked to its first and last word. Wide
    # enough that argparse breaks no long word (the storage URL) across lines.
    monkeypatch.setenv("COLUMNS", "200")

    def screen(*argv):  # a command's help as one line of words
        help_of(*argv)
        return " ".join(capsys.readouterr().out.split())

    def options(command):  # its screen from the positional arguments on
        return screen(command).split(" positional arguments: ")[1]

    assert screen() == ("usage: python -m harness.sweep [-h] {run,export,plot} ... "
                        "Hyperparameter sweeps with Optuna: the paper's tuning protocol, one ordinary run per trial. "
                        "positional arguments: {run,export,plot} "
                        "run run one worker of the study (several may run at once) "
                        "export write the best hyperparameters in best.yaml format "
                        "plot draw the study's history and importances, and study.md "
                        "options: -h, --help show this help message and exit")
    assert options("run") == (
        COMMON_HELP + " --trials TRIALS finished trials to reach (default: space.yaml's) "
        "--seed SEED the trials' run seed (trial k runs seed + k where space.yaml sets seed_per_trial; default: "
        "space.yaml's seed) "
        "--sampler-seed SAMPLER_SEED TPE seed (mixed with the worker index) "
        "--worker WORKER worker index (default $SLURM_ARRAY_TASK_ID or 0) "
        "--pruner {none,median} median: stop a trial whose intermediate val loss is worse than the median of "
        "earlier ones "
        "--prune-startup PRUNE_STARTUP median pruner: trials before it prunes "
        "--prune-warmup PRUNE_WARMUP median pruner: steps before it prunes a trial "
        "--config CONFIG YAML applied to every trial (its keys win over the budget) "
        "--set KEY=VALUE config override for every trial (repeatable) "
        "--space SPACE search space file (default <exp>/configs/space.yaml) "
        "--poll POLL seconds between looks at a running trial's metrics "
        "--heartbeat HEARTBEAT seconds between a worker's heartbeats "
        "--grace GRACE seconds without a heartbeat after which a trial counts as dead (default 3x heartbeat) "
        "--nproc NPROC GPUs per trial (torchrun) when > 1 "
        "--threads THREADS CPU threads per trial (OMP_NUM_THREADS; default: inherited, else every core); W workers "
        "on one machine's CPUs: cores/W each "
        "--keep-checkpoints keep finished trials' checkpoint.pt "
        "--no-plot do not draw the study's figures at the end")
    assert options("export") == (
        COMMON_HELP + " --out OUT a new file to write --force overwrite --out if it exists "
        "--write-best replace the entry in <exp>/configs/best.yaml")
    assert options("plot") == (
        COMMON_HELP + " --out OUT folder (default: next to the study's trials)")


def test_main_runs_run_by_default_and_exits_1_when_trials_keep_crashing(monkeypatch, capsys):
    got = []
    monkeypatch.setattr(cli_lib, "run_sweep", lambda options: got.append(options))
    monkeypatch.delenv("SWEEP_STORAGE", raising=False)
    assert cli_lib.main(["nano", "cd", "--trials", "2"]) == 0
    assert cli_lib.main(["run", "nano", "cd"]) == 0
    monkeypatch.setattr(sys, "argv", ["harness.sweep", "nano", "adam"])
    assert cli_lib.main() == 0
    assert [(o.experiment, o.optimizer, o.trials) for o in got] == [("nano", "cd", 2), ("nano", "cd", None),
                                                                    ("nano", "adam", None)]
    monkeypatch.setenv("SWEEP_STORAGE", "postgresql://u:pw@db/x")
    assert cli_lib.main(["nano", "cd"]) == 0 and got[-1].storage_url == "postgresql://u:pw@db/x"

    def crashing(options):
        raise objective_lib.TrialCrashed("3 trials in a row crashed")

    monkeypatch.setattr(cli_lib, "run_sweep", crashing)
    capsys.readouterr()
    assert cli_lib.main(["nano", "cd"]) == 1
    assert capsys.readouterr().err == "error: 3 trials in a row crashed\n"


@pytest.fixture
def made_study(tmp_path, monkeypatch):
    """A nano-cd study of three completed trials (the best is trial 1) under ``tmp_path/sweeps``,
    and an experiment ``nano`` whose configs folder is ``tmp_path/configs``."""
    root = tmp_path / "sweeps"
    (root / "nano" / "cd").mkdir(parents=True)
    study = optuna.create_study(study_name="nano-cd", storage=study_lib.default_storage(NANO, "cd", root))
    for k, (h, value) in enumerate([(0.3, 2.0), (0.02, 1.5), (0.1, 1.75)]):
        add(study, TrialState.COMPLETE, {"h": h}, {"run_dir": f"/r/trial-{k}"}, value)
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "best.yaml").write_text("adam: {lr: 0.001}\ncd: {h: 0.5}\n")
    monkeypatch.setattr(cli_lib, "experiment", lambda spec: dataclasses.replace(NANO, configs=configs))
    monkeypatch.delenv("SWEEP_STORAGE", raising=False)
    return SimpleNamespace(root=root, configs=configs, study=study)


def test_export_writes_a_new_file_or_best_yaml(made_study, tmp_path, capsys):
    base = ["export", "nano", "CD", "--out-root", str(made_study.root)]
    out = tmp_path / "tuned.yaml"
    assert cli_lib.main([*base, "--out", str(out)]) == 0
    assert capsys.readouterr().out == f"{out}\n"
    assert yaml.safe_load(out.read_text()) == {"cd": {"h": 0.02}}
    out.write_text("old")
    assert cli_lib.main([*base, "--out", str(out), "--force"]) == 0
    assert yaml.safe_load(out.read_text()) == {"cd": {"h": 0.02}}
    capsys.readouterr()
    assert cli_lib.main([*base, "--write-best"]) == 0
    best = made_study.configs / "best.yaml"
    assert capsys.readouterr().out == f"{best}: cd replaced by trial 1\n"
    assert best.read_text() == "adam: {lr: 0.001}\ncd: {h: 0.02}\n"
    assert cli_lib.main(base) == 2
    assert capsys.readouterr().err == "error: export needs --out FILE (a new file) or --write-best\n"


def test_export_can_write_both(made_study, tmp_path, capsys):
    out = tmp_path / "tuned.yaml"
    assert cli_lib.main(["export", "nano", "cd", "--out-root", str(made_study.root), "--out", str(out),
                         "--write-best"]) == 0
    assert capsys.readouterr().out == f"{out}\n{made_study.configs / 'best.yaml'}: cd replaced by trial 1\n"
    assert yaml.safe_load(out.read_text()) == {"cd": {"h": 0.02}}


def test_export_and_plot_read_the_storage_given(made_study, tmp_path, capsys, monkeypatch):
    url = f"sqlite:///{tmp_path / 'other.db'}"
    study = optuna.create_study(study_name="nano-cd", storage=url)
    add(study, TrialState.COMPLETE, {"h": 0.4}, {}, 1.0)
    out = tmp_path / "tuned.yaml"
    assert cli_lib.main(["export", "nano", "cd", "--storage", url, "--out", str(out)]) == 0
    assert yaml.safe_load(out.read_text()) == {"cd": {"h": 0.4}}
    monkeypatch.setenv("SWEEP_STORAGE", url)
    assert cli_lib.main(["plot", "nano", "cd", "--out", str(tmp_path / "figs")]) == 0
    assert "Trials: 1 complete." in (tmp_path / "figs" / "study.md").read_text()


def test_plot_draws_next_to_the_trials_or_into_out(made_study, tmp_path, capsys, monkeypatch):
    drawn = []
    monkeypatch.setattr(cli_lib, "plot_study", lambda study, out: drawn.append((study.study_name, len(study.trials),
                                                                                 out)) or [out / "a.png", out / "b.md"])
    base = ["plot", "nano", "CD", "--out-root", str(made_study.root)]
    assert cli_lib.main(base) == 0
    folder = made_study.root.resolve() / "nano" / "cd"
    assert cli_lib.main([*base, "--out", str(tmp_path / "figs")]) == 0
    assert drawn == [("nano-cd", 3, folder), ("nano-cd", 3, tmp_path / "figs")]
    assert capsys.readouterr().out.splitlines() == [str(folder / "a.png"), str(folder / "b.md"),
                                                    str(tmp_path / "figs" / "a.png"), str(tmp_path / "figs" / "b.md")]


# --------------------------------------------------------------------------- plots


def png_size(path):
    """A PNG's width and height in pixels (its IHDR chunk)."""
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def study_of_trials(trials, name="nano-cd"):
    """``trials``: (state, value, params, attrs) each."""
    study = optuna.create_study(study_name=name)
    for state, value, params, attrs in trials:
        add(study, state, params, attrs, value)
    return study


def test_plot_study_draws_both_figures_and_the_summary(tmp_path, capsys):
    study = study_of_trials([(TrialState.COMPLETE, 2.0, {"h": 0.3, "c": 2.0}, {"run_dir": "/r/trial-0"}),
                             (TrialState.COMPLETE, 1.5, {"h": 0.02, "c": 5.0}, {"run_dir": "/r/trial-1"}),
                             (TrialState.COMPLETE, 1.75, {"h": 0.1, "c": 1.0}, {"run_dir": "/r/trial-2"})])
    out = tmp_path / "new" / "figs"
    assert plots_lib.plot_study(study, out) == [out / "history.png", out / "importances.png", out / "study.md"]
    assert sorted(p.name for p in out.iterdir()) == ["history.png", "importances.png", "study.md"]  # no temp left
    assert png_size(out / "history.png") == (840, 540) == png_size(out / "importances.png")  # 7 x 4.5 in at 120 dpi
    assert (out / "study.md").read_text().endswith("![history](history.png)\n![importances](importances.png)\n")
    assert plt.get_fignums() == [] and capsys.readouterr().out == ""


def test_plot_study_skips_what_needs_more_completed_trials(tmp_path, capsys):
    study = study_of_trials([(TrialState.PRUNED, None, {"h": 0.3}, {})])
    assert plots_lib.plot_study(study, tmp_path) == [tmp_path / "study.md"]
    assert capsys.readouterr().out == ("nano-cd: history.png needs 1 completed trial(s), has 0; skipped\n"
                                       "nano-cd: importances.png needs 2 completed trial(s), has 0; skipped\n")
    add(study, TrialState.COMPLETE, {"h": 0.2}, {}, 1.0)
    assert plots_lib.plot_study(study, tmp_path) == [tmp_path / "history.png", tmp_path / "study.md"]
    assert capsys.readouterr().out == "nano-cd: importances.png needs 2 completed trial(s), has 1; skipped\n"


def test_a_figure_optuna_cannot_draw_is_skipped(tmp_path, capsys, monkeypatch):
    study = study_of_trials([(TrialState.COMPLETE, 1.0, {"h": 0.3}, {}), (TrialState.COMPLETE, 2.0, {"h": 0.2}, {})])
    from optuna.visualization import matplotlib as ovm

    def broken(study):
        plt.figure()  # half drawn
        raise ValueError("all trials share one value")

    monkeypatch.setattr(ovm, "plot_optimization_history", broken)
    assert plots_lib.plot_study(study, tmp_path) == [tmp_path / "importances.png", tmp_path / "study.md"]
    assert capsys.readouterr().out == "nano-cd: history.png skipped (ValueError: all trials share one value)\n"
    assert plt.get_fignums() == []


def test_a_figure_drawn_as_a_grid_of_axes_is_saved_whole(tmp_path, capsys, monkeypatch):
    # Optuna's matplotlib plots return one Axes or, for a grid of panels, an array of them
    # (plot_contour); either way the file is their figure, at 7 x 4.5 in and 120 dpi.
    study = study_of_trials([(TrialState.COMPLETE, 1.0, {"h": 0.3}, {})])
    from optuna.visualization import matplotlib as ovm

    def grid(study):
        fig, axes = plt.subplots(1, 2)
        return axes

    monkeypatch.setattr(ovm, "plot_optimization_history", grid)
    assert plots_lib.plot_study(study, tmp_path) == [tmp_path / "history.png", tmp_path / "study.md"]
    assert png_size(tmp_path / "history.png") == (840, 540)
    assert plt.get_fignums() == []


def test_study_markdown_counts_and_ranks_the_trials():
    trials = [(TrialState.COMPLETE, 2.0, {"h": 0.3, "c": 2.0}, {"run_dir": "/r/trial-0", "objective": "final"}),
              (TrialState.PRUNED, None, {"h": 0.5}, {}),
              (TrialState.COMPLETE, 1.25, {"h": 0.012345, "c": 50000.0}, {"run_dir": "/r/trial-2", "objective": "final"}),
              (TrialState.FAIL, None, {}, {}), (TrialState.FAIL, None, {}, {}),
              (TrialState.COMPLETE, 1.5, {"h": 0.1}, {"objective": "final"}),
              (TrialState.WAITING, None, {}, {})]
    assert plots_lib.study_markdown(study_of_trials(trials), ["history.png"]) == (
        "# Study nano-cd\n\n"
        "Trials: 3 complete, 1 pruned, 2 fail, 1 waiting.\n\n"
        "Best 3 trials (objective: the validation loss of the last evaluation):\n\n"
        "| trial | objective | h | c | run |\n"
        "|---|---|---|---|---|\n"
        "| 2 | 1.2500 | 0.01235 | 5e+04 | trial-2 |\n"
        "| 5 | 1.5000 | 0.1 | nan | ? |\n"
        "| 0 | 2.0000 | 0.3 | 2 | trial-0 |\n\n"
        "![history](history.png)\n")


def test_study_markdown_shows_the_top_trials_and_the_rule_of_old_studies():
    trials = [(TrialState.COMPLETE, 10.0 - k, {"h": 0.01 * (k + 1)}, {}) for k in range(12)]
    trials.append((TrialState.RUNNING, None, {}, {}))
    text = plots_lib.study_markdown(study_of_trials(trials), [])
    assert text.startswith("# Study nano-cd\n\nTrials: 12 complete, 1 running.\n\n"
                           "Best 10 trials (objective: the lowest validation loss of any evaluation):\n\n")
    rows = [l for l in text.splitlines() if l.startswith("| ") and not l.startswith("| trial")]
    assert [r.split(" | ")[0] for r in rows] == [f"| {k}" for k in range(11, 1, -1)]
    assert text.endswith("| 2 | 8.0000 | 0.03 | ? |\n\n")
    assert plots_lib.study_markdown(study_of_trials(trials[:3]), [], top=2).count("\n| ") == 3  # header + 2
    trials[0] = (TrialState.COMPLETE, -5.0, {"h": 0.2}, {"objective": "mine"})  # an unknown rule is shown as is
    assert "Best 10 trials (objective: mine):" in plots_lib.study_markdown(study_of_trials(trials), [])


def test_study_markdown_of_a_study_without_completed_trials():
    assert plots_lib.study_markdown(study_of_trials([]), []) == "# Study nano-cd\n\nTrials: .\n\n"
    assert plots_lib.study_markdown(study_of_trials([(TrialState.PRUNED, None, {}, {})]), ["a.png"]) == \
        "# Study nano-cd\n\nTrials: 1 pruned.\n\n![a](a.png)\n"

"""The study and its recovery: Optuna storage, the study of one experiment x optimizer,
and the retry of trials whose worker was interrupted or died.

A trial whose worker died is found when a worker starts or ends a trial: on the same host
its pid is gone (:func:`recover_dead_trials`), on any host Optuna's heartbeat is older than
``--grace`` seconds (:func:`live_running`); either way it is marked FAIL and re-enqueued with the same
hyperparameters (at most ``MAX_RETRY`` times), and the retry resumes its run directory.
"""
from __future__ import annotations

import copy
import fcntl
import os
import re
import socket
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Optional

import numpy as np

from .. import processes
from ..errors import UsageError
from ..experiments import Experiment
from .space import Range

MAX_RETRY = 10  # re-enqueues of one interrupted trial before it is given up
# The pip package of each SQLAlchemy driver a --storage URL may name; the environments install
# psycopg2-binary (environments/common.txt), which every SQLAlchemy that optuna accepts can use.
DRIVERS = {"psycopg2": "psycopg2-binary", "psycopg": "psycopg[binary]", "pg8000": "pg8000",
           "mysqldb": "mysqlclient (or use mysql+pymysql:// and pip install PyMySQL)", "pymysql": "PyMySQL",
           "mysqlconnector": "mysql-connector-python"}
# Workers take this PostgreSQL advisory lock (or MySQL named lock) while they create Optuna's
# tables and the study: any constant, the same in every worker.
SCHEMA_LOCK = 0x6E6F6E6C
CONNECT_TIMEOUT_S = 30  # an unreachable server is an error after this long, not after minutes


def quiet_optuna():
    """optuna, with its logging and warnings turned down."""
    import optuna

    # The worker prints one line per trial itself (and the reason of a failure), no tracebacks.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", category=FutureWarning, module="optuna")
    return optuna


# Which worker runs a trial, and its run's process: a retry inherits every other user attribute
# (its root, run directory, seed), not these, so that until a worker starts the retry (and sets
# them, the host last) no other worker takes the dead worker's pid for the retry's.
WORKER_ATTRS = ("host", "pid", "pid_start", "child_pid", "child_start")


def _retry_callback():
    """Optuna's retry of a failed trial (the class was renamed in Optuna 4.9), enqueued without the
    failed trial's ``WORKER_ATTRS``; returns it and the storage keyword it goes by."""
    import optuna

    cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
    keyword = "heartbeat_stale_trial_callback"
    if cls is None:
        cls, keyword = optuna.storages.RetryFailedTrialCallback, "failed_trial_callback"
    optuna_retry = cls(max_retry=MAX_RETRY)

    def retry_unowned(study, trial) -> None:
        trial = copy.deepcopy(trial)
        trial.user_attrs = {k: v for k, v in trial.user_attrs.items() if k not in WORKER_ATTRS}
        optuna_retry(study, trial)

    retry_unowned.optuna = optuna_retry
    return retry_unowned, keyword


def sweep_dir(exp: Experiment, optimizer: str, root: str | Path = "runs/sweeps") -> Path:
    """Where the study's trial run directories and figures go: ``<root>/<exp>/<optimizer>``."""
    return Path(root).resolve() / exp.name / optimizer


def default_storage(exp: Experiment, optimizer: str, root: str | Path = "runs/sweeps") -> str:
    return f"sqlite:///{sweep_dir(exp, optimizer, root) / 'study.db'}"


def study_name(exp: Experiment, optimizer: str) -> str:
    return f"{exp.name}-{optimizer}"


# Query parameters whose values are secrets (libpq's password=, and the like), masked in messages.
SECRET_QUERY = re.compile(r"pass(word|wd)?$|secret|token", re.I)


def quoted_userinfo(url: str) -> str:
    """``url`` with an ``@`` inside its password written ``%40``. SQLAlchemy reads the password up
    to the first ``@`` (``u:p@ss@host`` as password ``p``, host ``ss@host``: half the password
    in every message naming the host); the host, port and database hold no ``@``, so the
    userinfo ends at the first ``@`` after which the text up to the query (``?``) holds none."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    for i, char in enumerate(rest):
        if char == "@" and "@" not in rest[i + 1:].split("?", 1)[0]:
            user, colon, password = rest[:i].partition(":")
            if "/" in user:  # no userinfo: SQLAlchemy's user name holds no "/", this "@" is in the query
                return url
            return f"{scheme}://{user}{colon}{password.replace('@', '%40')}{rest[i:]}"
    return url


def _parsed(url: str):
    """SQLAlchemy's reading of ``url`` (an ``@`` in the password quoted), None if it cannot."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(quoted_userinfo(url))
    except (ArgumentError, ValueError):
        return None


def masked(url: str) -> str:
    """``url`` for messages: SQLAlchemy's rendering with the password as ``***``, and the values
    of ``password=``-like query parameters as ``***`` too. A string SQLAlchemy cannot parse is
    shown as its scheme only (it may be a mistyped password)."""
    parsed = _parsed(url)
    if parsed is None:
        scheme = url.partition("://")[0] if re.match(r"^[\w+]{1,30}://", url) else ""
        return f"{scheme}{'://' if scheme else ''}(not a valid URL)"
    query = {k: ("***" if SECRET_QUERY.search(k) else v) for k, v in parsed.query.items()}
    return parsed.set(query=query).render_as_string(hide_password=True).replace("=%2A%2A%2A", "=***")


def secrets(url: str) -> list[str]:
    """The secrets a URL holds (its password, ``password=``-like query values); the whole string
    if it is not a URL SQLAlchemy can read."""
    parsed = _parsed(url)
    if parsed is None:
        return [url]
    values = [parsed.password] + [v for k, v in parsed.query.items() if SECRET_QUERY.search(k)]
    return [str(s) for v in values if v for s in (v if isinstance(v, tuple) else (v,)) if s]


def holds_password(url: str) -> bool:
    """Whether ``url`` is a URL with a password (in its userinfo or a ``password=`` parameter)."""
    return _parsed(url) is not None and bool(secrets(url))


def scrubbed(text: str, url: str) -> str:
    """``text`` with every secret of ``url`` replaced by ``***``."""
    for secret in sorted(secrets(url), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def engine_url(url: str) -> str:
    """The URL given to SQLAlchemy: an ``@`` in the password quoted (:func:`quoted_userinfo`),
    and a plain ``postgresql://`` naming psycopg2. SQLAlchemy 2.1 made psycopg (3) the default
    driver and older ones psycopg2; naming it makes the URL work with the driver the
    environments install whatever SQLAlchemy the environment resolved."""
    return re.sub(r"^postgresql://", "postgresql+psycopg2://", quoted_userinfo(url))


def check_driver(url: str) -> None:
    """A one-line UsageError naming the package to install when the URL's driver is missing."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        dialect = make_url(engine_url(url)).get_dialect()
    except ArgumentError as e:  # an unknown driver (postgresql+nope://) or a malformed URL
        raise UsageError(f"--storage {masked(url)}: {scrubbed(str(e).splitlines()[0], url)}") from None
    try:
        dialect.import_dbapi()
    except ImportError as e:
        raise UsageError(f"--storage {masked(url)} needs the database driver {dialect.driver} (Python module "
                         f"{e.name or '?'}), which is not installed: pip install "
                         f"{DRIVERS.get(dialect.driver, dialect.driver)}") from None


def _unreachable(url: str, err) -> UsageError:
    reason = str(getattr(err, "orig", None) or err).strip().splitlines()
    reason = scrubbed(reason[0], url) if reason else type(err).__name__
    return UsageError(f"cannot connect to --storage {masked(url)}: {reason}")


def _engine_kwargs(url: str) -> dict:
    if url.startswith("sqlite"):
        # SQLite serialises writers: wait for the lock instead of failing when workers collide.
        return {"connect_args": {"timeout": 120}}
    if url.startswith("postgresql") and "connect_timeout" not in url:
        return {"connect_args": {"connect_timeout": CONNECT_TIMEOUT_S}}
    return {}


@contextmanager
def creation_lock(url: str):
    """Held while a worker creates Optuna's tables or the study. Workers that start at the same
    moment on an empty database would otherwise all run CREATE TABLE/TYPE and all but one die
    of a duplicate key. A PostgreSQL advisory lock or MySQL named lock (released by the server
    when the connection closes, so a worker that dies holding it blocks no one), or a file lock
    next to a SQLite file (released by the kernel likewise)."""
    import sqlalchemy
    from sqlalchemy.exc import OperationalError
    from sqlalchemy.pool import NullPool

    if url.startswith("sqlite"):
        db = re.sub(r"^sqlite(\+\w+)?://(/|$)", "", url)
        if not db or db == ":memory:":
            yield
            return
        fd = os.open(f"{db}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)
        return
    if url.startswith("postgresql"):
        take, key = "SELECT pg_advisory_lock(:key)", SCHEMA_LOCK
    else:
        take, key = "SELECT GET_LOCK(:key, -1)", f"nonlinear-damping-{SCHEMA_LOCK}"
    engine = sqlalchemy.create_engine(engine_url(url), poolclass=NullPool, **_engine_kwargs(url))
    try:
        try:
            connection = engine.connect()
            connection.execute(sqlalchemy.text(take), {"key": key})
            connection.commit()  # a session-level lock: it outlives the transaction
        except OperationalError as e:
            raise _unreachable(url, e) from None
        try:
            yield
        finally:
            connection.close()  # ends the session, which releases the lock
    finally:
        engine.dispose()


def storage(url: str, heartbeat_s: Optional[int] = None, grace_s: Optional[int] = None, create: bool = True):
    """An ``RDBStorage`` (SQLite, PostgreSQL, MySQL) with the heartbeat and the retry callback.
    A missing driver or an unreachable server is a one-line UsageError."""
    from sqlalchemy.exc import OperationalError

    optuna = quiet_optuna()
    if not re.match(r"^(sqlite|postgresql|mysql)(\+\w+)?://", url):
        raise UsageError(f"--storage must be an sqlite:///, postgresql:// or mysql:// URL, got {masked(url)!r}")
    if url.startswith("sqlite:///"):
        db = Path(url[len("sqlite:///"):])
        if not create and not db.is_file():
            raise UsageError(f"no study at {db}; run `bash scripts/sweep.sh <exp> <optimizer>` first or pass --storage")
        db.parent.mkdir(parents=True, exist_ok=True)
    check_driver(url)
    retry, keyword = _retry_callback()
    kwargs = {}
    if heartbeat_s:
        kwargs = {"heartbeat_interval": int(heartbeat_s), "grace_period": int(grace_s or 3 * heartbeat_s),
                  keyword: retry}
    # Only a worker may create the tables; a reader (plot, export) opens an existing study, so it
    # takes no lock (for SQLite, a lock file it would leave beside a committed study.db).
    with creation_lock(url) if create else nullcontext():
        try:
            return optuna.storages.RDBStorage(engine_url(url), engine_kwargs=_engine_kwargs(url), **kwargs)
        except OperationalError as e:
            raise _unreachable(url, e) from None


def load_study(exp: Experiment, optimizer: str, url: Optional[str] = None, out_root: str | Path = "runs/sweeps"):
    """The existing study of ``exp`` x ``optimizer``; a one-line UsageError if there is none."""
    optuna = quiet_optuna()
    url = url or default_storage(exp, optimizer, out_root)
    name = study_name(exp, optimizer)
    try:
        return optuna.load_study(study_name=name, storage=storage(url, create=False))
    except KeyError:
        raise UsageError(f"no study named {name} in {masked(url)}; "
                         f"run `bash scripts/sweep.sh {exp.name} {optimizer}`") from None


def open_study(exp: Experiment, optimizer: str, space: dict[str, Range], seed: int, store, url: str, pruner):
    """Create (or load) the study of ``exp`` x ``optimizer`` in ``store``: refused when it was made
    with another search space; records the space, experiment, optimizer and trial seed."""
    optuna = quiet_optuna()
    recorded = {hp: [r.low, r.high, "log" if r.log else "uniform"] for hp, r in space.items()}
    # Under the lock, so that of workers started together one creates the study and records its
    # space, and every other one finds it and checks its own space against it.
    with creation_lock(url):
        study = optuna.create_study(study_name=study_name(exp, optimizer), storage=store, direction="minimize",
                                    load_if_exists=True, pruner=pruner)
        if study.user_attrs.get("space", recorded) != recorded:
            raise UsageError(f"study {study.study_name} in {masked(url)} was made with the search space "
                             f"{study.user_attrs['space']}, not {recorded}; use another --storage")
        for key, value in {"space": recorded, "experiment": exp.name, "optimizer": optimizer, "seed": seed}.items():
            if key not in study.user_attrs:
                study.set_user_attr(key, value)
    return study


def seed_sampler(study, sampler_seed: int, worker: int) -> int:
    """Give ``study`` a TPE sampler (constant liar, for parallel workers) seeded differently for
    every worker and every restart, reproducibly from the study's history; returns the seed."""
    optuna = quiet_optuna()
    tpe_seed = int(np.random.SeedSequence([sampler_seed, worker, len(study.trials)]).generate_state(1)[0])
    study.sampler = optuna.samplers.TPESampler(seed=tpe_seed, constant_liar=True)
    return tpe_seed


def finished(study) -> int:
    """The study's finished (complete or pruned) trials."""
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def running(study) -> int:
    """The study's running trials (other workers' ones, when a worker asks between its trials)."""
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))


def live_running(study, store) -> tuple[int, list[int]]:
    """The study's running trials whose worker is alive, and the numbers of the trials just retried:
    a trial whose worker is known dead (on this host its pid is gone; on any host its heartbeat is
    older than the grace period) is first marked FAIL and re-enqueued, so it is not counted as one
    that will finish."""
    from optuna.trial import TrialState

    optuna = quiet_optuna()  # fail_stale_trials is marked experimental
    retried = recover_dead_trials(study, store)
    before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    optuna.storages.fail_stale_trials(study)  # a no-op without a heartbeat
    retried += sorted(t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
                      if t.number in before)
    return running(study), retried


def retry(study, number: int) -> None:
    """Enqueue a retry of the FAILed trial ``number``: same hyperparameters and user attributes
    but ``WORKER_ATTRS`` (so the same run directory), with Optuna's retry bookkeeping (``retry_history``)."""
    frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
    if frozen.params:  # a trial stopped before it sampled anything has nothing to retry
        _retry_callback()[0](study, frozen)


def fail_and_retry(study, store, number: int) -> bool:
    """Mark the RUNNING trial ``number`` FAIL and enqueue its retry; False if another worker did it first."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    trial_id = store.get_trial_id_from_study_id_trial_number(store.get_study_id_from_name(study.study_name), number)
    try:
        if not store.set_trial_state_values(trial_id, state=TrialState.FAIL):
            return False
    except UpdateFinishedTrialError:
        return False
    retry(study, number)
    return True


def recover_dead_trials(study, store) -> list[int]:
    """RUNNING trials whose worker ran on this host and is gone: stop an orphaned run (it
    checkpoints), then fail and re-enqueue the trial. Other hosts' trials are left to the heartbeat."""
    from optuna.trial import TrialState

    host, recovered = socket.gethostname(), []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        a = t.user_attrs
        # A trial without a pid yet is being started (the host is set last): not a dead one.
        if a.get("host") != host or "pid" not in a or processes.alive(a.get("pid"), a.get("pid_start")):
            continue
        # The run checkpoints. Only a process proved to be that run (this user's, its recorded start
        # time, its run folder in its argv): anyone who can write to the study can plant a row.
        if isinstance(a.get("run_dir"), str) and a["run_dir"]:
            processes.stop_pid(a.get("child_pid"), a.get("child_start"), argument=a["run_dir"])
        if fail_and_retry(study, store, t.number):
            recovered.append(t.number)
    return recovered

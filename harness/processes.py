"""Child runs as subprocesses: start, stop, tell alive, read what went wrong.

Launch, sweeps and robustness scans run each training as ``python -m <exp>.train``
in a subprocess started by :func:`start`: in its own session (a terminal's Ctrl-C
reaches only the parent, whose ``signals.StopFlag`` forwards one SIGTERM: a second
SIGINT would make the run stop without its final checkpoint) and, on Linux, with
SIGTERM as its parent-death signal (a run never goes on orphaned: it checkpoints and
exits 75, and rerunning the parent's command resumes it).
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from .config import REPO

STOP_TIMEOUT_S = 600  # how long a run may take to checkpoint after SIGTERM before SIGKILL


def progress_bar(**kwargs):
    """The tqdm bar of a tool that runs child runs (launch, sweep, robustness), drawn only when
    stderr is a terminal: in a file or a pipe (nohup, a SLURM ``.out``) it would add a
    carriage-return frame at every update, and there the tool's one line per finished run
    (``bar.write``, which prints either way) is the record."""
    from tqdm.auto import tqdm

    on_terminal = getattr(sys.stderr, "isatty", lambda: False)()
    return tqdm(dynamic_ncols=True, **kwargs, **({} if on_terminal else {"disable": True}))


def _pdeathsig():
    """In the child, before exec: get SIGTERM when the parent dies."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl  # looked up now: the child must not allocate between fork and exec

        def preexec():
            prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
        return preexec
    return None


def start(cmd: Sequence[str], log: Path, env: Optional[dict] = None, note: Optional[str] = None) -> subprocess.Popen:
    """Start ``cmd`` from the current directory with the repo importable, its output appended
    to ``log`` after a ``note`` line (if any) and a ``$ <cmd>`` line; ``env`` adds to this
    process's environment. New session, parent-death signal: see the module docstring."""
    env = {**os.environ, **(env or {})}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        f.write("".join(f"{line}\n" for line in (note, f"$ {' '.join(cmd)}") if line is not None).encode())
        f.flush()
        return subprocess.Popen(list(cmd), stdout=f, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, preexec_fn=_pdeathsig())


def stop(proc: subprocess.Popen, timeout: float = STOP_TIMEOUT_S) -> int:
    """SIGTERM (a run checkpoints at its next step and exits 75), SIGKILL after ``timeout``
    seconds; returns the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


def stop_pid(pid, started, timeout: float = STOP_TIMEOUT_S, argument: Optional[str] = None) -> bool:
    """:func:`stop` for a process that is not our child, e.g. a run left behind by a dead sweep
    worker, known by its pid and start time as recorded when it started. Signals it only if
    :func:`own` proves it is that process (and, with ``argument``, that this is one of its
    command-line arguments, e.g. a run's ``--out`` folder): a pid read from a study or a file may
    be stale (reused) or planted by someone else. Returns whether it signalled."""
    if not own(pid, started, argument):
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.time() + timeout
    while own(pid, started) and time.time() < deadline:
        time.sleep(0.2)
    if own(pid, started):
        os.kill(pid, signal.SIGKILL)
    return True


def own(pid, started, argument: Optional[str] = None) -> bool:
    """Whether ``pid`` is a live process of this user whose start time is ``started`` (and, given
    ``argument``, whose argv holds it). False without a start time, without /proc, and for
    anything that is not a positive int pid: ``os.kill`` reads 0 and -1 as whole groups."""
    if type(pid) is not int or pid <= 0 or not started or not Path("/proc").is_dir():
        return False
    try:
        if os.stat(f"/proc/{pid}").st_uid != os.getuid():
            return False
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    except OSError:
        return False
    if argument is not None and os.fsencode(str(argument)) not in argv:
        return False
    return start_time(pid) == str(started)


def start_time(pid: int) -> Optional[str]:
    """A process's start time (clock ticks since boot, from /proc), which tells a pid apart
    from its reuse; None if it is gone, a zombie, or there is no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] == "Z" else fields[19]  # a zombie has exited


def alive(pid: Optional[int], started: Optional[str]) -> bool:
    """Whether process ``pid`` runs and, given its start time ``started``, is the same process."""
    if type(pid) is not int or pid <= 0:
        return False
    if Path("/proc").is_dir():
        now = start_time(pid)
        return now is not None and (started is None or now == started)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def last_line(log: Path) -> str:
    """What a run's log says went wrong: its last ``error:`` message, else its last line."""
    try:
        lines = [l for l in Path(log).read_text(errors="replace").splitlines() if l.strip()]
    except OSError:
        return ""
    errors = [l[len("error:"):] for l in lines if l.startswith("error:")]
    return (errors or lines or [""])[-1].strip()

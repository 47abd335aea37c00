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


def stop_pid(pid: int, started: Optional[str], timeout: float = STOP_TIMEOUT_S) -> None:
    """:func:`stop` for a process that is not our child (known by pid and start time), e.g. a
    run left behind by a dead sweep worker; nothing if it is gone."""
    if not alive(pid, started):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.time() + timeout
    while alive(pid, started) and time.time() < deadline:
        time.sleep(0.2)
    if alive(pid, started):
        os.kill(pid, signal.SIGKILL)


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
    if not pid:
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

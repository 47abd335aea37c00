"""Stop requests: SIGTERM (SLURM preemption, ``kill``), SIGUSR1 (SLURM's warning before a
time limit) and Ctrl-C become a flag that long-running work checks at safe points."""
from __future__ import annotations

import signal
import subprocess
from typing import Optional

EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: a run or sweep stopped on request; rerun the same command to resume


class Interrupted(Exception):
    """A run stopped on request after checkpointing; its command exits with ``EXIT_INTERRUPTED``
    (``harness.errors.command``)."""


class StopFlag:
    """``with StopFlag() as stop: ... if stop.flag: checkpoint and exit``.

    The signal is forwarded as SIGTERM to ``children`` (subprocesses that checkpoint
    and exit on their own) and to ``child``. A second Ctrl-C raises KeyboardInterrupt
    at once. Outside the main thread no handler can be installed and the flag stays down.
    """

    SIGNALS = tuple(s for s in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGUSR1", None)) if s is not None)

    def __init__(self):
        self.flag = False
        self.child: Optional[subprocess.Popen] = None
        self.children: list[subprocess.Popen] = []
        self._old = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.flag and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C means now
        self.flag = True
        for proc in [self.child, *self.children]:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)

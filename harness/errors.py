"""The one exception type for bad input a user can fix, and the one place that turns a
command's exceptions into exit statuses."""
from __future__ import annotations

import errno
import functools
import os
import sys
from typing import Callable

from .signals import EXIT_INTERRUPTED, Interrupted

EXIT_USAGE = 2  # bad input: the message says what to fix
DISK_FULL = "the disk is full; the last good copy is kept: free space and re-run the same command to resume"


class UsageError(Exception):
    """Bad input the user can fix: unknown key, bad value, missing dataset, ...

    The message is one line naming what is wrong and what is valid (or the
    command that fixes it). Library code raises it before anything in a run
    directory is written or changed; ``command`` prints ``error: <message>`` to
    stderr and returns exit status 2.
    """


class OtherRankFailed(UsageError):
    """Raised on the ranks of a multi-process run whose peer hit a ``UsageError`` (which that
    peer reports): ``command`` exits with status 2 without repeating the message."""


def command(main: Callable[..., int]) -> Callable[..., int]:
    """Wrap a command's ``main``: a ``UsageError`` becomes ``error: <message>`` on stderr and
    status 2, an ``Interrupted`` run status 75 (``EXIT_INTERRUPTED``: rerun to resume), a full
    disk a one-line error and status 2, a closed standard output (``... --list | head``) a quiet
    exit 0, as for any Unix filter. So library code raises, and never exits the process itself."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except UsageError as e:
            if not isinstance(e, OtherRankFailed):
                print(f"error: {e}", file=sys.stderr, flush=True)
            return EXIT_USAGE
        except Interrupted as e:
            print(f"{e}; re-run the same command to resume", file=sys.stderr, flush=True)
            return EXIT_INTERRUPTED
        except BrokenPipeError:
            # The reader went away: stop quietly, and keep Python's exit-time flush of stdout
            # from raising again (the recipe of the `signal` module's documentation).
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        except OSError as e:  # any other write on a full disk (a log, a figure, wandb's files)
            if e.errno != errno.ENOSPC:
                raise
            print(f"error: {f'{e.filename}: ' if e.filename else ''}{DISK_FULL}", file=sys.stderr, flush=True)
            return EXIT_USAGE

    return wrapped

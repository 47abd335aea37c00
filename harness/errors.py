"""The one exception type for bad input a user can fix."""


class UsageError(Exception):
    """Bad input the user can fix: unknown key, bad value, missing dataset, ...

    The message is one line naming what is wrong and what is valid (or the
    command that fixes it). Entry points catch it, print ``error: <message>``
    to stderr and exit with status 2, before anything in a run directory is
    written or changed.
    """

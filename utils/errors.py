"""Errors that reach the user as one line on stderr and exit code 2.

Raise :class:`UserError` (or a subclass) for anything the user can fix: a bad flag,
a missing dataset, a checkpoint that does not fit. Entry scripts wrap ``main`` with
:func:`utils.cli.run_main`, which prints ``error: <message>`` and exits 2 without a
traceback.
"""


class UserError(Exception):
    """A problem the user can fix; the message names the problem and the fix."""

    exit_code = 2


class DatasetError(UserError):
    """A dataset is missing, malformed or cannot be downloaded."""


class CheckpointError(UserError):
    """A checkpoint is unreadable, truncated, or does not fit the run."""


class ConfigError(UserError):
    """Flags that contradict each other or the data."""

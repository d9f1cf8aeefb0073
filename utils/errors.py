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


def user_message(err: UserError) -> str:
    """The message of ``err``; for one re-raised from a DataLoader worker (whose message then holds
    the worker's traceback), only the original message."""
    text = str(err)
    if "Original Traceback" in text:
        name, sep, message = text.rstrip().splitlines()[-1].partition(": ")
        if sep and name.split(".")[-1] == type(err).__name__:
            return message
    return text


class PeerError(UserError):
    """Another process of the group stopped with an error that is not a user error (it printed its
    traceback); this process stops with it."""

    exit_code = 1

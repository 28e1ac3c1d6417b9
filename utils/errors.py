"""Exceptions that speak to the user.

Everything raised for bad input derives from :class:`UserError`; every command
line entry point runs its body through :func:`run_command`, which prints such an
error as one or two ``error: ...`` lines (no traceback) and exits with code 2.
Programming errors keep their tracebacks.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class UserError(Exception):
    """Bad input from the user: a config value, a file, a checkpoint."""


class ConfigError(UserError):
    """The configuration is malformed or names something that does not exist."""


class DataError(UserError):
    """A data file or directory is missing, unreadable or inconsistent."""


class CheckpointError(UserError):
    """A checkpoint is missing, corrupt or does not fit the configured model."""


class TrainingError(UserError):
    """Training cannot go on (for example the loss became NaN)."""


def user_message(exc: UserError) -> str:
    """The error's own message, without the traceback text a DataLoader worker wraps around it."""
    message = str(exc)
    if "Original Traceback" not in message:
        return message
    # A worker's error arrives as "Caught DataError in DataLoader worker process 0.
    # Original Traceback ...: <type>: <message>"; keep the message.
    last = [line for line in message.splitlines() if line.strip()][-1]
    return last.split(": ", 1)[1] if last.startswith(f"{type(exc).__module__}.{type(exc).__name__}: ") else last


def run_command(body: Callable[..., int], *args: T, prefix: Callable[[], str] | None = None) -> int:
    """``body(*args)``'s exit code; a :class:`UserError` becomes ``error: ...`` on stderr and exit code 2.

    The one error tail of every command (``train.py``, ``inference.py``, ``tools/``)::

        def main(argv: list[str] | None = None) -> int:
            return run_command(run, parse_args(argv))

    ``prefix`` is asked when the error is printed (``train.py`` names the rank of a
    distributed run). Other exceptions, ``SystemExit`` of argparse included, pass through.
    """
    try:
        return body(*args)
    except UserError as exc:
        print(f"{prefix() if prefix is not None else ''}error: {user_message(exc)}", file=sys.stderr)
        return 2

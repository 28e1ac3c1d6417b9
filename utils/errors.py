"""Exceptions that speak to the user.

Everything raised for bad input derives from :class:`UserError`; the command
line entry points print such errors as one or two lines (no traceback) and exit
non-zero. Programming errors keep their tracebacks.
"""


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

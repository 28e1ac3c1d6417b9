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

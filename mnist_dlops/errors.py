"""The user's mistakes, by kind: the CLI turns each into one ``error:`` line and its exit status, no traceback.

Anything else (a ``ZeroDivisionError`` in our code, an ``OSError`` from inside a library) is a programming error
and stays a traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix; the message names the key, value or file and says what to do."""

    exit_code = 1


class ConfigError(UserError, ValueError):
    """A config value that parses but cannot be used (or may not be built); the message names the key and value."""

    exit_code = 2


class CheckpointError(UserError):
    """A checkpoint file that is missing or cannot be used; the message names the file and what to do."""

    exit_code = 2


class DataError(UserError, ValueError):
    """A data file or folder that cannot be used; the message names it and says what is wrong."""


class DivergedError(UserError):
    """Training produced a NaN or infinite loss or weights; it stopped before saving a diverged model."""

"""Errors a user can fix: the command line prints their one-line message and exits with status 2.

Every error class that signals bad input, misuse or a state on disk the user must act on derives
from :class:`UserError` (config errors, a corrupt checkpoint, a locked run directory, divergence,
...). Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the input or the files on disk, explained in one line with what to do."""

    def __str__(self) -> str:  # (KeyError-based subclasses would quote their message)
        return str(self.args[0]) if self.args else ""


class RunDirError(UserError, FileExistsError):
    """A run directory cannot be used as asked (finished, partial without --resume, locked, ...)."""


class CheckpointError(UserError):
    """A checkpoint is unreadable, corrupt or belongs to another run; the message names the file."""


class AdapterFileError(UserError, ValueError):
    """A saved adapter does not fit the model, or its files are unreadable; names the layer or file."""


class DivergenceError(UserError, ArithmeticError):
    """Training produced a non-finite loss or non-finite weights; the last good checkpoint is kept."""


class ConfigDeprecationWarning(FutureWarning):
    """A config key or value that is still read for compatibility and should be removed or changed
    (a warning, not an error: the run goes on)."""

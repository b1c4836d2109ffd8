"""Errors in what the user asked for, which ``asft`` prints as one line instead of a traceback.

Every error that asft-lightning raises for bad input (a path that does not exist, a malformed file, an argument
out of range, inputs that do not fit each other) derives from :class:`AsftError`; its message names the argument
or file and says what to do. The ``asft`` command prints such an error as ``asft <command>: error: <message>`` on
stderr and exits with status 2; anything else is a bug and keeps its traceback (``asft --debug`` or
``ASFT_DEBUG=1`` shows the traceback of user errors too).

Each class also derives from the built-in exception it replaces (``ValueError``, ``FileNotFoundError``, ...), so
code that catches those keeps working. The errors of one subject live beside it and derive from here:
:class:`~asft_lightning.checkpoints.CheckpointError`, :class:`~asft_lightning.direction.DirectionError`,
:class:`~asft_lightning.metrics.JudgeError`, :class:`~asft_lightning.safelora.SafeLoRAError`,
:class:`~asft_lightning.demo.WorldError`, ...
"""

from __future__ import annotations

__all__ = ["AsftError", "ArgumentError", "DataError", "InputNotFoundError", "OutputExistsError", "SetupError"]


class AsftError(Exception):
    """Base of the errors caused by the user's input; the message says what to change."""


class ArgumentError(AsftError, ValueError):
    """An argument, or a combination of arguments, that cannot work; the message names it and the valid range."""


class DataError(AsftError, ValueError):
    """A data file that cannot be used: unreadable, empty, missing a column, too few rows."""


class InputNotFoundError(AsftError, FileNotFoundError):
    """A file or directory named by an argument does not exist."""


class OutputExistsError(AsftError, FileExistsError):
    """The output would replace something that is there already (and overwriting was not asked for)."""


class SetupError(AsftError, TypeError):
    """Pieces that do not work together, e.g. a callback on a LightningModule without a PEFT model."""

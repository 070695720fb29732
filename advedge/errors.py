"""Errors that the CLI turns into one clear line and a documented exit code.

Exit codes: 0 ok, 1 runtime failure, 2 usage error, 3 missing optional dependency.
"""

from __future__ import annotations

import difflib
import errno
import os
from collections.abc import Iterable

__all__ = [
    "AdvedgeError",
    "CheckpointError",
    "DataError",
    "ExportError",
    "MissingDependencyError",
    "UsageError",
    "did_you_mean",
    "os_error",
]


class AdvedgeError(Exception):
    """Base class of every error advedge reports to a user.

    Args:
        message: What went wrong, in one line.
        hint: What to do about it, in one line (optional).
    """

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class UsageError(AdvedgeError, ValueError):
    """A bad option value or name: exit code 2."""

    exit_code = 2


class DataError(AdvedgeError):
    """A dataset that is missing, empty, of unknown format or invalid: exit code 1."""


class CheckpointError(AdvedgeError):
    """A checkpoint that is missing, corrupt, unsafe or of another architecture: exit code 1."""


class ExportError(AdvedgeError):
    """An export, calibration or engine build that failed or was refused: exit code 1.

    Parity failures, ONNX files that fail the checker, unsafe external-data paths, calibration
    sets that do not fit the model and engines built for another TensorRT or GPU land here.
    """


class MissingDependencyError(AdvedgeError, ImportError):
    """An optional dependency that is not installed: exit code 3."""

    exit_code = 3


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return a hint naming the closest matches of ``name`` in ``choices``.

    Example: ``did_you_mean("resnet81", ["resnet18", "wrn34_10"])`` returns
    ``"did you mean 'resnet18'?"``; with no close match it lists the choices.
    """
    choices = sorted(choices)
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
    if close:
        return "did you mean " + " or ".join(repr(c) for c in close) + "?"
    return "choose one of: " + ", ".join(choices)


# errno -> (what it means to a user, what to do about it)
_OS_REASONS = {
    errno.ENOSPC: ("the disk is full", "free space or choose another --out"),
    errno.EDQUOT: ("the disk quota is exceeded", "free space or choose another --out"),
    errno.EACCES: ("permission denied", "check the path's permissions"),
    errno.EPERM: ("permission denied", "check the path's permissions"),
    errno.EROFS: ("the file system is read-only", "choose a writable --out"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "check the path"),
    errno.EISDIR: ("it is a folder, not a file", "check the path"),
    errno.ENOENT: ("no such file or folder", "check the path"),
    errno.ENAMETOOLONG: ("the name is too long", "choose a shorter path"),
    errno.EMFILE: ("too many open files", "raise the open-file limit (ulimit -n)"),
}


def os_error(exc: OSError, path: object = None, action: str = "write") -> AdvedgeError:
    """One named error for an ``OSError``: ``cannot write PATH: the disk is full``.

    Args:
        exc: The operating-system error.
        path: The file or folder concerned (default: the one the error names).
        action: ``write`` or ``read``.

    Returns:
        An :class:`AdvedgeError` (exit code 1) whose message names the path and the reason.
    """
    where = path if path is not None else (exc.filename or "a file")
    reason, hint = _OS_REASONS.get(
        exc.errno or -1, ((exc.strerror or str(exc)).lower(), "check the path")
    )
    if isinstance(where, os.PathLike):
        where = os.fspath(where)
    return AdvedgeError(f"cannot {action} {where}: {reason}", hint)

"""Helpers for the one-line error messages of the data package."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from advedge.errors import DataError, os_error

__all__ = ["describe", "one_line", "read_error"]


def describe(value: object) -> str:
    """Say what ``value`` is, for an error message: an array's dtype and shape, else its type."""
    if isinstance(value, np.ndarray):
        return f"{value.dtype} array of shape {value.shape}"
    return type(value).__name__


def one_line(value: object) -> str:
    """``str(value)`` on one line (whitespace runs collapsed), or its type name if empty."""
    return " ".join(str(value).split()) or type(value).__name__


def read_error(exc: OSError, path: Path) -> DataError:
    """One line for an ``OSError`` met while reading ``path`` (or the file the error names)."""
    err = os_error(exc, exc.filename or path, action="read")
    return DataError(err.message, err.hint)

"""``python -m advedge.cli``: the same as the ``advedge`` console script."""

from advedge.cli import _entry

_entry()

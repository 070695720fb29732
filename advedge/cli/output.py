"""The CLI's one output sink.

With ``--json``, stdout carries exactly one JSON document and nothing else; logs, progress bars
and tables go to stderr. Without it, result tables go to stdout. Errors are one line on stderr.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

from advedge.errors import UsageError
from advedge.utils import to_jsonable

__all__ = [
    "Output",
    "is_quiet",
    "metrics_table",
    "percent",
    "report_training",
    "set_verbosity",
    "setup_logging",
]


def setup_logging() -> None:
    """Route advedge's loggers to stderr, at the level of ``ADVEDGE_LOG_LEVEL`` (INFO by
    default); ``advedge --quiet``/``--verbose`` then change it (:func:`set_verbosity`)."""
    level = os.environ.get("ADVEDGE_LOG_LEVEL", "INFO").upper()
    root = logging.getLogger("advedge")
    root.setLevel(getattr(logging, level, logging.INFO))  # each run starts from the default
    if any(isinstance(h, RichHandler) for h in root.handlers):
        return
    handler = RichHandler(
        console=Console(stderr=True), show_time=False, show_path=False, markup=False
    )
    handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(handler)
    root.propagate = False


def set_verbosity(*, quiet: bool, verbose: bool) -> None:
    """``--quiet``: warnings and errors only (no progress, no status lines); ``--verbose``: the
    debug messages too. Neither: the level :func:`setup_logging` set.

    Raises:
        UsageError: both given.
    """
    if quiet and verbose:
        raise UsageError("--quiet and --verbose exclude each other")
    if quiet or verbose:
        logging.getLogger("advedge").setLevel(logging.WARNING if quiet else logging.DEBUG)


def is_quiet() -> bool:
    """Whether routine messages (INFO: status lines, progress) are hidden (``--quiet``)."""
    return not logging.getLogger("advedge").isEnabledFor(logging.INFO)


def percent(value: float | None) -> str:
    """An accuracy (a fraction) as a human table shows it: percent with one decimal, ``45.5``
    (the column header carries the ``%``); nothing for None. JSON keeps the fraction."""
    return "" if value is None else f"{100 * value:.1f}"


class Output:
    """Where a command's results and messages go.

    Args:
        json_mode: When true, :meth:`result` writes JSON to stdout and everything else goes to
            stderr.
    """

    def __init__(self, json_mode: bool = False) -> None:
        self.json_mode = json_mode
        self.err = Console(stderr=True)
        self.out = Console(stderr=json_mode) if not json_mode else self.err

    def result(self, data: dict[str, Any], *, human: Any = None) -> None:
        """Emit a command's result: JSON on stdout with ``--json``, else ``human`` (a rich
        renderable) on stdout."""
        if self.json_mode:
            sys.stdout.write(json.dumps(to_jsonable(data), indent=2) + "\n")
            sys.stdout.flush()
        elif human is not None:
            self.out.print(human)

    def warn(self, message: str) -> None:
        """A warning on stderr, shown even with ``--quiet``."""
        self.err.print(f"[bold yellow]warning[/]: {escape(message)}", highlight=False)

    def info(self, message: str) -> None:
        """A human status message on stderr (hidden by ``--quiet``)."""
        if not is_quiet():
            self.err.print(message, highlight=False)


def metrics_table(title: str, metrics: list[dict[str, Any]]) -> Table:
    """The per-epoch metrics rows of a training run as a table (columns of the last row);
    accuracies (``*_acc``) in percent, under a header such as ``test clean %``."""
    columns = list(metrics[-1]) if metrics else []
    headers = [
        f"{k.removesuffix('_acc').replace('_', ' ')} %" if k.endswith("_acc") else k
        for k in columns
    ]
    table = Table(*headers, title=title)
    for row in metrics:
        table.add_row(
            *[percent(row.get(k)) if k.endswith("_acc") else str(row.get(k, "")) for k in columns]
        )
    return table


def report_training(
    output: Output, result: Any, *, schema: str, title: str, epochs: int, fields: dict[str, Any]
) -> None:
    """The result of ``train``, ``distill`` or ``purifier train``: the run's JSON document
    (``fields`` after ``schema`` and ``out``) or its metrics table titled ``title → out``."""
    payload = {
        "schema": schema,
        "out": str(result.out),
        **fields,
        "epochs": epochs,
        "resumed_from_epoch": result.resumed_from,
        "final": result.metrics[-1] if result.metrics else {},
        "metrics": result.metrics,
    }
    output.result(payload, human=metrics_table(f"{title} → {result.out}", result.metrics))

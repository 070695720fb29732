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
from rich.table import Table

from advedge.utils import to_jsonable

__all__ = ["Output", "metrics_table", "report_training", "setup_logging"]


def setup_logging() -> None:
    """Route advedge's loggers to stderr (level from ``ADVEDGE_LOG_LEVEL``, INFO by default)."""
    level = os.environ.get("ADVEDGE_LOG_LEVEL", "INFO").upper()
    root = logging.getLogger("advedge")
    if any(isinstance(h, RichHandler) for h in root.handlers):
        return
    handler = RichHandler(
        console=Console(stderr=True), show_time=False, show_path=False, markup=False
    )
    handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(handler)
    root.setLevel(getattr(logging, level, logging.INFO))
    root.propagate = False


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

    def info(self, message: str) -> None:
        """A human message on stderr."""
        self.err.print(message, highlight=False)


def metrics_table(title: str, metrics: list[dict[str, Any]]) -> Table:
    """The per-epoch metrics rows of a training run as a table (columns of the last row)."""
    columns = list(metrics[-1]) if metrics else []
    table = Table(*columns, title=title)
    for row in metrics:
        table.add_row(*[str(row.get(k, "")) for k in columns])
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

"""``advedge`` command line: a thin layer over the Python API.

Exit codes: 0 ok, 1 runtime failure, 2 usage error, 3 missing optional dependency, 130
interrupted. Errors are one line on stderr; ``ADVEDGE_DEBUG=1`` shows the traceback.

Modules: :mod:`~advedge.cli.app` (the app, :func:`main`, errors to exit codes),
:mod:`~advedge.cli.options` (options declared once, ``--config``), :mod:`~advedge.cli.progress`
(progress bars), :mod:`~advedge.cli.output` (stdout/stderr, ``--json``), and one module per
command group: ``models``, ``train`` (train, distill), ``purifier``, ``evaluate``, ``export``
(export, calibrate), ``bench`` (bench, report), ``pipeline``.
"""

from __future__ import annotations

from advedge.cli.app import app, console_main, main

__all__ = ["app", "console_main", "main"]

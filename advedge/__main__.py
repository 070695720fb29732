"""``python -m advedge``: the same as the ``advedge`` console script."""

from advedge.cli import console_main

console_main()

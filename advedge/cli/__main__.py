"""``python -m advedge.cli``: the same as the ``advedge`` console script."""

from advedge.cli.app import console_main

console_main()

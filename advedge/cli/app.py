"""The ``advedge`` typer app: its commands, and :func:`main`, which maps errors to one line on
stderr and an exit code (0 ok, 1 runtime failure, 2 usage error, 3 missing optional dependency,
130 interrupted)."""

from __future__ import annotations

import errno
import os
import sys
import traceback
from typing import Annotated, Any

import typer

from advedge import __version__
from advedge.cli.bench import bench_cmd, report_cmd
from advedge.cli.doctor import doctor_cmd
from advedge.cli.evaluate import eval_cmd
from advedge.cli.export import calibrate_cmd, export_cmd
from advedge.cli.models import methods_cmd, models_cmd
from advedge.cli.options import RegistryHelpCommand, RegistryHelpGroup, click
from advedge.cli.output import set_verbosity, setup_logging
from advedge.cli.pipeline import pipeline_cmd
from advedge.cli.purifier import purifier_train_cmd
from advedge.cli.qat import qat_cmd
from advedge.cli.train import distill_cmd, train_cmd
from advedge.errors import AdvedgeError, os_error

__all__ = ["app", "console_main", "main"]

app = typer.Typer(
    name="advedge",
    help="Robust small image classifiers, from adversarial training to edge GPUs.",
    cls=RegistryHelpGroup,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
purifier_app = typer.Typer(
    cls=RegistryHelpGroup,
    help="Train input purifiers (IPCM, APE-GAN, HGD) to put in front of a classifier.",
    no_args_is_help=True,
)

# The commands in the order `advedge --help` lists them.
for _name, _func in (
    ("models", models_cmd),
    ("methods", methods_cmd),
    ("train", train_cmd),
    ("distill", distill_cmd),
    ("eval", eval_cmd),
    ("export", export_cmd),
    ("calibrate", calibrate_cmd),
    ("qat", qat_cmd),
    ("bench", bench_cmd),
    ("report", report_cmd),
    ("pipeline", pipeline_cmd),
    ("doctor", doctor_cmd),
):
    app.command(_name, cls=RegistryHelpCommand)(_func)
purifier_app.command("train", cls=RegistryHelpCommand)(purifier_train_cmd)
app.add_typer(purifier_app, name="purifier")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"advedge {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
    quiet: Annotated[
        bool,
        typer.Option(
            "--quiet", "-q", help="Warnings and errors only: no progress or status lines."
        ),
    ] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Also the debug messages.")
    ] = False,
) -> None:
    """advedge: robust training, distillation, evaluation and edge deployment."""
    set_verbosity(quiet=quiet, verbose=verbose)


def main(argv: list[str] | None = None) -> int:
    """Run the app on ``argv`` (default: ``sys.argv[1:]``); errors become one line on stderr.

    Returns:
        The exit code.
    """
    setup_logging()
    try:
        rv = app(args=argv, standalone_mode=False, prog_name="advedge")
        if rv == 130:  # typer turns Ctrl-C into an exit code of 130
            raise KeyboardInterrupt
        if isinstance(rv, int) and rv:
            return rv
    except typer.Exit as exc:
        return int(exc.exit_code or 0)
    except click.exceptions.ClickException as exc:
        return _click_error(exc)
    except (KeyboardInterrupt, typer.Abort):
        _fail(
            "interrupted: finished work (epochs, evaluated batches) is saved; rerun with --resume"
        )
        return 130
    except Exception as exc:
        return _failure(exc)
    return 0


def console_main() -> None:
    """The ``advedge`` console script and ``python -m advedge``: exit with :func:`main`'s code."""
    sys.exit(main())


def _fail(message: str) -> None:
    sys.stderr.write(message.replace("\n", " ") + "\n")
    sys.stderr.flush()


#: The app's own options, which go before the command (``advedge --quiet pipeline ...``).
_GLOBAL_OPTIONS = ("--quiet", "-q", "--verbose", "-v")


def _click_error(exc: Any) -> int:
    """click's own errors: bare ``advedge``/``advedge train`` shows help; usage errors are one
    line naming the command's ``--help``, exit 2."""
    if type(exc).__name__ == "NoArgsIsHelpError":  # bare `advedge` or `advedge train`
        sys.stderr.write(exc.format_message() + "\n")
        return 2
    if getattr(exc, "option_name", None) in _GLOBAL_OPTIONS and _command(exc):
        command = _command(exc).strip()
        option = exc.option_name
        _fail(f"error: {option} goes before the command: advedge {option} {command} ...")
        return 2
    if isinstance(exc, click.exceptions.UsageError):
        _fail(f"error: {exc.format_message()} (see advedge {_command(exc)}--help)")
        return 2
    _fail(f"error: {exc.format_message()}")
    return int(exc.exit_code)


def _failure(exc: Exception) -> int:
    """A command's failure: one line (``ADVEDGE_DEBUG=1`` adds the traceback) and its code."""
    if os.environ.get("ADVEDGE_DEBUG", "") not in ("", "0"):
        traceback.print_exc()
    if isinstance(exc, AdvedgeError):
        _fail(f"error: {exc}")
        return exc.exit_code
    if isinstance(exc, OSError):  # a path the command could not read or write: name it
        # ``read`` for errors that can only come from reading (a missing file), else ``write``
        action = "read" if exc.errno in (errno.ENOENT, errno.EISDIR) else "write"
        _fail(f"error: {os_error(exc, action=action)}")
        return 1
    _fail(f"error: unexpected {type(exc).__name__}: {exc} (set ADVEDGE_DEBUG=1 for the traceback)")
    return 1


def _command(exc: Any) -> str:
    ctx = exc.ctx
    if ctx is not None and ctx.info_name and ctx.info_name != "advedge":
        return f"{ctx.info_name} "
    return ""

"""Options declared once, shared by the commands, and the parsing of option values.

- Option aliases (typer ``Annotated`` types): one declaration per option, reused by ``train``,
  ``distill``, ``purifier train``, ``eval`` and the deploy commands. A command gives the
  default (or none, for a required option) in its signature.
- Help text that lists the library's registries (training, distillation, purifier and
  calibration methods, runner backends, export precisions) is written with a placeholder such as
  ``{training_methods}`` and filled in by :class:`RegistryHelpCommand` when the help is shown, so
  running a command never imports torch just for its help text.
- ``--config FILE.yaml``: :data:`ConfigDefaults` makes the file's keys the command's defaults;
  options given on the command line win (``train`` reads its file as a ``TrainConfig``, see
  :func:`merge_given`).
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from typer.core import TyperCommand, TyperGroup

from advedge.errors import UsageError, did_you_mean

__all__ = [
    "AttackBN",
    "BatchSize",
    "CacheDir",
    "ConfigDefaults",
    "ConfigFile",
    "Data",
    "Device",
    "Epochs",
    "EvalN",
    "JsonOpt",
    "MethodBatchSize",
    "MethodEpochs",
    "MethodLr",
    "MethodSteps",
    "Norm",
    "PeakLr",
    "RegistryHelpCommand",
    "RegistryHelpGroup",
    "Resume",
    "RunDir",
    "Schedule",
    "Seed",
    "SelectionSeed",
    "Subset",
    "WeightDecay",
    "choices",
    "click",
    "int_list",
    "merge_given",
    "params",
    "parse_eps_r",
    "parse_model_args",
    "run_options",
]


def _click_module() -> Any:
    """The click that typer raises from: recent typer vendors it as ``typer._click``."""
    try:
        from typer import _click

        return _click
    except ImportError:  # older typer depends on the click package itself
        import click

        return click


click = _click_module()
F = TypeVar("F", bound=Callable[..., Any])


# ------------------------------------------------------------------ help from the registries
def _names(module: str, attribute: str) -> Callable[[], list[str]]:
    """The names of the registry ``module.attribute``, imported when asked for."""

    def names() -> list[str]:
        import importlib

        return list(getattr(importlib.import_module(module), attribute))

    return names


#: The registries an option's help or choices may name, as ``{name}``.
_REGISTRIES: dict[str, Callable[[], list[str]]] = {
    "models": _names("advedge.models.registry", "MODELS"),
    "training_methods": _names("advedge.training.objectives", "TRAINING_METHODS"),
    "distill_methods": _names("advedge.training.distillation", "DISTILL_METHODS"),
    "purifier_methods": _names("advedge.purifier.train", "PURIFIER_METHODS"),
    "calibration_methods": _names("advedge.calibration", "CALIBRATION_METHODS"),
    "backends": _names("advedge.export.runtime", "BACKENDS"),
    "precisions": _names("advedge.export.precisions", "PRECISIONS"),
    "attacks": _names("advedge.attacks", "ATTACKS"),
    "suites": _names("advedge.evaluation.suites", "SUITES"),
}


def _precisions() -> Iterable[str]:
    from advedge.export.precisions import PRECISIONS

    return [f"{n} ({p.note})" if p.note else n for n, p in PRECISIONS.items()]


def _default_attacks() -> str:
    from advedge.evaluation import DEFAULT_ATTACKS

    return ",".join(DEFAULT_ATTACKS)


def _one_of(names: Iterable[str]) -> str:
    """``a, b or c``."""
    names = list(names)
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


_HELP_LISTS: dict[str, Callable[[], str]] = {
    **{key: (lambda names=names: _one_of(names())) for key, names in _REGISTRIES.items()},
    "precisions": lambda: _one_of(_precisions()),
    "default_attacks": _default_attacks,
}
_PLACEHOLDER = re.compile(r"\{(" + "|".join(_HELP_LISTS) + r")\}")
_CHOICE_PLACEHOLDER = re.compile(r"\{(" + "|".join(_REGISTRIES) + r")\}")


def choices(*values: str) -> str:
    """The metavar of an option that takes one of a fixed set of values: ``[a|b|c]``, as
    click's ``Choice`` shows it in the help.

    A value in braces (``"{backends}"``) stands for the names of that registry, filled in when
    the help is shown (the registries live in modules that import torch). The option's value is
    still checked by the library, with a close-match suggestion.
    """
    return "[" + "|".join(values) + "]"


def _fill_help(command: Any, ctx: Any) -> None:
    """Fill in a command's registry names, once, before its help is shown.

    - help texts: ``{training_methods}`` becomes ``natural, pgd-at, trades or fgsm-rs``, and the
      text is escaped for rich, which would otherwise take a bracketed ``[default: ...]`` for a
      tag and drop it;
    - metavars made by :func:`choices`: ``[{backends}]`` becomes ``[torch|onnxruntime|...]``;
    - flags (``--json``, ``--resume/--no-resume``) take no value, so they show no metavar
      (typer would show ``<bool>``).
    """
    from rich.markup import escape

    if getattr(command, "_help_filled", False):
        return
    for param in command.get_params(ctx):
        text = getattr(param, "help", None)
        if text:
            param.help = escape(_PLACEHOLDER.sub(lambda m: _HELP_LISTS[m.group(1)](), text))
        if param.metavar:
            param.metavar = _wrap_choices(
                _CHOICE_PLACEHOLDER.sub(
                    lambda m: "|".join(_REGISTRIES[m.group(1)]()), param.metavar
                )
            )
        elif getattr(param, "is_flag", False):
            param.metavar = ""
    command._help_filled = True


def _wrap_choices(metavar: str, width: int = 16) -> str:
    """A long ``[a|b|c|...]`` broken into lines after a ``|`` (rich would break it anywhere)."""
    lines = [""]
    for part in re.findall(r"[^|]+\|?|\|", metavar):
        if lines[-1] and len(lines[-1]) + len(part) > width:
            lines.append("")
        lines[-1] += part
    return "\n".join(lines)


class RegistryHelpCommand(TyperCommand):
    """A command whose option help may name a registry, e.g. ``"{training_methods}."``, and
    whose options' choices may come from one (:func:`choices`); see :func:`_fill_help`.

    The names are filled in when the help is shown: a command that does not need torch must
    not load it for its help text.
    """

    def format_help(self, ctx: Any, formatter: Any) -> None:
        _fill_help(self, ctx)
        super().format_help(ctx, formatter)


class RegistryHelpGroup(TyperGroup):
    """A command group (``advedge``, ``advedge purifier``) whose help is filled in the same way
    (its flags show no metavar)."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        _fill_help(self, ctx)
        super().format_help(ctx, formatter)


# ----------------------------------------------------------------------- shared options
JsonOpt = Annotated[bool, typer.Option("--json", help="Write only the result JSON to stdout.")]
Data = Annotated[str, typer.Option(help="Dataset directory, or cifar10, cifar100 or mnist.")]
Epochs = Annotated[int, typer.Option(help="Number of epochs.")]
RunDir = Annotated[Path, typer.Option(help="Run directory to write.")]
BatchSize = Annotated[int, typer.Option(help="Global batch size.")]
PeakLr = Annotated[float, typer.Option(help="Peak learning rate.")]
_OFFICIAL = " [default: the method's published value, see `advedge methods`]"
MethodEpochs = Annotated[int | None, typer.Option(help="Number of epochs." + _OFFICIAL)]
MethodBatchSize = Annotated[int | None, typer.Option(help="Global batch size." + _OFFICIAL)]
MethodLr = Annotated[float | None, typer.Option(help="Peak learning rate." + _OFFICIAL)]
MethodSteps = Annotated[int | None, typer.Option(help="Inner-attack steps." + _OFFICIAL)]
WeightDecay = Annotated[float | None, typer.Option(help="Weight decay." + _OFFICIAL)]
Schedule = Annotated[
    str | None,
    typer.Option(
        help="Learning-rate schedule." + _OFFICIAL,
        metavar=choices("cosine", "multistep", "constant"),
    ),
]
AttackBN = Annotated[
    str | None,
    typer.Option(
        help="Batch-norm mode of the model inside the inner attack." + _OFFICIAL,
        metavar=choices("eval", "train"),
    ),
]
Norm = Annotated[str, typer.Option(help="The threat model's norm.", metavar=choices("Linf", "L2"))]
Subset = Annotated[int | None, typer.Option(help="Stratified sample of N images.")]
Seed = Annotated[int, typer.Option(help="Random seed.")]
SelectionSeed = Annotated[int, typer.Option(help="Seed of image selection and attacks.")]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
EvalN = Annotated[int, typer.Option(help="Held-out images scored each epoch.")]
Resume = Annotated[bool, typer.Option(help="Continue the run in --out.")]
# INT8 calibration of a PTQ export (advedge export --precision int8, advedge qat's start).
CalibN = Annotated[int, typer.Option(help="INT8 calibration images (stratified).")]
CalibMethod = Annotated[
    str,
    typer.Option(
        help="How INT8 activation ranges are chosen.", metavar=choices("{calibration_methods}")
    ),
]
CalibMixAdv = Annotated[
    float,
    typer.Option(
        help="Fraction of INT8 calibration images made adversarial (PGD on the FP32 model)."
    ),
]
CacheDir = Annotated[
    Path | None, typer.Option(help="Calibration-range cache [default: ~/.cache/advedge].")
]
_CONFIG_HELP = "YAML file of options; flags override it."
ConfigFile = Annotated[Path | None, typer.Option(help=_CONFIG_HELP)]

# Options that are not run settings: never read from a --config file.
_NOT_CONFIG = frozenset({"config", "json_out", "resume", "help"})


def _value_type(param: Any) -> Any:
    """``int``, ``float``, ``bool`` or ``str`` (for text and paths): what an option takes."""
    described = getattr(param, "type_descriptor", None)  # newer typer keeps the annotation
    if described is not None:
        kind = described.annotation
    else:
        kind = {click.INT: int, click.FLOAT: float, click.BOOL: bool}.get(param.type, str)
    return kind if kind in (int, float, bool) else str


def _config_defaults(ctx: typer.Context, value: Path | None) -> Path | None:
    """``--config``: the file's keys (option names, dashes or underscores) become defaults.

    Eager, so it runs before the other options are read: a value given on the command line
    wins, and a required option may come from the file. Values are checked against the
    option's type (``config key 'epochs' must be an integer, got True``).
    """
    if value is None:
        return None
    from advedge.config import check_value, load_yaml

    options = {p.name: p for p in ctx.command.params if p.name not in _NOT_CONFIG}
    defaults: dict[str, Any] = {}
    for key, raw in load_yaml(value).items():
        name = str(key).replace("-", "_")
        if name not in options:
            raise UsageError(f"unknown config key {str(key)!r}", did_you_mean(name, options))
        param = options[name]
        hint = _value_type(param)
        if hint is str and isinstance(raw, (int, float)) and not isinstance(raw, bool):
            raw = str(raw)  # eps: 0.03 is as good as eps: "0.03"
        label = f"config key {name!r}"
        optional = not param.required and param.default is None
        defaults[name] = check_value(hint | None if optional else hint, raw, label)
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


ConfigDefaults = Annotated[
    Path | None, typer.Option(help=_CONFIG_HELP, callback=_config_defaults, is_eager=True)
]

# The run options of distill and purifier train, in their help order: (name, type, default).
_RUN_OPTIONS: tuple[tuple[str, Any, Any], ...] = (
    ("subset", Subset, None),
    ("seed", Seed, 0),
    ("device", Device, "auto"),
    ("eval_n", EvalN, 256),
    ("config", ConfigDefaults, None),
    ("resume", Resume, False),
    ("json_out", JsonOpt, False),
)


def run_options(func: F) -> F:
    """Append the run options (``--subset --seed --device --eval-n --config --resume --json``)
    to the options of ``func``, which takes them as keyword arguments (``**run``)."""
    sig = inspect.signature(func, eval_str=True)
    own = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    added = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=kind, default=default)
        for name, kind, default in _RUN_OPTIONS
    ]
    func.__signature__ = sig.replace(parameters=[*own, *added])  # type: ignore[attr-defined]
    return func


def merge_given(ctx: typer.Context, options: dict[str, Any], skip: Iterable[str]) -> None:
    """Put the command's option values into ``options`` (``train``'s ``--config`` mapping).

    An option given on the command line wins over the file; a default fills only keys the file
    leaves out. ``skip`` names the parameters that are not settings of the run.
    """
    skipped = set(skip)
    for key, value in ctx.params.items():
        if key in skipped:
            continue
        source = ctx.get_parameter_source(key)
        if key not in options or source not in (click.core.ParameterSource.DEFAULT, None):
            options[key] = value


# ------------------------------------------------------------------------ option values
def params(ctx: typer.Context, *, drop: Iterable[str] = (), **replace: Any) -> dict[str, Any]:
    """The command's option values by parameter name, less ``--json`` and ``drop``, updated by
    ``replace`` (for values that need converting, e.g. ``out=str(out)``)."""
    dropped = {"json_out", *drop}
    return {**{k: v for k, v in ctx.params.items() if k not in dropped}, **replace}


def parse_model_args(items: list[str] | None) -> dict[str, Any]:
    """``["width_mult=0.5", "pretrained=false"]`` -> ``{"width_mult": 0.5, "pretrained": False}``.

    Values are read as YAML scalars by advedge's safe loader (no tags such as ``!!python``, no
    aliases); only an int, a finite float, a bool or a string is accepted.
    """
    import yaml

    from advedge.config import parse_yaml

    def shown(obj: object) -> str:
        text = repr(obj)
        return text if len(text) <= 60 else text[:57] + "..."

    parsed: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise UsageError(f"--model-arg expects key=value, got {shown(item)}")
        key, text = item.split("=", 1)
        key = key.strip()
        if not key.isidentifier():
            raise UsageError(
                f"--model-arg {shown(item)}: the key must be an argument name, got {shown(key)}"
            )
        try:
            value = parse_yaml(text)
        except (yaml.YAMLError, ValueError, RecursionError):
            raise UsageError(
                f"--model-arg {shown(item)}: the value is not a plain number, true/false or text"
            ) from None
        ok = isinstance(value, (bool, int, str)) or (
            isinstance(value, float) and math.isfinite(value)
        )
        if not ok:
            raise UsageError(
                f"--model-arg {shown(item)}: the value must be a finite number, true/false or "
                f"text, got {shown(value)}"
            )
        parsed[key] = value
    return parsed


def parse_eps_r(text: str) -> float:
    """``--eps-r``: a fraction or decimal > 0 (a clear error for 0 or negatives)."""
    from advedge.utils import parse_eps

    try:
        value = float(text)
    except ValueError:
        value = None
    if value is not None and value <= 0:
        raise UsageError(f"--eps-r must be > 0, got {text}")
    return parse_eps(text, name="--eps-r")


def int_list(text: str, what: str) -> list[int]:
    """``"1,8,32"`` -> ``[1, 8, 32]``; ``what`` names the option in errors."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise UsageError(f"{what} is empty")
    return values

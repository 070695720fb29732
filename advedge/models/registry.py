"""Models by name: the ``@register_model`` decorator and the ``create_model`` factory.

A model factory is a function that takes the four common arguments as keywords
(``num_classes``, ``in_channels``, ``mean``, ``std``) plus its own architecture arguments, each
with a default, and returns an :class:`~advedge.models.base.ImageClassifier`. The first line of
its docstring is the description that ``advedge models`` shows.

``create_model`` validates every argument, fills in the defaults and records the name and the
complete arguments on the model (``model.arch``, ``model.arch_kwargs``), so that a checkpoint
can rebuild the architecture with ``create_model(model.arch, **model.arch_kwargs)``.
"""

from __future__ import annotations

import copy
import functools
import inspect
import itertools
import json
import logging
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, overload

import torch

from advedge.data import MAX_CLASSES
from advedge.errors import UsageError, did_you_mean
from advedge.models.base import ImageClassifier, channel_values
from advedge.registry import Registry, first_doc_line

logger = logging.getLogger(__name__)

__all__ = [
    "COMMON_ARGUMENTS",
    "DEFAULT_STATS",
    "MAX_ARCH_INT",
    "MAX_CLASSES",
    "MAX_PARAMETERS",
    "MODELS",
    "ModelFactory",
    "check_input_size",
    "create_model",
    "float_argument",
    "int_argument",
    "list_models",
    "min_input_size",
    "model_info",
    "register_model",
]

ModelFactory = Callable[..., ImageClassifier]
"""A function ``(*, num_classes, in_channels, mean, std, **arch_kwargs) -> ImageClassifier``."""

F = TypeVar("F", bound=ModelFactory)

COMMON_ARGUMENTS = ("num_classes", "in_channels", "mean", "std")
"""Arguments every factory takes; ``create_model`` validates and resolves them."""

DEFAULT_STATS: dict[int, tuple[tuple[float, ...], tuple[float, ...]]] = {
    3: ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),  # CIFAR-10
    1: ((0.1307,), (0.3081,)),  # MNIST
}
"""Default ``(mean, std)`` per number of input channels, used when none is given."""

MAX_ARCH_INT = 4096
"""The largest magnitude an integer architecture argument may have.

Integer arguments set sizes (depth, widen factor, channel counts); the registered models use
values below 50. The bound keeps a checkpoint's ``arch_kwargs`` from asking for a billion layers,
which would hang Python long before any memory check."""

MAX_PARAMETERS = 2**30
"""The most elements (parameters and buffers) a model built by :func:`create_model` may have.

About 1.07 billion, 4 GiB in float32; the largest registered default, ``wrn34_10``, has 46
million. The count is taken on a copy built on the ``meta`` device, which allocates nothing."""

_MAX_PROBE_SIDE = 64  # min_input_size tries square inputs of 1..64 pixels


@dataclass(frozen=True)
class _Entry:
    name: str
    factory: ModelFactory
    description: str
    defaults: dict[str, Any] = field(default_factory=dict)


MODELS: Registry[_Entry] = Registry("model")
"""Every model factory by name (see :func:`register_model`)."""


def _architecture_defaults(name: str, factory: ModelFactory) -> dict[str, Any]:
    """Check a factory's signature and return its architecture arguments with their defaults."""
    params = inspect.signature(factory).parameters
    missing = [a for a in COMMON_ARGUMENTS if a not in params]
    if missing:
        raise TypeError(f"model factory {name!r} must accept the keyword arguments {missing}")
    defaults: dict[str, Any] = {}
    for p in params.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY):
            raise TypeError(f"model factory {name!r} must take named arguments only, not {p}")
        if p.name in COMMON_ARGUMENTS:
            continue
        if p.default is p.empty:
            raise TypeError(f"argument {p.name!r} of model factory {name!r} needs a default")
        defaults[p.name] = p.default
    try:
        json.dumps(defaults)
    except (TypeError, ValueError):
        raise TypeError(f"defaults of model factory {name!r} must be JSON-serialisable") from None
    return defaults


@overload
def register_model(fn: F, /) -> F: ...
@overload
def register_model(fn: None = None, /, *, name: str | None = None) -> Callable[[F], F]: ...
@overload
def register_model(fn: str, /) -> Callable[[F], F]: ...


def register_model(
    fn: F | str | None = None, /, *, name: str | None = None
) -> F | Callable[[F], F]:
    """Register a model factory under its function name or an explicit name.

    Use it bare (``@register_model``) or with a name (``@register_model("resnet18")`` or
    ``@register_model(name="resnet18")``). The factory is returned unchanged.

    Args:
        fn: The factory (bare use), or the name to register under.
        name: The name to register under; defaults to the factory's ``__name__``.

    Returns:
        The factory itself, or a decorator that registers and returns it.

    Raises:
        ValueError: if the name is already registered.
        TypeError: if the factory does not take the common keyword arguments
            (``num_classes``, ``in_channels``, ``mean``, ``std``), or if one of its other
            arguments has no default or a default that is not JSON-serialisable.
    """
    if isinstance(fn, str):
        name, fn = fn, None

    def decorator(factory: F) -> F:
        key = name or factory.__name__
        if key in MODELS:
            raise ValueError(f"model {key!r} is already registered")
        defaults = _architecture_defaults(key, factory)
        description = first_doc_line(factory)
        MODELS.register(key, _Entry(key, factory, description, defaults), description=description)
        return factory

    if fn is None:
        return decorator
    return decorator(fn)


def list_models() -> list[str]:
    """Return the names of all registered models, sorted."""
    return sorted(MODELS)


def model_info(name: str) -> dict[str, Any]:
    """Describe a registered model without building it.

    Returns:
        ``{"name", "description", "default_kwargs"}``: the description is the first line of the
        factory's docstring, and ``default_kwargs`` maps each architecture argument (beyond
        ``num_classes``, ``in_channels``, ``mean`` and ``std``) to its default.

    Raises:
        UsageError: for an unknown name (with a close-match suggestion).
    """
    entry = MODELS.get(name)
    return {
        "name": entry.name,
        "description": entry.description,
        "default_kwargs": dict(entry.defaults),
    }


def _stats(
    values: Sequence[float] | None, default: Sequence[float], what: str, in_channels: int
) -> list[float]:
    out = channel_values(default if values is None else values, what)
    if len(out) != in_channels:
        raise UsageError(
            f"{what} has {len(out)} values but the model has {in_channels} input channels",
            "give one value per input channel",
        )
    if what == "std" and any(v <= 0 for v in out):
        raise UsageError(f"std must be positive, got {out!r}")
    return out


def int_argument(value: Any, what: str, minimum: int | None = None) -> int:
    """Check a model argument that must be an integer (``bool`` is refused).

    Raises:
        UsageError: if ``value`` is not an integer or is below ``minimum``.
    """
    if isinstance(value, bool):
        raise UsageError(f"{what} must be an integer, got {value!r}")
    try:
        out = operator.index(value)
    except TypeError:
        raise UsageError(f"{what} must be an integer, got {value!r}") from None
    if minimum is not None and out < minimum:
        raise UsageError(f"{what} must be at least {minimum}, got {out}")
    return out


def float_argument(value: Any, what: str) -> float:
    """Check a model argument that must be a finite number (``bool`` is refused).

    Raises:
        UsageError: if ``value`` is not a finite number.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f"{what} must be a number, got {value!r}")
    out = float(value)
    if not math.isfinite(out):
        raise UsageError(f"{what} must be finite, got {value!r}")
    return out


def _common_arguments(
    num_classes: int,
    in_channels: int,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
) -> dict[str, Any]:
    """``num_classes``, ``in_channels``, ``mean`` and ``std``, checked, with defaults filled in."""
    num_classes = int_argument(num_classes, "num_classes", 2)
    if num_classes > MAX_CLASSES:
        raise UsageError(
            f"num_classes must be at most {MAX_CLASSES}, got {num_classes}",
            "a dataset's labels or class_names say how many classes it has",
        )
    if isinstance(in_channels, bool) or in_channels not in (1, 3):
        raise UsageError(f"in_channels must be 1 or 3, got {in_channels!r}")
    in_channels = int(in_channels)
    default_mean, default_std = DEFAULT_STATS[in_channels]
    return {
        "num_classes": num_classes,
        "in_channels": in_channels,
        "mean": _stats(mean, default_mean, "mean", in_channels),
        "std": _stats(std, default_std, "std", in_channels),
    }


def _architecture_arguments(entry: _Entry, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The factory's own arguments: the defaults with ``kwargs`` laid over them, checked."""
    name = entry.name
    unknown = sorted(k for k in kwargs if k not in entry.defaults)
    if unknown:
        accepted = [*COMMON_ARGUMENTS, *sorted(entry.defaults)]
        hint = f"{name} accepts: {', '.join(accepted)}"
        close = did_you_mean(unknown[0], sorted(entry.defaults)) if entry.defaults else ""
        if close.startswith("did you mean"):
            hint = f"{close} {hint}"
        names = ", ".join(repr(k) for k in unknown)
        raise UsageError(f"model {name!r} does not accept the argument(s) {names}", hint)
    arch_args = copy.deepcopy({**entry.defaults, **kwargs})
    try:
        json.dumps(arch_args)
    except (TypeError, ValueError):
        raise UsageError(
            f"arguments of model {name!r} must be plain numbers, strings or lists, "
            f"got {arch_args!r}"
        ) from None
    for key, value in arch_args.items():
        _check_arch_value(name, key, value)
    return arch_args


def create_model(
    name: str,
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **kwargs: Any,
) -> ImageClassifier:
    """Build a registered model by name.

    Args:
        name: A name from :func:`list_models`.
        num_classes: The number of classes, at least 2.
        in_channels: 3 (colour) or 1 (grey).
        mean: Per-channel mean of the training data; defaults to CIFAR-10's for 3 channels and
            MNIST's for 1 channel (see ``DEFAULT_STATS``).
        std: Per-channel standard deviation (positive); defaults as for ``mean``.
        **kwargs: Architecture arguments, for example ``width_mult`` for ``mobilenetv2``;
            :func:`model_info` lists each model's arguments and defaults.

    Returns:
        The model in training mode, with ``arch`` set to ``name`` and ``arch_kwargs`` to every
        argument needed to rebuild it (``num_classes``, ``in_channels``, ``mean``, ``std`` and
        each architecture argument, defaults included).

    Raises:
        TypeError: if the registered factory does not return an ImageClassifier.
        UsageError: for an unknown name or architecture argument, ``num_classes < 2``,
            ``in_channels`` other than 1 or 3, a ``mean``/``std`` whose length is not
            ``in_channels``, a non-positive ``std``, or an invalid architecture argument.
    """
    entry = MODELS.get(name)
    args = {
        **_common_arguments(num_classes, in_channels, mean, std),
        **_architecture_arguments(entry, kwargs),
    }
    size = _meta_size(entry, args)
    if size is not None and size > MAX_PARAMETERS:
        shown = ", ".join(f"{k}={v!r}" for k, v in args.items() if k not in ("mean", "std"))
        raise UsageError(
            f"model {name!r} with {shown} would have {size:,} parameters, more than the "
            f"{MAX_PARAMETERS:,} advedge builds",
            "lower num_classes or the size arguments (depth, width)",
        )
    model = entry.factory(**args)
    if not isinstance(model, ImageClassifier):
        raise TypeError(
            f"model factory {name!r} returned {type(model).__name__}, not ImageClassifier"
        )
    model.arch = name
    model.arch_kwargs = dict(args)
    logger.debug("created model %s with %s", name, model.arch_kwargs)
    return model


def _check_arch_value(name: str, key: str, value: Any) -> None:
    """Refuse integers beyond :data:`MAX_ARCH_INT` and non-finite floats, also inside lists."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if isinstance(value, int):
        if abs(value) > MAX_ARCH_INT:
            raise UsageError(
                f"argument {key!r} of model {name!r} is {value}, beyond the {MAX_ARCH_INT} "
                "any architecture argument may take"
            )
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise UsageError(f"argument {key!r} of model {name!r} must be finite, got {value}")
    elif isinstance(value, (list, tuple)):
        for item in value:
            _check_arch_value(name, key, item)
    elif isinstance(value, dict):
        for sub, item in value.items():
            _check_arch_value(name, f"{key}.{sub}", item)


def _meta_size(entry: _Entry, args: dict[str, Any]) -> int | None:
    """Parameters plus buffers of the model ``args`` build, counted on the meta device.

    Returns None for a factory that cannot build on the meta device (it is then built for real
    without the bound). Errors the factory raises for bad arguments propagate.
    """
    try:
        with torch.device("meta"):
            probe = entry.factory(**args)
    except (UsageError, TypeError):
        raise
    except Exception as exc:  # any failure only means: no estimate
        logger.debug("cannot build %s on the meta device (%s); size not checked", entry.name, exc)
        return None
    if not isinstance(probe, torch.nn.Module):
        return None
    return sum(t.numel() for t in itertools.chain(probe.parameters(), probe.buffers()))


@functools.lru_cache(maxsize=64)
def _min_side(name: str, arch_json: str, in_channels: int, training: bool) -> int | None:
    entry = MODELS.get(name)
    args = {
        "num_classes": 2,
        "in_channels": in_channels,
        "mean": [0.5] * in_channels,
        "std": [0.5] * in_channels,
        **json.loads(arch_json),
    }
    try:
        with torch.device("meta"):
            model = entry.factory(**args)
        model.train(training)
    except Exception as exc:  # no probe, no minimum
        logger.debug("cannot probe %s on the meta device (%s)", name, exc)
        return None
    for side in range(1, _MAX_PROBE_SIDE + 1):
        try:
            with torch.no_grad():
                model(torch.empty(1, in_channels, side, side, device="meta"))
        except Exception:  # too small for a convolution, a pooling or a norm
            continue
        return side
    return None


def min_input_size(
    model: str | ImageClassifier, *, training: bool = False, **arch_kwargs: Any
) -> int | None:
    """The smallest square input side a model accepts, found by a forward pass on meta tensors.

    Args:
        model: A registered name (with its ``arch_kwargs``, common arguments included or not),
            or a model built by :func:`create_model` (its own ``arch_kwargs`` are used).
        training: In training mode a batch of one image must leave every batch norm more than
            one value per channel, which needs a larger input than evaluation.
        **arch_kwargs: Arguments of the model, when ``model`` is a name.

    Returns:
        The side in pixels, or None when it cannot be told (a factory that does not build on
        the meta device, or no input up to 64x64 works).
    """
    if isinstance(model, str):
        name, kwargs = model, arch_kwargs
    else:
        name, kwargs = getattr(model, "arch", ""), dict(getattr(model, "arch_kwargs", {}))
        if not name:
            return None
    entry = MODELS.get(name)
    in_channels = kwargs.get("in_channels", 3)
    if in_channels not in (1, 3) or isinstance(in_channels, bool):
        return None
    arch = {k: v for k, v in kwargs.items() if k not in COMMON_ARGUMENTS}
    arch = {**entry.defaults, **arch}
    try:
        arch_json = json.dumps(arch, sort_keys=True)
    except (TypeError, ValueError):
        return None
    return _min_side(name, arch_json, int(in_channels), bool(training))


def check_input_size(
    model: str | ImageClassifier,
    height: int,
    width: int,
    *,
    training: bool = False,
    **arch_kwargs: Any,
) -> None:
    """Refuse images smaller than :func:`min_input_size` of ``model``.

    Raises:
        UsageError: naming the image size and the model's minimum.
    """
    side = min_input_size(model, training=training, **arch_kwargs)
    if side is None or (height >= side and width >= side):
        return
    name = model if isinstance(model, str) else getattr(model, "arch", type(model).__name__)
    mode = "to train" if training else ""
    raise UsageError(
        f"{name} needs images of at least {side}x{side}{' ' + mode if mode else ''}, "
        f"got {height}x{width}",
        "resize the images or choose a model that downsamples less (tiny_cnn, resnet8)",
    )

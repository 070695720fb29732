"""Frozen-dataclass configs: strict parsing from dicts/YAML and resolved dumps into run dirs."""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from advedge.errors import UsageError, did_you_mean, os_error
from advedge.utils import atomic_write_text

__all__ = [
    "MAX_CONFIG_BYTES",
    "SEED_MAX",
    "ConfigLoader",
    "check_fields",
    "check_value",
    "config_from_dict",
    "config_to_dict",
    "load_yaml",
    "parse_yaml",
    "write_yaml",
]

T = TypeVar("T")

#: Largest seed (numpy's limit): every seed lies in ``[0, SEED_MAX]``.
SEED_MAX = 2**32 - 1
#: Largest config file advedge reads (a config is a few hundred bytes).
MAX_CONFIG_BYTES = 1 << 20
_MAX_DEPTH = 32  # nesting of plain data (model_kwargs) a config may hold


# ------------------------------------------------------------------------------ type checking
def _show(value: Any) -> str:
    """A short one-line repr of ``value`` for an error message."""
    try:
        text = repr(value)
    except Exception:  # e.g. an int past Python's digit limit, a self-referencing container
        return f"a {type(value).__name__}"
    return text if len(text) <= 60 else text[:57] + "..."


def _describe(tp: Any) -> str:
    """``int`` -> ``an integer``; ``float | None`` -> ``a finite number or null``."""
    if tp is Any:
        return "plain data (finite numbers, strings, true/false, lists, mappings)"
    if tp is type(None):
        return "null"
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a finite number"
    if tp is str:
        return "a string"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin in (list, tuple) and args:
        item = args[0] if origin is list or args[-1] is Ellipsis else None
        if item is not None:
            return f"a list of {_plural(_describe(item))}"
        return f"a list of {len(args)} items"
    if origin is dict and args:
        key, value = (_plural(_describe(a)) for a in args)
        return f"a mapping of {key} to {value}"
    if origin is dict or tp is dict:
        return "a mapping"
    return f"a {getattr(tp, '__name__', tp)}"


def _plural(described: str) -> str:
    for one, many in (
        ("an integer", "integers"),
        ("a finite number", "finite numbers"),
        ("a string", "strings"),
        ("true or false", "true/false values"),
        (_describe(Any), _describe(Any).replace("plain data", "plain values")),
    ):
        if described == one:
            return many
    return described


_BAD = object()  # "does not conform" (None is a valid value)


def _plain(value: Any, depth: int = 0) -> Any:
    """``value`` if it is plain data (what YAML and JSON hold), else ``_BAD``."""
    if depth > _MAX_DEPTH:
        return _BAD
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return _conform(float, value)
    if isinstance(value, (list, tuple)):
        items = [_plain(v, depth + 1) for v in value]
        if any(i is _BAD for i in items):
            return _BAD
        return tuple(items) if isinstance(value, tuple) else items
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            item = _plain(v, depth + 1)
            if not isinstance(k, str) or item is _BAD:
                return _BAD
            out[k] = item
        return out
    return _BAD


def _conform(tp: Any, value: Any) -> Any:
    """``value`` normalised to ``tp`` (an int for a float field becomes a float, a list for a
    tuple field a tuple), or ``_BAD``. Floats must be finite; a bool is not an int."""
    if tp is Any:
        return _plain(value)
    if tp is type(None):
        return None if value is None else _BAD
    if tp is bool:
        return value if isinstance(value, bool) else _BAD
    if tp is int:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        return int(value) if ok else _BAD
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return _BAD
        try:
            out = float(value)
        except (OverflowError, ValueError, TypeError):
            return _BAD
        return out if math.isfinite(out) else _BAD
    if tp is str:
        if isinstance(value, os.PathLike):  # the Python API may pass a Path for a path option
            value = os.fspath(value)
        return value if isinstance(value, str) else _BAD
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            out = _conform(arg, value)
            if out is not _BAD:
                return out
        return _BAD
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return _BAD
        if origin is list or not args or args[-1] is Ellipsis:
            item_types = [args[0] if args else Any] * len(value)
        elif len(args) == len(value):
            item_types = list(args)
        else:
            return _BAD
        items = [_conform(t, v) for t, v in zip(item_types, value, strict=True)]
        return _BAD if any(i is _BAD for i in items) else origin(items)
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            return _BAD
        key_tp, value_tp = args if args else (Any, Any)
        out: dict[Any, Any] = {}
        for k, v in value.items():
            key, item = _conform(key_tp, k), _conform(value_tp, v)
            if key is _BAD or item is _BAD:
                return _BAD
            out[key] = item
        return out
    if isinstance(tp, type):
        return value if isinstance(value, tp) else _BAD
    return value  # an annotation this checker does not know: not checked


def check_value(annotation: Any, value: Any, label: str) -> Any:
    """Check ``value`` against a type annotation and return it normalised.

    Handles ``int``, ``float`` (finite; an int is accepted and converted), ``bool``, ``str``,
    ``X | None``, ``tuple[X, ...]``, ``list[X]``, ``dict[K, V]`` and ``Any`` (plain data only).
    A bool is not an int, a string is not a number.

    Raises:
        UsageError: ``{label} must be an integer, got True``.
    """
    out = _conform(annotation, value)
    if out is _BAD:
        raise UsageError(f"{label} must be {_describe(annotation)}, got {_show(value)}")
    return out


def _hints(cls: type) -> dict[str, Any]:
    # Annotations are strings (``from __future__ import annotations``): evaluate them.
    return typing.get_type_hints(cls)


def check_fields(obj: Any, *, label: str = "{name}") -> None:
    """Check every field of the dataclass instance ``obj`` against its annotation, in place.

    Meant for ``__post_init__`` (frozen dataclasses included): a value is replaced by its
    normalised form (a float for an int given to a float field, a tuple for a list).

    Raises:
        UsageError: for the first field whose value does not fit its type.
    """
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        out = check_value(hints[f.name], value, label.format(name=f.name))
        if out is not value:
            object.__setattr__(obj, f.name, out)


def config_from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build the frozen dataclass ``cls`` from ``data``; unknown keys fail with a suggestion.

    Dashes in keys are accepted as underscores (``batch-size`` == ``batch_size``). Each value
    is checked against the field's annotation (see :func:`check_value`).

    Raises:
        UsageError: for a key that ``cls`` does not have or a value of the wrong type
            (``config key 'epochs' must be an integer, got True``).
    """
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = _hints(cls)
    clean: dict[str, Any] = {}
    for key, value in data.items():
        k = str(key).replace("-", "_")
        if k not in names:
            raise UsageError(f"unknown config key {_show(key)}", did_you_mean(k, names))
        clean[k] = check_value(hints[k], value, f"config key {k!r}")
    return cls(**clean)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-data dict of a dataclass config (tuples become lists), for YAML and hashing."""

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(i) for i in v]
        if isinstance(v, dict):
            return {str(k): plain(i) for k, i in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    return {f.name: plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


# ------------------------------------------------------------------------------------ YAML
class ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses anchors and aliases (``&a``, ``*a``).

    Aliases let a 700-byte file expand to billions of nodes ("billion laughs"); no advedge
    config needs them. Every config file advedge reads goes through this loader (use
    :func:`load_yaml` for a file, :func:`parse_yaml` for a string).
    """

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise yaml.composer.ComposerError(
                None,
                None,
                "YAML anchors and aliases (&name, *name) are not allowed",
                event.start_mark,
            )
        return super().compose_node(parent, index)


def _yaml_problem(exc: BaseException) -> str:
    """One line saying what is wrong with a YAML text, and where."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem:
        where = exc.problem_mark
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        return f"{exc.problem}{at}"
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    lines = str(exc).strip().splitlines()
    line = lines[0] if lines else type(exc).__name__
    return line if len(line) <= 120 else line[:117] + "..."


def parse_yaml(text: str) -> Any:
    """Parse YAML text with :class:`ConfigLoader` (safe tags only, no aliases).

    Raises:
        yaml.YAMLError: for text that is not YAML, uses an alias or an unsafe tag.
        ValueError: for a number YAML cannot hold (e.g. an int past Python's digit limit).
        RecursionError: for nesting deeper than Python's recursion limit.
    """
    return yaml.load(text, Loader=ConfigLoader)  # ConfigLoader is a SafeLoader


def load_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML mapping with :class:`ConfigLoader` (a safe loader that refuses aliases).

    Raises:
        UsageError: if the file is missing, a folder, unreadable, larger than
            :data:`MAX_CONFIG_BYTES`, not UTF-8 text, not YAML, uses an alias, or not a mapping.
    """
    p = Path(path)
    if not p.exists():
        raise UsageError(f"config file not found: {p}")
    if p.is_dir():
        raise UsageError(f"config file {p} is a folder, not a file")
    if not p.is_file():
        raise UsageError(f"config file {p} is not a regular file")
    try:
        with p.open("rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        err = os_error(exc, p, "read")
        raise UsageError(f"config file: {err.message}", err.hint) from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise UsageError(f"config file {p} is larger than {MAX_CONFIG_BYTES // 1024} KiB")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(
            f"config file {p} is not UTF-8 text (byte {exc.start})", "is it a binary file?"
        ) from None
    try:
        data = parse_yaml(text)
    except (yaml.YAMLError, ValueError, RecursionError) as exc:
        raise UsageError(f"{p} is not valid YAML ({_yaml_problem(exc)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"{p} must hold a mapping of option: value")
    return data


def write_yaml(path: str | os.PathLike[str], data: dict[str, Any]) -> None:
    """Write ``data`` as YAML, atomically."""
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))

"""Frozen-dataclass configs: strict parsing from dicts/YAML and resolved dumps into run dirs."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, TypeVar

import yaml

from advedge.errors import UsageError, did_you_mean
from advedge.utils import atomic_write_text

__all__ = ["config_from_dict", "config_to_dict", "load_yaml", "write_yaml"]

T = TypeVar("T")


def config_from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build the frozen dataclass ``cls`` from ``data``; unknown keys fail with a suggestion.

    Dashes in keys are accepted as underscores (``batch-size`` == ``batch_size``).

    Raises:
        UsageError: for a key that ``cls`` does not have.
    """
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    clean: dict[str, Any] = {}
    for key, value in data.items():
        k = str(key).replace("-", "_")
        if k not in names:
            raise UsageError(f"unknown config key {key!r}", did_you_mean(k, names))
        clean[k] = value
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


def load_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML mapping with ``yaml.safe_load``.

    Raises:
        UsageError: if the file is missing, not YAML, or not a mapping.
    """
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise UsageError(f"{p} is not valid YAML ({str(exc).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"{p} must hold a mapping of option: value")
    return data


def write_yaml(path: str | os.PathLike[str], data: dict[str, Any]) -> None:
    """Write ``data`` as YAML, atomically."""
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))

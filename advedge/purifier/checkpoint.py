"""Purifier checkpoints: ``purifier.safetensors`` holds the generator and its metadata.

The format is the classifiers' (:mod:`advedge.checkpoint`): safetensors with string metadata,
written atomically, rebuilt from the file alone. The architecture is ``purifier-generator``
and ``arch_kwargs`` are :meth:`Generator.config`; ``kind`` is ``purifier``. The discriminator is
not in it (it lives in the run's ``state.pt``, for resuming).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from advedge.checkpoint import arch_kwargs, load_weights, read_metadata, write_safetensors
from advedge.errors import CheckpointError, UsageError
from advedge.purifier.networks import Generator

__all__ = [
    "ARCHITECTURE",
    "PURIFIER_FILE",
    "check_purifier_fits",
    "load_purifier",
    "resolve_purifier",
    "save_purifier",
]

PURIFIER_FILE = "purifier.safetensors"
ARCHITECTURE = "purifier-generator"


def save_purifier(
    gen: Generator, path: str | os.PathLike[str], *, metadata: dict[str, Any] | None = None
) -> Path:
    """Write the generator's weights and metadata to ``path`` atomically."""
    head = {"kind": "purifier"}
    return write_safetensors(gen, path, ARCHITECTURE, gen.config(), head=head, metadata=metadata)


def resolve_purifier(path: str | os.PathLike[str]) -> Path:
    """A purifier run directory or file -> the ``purifier.safetensors`` to load."""
    p = Path(path)
    if p.is_dir():
        p = p / PURIFIER_FILE
    if not p.is_file():
        raise CheckpointError(
            f"purifier not found: {p}", "pass a purifier run directory or its purifier.safetensors"
        )
    return p


def load_purifier(path: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> Generator:
    """Rebuild the generator from its checkpoint alone, in eval mode.

    The decoded metadata is kept in ``gen.checkpoint_metadata``.

    Raises:
        CheckpointError: missing, truncated or corrupt file; a classifier checkpoint; tensors
            that do not match the recorded generator.
    """
    p = resolve_purifier(path)
    meta = read_metadata(p)
    if meta.get("architecture") != ARCHITECTURE:
        raise CheckpointError(
            f"{p} holds a {meta.get('architecture')} classifier, not a purifier",
            "pass a run directory written by advedge purifier train",
        )
    try:
        gen = Generator(**arch_kwargs(meta, p))
    except (UsageError, TypeError) as exc:
        raise CheckpointError(f"{p}: cannot rebuild the generator ({exc})") from None
    return load_weights(gen, p, meta, device=device)  # type: ignore[return-value]


def check_purifier_fits(gen: Generator, classifier_meta: dict[str, Any], source: str) -> None:
    """Refuse a purifier whose channels or input shape differ from the classifier's.

    Raises:
        UsageError: with both shapes named.
    """
    shape = classifier_meta.get("input_shape")
    p_shape = getattr(gen, "checkpoint_metadata", {}).get("input_shape")
    if shape and int(shape[0]) != gen.in_channels:
        raise UsageError(
            f"the purifier {source} works on {gen.in_channels}-channel images but the "
            f"classifier takes {shape[0]} channel(s)",
            "train a purifier on the classifier's dataset",
        )
    if shape and p_shape and list(p_shape) != list(shape):
        raise UsageError(
            f"the purifier {source} was trained on inputs of shape {list(p_shape)} but the "
            f"classifier takes {list(shape)}",
            "train a purifier on the classifier's dataset",
        )

"""Checkpoints: ``model.safetensors`` with string metadata, and ``state.pt`` for resuming.

A model checkpoint is a safetensors file whose metadata rebuilds the model with no other file:

========================  ===========================================================
key                       value (all strings; JSON where structured)
========================  ===========================================================
``format``                ``advedge.model/1``
``architecture``          registry name, e.g. ``resnet18``
``arch_kwargs``           JSON of the exact ``create_model`` arguments
``num_classes``           e.g. ``10``
``mean`` / ``std``        JSON lists, the model's normalisation layer
``input_shape``           JSON ``[C, H, W]``
``dataset``               dataset name
``method``                training method
``eps``                   training eps (pixel units)
``advedge_version``       version that wrote the file
anything else             JSON, e.g. ``method_settings``, ``epochs``, ``teacher``
========================  ===========================================================

Training state (optimiser, scheduler, epoch, RNG) goes through ``torch.save`` and is read back
only with ``torch.load(..., weights_only=True)``; a pickle with code in it is never executed.
Every write is atomic (temporary file, then rename).
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from advedge import __version__
from advedge.data import MAX_ARRAY_ELEMENTS, MAX_CLASSES, MAX_IMAGE_SIZE, MIN_IMAGE_SIZE
from advedge.errors import CheckpointError, UsageError
from advedge.utils import atomic_path, atomic_write_bytes

logger = logging.getLogger(__name__)

__all__ = [
    "FORMAT",
    "MODEL_FILE",
    "STATE_FILE",
    "arch_kwargs",
    "check_state_matches",
    "cpu_state_dict",
    "load_model",
    "load_state",
    "load_weights",
    "read_metadata",
    "resolve_checkpoint",
    "save_model",
    "save_state",
    "write_safetensors",
]

FORMAT = "advedge.model/1"
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"

_JSON_KEYS = ("arch_kwargs", "mean", "std", "input_shape")

MAX_EPOCHS = 1_000_000
"""The largest ``epochs`` count a checkpoint may state."""


def _encode(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def save_model(
    model: nn.Module, path: str | os.PathLike[str], *, metadata: dict[str, Any] | None = None
) -> Path:
    """Write ``model``'s weights and metadata to a safetensors file, atomically.

    Args:
        model: An :class:`advedge.models.ImageClassifier` (it must have ``arch`` and
            ``arch_kwargs``). A DDP or ``torch.compile`` wrapper is unwrapped.
        path: Target file.
        metadata: Extra fields (``dataset``, ``method``, ``eps``, ...); values that are not
            strings are stored as JSON.

    Returns:
        The path written.
    """
    model = unwrap(model)
    arch = getattr(model, "arch", None)
    kwargs = getattr(model, "arch_kwargs", None)
    if arch is None or kwargs is None:
        raise CheckpointError("only advedge registry models can be saved (no arch/arch_kwargs)")
    head = {
        "num_classes": str(kwargs.get("num_classes")),
        "mean": json.dumps(list(kwargs.get("mean") or [])),
        "std": json.dumps(list(kwargs.get("std") or [])),
    }
    return write_safetensors(model, path, arch, kwargs, head=head, metadata=metadata)


def write_safetensors(
    module: nn.Module,
    path: str | os.PathLike[str],
    architecture: str,
    arch_kwargs: dict[str, Any],
    *,
    head: dict[str, str],
    metadata: dict[str, Any] | None,
) -> Path:
    """Write ``module``'s weights to a safetensors file with advedge metadata, atomically.

    The layout model and purifier checkpoints share: ``format``, ``architecture``,
    ``arch_kwargs`` (JSON), the ``head`` entries, ``advedge_version``, then ``metadata``'s
    entries (strings kept, other values as JSON, None left out).

    Returns:
        The path written.
    """
    meta: dict[str, str] = {
        "format": FORMAT,
        "architecture": architecture,
        "arch_kwargs": json.dumps(arch_kwargs, sort_keys=True),
        **head,
        "advedge_version": __version__,
    }
    for key, value in (metadata or {}).items():
        if value is not None:
            meta[key] = _encode(value)
    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def cpu_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s state dict, detached and on the CPU (for ``state.pt``)."""
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def unwrap(model: nn.Module) -> nn.Module:
    """Strip DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


DEPLOYED_SUFFIXES = {
    ".onnx": "an ONNX artifact",
    ".engine": "a TensorRT engine",
    ".plan": "a TensorRT engine",
}
"""File types that are deployed artifacts, which only ``advedge bench`` runs."""


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """Turn a run directory or a file path into the model file to load.

    Raises:
        CheckpointError: if nothing is there, or it is an ONNX or TensorRT artifact.
    """
    p = Path(path)
    if p.is_dir():
        candidate = p / MODEL_FILE
        if not candidate.is_file():
            raise CheckpointError(
                f"run directory {p} has no {MODEL_FILE}",
                "pass a finished run directory or a .safetensors file",
            )
        return candidate
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    kind = DEPLOYED_SUFFIXES.get(p.suffix.lower())
    if kind is not None:
        raise CheckpointError(
            f"{p} is {kind}, not a PyTorch checkpoint",
            "give the run directory it was exported from, or measure the artifact itself with "
            "advedge bench --robust",
        )
    return p


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and decode the metadata of an advedge safetensors checkpoint.

    Raises:
        CheckpointError: if the file is not a readable safetensors file or not an advedge one.
    """
    path = resolve_checkpoint(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({_short(exc)})",
            "the file may be truncated or corrupt; re-export or retrain it",
        ) from None
    if raw.get("format") != FORMAT or "architecture" not in raw:
        raise CheckpointError(
            f"{path} has no advedge metadata (format {raw.get('format')!r})",
            "checkpoints written by advedge train/distill carry their architecture",
        )
    meta: dict[str, Any] = {}
    for key, value in raw.items():
        if key in ("format", "architecture", "advedge_version", "dataset", "method"):
            meta[key] = value
            continue
        try:
            meta[key] = json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            meta[key] = value
    _check_metadata(path, meta)
    return meta


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_metadata(path: Path, meta: dict[str, Any]) -> None:
    """Refuse metadata numbers that are out of bounds, before anything is built from them.

    ``num_classes`` (top level and in ``arch_kwargs``) must be an integer in
    ``[2, MAX_CLASSES]``, ``arch_kwargs.in_channels`` 1 or 3, ``input_shape`` ``[C, H, W]`` with C
    1 or 3 and H, W in ``[MIN_IMAGE_SIZE, MAX_IMAGE_SIZE]``, ``eps`` a number in [0, 1],
    ``epochs`` an integer in ``[0, MAX_EPOCHS]``, ``class_names`` at most ``MAX_CLASSES`` names,
    and every number anywhere in the metadata finite. Fields that are absent are not required
    here. The architecture's own arguments are bounded by :func:`create_model`.

    Raises:
        CheckpointError: naming the field and the value.
    """
    for key, value in meta.items():
        where = _non_finite(value)
        if where is not None:
            raise _bad(path, key + where, "a non-finite number", "every number must be finite")
    kwargs = meta.get("arch_kwargs")
    kwargs = kwargs if isinstance(kwargs, dict) else {}
    _check_classes(path, meta, kwargs)
    if "input_shape" in meta and meta["input_shape"] is not None:
        _check_input_shape(path, meta["input_shape"], kwargs)
    if meta.get("eps") is not None:
        eps = meta["eps"]
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps <= 1:
            raise _bad(path, "eps", eps, "it must be a number from 0 to 1 (pixel units)")
    if meta.get("epochs") is not None:
        epochs = meta["epochs"]
        if not _is_int(epochs) or not 0 <= epochs <= MAX_EPOCHS:
            raise _bad(path, "epochs", epochs, f"it must be an integer from 0 to {MAX_EPOCHS}")
    names = meta.get("class_names")
    if isinstance(names, list) and len(names) > MAX_CLASSES:
        raise _bad(path, "class_names", f"a list of {len(names)}", f"at most {MAX_CLASSES} names")


def _bad(path: Path, field: str, value: Any, rule: str) -> CheckpointError:
    """The error for metadata ``field`` of ``path`` breaking ``rule`` (the value shortened)."""
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return CheckpointError(
        f"{path}: metadata {field} is {shown}; {rule}",
        "the checkpoint is corrupt or was altered; re-export or retrain it",
    )


def _check_classes(path: Path, meta: dict[str, Any], kwargs: dict[str, Any]) -> None:
    """``num_classes`` (top level, in ``arch_kwargs``, agreeing) and ``in_channels``."""
    classes_rule = f"it must be an integer from 2 to {MAX_CLASSES}"
    if "num_classes" in meta:
        k = meta["num_classes"]
        if not _is_int(k) or not 2 <= k <= MAX_CLASSES:
            raise _bad(path, "num_classes", k, classes_rule)
    if "num_classes" in kwargs:
        k = kwargs["num_classes"]
        if not _is_int(k) or not 2 <= k <= MAX_CLASSES:
            raise _bad(path, "arch_kwargs.num_classes", k, classes_rule)
        if "num_classes" in meta and meta["num_classes"] != k:
            raise _bad(
                path,
                "num_classes",
                meta["num_classes"],
                f"arch_kwargs.num_classes says {k}; the two must agree",
            )
    if "in_channels" in kwargs:
        c = kwargs["in_channels"]
        if not _is_int(c) or c not in (1, 3):
            raise _bad(path, "arch_kwargs.in_channels", c, "it must be 1 or 3")


def _check_input_shape(path: Path, shape: Any, kwargs: dict[str, Any]) -> None:
    """``input_shape`` is ``[C, H, W]`` in bounds and agrees with ``arch_kwargs.in_channels``."""
    rule = f"it must be [C, H, W] with C 1 or 3 and H, W from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE}"
    if (
        not isinstance(shape, list)
        or len(shape) != 3
        or not all(_is_int(v) for v in shape)
        or shape[0] not in (1, 3)
        or not all(MIN_IMAGE_SIZE <= v <= MAX_IMAGE_SIZE for v in shape[1:])
        or math.prod(shape) > MAX_ARRAY_ELEMENTS
    ):
        raise _bad(path, "input_shape", shape, rule)
    if "in_channels" in kwargs and kwargs["in_channels"] != shape[0]:
        raise _bad(
            path,
            "input_shape",
            shape,
            f"arch_kwargs.in_channels says {kwargs['in_channels']} channels; they must agree",
        )


def _non_finite(value: Any, where: str = "") -> str | None:
    """The path (``.key[3]``) of the first NaN or infinity inside ``value``, or None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else where
    if isinstance(value, list):
        for i, item in enumerate(value):
            found = _non_finite(item, f"{where}[{i}]")
            if found is not None:
                return found
    elif isinstance(value, dict):
        for key, item in value.items():
            found = _non_finite(item, f"{where}.{key}")
            if found is not None:
                return found
    return None


def load_model(
    path: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    expected_arch: str | None = None,
) -> nn.Module:
    """Rebuild a model from its checkpoint alone and load its weights, in eval mode.

    Args:
        path: A ``.safetensors`` file or a run directory holding ``model.safetensors``.
            ``.pt``/``.pth`` files are not model checkpoints: they are refused, never unpickled.
        device: Where to put the model.
        expected_arch: If given, the checkpoint must be of this architecture.

    Returns:
        The model, with its decoded metadata in ``model.checkpoint_metadata``.

    Raises:
        CheckpointError: missing, truncated or corrupt file; tensors that do not match the
            architecture recorded (or ``expected_arch``); a pickle file.
    """
    from advedge.models import create_model

    path = resolve_checkpoint(path)
    if path.suffix in (".pt", ".pth", ".pkl", ".bin", ".ckpt"):
        _refuse_pickle(path)
    meta = read_metadata(path)
    arch = meta["architecture"]
    if expected_arch is not None and arch != expected_arch:
        raise CheckpointError(
            f"{path} holds a {arch} checkpoint, not {expected_arch}",
            "pass a checkpoint of the matching architecture",
        )
    try:
        model = create_model(arch, **arch_kwargs(meta, path))
    except UsageError as exc:
        raise CheckpointError(
            f"{path}: cannot rebuild {arch} from metadata arch_kwargs: {exc.message}",
            "the checkpoint is corrupt or was altered; re-export or retrain it",
        ) from None
    return load_weights(model, path, meta, device=device)


def arch_kwargs(meta: dict[str, Any], path: Path) -> dict[str, Any]:
    """The ``arch_kwargs`` of decoded checkpoint metadata.

    Raises:
        CheckpointError: they are missing or not a JSON object.
    """
    kwargs = meta.get("arch_kwargs")
    if not isinstance(kwargs, dict):
        raise CheckpointError(f"{path} has invalid arch_kwargs metadata")
    return kwargs


def load_weights(
    module: nn.Module, path: Path, meta: dict[str, Any], *, device: str | torch.device = "cpu"
) -> nn.Module:
    """Load the weights of the checkpoint ``path`` into ``module``, built from its ``meta``.

    Returns:
        ``module`` on ``device`` in eval mode, with ``meta`` in ``module.checkpoint_metadata``.

    Raises:
        CheckpointError: the file cannot be read, or its tensors are not exactly ``module``'s.
    """
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({_short(exc)})",
            "the file may be truncated or corrupt",
        ) from None
    check_state_matches(module, state, source=str(path))
    module.load_state_dict(state)
    module.checkpoint_metadata = meta
    return module.to(device).eval()


def check_state_matches(model: nn.Module, state: dict[str, torch.Tensor], *, source: str) -> None:
    """Raise :class:`CheckpointError` unless ``state`` has exactly ``model``'s keys and shapes."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or wrong:
        arch = getattr(model, "arch", type(model).__name__)
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            detail.append(
                f"{len(wrong)} of another shape (e.g. {k}: {tuple(state[k].shape)} vs "
                f"{tuple(expected[k].shape)})"
            )
        raise CheckpointError(
            f"{source} does not hold {arch} weights: " + ", ".join(detail),
            "it is a checkpoint of another architecture or was tampered with",
        )


def save_state(state: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write resumable training state with ``torch.save``, atomically.

    ``state`` must hold only tensors, numbers, strings, lists and dicts, so that it can be read
    back with ``weights_only=True``.
    """
    import io

    # Serialised in memory first: torch.save writing straight to a full disk fails with an
    # opaque "unexpected pos" RuntimeError; a plain write raises OSError(ENOSPC) instead.
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_state(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Read training state with ``torch.load(weights_only=True)``; never a full unpickle.

    Raises:
        CheckpointError: if the file is missing, corrupt, or holds anything but plain data
            (e.g. a pickle with an executable payload, which is refused without running it).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"training state not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"refusing to load {path}: it is not a weights-only file ({_short(exc)})",
            "advedge never unpickles arbitrary objects; the file may be malicious",
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is corrupt or truncated ({_short(exc)})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold an advedge training state")
    return state


def _refuse_pickle(path: Path) -> None:
    """A ``.pt`` given as a model: check it is weights-only, then refuse it with a hint."""
    load_state(path)  # raises on an unsafe pickle without executing it
    raise CheckpointError(
        f"{path} is a torch pickle file, not an advedge model checkpoint",
        "pass a run directory or its model.safetensors",
    )


def _short(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."

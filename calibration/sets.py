"""Calibration sets: which images INT8 calibration sees, saved as a verifiable npz file.

A calibration set is a stratified sample of a dataset's *training* split (never the test split,
so the accuracy measured on the test split stays independent of the ranges chosen here),
optionally with a fraction of its images replaced by PGD adversarial examples. Adversarial
inputs push activations further out than clean ones (that is what makes them work), so
activation ranges calibrated on clean images alone clip exactly the inputs a robust model must
handle; ``mix_adv`` lets the calibration see some of them.

The set is held as uint8 NHWC images (what the model sees after ``uint8 / 255``) and is
identified by :attr:`CalibrationSet.sha256`, a hash of its content, not of its file. Calibration
caches are keyed by that hash.

Torch-free at import: torch is imported only inside the function that crafts adversarial
examples.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from advedge.data import Dataset, load_dataset, stratified_subset
from advedge.errors import DataError, ExportError, UsageError
from advedge.utils import atomic_path, parse_eps

logger = logging.getLogger(__name__)

__all__ = [
    "SET_SCHEMA",
    "CalibrationSet",
    "build_calibration_set",
    "calibration_source",
    "check_fits",
    "load_calibration_set",
    "save_calibration_set",
]

#: Written into every saved set's metadata; also the prefix of the content hash.
SET_SCHEMA = "advedge.calibration-set/1"

_KEYS = ("x", "y", "is_adv", "meta", "sha256")

ProgressFn = Callable[[int, int], None]
"""``progress(images_done, images_total)``, called after each adversarial batch."""


@dataclass(eq=False)
class CalibrationSet:
    """Images for INT8 calibration.

    Attributes:
        x: uint8 images, NHWC (``[N, H, W, C]``, C = 1 or 3).
        y: int64 labels ``[N]``.
        is_adv: bool ``[N]``; True where the image is a PGD adversarial example.
        meta: Where the set came from: ``source`` (data directory), ``split`` (``"train"``),
            ``n``, ``seed``, ``mix_adv``, ``n_adv``, ``eps``, ``attack``, ``model_sha256``
            (None without adversarial examples) and ``class_names``.

    Raises:
        ExportError: if the arrays do not have these dtypes and shapes.
    """

    x: np.ndarray
    y: np.ndarray
    is_adv: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_arrays(self.x, self.y, self.is_adv, source="calibration set")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """The model input shape these images fit, ``(C, H, W)``."""
        _, height, width, channels = self.x.shape
        return int(channels), int(height), int(width)

    @property
    def sha256(self) -> str:
        """Hex sha256 of the content, independent of any file.

        The hash covers, in order, the schema string and then for each of ``x``, ``y`` and
        ``is_adv``: its name, its dtype (``|u1``, ``<i8``, ``|b1``), its shape and its
        C-order bytes. The metadata is not hashed: two sets with the same images, labels and
        adversarial flags calibrate identically.
        """
        h = hashlib.sha256(SET_SCHEMA.encode() + b"\0")
        for name, arr, dtype in (
            ("x", self.x, np.dtype("|u1")),
            ("y", self.y, np.dtype("<i8")),
            ("is_adv", self.is_adv, np.dtype("|b1")),
        ):
            canon = np.ascontiguousarray(arr, dtype=dtype)
            header = f"{name}:{dtype.str}:{','.join(str(d) for d in canon.shape)}\0"
            h.update(header.encode())
            h.update(canon.tobytes(order="C"))
        return h.hexdigest()

    def as_float(self) -> np.ndarray:
        """The images as float32 NCHW in [0, 1]: ``x.transpose(0, 3, 1, 2) / 255``."""
        out = np.ascontiguousarray(self.x.transpose(0, 3, 1, 2), dtype=np.float32)
        out /= np.float32(255.0)
        return out


def _check_arrays(x: Any, y: Any, is_adv: Any, *, source: str) -> None:
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4:
        raise ExportError(f"{source}: images must be a uint8 array [N, H, W, C], got {_desc(x)}")
    if x.shape[3] not in (1, 3):
        raise ExportError(f"{source}: images must have 1 or 3 channels (NHWC), got {x.shape}")
    if not isinstance(y, np.ndarray) or y.dtype != np.int64 or y.ndim != 1:
        raise ExportError(f"{source}: labels must be an int64 array [N], got {_desc(y)}")
    if not isinstance(is_adv, np.ndarray) or is_adv.dtype != np.bool_ or is_adv.ndim != 1:
        raise ExportError(f"{source}: is_adv must be a bool array [N], got {_desc(is_adv)}")
    if not len(x) == len(y) == len(is_adv):
        raise ExportError(
            f"{source}: {len(x)} images, {len(y)} labels and {len(is_adv)} is_adv flags differ"
        )
    if len(x) == 0:
        raise ExportError(f"{source}: the calibration set is empty")


def _desc(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.dtype} array of shape {list(value.shape)}"
    return type(value).__name__


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------


def calibration_source(dataset: Any, n: int, *, option: str = "n") -> Any:
    """The training split that ``n`` calibration images are drawn from.

    Raises:
        DataError: the dataset has no training split, or fewer than ``n`` training images.
    """
    train = dataset.train
    if train is None:
        raise DataError(
            f"{dataset.root} has no training split to calibrate on",
            "calibration draws from the training split so the test split stays unseen",
        )
    if n > len(train):
        raise DataError(
            f"asked for {n} calibration images but the training split of {dataset.root} "
            f"has only {len(train)}",
            f"use {option} <= {len(train)}",
        )
    return train


def build_calibration_set(
    data: str | os.PathLike[str] | Dataset,
    *,
    n: int = 512,
    seed: int = 0,
    mix_adv: float = 0.0,
    model: Any = None,
    eps: float | str = 8 / 255,
    steps: int = 10,
    batch_size: int = 128,
    progress: ProgressFn | None = None,
    download: bool = False,
) -> CalibrationSet:
    """Draw a calibration set from a dataset's training split.

    1. ``n`` images are drawn from the training split with
       :func:`advedge.data.stratified_subset` (per-class counts differ by at most one).
    2. With ``mix_adv = F > 0``, ``k = round(F * n)`` of them, stratified by class (class ``c``
       with ``n_c`` chosen images gets ``floor(k * n_c / n)`` plus one of the largest-remainder
       extras), are replaced by L-inf PGD examples crafted against ``model``: random start,
       ``steps`` steps of size ``2.5 * eps / steps``, cross-entropy on the true label. The
       results are rounded to uint8 with round-half-to-even and clipped to 0..255, so each pixel
       differs from the clean one by at most ``eps * 255 + 0.5`` grey levels.

    The result depends only on the data, ``n``, ``seed``, ``mix_adv``, the attack settings and
    the model's weights.

    Args:
        data: A data directory (or a named dataset) or a loaded :class:`advedge.data.Dataset`.
        n: Number of images.
        seed: Seed of the draw, of the adversarial choice and of PGD's random start.
        mix_adv: Fraction of adversarial images, in [0, 1].
        model: The FP32 torch classifier to attack (pixel-space input, logits output); needed
            only when ``mix_adv > 0``.
        eps: L-inf budget in pixel units (``8/255`` or ``"8/255"``).
        steps: PGD iterations.
        batch_size: Images per PGD batch.
        progress: Called as ``progress(done, total)`` after each adversarial batch.
        download: Fetch a named dataset (cifar10, ...) if it is not cached (off by default).

    Raises:
        UsageError: ``mix_adv`` outside [0, 1], ``mix_adv > 0`` without a model, or bad ``n``,
            ``eps``, ``steps`` or ``batch_size``.
        DataError: no training split, or ``n`` larger than it.
    """
    mix_adv, eps = _check_build_options(n, mix_adv, model, eps, steps, batch_size)
    dataset = data if isinstance(data, Dataset) else load_dataset(data, download=download)
    train = calibration_source(dataset, n)
    subset = stratified_subset(train, int(n), seed)
    x = np.array(subset.x, dtype=np.uint8, copy=True)
    y = np.array(subset.y, dtype=np.int64, copy=True)
    is_adv = np.zeros(len(x), dtype=bool)
    n_adv = round(mix_adv * len(x))
    model_sha = None
    attack_desc: dict[str, Any] | None = None
    if n_adv > 0:
        chosen = _stratified_indices(y, n_adv, np.random.default_rng([int(seed), 1]))
        pgd = {"eps": eps, "steps": steps, "batch_size": batch_size, "seed": seed}
        x[chosen], attack_desc, model_sha = _craft_pgd(
            model, x[chosen], y[chosen], **pgd, progress=progress
        )
        is_adv[chosen] = True

    meta = {
        "schema": SET_SCHEMA,
        "source": str(Path(dataset.root).resolve()),
        "dataset": dataset.name,
        "split": "train",
        "n": len(x),
        "seed": int(seed),
        "mix_adv": mix_adv,
        "n_adv": int(is_adv.sum()),
        "eps": eps if n_adv > 0 else None,
        "attack": attack_desc,
        "model_sha256": model_sha,
        "class_names": list(subset.class_names),
    }
    return CalibrationSet(x=x, y=y, is_adv=is_adv, meta=meta)


def _check_build_options(
    n: int, mix_adv: float, model: Any, eps: float | str, steps: int, batch_size: int
) -> tuple[float, float]:
    """:func:`build_calibration_set`'s option checks; returns ``mix_adv`` and ``eps`` as floats."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise UsageError(f"the calibration set size must be a positive integer, got {n!r}")
    mix_adv = float(mix_adv)
    if not (math.isfinite(mix_adv) and 0.0 <= mix_adv <= 1.0):
        raise UsageError(f"mix_adv must lie in [0, 1], got {mix_adv}")
    if mix_adv > 0 and model is None:
        raise UsageError(
            f"mix_adv={mix_adv} needs a model to craft adversarial examples against",
            "pass the FP32 checkpoint, or use mix_adv=0",
        )
    eps = parse_eps(eps, name="eps")
    if steps < 1:
        raise UsageError(f"PGD steps must be >= 1, got {steps}")
    if batch_size < 1:
        raise UsageError(f"batch size must be >= 1, got {batch_size}")
    return mix_adv, eps


def _stratified_indices(y: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Pick ``k`` positions of ``y`` with each class in proportion to its count.

    Class ``c`` with ``n_c`` members gets ``floor(k * n_c / N)``; the ``k - sum`` leftovers go
    to the classes with the largest remainders (ties broken at random). Within a class the
    positions are drawn at random. Returns sorted positions.
    """
    classes, counts = np.unique(y, return_counts=True)
    exact = k * counts / len(y)
    take = np.floor(exact).astype(np.int64)
    left = k - int(take.sum())
    if left > 0:
        order = np.lexsort((rng.random(len(classes)), -(exact - take)))
        take[order[:left]] += 1
    picked = [
        rng.choice(np.flatnonzero(y == cls), size=int(t), replace=False)
        for cls, t in zip(classes, take, strict=True)
        if t
    ]
    return np.sort(np.concatenate(picked))


def _to_uint8(x_float_nchw: np.ndarray) -> np.ndarray:
    """Float NCHW in [0, 1] -> uint8 NHWC: ``clip(rint(255 x), 0, 255)``, rint = half to even."""
    q = np.clip(np.rint(np.asarray(x_float_nchw, dtype=np.float64) * 255.0), 0, 255)
    return np.ascontiguousarray(q.astype(np.uint8).transpose(0, 2, 3, 1))


def _craft_pgd(
    model: Any,
    x: np.ndarray,
    y: np.ndarray,
    *,
    eps: float,
    steps: int,
    batch_size: int,
    seed: int,
    progress: ProgressFn | None,
) -> tuple[np.ndarray, dict[str, Any], str]:
    """PGD examples for uint8 NHWC ``x`` against ``model``; the only place torch is imported.

    Returns ``(x_adv uint8 NHWC, attack description, sha256 of the model's weights)``.
    """
    from advedge.export._deps import require

    torch = require("torch", purpose="crafting adversarial calibration images")
    from advedge.attacks import PGD

    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"mix_adv needs a torch nn.Module to attack, got {type(model).__name__}")
    model.eval()
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed))
    attack = PGD(model, eps=eps, steps=steps, random_start="uniform", generator=generator)
    out = np.empty_like(x)
    for start in range(0, len(x), batch_size):
        stop = min(start + batch_size, len(x))
        xb = torch.from_numpy(np.ascontiguousarray(x[start:stop].transpose(0, 3, 1, 2)))
        xb = xb.to(device=device, dtype=torch.float32).div_(255.0)
        yb = torch.from_numpy(y[start:stop]).to(device)
        x_adv = attack(xb, yb)
        out[start:stop] = _to_uint8(x_adv.detach().float().cpu().numpy())
        if progress is not None:
            progress(stop, len(x))
    return out, attack.describe(), _state_dict_sha256(model, torch)


def _state_dict_sha256(model: Any, torch: Any) -> str:
    """sha256 over the sorted state dict: each entry's name, dtype, shape and raw bytes."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{list(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Saving, loading, checking
# --------------------------------------------------------------------------------------------


def save_calibration_set(cs: CalibrationSet, path: str | os.PathLike[str]) -> Path:
    """Write ``cs`` to an npz file atomically; returns the path.

    Keys: ``x``, ``y``, ``is_adv`` (arrays), ``meta`` (a one-element string array holding
    JSON) and ``sha256`` (a one-element string array). No pickled objects, so the file loads
    with ``allow_pickle=False``. The path is used as given (no ``.npz`` is appended).
    """
    path = Path(path)
    meta_json = json.dumps(cs.meta, sort_keys=True, default=_json_default)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(
            fh,
            x=cs.x,
            y=cs.y,
            is_adv=cs.is_adv,
            meta=np.array([meta_json]),
            sha256=np.array([cs.sha256]),
        )
    return path


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (np.ndarray, tuple)):
        return list(obj.tolist() if isinstance(obj, np.ndarray) else obj)
    return str(obj)


def load_calibration_set(path: str | os.PathLike[str]) -> CalibrationSet:
    """Read a set written by :func:`save_calibration_set` and verify its hash.

    Raises:
        ExportError: the file is missing, not an npz, lacks a key, has arrays of the wrong
            dtype or rank, or its stored sha256 differs from the recomputed one (the file was
            modified or damaged).
    """
    path = Path(path)
    if not path.is_file():
        raise ExportError(
            f"calibration set not found: {path}",
            "check the path, or build one with build_calibration_set",
        )
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in _KEYS if k not in npz.files]
            if missing:
                raise ExportError(
                    f"{path} is not a calibration set: missing key(s) {', '.join(missing)}"
                )
            arrays = {k: npz[k] for k in _KEYS}
    except ExportError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise ExportError(
            f"cannot read calibration set {path}: {type(exc).__name__}: {_first_line(exc)}",
            "the file is damaged or not an npz; rebuild it",
        ) from None

    meta_arr, sha_arr = arrays["meta"], arrays["sha256"]
    for name, arr in (("meta", meta_arr), ("sha256", sha_arr)):
        if arr.dtype.kind != "U" or arr.shape != (1,):
            raise ExportError(
                f"{path}: key {name!r} must be a one-element string array, got {_desc(arr)}"
            )
    try:
        meta = json.loads(str(meta_arr[0]))
    except json.JSONDecodeError as exc:
        raise ExportError(f"{path}: metadata is not valid JSON ({exc.msg})") from None
    if not isinstance(meta, dict):
        raise ExportError(f"{path}: metadata must be a JSON object")
    _check_arrays(arrays["x"], arrays["y"], arrays["is_adv"], source=str(path))
    cs = CalibrationSet(x=arrays["x"], y=arrays["y"], is_adv=arrays["is_adv"], meta=meta)
    stored, actual = str(sha_arr[0]), cs.sha256
    if stored != actual:
        raise ExportError(
            f"calibration set {path} fails its checksum (stored sha256 {stored[:12]}…, "
            f"content {actual[:12]}…)",
            "the file was modified or damaged; rebuild it",
        )
    return cs


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else ""


def check_fits(cs: CalibrationSet, input_shape: Any, batch_size: int) -> None:
    """Refuse a set that cannot calibrate a model with input ``[C, H, W]`` at ``batch_size``.

    Dimensions of ``input_shape`` that are not positive integers (symbolic axes) match anything.

    Raises:
        UsageError: ``batch_size < 1``.
        ExportError: the images have another shape than the model input (e.g. a 28x28x1 MNIST
            set for a 32x32x3 model), or the set is smaller than one batch.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise UsageError(f"calibration batch size must be an integer, got {batch_size!r}")
    if batch_size < 1:
        raise UsageError(f"calibration batch size must be >= 1, got {batch_size}")
    want = list(input_shape)
    have = list(cs.input_shape)
    fits = len(want) == 3 and all(
        not isinstance(w, (int, np.integer)) or w <= 0 or int(w) == h
        for w, h in zip(want, have, strict=True)
    )
    if not fits:
        raise ExportError(
            f"calibration images are {have} (C, H, W) but the model takes {want}",
            "build the calibration set from the dataset the model was trained on",
        )
    if len(cs) < batch_size:
        raise ExportError(
            f"calibration set of {len(cs)} images is smaller than the batch {batch_size}",
            "use a smaller batch size or a larger calibration set",
        )

"""The npz format: ``train-*.npz`` shards or ``train.npz``, plus ``test.npz``.

Keys ``x`` (uint8 NHWC, or ``[N, H, W]`` grayscale; floats in [0, 1] and integers in 0..255 are
converted), ``y`` (integer labels) and optional ``class_names``. The array headers are checked
against the bounds of :mod:`advedge.data.formats` before numpy allocates anything.
"""

from __future__ import annotations

import math
import zipfile
import zlib
from pathlib import Path

import numpy as np

from advedge.data.formats import MAX_ARRAY_ELEMENTS, RawSplit, join_splits, natural_key
from advedge.data.messages import one_line, read_error
from advedge.errors import DataError
from advedge.utils import available_memory

__all__ = ["read_npz_dir"]


def read_npz_dir(path: Path) -> tuple[RawSplit | None, RawSplit | None]:
    """Read the ``(train, test)`` splits of an npz directory; a missing one is None.

    Raises:
        DataError: for both ``train.npz`` and shards, or any file that is refused.
    """
    shards = sorted(path.glob("train-*.npz"), key=natural_key)
    single = path / "train.npz"
    if shards and single.is_file():
        raise DataError(
            f"{path} holds both train.npz and train-*.npz shards",
            "keep one of the two so that no image is counted twice",
        )
    train_files = shards or ([single] if single.is_file() else [])
    train = join_splits([_read_npz(p) for p in train_files]) if train_files else None
    test_file = path / "test.npz"
    test = _read_npz(test_file) if test_file.is_file() else None
    return train, test


_NPZ_KEYS = ("x", "y", "class_names")


def _check_npz_headers(path: Path) -> None:
    """Read the headers of the arrays an npz holds and refuse absurd ones before loading.

    An ``.npy`` header states the shape and dtype, and numpy allocates the whole array from
    them before reading a byte of data: a 1 KB file can ask for terabytes. Each of ``x``, ``y``
    and ``class_names`` must declare at most :data:`MAX_ARRAY_ELEMENTS` elements, no object
    dtype, no more data than its zip member holds, and all of them together must fit in the
    memory available now. A file that is not a zip is left to ``np.load`` to refuse.

    Raises:
        DataError: naming the file and the array, for the first header out of bounds.
    """
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, EOFError, ValueError):
        return  # np.load says what is wrong with it
    total = 0
    with archive:
        members = {info.filename: info for info in archive.infolist()}
        for key in _NPZ_KEYS:
            if key in members:  # np.load would hand the raw bytes over, however many
                raise DataError(
                    f"{path}: member {key!r} is not a numpy array (no .npy suffix)",
                    "write the file with np.savez",
                )
            info = members.get(f"{key}.npy")
            if info is not None:
                total += _declared_bytes(path, key, archive, info)
    available = available_memory()
    if available is not None and total > available:
        raise DataError(
            f"{path}: its arrays need {total / 2**30:.1f} GiB but only "
            f"{available / 2**30:.1f} GiB of memory is available",
            "split the data into smaller train-*.npz shards or free memory",
        )


def _declared_bytes(path: Path, key: str, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> int:
    """Return the bytes the header of array ``key`` declares, refusing a header out of bounds."""
    dims, dtype, header_size = _read_header(path, key, archive, info)
    if any(d < 0 for d in dims):
        raise DataError(f"{path}: array {key!r} declares the shape {dims}")
    if dtype.hasobject:
        raise DataError(
            f"{path}: array {key!r} holds Python objects (dtype {dtype})",
            "object arrays need pickle, which is never allowed; store plain arrays",
        )
    count = math.prod(dims)
    if count > MAX_ARRAY_ELEMENTS:
        raise DataError(
            f"{path}: array {key!r} declares the shape {dims}, {count:,} elements, more "
            f"than the {MAX_ARRAY_ELEMENTS:,} an array may hold",
            "split the data into train-*.npz shards",
        )
    nbytes = count * dtype.itemsize
    if nbytes > info.file_size - header_size:
        raise DataError(
            f"{path}: array {key!r} declares the shape {dims} ({nbytes:,} bytes) but "
            f"holds only {max(0, info.file_size - header_size):,} bytes",
            "the file is truncated or was altered",
        )
    return nbytes


def _read_header(
    path: Path, key: str, archive: zipfile.ZipFile, info: zipfile.ZipInfo
) -> tuple[tuple[int, ...], np.dtype, int]:
    """Return ``(shape, dtype, header size)`` from the ``.npy`` header of one zip member."""
    try:
        with archive.open(info) as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
            else:  # (2, 0) and (3, 0) share the layout; headers here are ASCII
                shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
            header_size = fh.tell()
    except (
        ValueError,
        EOFError,
        SyntaxError,
        NotImplementedError,
        RuntimeError,
        zipfile.BadZipFile,
        zlib.error,
    ) as exc:
        raise DataError(
            f"cannot read {path}: array {key!r} has a broken header ({one_line(exc)})",
            "the file is truncated, corrupt or not an npz written by numpy",
        ) from None
    return tuple(int(d) for d in shape), dtype, header_size


def _read_npz(path: Path) -> RawSplit:
    _check_npz_headers(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [k for k in ("x", "y") if k not in archive.files]
            if missing:
                raise DataError(
                    f"{path} has no key {missing[0]!r} (keys: {', '.join(archive.files)})",
                    "npz files need x (uint8 NHWC) and y (int64 labels)",
                )
            x = archive["x"]
            y = archive["y"]
            names = archive["class_names"] if "class_names" in archive.files else None
    except DataError:
        raise
    except OSError as exc:
        if exc.errno is not None:  # the operating system's: permission, missing file, ...
            raise read_error(exc, path) from None
        raise _corrupt_npz(path, exc) from None
    except (
        ValueError,
        EOFError,
        KeyError,
        NotImplementedError,
        RuntimeError,
        zipfile.BadZipFile,
        zlib.error,
    ) as exc:
        raise _corrupt_npz(path, exc) from None
    class_names = None
    if names is not None:
        if names.ndim != 1:
            raise DataError(f"{path}: class_names must be 1-D, got shape {names.shape}")
        class_names = tuple(str(n) for n in names.tolist())
    return RawSplit(_as_images(x, str(path)), _as_labels(y, str(path)), class_names, str(path))


def _corrupt_npz(path: Path, exc: BaseException) -> DataError:
    return DataError(
        f"cannot read {path}: {type(exc).__name__}: {one_line(exc)}",
        "the file is truncated, corrupt or not an npz written by numpy (object arrays "
        "need pickle, which is never allowed)",
    )


def _as_images(x: np.ndarray, source: str) -> np.ndarray:
    """Return images as uint8 NHWC, converting grayscale [N, H, W] and floats in [0, 1]."""
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise DataError(
            f"{source}: x must be [N, H, W, C] or [N, H, W], got shape {x.shape}",
            "store images NHWC",
        )
    if x.shape[3] not in (1, 3):
        hint = "store images NHWC with 1 or 3 channels"
        if x.shape[1] in (1, 3):
            hint = "x looks NCHW; transpose it to NHWC with x.transpose(0, 2, 3, 1)"
        raise DataError(f"{source}: x has {x.shape[3]} channels (shape {x.shape})", hint)
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x)
    if np.issubdtype(x.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(x)))
        if bad:
            raise DataError(
                f"{source}: x contains {bad} NaN or Inf values",
                "images must be uint8, or floats that are finite and within [0, 1]",
            )
        lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
        if lo < 0.0 or hi > 1.0:
            raise DataError(
                f"{source}: float x spans [{lo:g}, {hi:g}], outside [0, 1]",
                "store uint8 pixels 0..255, or floats scaled to [0, 1]",
            )
        return np.rint(x * 255.0).astype(np.uint8)
    if np.issubdtype(x.dtype, np.integer) and x.dtype != np.bool_:
        lo, hi = (int(x.min()), int(x.max())) if x.size else (0, 0)
        if lo < 0 or hi > 255:
            raise DataError(f"{source}: integer x spans [{lo}, {hi}], outside 0..255")
        return x.astype(np.uint8)
    raise DataError(f"{source}: x has dtype {x.dtype}", "images must be uint8")


def _as_labels(y: np.ndarray, source: str) -> np.ndarray:
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DataError(f"{source}: y must be [N], got shape {y.shape}", "store class indices")
    if not np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_:
        raise DataError(f"{source}: y has dtype {y.dtype}", "labels must be integer class indices")
    return y.astype(np.int64)

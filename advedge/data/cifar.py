"""The cifar-python format: the official CIFAR-10 and CIFAR-100 python batches.

CIFAR-10 is ``data_batch_1..5``, ``test_batch`` and ``batches.meta``; CIFAR-100 is ``train``,
``test`` and ``meta`` (fine labels). They are pickles, read with an unpickler that refuses every
global except numpy's array reconstruction.
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from advedge.data.formats import RawSplit, cifar_layout, join_splits, natural_key
from advedge.data.messages import describe, one_line, read_error
from advedge.errors import DataError

__all__ = ["read_cifar_dir"]

# The official batches are pickles of dicts, lists, bytes and numpy arrays. A numpy array
# pickles as a call to numpy's ``_reconstruct`` with ``ndarray`` and ``dtype``; these three
# (under their numpy 1 and numpy 2 module names) are the only globals ever resolved.
_NUMPY_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(0))[0]
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _NUMPY_RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _NUMPY_RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _RefusedGlobal(pickle.UnpicklingError):
    pass


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickler that resolves only numpy's array-reconstruction globals and refuses the rest."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise _RefusedGlobal(f"{module}.{name}") from None


def _unpickle(path: Path) -> Any:
    try:
        with open(path, "rb") as fh:
            return _ArraysOnlyUnpickler(fh, encoding="bytes").load()
    except _RefusedGlobal as exc:
        raise DataError(
            f"refusing to unpickle {path}: it references the global {exc}, which a CIFAR "
            "batch never does",
            "the file is not an official CIFAR batch; get it from the official source",
        ) from None
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, MemoryError) as exc:  # fmt: skip
        if isinstance(exc, OSError) and exc.errno is not None:  # permission, missing file, ...
            raise read_error(exc, path) from None
        raise DataError(
            f"cannot read CIFAR batch {path}: {type(exc).__name__}: {one_line(exc)}",
            "the file is truncated or corrupt; download it again",
        ) from None


def _field(batch: dict[Any, Any], key: str) -> Any:
    if key.encode() in batch:
        return batch[key.encode()]
    return batch.get(key)


def _read_cifar_batch(path: Path, label_key: str) -> RawSplit:
    batch = _unpickle(path)
    if not isinstance(batch, dict):
        raise DataError(f"{path} is not a CIFAR batch (a {type(batch).__name__}, not a dict)")
    data = _field(batch, "data")
    labels = _field(batch, label_key)
    if data is None or labels is None:
        raise DataError(
            f"{path} has no {'data' if data is None else label_key!r} entry",
            "expected the official CIFAR python batch layout",
        )
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise DataError(f"{path}: data must be a uint8 array [N, 3*H*W], got {describe(data)}")
    side = math.isqrt(data.shape[1] // 3)
    if data.shape[1] % 3 or side * side * 3 != data.shape[1]:
        raise DataError(f"{path}: rows of {data.shape[1]} bytes are not square RGB images")
    x = np.ascontiguousarray(data.reshape(-1, 3, side, side).transpose(0, 2, 3, 1))
    try:
        y = np.asarray(labels, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path}: labels are not integers ({one_line(exc)})") from None
    return RawSplit(x, y, None, str(path))


def _read_cifar_names(path: Path, key: str) -> tuple[str, ...] | None:
    if not path.is_file():
        return None
    meta = _unpickle(path)
    names = _field(meta, key) if isinstance(meta, dict) else None
    if not isinstance(names, list):
        raise DataError(f"{path} has no {key!r} list", "expected the official CIFAR meta file")
    return tuple(n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names)


def read_cifar_dir(path: Path) -> tuple[RawSplit | None, RawSplit | None]:
    """Read the ``(train, test)`` splits of a CIFAR python directory; a missing one is None.

    Raises:
        DataError: for a batch that is refused (a foreign global, a wrong layout, corrupt).
    """
    layout = cifar_layout(path)
    assert layout is not None  # detect_format said cifar-python
    folder, kind = layout
    if kind == "cifar10":
        label_key, names = "labels", _read_cifar_names(folder / "batches.meta", "label_names")
        train_files = sorted(folder.glob("data_batch_*"), key=natural_key)
        test_file = folder / "test_batch"
    else:
        label_key, names = "fine_labels", _read_cifar_names(folder / "meta", "fine_label_names")
        train_files = [folder / "train"] if (folder / "train").is_file() else []
        test_file = folder / "test"
    train = None
    if train_files:
        parts = [_read_cifar_batch(p, label_key)._replace(class_names=names) for p in train_files]
        train = join_splits(parts)
    test = _read_cifar_batch(test_file, label_key) if test_file.is_file() else None
    return train, None if test is None else test._replace(class_names=names)

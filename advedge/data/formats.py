"""What the three on-disk formats share: detection, the bounds on untrusted numbers, and the
checks that turn the raw splits a reader returns into a :class:`~advedge.data.arrays.Dataset`.

The readers of each format live in :mod:`advedge.data.npz`, :mod:`advedge.data.cifar` and
:mod:`advedge.data.image_folder`; each returns ``(train, test)`` as :class:`RawSplit` values
(either may be None), and :func:`assemble` validates them against each other.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from advedge.data.arrays import Dataset, ImageArrays
from advedge.errors import DataError

__all__ = [
    "FORMATS",
    "IMAGE_EXTENSIONS",
    "LOOKED_FOR",
    "MAX_ARRAY_ELEMENTS",
    "MAX_CLASSES",
    "MAX_IMAGE_SIZE",
    "MIN_IMAGE_SIZE",
    "RawSplit",
    "assemble",
    "cifar_layout",
    "class_dirs",
    "detect_format",
    "join_splits",
    "natural_key",
]

FORMATS: tuple[str, ...] = ("npz", "cifar-python", "image-folder")
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

# Bounds on what untrusted files may ask for. Every number below is checked when a dataset is
# loaded, before any array is allocated (npz headers) and before any model is built.
MAX_CLASSES = 100_000
"""The most classes a dataset may have, from ``class_names`` or derived as ``max(y) + 1``.

ImageNet-21k has about 21,800 classes; 100,000 leaves room for any real classification set
while keeping a classifier head (``feature_dim x num_classes`` weights) to a few hundred MB. A
label of ``1e9`` without ``class_names`` would otherwise ask for a billion-class model."""

MAX_ARRAY_ELEMENTS = 2**31
"""The most elements one array of an npz file may declare in its header (2 GiB of uint8)."""

MAX_IMAGE_SIZE = 8192
"""The largest image height and width a dataset (or a checkpoint's ``input_shape``) may have.

Far beyond any classifier input; exporters and benchmarks allocate inputs of the recorded shape,
and a checkpoint trained on the data must stay loadable."""

MIN_IMAGE_SIZE = 2
"""The smallest image height and width a dataset may have.

It is the smallest input the forward pass of every registered model accepts (``tiny_cnn``
max-pools by 2; a 1x1 image makes its pooled map empty). Each architecture's own minimum, which
can be larger in training mode, is checked against the data by
:func:`advedge.models.registry.check_input_size`."""

LOOKED_FOR = (
    "npz (test.npz with train.npz or train-*.npz), "
    "cifar-python (data_batch_1..5 + test_batch, train + test + meta, "
    "or a cifar-10-batches-py/ or cifar-100-python/ folder), "
    "image-folder (train/<class>/*.png and test/<class>/*.png)"
)
"""What detection looks for, named in the messages about a directory that holds no dataset."""


class RawSplit(NamedTuple):
    """One split as a reader returns it, before the checks of :func:`assemble`.

    Attributes:
        x: uint8 images, NHWC.
        y: int64 labels, shape ``[N]``.
        class_names: The names the file lists, or None.
        source: What it was read from, for error messages.
    """

    x: np.ndarray
    y: np.ndarray
    class_names: tuple[str, ...] | None
    source: str


def detect_format(path: Path | str | os.PathLike[str]) -> str:
    """Tell which of the three dataset formats a directory holds.

    Args:
        path: The dataset directory.

    Returns:
        ``"npz"``, ``"cifar-python"`` or ``"image-folder"``.

    Raises:
        DataError: if the directory is missing, empty, or holds none of the formats; the
            message names the files that were looked for.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(
            f"dataset directory not found: {path}",
            "check the path; give a directory of npz shards, CIFAR batches or class folders",
        )
    if not path.is_dir():
        raise DataError(f"not a directory: {path}", "give the directory that holds the dataset")
    if (
        (path / "test.npz").is_file()
        or (path / "train.npz").is_file()
        or any(path.glob("train-*.npz"))
    ):
        return "npz"
    if cifar_layout(path) is not None:
        return "cifar-python"
    if any(class_dirs(path / split) for split in ("train", "test")):
        return "image-folder"
    if not any(not p.name.startswith(".") for p in path.iterdir()):
        raise DataError(
            f"dataset directory is empty: {path}", f"put one of these in it: {LOOKED_FOR}"
        )
    raise DataError(
        f"no dataset in a known format in {path}; looked for {LOOKED_FOR}",
        "convert the data to npz shards (keys x uint8 NHWC, y int64)",
    )


def cifar_layout(path: Path) -> tuple[Path, str] | None:
    """Return ``(batch directory, "cifar10" | "cifar100")`` for a CIFAR python layout."""
    if (path / "data_batch_1").is_file() or (path / "test_batch").is_file():
        return path, "cifar10"
    if (path / "test").is_file() or ((path / "train").is_file() and (path / "meta").is_file()):
        return path, "cifar100"
    nested = [
        (path / sub, kind)
        for sub, kind in (("cifar-10-batches-py", "cifar10"), ("cifar-100-python", "cifar100"))
        if (path / sub).is_dir() and cifar_layout(path / sub) is not None
    ]
    if len(nested) > 1:
        raise DataError(
            f"{path} holds both cifar-10-batches-py/ and cifar-100-python/",
            "point at one of the two folders",
        )
    return nested[0] if nested else None


def class_dirs(split_dir: Path) -> list[Path]:
    """Return the class folders of an image-folder split (none if it is missing), by name."""
    if not split_dir.is_dir():
        return []
    return sorted(
        (p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: p.name,
    )


def join_splits(parts: list[RawSplit]) -> RawSplit:
    """Concatenate the shards of one split, in order.

    Raises:
        DataError: if two shards differ in image shape or in ``class_names``.
    """
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    for part in parts[1:]:
        if part.x.shape[1:] != first.x.shape[1:]:
            raise DataError(
                f"image shape {part.x.shape[1:]} in {part.source} differs from "
                f"{first.x.shape[1:]} in {first.source}",
                "all shards must hold images of one shape",
            )
        if part.class_names != first.class_names:
            raise DataError(
                f"class_names in {part.source} differ from those in {first.source}",
                "all shards must list the same classes",
            )
    source = f"{first.source} .. {Path(parts[-1].source).name} ({len(parts)} shards)"
    return RawSplit(
        np.concatenate([p.x for p in parts]),
        np.concatenate([p.y for p in parts]),
        first.class_names,
        source,
    )


def assemble(
    name: str, root: Path, fmt: str, train: RawSplit | None, test: RawSplit | None
) -> Dataset:
    """Validate both splits against each other and build the :class:`Dataset`.

    Every bound on untrusted numbers is checked here, when the dataset is loaded: the image
    size (from :data:`MIN_IMAGE_SIZE` to :data:`MAX_IMAGE_SIZE`), no negative label, and at most
    :data:`MAX_CLASSES` classes, whether listed in ``class_names`` or derived from the largest
    label.

    Args:
        name: The dataset's name.
        root: The directory it was read from.
        fmt: Its format (one of :data:`FORMATS`).
        train: The training split, if the directory has one.
        test: The test split (a missing one is refused).

    Returns:
        The dataset; without ``class_names`` the classes are named ``"0"``, ``"1"``, ...

    Raises:
        DataError: for the first check that fails, in one line naming the file.
    """
    if test is None:
        raise DataError(
            f"{root} has no test split ({fmt} format)",
            "a test split is required: test.npz, test_batch / test, or test/<class>/",
        )
    splits = [s for s in (train, test) if s is not None]
    for split in splits:
        _check_images(split)
    if train is not None and train.x.shape[1:] != test.x.shape[1:]:
        raise DataError(
            f"image shapes differ: {train.source} has {train.x.shape[1:]} (HWC), "
            f"{test.source} has {test.x.shape[1:]}",
            "all images of a dataset must share one shape",
        )
    class_names, num_classes = _classes(splits)
    for split in splits:
        _check_labels(split, num_classes, named=class_names is not None)
    names = class_names if class_names is not None else tuple(str(i) for i in range(num_classes))
    return Dataset(
        name=name,
        root=root,
        format=fmt,
        train=None if train is None else ImageArrays(train.x, train.y, names),
        test=ImageArrays(test.x, test.y, names),
    )


def _check_images(split: RawSplit) -> None:
    """Refuse an empty split, a label count that differs, and images out of the size bounds."""
    if len(split.x) == 0:
        raise DataError(f"{split.source} holds no images", "remove it or add images")
    if len(split.x) != len(split.y):
        raise DataError(
            f"{split.source}: {len(split.x)} images but {len(split.y)} labels",
            "x and y must have the same length",
        )
    height, width = int(split.x.shape[1]), int(split.x.shape[2])
    if height < MIN_IMAGE_SIZE or width < MIN_IMAGE_SIZE:
        raise DataError(
            f"{split.source}: images are {height}x{width} (HxW), smaller than the minimum "
            f"{MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE}",
            "the models need images of at least "
            f"{MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE} pixels (32x32 is usual); resize them",
        )
    if height > MAX_IMAGE_SIZE or width > MAX_IMAGE_SIZE:
        raise DataError(
            f"{split.source}: images are {height}x{width} (HxW), larger than the maximum "
            f"{MAX_IMAGE_SIZE}x{MAX_IMAGE_SIZE}",
            "resize them to the classifier's input size",
        )


def _classes(splits: list[RawSplit]) -> tuple[tuple[str, ...] | None, int]:
    """Return ``(class_names or None, number of classes)``, bounded by :data:`MAX_CLASSES`.

    The count comes from ``class_names`` where a split lists them (both must list the same),
    else from the largest label; it is checked before anything per class is built.
    """
    named = [s for s in splits if s.class_names is not None]
    if len(named) == 2 and named[0].class_names != named[1].class_names:
        raise DataError(
            f"class_names differ between {named[0].source} and {named[1].source}",
            "both splits must list the same classes in the same order",
        )
    class_names = named[0].class_names if named else None
    if class_names is not None:
        num_classes = len(class_names)
        if num_classes == 0:
            raise DataError(f"{named[0].source}: class_names is empty")
        if num_classes > MAX_CLASSES:
            raise DataError(
                f"{named[0].source}: class_names lists {num_classes} classes, more than the "
                f"{MAX_CLASSES} advedge supports",
                "class_names must list one name per class",
            )
        return class_names, num_classes
    top = max(splits, key=lambda s: int(s.y.max()))
    largest = int(top.y.max())
    if largest >= MAX_CLASSES:
        raise DataError(
            f"{top.source}: label {largest} would make {largest + 1} classes, more than "
            f"the {MAX_CLASSES} advedge supports",
            "labels must be class indices 0..K-1; store class_names to say K",
        )
    return None, largest + 1


def _check_labels(split: RawSplit, num_classes: int, *, named: bool) -> None:
    """Refuse labels outside ``[0, num_classes)``, naming how many and one of them."""
    outside = (split.y < 0) | (split.y >= num_classes)
    bad = int(np.count_nonzero(outside))
    if bad:
        where = f"class_names lists {num_classes}" if named else "labels"
        value = int(split.y[np.argmax(outside)])
        what = f"label {value}" + (", negative" if value < 0 else "")
        last = num_classes - 1 if num_classes > 0 else "K-1"
        raise DataError(
            f"{split.source}: {bad} labels outside [0, {num_classes}) (e.g. {what})",
            f"{where}; labels must be class indices 0..{last}",
        )


def natural_key(path: Path) -> list[Any]:
    """Sort key for file names with numbers in natural order (``train-2`` before ``train-10``)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]

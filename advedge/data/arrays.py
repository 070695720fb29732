"""In-memory datasets: the uint8 NHWC arrays of a split, a loaded dataset, stratified subsets.

Everything here is numpy; a torch tensor is accepted as subset indices without importing torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from advedge.data.messages import describe
from advedge.errors import DataError, UsageError

if TYPE_CHECKING:  # torch is imported where it is used: the deploy side reads data without it
    import torch

__all__ = ["Dataset", "ImageArrays", "stratified_subset"]


@dataclass(frozen=True, eq=False)
class ImageArrays:
    """One split of a dataset, held in memory.

    Attributes:
        x: uint8 images, NHWC; grayscale is stored with C = 1. C is 1 or 3.
        y: int64 labels, shape ``[N]``.
        class_names: one name per class, in label order.

    Raises:
        DataError: if the arrays do not have these dtypes and shapes.
    """

    x: np.ndarray
    y: np.ndarray
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.x, np.ndarray) or self.x.dtype != np.uint8 or self.x.ndim != 4:
            raise DataError(
                f"images must be a uint8 array [N, H, W, C], got {describe(self.x)}",
                "convert with np.asarray(x, dtype=np.uint8)",
            )
        if self.x.shape[3] not in (1, 3):
            raise DataError(f"images must have 1 or 3 channels (NHWC), got shape {self.x.shape}")
        if not isinstance(self.y, np.ndarray) or self.y.dtype != np.int64 or self.y.ndim != 1:
            raise DataError(f"labels must be an int64 array [N], got {describe(self.y)}")
        if len(self.x) != len(self.y):
            raise DataError(f"{len(self.x)} images but {len(self.y)} labels")
        object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def num_classes(self) -> int:
        """Number of classes: ``len(class_names)``, or the largest label + 1 without names."""
        if self.class_names:
            return len(self.class_names)
        return int(self.y.max()) + 1 if len(self.y) else 0

    @property
    def channels(self) -> int:
        """Number of colour channels (1 or 3)."""
        return int(self.x.shape[3])

    @property
    def image_size(self) -> tuple[int, int]:
        """Image height and width."""
        return int(self.x.shape[1]), int(self.x.shape[2])

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> ImageArrays:
        """Return the examples at ``indices`` (integer positions or a boolean mask), in that order.

        Raises:
            UsageError: if ``indices`` is neither integers nor a boolean mask.
        """
        if hasattr(indices, "detach"):  # a torch tensor, without importing torch
            indices = indices.detach().cpu().numpy()
        idx = np.asarray(indices)
        if idx.size == 0:
            idx = idx.astype(np.int64)
        if idx.dtype != np.bool_ and not np.issubdtype(idx.dtype, np.integer):
            raise UsageError(f"subset indices must be integers or a boolean mask, got {idx.dtype}")
        return ImageArrays(self.x[idx], self.y[idx], self.class_names)


@dataclass(frozen=True, eq=False)
class Dataset:
    """A loaded dataset: a test split and, usually, a training split.

    Attributes:
        name: The named dataset (``"cifar10"``) or the directory name.
        root: The directory it was loaded from.
        format: ``"npz"``, ``"cifar-python"`` or ``"image-folder"``.
        train: The training split, or None if the directory holds only a test split.
        test: The test split.
    """

    name: str
    root: Path
    format: str
    train: ImageArrays | None
    test: ImageArrays

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return self.test.num_classes

    @property
    def channels(self) -> int:
        """Number of colour channels (1 or 3)."""
        return self.test.channels

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Model input shape ``(C, H, W)``."""
        height, width = self.test.image_size
        return self.channels, height, width

    @property
    def class_names(self) -> tuple[str, ...]:
        """Class names in label order."""
        return self.test.class_names


def stratified_subset(arrays: ImageArrays, n: int, seed: int) -> ImageArrays:
    """Pick ``n`` examples with the classes as balanced as their sizes allow.

    Per-class counts differ by at most one, except where a class has too few examples (it then
    gives all it has and the others share the rest). The chosen examples keep their original
    order. The result depends only on ``arrays``, ``n`` and ``seed``.

    Args:
        arrays: The split to draw from.
        n: How many examples to keep; ``n >= len(arrays)`` keeps all of them.
        seed: Seed of the draw.

    Returns:
        The subset.

    Raises:
        UsageError: if ``n <= 0``.
    """
    if n <= 0:
        raise UsageError(f"subset size must be positive, got {n}")
    if n >= len(arrays):
        return arrays
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(arrays.y, return_counts=True)
    take = np.zeros_like(counts)
    remaining = n
    while remaining > 0:
        open_ = np.flatnonzero(take < counts)
        share = remaining // len(open_)
        if share == 0:  # fewer examples left than open classes: one each to a random few
            take[rng.choice(open_, size=remaining, replace=False)] += 1
            break
        add = np.minimum(share, counts[open_] - take[open_])
        take[open_] += add
        remaining -= int(add.sum())
    chosen = [
        rng.permutation(np.flatnonzero(arrays.y == cls))[:k]
        for cls, k in zip(classes, take, strict=True)
        if k
    ]
    return arrays.subset(np.sort(np.concatenate(chosen)))

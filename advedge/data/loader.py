"""From uint8 arrays to float tensors: conversion, batch augmentation and batching on a device.

Torch is imported inside the functions that use it, so that importing :mod:`advedge.data` (as
the deploy side does) does not import torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from advedge.errors import UsageError

if TYPE_CHECKING:
    import torch

    from advedge.data.arrays import ImageArrays

__all__ = ["BatchLoader", "augment_batch", "to_tensor"]


def to_tensor(x_uint8_nhwc: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Turn uint8 NHWC images into float32 NCHW in [0, 1].

    Shape:
        ``[N, H, W, C]`` uint8 -> ``[N, C, H, W]`` float32.

    Raises:
        UsageError: if the input is not a 4-D uint8 array.
    """
    import torch

    x = x_uint8_nhwc
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if x.dtype != torch.uint8 or x.ndim != 4:
        raise UsageError(
            f"to_tensor expects uint8 images [N, H, W, C], got {x.dtype} of shape {tuple(x.shape)}"
        )
    return x.permute(0, 3, 1, 2).contiguous().to(torch.float32).div_(255.0)


def augment_batch(
    x: torch.Tensor,
    *,
    padding: int = 4,
    flip: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random crop with zero padding, then random horizontal flip, for a whole batch at once.

    Each image is zero-padded by ``padding`` on every side, cropped back to ``H x W`` at its own
    random offset (uniform in ``0..2*padding`` in each direction), and then mirrored left-right
    with probability 0.5. It is one gather on the input's device, with no per-sample loop and no
    padded copy. Random numbers come from ``generator`` (on its device) if given.

    Args:
        x: Float images in [0, 1].
        padding: Zero padding before the crop; 0 disables cropping.
        flip: Whether to flip at random.
        generator: Source of randomness, for reproducible batches.

    Returns:
        The augmented batch, a new tensor on the same device.

    Shape:
        ``[N, C, H, W]`` -> ``[N, C, H, W]``.

    Raises:
        UsageError: for a tensor that is not 4-D or a negative padding.
    """
    import torch

    if x.ndim != 4:
        raise UsageError(f"augment_batch expects [N, C, H, W], got shape {tuple(x.shape)}")
    if padding < 0:
        raise UsageError(f"padding must be >= 0, got {padding}")
    n, c, h, w = x.shape
    if n == 0 or (padding == 0 and not flip):
        return x.clone()
    rand_device = generator.device if generator is not None else x.device
    shifts = torch.randint(0, 2 * padding + 1, (2, n), generator=generator, device=rand_device)
    shifts = shifts.to(x.device) - padding
    mirrored = torch.rand(n, generator=generator, device=rand_device) < 0.5
    mirrored = mirrored.to(x.device) if flip else torch.zeros(n, dtype=torch.bool, device=x.device)
    rows = torch.arange(h, device=x.device).unsqueeze(0) + shifts[0].unsqueeze(1)  # [N, H]
    cols = torch.arange(w, device=x.device).unsqueeze(0).expand(n, w)
    cols = torch.where(mirrored.unsqueeze(1), w - 1 - cols, cols) + shifts[1].unsqueeze(1)
    inside = ((rows >= 0) & (rows < h)).unsqueeze(2) & ((cols >= 0) & (cols < w)).unsqueeze(1)
    flat = rows.clamp(0, h - 1).unsqueeze(2) * w + cols.clamp(0, w - 1).unsqueeze(1)  # [N, H, W]
    out = x.reshape(n, c, h * w).gather(2, flat.reshape(n, 1, h * w).expand(n, c, h * w))
    out = out.reshape(n, c, h, w)
    return torch.where(inside.unsqueeze(1), out, torch.zeros((), dtype=x.dtype, device=x.device))


class BatchLoader:
    """Batches of an in-memory split, as float NCHW tensors in [0, 1] on ``device``.

    The uint8 images are turned into one NCHW tensor once, here, and kept on ``device`` (a
    CIFAR-10 training set is 150 MB). Each batch is then an index, a conversion to float / 255
    and, if asked for, :func:`augment_batch`, all on the device.

    Under data parallelism each rank builds its own loader with the same ``seed``: the epoch's
    order depends only on ``seed + epoch`` (as in ``torch.utils.data.DistributedSampler``), the
    order is padded by wrapping around to a multiple of ``world_size``, and rank ``r`` takes
    every ``world_size``-th index starting at ``r``. Call :meth:`set_epoch` before each epoch.

    Args:
        arrays: The split to iterate.
        batch_size: Examples per batch.
        shuffle: Whether each epoch has its own random order.
        augment: Whether to apply :func:`augment_batch` (crop and flip).
        seed: Seed of the order and the augmentation.
        drop_last: Whether to drop the last, smaller batch.
        device: Where the batches go.
        rank: This process's rank.
        world_size: Number of processes.

    Raises:
        UsageError: for a non-positive batch size or world size, or a rank out of range.
    """

    def __init__(
        self,
        arrays: ImageArrays,
        batch_size: int,
        *,
        shuffle: bool,
        augment: bool,
        seed: int = 0,
        drop_last: bool = False,
        device: torch.device | str = "cpu",
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size <= 0:
            raise UsageError(f"batch size must be positive, got {batch_size}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise UsageError(f"rank {rank} is not in a world of size {world_size}")
        if len(arrays) == 0:
            raise UsageError("cannot iterate an empty split")
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.seed = seed
        self.drop_last = drop_last
        import torch

        self.device = torch.device(device)
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.num_examples = len(arrays)
        self._x = torch.from_numpy(arrays.x).permute(0, 3, 1, 2).contiguous().to(self.device)
        self._y = torch.from_numpy(arrays.y).to(self.device)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order (and augmentation) the next iteration uses."""
        self.epoch = epoch

    @property
    def samples_per_rank(self) -> int:
        """Examples this rank sees per epoch, padding included."""
        return math.ceil(self.num_examples / self.world_size)

    def __len__(self) -> int:
        if self.drop_last:
            return self.samples_per_rank // self.batch_size
        return math.ceil(self.samples_per_rank / self.batch_size)

    def indices(self) -> torch.Tensor:
        """Return this rank's example indices for the current epoch, in order."""
        import torch

        n = self.num_examples
        if self.shuffle:
            gen = torch.Generator()
            gen.manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=gen)
        else:
            order = torch.arange(n)
        total = self.samples_per_rank * self.world_size
        if total > n:
            order = torch.cat([order, order.repeat(math.ceil((total - n) / n))[: total - n]])
        return order[self.rank : total : self.world_size]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        import torch

        order = self.indices().to(self.device)
        generator = None
        if self.augment:
            generator = torch.Generator(device=self.device)
            state = np.random.SeedSequence([self.seed, self.epoch, self.rank]).generate_state(2)
            generator.manual_seed(int(state[0]) << 32 | int(state[1]))
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            x = self._x.index_select(0, idx).to(torch.float32).div_(255.0)
            if generator is not None:
                x = augment_batch(x, generator=generator)
            yield x, self._y.index_select(0, idx)

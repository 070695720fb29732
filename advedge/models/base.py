"""The classifier base class and its first layer, the in-graph mean/std normalisation.

Every advedge model takes float images in [0, 1], NCHW, and normalises them itself, so attacks,
purifiers and exported graphs all work in pixel space. The data flow is kept plain for
``torch.onnx`` and ``torch.compile``: no Python-side control flow that depends on tensor values,
no in-place operations, and global average pooling to 1x1 so that any input of 16x16 or larger
works.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from advedge.errors import UsageError

logger = logging.getLogger(__name__)

__all__ = [
    "ImageClassifier",
    "Normalize",
    "channel_values",
    "common_args",
    "init_weights",
    "stack_stages",
]


def channel_values(values: Sequence[float], what: str) -> list[float]:
    """Check a per-channel statistic (a sequence, array or 1-D tensor) and return its floats.

    Raises:
        UsageError: if ``values`` is a string, a scalar, empty or has a non-finite entry.
    """
    if isinstance(values, (str, bytes)):
        raise UsageError(f"{what} must be a sequence of numbers, got {values!r}")
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        raise UsageError(f"{what} must be a sequence of numbers, got {values!r}") from None
    if not out:
        raise UsageError(f"{what} must not be empty")
    if not all(math.isfinite(v) for v in out):
        raise UsageError(f"{what} must be finite, got {values!r}")
    return out


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std``, the first layer of every advedge model.

    ``mean`` and ``std`` are registered buffers shaped ``[1, C, 1, 1]`` (saved in the state dict,
    never trained), so the operation exports to ONNX as one broadcast ``Sub`` and one ``Div``.

    Args:
        mean: Per-channel mean, one value per input channel.
        std: Per-channel standard deviation, one positive value per input channel.

    Raises:
        UsageError: if the lengths differ, a value is not finite, or a ``std`` is not positive.
    """

    mean: Tensor
    std: Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean_values = channel_values(mean, "mean")
        std_values = channel_values(std, "std")
        if len(mean_values) != len(std_values):
            raise UsageError(
                f"mean has {len(mean_values)} values but std has {len(std_values)}",
                "give one value per input channel",
            )
        if any(s <= 0 for s in std_values):
            raise UsageError(f"std must be positive, got {list(std)!r}")
        channels = len(mean_values)
        self.register_buffer("mean", torch.tensor(mean_values).view(1, channels, 1, 1))
        self.register_buffer("std", torch.tensor(std_values).view(1, channels, 1, 1))

    @property
    def channels(self) -> int:
        """The number of channels this layer normalises."""
        return int(self.mean.shape[1])

    def forward(self, x: Tensor) -> Tensor:
        """Normalise a batch of images.

        Args:
            x: Images in [0, 1].

        Returns:
            ``(x - mean) / std``.

        Shape:
            x ``[N, C, H, W]`` -> ``[N, C, H, W]``.
        """
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        mean = ", ".join(f"{v:.4g}" for v in self.mean.flatten().tolist())
        std = ", ".join(f"{v:.4g}" for v in self.std.flatten().tolist())
        return f"mean=({mean}), std=({std})"


def init_weights(module: nn.Module) -> None:
    """Initialise a network in place: the convention of every advedge architecture.

    Convolutions get Kaiming-normal weights (``mode="fan_out"``, ReLU gain) and zero biases;
    batch norms get weight 1 and bias 0; linear layers keep PyTorch's default initialisation.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def stack_stages(
    block: Callable[[int, int, int], nn.Module],
    channels: int,
    widths: Sequence[int],
    blocks: Sequence[int],
) -> tuple[nn.Sequential, int]:
    """Stages of residual blocks: stage ``i`` has ``blocks[i]`` blocks of ``widths[i]`` channels.

    The first stage keeps the resolution; every later one halves it with a stride-2 first block.

    Args:
        block: ``block(in_channels, out_channels, stride)`` builds one block.
        channels: Channels entering the first stage.
        widths: Output channels of each stage.
        blocks: Number of blocks in each stage.

    Returns:
        ``(stages, out_channels)``: an ``nn.Sequential`` of one ``nn.Sequential`` per stage.
    """
    if len(widths) != len(blocks):
        raise ValueError("widths and blocks must have the same length")
    stages: list[nn.Module] = []
    for i, (width, count) in enumerate(zip(widths, blocks, strict=True)):
        stride = 1 if i == 0 else 2
        layers: list[nn.Module] = []
        for j in range(count):
            layers.append(block(channels, width, stride if j == 0 else 1))
            channels = width
        stages.append(nn.Sequential(*layers))
    return nn.Sequential(*stages), channels


def common_args(
    num_classes: int, in_channels: int, mean: Sequence[float], std: Sequence[float]
) -> dict[str, Any]:
    """The four arguments every model factory passes on to its :class:`ImageClassifier`."""
    return {"num_classes": num_classes, "in_channels": in_channels, "mean": mean, "std": std}


class ImageClassifier(nn.Module):
    """Base class of every advedge classifier: images in [0, 1] to logits.

    The first child module is ``self.normalize`` (a :class:`Normalize`). Subclasses call
    ``super().__init__(mean=..., std=...)`` before creating any other layer, then implement
    :meth:`_features` (normalised images to pooled features ``[N, D]``) and define ``self.fc``,
    an ``nn.Linear(D, num_classes)`` head.

    ``arch`` and ``arch_kwargs`` are set by :func:`advedge.models.create_model`; they hold the
    registered name and the JSON-serialisable arguments that rebuild the same architecture with
    ``create_model(model.arch, **model.arch_kwargs)``. A model built by calling a class directly
    has ``arch == ""`` and empty ``arch_kwargs``.

    Args:
        mean: Per-channel mean of the training data.
        std: Per-channel standard deviation of the training data.
        num_classes: Number of classes, for :meth:`add_head`.
        in_channels: Input channels; must match ``mean`` (:attr:`in_channels` reads it back).
    """

    fc: nn.Linear

    def __init__(
        self,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        num_classes: int | None = None,
        in_channels: int | None = None,
    ) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        if in_channels is not None and in_channels != self.normalize.channels:
            raise UsageError(
                f"in_channels is {in_channels} but mean and std have "
                f"{self.normalize.channels} values",
                "give one value per input channel",
            )
        self.head_classes = num_classes
        self.arch: str = ""
        self.arch_kwargs: dict[str, Any] = {}

    @property
    def num_classes(self) -> int:
        """The number of logits the model outputs."""
        return int(self.fc.out_features)

    @property
    def in_channels(self) -> int:
        """The number of input channels (1 or 3)."""
        return self.normalize.channels

    @property
    def feature_dim(self) -> int:
        """The length of the penultimate feature vector, the input of the head."""
        return int(self.fc.in_features)

    def add_head(self, channels: int, num_classes: int | None = None) -> None:
        """Add global average pooling and the linear head, then :func:`init_weights` the model.

        Every architecture calls it last in ``__init__``, after its body. ``num_classes``
        defaults to the one given to ``__init__``.
        """
        classes = self.head_classes if num_classes is None else num_classes
        if classes is None:
            raise TypeError("add_head needs num_classes (give it to __init__ or here)")
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(channels, classes)
        init_weights(self)

    def _features(self, x: Tensor) -> Tensor:
        """Map normalised images to pooled features; implemented by every architecture.

        Shape:
            x ``[N, C, H, W]`` -> ``[N, feature_dim]``.
        """
        raise NotImplementedError

    def forward_features(self, x: Tensor) -> Tensor:
        """Penultimate features: normalisation, the body and global average pooling.

        Args:
            x: Images in [0, 1].

        Returns:
            Pooled features, the input of :meth:`forward_head`.

        Shape:
            x ``[N, C, H, W]`` -> ``[N, feature_dim]``.
        """
        return self._features(self.normalize(x))

    def forward_head(self, features: Tensor) -> Tensor:
        """Logits from pooled features.

        Shape:
            features ``[N, feature_dim]`` -> ``[N, num_classes]``.
        """
        return self.fc(features)

    def forward(self, x: Tensor) -> Tensor:
        """Classify a batch of images in [0, 1].

        Args:
            x: Images in [0, 1], NCHW, height and width at least 16.

        Returns:
            Logits (unnormalised scores).

        Shape:
            x ``[N, C, H, W]`` -> ``[N, num_classes]``.
        """
        return self.forward_head(self.forward_features(x))

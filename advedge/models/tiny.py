"""A tiny convolutional network for fast tests and smoke runs (under 2k parameters)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from advedge.models.base import ImageClassifier, common_args
from advedge.models.registry import register_model

logger = logging.getLogger(__name__)

__all__ = ["TinyCNN", "tiny_cnn"]


class TinyCNN(ImageClassifier):
    """conv3x3(8)-BN-ReLU, 2x2 max pooling, conv3x3(16)-BN-ReLU, global pooling, linear.

    Args:
        **common: ``num_classes``, ``in_channels``, ``mean`` and ``std``
            (:class:`~advedge.models.base.ImageClassifier`).
    """

    def __init__(self, **common: Any) -> None:
        super().__init__(**common)
        self.conv1 = nn.Conv2d(self.in_channels, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu1 = nn.ReLU()
        self.down = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 16, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.relu2 = nn.ReLU()
        self.add_head(16)

    def _features(self, x: Tensor) -> Tensor:
        """Two conv-BN-ReLU layers with max pooling between them, then global pooling.

        Shape:
            x ``[N, C, H, W]`` (normalised) -> ``[N, 16]``.
        """
        out = self.down(self.relu1(self.bn1(self.conv1(x))))
        out = self.relu2(self.bn2(self.conv2(out)))
        return self.flatten(self.pool(out))


@register_model
def tiny_cnn(
    *, num_classes: int, in_channels: int, mean: Sequence[float], std: Sequence[float]
) -> TinyCNN:
    """Tiny CNN for tests: two 3x3 convs (8 and 16 channels), about 1.6k parameters."""
    return TinyCNN(**common_args(num_classes, in_channels, mean, std))

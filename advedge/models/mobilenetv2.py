"""MobileNetV2 for 32x32 images (Sandler et al., "MobileNetV2: Inverted Residuals and Linear
Bottlenecks", CVPR 2018), the lightweight student of the robust-distillation papers.

The ImageNet network downsamples 32 times. The CIFAR variant used by ARD/RSLAD/AdaAD keeps the
stem at stride 1 and also sets the stride of the first stride-2 stage (24 channels) to 1, so a
32x32 input ends at 4x4 (8x downsampling). Channel counts are scaled by ``width_mult`` and rounded
to multiples of 8. A block has a residual connection only when it keeps the shape (stride 1,
same channels), as in the paper; the activation is ReLU6.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from advedge.errors import UsageError
from advedge.models.base import ImageClassifier, common_args
from advedge.models.registry import float_argument, register_model

logger = logging.getLogger(__name__)

__all__ = ["CIFAR_SETTINGS", "InvertedResidual", "MobileNetV2", "make_divisible", "mobilenetv2"]

CIFAR_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    # expansion t, channels c, blocks n, stride s of the first block
    (1, 16, 1, 1),
    (6, 24, 2, 1),  # stride 2 in the ImageNet network
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
"""The inverted-residual stages of the CIFAR variant."""


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round a channel count to the nearest multiple of ``divisor``, losing at most 10%.

    The result is at least ``divisor``; if rounding down lost more than 10% of ``value``, one
    more ``divisor`` is added.
    """
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def _conv_bn_relu6(
    in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1
) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(
            in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False
        ),
        nn.BatchNorm2d(out_channels),
        nn.ReLU6(),
    )


class InvertedResidual(nn.Module):
    """An inverted residual block: 1x1 expansion, 3x3 depthwise, 1x1 linear projection.

    The expansion is left out when ``expansion == 1``. The input is added to the output when
    the block keeps the shape (``stride == 1`` and ``in_channels == out_channels``).

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        stride: Stride of the depthwise convolution.
        expansion: Ratio of hidden to input channels.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(_conv_bn_relu6(in_channels, hidden, 1))
        layers += [
            _conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block.

        Shape:
            x ``[N, C_in, H, W]`` -> ``[N, C_out, H / stride, W / stride]``.
        """
        out = self.block(x)
        return x + out if self.use_residual else out


class MobileNetV2(ImageClassifier):
    """MobileNetV2, CIFAR variant (stride-1 stem, 8x downsampling).

    Args:
        width_mult: Multiplier of every channel count (rounded to multiples of 8); the last
            1x1 convolution keeps 1280 channels for ``width_mult <= 1``.
        **common: ``num_classes``, ``in_channels``, ``mean`` and ``std``
            (:class:`~advedge.models.base.ImageClassifier`).

    Raises:
        UsageError: if ``width_mult`` is not a number in (0, 4].
    """

    def __init__(self, width_mult: float = 1.0, **common: Any) -> None:
        width_mult = float_argument(width_mult, "width_mult")
        if not 0.0 < width_mult <= 4.0:
            raise UsageError(f"width_mult must lie in (0, 4], got {width_mult}")
        super().__init__(**common)
        channels = make_divisible(32 * width_mult)
        last_channels = make_divisible(1280 * max(1.0, width_mult))
        layers: list[nn.Module] = [_conv_bn_relu6(self.in_channels, channels, 3, 1)]
        for expansion, c, n, s in CIFAR_SETTINGS:
            out_channels = make_divisible(c * width_mult)
            for i in range(n):
                layers.append(
                    InvertedResidual(channels, out_channels, s if i == 0 else 1, expansion)
                )
                channels = out_channels
        layers.append(_conv_bn_relu6(channels, last_channels, 1))
        self.layers = nn.Sequential(*layers)
        self.add_head(last_channels)

    def _features(self, x: Tensor) -> Tensor:
        """Stem, inverted residual stages, last 1x1 convolution and global average pooling.

        Shape:
            x ``[N, C, H, W]`` (normalised) -> ``[N, 1280 * max(1, width_mult)]`` (rounded).
        """
        return self.flatten(self.pool(self.layers(x)))


@register_model
def mobilenetv2(
    *,
    num_classes: int,
    in_channels: int,
    mean: Sequence[float],
    std: Sequence[float],
    width_mult: float = 1.0,
) -> MobileNetV2:
    """MobileNetV2 (Sandler et al. 2018), CIFAR variant ending at 4x4, 2.2M parameters at 1.0."""
    return MobileNetV2(width_mult, **common_args(num_classes, in_channels, mean, std))

"""Wide residual networks (Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016).

WRN-d-k has a 16-channel 3x3 stem and three groups of ``n = (d - 4) / 6`` pre-activation basic
blocks with ``16k``, ``32k`` and ``64k`` channels (strides 1, 2, 2), then batch norm, ReLU, global
pooling and a linear head. WRN-34-10 is the usual robust teacher (TRADES, RSLAD, AdaAD).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from advedge.errors import UsageError
from advedge.models.base import ImageClassifier, common_args, stack_stages
from advedge.models.registry import ModelFactory, float_argument, int_argument, register_model

logger = logging.getLogger(__name__)

__all__ = ["WideBlock", "WideResNet", "wide_resnet", "wrn28_10", "wrn34_10"]


class WideBlock(nn.Module):
    """A pre-activation wide basic block with dropout between its two 3x3 convolutions.

    ``out = conv2(dropout(relu(bn2(conv1(a))))) + s``, where ``a = relu(bn1(x))``. When the shape
    changes, the shortcut ``s`` is a 1x1 convolution of ``a``; otherwise ``s = x``.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        stride: Stride of the first convolution and of the shortcut.
        dropout: Dropout probability between the convolutions.
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int = 1, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.shortcut: nn.Conv2d | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block.

        Shape:
            x ``[N, C_in, H, W]`` -> ``[N, C_out, H / stride, W / stride]``.
        """
        act = self.relu1(self.bn1(x))
        identity = x if self.shortcut is None else self.shortcut(act)
        out = self.relu2(self.bn2(self.conv1(act)))
        out = self.conv2(self.dropout(out))
        return out + identity


class WideResNet(ImageClassifier):
    """WRN-depth-widen_factor for 32x32 images.

    Args:
        depth: Total depth ``6n + 4``, for example 28 or 34.
        widen_factor: Channel multiplier ``k`` of the three groups (16k, 32k, 64k).
        dropout: Dropout probability inside each block.
        **common: ``num_classes``, ``in_channels``, ``mean`` and ``std``
            (:class:`~advedge.models.base.ImageClassifier`).

    Raises:
        UsageError: if ``depth`` is not ``6n + 4`` with ``n >= 1``, ``widen_factor < 1`` or
            ``dropout`` is outside [0, 1).
    """

    def __init__(self, depth: int, widen_factor: int, dropout: float = 0.0, **common: Any) -> None:
        depth = int_argument(depth, "depth")
        widen_factor = int_argument(widen_factor, "widen_factor", minimum=1)
        dropout = float_argument(dropout, "dropout")
        if depth < 10 or (depth - 4) % 6:
            raise UsageError(f"depth must be 6n + 4 (10, 16, 22, 28, 34, ...), got {depth}")
        if not 0.0 <= dropout < 1.0:
            raise UsageError(f"dropout must lie in [0, 1), got {dropout}")
        super().__init__(**common)
        n = (depth - 4) // 6
        widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = nn.Conv2d(self.in_channels, 16, 3, 1, 1, bias=False)
        self.layers, channels = stack_stages(
            lambda cin, cout, stride: WideBlock(cin, cout, stride, dropout), 16, widths, (n,) * 3
        )
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.add_head(channels)

    def _features(self, x: Tensor) -> Tensor:
        """Stem, three wide groups, final BN-ReLU and global average pooling.

        Shape:
            x ``[N, C, H, W]`` (normalised) -> ``[N, 64 * widen_factor]``.
        """
        out = self.layers(self.conv1(x))
        out = self.relu(self.bn(out))
        return self.flatten(self.pool(out))


@register_model
def wide_resnet(
    *,
    num_classes: int,
    in_channels: int,
    mean: Sequence[float],
    std: Sequence[float],
    depth: int = 34,
    widen_factor: int = 10,
    dropout: float = 0.0,
) -> WideResNet:
    """Wide ResNet WRN-depth-widen_factor (Zagoruyko & Komodakis 2016), any depth 6n + 4."""
    return WideResNet(
        depth, widen_factor, dropout, **common_args(num_classes, in_channels, mean, std)
    )


def _fixed_wrn(depth: int, description: str) -> ModelFactory:
    """A factory of WRN-``depth``-10 (its only own argument is ``dropout``)."""

    def factory(
        *,
        num_classes: int,
        in_channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        dropout: float = 0.0,
    ) -> WideResNet:
        return WideResNet(depth, 10, dropout, **common_args(num_classes, in_channels, mean, std))

    factory.__doc__ = description
    return factory


wrn34_10 = register_model("wrn34_10")(
    _fixed_wrn(
        34, "WRN-34-10 (Zagoruyko & Komodakis 2016), the usual robust teacher, 46.2M parameters."
    )
)
wrn28_10 = register_model("wrn28_10")(
    _fixed_wrn(28, "WRN-28-10 (Zagoruyko & Komodakis 2016), 36.5M parameters.")
)

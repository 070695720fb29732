"""Pre-activation ResNet-18 (He et al., "Identity Mappings in Deep Residual Networks", ECCV 2016).

Each block applies batch norm and ReLU *before* its convolutions, and the residual path is a
pure identity. Because the last block's output is therefore not activated, a final batch norm
and ReLU come before global pooling. The stem is the CIFAR one (3x3, stride 1, no max pooling),
as in the adversarial-training code bases (Rice et al. 2020, RSLAD).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from advedge.models.base import ImageClassifier, common_args, stack_stages
from advedge.models.registry import register_model

logger = logging.getLogger(__name__)

__all__ = ["PreActBlock", "PreActResNet", "preact_resnet18"]


class PreActBlock(nn.Module):
    """A pre-activation basic block: ``conv(relu(bn(conv(relu(bn(x)))))) + s(x)``.

    When the shape changes, the shortcut ``s`` is a 1x1 convolution with the block's stride
    applied to the pre-activated input ``relu(bn(x))``; otherwise it is the identity on ``x``.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        stride: Stride of the first convolution and of the shortcut.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()
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
        out = self.conv1(act)
        out = self.conv2(self.relu2(self.bn2(out)))
        return out + identity


class PreActResNet(ImageClassifier):
    """A CIFAR pre-activation ResNet with a final batch norm and ReLU before pooling.

    Args:
        widths, blocks, **common: As for :class:`~advedge.models.resnet.ResNet`, with
            pre-activation blocks.
    """

    def __init__(self, widths: Sequence[int], blocks: Sequence[int], **common: Any) -> None:
        super().__init__(**common)
        self.conv1 = nn.Conv2d(self.in_channels, widths[0], 3, 1, 1, bias=False)
        self.layers, channels = stack_stages(PreActBlock, widths[0], widths, blocks)
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.add_head(channels)

    def _features(self, x: Tensor) -> Tensor:
        """Stem, pre-activation stages, final BN-ReLU and global average pooling.

        Shape:
            x ``[N, C, H, W]`` (normalised) -> ``[N, widths[-1]]``.
        """
        out = self.layers(self.conv1(x))
        out = self.relu(self.bn(out))
        return self.flatten(self.pool(out))


@register_model
def preact_resnet18(
    *, num_classes: int, in_channels: int, mean: Sequence[float], std: Sequence[float]
) -> PreActResNet:
    """Pre-activation ResNet-18 (He et al. 2016b, CIFAR stem): [2, 2, 2, 2], 11.2M parameters."""
    return PreActResNet(
        (64, 128, 256, 512), (2, 2, 2, 2), **common_args(num_classes, in_channels, mean, std)
    )

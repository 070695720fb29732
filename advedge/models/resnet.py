"""CIFAR-style ResNets with basic blocks: ResNet-18, ResNet-20 and ResNet-8.

``resnet18`` is the CIFAR variant of He et al., "Deep Residual Learning for Image Recognition"
(CVPR 2016) used throughout the robust-distillation literature (ARD, RSLAD, AdaAD): a 3x3
stride-1 stem without max pooling, four stages of two basic blocks with 64, 128, 256 and 512
channels. ``resnet20`` and ``resnet8`` are the paper's own CIFAR networks (Section 4.2): three
stages of ``n`` basic blocks with 16, 32 and 64 channels, depth ``6n + 2``.

Every shortcut that changes the shape is a 1x1 convolution followed by batch norm (the paper's
option B) rather than option A's strided identity with zero-padded channels: it is a plain
Conv+BN that ONNX and TensorRT fuse, with no slicing or padding in the graph.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from advedge.models.base import ImageClassifier, common_args, stack_stages
from advedge.models.registry import register_model

logger = logging.getLogger(__name__)

__all__ = ["BasicBlock", "ResNet", "resnet8", "resnet18", "resnet20"]


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and a shortcut: ``relu(bn(conv(relu(bn(conv(x))))) + s(x))``.

    The shortcut ``s`` is the identity when the shape is kept, otherwise a 1x1 convolution with
    the block's stride followed by batch norm.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        stride: Stride of the first convolution and of the shortcut.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block.

        Shape:
            x ``[N, C_in, H, W]`` -> ``[N, C_out, H / stride, W / stride]``.
        """
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet(ImageClassifier):
    """A CIFAR ResNet: 3x3 stride-1 stem, stages of basic blocks, global pooling, linear head.

    The first stage keeps the resolution; each later stage halves it with a stride-2 first
    block.

    Args:
        widths: Channels of each stage; the stem has ``widths[0]`` channels.
        blocks: Number of basic blocks in each stage.
        **common: ``num_classes``, ``in_channels``, ``mean`` and ``std``
            (:class:`~advedge.models.base.ImageClassifier`).
    """

    def __init__(self, widths: Sequence[int], blocks: Sequence[int], **common: Any) -> None:
        super().__init__(**common)
        self.conv1 = nn.Conv2d(self.in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        self.layers, channels = stack_stages(BasicBlock, widths[0], widths, blocks)
        self.add_head(channels)

    def _features(self, x: Tensor) -> Tensor:
        """Stem, stages and global average pooling.

        Shape:
            x ``[N, C, H, W]`` (normalised) -> ``[N, widths[-1]]``.
        """
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        return self.flatten(self.pool(out))


@register_model
def resnet18(
    *, num_classes: int, in_channels: int, mean: Sequence[float], std: Sequence[float]
) -> ResNet:
    """ResNet-18 (CIFAR stem): basic blocks [2, 2, 2, 2], 64-512 channels, 11.2M parameters."""
    return ResNet(
        (64, 128, 256, 512), (2, 2, 2, 2), **common_args(num_classes, in_channels, mean, std)
    )


@register_model
def resnet20(
    *, num_classes: int, in_channels: int, mean: Sequence[float], std: Sequence[float]
) -> ResNet:
    """ResNet-20 (He et al. 2016, CIFAR): 3 stages of 3 basic blocks, 16/32/64 channels, 0.27M."""
    return ResNet((16, 32, 64), (3, 3, 3), **common_args(num_classes, in_channels, mean, std))


@register_model
def resnet8(
    *, num_classes: int, in_channels: int, mean: Sequence[float], std: Sequence[float]
) -> ResNet:
    """ResNet-8 (He et al. 2016, CIFAR): 3 stages of 1 basic block, 16/32/64 channels, 0.078M."""
    return ResNet((16, 32, 64), (1, 1, 1), **common_args(num_classes, in_channels, mean, std))

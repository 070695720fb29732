"""The IPCM purifier's networks: the inverse-perturbation generator and a PatchGAN discriminator.

The generator ``G`` maps an image ``x`` (adversarial or clean, pixel space [0, 1], NCHW) to a
bounded *inverse perturbation* ``r = eps_r * tanh(h(x))`` with ``||r||_inf <= eps_r``; the
purified image is ``x_hat = clamp(x + r, 0, 1)``. ``h`` is a small U-Net (Ronneberger et al.,
MICCAI 2015): stride-2 convolutions down, resize-then-convolve up, skip connections by
concatenation.

Both networks are built for export to ONNX and INT8 TensorRT engines:

- Upsampling is ``F.interpolate`` (nearest by default) followed by a 3x3 convolution, never a
  transposed convolution, whose INT8 kernels are slow or wrong on several TensorRT versions (and
  which leaves checkerboard artefacts; Odena et al., Distill 2016).
- The forward pass has no Python control flow that depends on tensor values. Each upsampling
  resizes to the exact size of its skip connection, so any input of at least ``2**depth``
  pixels per side works, including sizes that are not multiples of ``2**depth`` (28x28 MNIST).
- Convolution, batch norm and ReLU fuse into one TensorRT layer.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advedge.errors import UsageError, did_you_mean
from advedge.models.base import init_weights
from advedge.utils import parse_eps

logger = logging.getLogger(__name__)

__all__ = ["UPSAMPLE_MODES", "Discriminator", "Generator"]

UPSAMPLE_MODES = ("nearest", "bilinear")


def _check_int(value: Any, name: str, low: int, high: int) -> int:
    """Return ``value`` if it is an int in ``[low, high]``; raise :class:`UsageError` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise UsageError(f"{name} must lie in [{low}, {high}], got {value}")
    return value


def _conv_bn_relu(in_ch: int, out_ch: int, stride: int = 1) -> nn.Sequential:
    """conv3x3 (no bias) - BN - ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(),
    )


class _Up(nn.Module):
    """Resize to the skip's size, conv-BN-ReLU, concatenate the skip, conv-BN-ReLU.

    Args:
        in_ch: Channels of the coarse input.
        skip_ch: Channels of the skip connection; also the output width.
        mode: ``"nearest"`` or ``"bilinear"`` resizing.
    """

    def __init__(self, in_ch: int, skip_ch: int, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.reduce = _conv_bn_relu(in_ch, skip_ch)
        self.fuse = _conv_bn_relu(2 * skip_ch, skip_ch)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        """Shape: x ``[N, in_ch, h, w]``, skip ``[N, skip_ch, H, W]`` -> ``[N, skip_ch, H, W]``."""
        if self.mode == "nearest":
            x = F.interpolate(x, size=skip.shape[-2:], mode="nearest")
        else:
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.fuse(torch.cat([self.reduce(x), skip], dim=1))

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


class Generator(nn.Module):
    """IPCM generator: a small U-Net that outputs a bounded inverse perturbation.

    ``r = eps_r * tanh(h(2x - 1))`` and ``x_hat = clamp(x + r, 0, 1)``, so
    ``||r||_inf <= eps_r`` and ``||x_hat - x||_inf <= eps_r`` for every input, and ``x_hat``
    always lies in [0, 1].

    Layout (``w = width``, ``depth = 2``): two conv-BN-ReLU at full resolution (``w``
    channels), then per level a stride-2 conv-BN-ReLU and a conv-BN-ReLU doubling the width
    (``2w``, ``4w``); the decoder mirrors it with :class:`_Up` blocks (resize, conv, concatenate
    the skip, conv) and ends in a 1x1 convolution to ``in_channels``. The output convolution is
    zero-initialised, so an untrained generator is the identity (``r = 0``) and purification
    starts from the clean classifier's accuracy. With ``width=32, depth=2`` it has about 0.47M
    parameters.

    Args:
        in_channels: Image channels (1 or 3, any positive number works).
        width: Channels of the first level; doubled at each downsampling. 4 to 256.
        eps_r: Bound of the inverse perturbation in pixel units, in (0, 1]; a number or a
            fraction string such as ``"16/255"``.
        depth: Number of stride-2 downsamplings, 1 to 4. Inputs need at least ``2**depth``
            pixels per side.
        upsample: ``"nearest"`` (default; the cheapest TensorRT resize) or ``"bilinear"``.

    Raises:
        UsageError: if an argument is out of range or ``eps_r`` is not a finite number in
            (0, 1].
    """

    def __init__(
        self,
        in_channels: int = 3,
        width: int = 32,
        *,
        eps_r: float | str,
        depth: int = 2,
        upsample: str = "nearest",
    ) -> None:
        super().__init__()
        self.in_channels = _check_int(in_channels, "in_channels", 1, 64)
        self.width = _check_int(width, "width", 4, 256)
        self.depth = _check_int(depth, "depth", 1, 4)
        self.eps_r = parse_eps(eps_r, name="eps_r")
        if upsample not in UPSAMPLE_MODES:
            raise UsageError(
                f"unknown upsample mode {upsample!r}", did_you_mean(str(upsample), UPSAMPLE_MODES)
            )
        self.upsample = upsample

        widths = [width * 2**i for i in range(depth + 1)]
        self.stem = nn.Sequential(_conv_bn_relu(in_channels, width), _conv_bn_relu(width, width))
        self.down = nn.ModuleList(
            nn.Sequential(
                _conv_bn_relu(widths[i], widths[i + 1], 2),
                _conv_bn_relu(widths[i + 1], widths[i + 1]),
            )
            for i in range(depth)
        )
        self.up = nn.ModuleList(
            _Up(widths[i + 1], widths[i], upsample) for i in reversed(range(depth))
        )
        self.out = nn.Conv2d(width, in_channels, 1)
        init_weights(self)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def config(self) -> dict[str, Any]:
        """The constructor arguments: ``Generator(**g.config())`` rebuilds the architecture.

        Every value is JSON-serialisable, for checkpoint metadata.
        """
        return {
            "in_channels": self.in_channels,
            "width": self.width,
            "eps_r": self.eps_r,
            "depth": self.depth,
            "upsample": self.upsample,
        }

    def raw(self, x: Tensor) -> Tensor:
        """The unbounded output ``h`` of the U-Net, before ``eps_r * tanh``.

        Shape:
            x ``[N, C, H, W]`` -> ``[N, C, H, W]``.
        """
        out = self.stem(x * 2 - 1)
        skips = [out]
        for block in self.down:
            out = block(out)
            skips.append(out)
        skips.pop()
        for block in self.up:
            out = block(out, skips.pop())
        return self.out(out)

    def residual(self, x: Tensor) -> Tensor:
        """The inverse perturbation ``r = eps_r * tanh(h(x))``, ``||r||_inf <= eps_r``.

        Args:
            x: Images in [0, 1].

        Shape:
            x ``[N, C, H, W]`` -> ``[N, C, H, W]``.
        """
        return self.eps_r * torch.tanh(self.raw(x))

    def purify_with_residual(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(x_hat, r)`` with ``x_hat = clamp(x + r, 0, 1)``.

        Shape:
            x ``[N, C, H, W]`` -> (``[N, C, H, W]``, ``[N, C, H, W]``).
        """
        r = self.residual(x)
        return torch.clamp(x + r, 0.0, 1.0), r

    def forward(self, x: Tensor) -> Tensor:
        """Purify a batch of images in [0, 1]: ``x_hat = clamp(x + r, 0, 1)``.

        Shape:
            x ``[N, C, H, W]`` -> ``[N, C, H, W]``.
        """
        return self.purify_with_residual(x)[0]

    def extra_repr(self) -> str:
        return f"eps_r={self.eps_r:.6g}"


class Discriminator(nn.Module):
    """PatchGAN discriminator (Isola et al., CVPR 2017): one real/fake logit per image patch.

    ``n_down`` stride-2 4x4 convolutions (the first without batch norm), then a stride-1 3x3
    conv-BN-LeakyReLU and a 3x3 convolution to one channel; LeakyReLU slope 0.2. Inputs are
    mapped to [-1, 1] first. For a 32x32 input and ``n_down=2`` the output is an 8x8 map of
    logits, each seeing a patch of the input.

    Args:
        in_channels: Image channels.
        width: Channels of the first convolution; doubled at each later one. 4 to 256.
        n_down: Number of stride-2 convolutions, 1 to 4.

    Raises:
        UsageError: if an argument is out of range.
    """

    def __init__(self, in_channels: int = 3, width: int = 32, *, n_down: int = 2) -> None:
        super().__init__()
        self.in_channels = _check_int(in_channels, "in_channels", 1, 64)
        self.width = _check_int(width, "width", 4, 256)
        self.n_down = _check_int(n_down, "n_down", 1, 4)
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = width
        for _ in range(n_down - 1):
            layers += [
                nn.Conv2d(ch, 2 * ch, 4, 2, 1, bias=False),
                nn.BatchNorm2d(2 * ch),
                nn.LeakyReLU(0.2),
            ]
            ch *= 2
        layers += [
            nn.Conv2d(ch, 2 * ch, 3, 1, 1, bias=False),
            nn.BatchNorm2d(2 * ch),
            nn.LeakyReLU(0.2),
            nn.Conv2d(2 * ch, 1, 3, 1, 1),
        ]
        self.body = nn.Sequential(*layers)
        # DCGAN initialisation (Radford et al., ICLR 2016), as in pix2pix.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def config(self) -> dict[str, Any]:
        """The constructor arguments: ``Discriminator(**d.config())`` rebuilds it."""
        return {"in_channels": self.in_channels, "width": self.width, "n_down": self.n_down}

    def forward(self, x: Tensor) -> Tensor:
        """Patch logits (positive means "clean/real") for images in [0, 1].

        Shape:
            x ``[N, C, H, W]`` -> ``[N, 1, H / 2**n_down, W / 2**n_down]`` (rounded down for
            odd sizes).
        """
        return self.body(x * 2 - 1)

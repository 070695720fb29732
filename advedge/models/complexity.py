"""Model size and cost: parameter counts and multiply-accumulates (MACs)."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

__all__ = ["count_parameters", "estimate_flops", "mflops", "model_cost"]


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Return the number of parameters (buffers such as BN statistics are not counted).

    Args:
        model: Any module.
        trainable_only: Count only parameters with ``requires_grad``.
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _default_shape(model: nn.Module) -> tuple[int, int, int]:
    in_channels = getattr(model, "in_channels", 3)
    return (in_channels if isinstance(in_channels, int) else 3, 32, 32)


def estimate_flops(model: nn.Module, input_shape: tuple[int, int, int] | None = None) -> int:
    """Count the multiply-accumulates (MACs) of one forward pass on a single image.

    Despite the conventional name, the unit is MACs, not FLOPs: one MAC is one multiplication
    and one addition. Only ``nn.Conv2d`` and ``nn.Linear`` layers are counted (through forward
    hooks on a batch of one): a convolution costs
    ``out_elements * in_channels / groups * kernel_h * kernel_w`` and a linear layer
    ``out_elements * in_features``. Biases, batch norm, activations, pooling, additions and the
    normalisation layer are not counted. Use :func:`mflops` for ``2 * MACs / 1e6``.

    The model runs in eval mode under ``torch.no_grad()`` on its own device and dtype; its
    training mode is restored afterwards.

    Args:
        model: The model to measure.
        input_shape: ``(C, H, W)`` of one input; defaults to ``(model.in_channels, 32, 32)``
            (``(3, 32, 32)`` for a model without ``in_channels``).

    Returns:
        The number of multiply-accumulates (MACs) for one image.
    """
    shape = tuple(input_shape) if input_shape is not None else _default_shape(model)
    total = 0

    def conv_hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        nonlocal total
        assert isinstance(module, nn.Conv2d)
        per_output = module.in_channels // module.groups * math.prod(module.kernel_size)
        total += output.numel() * per_output

    def linear_hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        nonlocal total
        assert isinstance(module, nn.Linear)
        total += output.numel() * module.in_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, *shape), device=device, dtype=dtype))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return int(total)


def mflops(model: nn.Module, input_shape: tuple[int, int, int] | None = None) -> float:
    """Return the cost of one forward pass on one image in MFLOPs, ``2 * MACs / 1e6``.

    Args:
        model: The model to measure.
        input_shape: ``(C, H, W)``, as for :func:`estimate_flops`.

    Returns:
        Millions of floating-point operations, counting a multiply-accumulate as two.
    """
    return 2 * estimate_flops(model, input_shape) / 1e6


def model_cost(name: str, **kwargs: Any) -> dict[str, int]:
    """Parameters and MACs of a registered model, without allocating its weights.

    The model is built on the ``meta`` device (shapes only), so even WRN-34-10 costs a few
    milliseconds; MACs are :func:`estimate_flops` on one image of ``(in_channels, 32, 32)``.

    Args:
        name: A registered model name.
        **kwargs: Arguments for :func:`~advedge.models.create_model` (``num_classes``, ...).

    Returns:
        ``{"parameters": int, "macs": int}``.
    """
    from advedge.models.registry import create_model

    with torch.device("meta"):
        model = create_model(name, **kwargs)
    return {"parameters": count_parameters(model), "macs": estimate_flops(model)}

"""Putting a model on its device, in the memory layout that trains fastest there.

On CUDA the channels_last (NHWC) layout always wins; on CPU it wins for some models (oneDNN's
NHWC kernels for small and depthwise convolutions), so a short timing probe decides
(:func:`channels_last_is_faster`).
"""

from __future__ import annotations

import copy
import logging
import time

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

__all__ = ["channels_last_is_faster", "prepare_model"]


def prepare_model(
    model: nn.Module,
    device: torch.device,
    *,
    channels_last: bool | None = None,
    probe_input: Tensor | None = None,
) -> tuple[nn.Module, bool]:
    """Move ``model`` to ``device``, in the channels_last memory format where that pays.

    ``channels_last=None`` means: on CUDA always; on CPU when ``probe_input`` is given and
    :func:`channels_last_is_faster` says so; otherwise not. On CUDA it also switches on
    ``torch.backends.cudnn.benchmark`` (training's shapes are fixed, so autotuning pays).

    Returns:
        ``(model, channels_last)``.
    """
    model = model.to(device)
    if device.type == "cuda":
        # Fixed input shapes all run long: let cuDNN time its convolution algorithms once per
        # shape and keep the fastest (the default picks by heuristics only).
        torch.backends.cudnn.benchmark = True
    use_cl = channels_last
    if use_cl is None:
        if device.type == "cuda":
            use_cl = True
        elif probe_input is not None:
            use_cl = channels_last_is_faster(model, probe_input.to(device))
        else:
            use_cl = False
    if use_cl:
        model = model.to(memory_format=torch.channels_last)
    return model, bool(use_cl)


def channels_last_is_faster(model: nn.Module, x: Tensor, *, repeats: int = 2) -> bool:
    """Time a forward-backward pass of a copy of ``model`` in both memory formats.

    The copy (in train mode) takes the input gradient and the parameter gradients, as one
    step of adversarial training does; each format gets one warm-up pass, then the best of
    ``repeats`` timed passes decides. The model itself is not touched.
    """

    def best(m: nn.Module, inp: Tensor) -> float:
        times = []
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            xi = inp.detach().requires_grad_(True)
            m(xi).float().logsumexp(1).sum().backward()
            if inp.device.type == "cuda":
                torch.cuda.synchronize(inp.device)
            if i:
                times.append(time.perf_counter() - t0)
        return min(times)

    nchw = copy.deepcopy(model).train()
    nhwc = copy.deepcopy(model).train().to(memory_format=torch.channels_last)
    t_nchw = best(nchw, x)
    t_nhwc = best(nhwc, x.contiguous(memory_format=torch.channels_last))
    logger.debug("layout probe: NCHW %.4f s, channels_last %.4f s", t_nchw, t_nhwc)
    return t_nhwc < 0.95 * t_nchw

"""Wrappers that make attacks adaptive to randomised or non-differentiable defenses.

* :class:`EOT` (Expectation over Transformation, Athalye et al., ICML 2018): the gradient of
  ``E_t[L(f(t(x)))]`` is estimated by averaging over ``n`` random draws. Wrapping the model is
  enough, because the gradient of the mean of the logits over draws is the mean of the
  per-draw gradients, so every attack becomes an EOT attack unchanged.
* :class:`BPDA` (Backward Pass Differentiable Approximation, Athalye et al., ICML 2018): the
  forward pass runs the real, possibly non-differentiable function ``g``; the backward pass uses
  the gradient of a differentiable approximation ``h`` (the identity by default), via
  ``h(x) + (g(x) - h(x)).detach()``, whose value is ``g(x)`` and whose gradient is ``∇h(x)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from advedge.errors import UsageError

__all__ = ["BPDA", "EOT"]


class EOT(nn.Module):
    """Average a randomised model's logits over ``n_samples`` draws.

    Args:
        model: A model whose forward pass is random (e.g. a purifier with noise).
        n_samples: Number of draws per forward pass (20 in the ``rand`` evaluation suite).

    Shape:
        ``[N, C, H, W] -> [N, K]``.
    """

    def __init__(self, model: nn.Module, n_samples: int = 20) -> None:
        super().__init__()
        if n_samples < 1:
            raise UsageError(f"EOT needs n_samples >= 1, got {n_samples}")
        self.model = model
        self.n_samples = int(n_samples)

    def forward(self, x: Tensor) -> Tensor:
        total = self.model(x)
        for _ in range(self.n_samples - 1):
            total = total + self.model(x)
        return total / self.n_samples


class BPDA(nn.Module):
    """Run ``forward_fn`` forward and differentiate through ``approx_fn`` backward.

    Args:
        forward_fn: The real transformation (may be non-differentiable, e.g. JPEG or rounding).
        approx_fn: A differentiable approximation of ``forward_fn``; identity by default.

    Shape:
        ``[N, C, H, W] -> [N, C, H, W]`` (or whatever ``forward_fn`` returns).
    """

    def __init__(
        self,
        forward_fn: Callable[[Tensor], Tensor],
        approx_fn: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.forward_fn = forward_fn
        self.approx_fn = approx_fn
        if isinstance(forward_fn, nn.Module):
            self.inner = forward_fn

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            real = self.forward_fn(x)
        approx = x if self.approx_fn is None else self.approx_fn(x)
        return approx + (real - approx).detach()

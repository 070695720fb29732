"""Projected gradient descent (Madry et al., ICLR 2018), CW-inf and FGSM.

PGD iterates ``x_{t+1} = Proj_{B(x, eps) ∩ [0,1]}(x_t + alpha * s(∇_x L(f(x_t), y)))`` where
``s`` is ``sign`` for L-inf and ``g / ||g||_2`` for L2. FGSM (Goodfellow et al., ICLR 2015) is
one step of size eps from the clean point; CW-inf is PGD on the Carlini-Wagner margin loss.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from advedge.attacks.base import (
    Attack,
    LossFn,
    get_loss,
    margin_loss,
    project,
    random_init,
    register_attack,
)
from advedge.errors import UsageError

__all__ = ["CW", "FGSM", "PGD", "steepest_ascent_step"]


def steepest_ascent_step(x: Tensor, grad: Tensor, step: float, norm: str) -> Tensor:
    """One steepest-ascent step of size ``step`` under ``norm``.

    L-inf: ``x + step * sign(g)``; L2: ``x + step * g / ||g||_2`` (per example).
    """
    if norm == "Linf":
        return x + step * grad.sign()
    g_norm = grad.flatten(1).norm(p=2, dim=1).clamp_min(1e-12)
    return x + step * grad / g_norm.view(-1, *([1] * (grad.dim() - 1)))


@register_attack("fgsm")
class FGSM(Attack):
    """Fast gradient sign method (Goodfellow et al., ICLR 2015).

    ``x_adv = clip(x + eps * sign(∇_x CE(f(x), y)), 0, 1)`` for L-inf; the L2 version steps
    ``eps * g / ||g||_2``.
    """

    name = "fgsm"
    SETTINGS = ("loss",)

    def __init__(
        self, model: nn.Module, *, eps: float, norm: str = "Linf", loss: str | LossFn = "ce"
    ) -> None:
        super().__init__(model, eps=eps, norm=norm)
        self.loss = loss if isinstance(loss, str) else "custom"
        self.loss_fn = get_loss(loss)

    def perturb(self, x: Tensor, y: Tensor) -> Tensor:
        grad, _ = self.input_grad(x, y, self.loss_fn)
        return steepest_ascent_step(x, grad, self.eps, self.norm)


@register_attack("pgd")
class PGD(Attack):
    """Projected gradient descent with random start and restarts.

    Args:
        model: Classifier under attack.
        eps: Budget in pixel units.
        alpha: Step size; defaults to ``2.5 * eps / steps``.
        steps: Number of iterations.
        norm: ``"Linf"`` or ``"L2"``.
        loss: ``"ce"``, ``"margin"`` (CW), ``"kl"`` (target = probabilities) or a callable
            ``loss(logits, target) -> Tensor[N]`` to maximise.
        random_start: ``"uniform"`` (uniform in the eps-ball), ``"normal"`` (``x + 0.001 N(0, I)``,
            as TRADES does) or ``None``.
        restarts: Number of random restarts. With class-index targets, an example keeps the
            first restart whose final iterate is misclassified.
        generator: Optional RNG for the random start.
    """

    name = "pgd"
    SETTINGS = ("alpha", "steps", "loss", "random_start", "restarts")

    def __init__(
        self,
        model: nn.Module,
        *,
        eps: float,
        alpha: float | None = None,
        steps: int = 10,
        norm: str = "Linf",
        loss: str | LossFn = "ce",
        random_start: str | None = "uniform",
        restarts: int = 1,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(model, eps=eps, norm=norm)
        if steps < 1:
            raise UsageError(f"steps must be >= 1, got {steps}")
        if restarts < 1:
            raise UsageError(f"restarts must be >= 1, got {restarts}")
        if random_start not in ("uniform", "normal", None):
            raise UsageError(
                f"unknown random start {random_start!r}", "use uniform, normal or none"
            )
        self.steps = int(steps)
        self.alpha = float(alpha) if alpha is not None else 2.5 * self.eps / self.steps
        if self.alpha <= 0:
            raise UsageError(f"step size must be > 0, got {alpha}")
        self.loss = loss if isinstance(loss, str) else getattr(loss, "__name__", "custom")
        self.loss_fn = get_loss(loss)
        self.random_start = random_start
        self.restarts = int(restarts)
        self.generator = generator

    def _start(self, x: Tensor) -> Tensor:
        if self.random_start == "uniform":
            return random_init(x, self.eps, self.norm, self.generator)
        if self.random_start == "normal":
            noise = torch.randn(x.shape, generator=self.generator, device=x.device, dtype=x.dtype)
            return (x + 0.001 * noise).clamp(0.0, 1.0)
        return x.clone()

    def _run_once(self, x: Tensor, y: Tensor) -> Tensor:
        x_adv = self._start(x)
        for _ in range(self.steps):
            grad, _ = self.input_grad(x_adv, y, self.loss_fn)
            x_adv = project(
                steepest_ascent_step(x_adv, grad, self.alpha, self.norm), x, self.eps, self.norm
            )
        return x_adv

    def perturb(self, x: Tensor, y: Tensor) -> Tensor:
        x_best = self._run_once(x, y)
        if self.restarts == 1 or y.dim() != 1:
            return x_best
        with torch.no_grad():
            fooled = self.model(x_best).argmax(1) != y
        for _ in range(self.restarts - 1):
            if bool(fooled.all()):
                break
            todo = (~fooled).nonzero().squeeze(1)
            x_new = self._run_once(x[todo], y[todo])
            with torch.no_grad():
                new_fooled = self.model(x_new).argmax(1) != y[todo]
            x_best[todo[new_fooled]] = x_new[new_fooled]
            fooled[todo[new_fooled]] = True
        return x_best


@register_attack("cw")
class CW(PGD):
    """CW-inf: PGD on the Carlini-Wagner margin ``max_{j != y} z_j - z_y``.

    The margin loss is not saturated by softmax, so it breaks models whose cross-entropy
    gradients vanish (defensive distillation is the classic case: Carlini & Wagner, S&P 2017).

    Args:
        kappa: Optional confidence cap ``min(margin, kappa)``; ``None`` leaves it uncapped.
        Other args as for :class:`PGD`; ``steps`` defaults to 30.
    """

    name = "cw"
    SETTINGS = (*PGD.SETTINGS, "kappa")
    FIXED_OPTIONS = ("loss",)

    def __init__(
        self, model: nn.Module, *, steps: int = 30, kappa: float | None = None, **kwargs: Any
    ) -> None:
        self.kappa = kappa

        def cw_margin(logits: Tensor, target: Tensor) -> Tensor:
            return margin_loss(logits, target, kappa)

        super().__init__(model, steps=steps, loss=cw_margin, **kwargs)
        self.loss = "margin"

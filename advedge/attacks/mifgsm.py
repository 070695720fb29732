"""Momentum iterative FGSM (Dong et al., CVPR 2018)."""

from __future__ import annotations

from torch import Tensor, nn

from advedge.attacks.base import Attack, LossFn, get_loss, project, register_attack
from advedge.attacks.pgd import steepest_ascent_step
from advedge.errors import UsageError

__all__ = ["MIFGSM"]


@register_attack("mifgsm")
class MIFGSM(Attack):
    """Momentum iterative FGSM.

    ``g_{t+1} = mu * g_t + ∇_x L(x_t) / ||∇_x L(x_t)||_1`` and
    ``x_{t+1} = Proj(x_t + alpha * sign(g_{t+1}))`` (L2: ``alpha * g / ||g||_2``), from the clean
    point, with ``alpha = eps / steps`` by default (Dong et al., CVPR 2018, Algorithm 1).

    Args:
        model: Classifier under attack.
        eps: Budget in pixel units.
        alpha: Step size; defaults to ``eps / steps``.
        steps: Number of iterations (10 by default).
        decay: Momentum factor ``mu`` (1.0 in the paper).
        norm: ``"Linf"`` or ``"L2"``.
        loss: Loss to maximise (``"ce"`` by default).
    """

    name = "mifgsm"
    SETTINGS = ("alpha", "steps", "decay", "loss")

    def __init__(
        self,
        model: nn.Module,
        *,
        eps: float,
        alpha: float | None = None,
        steps: int = 10,
        decay: float = 1.0,
        norm: str = "Linf",
        loss: str | LossFn = "ce",
    ) -> None:
        super().__init__(model, eps=eps, norm=norm)
        if steps < 1:
            raise UsageError(f"steps must be >= 1, got {steps}")
        self.steps = int(steps)
        self.alpha = float(alpha) if alpha is not None else self.eps / self.steps
        self.decay = float(decay)
        self.loss = loss if isinstance(loss, str) else "custom"
        self.loss_fn = get_loss(loss)

    def perturb(self, x: Tensor, y: Tensor) -> Tensor:
        x_adv = x.clone()
        momentum = None
        for _ in range(self.steps):
            grad, _ = self.input_grad(x_adv, y, self.loss_fn)
            l1 = grad.abs().flatten(1).sum(1).clamp_min(1e-12).view(-1, 1, 1, 1)
            grad = grad / l1
            momentum = grad if momentum is None else self.decay * momentum + grad
            x_adv = project(
                steepest_ascent_step(x_adv, momentum, self.alpha, self.norm), x, self.eps, self.norm
            )
        return x_adv

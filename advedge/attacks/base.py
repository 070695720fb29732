"""The attack base class, norms, projections and the losses attacks maximise.

Every attack follows one contract (``Attack.__call__``): it takes a batch of images in [0, 1]
and its targets, puts the model in eval mode for the attack and restores the previous mode, and
returns ``x_adv`` that lies in the eps-ball around ``x`` (L-inf or L2) and in [0, 1]. Subclasses
implement only :meth:`Attack.perturb`.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advedge.errors import AdvedgeError, UsageError
from advedge.registry import Registry

logger = logging.getLogger(__name__)

__all__ = [
    "NORMS",
    "Attack",
    "LossFn",
    "ce_loss",
    "get_loss",
    "kl_loss",
    "margin_loss",
    "project",
    "random_init",
]

NORMS = ("Linf", "L2")

LossFn = Callable[[Tensor, Tensor], Tensor]
"""A per-example loss ``loss(logits, target) -> Tensor[N]`` that an attack maximises."""


def ce_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Per-example cross-entropy ``-log softmax(z)_y``.

    Shape:
        logits ``[N, K]``, target ``[N]`` int64 -> ``[N]``.
    """
    return F.cross_entropy(logits, target, reduction="none")


def margin_loss(logits: Tensor, target: Tensor, kappa: float | None = None) -> Tensor:
    """Carlini-Wagner margin ``max_{j != y} z_j - z_y`` (Carlini & Wagner, S&P 2017).

    The largest other logit is taken with the true class masked to ``-inf``, so the margin is
    right for negative logits too (multiplying by a one-hot mask is not). With ``kappa`` the
    margin is clipped at ``kappa``: ``min(max_{j != y} z_j - z_y, kappa)``.

    Shape:
        logits ``[N, K]``, target ``[N]`` int64 -> ``[N]``.
    """
    true = logits.gather(1, target[:, None]).squeeze(1)
    others = logits.masked_fill(F.one_hot(target, logits.shape[1]).bool(), float("-inf"))
    margin = others.amax(dim=1) - true
    if kappa is not None:
        margin = margin.clamp(max=kappa)
    return margin


def kl_loss(logits: Tensor, target_probs: Tensor) -> Tensor:
    """Per-example ``KL(p || softmax(z)) = sum_k p_k (log p_k - log softmax(z)_k)``.

    Used by TRADES' inner maximisation (p = softmax of the clean logits) and by distillation
    attacks (p = the teacher's soft labels).

    Shape:
        logits ``[N, K]``, target_probs ``[N, K]`` (rows sum to 1) -> ``[N]``.
    """
    log_q = F.log_softmax(logits, dim=1)
    return F.kl_div(log_q, target_probs, reduction="none").sum(dim=1)


_LOSSES: dict[str, LossFn] = {"ce": ce_loss, "margin": margin_loss, "kl": kl_loss}


def get_loss(loss: str | LossFn) -> LossFn:
    """Resolve a loss name (``ce``, ``margin``, ``kl``) or pass a callable through."""
    if callable(loss):
        return loss
    try:
        return _LOSSES[loss]
    except KeyError:
        raise UsageError(f"unknown attack loss {loss!r}", "use ce, margin or kl") from None


def _flat_norm(t: Tensor) -> Tensor:
    return t.flatten(1).norm(p=2, dim=1).view(-1, *([1] * (t.dim() - 1)))


def project(x_adv: Tensor, x: Tensor, eps: float, norm: str) -> Tensor:
    """Project ``x_adv`` onto the eps-ball around ``x`` intersected with ``[0, 1]``.

    L-inf: ``x + clip(x_adv - x, -eps, eps)``. L2: ``x + delta * min(1, eps / ||delta||_2)``.
    Clipping to [0, 1] afterwards keeps the point inside the ball for both norms, because
    [0, 1] clipping never increases ``|delta|`` in any coordinate.

    Shape:
        x_adv, x ``[N, C, H, W]`` -> ``[N, C, H, W]``.
    """
    delta = x_adv - x
    if norm == "Linf":
        delta = delta.clamp(-eps, eps)
    elif norm == "L2":
        factor = (eps / _flat_norm(delta).clamp_min(1e-12)).clamp(max=1.0)
        delta = delta * factor
    else:
        raise UsageError(f"unknown norm {norm!r}", "use Linf or L2")
    return (x + delta).clamp(0.0, 1.0)


def random_init(
    x: Tensor, eps: float, norm: str, generator: torch.Generator | None = None
) -> Tensor:
    """A random point of the eps-ball around ``x``, clipped to [0, 1].

    L-inf: uniform in ``[-eps, eps]^d``. L2: uniform in the L2 ball (a Gaussian direction scaled
    by ``eps * u^(1/d)``, u uniform).
    """
    if norm == "Linf":
        delta = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        delta = (delta * 2 - 1) * eps
    else:
        direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        direction = direction / _flat_norm(direction).clamp_min(1e-12)
        d = x[0].numel()
        u = torch.rand((x.shape[0],), generator=generator, device=x.device, dtype=x.dtype)
        radius = eps * u.pow(1.0 / d)
        delta = direction * radius.view(-1, *([1] * (x.dim() - 1)))
    return (x + delta).clamp(0.0, 1.0)


class Attack:
    """Base class of every attack: a callable ``(x, y) -> x_adv``.

    Args:
        model: The classifier under attack; it maps images in [0, 1] to logits. Gradient-based
            attacks need an ``nn.Module``; score-based ones (``kind = "query"``) accept any
            callable.
        eps: The perturbation budget in pixel units, in (0, 1].
        norm: ``"Linf"`` or ``"L2"``.

    ``__call__`` validates its inputs, switches the model to :attr:`model_mode` if it is an
    ``nn.Module`` (restoring the previous mode afterwards, even on error), enables gradients, calls
    :meth:`perturb` and projects the result onto the eps-ball and [0, 1]. The returned tensor is
    detached.
    """

    name: str = "attack"
    kind: str = "white-box"
    model_mode: str = "eval"
    """``"eval"``, or ``"train"`` for a training method's inner attack that follows an official
    code running it with batch statistics (which also updates BN's running statistics)."""
    SETTINGS: tuple[str, ...] = ()
    """The attributes :meth:`settings` reports beyond ``eps`` and ``norm``, in order."""
    FIXED_OPTIONS: tuple[str, ...] = ()
    """Options of a base class that this attack sets itself (CW's loss), so a caller may not."""

    @classmethod
    def options(cls) -> set[str]:
        """The keyword options ``cls(model, eps=..., ...)`` takes.

        An ``__init__`` that ends in ``**kwargs`` passes them on to its base class, whose own
        options count too; :attr:`FIXED_OPTIONS` are left out.
        """
        names: set[str] = set()
        for klass in cls.__mro__:
            init = vars(klass).get("__init__")
            if init is None:
                continue
            params = list(inspect.signature(init).parameters.values())
            names |= {p.name for p in params if p.kind is p.KEYWORD_ONLY}
            if not any(p.kind is p.VAR_KEYWORD for p in params):
                break
        return names - set(cls.FIXED_OPTIONS)

    def __init__(
        self, model: nn.Module | Callable[..., Any], *, eps: float, norm: str = "Linf"
    ) -> None:
        if not 0.0 < eps <= 1.0:
            raise UsageError(f"eps must lie in (0, 1], got {eps}")
        if norm not in NORMS:
            raise UsageError(f"unknown norm {norm!r}", "use Linf or L2")
        self.model = model
        self.eps = float(eps)
        self.norm = norm

    def perturb(self, x: Tensor, y: Tensor) -> Tensor:
        """Return an adversarial version of ``x``; the base class projects it afterwards."""
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        """The attack's settings, for result files: ``eps``, ``norm`` and each of :attr:`SETTINGS`."""
        return {"eps": self.eps, "norm": self.norm, **{k: getattr(self, k) for k in self.SETTINGS}}

    def describe(self) -> dict[str, Any]:
        """``{"name", "kind", "settings"}`` for results JSON."""
        return {"name": self.name, "kind": self.kind, "settings": self.settings()}

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        """Craft adversarial examples.

        Args:
            x: Clean images in [0, 1].
            y: Targets of the attack loss: class indices for CE/margin, probabilities for KL.

        Returns:
            ``x_adv`` in the eps-ball around ``x`` and in [0, 1], detached.

        Raises:
            AdvedgeError: if ``x`` is not a finite float batch in [0, 1] or ``y`` has another
                batch size.

        Shape:
            x ``[N, C, H, W]``, y ``[N]`` or ``[N, K]`` -> ``[N, C, H, W]``.
        """
        _check_inputs(x, y)
        x = x.detach()
        module = self.model if isinstance(self.model, nn.Module) else None
        was_training = module.training if module is not None else False
        if module is not None:
            module.train(self.model_mode == "train")
        try:
            with torch.enable_grad():
                x_adv = self.perturb(x, y)
        finally:
            if module is not None:
                module.train(was_training)
        return project(x_adv.detach(), x, self.eps, self.norm)

    def input_grad(self, x_adv: Tensor, y: Tensor, loss_fn: LossFn) -> tuple[Tensor, Tensor]:
        """Gradient of ``sum(loss_fn(model(x_adv), y))`` with respect to ``x_adv``.

        Only the input gradient is computed (``torch.autograd.grad``), so the model's parameter
        ``.grad`` fields are left untouched.

        Returns:
            ``(grad, logits)``; ``logits`` is detached.
        """
        x_adv = x_adv.detach().requires_grad_(True)
        logits = self.model(x_adv)
        loss = loss_fn(logits.float(), y).sum()
        (grad,) = torch.autograd.grad(loss, x_adv)
        return grad.detach(), logits.detach()

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.settings().items())
        return f"{type(self).__name__}({args})"


def _check_inputs(x: Tensor, y: Tensor) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() != 4:
        raise AdvedgeError("attack input must be a float tensor of shape [N, C, H, W]")
    if y.shape[0] != x.shape[0]:
        raise AdvedgeError(f"attack got {x.shape[0]} images but {y.shape[0]} targets")
    if not torch.isfinite(x).all():
        raise AdvedgeError("attack input contains NaN or Inf values")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise AdvedgeError(
            f"attack input must lie in [0, 1] (pixel space), got values in [{lo:.3g}, {hi:.3g}]",
            "divide uint8 images by 255; normalisation is the model's first layer",
        )


ATTACKS: Registry[type[Attack]] = Registry("attack")
"""Every attack by name, in registration order; each attack module registers its classes."""

register_attack = ATTACKS.register
"""``@register_attack("name")`` adds an :class:`Attack` subclass to :data:`ATTACKS`."""

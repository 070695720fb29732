"""Training objectives: pure loss functions of tensors, plus the attack each method uses.

A training method is one loss function and the attack that crafts its inputs. The engine
(:mod:`advedge.training.engine`) runs every method with the same loop; a method only says how to turn a
batch ``(x, y)`` into a scalar loss (:meth:`Method.loss`).

Methods: ``natural``, ``pgd-at`` (Madry et al., ICLR 2018), ``trades`` (Zhang et al., ICML 2019)
and ``fgsm-rs`` (Wong et al., ICLR 2020).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advedge.attacks import PGD
from advedge.errors import UsageError
from advedge.registry import Registry
from advedge.training.official import ATTACK_BN

__all__ = [
    "FGSMRS",
    "PGDAT",
    "TRAINING_METHODS",
    "Method",
    "MethodOutput",
    "Natural",
    "Trades",
    "attack_view",
    "build_method",
    "natural_loss",
    "pgd_at_loss",
    "trades_loss",
]


def natural_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Standard training: ``L = CE(f(x), y)``, mean over the batch.

    Shape:
        logits ``[N, K]``, y ``[N]`` -> scalar.
    """
    return F.cross_entropy(logits, y)


def pgd_at_loss(logits_adv: Tensor, y: Tensor) -> Tensor:
    """Adversarial training (Madry et al., ICLR 2018): ``L = CE(f(x'), y)``.

    ``x' = argmax_{||x' - x|| <= eps} CE(f(x'), y)`` is found by PGD with a random start. Fast
    adversarial training (Wong et al., ICLR 2020) uses the same loss with a one-step x'.

    Shape:
        logits_adv ``[N, K]``, y ``[N]`` -> scalar.
    """
    return F.cross_entropy(logits_adv, y)


def trades_loss(logits_clean: Tensor, logits_adv: Tensor, y: Tensor, beta: float) -> Tensor:
    """TRADES (Zhang et al., ICML 2019), eq. 5.

    ``L = CE(f(x), y) + beta * KL(softmax(f(x)) || softmax(f(x')))``, the KL averaged over the
    batch, where ``x' = argmax_{||x' - x|| <= eps} KL(softmax(f(x)) || softmax(f(x')))``.

    Shape:
        logits_clean, logits_adv ``[N, K]``, y ``[N]`` -> scalar.
    """
    natural = F.cross_entropy(logits_clean, y)
    robust = F.kl_div(
        F.log_softmax(logits_adv, dim=1), F.softmax(logits_clean, dim=1), reduction="batchmean"
    )
    return natural + beta * robust


#: Training model -> the compiled local module its inner attacks run on (see
#: :func:`register_attack_view`); weak, so a finished run's models are freed.
_ATTACK_VIEWS: weakref.WeakKeyDictionary[nn.Module, nn.Module] = weakref.WeakKeyDictionary()


def register_attack_view(train_model: nn.Module, view: nn.Module) -> None:
    """Make ``view`` what :func:`attack_view` returns for ``train_model``: the engine registers
    ``torch.compile(local module)`` for a compiled DDP model, so the inner attack (most of an
    adversarial step's cost) is compiled too."""
    _ATTACK_VIEWS[train_model] = view


def attack_view(model: nn.Module) -> nn.Module:
    """The module an inner attack should differentiate: ``model`` without its DDP wrapper.

    Under DDP every rank holds the same weights, so the attack runs on the local module: its
    forward passes then skip DDP's buffer broadcasts and never arm the gradient reducer, which
    expects exactly one backward per forward. A ``torch.compile`` wrapper is kept; one that
    wraps DDP is replaced by the compiled local module registered for it
    (:func:`register_attack_view`), else by the eager local module.
    """
    registered = _ATTACK_VIEWS.get(model)
    if registered is not None:
        return registered
    inner = getattr(model, "_orig_mod", None)
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module
    if isinstance(inner, nn.parallel.DistributedDataParallel):
        return inner.module
    return model


@dataclass
class MethodOutput:
    """What a method's loss step returns: the scalar loss and the logits to score accuracy on."""

    loss: Tensor
    logits: Tensor


class Method:
    """A training method: an attack (maybe none) and a pure loss function.

    Args:
        eps: Budget in pixel units.
        alpha: Attack step size.
        steps: Attack iterations.
        norm: ``"Linf"`` or ``"L2"``.
        attack_bn: ``"eval"`` (the attack sees batch norm's running statistics and leaves them
            alone) or ``"train"`` (batch statistics, and every attack forward pass updates the
            running ones, as the official ARD, IAD, Madry and Wong code do).
    """

    name: ClassVar[str] = ""
    adversarial: ClassVar[bool] = True

    def __init__(
        self,
        *,
        eps: float,
        alpha: float,
        steps: int,
        norm: str = "Linf",
        attack_bn: str = "eval",
        **options: Any,
    ) -> None:
        self.eps = eps
        self.alpha = alpha
        self.steps = steps
        self.norm = norm
        if attack_bn not in ATTACK_BN:
            raise UsageError(f"unknown attack BN mode {attack_bn!r}", "use eval or train")
        self.attack_bn = attack_bn
        if options:
            raise UsageError(f"method {self.name!r} does not take {', '.join(sorted(options))}")

    def settings(self) -> dict[str, Any]:
        """The method's settings, as recorded in checkpoints."""
        if not self.adversarial:
            return {}
        return {
            "eps": self.eps,
            "alpha": self.alpha,
            "steps": self.steps,
            "norm": self.norm,
            "attack_bn": self.attack_bn,
        }

    def pgd(self, model: nn.Module, *, loss: Any = "ce", start: str | None = "uniform") -> PGD:
        """The method's inner PGD on ``model`` (its :func:`attack_view`), in its BN mode."""
        attack = PGD(
            attack_view(model),
            eps=self.eps,
            alpha=self.alpha,
            steps=self.steps,
            norm=self.norm,
            loss=loss,
            random_start=start,
        )
        attack.model_mode = self.attack_bn
        return attack

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        """Called by the engine before epoch ``epoch`` (0-based) of ``epochs``; a no-op here."""

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> MethodOutput:
        """Craft the method's inputs for ``(x, y)`` and return its loss. Model is in train mode.

        ``model`` may be wrapped in DDP; attacks run on :func:`attack_view` of it, the loss's
        forward passes on ``model`` itself so that gradients are all-reduced.
        """
        raise NotImplementedError


TRAINING_METHODS: Registry[type[Method]] = Registry("method")
"""The training methods by name (``advedge train --method``)."""


@TRAINING_METHODS.register("natural")
class Natural(Method):
    """Standard training on clean inputs (cross-entropy).

    The loss is :func:`natural_loss`; no attack.
    """

    name = "natural"
    adversarial = False

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> MethodOutput:
        logits = model(x)
        return MethodOutput(natural_loss(logits, y), logits)


@TRAINING_METHODS.register("pgd-at")
class PGDAT(Method):
    """PGD adversarial training (Madry et al., ICLR 2018).

    PGD-``steps`` with a uniform random start, then :func:`pgd_at_loss`.
    """

    name = "pgd-at"

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> MethodOutput:
        x_adv = self.pgd(model)(x, y)
        logits = model(x_adv)
        return MethodOutput(pgd_at_loss(logits, y), logits)


@TRAINING_METHODS.register("trades")
class Trades(Method):
    """TRADES (Zhang et al., ICML 2019): clean cross-entropy plus beta times a robust KL term.

    PGD on ``KL(f(x) || f(x'))`` from ``x + 0.001 N(0, I)``, with ``f(x)`` and the attack in
    eval mode (``attack_bn``), then :func:`trades_loss`.

    Args:
        beta: Weight of the robust KL term (6.0 in the paper for CIFAR-10).
    """

    name = "trades"

    def __init__(self, *, beta: float = 6.0, **kw: Any) -> None:
        super().__init__(**kw)
        if beta < 0:
            raise UsageError(f"TRADES beta must be >= 0, got {beta}")
        self.beta = float(beta)

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "beta": self.beta}

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> MethodOutput:
        local = attack_view(model)
        with torch.no_grad():
            was_training = local.training
            local.train(self.attack_bn == "train")
            p_clean = F.softmax(local(x).float(), dim=1)
            local.train(was_training)
        x_adv = self.pgd(model, loss="kl", start="normal")(x, p_clean)
        # Separate clean and adversarial forward passes (one mixed batch would change the BN
        # statistics). The official code makes three, S(x) twice: same loss and gradient, one
        # BN running-statistics update fewer here.
        logits_clean = model(x)
        logits_adv = model(x_adv)
        return MethodOutput(trades_loss(logits_clean, logits_adv, y, self.beta), logits_clean)


@TRAINING_METHODS.register("fgsm-rs")
class FGSMRS(PGDAT):
    """Fast adversarial training (Wong et al., ICLR 2020): FGSM from a uniform random start.

    One step of size ``alpha`` (the paper's 1.25 * eps; the CLI uses that when ``--alpha`` is not
    given) from ``x + U(-eps, eps)``, projected to the eps-ball, then :func:`pgd_at_loss`.
    """

    name = "fgsm-rs"

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.steps = 1  # one step, whatever ``steps`` says


def build_method(name: str, **kwargs: Any) -> Method:
    """Build a training method by name (``natural``, ``pgd-at``, ``trades``, ``fgsm-rs``).

    Raises:
        UsageError: for an unknown name (with a close-match suggestion) or a bad option.
    """
    return TRAINING_METHODS.get(name)(**kwargs)

"""Adversarial attacks in pixel space, one base class and small subclasses.

``build_attack(name, model, eps=..., ...)`` builds an attack by name; :data:`ATTACKS` lists them.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from advedge.attacks.base import (
    NORMS,
    Attack,
    LossFn,
    ce_loss,
    get_loss,
    kl_loss,
    margin_loss,
    project,
    random_init,
)
from advedge.attacks.mifgsm import MIFGSM
from advedge.attacks.pgd import CW, FGSM, PGD, steepest_ascent_step
from advedge.attacks.wrappers import BPDA, EOT
from advedge.errors import UsageError, did_you_mean

__all__ = [
    "ATTACKS",
    "BPDA",
    "CW",
    "EOT",
    "FGSM",
    "MIFGSM",
    "NORMS",
    "PGD",
    "Attack",
    "LossFn",
    "build_attack",
    "ce_loss",
    "get_loss",
    "kl_loss",
    "margin_loss",
    "project",
    "random_init",
    "steepest_ascent_step",
]

ATTACKS: dict[str, type[Attack]] = {"fgsm": FGSM, "pgd": PGD, "cw": CW, "mifgsm": MIFGSM}


def build_attack(
    name: str,
    model: nn.Module,
    *,
    eps: float,
    norm: str = "Linf",
    steps: int | None = None,
    alpha: float | None = None,
    **kwargs: Any,
) -> Attack:
    """Build an attack by name with evaluation defaults.

    Args:
        name: One of :data:`ATTACKS` (``fgsm``, ``pgd``, ``cw``, ``mifgsm``).
        model: Classifier under attack.
        eps: Budget in pixel units.
        norm: ``"Linf"`` or ``"L2"``.
        steps: Iterations for iterative attacks (ignored by FGSM); each attack's default if None.
        alpha: Step size; each attack's default rule if None.
        **kwargs: Extra attack-specific options (e.g. ``restarts``).

    Raises:
        UsageError: for an unknown attack name (with a close-match suggestion).
    """
    key = name.strip().lower()
    if key not in ATTACKS:
        raise UsageError(f"unknown attack {name!r}", did_you_mean(key, ATTACKS))
    cls = ATTACKS[key]
    if cls is FGSM:
        return FGSM(model, eps=eps, norm=norm, **kwargs)
    opts: dict[str, Any] = dict(kwargs)
    if steps is not None:
        opts["steps"] = steps
    if alpha is not None:
        opts["alpha"] = alpha
    return cls(model, eps=eps, norm=norm, **opts)

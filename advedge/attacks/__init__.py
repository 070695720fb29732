"""Adversarial attacks in pixel space, one base class and small subclasses.

``build_attack(name, model, eps=..., ...)`` builds an attack by name; :data:`ATTACKS` lists them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

# Registration order is the listing order of ATTACKS: FGSM, PGD, CW, MI-FGSM, APGD, Square.
from advedge.attacks import pgd, mifgsm  # noqa: F401  # isort: skip

# isort: split
from advedge.attacks.apgd import (
    APGD,
    APGDDLR,
    APGDT,
    apgd_checkpoints,
    dlr_loss,
    targeted_dlr_loss,
)
from advedge.attacks.base import (
    ATTACKS,
    NORMS,
    Attack,
    LossFn,
    ce_loss,
    get_loss,
    kl_loss,
    margin_loss,
    project,
    random_init,
    register_attack,
)
from advedge.attacks.mifgsm import MIFGSM
from advedge.attacks.pgd import CW, FGSM, PGD, steepest_ascent_step
from advedge.attacks.square import Square, as_logits_fn
from advedge.attacks.wrappers import BPDA, EOT
from advedge.errors import UsageError, did_you_mean

__all__ = [
    "APGD",
    "APGDDLR",
    "APGDT",
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
    "Square",
    "apgd_checkpoints",
    "as_logits_fn",
    "build_attack",
    "ce_loss",
    "dlr_loss",
    "get_loss",
    "kl_loss",
    "margin_loss",
    "project",
    "random_init",
    "register_attack",
    "steepest_ascent_step",
    "targeted_dlr_loss",
]


def build_attack(
    name: str,
    model: nn.Module | Callable[..., Any],
    *,
    eps: float,
    norm: str = "Linf",
    steps: int | None = None,
    alpha: float | None = None,
    **kwargs: Any,
) -> Attack:
    """Build an attack by name with evaluation defaults.

    Args:
        name: One of :data:`ATTACKS` (``fgsm``, ``pgd``, ``cw``, ``mifgsm``, ``apgd-ce``,
            ``apgd-dlr``, ``apgd-t``, ``square``).
        model: Classifier under attack (for ``square``, any callable mapping a batch to logits).
        eps: Budget in pixel units.
        norm: ``"Linf"`` or ``"L2"``.
        steps: Iterations, passed only to attacks that take ``steps`` (not FGSM, APGD or
            Square: APGD's iterations are ``n_iter`` and Square's budget is ``n_queries``, given
            as keyword arguments); each attack's default if None.
        alpha: Step size, passed only to attacks that take ``alpha`` (APGD sets its own step
            size and Square has none); each attack's default rule if None.
        **kwargs: Extra attack-specific options (e.g. ``restarts``, ``n_iter``, ``n_queries``).
            ``None`` values are ignored; the shared options (``seed``, ``generator``,
            ``restarts``, ``n_queries``, ``steps``, ``alpha``) go only to attacks that take them.

    Raises:
        UsageError: for an unknown attack name (with a close-match suggestion).
    """
    key = name.strip().lower()
    if key not in ATTACKS:
        raise UsageError(f"unknown attack {name!r}", did_you_mean(key, ATTACKS))
    cls = ATTACKS[key]
    accepted = cls.options()
    opts: dict[str, Any] = {}
    for key, value in {"steps": steps, "alpha": alpha, **kwargs}.items():
        if value is None:
            continue
        if key in accepted:
            opts[key] = value
        elif key not in _SHARED_OPTIONS:
            raise UsageError(f"attack {name!r} does not take {key!r}")
    return cls(model, eps=eps, norm=norm, **opts)


# Options that callers may pass to every attack; each attack keeps the ones it takes.
_SHARED_OPTIONS = frozenset({"steps", "alpha", "seed", "generator", "restarts", "n_queries"})

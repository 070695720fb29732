"""Which attacks an evaluation runs: the AutoAttack-style suites, or attacks named one by one.

A suite's attacks cascade (each runs only on the examples every earlier one left robust; see
:func:`advedge.evaluation.core.evaluate`). Named attacks each run on every clean-correct example.
Adding a suite is one function registered in :data:`SUITES`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from advedge.attacks import Attack
from advedge.registry import Registry

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_ATTACKS", "SUITES", "AttackSettings", "build_suite"]

# The attacks ``advedge eval`` runs when given neither --attacks nor --suite.
DEFAULT_ATTACKS = ("fgsm", "pgd", "cw", "mifgsm")

SuiteBuilder = Callable[..., list[Attack]]

# Suite name -> builder ``(model, *, eps, norm, steps, step, n_queries, n_iter, eot_samples, seed,
# num_classes)``; registration order is the listing order.
SUITES: Registry[SuiteBuilder] = Registry("suite")


def _generator(model: nn.Module, seed: int) -> torch.Generator:
    """A seeded generator on the device of ``model``'s parameters (CPU without any)."""
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    return torch.Generator(device=dev).manual_seed(seed)


@SUITES.register("standard")
def _standard(
    model: nn.Module, *, eps: float, norm: str, n_queries: int, n_iter: int, seed: int, **_: Any
) -> list[Attack]:
    """AutoAttack-style: APGD-CE, APGD-T (targeted DLR, top-9 classes), then Square queries."""
    from advedge.attacks import APGD, APGDT, Square

    k = int(getattr(model, "num_classes", 10))
    attacks: list[Attack] = [APGD(model, eps=eps, norm=norm, loss="ce", n_iter=n_iter, seed=seed)]
    if k >= 4:
        attacks.append(
            APGDT(
                model, eps=eps, norm=norm, n_iter=n_iter, n_target_classes=min(9, k - 1), seed=seed
            )
        )
    else:
        logger.warning("APGD-T left out: it needs at least 4 classes, the model has %d", k)
    attacks.append(Square(model, eps=eps, norm=norm, n_queries=n_queries, seed=seed))
    return attacks


@SUITES.register("rand")
def _rand(
    model: nn.Module,
    *,
    eps: float,
    norm: str,
    n_iter: int,
    eot_samples: int,
    seed: int,
    **_: Any,
) -> list[Attack]:
    """For randomised defenses: APGD-CE and APGD-DLR on the model under EOT."""
    from advedge.attacks import APGD, EOT

    noisy = EOT(model, eot_samples)
    attacks = [APGD(noisy, eps=eps, norm=norm, loss="ce", n_iter=n_iter, seed=seed)]
    if int(getattr(model, "num_classes", 10)) >= 3:
        attacks.append(APGD(noisy, eps=eps, norm=norm, loss="dlr", n_iter=n_iter, seed=seed))
    for a in attacks:
        a.name = f"{a.name}-eot"
    return attacks


@SUITES.register("quick")
def _quick(
    model: nn.Module, *, eps: float, norm: str, steps: int, step: float, seed: int, **_: Any
) -> list[Attack]:
    """PGD-steps and CW-inf (PGD on the margin loss)."""
    from advedge.attacks import CW, PGD

    return [
        cls(model, eps=eps, alpha=step, steps=steps, norm=norm, generator=_generator(model, seed))
        for cls in (PGD, CW)
    ]


def build_suite(
    suite: str,
    model: nn.Module,
    *,
    eps: float,
    norm: str = "Linf",
    steps: int = 20,
    alpha: float | None = None,
    n_queries: int = 5000,
    n_iter: int = 100,
    eot_samples: int = 20,
    seed: int = 0,
) -> list[Attack]:
    """The attacks of an evaluation suite, in the order they run.

    * ``standard`` (AutoAttack-style, Croce & Hein 2020): APGD-CE, APGD-T (targeted DLR over the
      top-9 classes), then the Square query attack, each on the examples still robust.
    * ``rand`` (for randomised defenses): APGD-CE and APGD-DLR on the model wrapped in EOT over
      ``eot_samples`` draws.
    * ``quick``: PGD-``steps`` and CW-inf (PGD on the margin loss).

    Targeted/DLR attacks need at least 4/3 classes; with fewer they are left out (logged).

    Args:
        suite: A name in :data:`SUITES`.
        model: The model attacked.
        eps: The budget.
        norm: ``Linf`` or ``L2``.
        steps: PGD/CW steps (``quick``).
        alpha: PGD/CW step size (``quick``); ``eps / 4`` when None.
        n_queries: Square's query budget (``standard``).
        n_iter: APGD iterations.
        eot_samples: EOT draws (``rand``).
        seed: The attacks' seed.

    Raises:
        UsageError: for an unknown suite name.
    """
    builder = SUITES.get(suite)
    return builder(
        model,
        eps=eps,
        norm=norm,
        steps=steps,
        step=alpha if alpha is not None else eps / 4,
        n_queries=n_queries,
        n_iter=n_iter,
        eot_samples=eot_samples,
        seed=seed,
    )


@dataclass(frozen=True)
class AttackSettings:
    """The attacks of one evaluation: a suite, or attacks by name, and their budget.

    Attributes:
        eps: The budget (a parsed number).
        norm: ``Linf`` or ``L2``.
        steps: PGD/CW steps.
        alpha: PGD/CW step size.
        restarts: PGD/CW random restarts.
        n_queries: The query budget of query attacks.
        seed: The attacks' seed.
        suite: A name in :data:`SUITES`, or None to run ``names``.
        names: Attack names from :data:`advedge.attacks.ATTACKS` (lower case; unused with a suite).
    """

    eps: float
    norm: str = "Linf"
    steps: int = 20
    alpha: float | None = None
    restarts: int = 1
    n_queries: int = 5000
    seed: int = 0
    suite: str | None = None
    names: tuple[str, ...] = DEFAULT_ATTACKS

    def build(self, target: nn.Module, device: torch.device) -> list[Attack]:
        """The attacks against ``target`` (whose parameters live on ``device``).

        Raises:
            UsageError: an unknown suite or attack name.
        """
        from advedge.attacks import build_attack

        common = dict(
            eps=self.eps, norm=self.norm, steps=self.steps, n_queries=self.n_queries, seed=self.seed
        )
        if self.suite is not None:
            return build_suite(self.suite, target, alpha=self.alpha, **common)
        built = []
        for name in self.names:
            # PGD/CW take the eps/4 step and restarts; MI-FGSM keeps its own eps/steps rule.
            pgd_like = name in ("pgd", "cw")
            generator = torch.Generator(device=device).manual_seed(self.seed) if pgd_like else None
            built.append(
                build_attack(
                    name,
                    target,
                    alpha=self.alpha if pgd_like else None,
                    restarts=self.restarts if pgd_like else None,
                    generator=generator,
                    **common,
                )
            )
        return built

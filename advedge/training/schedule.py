"""Learning-rate schedules, stepped per iteration, and their relay when a run is extended.

``cosine``, ``multistep`` and ``constant`` (:func:`lr_lambda`) multiply the peak LR; a run
resumed with more ``--epochs`` than it started with has its schedule laid over the new count
(:func:`relay_schedule`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch

from advedge.training.config import TrainConfig

logger = logging.getLogger(__name__)

__all__ = ["lr_lambda", "relay_schedule"]


def lr_lambda(
    schedule: str, total_steps: int, milestones: tuple[float, ...], gamma: float
) -> Callable[[int], float]:
    """Multiplicative LR factor at iteration ``t`` of ``total_steps``.

    cosine: ``0.5 * (1 + cos(pi * t / T))``; multistep: ``gamma ** #{m : t >= m * T}``;
    constant: 1.
    """
    total = max(1, total_steps)
    if schedule == "cosine":
        return lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, total) / total))
    if schedule == "multistep":
        marks = [m * total for m in milestones]
        return lambda t: gamma ** sum(t >= m for m in marks)
    return lambda t: 1.0


def relay_schedule(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    config: TrainConfig,
    total_steps: int,
    state: dict[str, Any],
    start_epoch: int,
) -> dict[str, Any] | None:
    """Lay the LR schedule over the resumed run's epoch count, and restart the LR from it.

    The optimiser's saved LR is the old schedule's last value (0 at the end of a cosine), so
    without this a run extended with ``--resume --epochs N`` would start its extra epochs
    from the wrong LR. When the epoch count changed, the change is logged, kept in
    ``state.pt`` and written to ``config.yaml`` (``resolved.schedule_changes``), and every
    later metrics row records ``schedule_epochs``: the extended run is not the run a fresh
    ``--epochs N`` would give (its first epochs followed the shorter schedule).

    Returns:
        The change to record (``at_epoch``, ``from_epochs``, ``to_epochs``, ``lr``), or None
        when the epoch count is the one the run was started with.
    """
    cfg = config
    lam = lr_lambda(cfg.schedule, total_steps, cfg.milestones, cfg.gamma)
    scheduler.lr_lambdas[0] = lam
    step = scheduler.last_epoch
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
        group["lr"] = base * lam(step)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
    old_epochs = int(state.get("config", {}).get("epochs", cfg.epochs))
    if old_epochs != cfg.epochs and start_epoch < cfg.epochs:
        change = {
            "at_epoch": start_epoch,
            "from_epochs": old_epochs,
            "to_epochs": cfg.epochs,
            "lr": round(optimizer.param_groups[0]["lr"], 8),
        }
        logger.warning(
            "epochs changed from %d to %d on resume: the %s schedule is laid over %d epochs "
            "and continues at lr %.4g from epoch %d (not the same as a fresh %d-epoch run)",
            old_epochs,
            cfg.epochs,
            cfg.schedule,
            cfg.epochs,
            change["lr"],
            start_epoch + 1,
            cfg.epochs,
        )
        return change
    return None

"""Auto-PGD (APGD) and its targeted version APGD-T (Croce & Hein, ICML 2020).

Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", ICML 2020. APGD is PGD with momentum and a step size that adapts
itself, so that it needs no step-size tuning (Algorithm 1 of the paper):

* the step size starts at ``eta = 2 * eps`` for every example;
* ``x(1) = P(x(0) + eta * s(grad f(x(0))))``, then for ``k >= 1``
  ``z(k+1) = P(x(k) + eta * s(grad f(x(k))))`` and
  ``x(k+1) = P(x(k) + alpha * (z(k+1) - x(k)) + (1 - alpha) * (x(k) - x(k-1)))``, ``alpha = 0.75``,
  where ``s`` is ``sign`` (L-inf) or ``g / ||g||_2`` (L2) and ``P`` projects onto the eps-ball
  intersected with [0, 1];
* at the checkpoints ``w_j = ceil(p_j * N_iter)`` (:func:`apgd_checkpoints`) the step size of an
  example is halved, and its iterate restarted from the best point found so far, when Condition 1
  (the loss increased in fewer than ``rho * (w_j - w_{j-1})`` of the iterations since the last
  checkpoint) or Condition 2 (the step size was not reduced at the last checkpoint and the best
  loss has not improved since then) holds.

The losses are cross-entropy and the Difference of Logits Ratio, DLR (eq. 3 of the paper), which
is invariant to shifting and rescaling the logits; APGD-T maximises the targeted DLR loss (eq. 4)
for each of the top-k classes in turn.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from advedge.attacks.base import Attack, ce_loss, margin_loss, project, register_attack
from advedge.attacks.pgd import steepest_ascent_step
from advedge.errors import UsageError

logger = logging.getLogger(__name__)

__all__ = [
    "APGD",
    "APGDDLR",
    "APGDT",
    "apgd_checkpoints",
    "dlr_loss",
    "targeted_dlr_loss",
]

_DLR_EPS = 1e-12
_APGD_LOSSES = ("ce", "dlr")


def dlr_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Difference of Logits Ratio (Croce & Hein, ICML 2020, eq. 3).

    ``DLR(z, y) = -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12)``, where ``pi`` sorts the
    logits in decreasing order. It is positive exactly when the example is misclassified, and it
    does not change when the logits are shifted or scaled by a positive factor.

    Raises:
        UsageError: for fewer than 3 classes (``z_pi3`` does not exist).

    Shape:
        logits ``[N, K]`` (K >= 3), target ``[N]`` int64 -> ``[N]``.
    """
    if logits.shape[1] < 3:
        raise UsageError(
            f"the DLR loss needs at least 3 classes, the model has {logits.shape[1]}",
            "use the cross-entropy loss (apgd-ce) for binary models",
        )
    top = logits.sort(dim=1, descending=True).values
    return margin_loss(logits, target) / (top[:, 0] - top[:, 2] + _DLR_EPS)


def targeted_dlr_loss(logits: Tensor, target: Tensor, target_class: Tensor) -> Tensor:
    """Targeted Difference of Logits Ratio (Croce & Hein, ICML 2020, eq. 4).

    ``DLR_t(z, y, t) = -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)``, where ``pi`` sorts
    the logits in decreasing order and ``t`` is the target class.

    Raises:
        UsageError: for fewer than 4 classes (``z_pi4`` does not exist).

    Shape:
        logits ``[N, K]`` (K >= 4), target ``[N]``, target_class ``[N]`` int64 -> ``[N]``.
    """
    if logits.shape[1] < 4:
        raise UsageError(
            f"the targeted DLR loss needs at least 4 classes, the model has {logits.shape[1]}",
            "use apgd-ce (or apgd-dlr for 3 classes) instead of apgd-t",
        )
    top = logits.sort(dim=1, descending=True).values
    z_y = logits.gather(1, target[:, None]).squeeze(1)
    z_t = logits.gather(1, target_class[:, None]).squeeze(1)
    return -(z_y - z_t) / (top[:, 0] - (top[:, 2] + top[:, 3]) / 2 + _DLR_EPS)


def apgd_checkpoints(n_iter: int) -> list[int]:
    """The iterations at which APGD may halve its step size (Croce & Hein 2020, Section 3.2).

    ``w_j = ceil(p_j * N_iter)`` with ``p_0 = 0``, ``p_1 = 0.22`` and
    ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``, for every ``p_j <= 1``. The fractions are
    kept in integer hundredths so that ``ceil`` is exact (``0.41 * 100`` is not 41 in floating
    point). Repeated values, which only occur for tiny ``n_iter``, are dropped.

    Example:
        ``apgd_checkpoints(100) == [0, 22, 41, 57, 70, 80, 87, 93, 99]``.
    """
    if n_iter < 1:
        raise UsageError(f"n_iter must be >= 1, got {n_iter}")
    hundredths = [0, 22]
    while True:
        step = max(hundredths[-1] - hundredths[-2] - 3, 6)
        if hundredths[-1] + step > 100:
            break
        hundredths.append(hundredths[-1] + step)
    checkpoints: list[int] = []
    for p in hundredths:
        w = -(-p * n_iter // 100)  # ceil(p * n_iter / 100) in integers
        if not checkpoints or w > checkpoints[-1]:
            checkpoints.append(w)
    return checkpoints


def _expand(v: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-example ``[N]`` tensor to broadcast against ``like`` ``[N, ...]``."""
    return v.view(-1, *([1] * (like.dim() - 1)))


@register_attack("apgd-ce")
class APGD(Attack):
    """Untargeted Auto-PGD on the cross-entropy or DLR loss (Croce & Hein 2020, Algorithm 1).

    Only examples the model classifies correctly are attacked; the others are returned unchanged.
    An example counts as broken as soon as one iterate is misclassified, and that iterate is
    returned; for the others the point of highest loss (``x_max``) over all restarts is returned.

    Args:
        model: Classifier under attack (a differentiable ``nn.Module``).
        eps: Budget in pixel units.
        norm: ``"Linf"`` or ``"L2"``.
        loss: ``"ce"`` (cross-entropy) or ``"dlr"`` (eq. 3; needs at least 3 classes); the
            class's ``default_loss`` (``ce``, or ``dlr`` for :class:`APGDDLR`) if None.
        n_iter: Iterations per restart ``N_iter`` (100 in the paper).
        n_restarts: Random restarts; each one attacks only the examples still not broken.
        rho: Threshold of Condition 1 (0.75 in the paper).
        momentum: The paper's ``alpha``, the weight of the new step against the previous one
            (0.75 in the paper).
        seed: Seed of the random starts when no ``generator`` is given.
        generator: RNG for the random starts (on the device of the inputs).

    Raises:
        UsageError: for an unknown loss or out-of-range settings; when called, for DLR on a
            model with fewer than 3 classes.
    """

    name = "apgd-ce"
    SETTINGS = ("n_iter", "n_restarts", "loss", "rho", "momentum", "seed")
    kind = "white-box"
    default_loss = "ce"

    def __init__(
        self,
        model: nn.Module,
        *,
        eps: float,
        norm: str = "Linf",
        loss: str | None = None,
        n_iter: int = 100,
        n_restarts: int = 1,
        rho: float = 0.75,
        momentum: float = 0.75,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(model, eps=eps, norm=norm)
        loss = self.default_loss if loss is None else loss
        if loss not in _APGD_LOSSES:
            raise UsageError(f"unknown APGD loss {loss!r}", "use ce or dlr")
        if n_iter < 1:
            raise UsageError(f"n_iter must be >= 1, got {n_iter}")
        if n_restarts < 1:
            raise UsageError(f"n_restarts must be >= 1, got {n_restarts}")
        if not 0.0 < rho <= 1.0:
            raise UsageError(f"rho must lie in (0, 1], got {rho}")
        if not 0.0 < momentum <= 1.0:
            raise UsageError(f"momentum must lie in (0, 1], got {momentum}")
        self.loss = loss
        self.name = f"apgd-{loss}"
        self.n_iter = int(n_iter)
        self.n_restarts = int(n_restarts)
        self.rho = float(rho)
        self.momentum = float(momentum)
        self.seed = seed
        self.generator = generator
        self.checkpoints = apgd_checkpoints(self.n_iter)

    # -- randomness ---------------------------------------------------------------------------

    def _rng(self, device: torch.device) -> torch.Generator | None:
        """The user's generator, or one seeded from ``seed`` on ``device`` (made once)."""
        if self.generator is None and self.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(int(self.seed))
        return self.generator

    def _random_start(self, x: Tensor, gen: torch.Generator | None) -> Tensor:
        """``x(0)``: uniform in the L-inf ball, or ``x + eps * t / ||t||_2`` with Gaussian ``t``.

        Shape:
            x ``[N, C, H, W]`` -> ``[N, C, H, W]``, clipped to [0, 1].
        """
        if self.norm == "Linf":
            u = torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype)
            return (x + self.eps * (2 * u - 1)).clamp(0.0, 1.0)
        t = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
        t_norm = t.flatten(1).norm(dim=1).clamp_min(1e-12)
        return (x + self.eps * t / _expand(t_norm, t)).clamp(0.0, 1.0)

    # -- losses -------------------------------------------------------------------------------

    def _loss(self, logits: Tensor, y: Tensor, target_class: Tensor | None) -> Tensor:
        """The per-example objective ``f`` that APGD maximises.

        Shape:
            logits ``[n, K]``, y ``[n]``, target_class ``[n]`` or None -> ``[n]``.
        """
        if self.loss == "dlr":
            return dlr_loss(logits, y)
        return ce_loss(logits, y)

    def _evaluate(
        self, x: Tensor, y: Tensor, target_class: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Gradient, per-example loss and predictions of the model at ``x``.

        Shape:
            x ``[n, C, H, W]`` -> grad ``[n, C, H, W]``, loss ``[n]``, prediction ``[n]``.
        """

        def objective(logits: Tensor, target: Tensor) -> Tensor:
            return self._loss(logits, target, target_class)

        grad, logits = self.input_grad(x, y, objective)
        loss = self._loss(logits.float(), y, target_class).detach()
        return grad, loss, logits.argmax(1)

    # -- Algorithm 1 --------------------------------------------------------------------------

    def _step(self, x: Tensor, grad: Tensor, eta: Tensor, x_clean: Tensor) -> Tensor:
        """``P(x + eta * s(grad))`` with a per-example step size ``eta`` ``[n]``."""
        direction = steepest_ascent_step(torch.zeros_like(x), grad, 1.0, self.norm)
        return project(x + _expand(eta, x) * direction, x_clean, self.eps, self.norm)

    def _run(
        self, x: Tensor, y: Tensor, target_class: Tensor | None, gen: torch.Generator | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One run of Algorithm 1 from a random start on examples the model gets right.

        Examples leave the batch once an iterate is misclassified; the others run ``n_iter``
        iterations.

        Returns:
            ``(x_out, fooled, loss_max)``: the first misclassified iterate for fooled examples
            and ``x_max`` otherwise, whether each example was fooled, and ``f_max``.

        Shape:
            x ``[n, C, H, W]``, y ``[n]``, target_class ``[n]`` or None ->
            ``[n, C, H, W]``, ``[n]`` bool, ``[n]``.
        """
        # one long function: Algorithm 1's loop updates eleven per-example state tensors
        # together; split up, each piece would take and return most of them.
        n = x.shape[0]
        x0 = self._random_start(x, gen)
        grad0, loss0, pred0 = self._evaluate(x0, y, target_class)
        fooled = pred0 != y
        x_out = x0.clone()
        # x_max, f_max and the gradient at x_max (reused when an example restarts from x_max).
        x_max, loss_max, grad_max = x0.clone(), loss0.clone(), grad0.clone()
        eta = torch.full((n,), 2.0 * self.eps, device=x.device, dtype=x.dtype)

        x_prev, x_cur, grad_cur, loss_cur = x0, x0.clone(), grad0, loss0.clone()
        # Per-example counters for the checkpoint conditions.
        n_increase = torch.zeros(n, device=x.device, dtype=torch.long)
        # Condition 2 compares two checkpoints, so it cannot fire at the first one (w_1): start
        # as if eta had just been reduced.
        reduced_last = torch.ones(n, device=x.device, dtype=torch.bool)
        loss_max_at_checkpoint = loss_max.clone()
        checkpoints = set(self.checkpoints[1:])
        last_checkpoint = 0

        for k in range(self.n_iter):
            act = (~fooled).nonzero().squeeze(1)
            if act.numel() == 0:
                break
            xa, ga, ea = x_cur[act], grad_cur[act], eta[act]
            if k == 0:  # x(1) = P(x(0) + eta * s(grad)), no momentum yet
                x_next = self._step(xa, ga, ea, x[act])
            else:  # z(k+1), then the momentum step (Algorithm 1, lines 4-5)
                z = self._step(xa, ga, ea, x[act])
                a = self.momentum
                x_next = project(
                    xa + a * (z - xa) + (1 - a) * (xa - x_prev[act]), x[act], self.eps, self.norm
                )
            grad_next, loss_next, pred_next = self._evaluate(
                x_next, y[act], _take(target_class, act)
            )

            # An example is broken as soon as an iterate is misclassified.
            newly = act[pred_next != y[act]]
            x_out[newly] = x_next[pred_next != y[act]]
            fooled[newly] = True

            # f(x(k+1)) > f_max: new best point (for k = 0 the paper uses >=).
            better = loss_next >= loss_max[act] if k == 0 else loss_next > loss_max[act]
            upd = act[better]
            x_max[upd], loss_max[upd], grad_max[upd] = (
                x_next[better],
                loss_next[better],
                grad_next[better],
            )

            increased = (loss_next > loss_cur[act]).long()
            x_prev[act] = xa
            x_cur[act], grad_cur[act], loss_cur[act] = x_next, grad_next, loss_next

            # Algorithm 1 checks k in W after computing x(k+1); this loop's k is the paper's k.
            if k in checkpoints:
                # Condition 1 counts the increases f(x(i+1)) > f(x(i)) over
                # i = w_{j-1}, ..., w_j - 1; this iteration's one (i = w_j) opens the next window.
                window = k - last_checkpoint
                cond1 = n_increase[act].double() < self.rho * window
                # Condition 2: eta not reduced at the last checkpoint and f_max unchanged.
                cond2 = ~reduced_last[act] & (loss_max[act] <= loss_max_at_checkpoint[act])
                reduce = cond1 | cond2
                red = act[reduce]
                eta[red] = eta[red] / 2
                # Restart from x_max (Algorithm 1, line 11); the previous iterate x(k) is kept,
                # so the momentum term (1 - alpha)(x_max - x(k)) carries on as in the paper.
                x_cur[red], grad_cur[red], loss_cur[red] = x_max[red], grad_max[red], loss_max[red]
                reduced_last[act] = reduce
                loss_max_at_checkpoint[act] = loss_max[act]
                n_increase[act] = increased
                last_checkpoint = k
            else:
                n_increase[act] += increased

        x_out[~fooled] = x_max[~fooled]
        return x_out, fooled, loss_max

    def _attack_correct(
        self, x: Tensor, y: Tensor, target_class: Tensor | None, gen: torch.Generator | None
    ) -> tuple[Tensor, Tensor]:
        """``n_restarts`` runs of Algorithm 1 on correctly classified examples.

        Returns:
            ``(x_adv, fooled)``; ``x_adv`` is the first misclassified iterate or the point of
            highest loss over the restarts.

        Shape:
            x ``[n, C, H, W]``, y ``[n]`` -> ``[n, C, H, W]``, ``[n]`` bool.
        """
        x_adv, fooled, loss_max = self._run(x, y, target_class, gen)
        for restart in range(1, self.n_restarts):
            todo = (~fooled).nonzero().squeeze(1)
            if todo.numel() == 0:
                break
            x_new, fooled_new, loss_new = self._run(
                x[todo], y[todo], _take(target_class, todo), gen
            )
            take = fooled_new | (loss_new > loss_max[todo])
            x_adv[todo[take]] = x_new[take]
            loss_max[todo[take]] = loss_new[take]
            fooled[todo[fooled_new]] = True
            logger.debug(
                "%s restart %d: %d/%d still robust",
                self.name,
                restart,
                int((~fooled).sum()),
                fooled.numel(),
            )
        return x_adv, fooled

    def _check_classes(self, n_classes: int) -> None:
        if self.loss == "dlr" and n_classes < 3:
            raise UsageError(
                f"the DLR loss needs at least 3 classes, the model has {n_classes}",
                "use apgd-ce for binary models",
            )

    def perturb(self, x: Tensor, y: Tensor) -> Tensor:
        """Attack the correctly classified examples; return the others unchanged.

        Shape:
            x ``[N, C, H, W]``, y ``[N]`` int64 -> ``[N, C, H, W]``.
        """
        if y.dim() != 1 or y.is_floating_point():
            raise UsageError(f"{self.name} needs class-index targets of shape [N]")
        with torch.no_grad():
            logits = self.model(x)
        self._check_classes(logits.shape[1])
        x_adv = x.clone()
        idx = (logits.argmax(1) == y).nonzero().squeeze(1)
        if idx.numel() == 0:
            return x_adv
        gen = self._rng(x.device)
        x_adv[idx] = self._attack_examples(x[idx], y[idx], logits[idx], gen)
        return x_adv

    def _attack_examples(
        self, x: Tensor, y: Tensor, clean_logits: Tensor, gen: torch.Generator | None
    ) -> Tensor:
        """Attack examples the model classifies correctly (untargeted: all restarts)."""
        x_adv, fooled = self._attack_correct(x, y, None, gen)
        logger.debug("%s: %d/%d broken", self.name, int(fooled.sum()), fooled.numel())
        return x_adv


@register_attack("apgd-dlr")
class APGDDLR(APGD):
    """APGD on the DLR loss (``apgd-dlr``); :class:`APGD` with ``loss="dlr"``."""

    name = "apgd-dlr"
    default_loss = "dlr"


@register_attack("apgd-t")
class APGDT(APGD):
    """Targeted APGD on the targeted DLR loss over the top-k classes (APGD-T).

    For each target rank ``r = 2, ..., n_target_classes + 1`` of the clean logits, APGD
    (``n_restarts`` runs of Algorithm 1) maximises the targeted DLR loss (eq. 4) towards the
    class ranked ``r``, on the examples that are still not misclassified. Success is any
    misclassification; an example stays broken once broken. For an example no run breaks, the
    returned point is the end point (``x_max``) of the run with the smallest margin
    ``z_y - max_{j != y} z_j``.

    Args:
        n_target_classes: Number of target classes ``k`` (9 in the paper; at most ``K - 1``).
        Other args as for :class:`APGD` (the loss is always the targeted DLR).

    Raises:
        UsageError: when called on a model with fewer than 4 classes.
    """

    name = "apgd-t"
    SETTINGS = (*APGD.SETTINGS, "n_target_classes")
    FIXED_OPTIONS = ("loss",)

    def __init__(self, model: nn.Module, *, n_target_classes: int = 9, **kwargs: Any) -> None:
        super().__init__(model, loss="dlr", **kwargs)
        if n_target_classes < 1:
            raise UsageError(f"n_target_classes must be >= 1, got {n_target_classes}")
        self.name = "apgd-t"
        self.loss = "dlr-targeted"
        self.n_target_classes = int(n_target_classes)

    def _loss(self, logits: Tensor, y: Tensor, target_class: Tensor | None) -> Tensor:
        assert target_class is not None
        return targeted_dlr_loss(logits, y, target_class)

    def _check_classes(self, n_classes: int) -> None:
        if n_classes < 4:
            raise UsageError(
                f"apgd-t (targeted DLR loss) needs at least 4 classes, the model has {n_classes}",
                "use apgd-ce (or apgd-dlr for 3 classes)",
            )

    def _attack_examples(
        self, x: Tensor, y: Tensor, clean_logits: Tensor, gen: torch.Generator | None
    ) -> Tensor:
        n_classes = clean_logits.shape[1]
        order = clean_logits.argsort(dim=1, descending=True)  # order[:, 0] == y here
        x_adv = x.clone()
        fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        best_margin = torch.full((x.shape[0],), float("inf"), device=x.device)
        for rank in range(1, min(self.n_target_classes, n_classes - 1) + 1):
            todo = (~fooled).nonzero().squeeze(1)
            if todo.numel() == 0:
                break
            target_class = order[todo, rank]
            x_new, fooled_new = self._attack_correct(x[todo], y[todo], target_class, gen)
            with torch.no_grad():
                margin = -margin_loss(self.model(x_new).float(), y[todo])
            take = fooled_new | (margin < best_margin[todo])
            x_adv[todo[take]] = x_new[take]
            best_margin[todo[take]] = margin[take]
            fooled[todo[fooled_new]] = True
            logger.debug(
                "apgd-t target rank %d: %d/%d still robust",
                rank + 1,
                int((~fooled).sum()),
                fooled.numel(),
            )
        return x_adv


def _take(t: Tensor | None, idx: Tensor) -> Tensor | None:
    """``t[idx]``, passing ``None`` through."""
    return None if t is None else t[idx]

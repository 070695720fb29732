"""Distillation losses: pure functions of student and teacher logits (issue 4, in progress).

Notation: ``T`` is the frozen teacher, ``S`` the student, ``tau`` the temperature, ``x'`` the
adversarial example, ``KL(p || q) = sum_k p_k (log p_k - log q_k)`` with ``p`` the target, and
``softmax(z / tau)`` written ``z / tau`` inside KL. Every KL here is averaged over the batch.

The inner maximisations (the attacks that craft ``x'``) and the ``advedge distill`` command
build on these functions; IAD (Zhu et al., ICLR 2022) is not implemented yet.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from advedge.errors import UsageError

__all__ = [
    "adaad_loss",
    "add_loss",
    "ard_loss",
    "dd_loss",
    "kd_loss",
    "rslad_loss",
    "soft_kl",
]


def soft_kl(target_logits: Tensor, logits: Tensor, tau: float = 1.0) -> Tensor:
    """``KL(softmax(t / tau) || softmax(z / tau))``, averaged over the batch.

    The target's logits are detached: gradients flow into ``logits`` only.

    Shape:
        target_logits, logits ``[N, K]`` -> scalar.
    """
    _check_tau(tau)
    p = F.softmax(target_logits.detach().float() / tau, dim=1)
    log_q = F.log_softmax(logits.float() / tau, dim=1)
    return F.kl_div(log_q, p, reduction="batchmean")


def kd_loss(
    s_clean: Tensor, t_clean: Tensor, y: Tensor, *, tau: float = 4.0, alpha: float = 0.9
) -> Tensor:
    """Knowledge distillation (Hinton et al. 2015), clean inputs only.

    ``L = alpha * tau^2 * KL(T(x)/tau || S(x)/tau) + (1 - alpha) * CE(S(x), y)``.
    """
    _check_alpha(alpha)
    return alpha * tau**2 * soft_kl(t_clean, s_clean, tau) + (1 - alpha) * F.cross_entropy(
        s_clean.float(), y
    )


def dd_loss(s_clean: Tensor, t_clean: Tensor, *, tau: float = 20.0) -> Tensor:
    """Defensive distillation (Papernot et al., S&P 2016).

    The student is trained at temperature ``tau`` on the teacher's soft labels at the same
    temperature, ``L = CE(softmax(T(x)/tau), softmax(S(x)/tau))``, which equals
    ``KL(T(x)/tau || S(x)/tau)`` up to the teacher's entropy (a constant); it is deployed at
    ``tau = 1``. Known to fall to CW-type attacks (Carlini & Wagner, S&P 2017).
    """
    return soft_kl(t_clean, s_clean, tau)


def ard_loss(
    s_adv: Tensor,
    s_clean: Tensor,
    t_clean: Tensor,
    y: Tensor,
    *,
    tau: float = 1.0,
    alpha: float = 1.0,
) -> Tensor:
    """ARD (Goldblum et al., AAAI 2020).

    ``L = alpha * tau^2 * KL(T(x)/tau || S(x')/tau) + (1 - alpha) * CE(S(x), y)``, with
    ``x' = argmax CE(S(x'), y)`` (PGD).
    """
    _check_alpha(alpha)
    return alpha * tau**2 * soft_kl(t_clean, s_adv, tau) + (1 - alpha) * F.cross_entropy(
        s_clean.float(), y
    )


def rslad_loss(s_adv: Tensor, s_clean: Tensor, t_clean: Tensor) -> Tensor:
    """RSLAD (Zi et al., ICCV 2021): robust soft labels, no hard labels anywhere.

    ``L = 5/6 * KL(T(x) || S(x')) + 1/6 * KL(T(x) || S(x))``, with
    ``x' = argmax KL(T(x) || S(x'))``.
    """
    return 5 / 6 * soft_kl(t_clean, s_adv) + 1 / 6 * soft_kl(t_clean, s_clean)


def adaad_loss(
    s_adv: Tensor, s_clean: Tensor, t_adv: Tensor, t_clean: Tensor, *, alpha: float = 1.0
) -> Tensor:
    """AdaAD (Huang et al., CVPR 2023).

    ``L = alpha * KL(T(x') || S(x')) + (1 - alpha) * KL(T(x) || S(x))``, with
    ``x' = argmax KL(T(x') || S(x'))`` (the teacher inside the attack loop).
    """
    _check_alpha(alpha)
    return alpha * soft_kl(t_adv, s_adv) + (1 - alpha) * soft_kl(t_clean, s_clean)


def add_loss(
    s_adv: Tensor,
    s_clean: Tensor,
    t_clean: Tensor,
    *,
    tau: float = 1.0,
    alpha: float = 5 / 6,
) -> Tensor:
    """Adversarial defensive distillation (ADD), the thesis method.

    With ``p_T = softmax(T(x) / tau)`` replacing hard labels everywhere:
    ``L = alpha * tau^2 * KL(p_T || S(x')/tau) + (1 - alpha) * tau^2 * KL(p_T || S(x)/tau)``,
    with ``x' = argmax KL(p_T || softmax(S(x')/tau))`` in the eps-ball. With ``tau = 1`` and
    ``alpha = 5/6`` it equals :func:`rslad_loss`.
    """
    _check_alpha(alpha)
    return tau**2 * (
        alpha * soft_kl(t_clean, s_adv, tau) + (1 - alpha) * soft_kl(t_clean, s_clean, tau)
    )


def _check_tau(tau: float) -> None:
    if not tau > 0:
        raise UsageError(f"temperature must be > 0, got {tau}")


def _check_alpha(alpha: float) -> None:
    if not 0 <= alpha <= 1:
        raise UsageError(f"alpha must lie in [0, 1], got {alpha}")

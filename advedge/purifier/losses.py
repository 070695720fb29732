"""Purifier losses: pure functions of tensors, for the IPCM generator and its baselines.

Notation: ``x`` is a clean image, ``x' = x + delta`` its adversarial example, ``G`` the
generator with inverse perturbation ``r = G_r(x')`` and purified image
``x_hat = clamp(x' + r, 0, 1)``, ``f`` the frozen classifier, ``D`` the discriminator (logits,
one per patch), ``E`` the mean over every element, ``BCE(z, t)`` binary cross-entropy with logits
``z`` and target ``t``, and ``KL(p || q) = sum_k p_k (log p_k - log q_k)`` with ``p`` the target,
averaged over the batch. Targets (clean images, clean logits, clean features, the perturbation)
are detached: gradients flow only into the generator's side. Every loss is computed in float32.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from advedge.errors import UsageError, did_you_mean

logger = logging.getLogger(__name__)

__all__ = [
    "GAN_KINDS",
    "PIXEL_KINDS",
    "ape_gan_generator_loss",
    "d_loss",
    "feature_guidance_loss",
    "g_adv_loss",
    "guidance_loss",
    "inverse_perturbation_loss",
    "pixel_loss",
]

GAN_KINDS = ("lsgan", "nsgan")
PIXEL_KINDS = ("l1", "l2")


def _check_kind(kind: str, choices: tuple[str, ...], what: str) -> str:
    if kind not in choices:
        raise UsageError(f"unknown {what} {kind!r}", did_you_mean(str(kind), choices))
    return kind


def _check_same_shape(a: Tensor, b: Tensor, names: str) -> None:
    if a.shape != b.shape:
        raise UsageError(
            f"{names} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def _check_weight(value: float, name: str) -> float:
    out = float(value)
    if not math.isfinite(out) or out < 0:
        raise UsageError(f"{name} must be a finite number >= 0, got {value!r}")
    return out


def inverse_perturbation_loss(r: Tensor, delta: Tensor) -> Tensor:
    """IPCM's inverse-perturbation loss: the inverse perturbation should cancel the attack.

    ``L = mean_i ||r_i + delta_i||_2^2``: the squared L2 norm summed over each example's pixels
    and channels, then averaged over the batch. ``delta = x' - x`` is the adversarial
    perturbation (detached, it is the target); ``r = G_r(x')`` is the generator's residual. For a
    clean input ``delta = 0`` and the loss asks for ``r = 0``.

    Shape:
        r, delta ``[N, ...]`` (same shape) -> scalar.

    Raises:
        UsageError: if the shapes differ.
    """
    _check_same_shape(r, delta, "r and delta")
    diff = r.float() + delta.detach().float()
    return diff.pow(2).flatten(1).sum(1).mean()


def pixel_loss(x_hat: Tensor, x: Tensor, kind: str = "l1") -> Tensor:
    """Reconstruction loss between the purified and the clean image.

    ``l1``: ``E|x_hat - x|``; ``l2``: ``E(x_hat - x)^2`` (mean squared error). Means are over
    every element; ``x`` is detached.

    Shape:
        x_hat, x ``[N, C, H, W]`` (same shape) -> scalar.

    Raises:
        UsageError: if ``kind`` is not ``"l1"`` or ``"l2"`` or the shapes differ.
    """
    _check_kind(kind, PIXEL_KINDS, "pixel loss")
    _check_same_shape(x_hat, x, "x_hat and x")
    if kind == "l1":
        return F.l1_loss(x_hat.float(), x.detach().float())
    return F.mse_loss(x_hat.float(), x.detach().float())


def guidance_loss(
    logits_hat: Tensor,
    logits_clean: Tensor,
    y: Tensor,
    *,
    ce_weight: float = 1.0,
    kl_weight: float = 1.0,
) -> Tensor:
    """Classifier guidance: the purified image must be classified like the clean original.

    ``L = ce_weight * CE(f(x_hat), y) + kl_weight * KL(softmax f(x) || softmax f(x_hat))``,
    with the clean logits ``f(x)`` detached (the target) and both terms averaged over the batch.

    Shape:
        logits_hat, logits_clean ``[N, K]``, y ``[N]`` (int64) -> scalar.

    Raises:
        UsageError: if a weight is negative or not finite, or the logits' shapes differ.
    """
    ce_weight = _check_weight(ce_weight, "ce_weight")
    kl_weight = _check_weight(kl_weight, "kl_weight")
    _check_same_shape(logits_hat, logits_clean, "logits_hat and logits_clean")
    log_q = F.log_softmax(logits_hat.float(), dim=1)
    log_p = F.log_softmax(logits_clean.detach().float(), dim=1)
    ce = F.nll_loss(log_q, y)
    kl = F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)
    return ce_weight * ce + kl_weight * kl


def feature_guidance_loss(feat_hat: Tensor, feat_clean: Tensor) -> Tensor:
    """HGD's representation-guided loss (Liao et al., CVPR 2018, "Defense against adversarial
    attacks using high-level representation guided denoiser").

    ``L = E|f_l(x_hat) - f_l(x)|``: the L1 distance between the classifier's representations at
    layer ``l`` of the purified and the clean image (HGD uses the top convolutional layer,
    FGD, or the logits, LGD), averaged over every element; the clean features are detached.

    Shape:
        feat_hat, feat_clean ``[N, ...]`` (same shape) -> scalar.

    Raises:
        UsageError: if the shapes differ.
    """
    _check_same_shape(feat_hat, feat_clean, "feat_hat and feat_clean")
    return F.l1_loss(feat_hat.float(), feat_clean.detach().float())


def d_loss(real_logits: Tensor, fake_logits: Tensor, kind: str = "lsgan") -> Tensor:
    """Discriminator loss: clean images are real (1), purified images are fake (0).

    - ``lsgan`` (Mao et al., ICCV 2017, "Least squares generative adversarial networks"):
      ``L_D = 0.5 * E[(D(x) - 1)^2] + 0.5 * E[D(x_hat)^2]``.
    - ``nsgan`` (Goodfellow et al., NeurIPS 2014): ``L_D = BCE(D(x), 1) + BCE(D(x_hat), 0)``.

    The caller detaches ``x_hat`` before ``D`` so that this step trains ``D`` only.

    Shape:
        real_logits, fake_logits: any shape (e.g. patch maps ``[N, 1, h, w]``) -> scalar.

    Raises:
        UsageError: if ``kind`` is unknown.
    """
    _check_kind(kind, GAN_KINDS, "GAN loss")
    real, fake = real_logits.float(), fake_logits.float()
    if kind == "lsgan":
        return 0.5 * (real - 1).pow(2).mean() + 0.5 * fake.pow(2).mean()
    return F.binary_cross_entropy_with_logits(
        real, torch.ones_like(real)
    ) + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))


def g_adv_loss(fake_logits: Tensor, kind: str = "lsgan") -> Tensor:
    """Generator's adversarial loss: purified images should look clean to ``D``.

    - ``lsgan`` (Mao et al., ICCV 2017): ``L_G = 0.5 * E[(D(x_hat) - 1)^2]``.
    - ``nsgan``, the non-saturating loss (Goodfellow et al., NeurIPS 2014):
      ``L_G = BCE(D(x_hat), 1) = -E[log sigmoid(D(x_hat))]``.

    Shape:
        fake_logits: any shape -> scalar.

    Raises:
        UsageError: if ``kind`` is unknown.
    """
    _check_kind(kind, GAN_KINDS, "GAN loss")
    fake = fake_logits.float()
    if kind == "lsgan":
        return 0.5 * (fake - 1).pow(2).mean()
    return F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))


def ape_gan_generator_loss(x_hat: Tensor, x: Tensor, fake_logits: Tensor) -> Tensor:
    """APE-GAN's generator loss (Shen et al., 2017, "APE-GAN: Adversarial perturbation
    elimination with GAN", arXiv:1707.05474).

    ``L = 0.7 * E(x_hat - x)^2 + 0.3 * BCE(D(x_hat), 1)``: the paper's weights ``theta_1 = 0.7``
    on the mean squared error to the clean image and ``theta_2 = 0.3`` on the standard
    (non-saturating) GAN generator loss. ``x`` is detached.

    Shape:
        x_hat, x ``[N, C, H, W]`` (same shape), fake_logits any shape -> scalar.

    Raises:
        UsageError: if the image shapes differ.
    """
    return 0.7 * pixel_loss(x_hat, x, "l2") + 0.3 * g_adv_loss(fake_logits, "nsgan")

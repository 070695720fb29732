"""The IPCM purifier (inverse perturbation construction model): networks and losses.

A generator ``G`` turns an image, adversarial or clean, into a bounded inverse perturbation
``r`` with ``||r||_inf <= eps_r``; the purified image ``clamp(x + r, 0, 1)`` goes to the
classifier. ``G`` trains against a PatchGAN discriminator and under the classifier's guidance,
with the adversarial perturbation ``delta = x' - x`` as the signal ``r`` should cancel. The
baselines' losses (APE-GAN, HGD) live here too.
"""

from __future__ import annotations

from advedge.purifier.checkpoint import PURIFIER_FILE, load_purifier, save_purifier
from advedge.purifier.losses import (
    GAN_KINDS,
    PIXEL_KINDS,
    ape_gan_generator_loss,
    d_loss,
    feature_guidance_loss,
    g_adv_loss,
    guidance_loss,
    inverse_perturbation_loss,
    pixel_loss,
)
from advedge.purifier.networks import UPSAMPLE_MODES, Discriminator, Generator

__all__ = [
    "GAN_KINDS",
    "PIXEL_KINDS",
    "PURIFIER_FILE",
    "UPSAMPLE_MODES",
    "Discriminator",
    "Generator",
    "ape_gan_generator_loss",
    "d_loss",
    "feature_guidance_loss",
    "g_adv_loss",
    "guidance_loss",
    "inverse_perturbation_loss",
    "load_purifier",
    "pixel_loss",
    "save_purifier",
]

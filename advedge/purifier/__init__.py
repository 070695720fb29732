"""The IPCM purifier (inverse perturbation construction model) and its baselines.

A generator ``G`` turns an image, adversarial or clean, into a bounded inverse perturbation
``r`` with ``||r||_inf <= eps_r``; the purified image ``clamp(x + r, 0, 1)`` goes to the
classifier. ``G`` trains against a PatchGAN discriminator and under the classifier's guidance,
with the adversarial perturbation ``delta = x' - x`` as the signal ``r`` should cancel.

The package: :mod:`~advedge.purifier.networks` (``G`` and ``D``),
:mod:`~advedge.purifier.checkpoint` (``purifier.safetensors``), :mod:`~advedge.purifier.losses`
(IPCM's losses and the baselines', APE-GAN and HGD), :mod:`~advedge.purifier.train` (the
methods and their trainer) and :mod:`~advedge.purifier.evaluate` (attacks on the purified
classifier). The networks and their checkpoints are re-exported here.
"""

from __future__ import annotations

from advedge.purifier.checkpoint import PURIFIER_FILE, load_purifier, save_purifier
from advedge.purifier.networks import UPSAMPLE_MODES, Discriminator, Generator

__all__ = [
    "PURIFIER_FILE",
    "UPSAMPLE_MODES",
    "Discriminator",
    "Generator",
    "load_purifier",
    "save_purifier",
]

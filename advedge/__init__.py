"""advedge: adversarially robust small image classifiers, from training to edge GPUs.

The host side (this package) holds data, models, attacks, training objectives and the training
engine, evaluation, checkpoints and the CLI. ``advedge.export`` and ``advedge.calibration`` hold
the deploy side and never import torch at module level.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]

"""Training: one engine runs every training and distillation method.

- :mod:`~advedge.training.config`: :class:`TrainConfig`, the options of ``advedge train`` and
  ``advedge distill`` (written as ``config.yaml`` into the run directory);
- :mod:`~advedge.training.objectives`: training methods (natural, PGD-AT, TRADES, FGSM-RS), each
  a pure loss function plus its attack, in the :data:`TRAINING_METHODS` registry;
- :mod:`~advedge.training.distillation`: distillation methods (KD, DD, ARD, IAD, RSLAD, AdaAD,
  ADD) in the :data:`DISTILL_METHODS` registry;
- :mod:`~advedge.training.rundir`: the run directory every trainer shares (output lock, resume
  checks, atomic checkpoint writes, epoch seeds, ``metrics.csv``);
- :mod:`~advedge.training.engine`: the :class:`Trainer` loop and :func:`train`;
- :mod:`~advedge.training.inputs`, :mod:`~advedge.training.schedule`,
  :mod:`~advedge.training.device`: the data split and frozen teachers, learning-rate schedules,
  and model placement (channels_last, DDP).

A new training objective or distillation method is one class registered in ``objectives.py`` or
``distillation.py`` plus its tests; the CLI's ``--method`` choices come from the registries.
"""

from advedge.training.config import TrainConfig
from advedge.training.distillation import DISTILL_METHODS, build_distill_method
from advedge.training.engine import TrainCallbacks, Trainer, TrainResult, train
from advedge.training.objectives import TRAINING_METHODS, build_method
from advedge.training.rundir import RunDir, check_run_dir

__all__ = [
    "DISTILL_METHODS",
    "TRAINING_METHODS",
    "RunDir",
    "TrainCallbacks",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "build_distill_method",
    "build_method",
    "check_run_dir",
    "train",
]

"""The options of a training run (:class:`TrainConfig`) and their validation.

A :class:`TrainConfig` is written to ``RUN_DIR/config.yaml`` and its :meth:`~TrainConfig.fingerprint`
to ``state.pt``, so its fields are a file format: the distillation fields (``teacher``,
``temperature``, ``mix_alpha``) are part of every run's ``config.yaml`` (null for ``advedge
train``) and of its resume fingerprint, and stay on the one class.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from advedge.attacks import NORMS
from advedge.config import SEED_MAX, check_fields
from advedge.errors import UsageError, did_you_mean
from advedge.models import list_models
from advedge.training.distillation import DISTILL_METHODS
from advedge.training.objectives import TRAINING_METHODS
from advedge.training.rundir import config_fingerprint

__all__ = ["SCHEDULES", "TrainConfig", "check_ranges"]

SCHEDULES = ("cosine", "multistep", "constant")


def check_ranges(
    bounded: Iterable[tuple[str, int | None, int, int]],
    checks: Iterable[tuple[bool, str]] = (),
) -> None:
    """Raise the first failure: an integer outside its range, else the first failed check.

    Args:
        bounded: ``(name, value, lo, hi)``: integers are bounded so that an untrusted config
            can never drive a huge allocation; a None value passes.
        checks: ``(ok, message)`` pairs.

    Raises:
        UsageError: ``"{name} must lie in [{lo}, {hi}], got {value}"`` or the check's message.
    """
    failed = [
        f"{name} must lie in [{lo}, {hi}], got {v}"
        for name, v, lo, hi in bounded
        if not (v is None or lo <= v <= hi)
    ]
    failed += [message for ok, message in checks if not ok]
    if failed:
        raise UsageError(failed[0])


@dataclass(frozen=True)
class TrainConfig:
    """Resolved options of one training run (written to ``RUN_DIR/config.yaml``).

    Attributes:
        data: Dataset directory or name (``cifar10``, ``cifar100``, ``mnist``).
        model: Registry name of the architecture.
        method: A training method (``natural``, ``pgd-at``, ``trades``, ``fgsm-rs``) or, with
            a ``teacher``, a distillation method (``kd``, ``dd``, ``ard``, ...).
        epochs: Total number of epochs.
        out: Run directory.
        eps: Training perturbation budget (pixel units).
        alpha: Attack step size; None means 2/255-per-8/255 (eps/4) for PGD-based methods and
            1.25 * eps for ``fgsm-rs``.
        steps: Attack iterations of the inner maximisation.
        norm: ``Linf`` or ``L2``.
        beta: TRADES' robust-term weight.
        batch_size: Global batch size (split across ranks under torchrun).
        lr, momentum, nesterov, weight_decay: SGD settings.
        schedule: ``cosine``, ``multistep`` or ``constant``, stepped per iteration.
        milestones: Fractions of training at which ``multistep`` multiplies the LR by ``gamma``.
        gamma: The multistep factor.
        subset: Train on a stratified sample of this many training images.
        seed: Seed for weights, data order, subset and attacks.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        amp: ``auto`` (bf16 on CUDA, off on CPU), ``bf16``, ``fp16`` or ``off``.
        channels_last: None means on CUDA, and on CPU when a short timing probe of one
            forward-backward pass finds it faster (oneDNN's NHWC kernels win for small and
            depthwise convolutions); the choice is kept in ``state.pt`` so a resumed run uses
            the same layout. Pass True or False for bit-reproducible runs across machines.
        compile: Wrap the model in ``torch.compile``.
        augment: Random crop (4-pixel padding) and horizontal flip.
        eval_n: Size of the fixed held-out batch scored every epoch.
        eval_steps: PGD steps for the held-out robust accuracy.
        model_kwargs: Extra architecture arguments (e.g. ``width_mult``).
        teacher: Distillation only: the frozen teacher's run directory or model file.
        temperature: Distillation only: the temperature tau (the method's default when None).
        mix_alpha: Distillation only: the loss mix weight in [0, 1] (``advedge distill
            --alpha``; the method's default when None).
    """

    RESUMABLE: ClassVar[frozenset[str]] = frozenset(
        {"epochs", "device", "compile", "out", "eval_n"}
    )
    """Options that may differ between a run and its resumption."""

    data: str
    model: str
    method: str = "pgd-at"
    epochs: int = 10
    out: str = "runs/train"
    eps: float = 8 / 255
    alpha: float | None = None
    steps: int = 10
    norm: str = "Linf"
    beta: float = 6.0
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    milestones: tuple[float, ...] = (0.5, 0.75)
    gamma: float = 0.1
    subset: int | None = None
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    channels_last: bool | None = None
    compile: bool = False
    augment: bool = True
    eval_n: int = 256
    eval_steps: int = 10
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    teacher: str | None = None
    temperature: float | None = None
    mix_alpha: float | None = None

    def __post_init__(self) -> None:
        # Types first (a bool is not an int, floats are finite), then ranges: every later
        # check may compare and hash the values.
        check_fields(self)
        self._check_method()
        if self.model not in list_models():
            raise UsageError(
                f"unknown model {self.model!r}", did_you_mean(self.model, list_models())
            )
        check_ranges(self._bounded(), self._checks())
        object.__setattr__(self, "milestones", tuple(float(m) for m in self.milestones))

    def _check_method(self) -> None:
        """The method exists; a distillation method has a teacher, and only it has one."""
        if self.method not in TRAINING_METHODS and self.method not in DISTILL_METHODS:
            known = [*TRAINING_METHODS, *DISTILL_METHODS]
            raise UsageError(f"unknown method {self.method!r}", did_you_mean(self.method, known))
        if self.method in DISTILL_METHODS and not self.teacher:
            raise UsageError(f"method {self.method!r} needs a teacher", "pass --teacher RUN_DIR")
        if self.method in TRAINING_METHODS and self.teacher:
            raise UsageError(f"method {self.method!r} takes no teacher", "use advedge distill")
        if self.temperature is not None and not self.temperature > 0:
            raise UsageError(f"temperature must be > 0, got {self.temperature}")
        if self.mix_alpha is not None and not 0 <= self.mix_alpha <= 1:
            raise UsageError(f"alpha must lie in [0, 1], got {self.mix_alpha}")

    def _bounded(self) -> list[tuple[str, int | None, int, int]]:
        return [
            ("epochs", self.epochs, 1, 100_000),
            ("steps", self.steps, 1, 10_000),
            ("batch_size", self.batch_size, 1, 65_536),
            ("subset", self.subset, 1, 10**9),
            ("seed", self.seed, 0, SEED_MAX),
            ("eval_n", self.eval_n, 1, 10**9),
            ("eval_steps", self.eval_steps, 1, 10_000),
        ]

    def _checks(self) -> list[tuple[bool, str]]:
        return [
            (0 < self.eps <= 1, f"eps must lie in (0, 1], got {self.eps}"),
            (
                self.alpha is None or 0 < self.alpha <= 1,
                f"alpha must lie in (0, 1], got {self.alpha}",
            ),
            (self.norm in NORMS, f"norm must be Linf or L2, got {self.norm!r}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.weight_decay >= 0, f"weight decay must be >= 0, got {self.weight_decay}"),
            (0 <= self.momentum < 1, f"momentum must lie in [0, 1), got {self.momentum}"),
            (0 < self.gamma <= 1, f"gamma must lie in (0, 1], got {self.gamma}"),
            (self.beta >= 0, f"beta must be >= 0, got {self.beta}"),
            (
                self.schedule in SCHEDULES,
                f"schedule must be cosine, multistep or constant, got {self.schedule!r}",
            ),
            (
                self.amp in ("auto", "bf16", "fp16", "off"),
                f"amp must be auto, bf16, fp16 or off, got {self.amp!r}",
            ),
            (all(0 < m < 1 for m in self.milestones), "milestones are fractions in (0, 1)"),
        ]

    @property
    def resolved_alpha(self) -> float:
        """The attack step size actually used."""
        if self.alpha is not None:
            return self.alpha
        return 1.25 * self.eps if self.method == "fgsm-rs" else self.eps / 4

    def fingerprint(self) -> str:
        """Hash of the options that must not change across a resume (all but RESUMABLE)."""
        return config_fingerprint(self, self.RESUMABLE)

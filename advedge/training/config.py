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
from advedge.training.official import ATTACK_BN, KL_REDUCTIONS, kl_scale, official
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

    A field marked *official* left as None takes the method's published value
    (:data:`advedge.training.official.OFFICIAL`) when the config is built, and is written out
    resolved.

    Attributes:
        data: Dataset directory or name (``cifar10``, ``cifar100``, ``mnist``).
        model: Registry name of the architecture.
        method: A training method (``natural``, ``pgd-at``, ``trades``, ``fgsm-rs``) or, with
            a ``teacher``, a distillation method (``kd``, ``dd``, ``ard``, ...).
        epochs: Total number of epochs (official).
        out: Run directory.
        eps: Training perturbation budget (pixel units).
        alpha: Attack step size; None means the method's (``step * eps``: eps/4 for most,
            1.25 * eps for ``fgsm-rs``, 0.007/0.031 * eps for ``trades``).
        steps: Attack iterations of the inner maximisation (official).
        norm: ``Linf`` or ``L2``.
        beta: TRADES' robust-term weight.
        batch_size: Global batch size (split across ranks under torchrun) (official).
        lr, momentum, nesterov, weight_decay: SGD settings (lr and weight decay official).
        schedule: ``cosine``, ``multistep`` or ``constant``, stepped per iteration (official).
        milestones: Fractions of training at which ``multistep`` multiplies the LR by ``gamma``
            (official).
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
        attack_bn: ``eval`` or ``train``: batch-norm mode of the model inside the inner attack
            (official).
        kl_reduction: ``official`` (each KL reduced as the method's code does) or
            ``batchmean`` (every KL averaged over the batch; advedge's behaviour before 0.15).
    """

    RESUMABLE: ClassVar[frozenset[str]] = frozenset(
        {"epochs", "device", "compile", "out", "eval_n"}
    )
    """Options that may differ between a run and its resumption."""

    data: str
    model: str
    method: str = "pgd-at"
    epochs: int | None = None
    out: str = "runs/train"
    eps: float = 8 / 255
    alpha: float | None = None
    steps: int | None = None
    norm: str = "Linf"
    beta: float = 6.0
    batch_size: int | None = None
    lr: float | None = None
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float | None = None
    schedule: str | None = None
    milestones: tuple[float, ...] | None = None
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
    attack_bn: str | None = None
    kl_reduction: str = "official"

    def __post_init__(self) -> None:
        # Types first (a bool is not an int, floats are finite), then ranges: every later
        # check may compare and hash the values.
        check_fields(self)
        self._check_method()
        self._resolve_official()
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

    def _resolve_official(self) -> None:
        """Fill each unset official field with the method's published value."""
        recipe = official(self.method)
        resolved = {
            "epochs": recipe.epochs,
            "steps": recipe.steps or 10,  # no attack: the value is unused, kept as before
            "batch_size": recipe.batch_size,
            "lr": recipe.lr,
            "weight_decay": recipe.weight_decay,
            "schedule": recipe.schedule,
            "milestones": recipe.milestones,
            "attack_bn": recipe.attack_bn,
        }
        for name, value in resolved.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)

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
            (all(0 < m < 1 for m in self.milestones or ()), "milestones are fractions in (0, 1)"),
            (
                self.attack_bn in ATTACK_BN,
                f"attack_bn must be eval or train, got {self.attack_bn!r}",
            ),
            (
                self.kl_reduction in KL_REDUCTIONS,
                f"kl_reduction must be official or batchmean, got {self.kl_reduction!r}",
            ),
        ]

    @property
    def resolved_alpha(self) -> float:
        """The attack step size actually used: ``alpha``, else the method's ``step * eps``."""
        if self.alpha is not None:
            return self.alpha
        return official(self.method).step * self.eps if self._step_changed() else self._legacy_alpha

    @property
    def _legacy_alpha(self) -> float:
        """The step size an unset ``alpha`` meant before per-method defaults (0.15)."""
        return 1.25 * self.eps if self.method == "fgsm-rs" else self.eps / 4

    def _step_changed(self) -> bool:
        step = official(self.method).step
        return bool(step) and step * self.eps != self._legacy_alpha

    def fingerprint(self) -> str:
        """Hash of the options that must not change across a resume (all but RESUMABLE).

        Options added in 0.15 are hashed only where they change what older versions did, so
        a run started before them still resumes: ``attack_bn`` when ``train``,
        ``kl_reduction`` when it changes the method's loss, and an unset ``alpha`` when the
        method's step is not the one it used to mean.
        """

        def view(d: dict[str, Any]) -> dict[str, Any]:
            if d.get("attack_bn") == "eval":
                d.pop("attack_bn")
            if d.get("kl_reduction") == "batchmean" or self._kl_is_batchmean():
                d.pop("kl_reduction", None)
            if self.alpha is None and self._step_changed():
                d["alpha_resolved"] = self.resolved_alpha
            return d

        return config_fingerprint(self, self.RESUMABLE, view=view)

    def _kl_is_batchmean(self) -> bool:
        if self.method not in DISTILL_METHODS:
            return True  # TRADES' KL is a batch mean; the others have none
        return all(kl_scale(self.method, k) == 1.0 for k in (10, 100))

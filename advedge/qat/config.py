"""The options of a robust QAT run (:class:`QatConfig`), written to ``RUN_DIR/config.yaml``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from advedge.calibration.quantize import check_method
from advedge.config import SEED_MAX, check_fields, config_to_dict
from advedge.errors import UsageError, did_you_mean
from advedge.training.config import check_ranges
from advedge.training.distillation import DISTILL_METHODS
from advedge.training.official import KL_REDUCTIONS, official
from advedge.training.rundir import config_fingerprint

__all__ = ["SCHEDULES", "QatConfig"]

#: The per-batch learning-rate schedules of a QAT run.
SCHEDULES = ("cosine", "constant")


@dataclass(frozen=True)
class QatConfig:
    """Resolved options of one QAT run (see :mod:`advedge.qat`).

    A field left as None takes the distillation method's published value
    (:data:`~advedge.training.official.OFFICIAL`: ADD's inner attack of 10 steps of eps/4 from a
    ``0.001 N(0, I)`` start, weight decay 2e-4, batch 128) or, for ``eps``, the student's own
    training budget; it is written out resolved in ``config.yaml``'s ``resolved`` section.

    Attributes:
        student: The trained student's run directory or model.safetensors.
        teacher: The robust teacher's run directory or model.safetensors.
        data: Dataset directory or name; its training split trains, its test split scores.
        out: The run directory.
        ptq: The student's INT8 Q/DQ ONNX (``advedge export --precision int8``, TensorRT form)
            to start from; None: exported here into ``out/ptq`` with the calibration options.
        method: The distillation loss (default ``add``).
        epochs: QAT epochs.
        lr: Peak learning rate (1/20 of ADD's 0.1: a fine-tune).
        momentum: SGD momentum.
        weight_decay: SGD weight decay (None: the method's).
        schedule: ``cosine`` (to 0 at the last step) or ``constant``, stepped per batch.
        batch_size: Images per step (None: the method's).
        subset: Train on a stratified sample of this many training images (None: all).
        eps: The inner attack's budget (None: the student's).
        alpha: The inner attack's step (None: the method's, eps/4 for ADD).
        steps: The inner attack's iterations (None: the method's).
        temperature, mix_alpha, kl_reduction: The distillation loss's (None: the method's).
        calib_n, calib_method, calib_mix_adv: The PTQ export's calibration (without ``ptq``).
        augment: Random crop and flip.
        fake_quant: Train with the Q/DQ pairs quantising (QAT, the default); False trains the
            same network in FP32 (every Q/DQ pair the identity) with everything else equal and
            quantises it afterwards with the PTQ file's activation scales: the control that
            tells what QAT adds to the fine-tune itself (its file is ``<arch>.int8-ft.onnx``,
            ``quantisation: ft``).
        seed: Seed of the subset, the order, the attacks and the calibration set.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        eval_n: Held-out test images scored (clean and PGD on the graph) each epoch.
        eval_steps: PGD steps of that score.
        parity_n: Test images of the written file's parity check and its clean accuracy.
    """

    RESUMABLE: ClassVar[frozenset[str]] = frozenset({"device", "out", "eval_n", "parity_n"})
    """Options that may differ between a run and its resumption."""

    student: str
    teacher: str
    data: str
    out: str
    ptq: str | None = None
    method: str = "add"
    epochs: int = 2
    lr: float = 0.005
    momentum: float = 0.9
    weight_decay: float | None = None
    schedule: str = "cosine"
    batch_size: int | None = None
    subset: int | None = 5000
    eps: float | None = None
    alpha: float | None = None
    steps: int | None = None
    temperature: float | None = None
    mix_alpha: float | None = None
    kl_reduction: str = "official"
    calib_n: int = 512
    calib_method: str = "entropy"
    calib_mix_adv: float = 0.0
    augment: bool = True
    fake_quant: bool = True
    seed: int = 0
    device: str = "auto"
    eval_n: int = 256
    eval_steps: int = 10
    parity_n: int = 1000

    def __post_init__(self) -> None:
        check_fields(self)
        if self.method not in DISTILL_METHODS:
            raise UsageError(
                f"unknown distillation method {self.method!r}",
                did_you_mean(self.method, list(DISTILL_METHODS)),
            )
        check_method(self.calib_method)
        check_ranges(
            [
                ("epochs", self.epochs, 1, 100_000),
                ("batch_size", self.batch_size, 1, 65_536),
                ("subset", self.subset, 1, 10**9),
                ("steps", self.steps, 1, 10_000),
                ("calib_n", self.calib_n, 1, 10**6),
                ("seed", self.seed, 0, SEED_MAX),
                ("eval_n", self.eval_n, 1, 10**6),
                ("eval_steps", self.eval_steps, 1, 10_000),
                ("parity_n", self.parity_n, 1, 10**6),
            ],
            [
                (self.lr > 0, f"lr must be > 0, got {self.lr}"),
                (0 <= self.momentum < 1, f"momentum must lie in [0, 1), got {self.momentum}"),
                (
                    self.weight_decay is None or self.weight_decay >= 0,
                    f"weight decay must be >= 0, got {self.weight_decay}",
                ),
                (self.schedule in SCHEDULES, "schedule must be cosine or constant"),
                (self.eps is None or 0 < self.eps <= 1, f"eps must lie in (0, 1], got {self.eps}"),
                (
                    self.alpha is None or 0 < self.alpha <= 1,
                    f"alpha must lie in (0, 1], got {self.alpha}",
                ),
                (
                    self.temperature is None or self.temperature > 0,
                    f"temperature must be > 0, got {self.temperature}",
                ),
                (
                    self.mix_alpha is None or 0 <= self.mix_alpha <= 1,
                    f"the loss mix must lie in [0, 1], got {self.mix_alpha}",
                ),
                (
                    self.kl_reduction in KL_REDUCTIONS,
                    f"kl_reduction must be official or batchmean, got {self.kl_reduction!r}",
                ),
                (
                    0 <= self.calib_mix_adv <= 1,
                    f"calib_mix_adv must lie in [0, 1], got {self.calib_mix_adv}",
                ),
            ],
        )
        if self.ptq is not None and self.calib_mix_adv:
            raise UsageError(
                "--calib-mix-adv calibrates the PTQ export, and --ptq gives one already",
                "pass one of them",
            )

    def resolved(self, student_eps: float | None) -> dict[str, Any]:
        """The values the run uses for the fields left as None."""
        recipe = official(self.method)
        eps = self.eps if self.eps is not None else float(student_eps or 8 / 255)
        return {
            "eps": eps,
            "alpha": self.alpha if self.alpha is not None else (recipe.step or 0.25) * eps,
            "steps": self.steps if self.steps is not None else (recipe.steps or 10),
            "weight_decay": (
                self.weight_decay if self.weight_decay is not None else recipe.weight_decay
            ),
            "batch_size": self.batch_size if self.batch_size is not None else recipe.batch_size,
            "attack_bn": recipe.attack_bn,
        }

    @property
    def quantisation(self) -> str:
        """What the run's INT8 file is: ``qat``, or ``ft`` (fine-tuned in FP32, then quantised)."""
        return "qat" if self.fake_quant else "ft"

    def fingerprint(self) -> str:
        """Hash of the options that must not change across a resume (all but RESUMABLE)."""
        return config_fingerprint(self, self.RESUMABLE)

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

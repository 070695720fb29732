"""The pipeline's presets: every option of every stage, in one dataclass per preset."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from advedge.errors import UsageError, did_you_mean

__all__ = ["PRESETS", "STAGES", "Preset", "check_preset", "load_preset", "pipeline_stages"]

#: The stages every pipeline runs, in order.
STAGES = ("teacher", "student", "purifier", "export", "bench", "report")


@dataclass
class Preset:
    """Every knob of the pipeline; ``--config FILE.yaml`` overrides any of them."""

    teacher_model: str = "resnet20"
    teacher_epochs: int = 8
    teacher_steps: int = 3
    student_model: str = "resnet8"
    student_epochs: int = 8
    student_steps: int = 3
    subset: int | None = 4000
    batch_size: int = 128
    eps: float = 8 / 255
    purifier_epochs: int = 3
    purifier_width: int = 16
    purifier_steps: int = 3
    calib_n: int = 256
    parity_n: int = 128
    report_n: int = 200
    bench_n: int = 200
    bench_batch_sizes: list[int] = field(default_factory=lambda: [1, 32])
    bench_warmup: int = 10
    bench_iters: int = 50
    query_n: int | None = None  # the Square attack on all bench_n images
    # Square's budget, on the FP32 parents and on each artifact: the quick preset's 1000 keeps
    # the run under 20 minutes on 2 cores (5000 queries on a purifier + classifier take longer
    # than the whole rest of the run); the report's threat model states it
    n_queries: int = 1000
    n_iter: int = 100  # APGD's iterations in bench's transfer set (eval --suite standard's)
    seed: int = 0
    device: str = "auto"
    # robust QAT of the student's INT8 file (advedge qat), benched beside the PTQ artifacts
    qat: bool = False
    qat_epochs: int = 2
    qat_lr: float = 0.005
    qat_steps: int | None = None  # the inner attack's steps; None: student_steps


def pipeline_stages(p: Preset) -> tuple[str, ...]:
    """The stages ``p`` runs, in order: :data:`STAGES`, with ``qat`` after ``export`` when
    ``p.qat`` (a pipeline without it keeps every stage key it had before the stage existed)."""
    if not p.qat:
        return STAGES
    at = STAGES.index("export") + 1
    return (*STAGES[:at], "qat", *STAGES[at:])


PRESETS: dict[str, Preset] = {
    # this 2-core CPU, real CIFAR-10, well under 20 minutes
    "quick": Preset(),
    # a GPU: the full training set and the usual budgets
    "full": Preset(
        teacher_model="resnet18",
        teacher_epochs=100,
        teacher_steps=10,
        student_model="mobilenetv2",
        student_epochs=100,
        student_steps=10,
        subset=None,
        purifier_epochs=20,
        purifier_width=32,
        purifier_steps=10,
        calib_n=512,
        parity_n=256,
        report_n=1000,
        bench_n=1000,
        bench_batch_sizes=[1, 8, 32, 128],
        bench_warmup=50,
        bench_iters=500,
        n_queries=5000,  # AutoAttack's and advedge eval's budget
    ),
}


def load_preset(name: str, config: str | None = None) -> Preset:
    """The named preset, with a YAML file's keys laid over it.

    Unknown keys are refused with a suggestion, values are type-checked against :class:`Preset`
    (``teacher_epochs: "2"`` or ``true`` is refused) and range-checked by :func:`check_preset`.

    Raises:
        UsageError: unknown preset or key, a value of the wrong type or range, unreadable YAML.
    """
    from advedge.config import config_from_dict, config_to_dict, load_yaml

    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}", did_you_mean(name, PRESETS))
    preset = dataclasses.replace(PRESETS[name])
    if config is not None:
        data = load_yaml(config)
        names = {f.name for f in dataclasses.fields(Preset)}
        for key in data:
            if str(key) not in names:
                raise UsageError(
                    f"unknown pipeline option {key!r} in {config}", did_you_mean(str(key), names)
                )
        preset = config_from_dict(Preset, {**config_to_dict(preset), **data})
    check_preset(preset)
    return preset


def check_preset(p: Preset) -> None:
    """Types and ranges of every pipeline option (bounded, so that no untrusted number can drive
    a huge allocation or an endless run).

    Raises:
        UsageError: naming the first option of the wrong type or out of range.
    """
    from advedge.config import SEED_MAX, check_fields
    from advedge.utils import parse_eps, resolve_device

    check_fields(p, label="pipeline option {name}")
    bounds = {
        "teacher_epochs": 100_000,
        "student_epochs": 100_000,
        "purifier_epochs": 100_000,
        "teacher_steps": 10_000,
        "student_steps": 10_000,
        "purifier_steps": 10_000,
        "batch_size": 65_536,
        "purifier_width": 256,
        "subset": 10**9,
        "calib_n": 10**6,
        "parity_n": 10**6,
        "report_n": 10**6,
        "bench_n": 10**6,
        "query_n": 10**6,
        "bench_warmup": 10**6,
        "bench_iters": 10**6,
        "n_queries": 10**6,
        "n_iter": 10_000,
        "qat_epochs": 100_000,
        "qat_steps": 10_000,
    }
    for key, high in bounds.items():
        value = getattr(p, key)
        if value is not None and not 1 <= value <= high:
            raise UsageError(f"pipeline option {key} must lie in [1, {high}], got {value}")
    if not p.bench_batch_sizes or not all(1 <= b <= 4096 for b in p.bench_batch_sizes):
        raise UsageError(
            "pipeline option bench_batch_sizes must list batch sizes in [1, 4096], "
            f"got {p.bench_batch_sizes}"
        )
    if not 0 <= p.seed <= SEED_MAX:
        raise UsageError(f"pipeline option seed must lie in [0, {SEED_MAX}], got {p.seed}")
    parse_eps(p.eps, name="pipeline option eps")
    if not p.qat_lr > 0:
        raise UsageError(f"pipeline option qat_lr must be > 0, got {p.qat_lr}")
    resolve_device(p.device)

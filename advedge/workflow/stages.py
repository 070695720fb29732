"""The stages: each turns the preset into one command's options and calls its API."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from advedge.errors import AdvedgeError
from advedge.workflow.presets import Preset

__all__ = ["STAGE_FUNCTIONS", "Stage", "StageOutput", "check_stage_options", "stage_configs"]

StageOutput = tuple[list[Path], dict[str, Any]]
"""What a stage function returns: the files it made and a JSON summary for the pipeline's doc."""


@dataclass(frozen=True)
class Stage:
    """What every stage function is given: the pipeline's folder, options, data and hooks.

    Attributes:
        root: The pipeline's ``--out`` folder; each stage writes ``root/<stage name>``.
        preset: The resolved options.
        dataset: The loaded dataset (loaded once, before any stage runs).
        say: ``say(stage, message)``: progress for the user.
        callbacks: The training engine's per-batch hooks (progress bars), or None.
    """

    root: Path
    preset: Preset
    dataset: Any
    say: Callable[[str, str], None]
    callbacks: Any = None

    @property
    def data(self) -> str:
        """The dataset's folder, as the commands take it."""
        return str(self.dataset.root)


def stage_configs(p: Preset, data: str) -> dict[str, dict[str, Any]]:
    from advedge.export.runtime.bench import SCHEMA as BENCH_SCHEMA

    common = {"eps": p.eps, "seed": p.seed, "subset": p.subset, "batch_size": p.batch_size}
    return {
        "teacher": {
            **common,
            "model": p.teacher_model,
            "epochs": p.teacher_epochs,
            "steps": p.teacher_steps,
        },
        "student": {
            **common,
            "model": p.student_model,
            "epochs": p.student_epochs,
            "steps": p.student_steps,
        },
        "purifier": {
            **common,
            "epochs": p.purifier_epochs,
            "width": p.purifier_width,
            "steps": p.purifier_steps,
        },
        "export": {
            "calib_n": p.calib_n,
            "parity_n": p.parity_n,
            "report_n": p.report_n,
            "seed": p.seed,
        },
        "qat": {
            "epochs": p.qat_epochs,
            "lr": p.qat_lr,
            "steps": p.qat_steps or p.student_steps,
            **common,
        },
        "bench": {
            "n": p.bench_n,
            "batch_sizes": p.bench_batch_sizes,
            "warmup": p.bench_warmup,
            "iters": p.bench_iters,
            "query_n": p.query_n,
            "n_queries": p.n_queries,
            "n_iter": p.n_iter,
            "eps": p.eps,
            "schema": BENCH_SCHEMA,  # a bench that measures differently redoes the stage
        },
        "report": {},
    }


def check_stage_options(root: Path, p: Preset, dataset: Any) -> None:
    """Build every stage's options once, so a bad model name or value fails before any work."""
    data = str(dataset.root)
    _train_config(root, p, "teacher", data)
    _train_config(root, p, "student", data)
    _purifier_config(root, p, data)
    if dataset.train is None:
        raise AdvedgeError(f"dataset {dataset.root} has no training split", "the pipeline trains")
    # the later stages' own option checks, now rather than after hours of training
    for label, _ in _EXPORTS:
        for precision in _PRECISIONS:
            _export_options(root, p, data, label, precision).validate()
    _bench_options(root, p, data, [str(root / "student")]).validate()
    if p.qat:
        _qat_config(root, p, data, root / "export" / "student" / "x.int8.onnx")
    from advedge.calibration.sets import calibration_source

    calibration_source(dataset, p.calib_n, option="pipeline option calib_n")


def _train_config(root: Path, p: Preset, kind: str, data: str) -> Any:
    """The teacher's (PGD-AT) or the student's (ADD from the teacher) training options."""
    from advedge.training.engine import TrainConfig

    shared = {
        "data": data,
        "out": str(root / kind),
        "eps": p.eps,
        "subset": p.subset,
        "batch_size": p.batch_size,
        "seed": p.seed,
        "device": p.device,
    }
    if kind == "teacher":
        return TrainConfig(
            model=p.teacher_model,
            method="pgd-at",
            epochs=p.teacher_epochs,
            steps=p.teacher_steps,
            **shared,
        )
    return TrainConfig(
        model=p.student_model,
        method="add",
        epochs=p.student_epochs,
        steps=p.student_steps,
        teacher=str(root / "teacher"),
        **shared,
    )


def _purifier_config(root: Path, p: Preset, data: str) -> Any:
    """The IPCM purifier's training options, guarding the student."""
    from advedge.purifier.train import PurifierConfig

    return PurifierConfig(
        classifier=str(root / "student"),
        data=data,
        method="ipcm",
        epochs=p.purifier_epochs,
        out=str(root / "purifier"),
        eps=p.eps,
        steps=p.purifier_steps,
        width=p.purifier_width,
        subset=p.subset,
        batch_size=p.batch_size,
        seed=p.seed,
        device=p.device,
    )


def _train_stage(kind: str) -> Callable[[Stage], StageOutput]:
    def run(stage: Stage) -> StageOutput:
        from advedge.training.engine import check_run_dir, train

        resume = check_run_dir(stage.root / kind, resume=True)
        cfg = _train_config(stage.root, stage.preset, kind, stage.data)
        stage.say(
            kind,
            f"{'resuming' if resume else 'training'} {cfg.model} ({cfg.method}, {cfg.epochs} epochs)",
        )
        result = train(cfg, resume=resume, callbacks=stage.callbacks, dataset=stage.dataset)
        last = result.metrics[-1] if result.metrics else {}
        return [result.model_path], {
            "model": str(result.model_path),
            "clean_acc": last.get("test_clean_acc"),
            "pgd_acc": last.get("test_pgd_acc"),
        }

    return run


def _purifier_stage(stage: Stage) -> StageOutput:
    from advedge.purifier.train import train_purifier
    from advedge.training.engine import check_run_dir

    out = stage.root / "purifier"
    resume = check_run_dir(out, resume=True) or (out / "state.pt").exists()
    cfg = _purifier_config(stage.root, stage.preset, stage.data)
    stage.say(
        "purifier",
        f"{'resuming' if resume else 'training'} the IPCM purifier ({cfg.epochs} epochs)",
    )
    result = train_purifier(cfg, resume=resume, callbacks=stage.callbacks, dataset=stage.dataset)
    return [result.purifier_path], {"purifier": str(result.purifier_path)}


_EXPORTS = (("student", {}), ("fused", {"fuse": True}))
_PRECISIONS = ("int8", "fp16")


def _export_options(root: Path, p: Preset, data: str, label: str, precision: str) -> Any:
    from advedge.export.exporter import ExportOptions

    extra = dict(_EXPORTS)[label]
    return ExportOptions(
        model=str(root / "student"),
        out=str(root / "export" / label),
        precision=precision,
        data=data,
        calib_data=data,
        calib_n=p.calib_n,
        parity_n=p.parity_n,
        report_n=p.report_n,
        seed=p.seed,
        **({"purifier": str(root / "purifier"), **extra} if extra else {}),
    )


def _export_stage(stage: Stage) -> StageOutput:
    from advedge.export.exporter import AdversarialExamples, export_artifacts

    outputs: list[Path] = []
    info: dict[str, Any] = {"warnings": []}
    examples = AdversarialExamples()  # each model's PGD examples crafted once, for both precisions
    for label, _ in _EXPORTS:
        for precision in _PRECISIONS:
            rep = export_artifacts(
                _export_options(stage.root, stage.preset, stage.data, label, precision),
                status=lambda m, label=label: stage.say("export", f"{label}: {m}"),
                examples=examples,
            )
            outputs += [Path(a["path"]) for a in rep.artifacts]
            info["warnings"] += rep.warnings
    info["artifacts"] = sorted({str(o) for o in outputs})
    return sorted(set(outputs)), info


def _qat_config(root: Path, p: Preset, data: str, ptq: Path) -> Any:
    """Robust QAT of the student's INT8 file ``ptq`` (the export stage's), ADD from the teacher."""
    from advedge.qat import QatConfig

    return QatConfig(
        student=str(root / "student"),
        teacher=str(root / "teacher"),
        data=data,
        out=str(root / "qat"),
        ptq=str(ptq),
        epochs=p.qat_epochs,
        lr=p.qat_lr,
        steps=p.qat_steps or p.student_steps,
        subset=p.subset,
        batch_size=p.batch_size,
        eps=p.eps,
        seed=p.seed,
        device=p.device,
        parity_n=p.bench_n,
    )


def _qat_stage(stage: Stage) -> StageOutput:
    from advedge.qat import run_qat
    from advedge.training.engine import check_run_dir

    out = stage.root / "qat"
    ptqs = [
        f
        for f in sorted((stage.root / "export" / "student").glob("*.int8.onnx"))
        if not f.name.endswith("-purified.int8.onnx")
    ]
    if len(ptqs) != 1:
        raise AdvedgeError(f"the export stage left {len(ptqs)} INT8 student files, expected one")
    resume = check_run_dir(out, resume=True)
    cfg = _qat_config(stage.root, stage.preset, stage.data, ptqs[0])
    stage.say(
        "qat", f"{'resuming' if resume else 'fine-tuning'} {ptqs[0].name} ({cfg.epochs} epochs)"
    )
    result = run_qat(
        cfg,
        resume=resume,
        callbacks=stage.callbacks,
        dataset=stage.dataset,
        status=lambda m: stage.say("qat", m),
    )
    last = result.metrics[-1] if result.metrics else {}
    return [result.artifact], {
        "artifact": str(result.artifact),
        "baseline": result.baseline,
        "clean_acc": last.get("test_clean_acc"),
        "pgd_acc": last.get("test_pgd_acc"),
        "artifact_clean_acc": last.get("artifact_clean_acc"),
    }


def _bench_options(root: Path, p: Preset, data: str, artifacts: list[str]) -> Any:
    from advedge.export.runtime.bench import BenchOptions

    return BenchOptions(
        artifacts=artifacts,
        data=data,
        batch_sizes=list(p.bench_batch_sizes),
        warmup=p.bench_warmup,
        iters=p.bench_iters,
        robust=True,
        n=p.bench_n,
        query_n=p.query_n,
        n_queries=p.n_queries,
        n_iter=p.n_iter,
        eps=p.eps,
        model=str(root / "student"),
        purifier=str(root / "purifier"),
        out=str(root / "bench"),
        seed=p.seed,
        overwrite=True,  # the pipeline owns bench/: a stage cut short is redone in place
    )


def _bench_stage(stage: Stage) -> StageOutput:
    from advedge.export.runtime.bench import run_bench

    # the PyTorch student and purifier + student are the white-box parents of the ONNX artifacts
    root = stage.root
    arts = [str(root / "student"), str(root / "purifier")]
    for label, _ in _EXPORTS:
        arts += sorted(str(f) for f in (root / "export" / label).glob("*.onnx"))
    if stage.preset.qat:  # the QAT INT8 file beside the PTQ ones
        arts += sorted(str(f) for f in (root / "qat").glob("*.onnx"))
    options = _bench_options(root, stage.preset, stage.data, arts)
    doc = run_bench(options, status=lambda m: stage.say("bench", m))
    return [root / "bench" / "bench.json"], {
        "artifacts": len(doc["results"]),
        "warnings": doc["warnings"],
    }


def _report_stage(stage: Stage) -> StageOutput:
    from advedge.report import build_report

    root = stage.root
    stage.say("report", "writing report.md, pareto.png and training.png")
    doc = build_report(
        [root / "bench", root / "teacher", root / "student", root / "purifier"],
        root / "report",
        overwrite=True,  # the pipeline owns report/
    )
    return [Path(f) for f in doc["files"].values()], {
        "files": doc["files"],
        "pareto_front": doc["pareto_front"],
    }


STAGE_FUNCTIONS: dict[str, Callable[[Stage], StageOutput]] = {
    "teacher": _train_stage("teacher"),
    "student": _train_stage("student"),
    "purifier": _purifier_stage,
    "export": _export_stage,
    "qat": _qat_stage,
    "bench": _bench_stage,
    "report": _report_stage,
}

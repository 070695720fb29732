"""``advedge pipeline``: teacher -> ADD student -> purifier -> export -> bench -> report.

Stages, each a call into advedge's own API, each writing under ``--out``:

1. ``teacher``   PGD-AT teacher (``advedge train``)                       -> ``teacher/``
2. ``student``   ADD-distilled student (``advedge distill --method add``)  -> ``student/``
3. ``purifier``  IPCM purifier guarding the student (``advedge purifier train``) -> ``purifier/``
4. ``export``    fp32, fp16 and int8 (QDQ) ONNX of the student and of the fused
                 purifier + student (``advedge export``)                  -> ``export/``
5. ``bench``     latency and robust accuracy of every artifact and of their PyTorch parents
                 (``advedge bench --robust``)                             -> ``bench/``
6. ``report``    table, Pareto plot, training curves (``advedge report``) -> ``report/``

Every option and the data are checked before any stage is touched. A stage's key is the sha256
of its options, of the key of the stage before it, and of the sha256 of every file it reads (the
data, and the outputs of the stages it depends on), so a stage whose inputs changed in any way
is redone, and with it everything downstream. A stage is skipped when
``.pipeline/<stage>.json`` records that it finished with the same key and its outputs are there.
A stage killed midway (its record says ``running`` with the same key) resumes from its last
epoch. A stage that must be redone keeps its finished outputs in ``.superseded/<stage>/`` until
the new run has finished, so a failed redo loses nothing; the whole run holds the output lock of
``--out`` (one writer).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from advedge.errors import AdvedgeError, UsageError, did_you_mean
from advedge.locks import output_lock
from advedge.utils import atomic_write_text, sha256_file, to_jsonable

__all__ = ["PRESETS", "STAGES", "Preset", "run_pipeline"]

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
    n_queries: int = 300
    seed: int = 0
    device: str = "auto"


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
        n_queries=5000,
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
    resolve_device(p.device)


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(to_jsonable(obj), sort_keys=True).encode()).hexdigest()


# The stages whose outputs each stage reads: their files' sha256 enter its key.
_READS: dict[str, tuple[str, ...]] = {
    "teacher": (),
    "student": ("teacher",),
    "purifier": ("student",),
    "export": ("student", "purifier"),
    "bench": ("student", "purifier", "export"),
    "report": ("teacher", "student", "purifier", "bench"),
}
SUPERSEDED = ".superseded"


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


class StageRecord:
    """One stage's record (``.pipeline/<name>.json``), key and folder.

    Recorded outputs are paths relative to the pipeline's folder, so a moved or copied
    ``--out`` stays up to date.
    """

    def __init__(self, root: Path, name: str, config: dict[str, Any], inputs: dict[str, str]):
        self.root, self.name = root, name
        self.config = config
        self.inputs = inputs
        self.key = _hash({"stage": name, "config": config, "inputs": inputs})
        self.record_path = root / ".pipeline" / f"{name}.json"
        self.dir = root / name
        self.superseded = root / SUPERSEDED / name

    def record(self) -> dict[str, Any] | None:
        try:
            rec = json.loads(self.record_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return rec if isinstance(rec, dict) else None

    def done(self) -> bool:
        """Finished with this key, and every recorded output is still there."""
        rec = self.record()
        return (
            rec is not None
            and rec.get("hash") == self.key
            and rec.get("status", "finished") == "finished"
            and all((self.root / o).exists() for o in rec.get("outputs", []))
        )

    def resumable(self) -> bool:
        """A run of this very key was cut short: its folder is continued, not set aside."""
        rec = self.record()
        return rec is not None and rec.get("hash") == self.key and rec.get("status") == "running"

    def set_aside(self) -> bool:
        """Move the folder of another key (or of unknown origin) into ``.superseded/``.

        A finished folder becomes ``.superseded/<name>`` (the older finished copy there, which
        it had itself replaced, is deleted only once the move is done); any other folder goes
        to its own ``.superseded/<name>.partial-<time>``, so nothing is ever overwritten.

        Returns:
            True when something was set aside.
        """
        if not self.dir.exists():
            return False
        rec = self.record()
        finished = rec is not None and rec.get("status", "finished") == "finished"
        self.superseded.parent.mkdir(parents=True, exist_ok=True)
        if not finished:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            target = self.superseded.with_name(f"{self.name}.partial-{stamp}-{os.getpid()}")
            os.replace(self.dir, target)
            return True
        older = None
        if self.superseded.exists():
            older = self.superseded.with_name(f"{self.name}.older-{os.getpid()}")
            os.replace(self.superseded, older)
        os.replace(self.dir, self.superseded)
        if rec is not None:
            atomic_write_text(self.superseded / ".record.json", json.dumps(rec, indent=2) + "\n")
        if older is not None:
            shutil.rmtree(older)
        return True

    def start(self) -> None:
        self._write({"status": "running"})

    def finish(self, outputs: list[Path], seconds: float, summary: dict[str, Any]) -> None:
        self._write(
            {
                "status": "finished",
                "outputs": [os.path.relpath(o, self.root) for o in outputs],
                "seconds": round(seconds, 1),
                "summary": summary,
            }
        )
        # the replacement exists now: the superseded copies may go
        for old in self.superseded.parent.glob(f"{self.name}*"):
            if old.name == self.name or old.name.startswith(f"{self.name}."):
                shutil.rmtree(old)

    def _write(self, fields: dict[str, Any]) -> None:
        rec = {"stage": self.name, "hash": self.key, "config": self.config, "inputs": self.inputs}
        atomic_write_text(
            self.record_path, json.dumps(to_jsonable({**rec, **fields}), indent=2) + "\n"
        )


def _stage_inputs(root: Path, name: str, data_key: str) -> dict[str, str]:
    """sha256 of every file ``name`` reads: the data's key and the upstream stages' files."""
    inputs = {"data": data_key}
    for up in _READS[name]:
        for f in sorted((root / up).rglob("*")):
            if f.is_file() and not f.name.startswith("."):
                inputs[str(f.relative_to(root))] = sha256_file(f)
    return inputs


def data_key(path: Path) -> str:
    """A content key of a dataset folder: sha256 over its files' names, sizes and contents."""
    import hashlib

    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
    for f in files:
        h.update(f"{f.relative_to(path) if f != path else f.name}\0{f.stat().st_size}\0".encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def run_pipeline(
    data: str,
    out: str,
    *,
    preset: Preset,
    status: Callable[[str, str], None] | None = None,
    train_callbacks: Any = None,
) -> dict[str, Any]:
    """Run (or continue) the pipeline; returns a summary with every stage's outcome.

    ``status(stage, message)`` is called as work progresses; ``train_callbacks`` receives the
    training engine's per-batch hooks. Every option and the data are checked before any stage
    is touched; the run holds the output lock of ``out``.

    Raises:
        UsageError: an option out of range, ``out`` a file.
        DataError: the data cannot be loaded.
        OutputLockedError: another process is writing ``out``.
    """
    from advedge.data import load_dataset

    say = status or (lambda stage, msg: None)
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise UsageError(f"--out {root} is a file")
    p = preset
    check_preset(p)
    with output_lock(root):
        # before any stage is touched: a mistyped --data or a bad option loses nothing
        dataset = load_dataset(data)
        _check_stage_options(root, p, dataset)
        key = data_key(Path(dataset.root))
        root.mkdir(parents=True, exist_ok=True)
        configs = _stage_configs(p, str(data))
        summary: dict[str, Any] = {
            "schema": "advedge.workflow/1",
            "out": str(root),
            "preset": asdict(p),
            "stages": {},
        }
        upstream = ""
        context = Stage(root, p, dataset, say, train_callbacks)
        for name in STAGES:
            config = {**configs[name], "upstream": upstream}
            stage = StageRecord(root, name, config, _stage_inputs(root, name, key))
            upstream = stage.key
            if stage.done():
                rec = stage.record() or {}
                summary["stages"][name] = {
                    "skipped": True,
                    "seconds": rec.get("seconds"),
                    **rec.get("summary", {}),
                }
                say(name, "up to date, skipped")
                continue
            with output_lock(stage.dir):  # no standalone command writes it meanwhile
                if not stage.resumable() and stage.set_aside():
                    say(
                        name,
                        f"its inputs or options changed: redoing it "
                        f"(old outputs kept in {SUPERSEDED}/)",
                    )
                stage.start()
                t0 = time.perf_counter()
                outputs, info = _STAGE_FNS[name](context)
                seconds = time.perf_counter() - t0
                stage.finish(outputs, seconds, info)
            summary["stages"][name] = {"skipped": False, "seconds": round(seconds, 1), **info}
        summary["report"] = str(root / "report" / "report.md")
        return summary


def _stage_configs(p: Preset, data: str) -> dict[str, dict[str, Any]]:
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
        "bench": {
            "n": p.bench_n,
            "batch_sizes": p.bench_batch_sizes,
            "warmup": p.bench_warmup,
            "iters": p.bench_iters,
            "query_n": p.query_n,
            "n_queries": p.n_queries,
            "eps": p.eps,
        },
        "report": {},
    }


def _check_stage_options(root: Path, p: Preset, dataset: Any) -> None:
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
    from advedge.export.exporter import export_artifacts

    outputs: list[Path] = []
    info: dict[str, Any] = {"warnings": []}
    for label, _ in _EXPORTS:
        for precision in _PRECISIONS:
            rep = export_artifacts(
                _export_options(stage.root, stage.preset, stage.data, label, precision),
                status=lambda m, label=label: stage.say("export", f"{label}: {m}"),
            )
            outputs += [Path(a["path"]) for a in rep.artifacts]
            info["warnings"] += rep.warnings
    info["artifacts"] = sorted({str(o) for o in outputs})
    return sorted(set(outputs)), info


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


_STAGE_FNS: dict[str, Callable[[Stage], StageOutput]] = {
    "teacher": _train_stage("teacher"),
    "student": _train_stage("student"),
    "purifier": _purifier_stage,
    "export": _export_stage,
    "bench": _bench_stage,
    "report": _report_stage,
}

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

A stage is skipped when ``.pipeline/<stage>.json`` says it finished with the same config hash
(the hash covers the stage's options and those of every stage before it, so a change upstream
reruns everything downstream) and its outputs exist. A training stage killed midway resumes
from its last epoch on the next run; a stage whose config changed is redone from scratch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from advedge.errors import UsageError, did_you_mean
from advedge.utils import atomic_write_text, to_jsonable

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
    """The named preset, with a YAML file's keys laid over it (unknown keys are refused)."""
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}", did_you_mean(name, PRESETS))
    preset = dataclasses.replace(PRESETS[name])
    if config is None:
        return preset
    import yaml

    try:
        data = yaml.safe_load(Path(config).read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise UsageError(f"--config {config} does not exist") from None
    except (OSError, yaml.YAMLError) as exc:
        raise UsageError(f"--config {config} is not readable YAML ({exc})") from None
    if not isinstance(data, dict):
        raise UsageError(f"--config {config} must hold a mapping of options")
    names = {f.name for f in dataclasses.fields(Preset)}
    for key in data:
        if key not in names:
            raise UsageError(
                f"unknown pipeline option {key!r} in {config}", did_you_mean(key, names)
            )
    return dataclasses.replace(preset, **data)


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(to_jsonable(obj), sort_keys=True).encode()).hexdigest()


class _Stage:
    def __init__(self, root: Path, name: str, config: dict[str, Any], upstream: str) -> None:
        self.root, self.name = root, name
        self.config = config
        self.hash = _hash({"stage": name, "config": config, "upstream": upstream})
        self.record = root / ".pipeline" / f"{name}.json"
        self.dir = root / name

    def done(self) -> bool:
        try:
            rec = json.loads(self.record.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return False
        return rec.get("hash") == self.hash and all(
            Path(p).exists() for p in rec.get("outputs", [])
        )

    def stale(self) -> bool:
        """A record for another config: the stage's old outputs must go."""
        try:
            rec = json.loads(self.record.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return False
        return rec.get("hash") != self.hash

    def finish(self, outputs: list[Path], seconds: float, summary: dict[str, Any]) -> None:
        atomic_write_text(
            self.record,
            json.dumps(
                to_jsonable(
                    {
                        "stage": self.name,
                        "hash": self.hash,
                        "config": self.config,
                        "outputs": [str(p) for p in outputs],
                        "seconds": round(seconds, 1),
                        "summary": summary,
                    }
                ),
                indent=2,
            )
            + "\n",
        )


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
    training engine's per-batch hooks.
    """
    from advedge.data import load_dataset

    say = status or (lambda stage, msg: None)
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise UsageError(f"--out {root} is a file")
    root.mkdir(parents=True, exist_ok=True)
    p = preset
    dataset = None

    def ds() -> Any:
        nonlocal dataset
        if dataset is None:
            dataset = load_dataset(data)
        return dataset

    common = {
        "data": str(data),
        "eps": p.eps,
        "seed": p.seed,
        "subset": p.subset,
        "batch_size": p.batch_size,
    }
    configs = {
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
    summary: dict[str, Any] = {
        "schema": "advedge.pipeline/1",
        "out": str(root),
        "preset": asdict(p),
        "stages": {},
    }
    upstream = ""
    for name in STAGES:
        stage = _Stage(root, name, configs[name], upstream)
        upstream = stage.hash
        if stage.done():
            rec = json.loads(stage.record.read_text(encoding="utf-8"))
            summary["stages"][name] = {
                "skipped": True,
                "seconds": rec.get("seconds"),
                **rec.get("summary", {}),
            }
            say(name, "up to date, skipped")
            continue
        if stage.stale() and stage.dir.exists():
            say(name, "its config changed: redoing it")
            shutil.rmtree(stage.dir)
        t0 = time.perf_counter()
        outputs, info = _STAGE_FNS[name](root, p, ds, say, train_callbacks)
        seconds = time.perf_counter() - t0
        stage.finish(outputs, seconds, info)
        summary["stages"][name] = {"skipped": False, "seconds": round(seconds, 1), **info}
    summary["report"] = str(root / "report" / "report.md")
    return summary


def _train_stage(kind: str) -> Callable[..., tuple[list[Path], dict[str, Any]]]:
    def run(
        root: Path, p: Preset, ds: Callable[[], Any], say: Callable[[str, str], None], cb: Any
    ) -> tuple[list[Path], dict[str, Any]]:
        from advedge.engine import TrainConfig, check_run_dir, train

        out = root / kind
        resume = check_run_dir(out, resume=True)
        shared = {
            "data": str(ds().root),
            "out": str(out),
            "eps": p.eps,
            "subset": p.subset,
            "batch_size": p.batch_size,
            "seed": p.seed,
            "device": p.device,
        }
        if kind == "teacher":
            cfg = TrainConfig(
                model=p.teacher_model,
                method="pgd-at",
                epochs=p.teacher_epochs,
                steps=p.teacher_steps,
                **shared,
            )
        else:
            cfg = TrainConfig(
                model=p.student_model,
                method="add",
                epochs=p.student_epochs,
                steps=p.student_steps,
                teacher=str(root / "teacher"),
                **shared,
            )
        say(
            kind,
            f"{'resuming' if resume else 'training'} {cfg.model} ({cfg.method}, {cfg.epochs} epochs)",
        )
        result = train(cfg, resume=resume, callbacks=cb, dataset=ds())
        last = result.metrics[-1] if result.metrics else {}
        return [result.model_path], {
            "model": str(result.model_path),
            "clean_acc": last.get("test_clean_acc"),
            "pgd_acc": last.get("test_pgd_acc"),
        }

    return run


def _purifier_stage(
    root: Path, p: Preset, ds: Callable[[], Any], say: Callable[[str, str], None], cb: Any
) -> tuple[list[Path], dict[str, Any]]:
    from advedge.engine import check_run_dir
    from advedge.purifier.train import PurifierConfig, train_purifier

    out = root / "purifier"
    resume = check_run_dir(out, resume=True) or (out / "state.pt").exists()
    cfg = PurifierConfig(
        classifier=str(root / "student"),
        data=str(ds().root),
        method="ipcm",
        epochs=p.purifier_epochs,
        out=str(out),
        eps=p.eps,
        steps=p.purifier_steps,
        width=p.purifier_width,
        subset=p.subset,
        batch_size=p.batch_size,
        seed=p.seed,
        device=p.device,
    )
    say(
        "purifier",
        f"{'resuming' if resume else 'training'} the IPCM purifier ({cfg.epochs} epochs)",
    )
    result = train_purifier(cfg, resume=resume, callbacks=cb, dataset=ds())
    return [result.purifier_path], {"purifier": str(result.purifier_path)}


def _export_stage(
    root: Path, p: Preset, ds: Callable[[], Any], say: Callable[[str, str], None], cb: Any
) -> tuple[list[Path], dict[str, Any]]:
    from advedge.export.pipeline import ExportOptions, export_artifacts

    data = str(ds().root)
    outputs: list[Path] = []
    info: dict[str, Any] = {"warnings": []}
    for label, extra in (
        ("student", {}),
        ("fused", {"purifier": str(root / "purifier"), "fuse": True}),
    ):
        for precision in ("int8", "fp16"):
            opts = ExportOptions(
                model=str(root / "student"),
                out=str(root / "export" / label),
                precision=precision,
                data=data,
                calib_data=data,
                calib_n=p.calib_n,
                parity_n=p.parity_n,
                report_n=p.report_n,
                seed=p.seed,
                **extra,
            )
            rep = export_artifacts(
                opts, status=lambda m, label=label: say("export", f"{label}: {m}")
            )
            outputs += [Path(a["path"]) for a in rep.artifacts]
            info["warnings"] += rep.warnings
    info["artifacts"] = sorted({str(o) for o in outputs})
    return sorted(set(outputs)), info


def _bench_stage(
    root: Path, p: Preset, ds: Callable[[], Any], say: Callable[[str, str], None], cb: Any
) -> tuple[list[Path], dict[str, Any]]:
    from advedge.export.bench import BenchOptions, run_bench

    # the PyTorch student and purifier + student are the white-box parents of the ONNX artifacts
    arts = [str(root / "student"), str(root / "purifier")]
    for label in ("student", "fused"):
        arts += sorted(str(f) for f in (root / "export" / label).glob("*.onnx"))
    opts = BenchOptions(
        artifacts=arts,
        data=str(ds().root),
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
    )
    doc = run_bench(opts, status=lambda m: say("bench", m))
    return [root / "bench" / "bench.json"], {
        "artifacts": len(doc["results"]),
        "warnings": doc["warnings"],
    }


def _report_stage(
    root: Path, p: Preset, ds: Callable[[], Any], say: Callable[[str, str], None], cb: Any
) -> tuple[list[Path], dict[str, Any]]:
    from advedge.report import build_report

    say("report", "writing report.md, pareto.png and training.png")
    doc = build_report(
        [root / "bench", root / "teacher", root / "student", root / "purifier"], root / "report"
    )
    return [Path(f) for f in doc["files"].values()], {
        "files": doc["files"],
        "pareto_front": doc["pareto_front"],
    }


_STAGE_FNS: dict[str, Callable[..., tuple[list[Path], dict[str, Any]]]] = {
    "teacher": _train_stage("teacher"),
    "student": _train_stage("student"),
    "purifier": _purifier_stage,
    "export": _export_stage,
    "bench": _bench_stage,
    "report": _report_stage,
}

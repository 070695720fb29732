"""``run_pipeline``: check everything, then run or skip each stage in order."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from advedge.errors import UsageError
from advedge.locks import output_lock
from advedge.workflow.presets import Preset, check_preset, pipeline_stages
from advedge.workflow.records import SUPERSEDED, StageRecord, data_key, stage_inputs
from advedge.workflow.stages import STAGE_FUNCTIONS, Stage, check_stage_options, stage_configs

__all__ = ["headline", "run_pipeline"]


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
        check_stage_options(root, p, dataset)
        key = data_key(Path(dataset.root))
        root.mkdir(parents=True, exist_ok=True)
        configs = stage_configs(p, str(data))
        summary: dict[str, Any] = {
            "schema": "advedge.pipeline/1",
            "out": str(root),
            "preset": asdict(p),
            "stages": {},
        }
        upstream = ""
        context = Stage(root, p, dataset, say, train_callbacks)
        stages = pipeline_stages(p)
        for name in stages:
            config = {**configs[name], "upstream": upstream}
            stage = StageRecord(root, name, config, stage_inputs(root, name, key, stages))
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
                outputs, info = STAGE_FUNCTIONS[name](context)
                seconds = time.perf_counter() - t0
                stage.finish(outputs, seconds, info)
            summary["stages"][name] = {"skipped": False, "seconds": round(seconds, 1), **info}
        summary["report"] = str(root / "report" / "report.md")
        return summary


def headline(summary: dict[str, Any]) -> dict[str, Any]:
    """What a finished pipeline shows last: per artifact its clean and worst-case robust
    accuracy and its median latency at the smallest batch (from the bench stage's
    ``bench.json``), and the warnings of the export and bench stages.

    Args:
        summary: What :func:`run_pipeline` returned.

    Returns:
        ``{"rows": [{"name" (the artifact's label), "backend", "precision", "clean_acc", "worst_case_acc",
        "batch", "p50_ms"}, ...], "warnings": [...]}``; accuracies are fractions, and a figure
        the bench did not measure is None.
    """
    bench = Path(summary["out"]) / "bench" / "bench.json"
    doc = json.loads(bench.read_text()) if bench.is_file() else {"results": [], "warnings": []}
    rows = []
    for result in doc.get("results", []):
        timed = [lat for lat in result.get("latency", []) if "p50_ms" in lat]
        first = min(timed, key=lambda lat: lat["batch"]) if timed else {}
        rows.append(
            {
                "name": result.get("label") or result.get("name"),
                "backend": result.get("backend"),
                "precision": result.get("precision"),
                "clean_acc": result.get("clean_acc"),
                "worst_case_acc": (result.get("robust") or {}).get("worst_case_acc"),
                "batch": first.get("batch"),
                "p50_ms": first.get("p50_ms"),
            }
        )
    export = summary.get("stages", {}).get("export", {})
    warnings = [*export.get("warnings", []), *doc.get("warnings", [])]
    return {"rows": rows, "warnings": list(dict.fromkeys(warnings))}

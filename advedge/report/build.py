"""``advedge report``: reads the inputs, writes report.md, report.json and the plots, all or
nothing (see :func:`build_report`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from advedge.errors import DataError, UsageError, os_error
from advedge.locks import output_lock
from advedge.outputs import Leftovers, StagedFiles, check_out, quiet_warnings, refuse_overwrite
from advedge.report.analysis import compare_front, front_of, honest_robustness
from advedge.report.inputs import Bench, Run, read_bench, read_run, run_summary
from advedge.report.markdown import markdown
from advedge.report.pareto import pareto_figure
from advedge.report.plots import plt, save_png, training_figure
from advedge.utils import to_jsonable

__all__ = ["OUTPUTS", "PLOTS", "SCHEMA", "build_report"]

SCHEMA = "advedge.report/2"
OUTPUTS = ("report.md", "report.json")
PLOTS = ("pareto.png", "training.png")


def build_report(
    inputs: list[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write report.md, report.json, pareto.png and training.png; returns report.json's document.

    Every input is read and ``out`` checked before anything is written; ``out`` is locked
    while the report is written, created only by its first file, and a failure leaves nothing
    behind. An earlier report.md or report.json is replaced only with ``overwrite``, all or
    nothing: every new file is written under a temporary name first and then they are renamed
    into place in a row, so a failure before the renames leaves the earlier report whole; only
    after the renames is a plot the new report does not draw removed (no stale PNG beside it).

    Raises:
        UsageError: no inputs, an input that is neither a bench nor a run directory, or an
            ``out`` that is a file or lies under one.
        DataError: an unreadable bench.json or metrics.csv.
        AdvedgeError: an earlier report without ``overwrite``, an ``out`` that cannot be written.
        OutputLockedError: another process writes the same ``out``.
    """
    with quiet_warnings():
        if not inputs:
            raise UsageError("give at least one bench or run directory")
        out = check_out(out)
        rows, benches, runs = _read_inputs(inputs)
        if any(r["p50_b1_ms"] is not None for r in rows) or runs:
            plt()  # matplotlib is there before anything is written
        with output_lock(out):
            refuse_overwrite(out, OUTPUTS, overwrite)
            made = Leftovers(out)  # the folders this report creates, removed when empty
            try:
                return _write_report(rows, benches, runs, out, replace=overwrite)
            except OSError as exc:
                made.remove()
                raise os_error(exc, out) from None
            except BaseException:
                made.remove()
                raise


def _read_inputs(
    inputs: list[str | os.PathLike[str]],
) -> tuple[list[dict[str, Any]], list[Bench], dict[str, Run]]:
    rows: list[dict[str, Any]] = []
    benches: list[Bench] = []
    runs: dict[str, Run] = {}
    for item in inputs:
        p = Path(item)
        bench = p / "bench.json" if p.is_dir() else p
        if bench.name == "bench.json" and bench.is_file():
            try:
                about, more = read_bench(bench)
            except DataError:
                raise
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise DataError(
                    f"unreadable bench file {bench}: {type(exc).__name__}: {exc}"
                ) from None
            benches.append(about)
            rows += more
        elif p.is_dir() and (p / "metrics.csv").is_file():
            runs[p.name] = read_run(p)
        else:
            raise UsageError(
                f"{p} is neither a bench directory (bench.json) nor a run directory (metrics.csv)"
            )
    return rows, benches, runs


def _threat(benches: list[Bench]) -> dict[str, Any] | None:
    """The threat model shared by every bench (None when none has one, or they differ)."""
    models = {str(b.threat_model): b.threat_model for b in benches}
    return next(iter(models.values())) if len(models) == 1 else None


def _write_report(
    rows: list[dict[str, Any]],
    benches: list[Bench],
    runs: dict[str, Run],
    out: Path,
    *,
    replace: bool,
) -> dict[str, Any]:
    """Stage every file under a temporary name beside it, then rename them all in a row; only
    then, with ``replace``, remove a plot of the earlier report that this one does not draw."""
    threat = _threat(benches)
    comparison = compare_front(rows)
    figures = (
        ("pareto.png", "pareto", lambda: pareto_figure(rows, threat and threat["summary"])),
        ("training.png", "training", lambda: training_figure(runs)),
    )
    with StagedFiles() as staged:
        files = {"markdown": str(out / "report.md"), "json": str(out / "report.json")}
        for name, key, draw in figures:
            fig = draw()
            if fig is not None:
                save_png(fig, staged.path(out / name))
                files[key] = str(out / name)
            else:
                staged.drop(out / name)
        doc = _report_doc(rows, benches, runs, comparison, files)
        staged.write_text(out / "report.json", json.dumps(to_jsonable(doc), indent=2) + "\n")
        staged.write_text(out / "report.md", markdown(rows, benches, runs, comparison))
        stale = [out / name for name in PLOTS] if replace else []
        staged.install(stale=stale)  # removes only the plots not among the new files
    return doc


def _report_doc(
    rows: list[dict[str, Any]],
    benches: list[Bench],
    runs: dict[str, Run],
    comparison: dict[str, Any],
    files: dict[str, str],
) -> dict[str, Any]:
    """``report.json``: the threat model, the rows (fractions, with their 95% intervals and
    latency warnings; without the per-example flags), the Pareto front, the distinguishability
    of the pairs on and next to it, the honest headline, the benches, the runs and the files."""
    return {
        "schema": SCHEMA,
        "threat_model": _threat(benches),
        "rows": [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows],
        "pareto_front": comparison["front"],
        "pareto_metric": comparison["metric"],
        "pareto_clean_front": [rows[i]["artifact"] for i in front_of(rows, "clean_acc")],
        "distinguishability": comparison["pairs"],
        "robustness_of_what_ships": honest_robustness(rows),
        "benches": [
            {
                "source": b.source,
                "schema": b.schema,
                "threat_model": b.threat_model,
                "load_before": b.load_before,
                "load_after": b.load_after,
                "threads": b.threads,
                "warnings": b.warnings,
            }
            for b in benches
        ],
        "runs": {name: run.metrics for name, run in runs.items()},
        "run_summaries": {name: run_summary(run) for name, run in runs.items()},
        "files": files,
    }

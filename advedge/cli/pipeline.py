"""``advedge pipeline``: teacher, student, purifier, export, bench and report in one command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Group
from rich.table import Table

from advedge.cli.options import Data, JsonOpt, choices
from advedge.cli.output import Output, percent
from advedge.cli.progress import PipelineProgress

__all__ = ["pipeline_cmd"]


def pipeline_cmd(
    data: Data,
    out: Annotated[Path, typer.Option(help="Folder for every stage's outputs.")],
    preset: Annotated[
        str,
        typer.Option(
            help="quick (a 2-core CPU, < 20 min) or full (a GPU).", metavar=choices("quick", "full")
        ),
    ] = "quick",
    config: Annotated[
        Path | None, typer.Option(help="YAML file overriding preset options.")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Teacher -> ADD student -> purifier -> export [-> qat] -> bench -> report; reruns skip
    finished stages."""
    from advedge.workflow import load_preset, pipeline_stages, run_pipeline

    output = Output(json_out)
    chosen = load_preset(preset, None if config is None else str(config))
    progress = PipelineProgress(output, pipeline_stages(chosen))
    with progress:
        summary = run_pipeline(
            data, str(out), preset=chosen, status=progress.on_stage, train_callbacks=progress
        )
        progress.finish()
    from advedge.workflow import headline

    stages = Table("stage", "status", "seconds", title=f"advedge pipeline -> {out}")
    for name, info in summary["stages"].items():
        stages.add_row(name, "skipped" if info.get("skipped") else "ran", str(info.get("seconds")))
    head = headline(summary)
    output.result(summary, human=Group(stages, _headline_table(head["rows"])))
    for warning in head["warnings"]:
        output.warn(warning)
    output.info(f"report: {summary['report']}")


def _headline_table(rows: list[dict[str, Any]]) -> Table:
    """Per artifact: clean and worst-case robust accuracy (percent), median latency."""
    batches = sorted({row["batch"] for row in rows if row["batch"] is not None})
    table = Table(
        title="headline: robust % is the worst case over the bench's attacks",
        caption=f"p50 at batch {', '.join(map(str, batches))}" if batches else None,
    )
    table.add_column("artifact (model, precision, backend)", no_wrap=True)
    for header in ("clean %", "robust %", "p50 ms"):
        table.add_column(header, justify="right")
    for row in rows:
        p50 = row["p50_ms"]
        table.add_row(
            str(row["name"]),
            percent(row["clean_acc"]),
            percent(row["worst_case_acc"]),
            "" if p50 is None else f"{p50:.3g}",
        )
    return table

"""``advedge pipeline``: teacher, student, purifier, export, bench and report in one command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from advedge.cli.options import Data, JsonOpt, choices
from advedge.cli.output import Output
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
    """Teacher -> ADD student -> purifier -> export -> bench -> report; reruns skip finished stages."""
    from advedge.workflow import STAGES, load_preset, run_pipeline

    output = Output(json_out)
    chosen = load_preset(preset, None if config is None else str(config))
    progress = PipelineProgress(output, STAGES)
    with progress:
        summary = run_pipeline(
            data, str(out), preset=chosen, status=progress.on_stage, train_callbacks=progress
        )
        progress.finish()
    table = Table("stage", "status", "seconds", title=f"advedge pipeline -> {out}")
    for name, info in summary["stages"].items():
        table.add_row(name, "skipped" if info.get("skipped") else "ran", str(info.get("seconds")))
    output.result(summary, human=table)
    output.info(f"report: {summary['report']}")

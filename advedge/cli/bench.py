"""``advedge bench`` and ``advedge report``: measure the deployed artifacts, then compare them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from advedge.cli.options import JsonOpt, SelectionSeed, int_list, params
from advedge.cli.output import Output

__all__ = ["bench_cmd", "report_cmd"]


def bench_cmd(
    ctx: typer.Context,
    artifact: Annotated[
        list[str],
        typer.Option(help=".engine, .onnx, .safetensors or run directory (repeatable)."),
    ],
    data: Annotated[str, typer.Option(help="Data directory whose test split is used.")],
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,8,32,128",
    warmup: Annotated[int, typer.Option(help="Untimed calls before timing.")] = 50,
    iters: Annotated[int, typer.Option(help="Timed calls per batch size.")] = 500,
    robust: Annotated[
        bool, typer.Option("--robust", help="Transfer (PGD-20, APGD) and query (Square) attacks.")
    ] = False,
    n: Annotated[int, typer.Option(help="Test images for accuracy and the transfer set.")] = 1000,
    query_n: Annotated[
        int | None,
        typer.Option(help="--robust: Square on the first N images only [default: all --n]."),
    ] = None,
    n_queries: Annotated[int, typer.Option(help="--robust: Square's query budget.")] = 1000,
    eps: Annotated[str, typer.Option(help="--robust: L-inf eps.")] = "8/255",
    model: Annotated[
        str | None, typer.Option(help="--robust: the FP32 checkpoint the artifacts come from.")
    ] = None,
    purifier: Annotated[
        str | None, typer.Option(help="--robust: the purifier of fused artifacts.")
    ] = None,
    transfer_set: Annotated[
        str | None,
        typer.Option(help="--robust: a saved transfer-*.npz (no torch needed for transfer)."),
    ] = None,
    backend: Annotated[
        str,
        typer.Option(help="auto (by file type), {backends}."),
    ] = "auto",
    out: Annotated[Path | None, typer.Option(help="Write bench.json and bench.csv here.")] = None,
    seed: SelectionSeed = 0,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an earlier bench.json in --out.")
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Latency (mean, p50/p90/p99) and accuracy measured on the deployed artifact itself."""
    from advedge.export.runtime.bench import BenchOptions, run_bench
    from advedge.utils import parse_eps

    output = Output(json_out)
    settings = params(
        ctx,
        drop=("artifact",),
        artifacts=list(artifact),
        batch_sizes=int_list(batch_sizes, "--batch-sizes"),
        robust=robust or transfer_set is not None,
        eps=parse_eps(eps),
        out=None if out is None else str(out),
    )
    doc = run_bench(BenchOptions(**settings), status=output.info)
    for warning in doc["warnings"]:
        output.err.print(f"[bold yellow]warning[/]: {warning}", highlight=False)
    output.result(doc, human=_latency_table(doc["results"]))


def _latency_table(results: list[dict[str, Any]]) -> Table:
    table = Table(
        "artifact", "backend", "batch", "p50 ms", "p99 ms", "cv", "img/s", "clean", "worst"
    )
    for r in results:
        worst = (r.get("robust") or {}).get("worst_case_acc")
        for lat in r["latency"]:
            if "p50_ms" not in lat:
                continue
            table.add_row(
                r["name"],
                r["backend"],
                str(lat["batch"]),
                f"{lat['p50_ms']:.3f}",
                f"{lat['p99_ms']:.3f}",
                f"{lat['cv']:.2f}",
                f"{lat['images_per_s']:.0f}",
                f"{r['clean_acc']:.4f}",
                "-" if worst is None else f"{worst:.4f}",
            )
    return table


def report_cmd(
    inputs: Annotated[
        list[str], typer.Argument(help="Bench directories and training run directories.")
    ],
    out: Annotated[Path, typer.Option(help="Folder for report.md, report.json and the PNGs.")],
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an earlier report.md in --out.")
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """One table across artifacts, a robustness-latency Pareto plot and training curves."""
    from advedge.report import build_report

    output = Output(json_out)
    doc = build_report(inputs, out, overwrite=overwrite)
    table = Table(
        "artifact",
        "precision",
        "clean",
        "worst-case",
        "p50 ms (b1)",
        title=f"advedge report -> {out}",
    )
    for r in doc["rows"]:
        table.add_row(
            r["artifact"],
            str(r["precision"]),
            "-" if r["clean_acc"] is None else f"{r['clean_acc']:.4f}",
            "-" if r["worst_case_acc"] is None else f"{r['worst_case_acc']:.4f}",
            "-" if r["p50_b1_ms"] is None else f"{r['p50_b1_ms']:.3f}",
        )
    output.result(doc, human=table)

"""``advedge bench`` and ``advedge report``: measure the deployed artifacts, then compare them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from advedge.cli.options import JsonOpt, choices, int_list, params
from advedge.cli.output import Output

__all__ = ["bench_cmd", "report_cmd"]


def bench_cmd(  # long: one parameter for each of its 23 options; the body is short
    ctx: typer.Context,
    artifact: Annotated[
        list[str],
        typer.Option(help=".engine, .onnx, .safetensors or run directory (repeatable)."),
    ],
    data: Annotated[str, typer.Option(help="Data directory whose test split is used.")],
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,8,32,128",
    warmup: Annotated[
        int,
        typer.Option(
            help="Untimed calls per batch size before timing (at least 1: the first compiles)."
        ),
    ] = 50,
    iters: Annotated[int, typer.Option(help="Timed calls per batch size.")] = 500,
    robust: Annotated[
        bool,
        typer.Option(
            "--robust",
            help="eval --suite standard's attacks (APGD-CE, APGD-T, Square) and CW-20 crafted "
            "on the FP32 --model and transferred, then Square on each artifact itself.",
        ),
    ] = False,
    white_box_artifact: Annotated[
        bool,
        typer.Option(
            help="--robust: APGD-CE and APGD-T on a differentiable replica of each ONNX "
            "artifact's own graph (straight-through rounding), scored on the artifact."
        ),
    ] = True,
    n: Annotated[
        int,
        typer.Option(help="The first N test images (as eval --n takes them): accuracy, attacks."),
    ] = 1000,
    query_n: Annotated[
        int | None,
        typer.Option(help="--robust: Square on the first N images only [default: all --n]."),
    ] = None,
    n_queries: Annotated[
        int,
        typer.Option(
            help="--robust: Square's query budget, on the FP32 parent and on each artifact "
            "(AutoAttack's 5000)."
        ),
    ] = 5000,
    n_iter: Annotated[
        int,
        typer.Option(
            help="--robust: APGD-CE's iterations and APGD-T's per target class "
            "(eval --suite standard's 100)."
        ),
    ] = 100,
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
        typer.Option(metavar=choices("auto", "{backends}"), help="auto: by the file type."),
    ] = "auto",
    threads: Annotated[
        int | None,
        typer.Option(
            help="CPU threads per backend (PyTorch and ONNX Runtime), 1-1024; recorded with the "
            "load average [default: OMP_NUM_THREADS if set, else one per physical core this "
            "process may use]."
        ),
    ] = None,
    device: Annotated[
        str,
        typer.Option(
            help="auto, cpu, cuda or cuda:N: where PyTorch backends run and the transfer set is "
            "crafted, and the GPU of ONNX Runtime's CUDA/TensorRT providers."
        ),
    ] = "auto",
    out: Annotated[Path | None, typer.Option(help="Write bench.json and bench.csv here.")] = None,
    seed: Annotated[int, typer.Option(help="--robust: the attacks' seed (eval's --seed).")] = 0,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an earlier bench.json in --out.")
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Latency (mean, p50/p90/p99) and accuracy measured on the deployed artifact itself."""
    from advedge.export.runtime.bench import BenchOptions, run_bench
    from advedge.export.runtime.threads import check_threads
    from advedge.utils import parse_eps

    output = Output(json_out)
    check_threads(threads)
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
        output.err.print(  # one line each, however long
            f"[bold yellow]warning[/]: {escape(warning)}", highlight=False, soft_wrap=True
        )
    output.result(doc, human=_latency_table(doc["results"]))
    conditions = _conditions(doc)
    if conditions and not json_out:  # with --json, bench.json's fields say it
        output.out.print(conditions, highlight=False)


def _conditions(doc: dict[str, Any]) -> str | None:
    """``threads 2 (of 2 CPUs); 1-minute load average 0.31 before, 1.95 after``: the run's
    threads and the load around it, from bench.json's ``threads`` (what
    :func:`~advedge.export.runtime.threads.apply_threads` returned) and ``load_average``
    (``{"before": [1, 5, 15 min], "after": [...]}``); None where it records neither."""
    applied = doc.get("threads") or {}
    load = doc.get("load_average") or {}
    parts = []
    if applied.get("threads") is not None:
        cpus = applied.get("cpus_available")
        parts.append(f"threads {applied['threads']}" + (f" (of {cpus} CPUs)" if cpus else ""))
    shown = [
        f"{load[when][0]:.2f} {when}"
        for when in ("before", "after")
        if isinstance(load.get(when), list) and load[when]
    ]
    if shown:
        parts.append("1-minute load average " + ", ".join(shown))
    return "; ".join(parts) or None


def _latency_table(results: list[dict[str, Any]]) -> Table:
    table = Table(
        "artifact", "backend", "batch", "p50 ms", "p99 ms", "cv", "img/s", "clean %", "worst %"
    )
    for r in results:
        worst = (r.get("robust") or {}).get("worst_case_acc")
        for lat in r["latency"]:
            if "p50_ms" not in lat:
                continue
            table.add_row(
                r.get("label") or r["name"],
                r["backend"],
                str(lat["batch"]),
                f"{lat['p50_ms']:.3f}",
                f"{lat['p99_ms']:.3f}",
                f"{lat['cv']:.2f}",
                f"{lat['images_per_s']:.0f}",
                f"{100 * r['clean_acc']:.1f}",
                "-" if worst is None else f"{100 * worst:.1f}",
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
        "clean % [95%]",
        "worst-case % [95%]",
        "p50 ms (b1)",
        title=f"advedge report -> {out}",
    )
    for r in doc["rows"]:
        table.add_row(
            r.get("label") or r["artifact"],
            _pct(r["clean_acc"], r.get("clean_acc_ci95")),
            _pct(r["worst_case_acc"], r.get("worst_case_acc_ci95")),
            "-" if r["p50_b1_ms"] is None else f"{r['p50_b1_ms']:.3f}",
        )
    output.result(doc, human=table)
    if not json_out:
        labels = {r["artifact"]: r.get("label") or r["artifact"] for r in doc["rows"]}
        for pair in doc.get("distinguishability") or []:
            if pair.get("distinguishable") is False:
                output.out.print(
                    f"{labels.get(pair['a'], pair['a'])} vs {labels.get(pair['b'], pair['b'])}: "
                    f"{pair['text']}",
                    highlight=False,
                    markup=False,
                )


def _pct(acc: float | None, ci: list[float] | None) -> str:
    """``45.5 [38.7, 52.4]``: an accuracy in percent with its 95% interval."""
    if acc is None:
        return "-"
    return f"{100 * acc:.1f}" + ("" if not ci else f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]")

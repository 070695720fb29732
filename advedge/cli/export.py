"""``advedge export`` and ``advedge calibrate``: ONNX, FP16, INT8 Q/DQ and TensorRT artifacts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from advedge.cli.options import (
    CacheDir,
    CalibMethod,
    CalibMixAdv,
    CalibN,
    JsonOpt,
    SelectionSeed,
    choices,
    params,
)
from advedge.cli.output import Output, percent

__all__ = ["calibrate_cmd", "export_cmd"]


def export_cmd(  # long: one parameter for each of its 30 options; the body is short
    ctx: typer.Context,
    model: Annotated[str, typer.Option(help="Classifier run directory or model.safetensors.")],
    out: Annotated[Path, typer.Option(help="Folder to write the artifacts into.")],
    purifier: Annotated[
        str | None,
        typer.Option(help="Purifier run directory: exported beside the classifier, or fused."),
    ] = None,
    fuse: Annotated[
        bool, typer.Option(help="One graph: purifier -> classifier, one input, logits out.")
    ] = False,
    precision: Annotated[
        str, typer.Option(help="{precisions}.", metavar=choices("{precisions}"))
    ] = "fp32",
    data: Annotated[
        str | None,
        typer.Option(
            help="Data directory whose test split feeds the parity gate and the INT8 report "
            "[default: --calib-data, else the checkpoint's dataset]."
        ),
    ] = None,
    calib_data: Annotated[
        str | None,
        typer.Option(
            help="int8: data directory (training split) or a saved calibration .npz "
            "[default: the training split of the dataset the checkpoint records]."
        ),
    ] = None,
    calib_n: CalibN = 512,
    calib_method: CalibMethod = "entropy",
    calib_mix_adv: CalibMixAdv = 0.0,
    calib_batch: Annotated[int, typer.Option(help="int8: calibration batch size.")] = 32,
    keep_fp32: Annotated[
        str,
        typer.Option(
            help="int8: nodes kept in FP32: auto (purifier head, last linear layer), none, or "
            "comma-separated node names."
        ),
    ] = "auto",
    max_drop: Annotated[
        float, typer.Option(help="Warn when int8/fp16 loses more clean accuracy (points).")
    ] = 2.0,
    parity_n: Annotated[
        int, typer.Option(help="Test images (clean + adversarial) for parity.")
    ] = 256,
    report_n: Annotated[int, typer.Option(help="Test images of the accuracy report.")] = 500,
    eps: Annotated[str | None, typer.Option(help="Attack eps [default: the checkpoint's].")] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset.")] = 18,
    trt: Annotated[
        bool,
        typer.Option(
            "--trt",
            help="Also build a strongly typed TensorRT engine. Build it ON THE DEVICE that will "
            "run it: engines are tied to the TensorRT version and the GPU.",
        ),
    ] = False,
    min_batch: Annotated[int, typer.Option(help="--trt: profile minimum batch.")] = 1,
    opt_batch: Annotated[int, typer.Option(help="--trt: profile optimum batch.")] = 8,
    max_batch: Annotated[int, typer.Option(help="--trt: profile maximum batch.")] = 64,
    workspace: Annotated[int, typer.Option(help="--trt: workspace limit in MiB.")] = 1024,
    timing_cache: Annotated[
        Path | None, typer.Option(help="--trt: timing cache file [default: OUT/timing.cache].")
    ] = None,
    trt_calibrator: Annotated[
        str,
        typer.Option(
            help="--trt int8: qdq (explicit, default) or LEGACY implicit calibration "
            "legacy-entropy / legacy-minmax (TensorRT 10 only; removed in 11).",
            metavar=choices("qdq", "legacy-entropy", "legacy-minmax"),
        ),
    ] = "qdq",
    cache_dir: CacheDir = None,
    int8_target: Annotated[
        str,
        typer.Option(
            help="int8: tensorrt (symmetric Q/DQ, portable, default) or onnxruntime-cpu (uint8 "
            "activations with zero points: fastest on x86 CPUs without VNNI; never an engine).",
            metavar=choices("tensorrt", "onnxruntime-cpu"),
        ),
    ] = "tensorrt",
    parity_min_agree: Annotated[
        float | None, typer.Option(help="Override the parity gate's minimum top-1 agreement (0-1).")
    ] = None,
    parity_max_abs: Annotated[
        float | None, typer.Option(help="Override the parity gate's maximum |Δ| of outputs.")
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Export into an --out holding another model's artifacts: once the new ones "
            "passed their gates, that model's files of the same names are removed.",
        ),
    ] = False,
    seed: SelectionSeed = 0,
    json_out: JsonOpt = False,
) -> None:
    """Export to ONNX (parity-gated), FP16 or INT8 Q/DQ, and optionally a TensorRT engine."""
    from advedge.export.exporter import ExportOptions, export_artifacts
    from advedge.utils import parse_eps

    output = Output(json_out)
    settings = params(
        ctx,
        drop=("workspace",),
        out=str(out),
        eps=None if eps is None else parse_eps(eps),
        workspace_mib=workspace,
        timing_cache=None if timing_cache is None else str(timing_cache),
        cache_dir=None if cache_dir is None else str(cache_dir),
    )
    report = export_artifacts(ExportOptions(**settings), status=output.info)
    for warning in report.warnings:
        output.err.print(f"[bold red]WARNING[/]: {warning}", highlight=False)
    output.result(report.to_dict(), human=_artifacts_table(report.artifacts))


def _artifacts_table(artifacts: list[dict[str, Any]]) -> Table:
    table = Table("artifact", "kind", "precision", "size", "parity (adv)", "clean %", "transfer %")
    for a in artifacts:
        parity = a.get("parity", {}).get("figures", {}).get("adversarial")
        acc = a.get("accuracy_report", {}).get("accuracy", {}).get(a["precision"], {})
        table.add_row(
            Path(a["path"]).name,
            a["kind"],
            a["precision"],
            f"{a['bytes'] / 1e6:.2f} MB",
            ""
            if not parity
            else f"max|Δ| {parity['max_abs']:.2g}, {100 * parity['agreement']:.1f}%",
            percent(acc.get("clean_acc")),
            percent(acc.get("transfer_robust_acc")),
        )
    return table


def calibrate_cmd(
    ctx: typer.Context,
    onnx: Annotated[Path, typer.Option("--onnx", help="FP32 ONNX exported by advedge export.")],
    data: Annotated[
        str, typer.Option(help="Data directory (training split) or a saved calibration .npz.")
    ],
    out: Annotated[Path, typer.Option(help="QDQ INT8 ONNX to write.")],
    method: Annotated[
        str,
        typer.Option(
            help="How activation ranges are chosen.", metavar=choices("{calibration_methods}")
        ),
    ] = "entropy",
    n: Annotated[int, typer.Option(help="Calibration images (stratified).")] = 512,
    mix_adv: Annotated[
        float, typer.Option(help="Fraction made adversarial (PGD on --model); needs --model.")
    ] = 0.0,
    model: Annotated[
        str | None, typer.Option(help="FP32 model run directory, for --mix-adv.")
    ] = None,
    eps: Annotated[str, typer.Option(help="eps of the adversarial calibration images.")] = "8/255",
    batch_size: Annotated[int, typer.Option(help="Calibration batch size.")] = 32,
    keep_fp32: Annotated[
        str, typer.Option(help="auto, none, or comma-separated node names kept in FP32.")
    ] = "auto",
    save_set: Annotated[
        Path | None, typer.Option(help="Also save the calibration set (.npz) here.")
    ] = None,
    cache_dir: CacheDir = None,
    target: Annotated[
        str,
        typer.Option(
            help="tensorrt (symmetric, default) or onnxruntime-cpu.",
            metavar=choices("tensorrt", "onnxruntime-cpu"),
        ),
    ] = "tensorrt",
    seed: Annotated[int, typer.Option(help="Seed of the image selection.")] = 0,
    json_out: JsonOpt = False,
) -> None:
    """Quantise an existing FP32 ONNX to explicit INT8 (symmetric Q/DQ, per-channel weights)."""
    from advedge.calibration import calibrate_file
    from advedge.utils import parse_eps

    output = Output(json_out)
    settings = params(
        ctx,
        drop=("onnx", "data", "out"),
        eps=parse_eps(eps),
        cache_dir=None if cache_dir is None else str(cache_dir),
    )
    payload = calibrate_file(onnx, data, out, **settings, status=output.info)
    table = Table("field", "value", title=f"advedge calibrate -> {out.name}")
    for key in ("method", "n", "qdq_pairs", "fp32_nodes", "cache_hit", "seconds"):
        table.add_row(key, str(payload[key]))
    output.result(payload, human=table)

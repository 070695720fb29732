"""``advedge qat``: robust quantisation-aware fine-tuning of a student's INT8 Q/DQ file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from advedge.cli.options import (
    CalibMethod,
    CalibMixAdv,
    CalibN,
    ConfigDefaults,
    Data,
    Device,
    EvalN,
    JsonOpt,
    Resume,
    RunDir,
    Seed,
    choices,
    params,
)
from advedge.cli.output import Output, percent, report_training
from advedge.cli.progress import TrainProgress, load_data

__all__ = ["qat_cmd"]

_DEFAULT_OF_METHOD = " [default: the method's]"


def qat_cmd(  # long: one parameter for each of its 29 options; the body is short
    ctx: typer.Context,
    student: Annotated[str, typer.Option(help="Student run directory or model.safetensors.")],
    teacher: Annotated[
        str, typer.Option(help="Robust teacher run directory or model.safetensors.")
    ],
    data: Data,
    out: RunDir,
    ptq: Annotated[
        str | None,
        typer.Option(
            help="The student's INT8 ONNX (advedge export --precision int8) to start from "
            "[default: exported into OUT/ptq].",
        ),
    ] = None,
    method: Annotated[
        str, typer.Option(help="Distillation loss.", metavar=choices("{distill_methods}"))
    ] = "add",
    epochs: Annotated[int, typer.Option(help="QAT epochs.")] = 2,
    lr: Annotated[
        float, typer.Option(help="Peak learning rate (a fine-tune: 1/20 of ADD's).")
    ] = 0.005,
    schedule: Annotated[
        str, typer.Option(help="Per-batch LR schedule.", metavar=choices("cosine", "constant"))
    ] = "cosine",
    weight_decay: Annotated[
        float | None, typer.Option(help="Weight decay." + _DEFAULT_OF_METHOD)
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Images per step." + _DEFAULT_OF_METHOD)
    ] = None,
    subset: Annotated[
        int | None, typer.Option(help="Train on a stratified sample of N training images.")
    ] = 5000,
    eps: Annotated[
        str | None, typer.Option(help="Inner-attack eps, e.g. 8/255 [default: the student's].")
    ] = None,
    alpha_step: Annotated[
        str | None, typer.Option(help="Inner-attack step size [default: the method's, eps/4].")
    ] = None,
    steps: Annotated[
        int | None, typer.Option(help="Inner-attack steps." + _DEFAULT_OF_METHOD)
    ] = None,
    temperature: Annotated[
        float | None, typer.Option(help="Temperature tau" + _DEFAULT_OF_METHOD + ".")
    ] = None,
    alpha: Annotated[
        float | None, typer.Option(help="Loss mixing weight in [0, 1]" + _DEFAULT_OF_METHOD + ".")
    ] = None,
    calib_n: CalibN = 512,
    calib_method: CalibMethod = "entropy",
    calib_mix_adv: CalibMixAdv = 0.0,
    augment: Annotated[
        bool, typer.Option("--augment/--no-augment", help="Random crop and flip.")
    ] = True,
    fake_quant: Annotated[
        bool,
        typer.Option(
            "--fake-quant/--no-fake-quant",
            help="Quantise in the loop (QAT). --no-fake-quant: the control, the same fine-tune "
            "in FP32, quantised afterwards with the PTQ file's scales (OUT/<arch>.int8-ft.onnx).",
        ),
    ] = True,
    parity_n: Annotated[
        int, typer.Option(help="Test images of the written file's parity check.")
    ] = 1000,
    seed: Seed = 0,
    device: Device = "auto",
    eval_n: EvalN = 256,
    config: ConfigDefaults = None,
    resume: Resume = False,
    json_out: JsonOpt = False,
) -> None:
    """Fine-tune a student's INT8 Q/DQ graph adversarially (fake quantisation in the loop, the
    teacher's ADD loss); writes OUT/<arch>.int8-qat.onnx, config.yaml, metrics.csv."""
    import os

    from advedge.errors import UsageError
    from advedge.qat import QatConfig, check_inputs, run_qat
    from advedge.training.rundir import check_run_dir
    from advedge.utils import parse_eps

    if schedule not in ("cosine", "constant"):
        raise UsageError(f"unknown schedule {schedule!r}", "choose cosine or constant")
    settings = params(
        ctx,
        drop=("alpha_step", "alpha", "config", "resume"),
        out=str(out),
        eps=None if eps is None else parse_eps(eps, name="--eps"),
        alpha=None if alpha_step is None else parse_eps(alpha_step, name="--alpha-step"),
        mix_alpha=alpha,
    )
    cfg = QatConfig(**settings)
    output = Output(json_out)
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise UsageError("advedge qat runs in one process", "run it without torchrun")
    check_run_dir(Path(cfg.out), resume)  # refuse to overwrite before loading any data
    check_inputs(cfg)
    dataset = load_data(cfg.data, output)
    with TrainProgress(output) as progress:
        result = run_qat(
            cfg, resume=resume, callbacks=progress, dataset=dataset, status=output.info
        )
    fields = {
        "artifact": str(result.artifact),
        "ptq": str(result.ptq),
        "baseline": result.baseline,
        "parity": result.parity,
    }
    report_training(
        output,
        result,
        schema="advedge.qat/1",
        title=f"advedge qat ({cfg.method})",
        epochs=cfg.epochs,
        fields=fields,
    )
    base = result.baseline
    if base:
        output.info(
            f"PTQ start: held-out clean {percent(base.get('test_clean_acc'))}%, PGD "
            f"{percent(base.get('test_pgd_acc'))}%; INT8 file clean "
            f"{percent(base.get('artifact_clean_acc'))}% (ONNX Runtime)"
        )
    output.info(f"INT8 file: {result.artifact}")

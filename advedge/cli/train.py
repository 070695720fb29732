"""``advedge train`` and ``advedge distill``: one training engine, one shared tail."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from advedge.cli.options import (
    AttackBN,
    ConfigFile,
    Data,
    Device,
    EvalN,
    JsonOpt,
    MethodBatchSize,
    MethodEpochs,
    MethodLr,
    MethodSteps,
    Norm,
    RunDir,
    Schedule,
    Seed,
    WeightDecay,
    choices,
    merge_given,
    params,
    parse_model_args,
    run_options,
)
from advedge.cli.output import Output, report_training
from advedge.cli.progress import TrainProgress, load_data
from advedge.errors import UsageError

__all__ = ["distill_cmd", "train_cmd"]

# train's parameters that are not TrainConfig fields
_NOT_SETTINGS = ("model_arg", "config", "resume", "json_out")


def train_cmd(  # long: one parameter for each of its 29 options; the body is short
    ctx: typer.Context,
    data: Data = None,  # type: ignore[assignment]  # may come from --config
    model: Annotated[
        str | None,
        typer.Option(help="Architecture (see `advedge models`).", metavar=choices("{models}")),
    ] = None,
    method: Annotated[
        str, typer.Option(help="Training method.", metavar=choices("{training_methods}"))
    ] = "pgd-at",
    epochs: MethodEpochs = None,
    out: RunDir = None,  # type: ignore[assignment]  # may come from --config
    eps: Annotated[str, typer.Option(help="Training eps, e.g. 8/255.")] = "8/255",
    alpha: Annotated[
        str | None,
        typer.Option(
            help="Attack step size [default: the method's: eps/4; 1.25*eps for fgsm-rs; "
            "0.007/0.031*eps for trades]."
        ),
    ] = None,
    steps: MethodSteps = None,
    norm: Norm = "Linf",
    beta: Annotated[float, typer.Option(help="TRADES robust-term weight.")] = 6.0,
    batch_size: MethodBatchSize = None,
    lr: MethodLr = None,
    momentum: Annotated[float, typer.Option(help="SGD momentum.")] = 0.9,
    nesterov: Annotated[bool, typer.Option(help="Nesterov momentum.")] = False,
    weight_decay: WeightDecay = None,
    schedule: Schedule = None,
    attack_bn: AttackBN = None,
    subset: Annotated[
        int | None, typer.Option(help="Train on a stratified sample of N images.")
    ] = None,
    seed: Seed = 0,
    device: Device = "auto",
    amp: Annotated[
        str,
        typer.Option(
            help="Mixed precision; auto: bf16 on CUDA.",
            metavar=choices("auto", "bf16", "fp16", "off"),
        ),
    ] = "auto",
    channels_last: Annotated[
        bool | None,
        typer.Option(
            "--channels-last/--no-channels-last",
            help="[default: on for CUDA; on CPU when a timing probe finds it faster]",
        ),
    ] = None,
    compile: Annotated[
        bool, typer.Option("--compile/--no-compile", help="torch.compile the model.")
    ] = False,
    augment: Annotated[
        bool, typer.Option("--augment/--no-augment", help="Random crop and flip.")
    ] = True,
    eval_n: EvalN = 256,
    model_arg: Annotated[
        list[str] | None, typer.Option(help="Architecture argument key=value (repeatable).")
    ] = None,
    config: ConfigFile = None,
    resume: Annotated[
        bool, typer.Option(help="Continue the run in --out from its last epoch.")
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Train a robust (or natural) classifier; writes model.safetensors, config.yaml, metrics.csv."""
    from advedge.config import check_value, config_from_dict, load_yaml
    from advedge.training.engine import TrainConfig
    from advedge.utils import parse_eps

    # The --config file holds TrainConfig fields (more than the flags: milestones, gamma, ...).
    options: dict[str, Any] = (
        {str(k).replace("-", "_"): v for k, v in load_yaml(config).items()} if config else {}
    )
    merge_given(ctx, options, skip=_NOT_SETTINGS)
    if model_arg:
        from_config = options.get("model_kwargs", {})
        check_value(dict[str, Any], from_config, "config key 'model_kwargs'")
        options["model_kwargs"] = {**from_config, **parse_model_args(model_arg)}
    for required in ("data", "model", "out"):
        if options.get(required) in (None, ""):
            raise UsageError(f"missing option --{required}", "give it as a flag or in --config")
    options["eps"] = parse_eps(options["eps"], name="--eps")
    if options.get("alpha") is not None:
        options["alpha"] = parse_eps(options["alpha"], name="--alpha")
    options["out"] = str(options["out"])
    cfg = config_from_dict(TrainConfig, options)
    run_training(cfg, resume, Output(json_out), schema="advedge.train/1", title="advedge train")


@run_options
def distill_cmd(
    ctx: typer.Context,
    teacher: Annotated[str, typer.Option(help="Teacher run directory or model.safetensors.")],
    student: Annotated[
        str,
        typer.Option(
            help="Student architecture (see `advedge models`).", metavar=choices("{models}")
        ),
    ],
    method: Annotated[
        str, typer.Option(help="Distillation method.", metavar=choices("{distill_methods}"))
    ],
    data: Data,
    out: RunDir,
    epochs: MethodEpochs = None,
    temperature: Annotated[
        float | None, typer.Option(help="Temperature tau [default: the method's].")
    ] = None,
    alpha: Annotated[
        float | None, typer.Option(help="Loss mixing weight in [0, 1] [default: the method's].")
    ] = None,
    eps: Annotated[str, typer.Option(help="Inner-attack eps, e.g. 8/255.")] = "8/255",
    alpha_step: Annotated[
        str | None, typer.Option(help="Inner-attack step size [default: the method's, eps/4].")
    ] = None,
    steps: MethodSteps = None,
    batch_size: MethodBatchSize = None,
    lr: MethodLr = None,
    weight_decay: WeightDecay = None,
    schedule: Schedule = None,
    attack_bn: AttackBN = None,
    kl_reduction: Annotated[
        str,
        typer.Option(
            help="official: each KL reduced as the method's own code does; batchmean: every "
            "KL averaged over the batch (advedge before 0.15).",
            metavar=choices("official", "batchmean"),
        ),
    ] = "official",
    **run: Any,
) -> None:
    """Distil a robust teacher into a small student (soft labels guide attack and loss)."""
    from advedge.training.engine import TrainConfig
    from advedge.utils import parse_eps

    settings = params(
        ctx,
        drop=("student", "alpha_step", "config", "resume"),
        model=student,
        out=str(out),
        eps=parse_eps(eps, name="--eps"),
        alpha=None if alpha_step is None else parse_eps(alpha_step, name="--alpha-step"),
        mix_alpha=alpha,
    )
    cfg = TrainConfig(**settings)
    run_training(
        cfg,
        run["resume"],
        Output(run["json_out"]),
        schema="advedge.distill/1",
        title=f"advedge distill ({method})",
        extra={"teacher": teacher, "method": method},
    )


def run_training(
    cfg: Any,
    resume: bool,
    output: Output,
    *,
    schema: str,
    title: str,
    extra: dict[str, Any] | None = None,
) -> None:
    """Shared tail of train and distill: check --out, load data, train with bars, report."""
    from advedge.distributed import barrier, distributed_session
    from advedge.training.engine import check_run_dir, train

    with distributed_session(cfg.device) as (rank, _):
        check_run_dir(Path(cfg.out), resume)  # refuse to overwrite before loading any data
        # Under torchrun rank 0 loads (and, for a named dataset, downloads) first and alone
        # reports; the other ranks then read the files it left.
        dataset = load_data(cfg.data, output) if rank == 0 else None
        barrier()
        if rank != 0:
            train(cfg, resume=resume, dataset=load_data(cfg.data, Output(True)))
            return
        progress = TrainProgress(output)
        with progress:
            result = train(cfg, resume=resume, callbacks=progress, dataset=dataset)
    fields = {"model_path": str(result.model_path), **(extra or {})}
    report_training(output, result, schema=schema, title=title, epochs=cfg.epochs, fields=fields)

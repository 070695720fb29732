"""``advedge`` command line: a thin layer over the Python API.

Exit codes: 0 ok, 1 runtime failure, 2 usage error, 3 missing optional dependency, 130
interrupted. Errors are one line on stderr; ``ADVEDGE_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Group
from rich.table import Table

from advedge import __version__
from advedge.cli.output import Output, setup_logging
from advedge.errors import AdvedgeError, UsageError, os_error


def _click_module() -> Any:
    """The click that typer raises from: recent typer vendors it as ``typer._click``."""
    try:
        from typer import _click

        return _click
    except ImportError:  # older typer depends on the click package itself
        import click

        return click


click = _click_module()

app = typer.Typer(
    name="advedge",
    help="Robust small image classifiers, from adversarial training to edge GPUs.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Write only the result JSON to stdout.")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"advedge {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """advedge: robust training, distillation, evaluation and edge deployment."""


def _load_data(spec: str, output: Output) -> Any:
    """Load a dataset, showing a download progress bar (stderr) if a named one is fetched."""
    from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

    from advedge.data import load_dataset

    state: dict[str, Any] = {}

    def on_bytes(done: int, total: int | None) -> None:
        if "bar" not in state:
            bar = Progress(
                *Progress.get_default_columns(),
                DownloadColumn(),
                TransferSpeedColumn(),
                console=output.err,
            )
            bar.start()
            state["bar"] = bar
            state["task"] = bar.add_task(f"downloading {spec}", total=total)
        state["bar"].update(state["task"], completed=done, total=total)

    try:
        return load_dataset(spec, progress=on_bytes)
    finally:
        if "bar" in state:
            state["bar"].stop()


# --------------------------------------------------------------------------------------- models
@app.command("models")
def models_cmd(json_out: JsonOpt = False) -> None:
    """List the model registry."""
    from advedge.models import list_models, model_info

    out = Output(json_out)
    infos = [model_info(name) for name in list_models()]
    table = Table("name", "description", title="advedge models")
    for info in infos:
        table.add_row(info["name"], info.get("description", ""))
    out.result({"schema": "advedge.models/1", "models": infos}, human=table)


# --------------------------------------------------------------------------------------- train
def _parse_model_args(items: list[str] | None) -> dict[str, Any]:
    """``["width_mult=0.5", "pretrained=false"]`` -> ``{"width_mult": 0.5, "pretrained": False}``.

    Values are read as YAML scalars by advedge's safe loader (no tags such as ``!!python``, no
    aliases); only an int, a finite float, a bool or a string is accepted.
    """
    import math

    import yaml

    from advedge.config import parse_yaml

    def shown(obj: object) -> str:
        text = repr(obj)
        return text if len(text) <= 60 else text[:57] + "..."

    parsed: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise UsageError(f"--model-arg expects key=value, got {shown(item)}")
        key, text = item.split("=", 1)
        key = key.strip()
        if not key.isidentifier():
            raise UsageError(
                f"--model-arg {shown(item)}: the key must be an argument name, got {shown(key)}"
            )
        try:
            value = parse_yaml(text)
        except (yaml.YAMLError, ValueError, RecursionError):
            raise UsageError(
                f"--model-arg {shown(item)}: the value is not a plain number, true/false or text"
            ) from None
        ok = isinstance(value, (bool, int, str)) or (
            isinstance(value, float) and math.isfinite(value)
        )
        if not ok:
            raise UsageError(
                f"--model-arg {shown(item)}: the value must be a finite number, true/false or "
                f"text, got {shown(value)}"
            )
        parsed[key] = value
    return parsed


@app.command("train")
def train_cmd(
    ctx: typer.Context,
    data: Annotated[
        str | None, typer.Option(help="Dataset directory, or cifar10/cifar100/mnist.")
    ] = None,
    model: Annotated[str | None, typer.Option(help="Architecture (see `advedge models`).")] = None,
    method: Annotated[str, typer.Option(help="natural, pgd-at, trades or fgsm-rs.")] = "pgd-at",
    epochs: Annotated[int, typer.Option(help="Number of epochs.")] = 10,
    out: Annotated[Path | None, typer.Option(help="Run directory to write.")] = None,
    eps: Annotated[str, typer.Option(help="Training eps, e.g. 8/255.")] = "8/255",
    alpha: Annotated[
        str | None, typer.Option(help="Attack step size [default: eps/4; 1.25*eps for fgsm-rs].")
    ] = None,
    steps: Annotated[int, typer.Option(help="Attack steps of the inner maximisation.")] = 10,
    norm: Annotated[str, typer.Option(help="Linf or L2.")] = "Linf",
    beta: Annotated[float, typer.Option(help="TRADES robust-term weight.")] = 6.0,
    batch_size: Annotated[int, typer.Option(help="Global batch size.")] = 128,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 0.1,
    momentum: Annotated[float, typer.Option(help="SGD momentum.")] = 0.9,
    nesterov: Annotated[bool, typer.Option(help="Nesterov momentum.")] = False,
    weight_decay: Annotated[float, typer.Option(help="Weight decay.")] = 5e-4,
    schedule: Annotated[str, typer.Option(help="cosine, multistep or constant.")] = "cosine",
    subset: Annotated[
        int | None, typer.Option(help="Train on a stratified sample of N images.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    amp: Annotated[str, typer.Option(help="auto (bf16 on CUDA), bf16, fp16 or off.")] = "auto",
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
    eval_n: Annotated[int, typer.Option(help="Held-out images scored each epoch.")] = 256,
    model_arg: Annotated[
        list[str] | None, typer.Option(help="Architecture argument key=value (repeatable).")
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="YAML file of options; flags override it.")
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue the run in --out from its last epoch.")
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Train a robust (or natural) classifier; writes model.safetensors, config.yaml, metrics.csv."""
    from advedge.config import config_from_dict, load_yaml
    from advedge.training.engine import TrainConfig
    from advedge.utils import parse_eps

    output = Output(json_out)
    options: dict[str, Any] = (
        {str(k).replace("-", "_"): v for k, v in load_yaml(config).items()} if config else {}
    )
    given = {
        "data": data,
        "model": model,
        "method": method,
        "epochs": epochs,
        "out": out,
        "eps": eps,
        "alpha": alpha,
        "steps": steps,
        "norm": norm,
        "beta": beta,
        "batch_size": batch_size,
        "lr": lr,
        "momentum": momentum,
        "nesterov": nesterov,
        "weight_decay": weight_decay,
        "schedule": schedule,
        "subset": subset,
        "seed": seed,
        "device": device,
        "amp": amp,
        "channels_last": channels_last,
        "compile": compile,
        "augment": augment,
        "eval_n": eval_n,
    }
    for key, value in given.items():
        source = ctx.get_parameter_source(key)
        if key not in options or source not in (click.core.ParameterSource.DEFAULT, None):
            options[key] = value
    if model_arg:
        from advedge.config import check_value

        from_config = options.get("model_kwargs", {})
        check_value(dict[str, Any], from_config, "config key 'model_kwargs'")
        options["model_kwargs"] = {**from_config, **_parse_model_args(model_arg)}
    for required in ("data", "model", "out"):
        if options.get(required) in (None, ""):
            raise UsageError(f"missing option --{required}", "give it as a flag or in --config")
    options["eps"] = parse_eps(options["eps"], name="--eps")
    if options.get("alpha") is not None:
        options["alpha"] = parse_eps(options["alpha"], name="--alpha")
    options["out"] = str(options["out"])
    cfg = config_from_dict(TrainConfig, options)
    _run_training(cfg, resume, output, schema="advedge.train/1", title="advedge train")


@app.command("distill")
def distill_cmd(
    teacher: Annotated[str, typer.Option(help="Teacher run directory or model.safetensors.")],
    student: Annotated[str, typer.Option(help="Student architecture (see `advedge models`).")],
    method: Annotated[str, typer.Option(help="kd, dd, ard, iad, rslad, adaad or add.")],
    data: Annotated[str, typer.Option(help="Dataset directory, or cifar10/cifar100/mnist.")],
    epochs: Annotated[int, typer.Option(help="Number of epochs.")],
    out: Annotated[Path, typer.Option(help="Run directory to write.")],
    temperature: Annotated[
        float | None, typer.Option(help="Temperature tau [default: the method's].")
    ] = None,
    alpha: Annotated[
        float | None, typer.Option(help="Loss mixing weight in [0, 1] [default: the method's].")
    ] = None,
    eps: Annotated[str, typer.Option(help="Inner-attack eps, e.g. 8/255.")] = "8/255",
    alpha_step: Annotated[str, typer.Option(help="Inner-attack step size.")] = "2/255",
    steps: Annotated[int, typer.Option(help="Inner-attack steps.")] = 10,
    batch_size: Annotated[int, typer.Option(help="Global batch size.")] = 128,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 0.1,
    subset: Annotated[int | None, typer.Option(help="Stratified sample of N images.")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    eval_n: Annotated[int, typer.Option(help="Held-out images scored each epoch.")] = 256,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Distil a robust teacher into a small student (soft labels guide attack and loss)."""
    from advedge.training.engine import TrainConfig
    from advedge.utils import parse_eps

    output = Output(json_out)
    cfg = TrainConfig(
        data=data,
        model=student,
        method=method,
        epochs=epochs,
        out=str(out),
        eps=parse_eps(eps, name="--eps"),
        alpha=parse_eps(alpha_step, name="--alpha-step"),
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        subset=subset,
        seed=seed,
        device=device,
        eval_n=eval_n,
        teacher=teacher,
        temperature=temperature,
        mix_alpha=alpha,
    )
    _run_training(
        cfg,
        resume,
        output,
        schema="advedge.distill/1",
        title=f"advedge distill ({method})",
        extra={"teacher": teacher, "method": method},
    )


def _run_training(
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
        dataset = _load_data(cfg.data, output) if rank == 0 else None
        barrier()
        if rank != 0:
            train(cfg, resume=resume, dataset=_load_data(cfg.data, Output(True)))
            return
        progress = _TrainProgress(output)
        with progress:
            result = train(cfg, resume=resume, callbacks=progress, dataset=dataset)
    final = result.metrics[-1] if result.metrics else {}
    payload = {
        "schema": schema,
        "out": str(result.out),
        "model_path": str(result.model_path),
        **(extra or {}),
        "epochs": cfg.epochs,
        "resumed_from_epoch": result.resumed_from,
        "final": final,
        "metrics": result.metrics,
    }
    output.result(payload, human=_metrics_table(f"{title} → {result.out}", result.metrics))


class _Bars:
    """A rich progress display on stderr, usable as a context manager."""

    def __init__(self, output: Output, *, remaining: bool) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        columns: list[Any] = [
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        ]
        if remaining:
            columns.append(TimeRemainingColumn())
        columns.append(TextColumn("{task.fields[status]}"))
        self.progress = Progress(*columns, console=output.err)

    def __enter__(self) -> Any:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()


class _TrainProgress(_Bars):
    """Epoch and batch bars for the training engine's callbacks."""

    def __init__(
        self,
        output: Output,
        *,
        batch_status: str = "loss {loss:.4f} acc {acc:.3f}",
        epoch_status: str = "clean {test_clean_acc:.3f} pgd {test_pgd_acc:.3f}",
    ) -> None:
        super().__init__(output, remaining=True)
        self.epoch_task: Any = None
        self.batch_task: Any = None
        self.batch_status = batch_status
        self.epoch_status = epoch_status

    def on_train_start(self, *, start_epoch: int, epochs: int, batches_per_epoch: int) -> None:
        self.epoch_task = self.progress.add_task(
            "epochs", total=epochs, completed=start_epoch, status=""
        )
        self.batch_task = self.progress.add_task("batches", total=batches_per_epoch, status="")

    def on_batch_end(self, *, epoch: int, batch: int, loss: float, acc: float) -> None:
        self.progress.update(
            self.batch_task,
            completed=batch + 1,
            description=f"epoch {epoch + 1}",
            status=self.batch_status.format(loss=loss, acc=acc),
        )

    def on_eval_start(self, *, epoch: int) -> None:
        self.progress.update(self.batch_task, status="scoring held-out batch (clean, PGD)")

    def on_epoch_end(self, row: dict[str, float]) -> None:
        self.progress.update(
            self.epoch_task,
            completed=int(row["epoch"]),
            status=self.epoch_status.format(**row),
        )
        self.progress.reset(self.batch_task)


# ----------------------------------------------------------------------------------- purifier
purifier_app = typer.Typer(
    help="Train input purifiers (IPCM, APE-GAN, HGD) to put in front of a classifier.",
    no_args_is_help=True,
)
app.add_typer(purifier_app, name="purifier")


@purifier_app.command("train")
def purifier_train_cmd(
    classifier: Annotated[
        str, typer.Option(help="Frozen classifier: run directory or model.safetensors.")
    ],
    data: Annotated[str, typer.Option(help="Dataset directory, or cifar10/cifar100/mnist.")],
    epochs: Annotated[int, typer.Option(help="Number of epochs.")],
    out: Annotated[Path, typer.Option(help="Run directory to write.")],
    method: Annotated[str, typer.Option(help="ipcm, ape-gan or hgd.")] = "ipcm",
    eps: Annotated[str, typer.Option(help="Largest training-attack eps, e.g. 8/255.")] = "8/255",
    eps_r: Annotated[
        str | None, typer.Option(help="Bound of the inverse perturbation [default: 1.25*eps].")
    ] = None,
    steps: Annotated[int, typer.Option(help="PGD steps of the training attacks.")] = 10,
    width: Annotated[int, typer.Option(help="Generator width (channels of level 1).")] = 16,
    depth: Annotated[int, typer.Option(help="Generator downsamplings.")] = 2,
    w_inv: Annotated[float, typer.Option(help="Weight of ||r + delta||^2.")] = 1.0,
    w_pix: Annotated[float, typer.Option(help="Weight of |x_hat - x|.")] = 1.0,
    w_ce: Annotated[float, typer.Option(help="Weight of CE(f(x_hat), y).")] = 1.0,
    w_kl: Annotated[float, typer.Option(help="Weight of KL(f(x) || f(x_hat)).")] = 1.0,
    w_adv: Annotated[float, typer.Option(help="Weight of the GAN loss.")] = 0.01,
    w_feat: Annotated[float, typer.Option(help="Weight of feature guidance.")] = 1.0,
    gan: Annotated[str, typer.Option(help="lsgan or nsgan.")] = "lsgan",
    guidance: Annotated[str, typer.Option(help="logits or features (HGD-style).")] = "logits",
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 128,
    lr: Annotated[float, typer.Option(help="Generator learning rate (Adam).")] = 1e-3,
    lr_d: Annotated[float, typer.Option(help="Discriminator learning rate (Adam).")] = 2e-4,
    subset: Annotated[int | None, typer.Option(help="Stratified sample of N images.")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    eval_n: Annotated[int, typer.Option(help="Held-out images scored each epoch.")] = 256,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Train a purifier G against a frozen classifier; writes purifier.safetensors."""
    from advedge.purifier.train import PurifierConfig, train_purifier
    from advedge.training.engine import check_run_dir
    from advedge.utils import parse_eps

    output = Output(json_out)
    cfg = PurifierConfig(
        classifier=classifier,
        data=data,
        method=method,
        epochs=epochs,
        out=str(out),
        eps=parse_eps(eps, name="--eps"),
        eps_r=None if eps_r is None else _parse_eps_r(eps_r),
        steps=steps,
        width=width,
        depth=depth,
        w_inv=w_inv,
        w_pix=w_pix,
        w_ce=w_ce,
        w_kl=w_kl,
        w_adv=w_adv,
        w_feat=w_feat,
        gan=gan,
        guidance=guidance,
        batch_size=batch_size,
        lr=lr,
        lr_d=lr_d,
        subset=subset,
        seed=seed,
        device=device,
        eval_n=eval_n,
    )
    check_run_dir(out, resume)
    dataset = _load_data(data, output)
    progress = _TrainProgress(
        output,
        batch_status="G {loss:.4f} inv {acc:.4f}",
        epoch_status="clean via G {test_clean_acc:.3f} grey-box PGD {test_greybox_pgd_acc:.3f}",
    )
    with progress:
        result = train_purifier(cfg, resume=resume, callbacks=progress, dataset=dataset)
    final = result.metrics[-1] if result.metrics else {}
    payload = {
        "schema": "advedge.purifier/1",
        "out": str(result.out),
        "purifier_path": str(result.purifier_path),
        "method": method,
        "classifier": classifier,
        "epochs": epochs,
        "resumed_from_epoch": result.resumed_from,
        "final": final,
        "metrics": result.metrics,
    }
    title = f"advedge purifier train ({method}) → {result.out}"
    output.result(payload, human=_metrics_table(title, result.metrics))


def _metrics_table(title: str, metrics: list[dict[str, Any]]) -> Any:
    """The per-epoch metrics rows of a training run as a table (columns of the last row)."""
    columns = list(metrics[-1]) if metrics else []
    table = Table(*columns, title=title)
    for row in metrics:
        table.add_row(*[str(row.get(k, "")) for k in columns])
    return table


def _parse_eps_r(text: str) -> float:
    """``--eps-r``: a fraction or decimal > 0 (a clear error for 0 or negatives)."""
    from advedge.utils import parse_eps

    try:
        value = float(text)
    except ValueError:
        value = None
    if value is not None and value <= 0:
        raise UsageError(f"--eps-r must be > 0, got {text}")
    return parse_eps(text, name="--eps-r")


# --------------------------------------------------------------------------------------- eval
@app.command("eval")
def eval_cmd(
    model: Annotated[str, typer.Option(help="Run directory or model.safetensors.")],
    data: Annotated[str, typer.Option(help="Dataset directory, or cifar10/cifar100/mnist.")],
    suite: Annotated[
        str | None,
        typer.Option(
            help="standard (APGD-CE, APGD-T, Square), rand (APGD with EOT) or quick (PGD, CW)."
        ),
    ] = None,
    attacks: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated attacks instead of a suite [default: fgsm,pgd,cw,mifgsm]."
        ),
    ] = None,
    eps: Annotated[str, typer.Option(help="Threat-model eps, e.g. 8/255.")] = "8/255",
    norm: Annotated[str, typer.Option(help="Linf or L2.")] = "Linf",
    steps: Annotated[int, typer.Option(help="Steps of PGD/CW/MI-FGSM (PGD-20 by default).")] = 20,
    alpha: Annotated[str | None, typer.Option(help="PGD/CW step size [default: eps/4].")] = None,
    restarts: Annotated[int, typer.Option(help="Random restarts of PGD/CW.")] = 1,
    n_queries: Annotated[int, typer.Option(help="Query budget of the Square attack.")] = 5000,
    n: Annotated[int | None, typer.Option(help="First N test images (all by default).")] = None,
    batch_size: Annotated[int, typer.Option(help="Attack batch size.")] = 256,
    seed: Annotated[int, typer.Option(help="Random seed of the attacks.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    amp: Annotated[str, typer.Option(help="off (fp32), bf16 or fp16 autocast on CUDA.")] = "off",
    flags_n: Annotated[int, typer.Option(help="Examples used by the sanity checks.")] = 100,
    out: Annotated[Path | None, typer.Option(help="Write the results JSON here.")] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue from OUT.state.json (same settings only).")
    ] = False,
    purifier: Annotated[
        str | None,
        typer.Option(
            help="Purifier run (or purifier.safetensors) in front of the model: grey-box, "
            "adaptive, BPDA (and EOT) attacks."
        ),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Clean and robust accuracy; the headline is the per-example worst case over all attacks."""
    from advedge.evaluation import check_eval_options, evaluate_checkpoint

    output = Output(json_out)
    attack_list = None if attacks is None else [a.strip() for a in attacks.split(",") if a.strip()]
    check_eval_options(  # bad flags fail before any data is loaded or downloaded
        attacks=attack_list,
        suite=suite,
        eps=eps,
        alpha=alpha,
        norm=norm,
        steps=steps,
        n=n,
        batch_size=batch_size,
        n_queries=n_queries,
        flags_n=flags_n,
        resume=resume,
        out=out,
        amp=amp,
    )
    if purifier is not None:  # a bad purifier fails before any data is loaded
        from advedge.checkpoint import read_metadata
        from advedge.purifier import load_purifier
        from advedge.purifier.checkpoint import check_purifier_fits

        check_purifier_fits(load_purifier(purifier), read_metadata(model), str(purifier))
    dataset = _load_data(data, output)
    progress = _EvalProgress(output)
    with progress:
        result = evaluate_checkpoint(
            model,
            dataset,
            attacks=attack_list,
            suite=suite,
            eps=eps,
            norm=norm,
            steps=steps,
            alpha=alpha,
            restarts=restarts,
            n_queries=n_queries,
            n=n,
            batch_size=batch_size,
            seed=seed,
            device=device,
            amp=amp,
            out=out,
            resume=resume,
            flags_n=flags_n,
            progress=progress,
            purifier=purifier,
        )
    title = (
        f"advedge eval {result.get('suite') or ''} (eps={result['eps']:.5g}, {result['norm']}, "
        f"n={result['n_examples']})"
    )
    table = Table("attack", "kind", "robust acc", "seconds", title=title)
    if "clean_acc_no_purifier" in result:
        table.add_row("clean, no purifier", "-", f"{result['clean_acc_no_purifier']:.4f}", "")
        table.add_row("clean, through purifier", "-", f"{result['clean_acc']:.4f}", "")
    else:
        table.add_row("clean", "-", f"{result['clean_acc']:.4f}", "")
    for entry in result["attacks"]:
        name = entry["name"] + (" (cumulative)" if entry.get("cumulative") else "")
        table.add_row(name, entry["kind"], f"{entry['robust_acc']:.4f}", f"{entry['seconds']:.1f}")
    for setting, acc in result.get("worst_case_by_setting", {}).items():
        table.add_row(f"worst case, {setting}", "per-example", f"{acc:.4f}", "")
    table.add_row(
        "worst case", "per-example", f"{result['worst_case_acc']:.4f}", f"{result['seconds']:.1f}"
    )
    flags = Table("sanity flag", "status", "detail", title="sanity checks (Carlini et al. 2019)")
    for flag in result["flags"]:
        flags.add_row(flag["name"], "TRIGGERED" if flag["triggered"] else "ok", flag["message"])
    output.result(result, human=Group(table, flags))


def _Group(*renderables: Any) -> Any:
    from rich.console import Group

    return Group(*renderables)


class _EvalProgress(_Bars):
    """Per-attack bars with the running robust accuracy."""

    def __init__(self, output: Output) -> None:
        super().__init__(output, remaining=False)
        self.tasks: dict[str, Any] = {}

    def on_attack_start(self, name: str, n_todo: int) -> None:
        self.tasks[name] = self.progress.add_task(name, total=max(n_todo, 1), status="")

    def on_batch_end(self, name: str, n_done: int, running_acc: float) -> None:
        self.progress.update(
            self.tasks[name], completed=n_done, status=f"robust acc {running_acc:.4f}"
        )

    def on_attack_end(self, name: str, result: dict[str, Any]) -> None:
        self.progress.update(
            self.tasks[name],
            completed=self.progress.tasks[self.tasks[name]].total,
            status=f"robust acc {result['robust_acc']:.4f}",
        )


# -------------------------------------------------------------------------------- export / calibrate
@app.command("export")
def export_cmd(
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
        str, typer.Option(help="fp32, fp16 (FP32 I/O) or int8 (symmetric Q/DQ).")
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
        typer.Option(help="int8: data directory (training split) or a saved calibration .npz."),
    ] = None,
    calib_n: Annotated[int, typer.Option(help="int8: calibration images (stratified).")] = 512,
    calib_method: Annotated[
        str, typer.Option(help="int8: entropy, minmax or percentile.")
    ] = "entropy",
    calib_mix_adv: Annotated[
        float,
        typer.Option(help="int8: fraction of calibration images made adversarial (PGD on FP32)."),
    ] = 0.0,
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
            "legacy-entropy / legacy-minmax (TensorRT 10 only; removed in 11)."
        ),
    ] = "qdq",
    cache_dir: Annotated[
        Path | None, typer.Option(help="Calibration-range cache [default: ~/.cache/advedge].")
    ] = None,
    int8_target: Annotated[
        str,
        typer.Option(
            help="int8: tensorrt (symmetric Q/DQ, portable, default) or onnxruntime-cpu (uint8 "
            "activations with zero points: fastest on x86 CPUs without VNNI; never an engine)."
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
    seed: Annotated[int, typer.Option(help="Seed of image selection and attacks.")] = 0,
    json_out: JsonOpt = False,
) -> None:
    """Export to ONNX (parity-gated), FP16 or INT8 Q/DQ, and optionally a TensorRT engine."""
    from advedge.export.exporter import ExportOptions, export_artifacts
    from advedge.utils import parse_eps

    output = Output(json_out)
    opts = ExportOptions(
        model=model,
        out=str(out),
        purifier=purifier,
        fuse=fuse,
        precision=precision,
        data=data,
        calib_data=calib_data,
        calib_n=calib_n,
        calib_method=calib_method,
        calib_mix_adv=calib_mix_adv,
        calib_batch=calib_batch,
        keep_fp32=keep_fp32,
        opset=opset,
        parity_n=parity_n,
        report_n=report_n,
        max_drop=max_drop,
        eps=None if eps is None else parse_eps(eps),
        seed=seed,
        trt=trt,
        min_batch=min_batch,
        opt_batch=opt_batch,
        max_batch=max_batch,
        workspace_mib=workspace,
        timing_cache=None if timing_cache is None else str(timing_cache),
        trt_calibrator=trt_calibrator,
        cache_dir=None if cache_dir is None else str(cache_dir),
        int8_target=int8_target,
        parity_min_agree=parity_min_agree,
        parity_max_abs=parity_max_abs,
        overwrite=overwrite,
    )
    report = export_artifacts(opts, status=output.info)
    for warning in report.warnings:
        output.err.print(f"[bold red]WARNING[/]: {warning}", highlight=False)
    table = Table(
        "artifact", "kind", "precision", "size", "parity (adv)", "clean acc", "transfer acc"
    )
    for a in report.artifacts:
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
            f"{acc['clean_acc']:.4f}" if acc else "",
            f"{acc['transfer_robust_acc']:.4f}" if acc else "",
        )
    output.result(report.to_dict(), human=table)


@app.command("calibrate")
def calibrate_cmd(
    onnx: Annotated[Path, typer.Option("--onnx", help="FP32 ONNX exported by advedge export.")],
    data: Annotated[
        str, typer.Option(help="Data directory (training split) or a saved calibration .npz.")
    ],
    out: Annotated[Path, typer.Option(help="QDQ INT8 ONNX to write.")],
    method: Annotated[str, typer.Option(help="entropy, minmax or percentile.")] = "entropy",
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
    cache_dir: Annotated[
        Path | None, typer.Option(help="Calibration-range cache [default: ~/.cache/advedge].")
    ] = None,
    target: Annotated[
        str, typer.Option(help="tensorrt (symmetric, default) or onnxruntime-cpu.")
    ] = "tensorrt",
    seed: Annotated[int, typer.Option(help="Seed of the image selection.")] = 0,
    json_out: JsonOpt = False,
) -> None:
    """Quantise an existing FP32 ONNX to explicit INT8 (symmetric Q/DQ, per-channel weights)."""
    from advedge.export.exporter import calibrate_file
    from advedge.utils import parse_eps

    output = Output(json_out)
    payload = calibrate_file(
        onnx,
        data,
        out,
        method=method,
        n=n,
        mix_adv=mix_adv,
        model=model,
        eps=parse_eps(eps),
        batch_size=batch_size,
        keep_fp32=keep_fp32,
        save_set=save_set,
        cache_dir=None if cache_dir is None else str(cache_dir),
        target=target,
        seed=seed,
        status=output.info,
    )
    table = Table("field", "value", title=f"advedge calibrate -> {out.name}")
    for key in ("method", "n", "qdq_pairs", "fp32_nodes", "cache_hit", "seconds"):
        table.add_row(key, str(payload[key]))
    output.result(payload, human=table)


# ------------------------------------------------------------------------------ bench / report
def _int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise UsageError(f"{what} is empty")
    return values


@app.command("bench")
def bench_cmd(
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
        typer.Option(
            help="auto (by file type), torch, torch-compile, torch-cudagraph, onnxruntime, "
            "onnxruntime-cuda, onnxruntime-trt or tensorrt."
        ),
    ] = "auto",
    out: Annotated[Path | None, typer.Option(help="Write bench.json and bench.csv here.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of image selection and attacks.")] = 0,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an earlier bench.json in --out.")
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Latency (mean, p50/p90/p99) and accuracy measured on the deployed artifact itself."""
    from advedge.export.runtime.bench import BenchOptions, run_bench
    from advedge.utils import parse_eps

    output = Output(json_out)
    opts = BenchOptions(
        artifacts=list(artifact),
        data=data,
        batch_sizes=_int_list(batch_sizes, "--batch-sizes"),
        warmup=warmup,
        iters=iters,
        robust=robust or transfer_set is not None,
        n=n,
        query_n=query_n,
        n_queries=n_queries,
        eps=parse_eps(eps),
        model=model,
        purifier=purifier,
        backend=backend,
        out=None if out is None else str(out),
        seed=seed,
        transfer_set=transfer_set,
        overwrite=overwrite,
    )
    doc = run_bench(opts, status=output.info)
    for warning in doc["warnings"]:
        output.err.print(f"[bold yellow]warning[/]: {warning}", highlight=False)
    table = Table(
        "artifact", "backend", "batch", "p50 ms", "p99 ms", "cv", "img/s", "clean", "worst"
    )
    for r in doc["results"]:
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
    output.result(doc, human=table)


@app.command("report")
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


# ------------------------------------------------------------------------------ pipeline
class _PipelineProgress(_Bars):
    """One bar over the stages; the status shows the current stage's epoch and batch."""

    def __init__(self, output: Output, stages: tuple[str, ...]) -> None:
        super().__init__(output, remaining=False)
        self.stages = stages
        self.task = self.progress.add_task("pipeline", total=len(stages), status="")
        self.stage = ""
        self.epochs = 0
        self.batches = 0
        self.started = False

    def __enter__(self) -> Any:
        # shown with the first stage, after every option and the data are checked: a refused
        # pipeline prints its one error line and nothing else
        return self

    def __exit__(self, *exc: object) -> None:
        if self.started:
            self.progress.stop()

    def on_stage(self, stage: str, message: str) -> None:
        if not self.started:
            self.progress.start()
            self.started = True
        if stage != self.stage:
            if self.stage:
                self.progress.advance(self.task)
            self.stage = stage
        self.progress.update(self.task, description=f"pipeline: {stage}", status=message[:70])

    def finish(self) -> None:
        self.progress.update(self.task, completed=len(self.stages), status="done")

    # training-engine hooks (teacher, student, purifier)
    def on_train_start(self, *, start_epoch: int, epochs: int, batches_per_epoch: int) -> None:
        self.epochs, self.batches = epochs, batches_per_epoch

    def on_batch_end(
        self, *, epoch: int, batch: int, loss: float = 0.0, acc: float = 0.0, **_: Any
    ) -> None:
        self.progress.update(
            self.task, status=f"epoch {epoch + 1}/{self.epochs} batch {batch + 1}/{self.batches}"
        )

    def on_eval_start(self, *, epoch: int) -> None:
        self.progress.update(self.task, status=f"epoch {epoch + 1}/{self.epochs}: held-out eval")

    def on_epoch_end(self, row: dict[str, float]) -> None:
        self.progress.update(
            self.task, status=f"epoch {int(row.get('epoch', 0))}/{self.epochs} done"
        )


@app.command("pipeline")
def pipeline_cmd(
    data: Annotated[str, typer.Option(help="Dataset directory, or cifar10/cifar100/mnist.")],
    out: Annotated[Path, typer.Option(help="Folder for every stage's outputs.")],
    preset: Annotated[
        str, typer.Option(help="quick (a 2-core CPU, < 20 min) or full (a GPU).")
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
    progress = _PipelineProgress(output, STAGES)
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


# --------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    """Console entry point: run the app and map errors to one line and an exit code."""
    setup_logging()
    debug = os.environ.get("ADVEDGE_DEBUG", "") not in ("", "0")

    def fail(message: str) -> None:
        sys.stderr.write(message.replace("\n", " ") + "\n")
        sys.stderr.flush()

    try:
        rv = app(args=argv, standalone_mode=False, prog_name="advedge")
        if rv == 130:  # typer turns Ctrl-C into an exit code of 130
            raise KeyboardInterrupt
        if isinstance(rv, int) and rv:
            return rv
    except typer.Exit as exc:
        return int(exc.exit_code or 0)
    except click.exceptions.ClickException as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `advedge` or `advedge train`
            sys.stderr.write(exc.format_message() + "\n")
            return 2
        # Usage errors from option parsing: click's own one-line message, exit 2.
        if isinstance(exc, click.exceptions.UsageError):
            fail(f"error: {exc.format_message()} (see advedge {_cmd(exc)}--help)")
            return 2
        fail(f"error: {exc.format_message()}")
        return exc.exit_code
    except (KeyboardInterrupt, typer.Abort):
        fail("interrupted: finished work (epochs, evaluated batches) is saved; rerun with --resume")
        return 130
    except AdvedgeError as exc:
        if debug:
            traceback.print_exc()
        fail(f"error: {exc}")
        return exc.exit_code
    except OSError as exc:  # a path the command could not read or write: name it, exit 1
        if debug:
            traceback.print_exc()
        fail(f"error: {os_error(exc, action=_os_action(exc))}")
        return 1
    except Exception as exc:  # one line, never a traceback unless asked for
        if debug:
            traceback.print_exc()
        fail(
            f"error: unexpected {type(exc).__name__}: {exc} (set ADVEDGE_DEBUG=1 for the traceback)"
        )
        return 1
    return 0


def _os_action(exc: OSError) -> str:
    """``read`` for errors that can only come from reading (a missing file), else ``write``."""
    import errno

    return "read" if exc.errno in (errno.ENOENT, errno.EISDIR) else "write"


def _cmd(exc: Any) -> str:
    ctx = exc.ctx
    if ctx is not None and ctx.info_name and ctx.info_name != "advedge":
        return f"{ctx.info_name} "
    return ""


def _entry() -> None:
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    _entry()

"""``advedge purifier train``: a purifier G trained against a frozen classifier."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from advedge.cli.options import Data, Epochs, RunDir, choices, params, parse_eps_r, run_options
from advedge.cli.output import Output, report_training
from advedge.cli.progress import TrainProgress, load_data

__all__ = ["purifier_train_cmd"]


@run_options
def purifier_train_cmd(
    ctx: typer.Context,
    classifier: Annotated[
        str, typer.Option(help="Frozen classifier: run directory or model.safetensors.")
    ],
    data: Data,
    epochs: Epochs,
    out: RunDir,
    method: Annotated[
        str, typer.Option(help="Purifier method.", metavar=choices("{purifier_methods}"))
    ] = "ipcm",
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
    gan: Annotated[
        str, typer.Option(help="GAN loss.", metavar=choices("lsgan", "nsgan"))
    ] = "lsgan",
    guidance: Annotated[
        str,
        typer.Option(
            help="Guidance by the logits, or by the features (HGD-style).",
            metavar=choices("logits", "features"),
        ),
    ] = "logits",
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 128,
    lr: Annotated[float, typer.Option(help="Generator learning rate (Adam).")] = 1e-3,
    lr_d: Annotated[float, typer.Option(help="Discriminator learning rate (Adam).")] = 2e-4,
    **run: Any,
) -> None:
    """Train a purifier G against a frozen classifier; writes purifier.safetensors."""
    from advedge.purifier.train import PurifierConfig, train_purifier
    from advedge.training.engine import check_run_dir
    from advedge.utils import parse_eps

    output = Output(run["json_out"])
    resume = run["resume"]
    settings = params(
        ctx,
        drop=("config", "resume"),
        out=str(out),
        eps=parse_eps(eps, name="--eps"),
        eps_r=None if eps_r is None else parse_eps_r(eps_r),
    )
    cfg = PurifierConfig(**settings)
    check_run_dir(out, resume)
    dataset = load_data(data, output)
    progress = TrainProgress(
        output,
        batch_status="G {loss:.4f} inv {acc:.4f}",
        epoch_status="clean via G {test_clean_acc:.1%} grey-box PGD {test_greybox_pgd_acc:.1%}",
    )
    with progress:
        result = train_purifier(cfg, resume=resume, callbacks=progress, dataset=dataset)
    report_training(
        output,
        result,
        schema="advedge.purifier/1",
        title=f"advedge purifier train ({method})",
        epochs=epochs,
        fields={
            "purifier_path": str(result.purifier_path),
            "method": method,
            "classifier": classifier,
        },
    )

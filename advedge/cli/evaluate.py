"""``advedge eval``: clean and robust accuracy of a checkpoint, with sanity flags."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Group
from rich.table import Table

from advedge.cli.options import Data, Device, JsonOpt, Norm, choices, params
from advedge.cli.output import Output, percent
from advedge.cli.progress import EvalProgress, load_data

__all__ = ["eval_cmd"]


def eval_cmd(
    ctx: typer.Context,
    model: Annotated[str, typer.Option(help="Run directory or model.safetensors.")],
    data: Data,
    suite: Annotated[
        str | None,
        typer.Option(
            help="standard (APGD-CE, APGD-T, Square), rand (APGD with EOT) or quick (PGD, CW).",
            metavar=choices("{suites}"),
        ),
    ] = None,
    attacks: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated attacks instead of a suite [default: {default_attacks}].",
            metavar=choices("{attacks}") + ",...",
        ),
    ] = None,
    eps: Annotated[str, typer.Option(help="Threat-model eps, e.g. 8/255.")] = "8/255",
    norm: Norm = "Linf",
    steps: Annotated[int, typer.Option(help="Steps of PGD/CW/MI-FGSM (PGD-20 by default).")] = 20,
    alpha: Annotated[str | None, typer.Option(help="PGD/CW step size [default: eps/4].")] = None,
    restarts: Annotated[int, typer.Option(help="Random restarts of PGD/CW.")] = 1,
    n_queries: Annotated[int, typer.Option(help="Query budget of the Square attack.")] = 5000,
    n: Annotated[int | None, typer.Option(help="First N test images (all by default).")] = None,
    batch_size: Annotated[int, typer.Option(help="Attack batch size.")] = 256,
    seed: Annotated[int, typer.Option(help="Random seed of the attacks.")] = 0,
    device: Device = "auto",
    amp: Annotated[
        str,
        typer.Option(
            help="Autocast on CUDA; off: fp32; auto: bf16 on CUDA.",
            metavar=choices("off", "bf16", "fp16", "auto"),
        ),
    ] = "off",
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
    from advedge.evaluation import EvalOptions, evaluate_checkpoint

    output = Output(json_out)
    attack_list = None if attacks is None else [a.strip() for a in attacks.split(",") if a.strip()]
    options = EvalOptions(**params(ctx, drop=("model", "data", "purifier"), attacks=attack_list))
    options.validate()  # bad flags fail before any data is loaded or downloaded
    from advedge.checkpoint import read_metadata

    meta = read_metadata(model)  # so does a missing, corrupt or non-PyTorch checkpoint
    if purifier is not None:  # and a purifier that does not fit it
        from advedge.purifier import load_purifier
        from advedge.purifier.checkpoint import check_purifier_fits

        check_purifier_fits(load_purifier(purifier), meta, str(purifier))
    dataset = load_data(data, output)
    progress = EvalProgress(output)
    with progress:
        result = evaluate_checkpoint(
            model, dataset, options=options, progress=progress, purifier=purifier
        )
    output.result(result, human=Group(_results_table(result), _flags_table(result)))


def _ci(record: dict[str, Any], key: str) -> str:
    """``[low, high]`` of ``record[key + "_ci95"]`` in percent, or nothing."""
    ci = record.get(f"{key}_ci95")
    return f"[{percent(ci[0])}, {percent(ci[1])}]" if ci else ""


def _results_table(result: dict[str, Any]) -> Table:
    title = (
        f"advedge eval {result.get('suite') or ''} (eps={result['eps']:.5g}, {result['norm']}, "
        f"n={result['n_examples']})"
    )
    table = Table("attack", "kind", "accuracy %", "95% interval", "seconds", title=title)
    if "clean_acc_no_purifier" in result:
        table.add_row("clean, no purifier", "-", percent(result["clean_acc_no_purifier"]), "", "")
        table.add_row("clean, through purifier", "-", percent(result["clean_acc"]), "", "")
    else:
        table.add_row("clean", "-", percent(result["clean_acc"]), _ci(result, "clean_acc"), "")
    for entry in result["attacks"]:
        name = entry["name"] + (" (cumulative)" if entry.get("cumulative") else "")
        acc, ci = percent(entry["robust_acc"]), _ci(entry, "robust_acc")
        table.add_row(name, entry["kind"], acc, ci, f"{entry['seconds']:.1f}")
    for setting, acc in result.get("worst_case_by_setting", {}).items():
        table.add_row(f"worst case, {setting}", "per-example", percent(acc), "", "")
    worst, seconds = percent(result["worst_case_acc"]), f"{result['seconds']:.1f}"
    table.add_row("worst case", "per-example", worst, _ci(result, "worst_case_acc"), seconds)
    return table


def _flags_table(result: dict[str, Any]) -> Table:
    flags = Table("sanity flag", "status", "detail", title="sanity checks (Carlini et al. 2019)")
    for flag in result["flags"]:
        flags.add_row(flag["name"], "TRIGGERED" if flag["triggered"] else "ok", flag["message"])
    return flags

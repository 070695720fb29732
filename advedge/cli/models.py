"""``advedge models``: the model registry."""

from __future__ import annotations

from rich.table import Table

from advedge.cli.options import JsonOpt
from advedge.cli.output import Output

__all__ = ["methods_cmd", "models_cmd"]


def models_cmd(json_out: JsonOpt = False) -> None:
    """List the model registry, with each model's parameters and MACs at 3x32x32."""
    from advedge.models import list_models, model_cost, model_info

    out = Output(json_out)
    infos = [{**model_info(name), **model_cost(name)} for name in list_models()]
    table = Table("name", "params", "MACs", "description", title="advedge models (3x32x32)")
    for info in infos:
        table.add_row(
            info["name"],
            f"{info['parameters'] / 1e6:.2f}M",
            f"{info['macs'] / 1e6:.1f}M",
            info.get("description", ""),
        )
    out.result({"schema": "advedge.models/1", "models": infos}, human=table)


def methods_cmd(json_out: JsonOpt = False) -> None:
    """List the training and distillation methods with the published recipe each defaults to."""
    from advedge.training.official import OFFICIAL, describe

    out = Output(json_out)
    rows = [describe(name) for name in OFFICIAL]
    columns = ["method", "paper", "optimiser", "epochs, schedule", "inner attack", "loss"]
    table = Table(*columns, title="advedge methods (defaults = the official code's)")
    for row in rows:
        table.add_row(*(row[c] for c in columns))
    out.result({"schema": "advedge.methods/1", "methods": rows}, human=table)

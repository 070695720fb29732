"""``advedge models``: the model registry."""

from __future__ import annotations

from rich.table import Table

from advedge.cli.options import JsonOpt
from advedge.cli.output import Output

__all__ = ["models_cmd"]


def models_cmd(json_out: JsonOpt = False) -> None:
    """List the model registry."""
    from advedge.models import list_models, model_info

    out = Output(json_out)
    infos = [model_info(name) for name in list_models()]
    table = Table("name", "description", title="advedge models")
    for info in infos:
        table.add_row(info["name"], info.get("description", ""))
    out.result({"schema": "advedge.models/1", "models": infos}, human=table)

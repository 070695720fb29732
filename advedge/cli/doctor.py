"""``advedge doctor``: the toolchain's versions, then every runner backend proved end to end."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Group
from rich.markup import escape
from rich.table import Table

from advedge.cli.options import Device, JsonOpt, choices
from advedge.cli.output import Output
from advedge.cli.progress import Bars

__all__ = ["doctor_cmd"]

#: How each status is shown.
_STYLES = {"ok": "green", "missing": "yellow", "failed": "bold red"}
#: Version fields shown under another name, and how a missing one reads.
_LABELS = {
    "onnxruntime_providers": "onnxruntime providers",
    "nvidia_driver": "NVIDIA driver",
    "gpus": "GPUs",
    "jetson_release": "Jetson (L4T)",
    "jetson_power_mode": "Jetson power mode",
    "jetson_clocks": "Jetson clocks",
}


class _DoctorProgress(Bars):
    """One bar over the backends, its status the backend under check."""

    def __init__(self, output: Output) -> None:
        super().__init__(output, remaining=False)
        self.task: Any = None

    def __call__(self, message: str, done: int, total: int) -> None:
        if self.task is None:
            self.task = self.progress.add_task("doctor", total=total, status="")
        self.progress.update(self.task, completed=done, status=message)
        self.line(f"doctor: {message} ({done}/{total})", force=True)


def doctor_cmd(
    device: Device = "auto",
    backend: Annotated[
        list[str] | None,
        typer.Option(
            metavar=choices("{backends}"),
            help="Check only this backend (repeatable) [default: every one].",
        ),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Prove the deploy toolchain here: versions, then every backend end to end.

    Per backend a tiny seeded model is exported, built and loaded as advedge does it, its logits checked against PyTorch's (parity) and its timer checked to measure execution. One line per check: ok, missing (not available here, with the install hint) or failed (the reason).

    Exit code 0 when every available backend passed (missing ones do not count), 1 when a check failed (a runtime failure, as a refused export), 2 for a bad option.
    """
    from advedge.workflow.doctor import DoctorOptions, run_doctor

    output = Output(json_out)
    opts = DoctorOptions(device=device, backends=list(backend) if backend else None)
    opts.validate()  # a bad --backend is one line before any bar is shown
    with _DoctorProgress(output) as bar:
        doc = run_doctor(opts, progress=bar)
    output.result(doc, human=Group(_versions_table(doc["versions"]), _checks_table(doc)))
    line = _summary_line(doc)
    if not json_out:
        output.out.print(line, highlight=False, markup=False)
    if not doc["ok"]:
        raise typer.Exit(1)


def _shown(value: Any) -> str:
    """A version field as the table shows it."""
    if value is None or value == [] or value == {}:
        return "not found"
    if isinstance(value, list) and value and isinstance(value[0], dict):  # GPUs
        return "; ".join(
            f"{g.get('index')}: {g.get('name')}"
            + (f" (sm {g['compute_capability']})" if g.get("compute_capability") else "")
            for g in value
        )
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items())
    return str(value)


def _versions_table(versions: dict[str, Any]) -> Table:
    table = Table("component", "version", title="advedge doctor: toolchain")
    for key, value in versions.items():
        if key.startswith("jetson") and value is None:
            continue  # not a Jetson: one row says so
        text = _shown(value)
        style = "dim" if text == "not found" else ""
        table.add_row(
            _LABELS.get(key, key), f"[{style}]{escape(text)}[/]" if style else escape(text)
        )
    if versions.get("jetson_release") is None:
        table.add_row("Jetson", "[dim]no (no /etc/nv_tegra_release)[/]")
    return table


def _checks_table(doc: dict[str, Any]) -> Table:
    table = Table(
        "backend", "check", "status", "detail", title=f"backends (device {doc['device']})"
    )
    for c in doc["checks"]:
        detail = c["detail"] + (f" ({c['hint']})" if c.get("hint") else "")
        style = _STYLES.get(c["status"], "")
        table.add_row(c["backend"], c["check"], f"[{style}]{c['status']}[/]", escape(detail))
    return table


def _summary_line(doc: dict[str, Any]) -> str:
    """``backends: 3 passed, 4 missing here, 0 failed: every available backend passed (12.0 s)``."""
    s = doc["summary"]
    counts = (
        f"backends: {len(s['passed'])} passed, {len(s['missing_backends'])} missing here, "
        f"{len(s['failed_backends'])} failed"
    )
    verdict = (
        f"{', '.join(s['failed_backends'])} failed a check"
        if s["failed_backends"]
        else "every available backend passed"
    )
    return f"{counts}: {verdict} ({doc['seconds']:.1f} s)"

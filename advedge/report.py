"""``advedge report``: one table, a robustness-latency Pareto plot and training curves.

Inputs are bench directories (holding ``bench.json`` from ``advedge bench``) and training run
directories (holding ``metrics.csv``). Outputs, in ``--out``:

- ``report.md``: one row per benchmarked artifact: model, precision, purifier or not, size,
  clean accuracy, worst-case robust accuracy with the attack kinds behind it, p50/p99 latency at
  batch 1 and the throughput at the best batch size;
- ``report.json``: the same rows and their sources;
- ``pareto.png``: worst-case robust accuracy against batch-1 p50 latency, the Pareto front (no
  other artifact is both faster and more robust) marked;
- ``training.png``: per run, clean and PGD accuracy on the held-out batch by epoch, and the loss.

Robust accuracy is the per-example worst case the bench measured on the artifact itself
(transfer and query attacks); where a transfer-only figure exceeds the white-box figure of its
FP32 parent, the report says so: that is the precision gap, not extra robustness.
"""

from __future__ import annotations

import csv
import html
import json
import os
import re
from pathlib import Path
from typing import Any

from advedge.errors import DataError, MissingDependencyError, UsageError, os_error
from advedge.locks import output_lock
from advedge.outputs import Leftovers, StagedFiles, check_out, quiet_warnings, refuse_overwrite
from advedge.utils import to_jsonable

__all__ = ["build_report", "md_escape", "pareto_front"]

SCHEMA = "advedge.report/1"
OUTPUTS = ("report.md", "report.json")
PLOTS = ("pareto.png", "training.png")

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")
# characters with a meaning in (GitHub-flavoured) Markdown inside a table cell: the cell break,
# emphasis, code, links and images, headings, strike-through, math, and what starts an autolink
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+!|~:@$])")
_WWW = re.compile(r"(?i)\b(www)\.")


def md_escape(value: Any) -> str:
    """Any name, label or path as inert text in a Markdown table cell.

    Line breaks and other control characters become one space (a newline would end the table
    row); ``&``, ``<`` and ``>`` become HTML entities (no tag, ``<script>`` included, survives);
    every character Markdown gives a meaning to in a cell (``|`` cell breaks, ``[x](url)`` links,
    ``![x](url)`` images, emphasis, code, math, ``http://``, ``www.`` and e-mail autolinks) is
    backslash-escaped. Rendered, the cell shows the original text.
    """
    text = _CONTROL.sub(" ", str(value)).strip()
    text = html.escape(text, quote=False)
    return _WWW.sub(r"\1\\.", _MD_SPECIAL.sub(r"\\\1", text))


def _label(value: Any) -> str:
    """A name as plain text in a Matplotlib label (no mathtext, one line)."""
    return _CONTROL.sub(" ", str(value)).replace("$", r"\$")


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates (lower-or-equal latency and higher-or-equal
    robustness, one of them strictly), sorted by latency."""
    front = []
    for i, (lat, rob) in enumerate(points):
        dominated = any(
            (l2 <= lat and r2 >= rob) and (l2 < lat or r2 > rob)
            for j, (l2, r2) in enumerate(points)
            if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def _rows_from_bench(path: Path) -> list[dict[str, Any]]:
    doc = json.loads(path.read_text(encoding="utf-8"))
    if doc.get("schema") != "advedge.bench/1":
        raise DataError(f"{path} is not an advedge bench.json (schema {doc.get('schema')!r})")
    rows = []
    for r in doc["results"]:
        lats = [lat for lat in r["latency"] if "p50_ms" in lat]
        b1 = next((lat for lat in lats if lat["batch"] == 1), None)
        best = max(lats, key=lambda lat: lat["images_per_s"], default=None)
        robust = r.get("robust") or {}
        kinds = sorted({a["kind"] for a in robust.get("attacks", [])})
        rows.append(
            {
                "artifact": r["name"],
                "source": str(path),
                "kind": r.get("kind"),
                "purifier": r.get("kind") in ("fused", "purifier"),
                "precision": r.get("precision"),
                "backend": r.get("backend"),
                "size_mb": round(r["bytes"] / 1e6, 3),
                "clean_acc": r.get("clean_acc"),
                "worst_case_acc": robust.get("worst_case_acc"),
                "worst_case_kinds": kinds,
                "worst_case_transfer_acc": robust.get("worst_case_transfer_acc"),
                "white_box": robust.get("white_box", False),
                "source_sha256": robust.get("source_sha256") if robust else None,
                "p50_b1_ms": b1["p50_ms"] if b1 else None,
                "p99_b1_ms": b1["p99_ms"] if b1 else None,
                "best_batch": best["batch"] if best else None,
                "best_images_per_s": best["images_per_s"] if best else None,
                "device": doc.get("environment", {}).get("gpu")
                or doc.get("environment", {}).get("cpu"),
            }
        )
    return rows


def _read_metrics(run: Path) -> list[dict[str, float]]:
    with open(run / "metrics.csv", newline="", encoding="utf-8") as fh:
        out = []
        for row in csv.DictReader(fh):
            parsed = {}
            for k, v in row.items():
                try:
                    parsed[k] = float(v)
                except (TypeError, ValueError):
                    continue
            out.append(parsed)
    return out


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.1f}" if pct else f"{v:g}"


def _markdown(rows: list[dict[str, Any]], runs: dict[str, list[dict[str, float]]]) -> str:
    lines = [
        "# advedge report",
        "",
        "Robust accuracy: per-example worst case over the attacks run on the artifact itself "
        "(kinds in brackets). Latency: batch 1, p50 / p99.",
        "",
        "| artifact | precision | purifier | size MB | clean % | worst-case robust % | p50 ms (b1) | p99 ms (b1) | best images/s (batch) | device |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        kinds = (
            f" \\[{md_escape(', '.join(r['worst_case_kinds']))}\\]" if r["worst_case_kinds"] else ""
        )
        best = (
            f"{_fmt(r['best_images_per_s'])} ({md_escape(r['best_batch'])})"
            if r["best_batch"]
            else "-"
        )
        lines.append(
            f"| {md_escape(r['artifact'])} | {md_escape(r['precision'] or '-')} | "
            f"{'yes' if r['purifier'] else 'no'} | {_fmt(r['size_mb'])} | "
            f"{_fmt(r['clean_acc'], True)} | {_fmt(r['worst_case_acc'], True)}{kinds} | "
            f"{_fmt(r['p50_b1_ms'])} | {_fmt(r['p99_b1_ms'])} | {best} | "
            f"{md_escape(r['device'] or '-')} |"
        )
    lines += _honesty_section(rows)
    notes = [r for r in rows if r["worst_case_kinds"] == ["transfer"]]
    if notes:
        lines += [
            "",
            "Rows measured with transfer attacks only overstate robustness: examples crafted at FP32 transfer poorly to another precision.",
        ]
    if runs:
        lines += [
            "",
            "## Training runs",
            "",
            "| run | epochs | last clean % | last PGD % |",
            "| --- | --- | --- | --- |",
        ]
        for name, m in runs.items():
            last = m[-1] if m else {}
            lines.append(
                f"| {md_escape(name)} | {len(m)} | {_fmt(last.get('test_clean_acc'), True)} | "
                f"{_fmt(last.get('test_pgd_acc'), True)} |"
            )
    return "\n".join(lines) + "\n"


def honest_robustness(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per deployed artifact: its transfer and worst-case figures next to the white-box worst
    case of its FP32 PyTorch parent (same source checkpoint), with a flag where transfer
    robustness exceeds white-box robustness: that is the precision gap, not extra robustness."""

    def key(r: dict[str, Any]) -> str:  # a fused artifact's source is a dict of two sha256
        return json.dumps(r["source_sha256"], sort_keys=True)

    parents = {key(r): r for r in rows if r.get("white_box") and r["source_sha256"]}
    out = []
    for r in rows:
        if r.get("white_box") or r["worst_case_transfer_acc"] is None:
            continue
        parent = parents.get(key(r))
        # like with like: the parent's white-box figure over the same PGD-20/APGD attacks (the
        # transfer set crafted on it), without the query attack
        wb = parent["worst_case_transfer_acc"] if parent else None
        gap = wb is not None and r["worst_case_transfer_acc"] > wb
        out.append(
            {
                "artifact": r["artifact"],
                "precision": r["precision"],
                "purifier": r["purifier"],
                "parent": parent["artifact"] if parent else None,
                "white_box_parent_acc": wb,
                "transfer_acc": r["worst_case_transfer_acc"],
                "worst_case_acc": r["worst_case_acc"],
                "precision_gap": gap,
            }
        )
    return out


def _honesty_section(rows: list[dict[str, Any]]) -> list[str]:
    table = honest_robustness(rows)
    if not table:
        return []
    lines = [
        "",
        "## Robustness of what ships",
        "",
        "The headline for a deployed artifact is its own worst case (transfer and the Square query "
        "attack run on it). White-box: PGD-20 and APGD-CE on the FP32 PyTorch parent itself; "
        "transfer: the same examples fed to the artifact. A transfer figure above the white-box "
        "one is the precision gap (examples crafted at FP32 transfer poorly to another "
        "precision), not extra robustness.",
        "",
        "| artifact | precision | purifier | white-box on the FP32 parent % | transfer of the same attacks % | worst case on the artifact, with Square % | flag |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for t in table:
        flag = "precision gap: transfer > white-box" if t["precision_gap"] else ""
        lines.append(
            f"| {md_escape(t['artifact'])} | {md_escape(t['precision'] or '-')} | "
            f"{'yes' if t['purifier'] else 'no'} | "
            f"{_fmt(t['white_box_parent_acc'], True)} | {_fmt(t['transfer_acc'], True)} | "
            f"{_fmt(t['worst_case_acc'], True)} | {flag} |"
        )
    return lines


def _plt() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingDependencyError(
            "advedge report needs matplotlib", "pip install 'advedge[report]'"
        ) from None
    return plt


def _save_png(fig: Any, path: Path) -> bool:
    """Lay out, save and close a figure; True (a plot was drawn)."""
    fig.tight_layout()
    try:
        fig.savefig(path, format="png")
    finally:
        _plt().close(fig)
    return True


def _pareto_png(rows: list[dict[str, Any]], path: Path) -> bool:
    pts = [
        (r["p50_b1_ms"], r["worst_case_acc"])
        for r in rows
        if r["p50_b1_ms"] is not None and r["worst_case_acc"] is not None
    ]
    named = [r for r in rows if r["p50_b1_ms"] is not None and r["worst_case_acc"] is not None]
    if not pts:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    front = pareto_front(pts)
    for i, (r, (lat, rob)) in enumerate(zip(named, pts, strict=True)):
        marker = "s" if r["purifier"] else "o"
        ax.scatter(
            lat,
            100 * rob,
            marker=marker,
            s=60,
            color="tab:red" if i in front else "tab:gray",
            zorder=3,
        )
        ax.annotate(
            _label(r["artifact"]),
            (lat, 100 * rob),
            textcoords="offset points",
            xytext=(5, 4),
            fontsize=7,
        )
    fx = [pts[i][0] for i in front]
    fy = [100 * pts[i][1] for i in front]
    ax.step(fx, fy, where="post", color="tab:red", lw=1.2, label="Pareto front")
    ax.set_xscale("log")
    ax.margins(x=0.25)  # room for the labels on the right
    ax.set_ylim(0, max(5.0, 115 * max(r for _, r in pts)))
    ax.set_xlabel("latency, batch 1, p50 (ms, log scale)")
    ax.set_ylabel("worst-case robust accuracy (%)")
    ax.set_title("robustness vs latency (circles: classifier, squares: with purifier)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    return _save_png(fig, path)


def _training_png(runs: dict[str, list[dict[str, float]]], path: Path) -> bool:
    if not runs:
        return False
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    for name, m in runs.items():
        ep = [r.get("epoch") for r in m]
        if any("test_clean_acc" in r for r in m):
            line = ax1.plot(
                ep,
                [100 * r.get("test_clean_acc", float("nan")) for r in m],
                label=_label(f"{name} clean"),
            )[0]
            ax1.plot(
                ep,
                [100 * r.get("test_pgd_acc", float("nan")) for r in m],
                ls="--",
                color=line.get_color(),
                label=_label(f"{name} PGD"),
            )
        loss_key = next((k for k in ("train_loss", "g_loss") if any(k in r for r in m)), None)
        if loss_key:
            ax2.plot(
                ep, [r.get(loss_key, float("nan")) for r in m], label=_label(f"{name} {loss_key}")
            )
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("held-out accuracy (%)")
    ax1.set_title("clean (solid) and PGD (dashed)")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("training loss")
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    return _save_png(fig, path)


def build_report(
    inputs: list[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write report.md, report.json, pareto.png and training.png; returns report.json's document.

    Every input is read and ``out`` checked before anything is written; ``out`` is locked
    while the report is written, created only by its first file, and a failure leaves nothing
    behind. An earlier report.md or report.json is replaced only with ``overwrite``, all or
    nothing: every new file is written under a temporary name first and then they are renamed
    into place in a row, so a failure before the renames leaves the earlier report whole; only
    after the renames is a plot the new report does not draw removed (no stale PNG beside it).

    Raises:
        UsageError: no inputs, an input that is neither a bench nor a run directory, or an
            ``out`` that is a file or lies under one.
        DataError: an unreadable bench.json or metrics.csv.
        AdvedgeError: an earlier report without ``overwrite``, an ``out`` that cannot be written.
        OutputLockedError: another process writes the same ``out``.
    """
    with quiet_warnings():
        if not inputs:
            raise UsageError("give at least one bench or run directory")
        out = check_out(out)
        rows, runs = _read_inputs(inputs)
        if any(r["p50_b1_ms"] is not None and r["worst_case_acc"] is not None for r in rows) or (
            runs
        ):
            _plt()  # matplotlib is there before anything is written
        with output_lock(out):
            refuse_overwrite(out, OUTPUTS, overwrite)
            made = Leftovers(out)  # the folders this report creates, removed when empty
            try:
                return _write_report(rows, runs, out, replace=overwrite)
            except OSError as exc:
                made.remove()
                raise os_error(exc, out) from None
            except BaseException:
                made.remove()
                raise


def _read_inputs(
    inputs: list[str | os.PathLike[str]],
) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, float]]]]:
    rows: list[dict[str, Any]] = []
    runs: dict[str, list[dict[str, float]]] = {}
    for item in inputs:
        p = Path(item)
        bench = p / "bench.json" if p.is_dir() else p
        if bench.name == "bench.json" and bench.is_file():
            try:
                rows += _rows_from_bench(bench)
            except DataError:
                raise
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise DataError(
                    f"unreadable bench file {bench}: {type(exc).__name__}: {exc}"
                ) from None
        elif p.is_dir() and (p / "metrics.csv").is_file():
            try:
                runs[p.name] = _read_metrics(p)
            except (OSError, ValueError, csv.Error) as exc:
                raise DataError(f"unreadable metrics {p / 'metrics.csv'}: {exc}") from None
        else:
            raise UsageError(
                f"{p} is neither a bench directory (bench.json) nor a run directory (metrics.csv)"
            )
    return rows, runs


def _write_report(
    rows: list[dict[str, Any]],
    runs: dict[str, list[dict[str, float]]],
    out: Path,
    *,
    replace: bool,
) -> dict[str, Any]:
    """Stage every file under a temporary name beside it, then rename them all in a row; only
    then, with ``replace``, remove a plot of the earlier report that this one does not draw."""
    with StagedFiles() as staged:
        files = {"markdown": str(out / "report.md"), "json": str(out / "report.json")}
        for name, key, draw, what in (
            ("pareto.png", "pareto", _pareto_png, rows),
            ("training.png", "training", _training_png, runs),
        ):
            if draw(what, staged.path(out / name)):
                files[key] = str(out / name)
            else:
                staged.drop(out / name)
        doc = _report_doc(rows, runs, files)
        staged.write_text(out / "report.json", json.dumps(to_jsonable(doc), indent=2) + "\n")
        staged.write_text(out / "report.md", _markdown(rows, runs))
        stale = [out / name for name in PLOTS] if replace else []
        staged.install(stale=stale)  # removes only the plots not among the new files
    return doc


def _report_doc(
    rows: list[dict[str, Any]], runs: dict[str, list[dict[str, float]]], files: dict[str, str]
) -> dict[str, Any]:
    """``report.json``: the rows, the Pareto front, the honest headline, runs and files."""
    pts = [
        (r["p50_b1_ms"], r["worst_case_acc"])
        for r in rows
        if r["p50_b1_ms"] is not None and r["worst_case_acc"] is not None
    ]
    named = [
        r["artifact"]
        for r in rows
        if r["p50_b1_ms"] is not None and r["worst_case_acc"] is not None
    ]
    doc = {
        "schema": SCHEMA,
        "rows": rows,
        "pareto_front": [named[i] for i in pareto_front(pts)],
        "robustness_of_what_ships": honest_robustness(rows),
        "runs": dict(runs),
        "files": files,
    }
    return doc

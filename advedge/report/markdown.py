"""``report.md``: the threat model, one table of artifacts (percent with 95% intervals), the
latency warnings, which differences the data can tell apart, the robustness of what ships and
the training runs."""

from __future__ import annotations

from typing import Any

from advedge.report.analysis import honest_robustness
from advedge.report.inputs import Bench, Run, run_summary
from advedge.report.text import fmt, md_escape, pct_ci

__all__ = ["WARNED", "markdown", "threat_lines"]

WARNED = "†"  # marks a latency whose measurement carries a variation warning


def threat_lines(benches: list[Bench]) -> list[str]:
    """The threat model under the title: one line, or one per bench when they differ."""
    models = {b.source: b.threat_model for b in benches}
    distinct = {str(tm) for tm in models.values()}
    if len(distinct) <= 1:
        tm = next(iter(models.values()), None)
        if tm is None:
            return ["Threat model: none (the bench ran without --robust): clean accuracy only."]
        return [f"Threat model: {md_escape(tm['summary'])}."]
    return [
        f"Threat model of {md_escape(src)}: "
        + (md_escape(tm["summary"]) if tm else "none (no --robust)")
        + "."
        for src, tm in models.items()
    ]


def _warned(row: dict[str, Any], batch: Any) -> str:
    hit = any(w["batch"] == batch for w in row["latency_warnings"])
    return f" {WARNED}" if hit and batch is not None else ""


def _table(rows: list[dict[str, Any]]) -> list[str]:
    show_file = any(r["label"] != r["artifact"] for r in rows)
    head = (
        "| # | artifact | precision | purifier | size MB | clean % [95% CI] | "
        "worst-case robust % [95% CI] | p50 ms (b1) | p99 ms (b1) | best images/s (batch) | "
        "device |" + (" file |" if show_file else "")
    )
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for k, r in enumerate(rows, 1):
        kinds = r["worst_case_kinds"]
        kinds = f" \\[{md_escape(', '.join(kinds))}\\]" if kinds else ""
        best = (
            f"{fmt(r['best_images_per_s'])} ({md_escape(r['best_batch'])})"
            f"{_warned(r, r['best_batch'])}"
            if r["best_batch"]
            else "-"
        )
        lines.append(
            f"| {k} | {md_escape(r['label'])} | {md_escape(r['precision'] or '-')} | "
            f"{'yes' if r['purifier'] else 'no'} | {fmt(r['size_mb'])} | "
            f"{pct_ci(r['clean_acc'], r['clean_acc_ci95'])} | "
            f"{pct_ci(r['worst_case_acc'], r['worst_case_acc_ci95'])}{kinds} | "
            f"{fmt(r['p50_b1_ms'])}{_warned(r, 1 if r['p50_b1_ms'] is not None else None)} | "
            f"{fmt(r['p99_b1_ms'])} | {best} | {md_escape(r['device'] or '-')} |"
            + (f" {md_escape(r['artifact'])} |" if show_file else "")
        )
    return lines


def _load_text(bench: Bench) -> str | None:
    parts = []
    for when, load in (("before", bench.load_before), ("after", bench.load_after)):
        if load:
            parts.append(f"{when} {', '.join(f'{v:.2f}' for v in load)}")
    if bench.threads is not None:
        parts.append(f"threads {md_escape(bench.threads)}")
    if not parts:
        return None
    return f"{md_escape(bench.source)}: load average (1, 5, 15 min) " + "; ".join(parts)


def _warnings(rows: list[dict[str, Any]], benches: list[Bench]) -> list[str]:
    """The footnote of the marked latencies, the machine's load, and the bench's other
    warnings."""
    warned = [(k, r) for k, r in enumerate(rows, 1) if r["latency_warnings"]]
    # bench repeats each latency warning as "<name or label> batch <b>: <warning>"
    listed = {w["warning"] for _, r in warned for w in r["latency_warnings"]}
    others = [w for b in benches for w in b.warnings if not any(w.endswith(t) for t in listed)]
    loads = [t for t in (_load_text(b) for b in benches) if t]
    if not (warned or others):
        return []
    lines = [""]
    if warned:
        lines += [
            f"{WARNED} The latency marked {WARNED} varied while it was measured (high "
            "coefficient of variation: the machine was busy or throttling); treat it as rough:",
            "",
        ]
        for k, r in warned:
            what = "; ".join(
                f"batch {md_escape(w['batch'])}: {md_escape(w['warning'])}"
                for w in r["latency_warnings"]
            )
            lines.append(f"- {k} {md_escape(r['label'])}: {what}")
    if loads:
        lines += ["", *(f"- {t}" for t in loads)]
    if others:
        lines += ["", "Other warnings of the bench:", ""]
        lines += [f"- {md_escape(w)}" for w in others]
    return lines


def _comparison(comparison: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    pairs = comparison["pairs"]
    if not comparison["front"]:
        return []
    number = {r["artifact"]: k for k, r in enumerate(rows, 1)}
    label = {r["artifact"]: r["label"] for r in rows}
    what = "worst-case robust" if comparison["metric"] == "worst_case_acc" else "clean"
    front = ", ".join(f"{number[a]} {md_escape(label[a])}" for a in comparison["front"])
    lines = [
        "",
        "## Which differences this n can tell apart",
        "",
        f"Pareto front ({what} accuracy against batch-1 p50 latency), fastest first: {front}.",
    ]
    if not pairs:
        return lines
    methods = {p["method"] for p in pairs}
    lines += [
        "",
        "Each front member against the next one and against every artifact it dominates. "
        + (
            "Exact McNemar test on the per-example results over the same images "
            "(two-sided binomial test on the images only one of the two got right); "
            "a difference with p >= 0.05 is not distinguishable. "
            if "mcnemar-exact" in methods
            else ""
        )
        + (
            "Where the per-example results are missing (an advedge.bench/1 file, or "
            "two benches), the pair is compared by its 95% Wilson intervals instead: "
            "overlapping intervals are called not distinguishable, a cruder check."
            if methods - {"mcnemar-exact"}
            else ""
        ),
        "",
        f"| front member | compared with | relation | {what} % | verdict |",
        "| --- | --- | --- | --- | --- |",
    ]
    for p in pairs:
        a, b = p["a"], p["b"]
        lines.append(
            f"| {number[a]} {md_escape(label[a])} | {number[b]} {md_escape(label[b])} | "
            f"{p['relation']} | {pct_ci(p['acc_a'], None)} vs {pct_ci(p['acc_b'], None)} | "
            f"{md_escape(p['text'])} |"
        )
    return lines


def _white_box_cell(t: dict[str, Any]) -> str:
    """The white-box-artifact figure, or why there is none."""
    if t["white_box_artifact_acc"] is not None:
        return pct_ci(t["white_box_artifact_acc"], t["white_box_artifact_acc_ci95"])
    status = t["white_box_artifact_status"]
    if status in (None, "off"):
        return "not run"
    return md_escape(f"{status}: {t['white_box_artifact_reason']}")


def _honesty(rows: list[dict[str, Any]]) -> list[str]:
    table = honest_robustness(rows)
    if not table:
        return []
    lines = [
        "",
        "## Robustness of what ships",
        "",
        "The headline for a deployed artifact is its own worst case (transfer, the white-box "
        "attack on its own arithmetic and the query attack, run on it). White-box: the transfer "
        "attacks on the FP32 PyTorch parent itself; transfer: the same examples fed to the "
        "artifact; white-box on the artifact: APGD-CE and APGD-T through a differentiable "
        "replica of the artifact's own graph (its Q/DQ scales, straight-through rounding), "
        "every example scored on the artifact. A transfer figure above the white-box one is the "
        "precision gap (examples crafted at FP32 transfer poorly to another precision), not "
        "extra robustness; a white-box-on-the-artifact figure more than 1 point below the "
        "parent's white-box figure is robustness the export lost.",
        "",
        "| artifact | precision | purifier | white-box on the FP32 parent % | transfer of the "
        "same attacks % | white-box on the artifact % | worst case on the artifact, with the "
        "query attack % | flag |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for t in table:
        flags = [
            "precision gap: transfer > white-box" * t["precision_gap"],
            "white-box on the artifact > 1 point below its parent's" * t["white_box_drop"],
        ]
        lines.append(
            f"| {md_escape(t['label'])} | {md_escape(t['precision'] or '-')} | "
            f"{'yes' if t['purifier'] else 'no'} | "
            f"{pct_ci(t['white_box_parent_acc'], t['white_box_parent_acc_ci95'])} | "
            f"{pct_ci(t['transfer_acc'], t['transfer_acc_ci95'])} | {_white_box_cell(t)} | "
            f"{pct_ci(t['worst_case_acc'], t['worst_case_acc_ci95'])} | "
            f"{'; '.join(f for f in flags if f)} |"
        )
    return lines


def _runs(runs: dict[str, Run]) -> list[str]:
    if not runs:
        return []
    lines = [
        "",
        "## Training runs",
        "",
        "Last epoch on the run's held-out batch (a purifier run: through the purifier).",
        "",
        "| run | method | epochs | held-out n | clean % [95% CI] | robust % [95% CI] | attack |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, run in runs.items():
        s = run_summary(run)
        lines.append(
            f"| {md_escape(name)} | {md_escape(s['method'] or '-')} | {s['epochs']} | "
            f"{fmt(s['held_out_n'])} | {pct_ci(s['clean_acc'], s['clean_acc_ci95'])} | "
            f"{pct_ci(s['robust_acc'], s['robust_acc_ci95'])} | {md_escape(s['attack'] or '-')} |"
        )
    return lines


def markdown(
    rows: list[dict[str, Any]],
    benches: list[Bench],
    runs: dict[str, Run],
    comparison: dict[str, Any],
) -> str:
    """The whole report.md."""
    lines = ["# advedge report", ""]
    if benches:
        lines += [*threat_lines(benches), ""]
    if rows:
        lines += [
            "Accuracies in percent, each with its 95% Wilson interval in brackets. Robust "
            "accuracy: per-example worst case over the attacks run on the artifact itself "
            "(kinds in brackets). Latency: batch 1, p50 / p99. # is the number in pareto.png.",
            "",
            *_table(rows),
        ]
        lines += _warnings(rows, benches)
        if any(r["worst_case_kinds"] == ["transfer"] for r in rows):
            lines += [
                "",
                "Rows measured with transfer attacks only overstate robustness: examples "
                "crafted at FP32 transfer poorly to another precision.",
            ]
        lines += _comparison(comparison, rows)
        lines += _honesty(rows)
    lines += _runs(runs)
    return "\n".join(lines) + "\n"

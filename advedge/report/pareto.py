"""``pareto.png``: accuracy against batch-1 p50 latency, one look telling which artifact to ship.

One panel for the worst-case robust accuracy and one for the clean accuracy (the clean one
alone when no row has robust figures), each with 95% Wilson intervals as vertical bars, the y
axis fitted to the bars, and its Pareto front as a staircase with the members ringed. The
latency axis is logarithmic and fitted to the data; when one gap between latencies spans more
than a decade and more than half the whole range (a 276 ms PyTorch-eager row among 0.1-0.5 ms
ones), the axis is broken there, at the same scale on both sides, so the outlier does not squash
the rest. Markers are numbered (the row's number in report.md), each number placed where it
overlaps no marker, bar or other number; the legend table below gives every number's
artifact and figures. Colour: precision; marker: classifier (circle) or with a purifier
(square); a dagger: the batch-1 latency carries a variation warning. The threat model is the
title.
"""

from __future__ import annotations

import itertools
import math
import textwrap
from typing import Any

from advedge.report.analysis import pareto_front
from advedge.report.markdown import WARNED
from advedge.report.plots import plt
from advedge.report.text import pct, plot_text

__all__ = ["PRECISION_COLOURS", "latency_ranges", "log_ticks", "pareto_figure"]

PRECISION_COLOURS = {
    "fp32": "tab:blue",
    "tf32": "tab:cyan",
    "fp16": "tab:orange",
    "bf16": "tab:purple",
    "int8": "tab:green",
}
_OTHER_COLOURS = ("tab:brown", "tab:pink", "tab:olive", "tab:red")
_PANELS = {
    "worst_case_acc": ("worst-case robust accuracy", "worst_case_n"),
    "clean_acc": ("clean accuracy", "n"),
}
_MARGIN = 1.6  # the log axis runs from the lowest latency / 1.6 to the highest x 1.6
_NUMBER_SIZE = 8  # points
# label directions, tried in this order at growing distances: right, up, left, down, diagonals
_DIRECTIONS = ((1, 0), (0, 1), (-1, 0), (0, -1), (0.7, 0.7), (-0.7, 0.7), (0.7, -0.7), (-0.7, -0.7))
_DISTANCES = (10, 16, 24, 34, 46)  # points from the point's centre
_RING = 9  # points: the radius a marker and its front ring cover


class _Colours:
    """Colour by precision: fixed for the known ones, then a few more in order of appearance."""

    def __init__(self) -> None:
        self.others: dict[str, str] = {}

    def __call__(self, precision: Any) -> str:
        if precision in PRECISION_COLOURS:
            return PRECISION_COLOURS[precision]
        key = str(precision)
        if key not in self.others:
            self.others[key] = _OTHER_COLOURS[len(self.others) % len(_OTHER_COLOURS)]
        return self.others[key]


def _number(k: int, row: dict[str, Any]) -> str:
    return f"{k}{WARNED}" if any(w["batch"] == 1 for w in row["latency_warnings"]) else str(k)


def latency_ranges(lats: list[float]) -> list[tuple[float, float]]:
    """The latency ranges the x axis shows: one ``(lowest, highest)``, or two split at the widest
    gap when that gap spans more than a decade and more than half the log range."""
    pos = sorted(lats)
    if len(pos) < 2 or pos[0] <= 0:
        return [(pos[0], pos[-1])]
    gap, i = max((math.log10(b / a), i) for i, (a, b) in enumerate(itertools.pairwise(pos)))
    if gap < 1.0 or gap <= 0.5 * math.log10(pos[-1] / pos[0]):
        return [(pos[0], pos[-1])]
    return [(pos[0], pos[i]), (pos[i + 1], pos[-1])]


def _fit_y(ax: Any, pts: list[tuple[float, float, list[float] | None]]) -> None:
    """Fit the y axis (percent) to the points and their interval bars, with a margin; no tick
    label outside [0, 100]."""
    from matplotlib.ticker import FuncFormatter

    lows = [100 * (ci[0] if ci else acc) for _, acc, ci in pts]
    highs = [100 * (ci[1] if ci else acc) for _, acc, ci in pts]
    lo, hi = min(lows), max(highs)
    pad = 0.12 * max(hi - lo, 4.0)
    ax.set_ylim(lo - pad, hi + pad)  # past 0 or 100 too: a point at 0% is drawn whole
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}" if 0 <= v <= 100 else ""))


def _fit_x(ax: Any, lo: float, hi: float) -> None:
    """A log axis from ``lo / 1.6`` to ``hi * 1.6`` (linear when ``lo`` is not positive)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    if lo <= 0:
        span = max(hi - lo, 1e-3)
        ax.set_xlim(lo - 0.1 * span, hi + 0.1 * span)
        return
    ax.set_xscale("log")
    ax.set_xlim(lo / _MARGIN, hi * _MARGIN)
    ax.xaxis.set_major_locator(FixedLocator(log_ticks(lo, hi)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_locator(NullLocator())


#: The smallest gap between two tick labels, as a fraction of the axis' width.
_TICK_GAP = 0.15


def log_ticks(lo: float, hi: float) -> list[float]:
    """Ticks for a log axis over ``[lo / 1.6, hi * 1.6]``: 1, 2 and 5 times the powers of ten
    (only the powers when that gives more than 8), and ``lo`` and ``hi`` themselves (to three
    digits) when fewer than two fall inside, each only where no other tick lies within 15% of
    the axis' width (their labels would overlap)."""
    a, b = lo / _MARGIN, hi * _MARGIN
    powers = range(math.floor(math.log10(a)), math.ceil(math.log10(b)) + 1)
    ticks = [m * 10.0**k for k in powers for m in (1, 2, 5) if a <= m * 10.0**k <= b]
    if len(ticks) > 8:
        ticks = [t for t in ticks if math.isclose(t, 10 ** round(math.log10(t)))]
    if len(ticks) < 2:
        for v in (float(f"{lo:.3g}"), float(f"{hi:.3g}")):
            # a label beside a nearby tick would print over it ("2" and "2.13" read "22.13")
            if all(abs(math.log10(v / t)) > _TICK_GAP * math.log10(b / a) for t in ticks):
                ticks.append(v)
    return sorted(ticks)


def _draw(ax: Any, pts: list[dict[str, Any]], metric: str, colours: _Colours) -> None:
    """The points with their interval bars, the front's staircase and rings."""
    coords = [(r["p50_b1_ms"], 100 * r[metric], r[f"{metric}_ci95"]) for r in pts]
    for r, (lat, acc, ci) in zip(pts, coords, strict=True):
        colour = colours(r["precision"])
        ax.errorbar(
            lat,
            acc,
            yerr=[[acc - 100 * ci[0]], [100 * ci[1] - acc]] if ci else None,
            fmt="s" if r["purifier"] else "o",
            ms=8,
            color=colour,
            mec="black",
            mew=0.6,
            ecolor=colour,
            elinewidth=1.3,
            capsize=3,
            alpha=0.9,
            zorder=3,
        )
    front = pareto_front([(lat, acc) for lat, acc, _ in coords])
    fx, fy = [coords[i][0] for i in front], [coords[i][1] for i in front]
    ax.step(fx, fy, where="post", color="black", lw=1.0, alpha=0.6, zorder=2)
    ax.scatter(fx, fy, s=260, facecolors="none", edgecolors="black", lw=1.1, zorder=4)
    ax.grid(True, which="major", alpha=0.3)


def _break_marks(left: Any, right: Any) -> None:
    """Hide the facing spines of a broken axis and draw the two slanted break marks."""
    left.spines["right"].set_visible(False)
    right.spines["left"].set_visible(False)
    right.tick_params(axis="y", left=False, labelleft=False)
    marks = {"marker": [(-1, -2), (1, 2)], "ms": 10, "ls": "none", "color": "k", "mew": 1}
    left.plot([1, 1], [0, 1], transform=left.transAxes, clip_on=False, **marks)
    right.plot([0, 0], [0, 1], transform=right.transAxes, clip_on=False, **marks)


def _panel(sub: Any, items: list, metric: str, ranges: list, colours: _Colours) -> list[Any]:
    """One accuracy-latency panel in the subfigure ``sub``: one axes per latency range, the
    same y; returns the axes."""
    title, n_key = _PANELS[metric]
    pts = [r for _, r in items if r[metric] is not None]
    widths = [math.log10(hi / lo) + 0.6 if lo > 0 else 1.0 for lo, hi in ranges]
    axes = sub.subplots(
        1,
        len(ranges),
        sharey=True,
        squeeze=False,
        width_ratios=widths,
        gridspec_kw={"wspace": 0.04},
    )[0]
    for ax, (lo, hi) in zip(axes, ranges, strict=True):
        ax.set_label(metric)
        _draw(ax, pts, metric, colours)
        _fit_x(ax, lo, hi)
    _fit_y(axes[0], [(r["p50_b1_ms"], r[metric], r[f"{metric}_ci95"]) for r in pts])
    if len(axes) == 2:
        _break_marks(*axes)
    ns = {r[n_key] for r in pts if r[n_key]}
    sub.suptitle(title + (f", n = {ns.pop()}" if len(ns) == 1 else ""), fontsize=10)
    axes[0].set_ylabel(f"{title} (%), bars: 95% interval")
    scale = "log scale" + (", axis broken" if len(axes) == 2 else "") if ranges[0][0] > 0 else ""
    axes[0].set_xlabel(f"latency, batch 1, p50 (ms{', ' + scale if scale else ''})")
    return list(axes)


def _box(cx: float, cy: float, d: tuple[float, float], dist: float, size: tuple[float, float]):
    """The pixel box of a label ``size`` (pixels) whose near side sits ``dist`` pixels from
    ``(cx, cy)`` in direction ``d``; with its alignment."""
    (dx, dy), (w, h) = d, size
    ha = "left" if dx > 0.3 else "right" if dx < -0.3 else "center"
    va = "bottom" if dy > 0.3 else "top" if dy < -0.3 else "center"
    x0 = cx + dx * dist - (0 if ha == "left" else w if ha == "right" else w / 2)
    y0 = cy + dy * dist - (0 if va == "bottom" else h if va == "top" else h / 2)
    return (x0, y0, x0 + w, y0 + h), ha, va


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return w * h if w > 0 and h > 0 else 0.0


def _best_place(
    cx: float, cy: float, size: tuple[float, float], taken: list, frame: Any, ppp: float
):
    """The first place (nearest first) whose box overlaps nothing taken and stays in the
    frame, else the one overlapping least: ``(box, ha, va, direction, distance in points)``."""
    best = None
    for dist in _DISTANCES:
        for d in _DIRECTIONS:
            box, ha, va = _box(cx, cy, d, dist * ppp, size)
            inside = (
                frame.x0 <= box[0]
                and box[2] <= frame.x1
                and frame.y0 <= box[1]
                and box[3] <= frame.y1
            )
            cost = sum(_overlap(box, t) for t in taken) + (0 if inside else 1e6)
            if best is None or cost < best[0]:
                best = (cost, box, ha, va, d, dist)
        if best[0] == 0:
            break
    return best[1:]


def _place_numbers(fig: Any, ax: Any, labels: list[tuple[float, float, float, float, str]]) -> None:
    """Write each label ``(x, y, y_lo, y_hi, text)`` (data units) next to its point where it
    overlaps no marker, interval bar, earlier label or the axes' edge (or overlaps least),
    with a thin leader line when it sits away from its point."""
    ppp = fig.dpi / 72
    frame = ax.get_window_extent()
    r = _RING * ppp
    taken = []
    for x, y, lo, hi, _ in labels:
        cx, cy = ax.transData.transform((x, y))
        (_, ylo), (_, yhi) = ax.transData.transform([(x, lo), (x, hi)])
        taken += [(cx - r, cy - r, cx + r, cy + r), (cx - 2, ylo, cx + 2, yhi)]
    for x, y, _, _, text in labels:
        cx, cy = ax.transData.transform((x, y))
        size = ((0.62 * _NUMBER_SIZE * len(text) + 2) * ppp, (_NUMBER_SIZE + 2) * ppp)
        box, ha, va, d, dist = _best_place(cx, cy, size, taken, frame, ppp)
        taken.append(box)
        ann = ax.annotate(
            text,
            (x, y),
            xytext=(d[0] * dist, d[1] * dist),
            textcoords="offset points",
            ha=ha,
            va=va,
            fontsize=_NUMBER_SIZE,
            fontweight="bold",
            arrowprops={"arrowstyle": "-", "lw": 0.6, "color": "0.35", "shrinkA": 0, "shrinkB": 5}
            if dist > _DISTANCES[0]
            else None,
            zorder=5,
        )
        ann.set_in_layout(False)


def _legends(fig: Any, items: list[tuple[int, dict[str, Any]]], colours: _Colours) -> None:
    """The numbered table of artifacts below the panels and the key to colours and markers."""
    from matplotlib.lines import Line2D

    robust = any(r["worst_case_acc"] is not None for _, r in items)
    handles, texts = [], []
    for k, r in items:
        shape = "s" if r["purifier"] else "o"
        colour = colours(r["precision"])
        handles.append(
            Line2D([], [], marker=shape, ls="none", ms=7, color=colour, mec="black", mew=0.6)
        )
        figures = (f"robust {pct(r['worst_case_acc'])}%, " if robust else "") + (
            f"clean {pct(r['clean_acc'])}%, {r['p50_b1_ms']:.3g} ms"
        )
        texts.append(f"{_number(k, r)}: {plot_text(r['label'])} ({figures})")
    ncol = 1 if len(items) <= 4 else 2 if len(items) <= 16 else 3
    fig.legend(handles, texts, loc="outside lower center", ncols=ncol, fontsize=8, frameon=False)
    keys, names = [], []
    for precision in dict.fromkeys(r["precision"] for _, r in items):
        keys.append(Line2D([], [], marker="o", ls="none", ms=7, color=colours(precision)))
        names.append(plot_text(precision or "precision unknown"))
    for shape, name in (("o", "classifier"), ("s", "with purifier")):
        if any((r["purifier"]) == (shape == "s") for _, r in items):
            keys.append(Line2D([], [], marker=shape, ls="none", ms=7, mfc="white", mec="black"))
            names.append(name)
    keys.append(Line2D([], [], marker="o", ls="-", ms=13, mfc="none", mec="black", color="0.4"))
    names.append("Pareto front")
    if any(w["batch"] == 1 for _, r in items for w in r["latency_warnings"]):
        keys.append(Line2D([], [], ls="none"))
        names.append(f"{WARNED} latency varied\n(see report.md)")
    fig.legend(
        keys,
        names,
        loc="outside right upper",
        fontsize=8,
        title="key",
        title_fontsize=8,
        frameon=False,
    )


def pareto_figure(rows: list[dict[str, Any]], threat: str | None) -> Any | None:
    """Accuracy against batch-1 latency for every row that has both; None when none has.

    Args:
        rows: The report's rows (fractions, with ``*_ci95`` intervals); row ``k`` (from 1) is
            drawn as number ``k``.
        threat: The threat model's one-line summary, or None (no robust figures).

    Returns:
        The figure: a worst-case robust panel and a clean panel when any row has robust
        figures, else the clean panel alone. Each panel's axes carry its metric as their label
        (``ax.get_label()``), one axes per side of a broken latency axis.
    """
    items = [
        (k, r)
        for k, r in enumerate(rows, 1)
        if r["p50_b1_ms"] is not None
        and (r["clean_acc"] is not None or r["worst_case_acc"] is not None)
    ]
    if not items:
        return None
    metrics = [m for m in _PANELS if any(r[m] is not None for _, r in items)]
    colours = _Colours()
    ranges = latency_ranges([r["p50_b1_ms"] for _, r in items])
    ncol = 1 if len(items) <= 4 else 2 if len(items) <= 16 else 3
    width = 6.2 * len(metrics) + 1.6
    height = 4.6 + 0.2 * math.ceil(len(items) / ncol)
    fig = plt().figure(figsize=(width, height), dpi=120, layout="constrained")
    subs = fig.subfigures(1, len(metrics), squeeze=False)[0]
    panels = [
        (_panel(sub, items, m, ranges, colours), m) for sub, m in zip(subs, metrics, strict=True)
    ]
    title = (
        f"Threat model: {plot_text(threat)}"
        if threat and "worst_case_acc" in metrics
        else "No robust figures (the bench ran without --robust): clean accuracy against latency"
    )
    # about 12 characters an inch at 9 points, kept left of the key
    fig.suptitle(textwrap.fill(title, width=int(12 * 6.2 * len(metrics))), fontsize=9)
    _legends(fig, items, colours)
    fig.draw_without_rendering()  # the layout fixes the axes' place before pixels are read
    for axes, metric in panels:
        for ax, (lo, hi) in zip(axes, ranges, strict=True):
            labels = []
            for k, r in items:
                if r[metric] is None or not lo <= r["p50_b1_ms"] <= hi:
                    continue
                ci = r[f"{metric}_ci95"] or [r[metric], r[metric]]
                labels.append(
                    (r["p50_b1_ms"], 100 * r[metric], 100 * ci[0], 100 * ci[1], _number(k, r))
                )
            _place_numbers(fig, ax, labels)
    return fig

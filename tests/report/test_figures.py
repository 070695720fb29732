"""advedge report's pictures, read from the Matplotlib figures before they are saved: numbered
markers that do not overlap, interval bars, fitted axes, a broken axis for a latency outlier,
the threat model, a clean plot without robust figures, and training panels without undrawn
legend entries."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
from matplotlib.text import Text
from report_docs import THREAT_V2, many, write_bench, write_run

from advedge.report import build_report
from advedge.report.build import _read_inputs
from advedge.report.pareto import latency_ranges, log_ticks, pareto_figure
from advedge.report.plots import plt, training_figure

PNG = b"\x89PNG\r\n\x1a\n"


def _figure(tmp_path: Path, doc: dict):
    rows, benches, _ = _read_inputs([write_bench(tmp_path / "bench", doc)])
    tm = benches[0].threat_model
    return rows, pareto_figure(rows, tm and tm["summary"])


def _axes(fig, label: str) -> list:
    return [ax for ax in fig.axes if ax.get_label() == label]


def _numbers(axes: list) -> list:
    return [t for ax in axes for t in ax.texts]


@pytest.fixture
def twelve(tmp_path):
    rows, fig = _figure(tmp_path, many(12))
    yield rows, fig
    plt().close(fig)


def test_twelve_artifacts_get_numbers_that_do_not_overlap(twelve):
    _rows, fig = twelve
    fig.canvas.draw()
    for metric in ("worst_case_acc", "clean_acc"):
        labels = _numbers(_axes(fig, metric))
        assert sorted(t.get_text() for t in labels) == sorted([*map(str, range(1, 12)), "12†"])
        boxes = [Text.get_window_extent(t) for t in labels]  # the text, not its leader line
        for a, b in itertools.combinations(boxes, 2):
            assert not a.overlaps(b), (a, b)
    (table,) = [leg for leg in fig.legends if len(leg.texts) == 12]
    texts = [t.get_text() for t in table.texts]
    assert texts[0].startswith("1: m0 fp32 onnxruntime (robust ")
    assert texts[11].startswith("12†: purifier+m11 int8 onnxruntime")


def test_an_outlier_breaks_the_latency_axis_instead_of_squashing_the_rest(twelve):
    _rows, fig = twelve
    left, right = _axes(fig, "worst_case_acc")
    assert left.get_xscale() == right.get_xscale() == "log"
    lo, hi = left.get_xlim()
    assert lo < 0.1 and 0.5 < hi < 1.0  # the 0.1-0.5 ms points fill the left part
    lo, hi = right.get_xlim()
    assert lo < 276 < hi and lo > 100
    assert "axis broken" in left.get_xlabel()
    assert latency_ranges([0.1, 0.2, 0.5, 276.0]) == [(0.1, 0.5), (276.0, 276.0)]
    assert latency_ranges([0.1, 0.3, 1.0, 3.0, 10.0]) == [(0.1, 10.0)]  # no wide gap
    assert latency_ranges([0.0, 5.0]) == [(0.0, 5.0)]  # no log axis for 0 ms
    assert log_ticks(276.0, 276.0) == [200.0, 276.0]  # a lone point still gets two ticks
    assert log_ticks(0.1, 0.5) == [0.1, 0.2, 0.5]
    # no label beside a tick it would print over ("2" and "2.13" read "22.13")
    assert log_ticks(2.13, 2.13) == [2.0]


def test_the_y_axis_is_fitted_to_the_interval_bars(twelve):
    rows, fig = twelve
    for metric in ("worst_case_acc", "clean_acc"):
        ax = _axes(fig, metric)[0]
        lows = [100 * r[f"{metric}_ci95"][0] for r in rows]
        highs = [100 * r[f"{metric}_ci95"][1] for r in rows]
        y0, y1 = ax.get_ylim()
        assert y0 <= min(lows) and max(highs) <= y1  # every bar in view
        assert y0 > 0 and (y1 - y0) < 1.5 * (max(highs) - min(lows))  # and not 0-100
        bars = [c for c in ax.containers if c.has_yerr]
        assert len(bars) == 12  # one interval bar per artifact


def test_the_front_and_the_threat_model_are_on_the_figure(twelve):
    _rows, fig = twelve
    assert THREAT_V2["summary"] in fig.get_suptitle().replace("\n", " ")
    ax = _axes(fig, "worst_case_acc")[0]
    (step,) = [line for line in ax.lines if line.get_drawstyle() == "steps-post"]
    assert len(step.get_xdata()) >= 2  # a staircase through the front members


def test_without_robust_figures_a_clean_plot_is_drawn(tmp_path):
    _rows, fig = _figure(tmp_path, many(3, robust=False))
    try:
        assert _axes(fig, "worst_case_acc") == [] and len(_axes(fig, "clean_acc")) == 2
        assert fig.get_suptitle().startswith("No robust figures")
    finally:
        plt().close(fig)
    out = tmp_path / "report"
    doc = build_report([tmp_path / "bench"], out)
    assert (out / "pareto.png").read_bytes()[:8] == PNG and doc["files"]["pareto"]


def test_one_artifact_gets_one_unbroken_axis_per_panel(tmp_path):
    _rows, fig = _figure(tmp_path, many(1))
    try:
        (ax,) = _axes(fig, "worst_case_acc")
        assert ax.get_xscale() == "log" and [t.get_text() for t in ax.texts] == ["1"]
        assert log_ticks(0.1, 0.1) == [0.1]  # its own latency is labelled
    finally:
        plt().close(fig)


def _runs(tmp_path: Path) -> dict:
    cfg = {"eval_n": 256, "eval_steps": 10, "eps": 8 / 255, "norm": "Linf"}
    head = "epoch,train_loss,train_acc,test_clean_acc,test_pgd_acc,lr,seconds"
    teacher = write_run(
        tmp_path / "teacher",
        head,
        ["1,2.2,0.3,0.3,0.1,0.1,1", "2,2.0,0.4,0.4,0.15,0.1,1"],
        {"method": "pgd-at", **cfg},
    )
    student = write_run(
        tmp_path / "student",
        head,
        ["1,0.15,0.3,0.25,0.08,0.1,1", "2,0.12,0.4,0.3,0.1,0.1,1"],
        {"method": "ard", "teacher": "t", **cfg},
    )
    purifier = write_run(
        tmp_path / "purifier",
        "epoch,g_loss,d_loss,inv_loss,test_clean_acc,test_clean_acc_no_g,"
        "test_greybox_pgd_acc,test_pgd_acc_no_g,seconds",
        ["1,2.6,0.25,0.02,0.6,0.7,0.3,0.05,1", "2,2.5,0.25,0.01,0.62,0.7,0.31,0.05,1"],
        {"method": "ipcm", "eval_n": 128, "eps": 8 / 255, "classifier": "x"},
    )
    bare = write_run(
        tmp_path / "bare", "epoch,train_loss,test_clean_acc,test_pgd_acc", ["1,1.0,0.5,"]
    )
    _, _, runs = _read_inputs([teacher, student, purifier, bare])
    return runs


def test_training_panels_separate_losses_and_list_only_drawn_lines(tmp_path):
    fig = training_figure(_runs(tmp_path))
    try:
        (acc,) = _axes(fig, "accuracy")
        drawn = {line.get_label(): line for line in acc.lines}
        legend = [t.get_text() for t in acc.get_legend().texts]
        assert set(legend) == set(drawn)  # no entry without a line
        for label in legend:
            ys = drawn[label].get_ydata()
            assert len(ys) and all(math.isfinite(y) for y in ys), label
        assert "purifier: PGD" not in legend and "bare: PGD" not in legend  # columns they lack
        assert {"teacher: PGD", "purifier: grey-box PGD through G", "bare: clean"} <= set(legend)
        title = acc.get_title()
        assert "teacher: n = 256, PGD-10 (Linf eps 8/255)" in title
        assert "purifier: n = 128, grey-box PGD-10" in title
        losses = {ax.get_label() for ax in fig.axes if ax.get_label().startswith("loss:")}
        assert losses == {
            "loss:train_loss:pgd-at",
            "loss:train_loss:ard",
            "loss:train_loss:bare",
            "loss:g_loss:ipcm",
            "loss:d_loss:ipcm",
            "loss:inv_loss:ipcm",
        }
        for ax in fig.axes:  # CE (~2) and ADD (~0.1) never share an axis
            assert len(ax.lines) == 1 or ax.get_label() == "accuracy"
    finally:
        plt().close(fig)


def test_the_training_table_states_held_out_n_attack_and_intervals(tmp_path):
    runs = _runs(tmp_path)
    bench = write_bench(tmp_path / "bench", many(2))
    out = tmp_path / "report"
    doc = build_report([bench, *(tmp_path / name for name in runs)], out)
    md = (out / "report.md").read_text()
    assert "| teacher | pgd-at | 2 | 256 | 40.0 [34.0, 45.9] | 15.0 [11.0, 19.7] | PGD-10 " in md
    assert "| bare | - | 1 | - | 50.0 | - | - |" in md
    assert doc["run_summaries"]["purifier"]["robust_acc"] == 0.31
    assert (out / "training.png").read_bytes()[:8] == PNG

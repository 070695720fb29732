"""Matplotlib on the Agg backend, saving a figure, and the training curves.

:func:`training_figure` draws one full-width panel of held-out accuracies (the held-out n and
attack of each run in its title, the legend beside it) and below it one panel per loss column
and training method, so that losses of different scales (CE ~2, a distillation loss ~0.1, a GAN
generator loss ~2.5) never share an axis. A column a run does not have draws no line and has no
legend entry. Each figure is returned before it is saved, so a test can read its axes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from advedge.errors import MissingDependencyError
from advedge.report.inputs import Run
from advedge.report.text import plot_text

__all__ = ["plt", "save_png", "training_figure"]


def plt() -> Any:
    """``matplotlib.pyplot`` on the Agg backend.

    Raises:
        MissingDependencyError: matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as pyplot
    except ImportError:
        raise MissingDependencyError(
            "advedge report needs matplotlib", "pip install 'advedge[report]'"
        ) from None
    return pyplot


def save_png(fig: Any, path: Path) -> None:
    """Save a figure as PNG and close it."""
    try:
        fig.savefig(path, format="png")
    finally:
        plt().close(fig)


# ------------------------------------------------------------------------------ training
_ACC_COLUMNS = {  # column: (what it is, line style)
    "test_clean_acc": ("clean", "-"),
    "test_pgd_acc": ("PGD", "--"),
    "test_greybox_pgd_acc": ("grey-box PGD through G", "--"),
    "test_clean_acc_no_g": ("clean without G", ":"),
    "test_pgd_acc_no_g": ("PGD without G", "-."),
}


def _curve(run: Run, column: str) -> tuple[list[float], list[float]]:
    """Epochs and values of one column, over the epochs that have it."""
    xs, ys = [], []
    for i, m in enumerate(run.metrics):
        if column in m:
            xs.append(m.get("epoch", i + 1))
            ys.append(m[column])
    return xs, ys


def _accuracy_panel(ax: Any, runs: dict[str, Run], colour: dict[str, str]) -> None:
    """Every held-out accuracy column of every run, the held-out n and attack in the title."""
    notes = []
    for name, run in runs.items():
        for column, (what, style) in _ACC_COLUMNS.items():
            what = "clean through G" if run.purifier and column == "test_clean_acc" else what
            xs, ys = _curve(run, column)
            if xs:
                ax.plot(
                    xs,
                    [100 * y for y in ys],
                    ls=style,
                    marker="o",
                    ms=3,
                    color=colour[name],
                    label=plot_text(f"{name}: {what}"),
                )
        if run.held_out_n or run.attack:
            n = f"n = {run.held_out_n}" if run.held_out_n else "n not recorded"
            notes.append(plot_text(f"{name}: {n}, {run.attack or 'attack not recorded'}"))
    ax.set_title("\n".join(["held-out accuracy", *notes]), fontsize=8)
    ax.set_ylabel("accuracy (%)")


def _loss_panels(runs: dict[str, Run]) -> dict[tuple[str, str], list[str]]:
    """(loss column, method) -> runs: losses of different methods never share an axis."""
    panels: dict[tuple[str, str], list[str]] = {}
    for name, run in runs.items():
        columns = dict.fromkeys(k for m in run.metrics for k in m if k.endswith("_loss"))
        for column in columns:
            panels.setdefault((column, run.method or name), []).append(name)
    return panels


def training_figure(runs: dict[str, Run]) -> Any | None:
    """Training curves: a full-width panel of held-out accuracies, then one panel per loss column
    and method (three to a row); None when no run has any."""
    from matplotlib.ticker import MaxNLocator

    has_acc = any(_curve(run, c)[0] for run in runs.values() for c in _ACC_COLUMNS)
    losses = _loss_panels(runs)
    if not has_acc and not losses:
        return None
    ncols = max(1, min(3, len(losses)))
    loss_rows = math.ceil(len(losses) / ncols)
    rows = int(has_acc) + loss_rows
    fig = plt().figure(
        figsize=(4.8 * max(ncols, 2), 3.4 * rows + 0.3), dpi=120, layout="constrained"
    )
    grid = fig.add_gridspec(rows, ncols)
    cycle = [f"C{i}" for i in range(10)]
    colour = {name: cycle[i % 10] for i, name in enumerate(runs)}
    drawn = []
    if has_acc:
        ax = fig.add_subplot(grid[0, :])
        ax.set_label("accuracy")
        _accuracy_panel(ax, runs, colour)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
        drawn.append(ax)
    for k, ((column, method), names) in enumerate(losses.items()):
        ax = fig.add_subplot(grid[int(has_acc) + k // ncols, k % ncols])
        ax.set_label(f"loss:{column}:{method}")
        for name in names:
            xs, ys = _curve(runs[name], column)
            ax.plot(xs, ys, marker="o", ms=3, color=colour[name], label=plot_text(name))
        ax.set_title(plot_text(f"{column} ({method})"), fontsize=9)
        ax.set_ylabel("loss")
        ax.legend(fontsize=7)
        drawn.append(ax)
    for ax in drawn:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
    return fig

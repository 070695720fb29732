"""``advedge report``: one table, a robustness-latency Pareto plot and training curves.

Inputs are bench directories (holding ``bench.json`` from ``advedge bench``, schema
``advedge.bench/1`` or ``/2``) and training run directories (holding ``metrics.csv`` and
``config.yaml``). Outputs, in ``--out``:

- ``report.md``: the threat model under the title; one row per benchmarked artifact: model,
  precision, purifier or not, size, clean accuracy and worst-case robust accuracy (percent, each
  with its 95% Wilson interval) with the attack kinds behind it, p50/p99 latency at batch 1 (a
  dagger where its measurement carries a variation warning, listed below with the machine's
  load) and the throughput at the best batch size; which differences on and next to the Pareto
  front the data can tell apart (exact McNemar on per-example results, else overlapping
  intervals); the robustness of what ships; the training runs;
- ``report.json`` (``advedge.report/2``): the same in fractions, with the threat model;
- ``pareto.png``: accuracy against batch-1 p50 latency with interval bars, robust and clean
  panels (clean only for a bench without ``--robust``), the Pareto front marked;
- ``training.png``: held-out accuracies by epoch (with the held-out n and attack), one panel
  per loss.

Robust accuracy is the per-example worst case the bench measured on the artifact itself
(transfer and query attacks); where a transfer-only figure exceeds the white-box figure of its
FP32 parent, the report says so: that is the precision gap, not extra robustness.

Modules: :mod:`~advedge.report.inputs` (reading), :mod:`~advedge.report.analysis` (front,
McNemar, honesty), :mod:`~advedge.report.text`, :mod:`~advedge.report.markdown`,
:mod:`~advedge.report.plots`, :mod:`~advedge.report.build` (writing, all or nothing).
"""

from advedge.report.analysis import honest_robustness, mcnemar_exact, pareto_front
from advedge.report.build import SCHEMA, build_report
from advedge.report.text import md_escape

__all__ = [
    "SCHEMA",
    "build_report",
    "honest_robustness",
    "mcnemar_exact",
    "md_escape",
    "pareto_front",
]

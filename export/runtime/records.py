"""``bench.csv``: one row per artifact and batch size, the figures a spreadsheet wants."""

from __future__ import annotations

import csv
import io
from typing import Any

__all__ = ["CSV_COLUMNS", "bench_csv"]

#: The columns of bench.csv, in order.
CSV_COLUMNS = (
    "artifact",
    "backend",
    "precision",
    "bytes",
    "batch",
    "mean_ms",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "cv",
    "images_per_s",
    "clean_acc",
    "worst_case_acc",
)


def bench_csv(results: list[dict[str, Any]]) -> str:
    """bench.json's ``results`` as CSV text: one row per latency entry (a skipped batch size
    has its batch only), the artifact's accuracies repeated on each."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS), extrasaction="ignore")
    w.writeheader()
    for r in results:
        for lat in r["latency"]:
            w.writerow(
                {**r, **lat, "worst_case_acc": (r.get("robust") or {}).get("worst_case_acc")}
            )
    return buf.getvalue()

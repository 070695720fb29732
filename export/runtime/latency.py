"""Latency of one runner on one batch size: warm-up calls, then timed calls of ``runner.timed``.

mean, p50, p90 and p99 in ms, the coefficient of variation ``cv = std / mean``, throughput
``batch / mean`` in images/s, and for runners that separate them the mean host-to-device, compute
and device-to-host times. Two figures say the timings were disturbed (:func:`latency_warning`):
a cv above :data:`CV_WARN` (the machine was busy or throttling) and a p99 above
:data:`TAIL_WARN` times the p50 (a tail of interrupted calls).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

import numpy as np
from advedge.export.runtime.base import Runner

__all__ = ["CV_WARN", "TAIL_WARN", "latency_stats", "latency_warning", "measure_latency"]

#: The coefficient of variation above which the timings are called unsteady.
CV_WARN = 0.15

#: The p99 / p50 ratio above which the slowest calls are called interrupted (see
#: :func:`latency_warning`).
TAIL_WARN = 2.0


def latency_stats(times_s: Sequence[float], batch: int) -> dict[str, float]:
    """mean/p50/p90/p99 in ms, the coefficient of variation and images/s from per-call times."""
    ms = np.asarray(times_s, dtype=np.float64) * 1e3
    mean = float(ms.mean())
    return {
        "mean_ms": round(mean, 4),
        "p50_ms": round(float(np.percentile(ms, 50)), 4),
        "p90_ms": round(float(np.percentile(ms, 90)), 4),
        "p99_ms": round(float(np.percentile(ms, 99)), 4),
        "cv": round(float(ms.std() / mean) if mean > 0 else 0.0, 4),
        "images_per_s": round(batch / (mean / 1e3), 2) if mean > 0 else 0.0,
        "iters": len(ms),
    }


def measure_latency(
    runner: Runner, x: np.ndarray, batch: int, *, warmup: int, iters: int
) -> dict[str, Any]:
    """Time ``runner.timed`` on a batch of real images; stages averaged where the runner splits them."""
    reps = -(-batch // len(x))
    xb = np.ascontiguousarray(np.concatenate([x] * reps)[:batch])
    for _ in range(warmup):  # the timed path itself: it compiles or captures this very size
        runner.timed(xb)
    totals: list[float] = []
    stages: dict[str, list[float]] = {}
    for _ in range(iters):
        _, times = runner.timed(xb)
        totals.append(times["total_s"])
        for k, v in times.items():
            if k != "total_s":
                stages.setdefault(k, []).append(v)
    out: dict[str, Any] = {"batch": batch, **latency_stats(totals, batch)}
    out["stages_ms"] = {
        k.removesuffix("_s"): round(1e3 * statistics.fmean(v), 4) for k, v in stages.items()
    }
    warning = latency_warning(out)
    if warning:
        out["warning"] = warning
    return out


def latency_warning(stats: dict[str, Any]) -> str | None:
    """What makes these timings doubtful, in one line (None: nothing).

    Two rules, on :func:`latency_stats`' figures:

    - ``cv > CV_WARN`` (0.15): the calls' times spread widely (the machine was busy or
      throttling);
    - ``p99 > TAIL_WARN * p50`` (2x): more than one call in a hundred took twice the median
      or longer. Jitter within the cv rule does not do that: were the times normal with
      ``cv <= 0.15``, the p99 would lie near ``p50 * (1 + 2.33 cv) <= 1.35 p50``. Calls that
      take twice as long lost their CPU for about a whole call (descheduled for a time slice,
      an interrupt, page faults). The cv can miss them: a tail of 1.1% of the calls at 2.1x
      the median, on otherwise steady calls, gives a cv of 0.11.
    """
    problems = []
    cv, p50, p99 = stats.get("cv", 0.0), stats.get("p50_ms", 0.0), stats.get("p99_ms", 0.0)
    if cv > CV_WARN:
        problems.append(f"high variation (cv {cv:.2f} > {CV_WARN})")
    if p50 > 0 and p99 > TAIL_WARN * p50:
        problems.append(
            f"a slow tail (p99 {p99:.3g} ms is {p99 / p50:.1f}x the p50 {p50:.3g} ms, "
            f"> {TAIL_WARN:g}x: calls were interrupted)"
        )
    if not problems:
        return None
    return " and ".join(problems) + ": the machine was busy or throttling"

"""Latency of one runner on one batch size: warm-up calls, then timed calls of ``runner.timed``.

mean, p50, p90 and p99 in ms, the coefficient of variation ``cv = std / mean`` (a warning above
:data:`CV_WARN`: the machine was busy or throttling), throughput ``batch / mean`` in images/s, and
for runners that separate them the mean host-to-device, compute and device-to-host times.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

import numpy as np
from advedge.export.runtime.base import Runner

__all__ = ["CV_WARN", "latency_stats", "measure_latency"]

CV_WARN = 0.15


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
    for _ in range(warmup):
        runner.run(xb)
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
    if out["cv"] > CV_WARN:
        out["warning"] = (
            f"high variation (cv {out['cv']:.2f} > {CV_WARN}): the machine was busy or throttling"
        )
    return out

"""The checks ``advedge doctor`` puts each opened backend through (:data:`BACKEND_CHECKS`).

- ``parity``: the runner's logits against PyTorch's (the model itself, eager, FP32 on the CPU)
  on seeded images: the max |difference| within the precision's parity tolerance of
  :data:`~advedge.export.precisions.PRECISIONS` (``advedge export``'s gate);
- ``timer``: ``runner.timed()`` measures execution. Every call's stages are positive and sum to
  at most the wall time around it. On the CPU the compute stage (the total, for a runner that
  does not split its time) is most of that wall time. On a GPU, CUDA events (torch's, else
  pycuda's) bracket the call on the current stream: the timed compute must not be far below
  the event time, and a device-wide synchronise right after the call must find the GPU idle
  (the runner synchronised before it stopped its clock). The median of several calls, after
  two untimed ones, is judged.

A check takes a :class:`BackendJob` and returns an :class:`Outcome`; raising counts as failing
(its message is the reason). Adding one is a function registered with
``@BACKEND_CHECKS.register("name")``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from advedge.errors import MissingDependencyError
from advedge.export._deps import require
from advedge.export.runtime import Runner
from advedge.registry import Registry

__all__ = [
    "BACKEND_CHECKS",
    "CPU_COMPUTE_SHARE",
    "GPU_EVENT_SHARE",
    "GPU_IDLE_FLOOR_S",
    "GPU_IDLE_SHARE",
    "BackendJob",
    "GpuClock",
    "Outcome",
    "check_parity",
    "check_timer",
    "gpu_clock",
]

#: The timer check's thresholds. On the CPU the compute stage (or the total, for a runner that
#: does not split its time) must be at least this share of the wall time around ``timed()``.
CPU_COMPUTE_SHARE = 0.5
#: On a GPU the timed compute must be at least this share of the CUDA-event time of the call:
#: a timer that stops before the GPU has finished measures little more than the launch.
GPU_EVENT_SHARE = 0.1
#: On a GPU, a device synchronise after ``timed()`` returned may take at most this share of the
#: call's wall time (or :data:`GPU_IDLE_FLOOR_S`, if more): else work was still running.
GPU_IDLE_SHARE = 0.1
GPU_IDLE_FLOOR_S = 5e-4


@dataclass
class Outcome:
    """What a check found: passed or not, one line saying why, and its figures."""

    ok: bool
    detail: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class BackendJob:
    """One opened backend under check.

    Attributes:
        backend: The backend's name.
        runner: Its runner on the artifact.
        x: The float32 NCHW images in [0, 1].
        reference: PyTorch's logits of ``x`` (eager, FP32, CPU).
        precision: The artifact's precision (its parity tolerance applies).
        device: The ``--device`` resolved (``cpu``, ``cuda:0``).
        repeats: Timed calls the timer check judges.
    """

    backend: str
    runner: Runner
    x: np.ndarray
    reference: np.ndarray
    precision: str
    device: str
    repeats: int = 5


#: A check: the job -> its outcome. Raising is a failure too (its message is the reason).
Check = Callable[[BackendJob], Outcome]
#: The checks each opened backend goes through, in order.
BACKEND_CHECKS: Registry[Check] = Registry("doctor check")


@BACKEND_CHECKS.register("parity")
def check_parity(job: BackendJob) -> Outcome:
    """The runner's logits against PyTorch's: max |difference| within the precision's parity
    tolerance (``advedge export``'s gate), and the same top-1 class."""
    from advedge.export.precisions import PRECISIONS

    tolerance = PRECISIONS[job.precision].tolerance.max_abs_logits
    out = np.asarray(job.runner.run(job.x), dtype=np.float64)
    if out.shape != job.reference.shape:
        return Outcome(False, f"logits of shape {out.shape}, PyTorch's are {job.reference.shape}")
    if not np.all(np.isfinite(out)):
        return Outcome(False, "non-finite logits", {"max_abs": None, "tolerance": tolerance})
    max_abs = float(np.max(np.abs(out - job.reference)))
    agree = float(np.mean(out.argmax(1) == job.reference.argmax(1)))
    data = {"max_abs": max_abs, "tolerance": tolerance, "agreement": agree, "n": len(job.x)}
    within = max_abs <= tolerance
    detail = (
        f"max |Δ logits| {max_abs:.1e} {'<=' if within else '>'} {tolerance:.0e} "
        f"({job.precision}) on {len(job.x)} images, top-1 agreement {agree:.0%}"
    )
    return Outcome(within, detail, data)


class GpuClock:
    """CUDA events around one call on the current stream, and how long a device-wide
    synchronise takes after it (torch's CUDA, else pycuda's)."""

    def __init__(self, start: Callable[[], Any], stop: Callable[[Any], tuple[float, float]]):
        self._start, self._stop = start, stop
        self._token: Any = None

    def start(self) -> None:
        self._token = self._start()

    def stop(self) -> tuple[float, float]:
        """``(event seconds, seconds a device synchronise took after the call)``."""
        return self._stop(self._token)


def _torch_clock(device: str, stream: Any = None) -> GpuClock | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    dev = torch.device(device) if device.startswith("cuda") else torch.device("cuda", 0)
    if stream is not None and not isinstance(stream, torch.cuda.Stream):
        return None  # a pycuda stream: pycuda's events

    def on() -> Any:
        return stream if stream is not None else torch.cuda.current_stream(dev)

    def start() -> Any:
        begin = torch.cuda.Event(enable_timing=True)
        begin.record(on())
        return begin

    def stop(begin: Any) -> tuple[float, float]:
        end = torch.cuda.Event(enable_timing=True)
        end.record(on())
        t0 = time.perf_counter()
        torch.cuda.synchronize(dev)
        idle = time.perf_counter() - t0
        end.synchronize()
        return begin.elapsed_time(end) / 1e3, idle

    return GpuClock(start, stop)


def _pycuda_clock(stream: Any = None, activated: Any = None) -> GpuClock | None:
    """pycuda's events on the runner's stream, with the runner's context current (a TensorRT
    runner whose buffers are pycuda's: it retains its device's primary context and pushes it
    around each call, so there is no current context outside ``activated``)."""
    if stream is None or activated is None:
        return None
    try:
        drv = require("pycuda.driver", purpose="CUDA events")
    except MissingDependencyError:
        return None
    if not isinstance(stream, drv.Stream):
        return None  # a torch stream where torch sees no GPU: no events to record on it

    def start() -> Any:
        with activated():
            return drv.Event().record(stream)

    def stop(begin: Any) -> tuple[float, float]:
        with activated():
            end = drv.Event().record(stream)
            t0 = time.perf_counter()
            drv.Context.synchronize()
            idle = time.perf_counter() - t0
            end.synchronize()
            return end.time_since(begin) / 1e3, idle

    return GpuClock(start, stop)


def gpu_clock(device: str, runner: Any = None) -> GpuClock | None:
    """The CUDA event clock for ``runner`` on ``device``, its events recorded on the stream the
    runner works on (a TensorRT runner's own stream: events on another stream would bracket none
    of its work): torch's events where torch sees a GPU and the stream is torch's (or the runner
    has none: the current stream), else pycuda's; None where neither (host clock only)."""
    backend = getattr(runner, "backend", None)
    stream = getattr(backend, "stream", None)
    return _torch_clock(device, stream) or _pycuda_clock(
        stream, getattr(backend, "activated", None)
    )


def _stage_problems(times: dict[str, float], wall: float) -> list[str]:
    """What is wrong with one ``timed()`` result: a stage that is not positive, or stages that
    add up to more than the wall time around the call."""
    slack = 1e-6 + 1e-6 * wall
    problems = [f"{k} = {v:.3g} s is not positive" for k, v in times.items() if not v > 0]
    stages = sum(v for k, v in times.items() if k != "total_s")
    if stages > times.get("total_s", stages) + slack:
        problems.append(f"the stages sum to {stages * 1e3:.3f} ms, over total_s")
    if times.get("total_s", 0.0) > wall + slack:
        problems.append(
            f"total_s {times['total_s'] * 1e3:.3f} ms is over the {wall * 1e3:.3f} ms wall time "
            "around the call"
        )
    return problems


def _measure(job: BackendJob, clock: GpuClock | None) -> dict[str, Any]:
    """One timed call: its stages, the wall time around it and, on a GPU, the event time and
    how long the GPU stayed busy after it returned."""
    if clock is not None:
        clock.start()
    t0 = time.perf_counter()
    _, times = job.runner.timed(job.x)
    wall = time.perf_counter() - t0
    sample: dict[str, Any] = {"times": dict(times), "wall_s": wall}
    if clock is not None:
        sample["event_s"], sample["busy_after_s"] = clock.stop()
    return sample


@BACKEND_CHECKS.register("timer")
def check_timer(job: BackendJob) -> Outcome:
    """``runner.timed()`` measures execution (see the module docstring); the median of
    ``repeats`` calls after two untimed ones is judged, and every call's stages."""
    gpu = not job.runner.info.host_compute
    clock = gpu_clock(job.device, job.runner) if gpu else None
    for _ in range(2):
        job.runner.timed(job.x)
    samples = [_measure(job, clock) for _ in range(job.repeats)]
    for s in samples:
        problems = _stage_problems(s["times"], s["wall_s"])
        if problems:
            return Outcome(False, "; ".join(problems), {"samples": samples})
    split = "compute_s" in samples[0]["times"]
    measured = statistics.median(s["times"]["compute_s" if split else "total_s"] for s in samples)
    wall = statistics.median(s["wall_s"] for s in samples)
    what = "compute" if split else "total (no stage split)"
    data: dict[str, Any] = {
        "measured": "compute_s" if split else "total_s",
        "measured_s": measured,
        "wall_s": wall,
        "samples": samples,
    }
    text = f"{what} {measured * 1e3:.3f} ms of {wall * 1e3:.3f} ms wall"
    if not gpu:
        share = measured / wall if wall > 0 else 0.0
        data["share"] = share
        ok = share >= CPU_COMPUTE_SHARE
        verdict = "" if ok else f", under {CPU_COMPUTE_SHARE:.0%}: the timer misses the work"
        return Outcome(ok, f"{text} ({share:.0%}){verdict}", data)
    if clock is None:
        return Outcome(True, f"{text}; no CUDA event timer here: host clock only", data)
    event = statistics.median(s["event_s"] for s in samples)
    busy = statistics.median(s["busy_after_s"] for s in samples)
    data |= {"event_s": event, "busy_after_s": busy}
    text += f", CUDA events {event * 1e3:.3f} ms"
    if measured < GPU_EVENT_SHARE * event:
        return Outcome(
            False,
            f"{text}: the timed {what} is under {GPU_EVENT_SHARE:.0%} of the event time "
            "(the timer stops before the GPU finishes: no synchronise)",
            data,
        )
    if busy > max(GPU_IDLE_SHARE * wall, GPU_IDLE_FLOOR_S):
        return Outcome(
            False,
            f"{text}: the GPU was still busy {busy * 1e3:.3f} ms after timed() returned "
            "(it did not synchronise)",
            data,
        )
    return Outcome(True, f"{text}; the GPU was idle when it returned", data)

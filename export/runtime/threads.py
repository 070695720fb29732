"""The CPU threads a benchmark computes with, and whether the machine was quiet enough to trust it.

Latency on a CPU depends on how many threads a backend's kernels split each call over, and on
whether those threads get a CPU of their own. Left to themselves, PyTorch and ONNX Runtime each
start one intra-op thread per core; on a machine other processes load, those threads wait for
each other at every kernel's barrier, and an eager ResNet-8 at batch 1 took 276 ms instead of
0.68 ms with one thread, with a steady coefficient of variation (0.02) that no variation warning
catches. So ``advedge bench`` sets the count explicitly, records it with the load average before
and after the run, and warns when the load says the threads had to share CPUs:

- :func:`apply_threads` sets the intra-op thread count of this process: PyTorch's (and its
  inter-op pool to one thread, where that can still be set) and the one every ONNX Runtime
  session created afterwards uses (:func:`configured_threads`);
- :func:`load_average` reads the 1, 5 and 15 minute load averages;
- :func:`busy_warning` states the rule for a machine too busy to time on.

Torch-free at import: torch is imported only by :func:`apply_threads`, and only if installed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from advedge.errors import UsageError

__all__ = [
    "BUSY_MARGIN",
    "MAX_THREADS",
    "apply_threads",
    "busy_warning",
    "check_threads",
    "configured_threads",
    "cpus_available",
    "default_threads",
    "load_average",
    "reset_threads",
]

log = logging.getLogger(__name__)

#: The largest ``--threads`` accepted: far above any machine advedge targets, low enough that a
#: typo (``--threads 40000``) is refused rather than starting tens of thousands of threads.
MAX_THREADS = 1024

#: CPUs' worth of demand from other processes tolerated before a run counts as busy (see
#: :func:`busy_warning`): an idle desktop or server keeps its load average below about half a
#: CPU with its background daemons.
BUSY_MARGIN = 0.5

# The intra-op thread count for ONNX Runtime sessions created from now on (None: not set).
_configured: int | None = None

_TOPOLOGY = Path("/sys/devices/system/cpu")


def cpus_available() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one, else all)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS and Windows have no affinity call
        return max(1, os.cpu_count() or 1)


def _cpu_ids() -> Iterable[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return range(os.cpu_count() or 1)


def _physical_cores(cpus: Iterable[int], root: Path = _TOPOLOGY) -> int | None:
    """Distinct (package, core) pairs among ``cpus``, from Linux's sysfs topology; None where
    it cannot be read."""
    cores = set()
    for cpu in cpus:
        topo = root / f"cpu{cpu}" / "topology"
        try:
            package = (topo / "physical_package_id").read_text().strip()
            core = (topo / "core_id").read_text().strip()
        except OSError:
            return None
        cores.add((package, core))
    return len(cores) or None


def default_threads() -> int:
    """The thread count used when none is given: one per physical core this process may run on.

    That is the count PyTorch and ONNX Runtime pick on a dedicated machine, which is what a
    deployed artifact runs on; it is made explicit so it is recorded and the same for every
    backend. Hyperthread siblings are not counted: they share a core's arithmetic units, so a
    second thread on a core adds contention, not compute, for these dense kernels. Where the
    topology cannot be read (not Linux), every CPU this process may use counts as a core. A
    busy machine gets a warning (:func:`busy_warning`) rather than fewer threads, so that the
    default does not change with the load of the moment. A positive ``OMP_NUM_THREADS`` in the
    environment wins, as it does for PyTorch's own default.
    """
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) >= 1:
        return min(int(env), MAX_THREADS)
    return min(cpus_available(), _physical_cores(_cpu_ids()) or cpus_available())


def check_threads(n: int | None) -> None:
    """Refuse a thread count outside ``[1, MAX_THREADS]`` (None is the default).

    Raises:
        UsageError: ``n`` out of range.
    """
    if n is None:
        return
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_THREADS:
        raise UsageError(
            f"--threads must lie in [1, {MAX_THREADS}], got {n}",
            f"this process may use {cpus_available()} CPUs; leave --threads out for one per core",
        )


def _set_torch(n: int) -> dict[str, Any]:
    """Set PyTorch's intra-op threads to ``n`` and its inter-op pool to one thread; returns
    the counts in effect (None where torch is not installed)."""
    try:
        import torch
    except ImportError:
        return {"torch": None, "torch_interop": None}
    torch.set_num_threads(n)
    try:
        # inference runs one graph at a time: a second pool only competes for the CPUs
        torch.set_num_interop_threads(1)
    except RuntimeError:  # once inter-op work has started, or after an earlier call
        log.debug("torch's inter-op threads stay at %d", torch.get_num_interop_threads())
    return {"torch": torch.get_num_threads(), "torch_interop": torch.get_num_interop_threads()}


def apply_threads(n: int | None) -> dict[str, Any]:
    """Set the intra-op thread count every backend of this process computes with.

    Sets PyTorch's intra-op threads (``torch.set_num_threads``, if torch is installed) and its
    inter-op pool to one thread (possible only before inter-op work has started and once per
    process; otherwise it stays as it is, and the count in effect is returned), and stores the
    count for ONNX Runtime sessions created afterwards (:func:`configured_threads`, which
    :class:`~advedge.export.runtime.onnxruntime.OrtRunner` reads). TensorRT computes on the GPU
    and is unaffected.

    Args:
        n: Threads per backend, 1 to :data:`MAX_THREADS`; None: :func:`default_threads`.

    Returns:
        ``{"requested": n, "threads": the count applied, "torch": torch's intra-op threads now
        (None without torch), "torch_interop": its inter-op threads now, "onnxruntime_intra_op":
        the count ONNX Runtime sessions will use, "cpus_available": CPUs this process may use}``.

    Raises:
        UsageError: ``n`` outside ``[1, MAX_THREADS]``.
    """
    global _configured
    check_threads(n)
    threads = default_threads() if n is None else n
    applied = {"requested": n, "threads": threads, **_set_torch(threads)}
    _configured = threads
    applied["onnxruntime_intra_op"] = threads
    applied["cpus_available"] = cpus_available()
    log.debug("threads: %s", applied)
    return applied


def configured_threads() -> int | None:
    """The intra-op thread count :func:`apply_threads` set (None: never called in this
    process; ONNX Runtime then chooses)."""
    return _configured


def reset_threads() -> None:
    """Forget the count :func:`apply_threads` stored (for tests; torch keeps its setting)."""
    global _configured
    _configured = None


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (runnable tasks, averaged), rounded to 0.01; None
    where the OS does not report them."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def busy_warning(
    load: list[float] | None, threads: int, cpus: int, *, after: list[float] | None = None
) -> str | None:
    """A one-line warning when the machine was too busy for its latencies to be trusted.

    The rule: the machine is busy when the 1-minute load average before the run plus this
    run's ``threads`` exceeds the ``cpus`` available by more than :data:`BUSY_MARGIN` (other
    processes then want more than the CPUs this run leaves free, so some of its threads wait
    for a CPU, and a thread that waits stalls every other one at the next barrier); or when the
    1-minute load average after the run exceeds ``cpus + BUSY_MARGIN`` (tasks queued for a CPU
    while it ran; that figure includes this run's own threads, which alone never exceed
    ``cpus`` unless ``threads`` does). No load figure (an OS without one): no warning.

    Args:
        load: :func:`load_average` before the run.
        threads: The intra-op threads the run computed with.
        cpus: The CPUs available to it (:func:`cpus_available`).
        after: :func:`load_average` after the run, if taken.

    Returns:
        The warning, or None for a quiet machine.
    """
    if load and load[0] + threads > cpus + BUSY_MARGIN:
        return (
            f"busy machine: 1-minute load average {load[0]:.2f} before the run plus its "
            f"{threads} thread{'s' if threads != 1 else ''} exceeds the {cpus} CPUs available, so "
            "latencies include waiting for a CPU; time on a quiet machine or with fewer --threads"
        )
    if after and after[0] > cpus + BUSY_MARGIN:
        return (
            f"busy machine: 1-minute load average {after[0]:.2f} after the run exceeds the "
            f"{cpus} CPUs available, so latencies include waiting for a CPU; time on a quiet "
            "machine or with fewer --threads"
        )
    return None

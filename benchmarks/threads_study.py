"""The threads study: eager PyTorch at batch 1 with the default threads against one thread,
on the machine as found and with a competing load on every CPU (issue 14, section 4).

A ResNet-8 (random weights: latency does not depend on them) runs through advedge's own
``TorchRunner`` on one CIFAR-10 test image. Each thread count is applied with
``advedge.export.runtime.threads.apply_threads`` (None: the default, one thread per physical
core; then 1), in alternating blocks of calls so that drift in the machine's load favours
neither. "loaded" adds one busy-looping process per CPU, started and stopped by this script.
Each cell records the load average before and after it, the latency warnings and the busy-machine
warning bench would give, and the ratio default p50 / one-thread p50.

    python benchmarks/threads_study.py [--rounds 5] [--calls 40] [--tag cpu]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time
from typing import Any

import numpy as np
import torch
from _common import cifar_batch, publish, stamp
from advedge.export.runtime.latency import latency_stats, latency_warning
from advedge.export.runtime.threads import (
    apply_threads,
    busy_warning,
    cpus_available,
    default_threads,
    load_average,
)
from advedge.export.runtime.torch import TorchRunner

from advedge.models import create_model
from advedge.utils import atomic_write_text


def _spin() -> None:
    while True:  # one CPU's worth of competing work until terminated
        pass


def _block(runner: TorchRunner, x: np.ndarray, calls: int, cap_s: float) -> list[float]:
    """Up to ``calls`` timed calls, stopping early after ``cap_s`` seconds."""
    times: list[float] = []
    start = time.perf_counter()
    for _ in range(calls):
        times.append(runner.timed(x)[1]["total_s"])
        if time.perf_counter() - start > cap_s:
            break
    return times


def _condition(
    name: str, runner: TorchRunner, x: np.ndarray, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Both thread counts under one condition, in alternating blocks."""
    counts = {"default": None, "1": 1}
    times: dict[str, list[float]] = {k: [] for k in counts}
    load_before = load_average()
    for _ in range(args.rounds):
        for label, n in counts.items():
            apply_threads(n)
            for _ in range(args.warmup):
                runner(x)
            times[label] += _block(runner, x, args.calls, args.cap_s)
    load_after = load_average()
    rows = []
    for label, n in counts.items():
        threads = default_threads() if n is None else n
        stats = latency_stats(times[label], 1)
        rows.append(
            {
                "condition": name,
                "threads": f"{label} ({threads})",
                **stats,
                "load_before": load_before,
                "load_after": load_after,
                "latency_warning": latency_warning(stats),
                "busy_warning": busy_warning(
                    load_before, threads, cpus_available(), after=load_after
                ),
            }
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=40, help="timed calls per block")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls before each block")
    p.add_argument("--cap-s", type=float, default=5.0, help="seconds a block may take at most")
    p.add_argument("--tag", default="cpu")
    args = p.parse_args()

    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=10)
    runner = TorchRunner(model, device="cpu")
    xb, _, source = cifar_batch(1, torch.device("cpu"))
    x = np.ascontiguousarray(xb.numpy())

    rows = _condition("as found", runner, x, args)
    spinners = []
    for _ in range(cpus_available()):
        proc = mp.get_context("spawn").Process(target=_spin, daemon=True)
        proc.start()
        spinners.append(proc)
    try:
        time.sleep(2.0)  # let the spinners start
        rows += _condition(f"loaded (+{len(spinners)} busy processes)", runner, x, args)
    finally:
        for proc in spinners:
            proc.terminate()
            proc.join()

    ratios = {}
    for cond in dict.fromkeys(r["condition"] for r in rows):
        default, one = (r for r in rows if r["condition"] == cond)
        ratios[cond] = round(default["p50_ms"] / one["p50_ms"], 2)
    payload = {
        "benchmark": f"threads_{args.tag}",
        **stamp(),
        "settings": {**vars(args), "model": "resnet8", "batch": 1, "images": source},
        "note": "other workers ran on this machine throughout ('as found' is not a quiet machine)",
        "rows": rows,
        "default_over_one_thread_p50": ratios,
    }
    cols = ["condition", "threads", "p50_ms", "p99_ms", "cv", "iters", "load_before", "load_after"]
    path = publish(f"threads_{args.tag}", payload, rows, cols, ratios)
    notes = [
        "",
        f"Note: {payload['note']}. Load averages are 1/5/15 minutes.",
        "",
        "Default threads over one thread, p50: "
        + "; ".join(f"{c}: {r}x" for c, r in ratios.items()),
        "",
    ]
    notes += [
        f"- {r['condition']}, {r['threads']}: {r['busy_warning']}"
        for r in rows
        if r["busy_warning"]
    ]
    atomic_write_text(path, path.read_text() + "\n".join(notes) + "\n")


if __name__ == "__main__":
    main()

"""What advedge's PyTorch runner adds to a call: ``TorchRunner.timed`` against the plain call.

The reference is what a script would write to time one batch: ``torch.from_numpy``, the module
under ``no_grad``, ``.numpy()``. advedge's side is the runner's timed path (its shape policy,
stage clocks, synchronisation). Same model, same batch, alternating rounds, one thread; the
ratio is the runner's p50 over the reference's (goal: at most 1.05x at batch 1, where a fixed
overhead shows most). Issue 16 put the shape policy on this path.

    python benchmarks/runner_overhead.py [--model resnet8] [--iters 2000]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from _common import stamp, write_results
from advedge.export.runtime.torch import TorchRunner

from advedge.models import create_model


def _p50(fn, x: np.ndarray, iters: int) -> float:
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet8")
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    model = create_model(args.model, num_classes=10).eval()
    runner = TorchRunner(model)

    def plain(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(x)).numpy()

    def timed(x: np.ndarray) -> np.ndarray:
        return runner.timed(x)[0]

    rows, out = [], {}
    for batch in (1, 64):
        x = np.random.default_rng(0).random((batch, 3, 32, 32), dtype=np.float32)
        iters = args.iters if batch == 1 else max(20, args.iters // 50)
        for fn in (plain, timed):  # warm-up
            _p50(fn, x, 20)
        ref, eng = [], []
        for _ in range(args.rounds):
            ref.append(_p50(plain, x, iters))
            eng.append(_p50(timed, x, iters))
        r, e = statistics.median(ref), statistics.median(eng)
        out[batch] = {"plain_p50_ms": r * 1e3, "runner_p50_ms": e * 1e3, "ratio": e / r}
        rows.append(
            {
                "batch": batch,
                "plain call p50 ms": round(r * 1e3, 4),
                "TorchRunner.timed p50 ms": round(e * 1e3, 4),
                "ratio": f"{e / r:.3f}x",
            }
        )
        print(rows[-1], flush=True)
    payload = {"benchmark": "runner_overhead", **stamp(), "settings": vars(args), "results": out}
    write_results(
        "runner_overhead_cpu_" + args.model,
        payload,
        rows,
        ["batch", "plain call p50 ms", "TorchRunner.timed p50 ms", "ratio"],
        notes=["Goal: the runner at most 1.05x the plain call at batch 1 (one thread, eager)."],
    )


if __name__ == "__main__":
    main()

"""The bench study: the deployed artifacts of one student, side by side, through ``advedge bench``.

Runs advedge's own ``run_bench`` on the PyTorch student (eager), its FP32, FP16 and INT8 ONNX
(the TensorRT-form QDQ and the ONNX Runtime CPU form) and the fused purifier + student, in one
process on this machine, and checks the bench issue's CPU goals:

* ONNX Runtime FP32 at least 2x faster than PyTorch eager at batch 1 for the student;
* INT8 QDQ against FP32 as in the export study (1.5x at batch 1, 2x at batch 64-128).

With ``--robust`` it adds transfer (PGD-20, APGD-CE crafted on the FP32 PyTorch student) and the
Square query attack on each artifact, and the per-example worst case.

    python benchmarks/bench_study.py --student RUN --artifacts DIR [--purifier RUN] [--robust]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from _common import DATA, publish, stamp
from advedge.export.runtime.bench import BenchOptions, run_bench


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--student", required=True)
    p.add_argument("--purifier")
    p.add_argument(
        "--artifacts", nargs="+", required=True, help=".onnx files to bench beside the student"
    )
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--batch-sizes", default="1,8,32,128")
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--robust", action="store_true")
    p.add_argument("--query-n", type=int, default=None, help="Square on the first N images [all]")
    p.add_argument("--n-queries", type=int, default=500)
    p.add_argument("--tag", default="cpu")
    args = p.parse_args()
    opts = BenchOptions(
        artifacts=[args.student, *args.artifacts],
        data=str(args.data),
        batch_sizes=[int(b) for b in args.batch_sizes.split(",")],
        warmup=args.warmup,
        iters=args.iters,
        robust=args.robust,
        n=args.n,
        query_n=args.query_n,
        n_queries=args.n_queries,
        model=args.student,
        purifier=args.purifier,
        out=str(Path("/tmp/advedge-bench-study")),
    )
    doc = run_bench(opts, status=lambda m: print(m, flush=True))
    rows: list[dict[str, Any]] = []
    by = {r["name"]: r for r in doc["results"]}
    torch_b1 = next(lat for lat in by[Path(args.student).name]["latency"] if lat["batch"] == 1)
    for r in doc["results"]:
        rob = r.get("robust") or {}
        for lat in r["latency"]:
            if "p50_ms" not in lat:
                continue
            rows.append(
                {
                    "artifact": r["name"],
                    "backend": r["backend"],
                    "precision": r["precision"],
                    "batch": lat["batch"],
                    "p50_ms": lat["p50_ms"],
                    "p99_ms": lat["p99_ms"],
                    "cv": lat["cv"],
                    "images_per_s": lat["images_per_s"],
                    "clean_acc": round(100 * r["clean_acc"], 2),
                    "worst_case_acc": None
                    if rob.get("worst_case_acc") is None
                    else round(100 * rob["worst_case_acc"], 2),
                    "transfer_acc": None
                    if rob.get("worst_case_transfer_acc") is None
                    else round(100 * rob["worst_case_transfer_acc"], 2),
                }
            )
    fp32 = next(
        (
            r
            for r in doc["results"]
            if r["name"].endswith(".fp32.onnx") and "purified" not in r["name"]
        ),
        None,
    )
    goals: dict[str, Any] = {}
    if fp32:
        ort_b1 = next(lat for lat in fp32["latency"] if lat["batch"] == 1)
        ratio = round(torch_b1["p50_ms"] / ort_b1["p50_ms"], 2)
        goals["ort_fp32_vs_torch_eager_b1"] = {"ratio": ratio, "goal": 2.0, "met": ratio >= 2.0}
        for r in doc["results"]:
            if ".int8" in r["name"] and "purified" not in r["name"]:
                for lat in r["latency"]:
                    ref = next(
                        (
                            f
                            for f in fp32["latency"]
                            if f["batch"] == lat["batch"] and "p50_ms" in f
                        ),
                        None,
                    )
                    if ref and "p50_ms" in lat:
                        goals[f"{r['name']}_vs_fp32_b{lat['batch']}"] = round(
                            ref["p50_ms"] / lat["p50_ms"], 2
                        )
    payload = {"benchmark": f"bench_{args.tag}", **stamp(), "goals": goals, "bench": doc}
    cols = [
        "artifact",
        "backend",
        "precision",
        "batch",
        "p50_ms",
        "p99_ms",
        "cv",
        "images_per_s",
        "clean_acc",
        "transfer_acc",
        "worst_case_acc",
    ]
    publish(f"bench_{args.tag}", payload, rows, cols, goals)


if __name__ == "__main__":
    main()

"""The export study: what each deployed precision costs and keeps, on real CIFAR-10.

For a distilled student, a ResNet-18-class student, the purifier alone and the fused
purifier -> student graph, it runs advedge's own export pipeline (``export_artifacts``: FP32
ONNX with the parity gate, FP16, and INT8 as symmetric per-channel QDQ calibrated on 512
stratified training images) and measures, for every artifact:

* file size;
* ONNX Runtime CPU latency at batch 1 and batch 64: the median of many runs after warm-up, with
  the precisions of one model timed in alternating rounds so machine drift favours none, and the
  speed-up over the FP32 ONNX of the same model in the same run;
* clean accuracy and transfer robust accuracy (PGD-20 crafted on the FP32 PyTorch model, ``n``
  test images) from the export's own accuracy report;
* which ops ONNX Runtime actually ran in INT8 after its graph optimisations (QLinearConv and
  friends versus float Conv), to explain a speed-up that falls short.

Goal on a CPU for the ResNet-18-class student: INT8 >= 1.5x FP32 at batch 1 and >= 2x at batch
64, clean and transfer-robust accuracy within 1 point of FP32.

    python benchmarks/export_study.py --scale mini --student RUN --resnet18 RUN --purifier RUN
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from _common import DATA, publish, stamp
from advedge.export.exporter import ExportOptions, export_artifacts
from advedge.export.runtime import OrtRunner

GOAL = {"speedup_b1": 1.5, "speedup_b64": 2.0, "max_drop_points": 1.0}


def ort_ops(path: Path) -> dict[str, int]:
    """Op counts of the graph ONNX Runtime runs after its optimisations (CPU provider)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        opts.log_severity_level = 3
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        model = onnx.load(opts.optimized_model_filepath)
    return dict(Counter(n.op_type for n in model.graph.node))


def latencies(
    paths: dict[str, Path], x: np.ndarray, *, batch: int, rounds: int, per_round: int
) -> dict[str, dict[str, float]]:
    """Median seconds per call for each artifact, timed in alternating rounds."""
    runners = {k: OrtRunner(p) for k, p in paths.items()}
    xb = np.ascontiguousarray(x[:batch])
    for r in runners.values():  # warm-up
        for _ in range(max(3, per_round)):
            r(xb)
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(rounds):
        for k, r in runners.items():
            for _ in range(per_round):
                t0 = time.perf_counter()
                r(xb)
                times[k].append(time.perf_counter() - t0)
    return {k: {"median_ms": 1e3 * statistics.median(t), "runs": len(t)} for k, t in times.items()}


def _export(opts: ExportOptions, failures: list[str]) -> dict[str, Any]:
    """Export; when the parity gate refuses, record why and export again with the INT8
    adversarial-agreement floor lowered to 0.75, so the artifact can still be measured."""
    from advedge.export.parity import ParityError

    try:
        return export_artifacts(opts).to_dict()
    except ParityError as exc:
        failures.append(str(exc))
        print(f"parity gate refused: {exc}; retrying with --parity-min-agree 0.75", flush=True)
        opts.parity_min_agree = 0.75
        rep = export_artifacts(opts).to_dict()
        rep["parity_gate_override"] = {"min_agree": 0.75, "refused_with_defaults": str(exc)}
        return rep


def export_model(label: str, work: Path, args: argparse.Namespace, **kw: Any) -> dict[str, Any]:
    """fp32 + int8 (+ the accuracy report), fp16, int8 for ONNX Runtime's CPU kernels, and for the
    student int8 with adversarial calibration; parity-gate refusals are recorded."""
    failures: list[str] = []
    base = {
        "data": str(args.data),
        "report_n": args.n,
        "parity_n": 256,
        "calib_n": args.calib_n,
        "seed": 0,
        **kw,
    }
    int8 = {"calib_data": str(args.data), "calib_method": args.calib_method}
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    out["int8"] = _export(
        ExportOptions(out=str(work / label), precision="int8", **int8, **base), failures
    )
    out["int8"]["seconds"] = round(time.perf_counter() - t0, 1)
    out["fp16"] = _export(ExportOptions(out=str(work / label), precision="fp16", **base), failures)
    out["int8-ortcpu"] = _export(
        ExportOptions(
            out=str(work / f"{label}-ortcpu"),
            precision="int8",
            int8_target="onnxruntime-cpu",
            **int8,
            **base,
        ),
        failures,
    )
    if args.adv_calib and label == "student":  # robustness-aware calibration, one model
        out["int8-advcalib"] = _export(
            ExportOptions(
                out=str(work / f"{label}-advcalib"),
                precision="int8",
                calib_mix_adv=0.5,
                **int8,
                **base,
            ),
            failures,
        )
    out["parity_gate_failures"] = failures
    return out


def rows_for(
    label: str, reports: dict[str, Any], x: np.ndarray, args: argparse.Namespace
) -> list[dict[str, Any]]:
    arts: dict[str, dict[str, Any]] = {}
    for key, rep in reports.items():
        if key == "parity_gate_failures":
            continue
        for a in rep["artifacts"]:
            if a["precision"] == "fp32" and key != "int8":
                continue  # one FP32 reference per model
            name = "fp32" if a["precision"] == "fp32" else key
            arts.setdefault(name, a)
    paths = {k: Path(a["path"]) for k, a in arts.items()}
    b1 = latencies(paths, x, batch=1, rounds=args.rounds, per_round=args.per_round_b1)
    b64 = latencies(paths, x, batch=64, rounds=args.rounds, per_round=args.per_round_b64)
    fp32_report = next(
        (a.get("accuracy_report") for a in arts.values() if a.get("accuracy_report")), None
    )
    rows = []
    for k, a in arts.items():
        acc = (a.get("accuracy_report") or {}).get("accuracy", {})
        if k == "fp32" and fp32_report:
            acc_k = fp32_report["accuracy"]["fp32"]
        else:
            acc_k = acc.get(a["precision"], {})
        row = {
            "model": label,
            "precision": k,
            **size_and_latency(a, k, b1, b64),
            "clean_acc": None if not acc_k else round(100 * acc_k["clean_acc"], 2),
            "transfer_acc": None if not acc_k else round(100 * acc_k["transfer_robust_acc"], 2),
            **adversarial_parity(a),
            "runs_b1": b1[k]["runs"],
            "runs_b64": b64[k]["runs"],
        }
        if a["precision"] == "int8":
            row["int8_reference_clean_acc"] = (
                round(100 * acc["int8_reference"]["clean_acc"], 2)
                if "int8_reference" in acc
                else None
            )
            ops = ort_ops(Path(a["path"]))
            row["ort_ops"] = ops
            row["fp32_nodes"] = a.get("calibration", {}).get("fp32_nodes")
        rows.append(row)
    fp32 = next(r for r in rows if r["precision"] == "fp32")
    for r in rows:
        if r["clean_acc"] is not None and fp32["clean_acc"] is not None:
            r["d_clean"] = round(r["clean_acc"] - fp32["clean_acc"], 2)
            r["d_transfer"] = round(r["transfer_acc"] - fp32["transfer_acc"], 2)
    return rows


def goal_for(row: dict[str, Any]) -> dict[str, Any]:
    """The export issue's CPU goal, checked on one INT8 row of the ResNet-18-class student."""
    d_clean, d_transfer = row.get("d_clean") or 0.0, row.get("d_transfer") or 0.0
    return {
        "goal": GOAL,
        "speedup_b1": row["b1_speedup"],
        "speedup_b64": row["b64_speedup"],
        "d_clean": d_clean,
        "d_transfer": d_transfer,
        "met_b1": row["b1_speedup"] >= GOAL["speedup_b1"],
        "met_b64": row["b64_speedup"] >= GOAL["speedup_b64"],
        "met_accuracy": abs(d_clean) <= GOAL["max_drop_points"]
        and abs(d_transfer) <= GOAL["max_drop_points"],
    }


def size_and_latency(
    artifact: dict[str, Any], form: str, b1: dict[str, Any], b64: dict[str, Any]
) -> dict[str, Any]:
    """Size in MB, median latency at batch 1 and 64, and the speed-up over fp32 at each."""
    return {
        "size_mb": round(artifact["bytes"] / 1e6, 3),
        "b1_ms": round(b1[form]["median_ms"], 3),
        "b1_speedup": round(b1["fp32"]["median_ms"] / b1[form]["median_ms"], 2),
        "b64_ms": round(b64[form]["median_ms"], 2),
        "b64_speedup": round(b64["fp32"]["median_ms"] / b64[form]["median_ms"], 2),
    }


def adversarial_parity(artifact: dict[str, Any]) -> dict[str, Any]:
    """The parity gate's figures on adversarial inputs."""
    figures = artifact["parity"]["figures"]["adversarial"]
    return {"parity_adv_max_abs": figures["max_abs"], "parity_adv_agree": figures["agreement"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scale", default="mini")
    p.add_argument("--student", required=True, help="distilled student run")
    p.add_argument("--resnet18", required=True, help="ResNet-18-class student run")
    p.add_argument("--purifier", required=True, help="purifier run trained for --student")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--work", type=Path, default=Path("/tmp/advedge-export-study"))
    p.add_argument("--n", type=int, default=1000, help="test images of the accuracy report")
    p.add_argument("--calib-n", type=int, default=512)
    p.add_argument("--calib-method", default="entropy")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--per-round-b1", type=int, default=40)
    p.add_argument("--per-round-b64", type=int, default=4)
    p.add_argument("--no-adv-calib", dest="adv_calib", action="store_false")
    args = p.parse_args()

    from advedge.data import load_dataset

    test = load_dataset(args.data).test
    x = np.ascontiguousarray(test.x[:64].transpose(0, 3, 1, 2).astype(np.float32) / 255.0)
    models = {
        "student": {"model": args.student},
        "resnet18": {"model": args.resnet18},
        "fused": {"model": args.student, "purifier": args.purifier, "fuse": True},
    }
    rows: list[dict[str, Any]] = []
    reports: dict[str, Any] = {}
    for label, kw in models.items():
        print(f"== {label}", flush=True)
        reports[label] = export_model(label, args.work, args, **kw)
        rows += rows_for(label, reports[label], x, args)
        print(json.dumps(rows[-1]), flush=True)
    # the purifier alone: size and latency (its accuracy is the fused graph's)
    pur = export_artifacts(
        ExportOptions(
            model=args.student,
            purifier=args.purifier,
            out=str(args.work / "pair"),
            precision="int8",
            data=str(args.data),
            calib_data=str(args.data),
            report_n=64,
            parity_n=128,
            calib_n=args.calib_n,
        )
    ).to_dict()
    pur_paths = {
        a["precision"]: Path(a["path"]) for a in pur["artifacts"] if a["kind"] == "purifier"
    }
    b1 = latencies(pur_paths, x, batch=1, rounds=args.rounds, per_round=args.per_round_b1)
    b64 = latencies(pur_paths, x, batch=64, rounds=args.rounds, per_round=args.per_round_b64)
    for k in pur_paths:
        a = next(a for a in pur["artifacts"] if a["kind"] == "purifier" and a["precision"] == k)
        rows.append(
            {
                "model": "purifier",
                "precision": k,
                **size_and_latency(a, k, b1, b64),
                **adversarial_parity(a),
            }
        )
    r18 = {r["precision"]: r for r in rows if r["model"] == "resnet18"}
    goals = {form: goal_for(r18[form]) for form in ("int8", "int8-ortcpu") if form in r18}
    payload = {
        "benchmark": f"export_{args.scale}",
        **stamp(),
        "settings": {k: str(v) for k, v in vars(args).items()},
        "goal_resnet18": goals,
        "rows": rows,
        "reports": reports,
    }
    cols = [
        "model",
        "precision",
        "size_mb",
        "b1_ms",
        "b1_speedup",
        "b64_ms",
        "b64_speedup",
        "clean_acc",
        "transfer_acc",
        "d_clean",
        "d_transfer",
        "parity_adv_agree",
    ]
    publish(f"export_{args.scale}", payload, rows, cols, goals)


if __name__ == "__main__":
    main()

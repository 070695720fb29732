"""The INT8 robustness study: does the shipped INT8 model keep the FP32 student's robustness?

One student, four artifacts, measured by ``advedge bench --robust`` on the same test images:

* **FP32**: the PyTorch student (its transfer set is white-box on it: the reference), and its
  FP32 ONNX (ONNX Runtime's FP32 latency, and the white-box attack through the replica of a
  float graph);
* **PTQ**: INT8 (TensorRT form) calibrated on clean images;
* **PTQ, adversarial calibration**: the same with half the calibration images adversarial
  (``--calib-mix-adv 0.5``);
* **QAT**: the robust quantisation-aware fine-tune (``advedge qat``), given as its INT8 ONNX.

Each gets clean accuracy, the transfer worst case (the standard suite and CW-20 crafted on the
FP32 student), the white-box attack on the artifact's own arithmetic (APGD-CE and APGD-T on a
replica of its Q/DQ graph, scored on the artifact), Square on the artifact, and the
per-example worst case over all of them, each with its 95% Wilson interval, plus ONNX Runtime
latency at batch 1 and 64. Pairwise exact McNemar tests compare each INT8 artifact's worst case
with the FP32 student's. Goal: QAT's worst case within 1 point of the FP32 student's white-box
worst case, at INT8 speed.

    python benchmarks/int8_robustness.py --student RUN --qat QAT.int8.onnx [--n 1000]

The exports and one bench folder per artifact go under ``--work``: the FP32 student's first
(it crafts the transfer set, which the others are given with ``--transfer-set``), then the INT8
artifacts, ``--jobs`` at a time with one thread each. A finished bench folder is reused, so a
rerun resumes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from _common import DATA, stamp, write_results

from advedge.report.analysis import mcnemar_exact

ROOT = Path(__file__).resolve().parents[1]


def _export(student: str, data: str, out: Path, extra: list[str]) -> Path:
    """``advedge export --precision int8`` into ``out`` (reused when already there): the INT8
    TensorRT-form ONNX."""
    found = sorted(out.glob("*.int8.onnx"))
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "advedge", "export", "--model", student, "--out", str(out)]
    cmd += ["--precision", "int8", "--data", data, "--json", *extra]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"export failed: {res.stderr.strip()[-400:]}")
    return sorted(out.glob("*.int8.onnx"))[0]


def _bench(artifact: str, out: Path, args: list[str]) -> None:
    """``advedge bench`` of one artifact into ``out``; skipped where ``out`` holds a finished
    bench.json (a rerun resumes)."""
    if (out / "bench.json").is_file():
        return
    cmd = [sys.executable, "-m", "advedge", "bench", "--artifact", artifact, *args]
    cmd += ["--out", str(out)]
    print("$", " ".join(cmd), flush=True)
    log = out.parent / f"{out.name}.log"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        res = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=f, check=False)
    if res.returncode != 0:
        raise SystemExit(f"bench of {artifact} failed with exit {res.returncode}: see {log}")


def _bench_all(artifacts: list[str], out: Path, args: list[str]) -> None:
    """One ``advedge bench`` of several artifacts (latency only) into ``out``, reused."""
    if (out / "bench.json").is_file():
        return
    cmd = [sys.executable, "-m", "advedge", "bench"]
    for artifact in artifacts:
        cmd += ["--artifact", artifact]
    subprocess.run([*cmd, *args, "--out", str(out)], stdout=subprocess.DEVNULL, check=True)


def _flags(text: str | None) -> list[bool]:
    return [c == "1" for c in (text or "")]


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}"


def _ci(ci: list[float] | None) -> str:
    return "" if not ci else f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _row(name: str, r: dict[str, Any]) -> dict[str, Any]:
    """One artifact's figures from its bench.json entry."""
    rob = r.get("robust") or {}
    attacks = rob.get("attacks") or []

    def last(kind: str) -> dict[str, Any] | None:
        hits = [a for a in attacks if a.get("kind") == kind]
        return hits[-1] if hits else None

    white = last("white-box-artifact")
    query = last("query")
    lat = {x["batch"]: x.get("p50_ms") for x in r.get("latency", []) if "p50_ms" in x}
    wba = rob.get("white_box_artifact") or {}
    return {
        "artifact": name,
        "precision": r.get("precision"),
        "clean %": _pct(r.get("clean_acc")),
        "clean CI": _ci(r.get("clean_acc_ci95")),
        "transfer worst %": _pct(rob.get("worst_case_transfer_acc")),
        "white-box on artifact %": _pct(white["robust_acc"]) if white else wba.get("status", "-"),
        "query (Square) %": _pct(query["robust_acc"]) if query else "",
        "worst case %": _pct(rob.get("worst_case_acc")),
        "worst CI": _ci(rob.get("worst_case_acc_ci95")),
        "b1 ms": lat.get(1, ""),
        "b64 ms": lat.get(64, ""),
        "replica agreement": (wba.get("parity") or {}).get("agreement", ""),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--student", required=True, help="the FP32 student run directory")
    p.add_argument("--qat", help="the QAT INT8 ONNX (advedge qat's output)")
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--n-iter", type=int, default=100)
    p.add_argument("--n-queries", type=int, default=5000)
    p.add_argument("--batch-sizes", default="1,64")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "int8_study")
    p.add_argument("--tag", default="", help="suffix of the results' name (none: int8_robustness)")
    p.add_argument("--results", type=Path, default=None, help="where the results go")
    p.add_argument("--jobs", type=int, default=2, help="artifacts benched at once (1 thread each)")
    args = p.parse_args()
    work = args.work
    ptq = _export(args.student, args.data, work / "ptq", [])
    adv = _export(args.student, args.data, work / "ptq_adv", ["--calib-mix-adv", "0.5"])
    fp32_onnx = sorted((work / "ptq").glob("*.fp32.onnx"))[0]
    arts = {
        "fp32 (PyTorch)": args.student,
        "fp32 onnx": str(fp32_onnx),
        "ptq int8": str(ptq),
        "ptq int8, adv. calib": str(adv),
    }
    keys = {"fp32 (PyTorch)": "fp32", "fp32 onnx": "fp32_onnx", "ptq int8": "ptq"}
    keys |= {"ptq int8, adv. calib": "ptq_adv", "qat int8": "qat"}
    if args.qat:
        arts["qat int8"] = args.qat
    common = [
        "--data", args.data, "--robust", "--model", args.student, "--n", str(args.n),
        "--n-iter", str(args.n_iter), "--n-queries", str(args.n_queries),
        "--batch-sizes", args.batch_sizes, "--iters", str(args.iters), "--threads", "1", "--json",
    ]  # fmt: skip
    # the FP32 student first: it crafts the transfer set the others are given
    _bench(args.student, work / "bench" / "fp32", common)
    tset = sorted((work / "bench" / "fp32").glob("transfer-*.npz"))[0]
    jobs = [
        (path, work / "bench" / keys[name], [*common, "--transfer-set", str(tset)])
        for name, path in arts.items()
        if keys[name] != "fp32"
    ]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # one process per artifact
        list(pool.map(lambda job: _bench(*job), jobs))
    results = [
        json.loads((work / "bench" / keys[name] / "bench.json").read_text())["results"][0]
        for name in arts
    ]
    doc = json.loads((work / "bench" / "fp32" / "bench.json").read_text())
    # latency once more, every artifact in one process with nothing else running: the robust
    # benches above ran side by side (--jobs), so their timings are not comparable
    timing = [
        "--data", args.data, "--n", "100", "--batch-sizes", args.batch_sizes,
        "--iters", str(args.iters), "--threads", "1", "--json",
    ]  # fmt: skip
    _bench_all(list(arts.values()), work / "bench" / "latency", timing)
    latency = json.loads((work / "bench" / "latency" / "bench.json").read_text())["results"]
    for r, t in zip(results, latency, strict=True):
        r["latency"] = t["latency"]
    rows = [_row(name, r) for name, r in zip(arts, results, strict=True)]
    fp32_flags = _flags((results[0].get("robust") or {}).get("worst_case_flags"))
    for row, r in zip(rows[1:], results[1:], strict=True):
        flags = _flags((r.get("robust") or {}).get("worst_case_flags"))
        if flags and len(flags) == len(fp32_flags):
            only_fp32 = sum(a and not b for a, b in zip(fp32_flags, flags, strict=True))
            only_int8 = sum(b and not a for a, b in zip(fp32_flags, flags, strict=True))
            row["vs fp32 (McNemar p)"] = (
                f"{only_int8}/{only_fp32}, p={mcnemar_exact(only_int8, only_fp32):.2g}"
            )
    fp32_worst = (results[0].get("robust") or {}).get("worst_case_acc")
    qat = next((r for n, r in zip(arts, results, strict=True) if n == "qat int8"), None)
    goal = None
    if qat is not None and fp32_worst is not None:
        gap = 100 * (fp32_worst - (qat.get("robust") or {}).get("worst_case_acc", 0.0))
        goal = {"qat_worst_minus_fp32_points": round(-gap, 2), "met": gap <= 1.0}
    payload = {
        "benchmark": "int8_robustness",
        **stamp(),
        "settings": {**vars(args), "work": str(args.work), "results": str(args.results)},
        "threat_model": doc.get("threat_model"),
        "artifacts": arts,
        "rows": rows,
        "goal": goal,
        "bench_json": {k: str(work / "bench" / keys[k] / "bench.json") for k in arts},
    }
    columns = [*rows[0], "vs fp32 (McNemar p)"]
    notes = [
        f"Threat model: {(doc.get('threat_model') or {}).get('summary', '')}",
        "White-box on artifact: APGD-CE then APGD-T on a replica of the artifact's own Q/DQ "
        "graph (straight-through rounding), every example scored on the artifact itself; "
        "'not applicable' for the PyTorch student, whose transfer set is already white-box.",
        "McNemar: images robust only on the INT8 artifact / only on FP32, exact two-sided p.",
        "Latency: p50 ms, every artifact timed in one bench with nothing else running, one "
        "thread, PyTorch eager for the student and ONNX Runtime's CPU "
        "provider for the ONNX files. The INT8 files are TensorRT's form (Q/DQ placed as "
        "ModelOpt places them), which this provider computes with few int8 kernels, so they are "
        "slower than FP32 here; INT8 speed is TensorRT's, on the device.",
    ]
    if goal is not None:
        notes.append(
            f"Goal (QAT worst case within 1 point of the FP32 student's): "
            f"{'met' if goal['met'] else 'not met'} ({goal['qat_worst_minus_fp32_points']:+.2f} points)."
        )
    kw = {} if args.results is None else {"directory": args.results}
    path = write_results(
        "int8_robustness" + (f"_{args.tag}" if args.tag else ""),
        payload,
        rows,
        columns,
        notes=notes,
        **kw,
    )
    print(path.read_text())


if __name__ == "__main__":
    main()

"""Synthetic bench.json documents (``advedge.bench/1`` and ``/2``) and run directories for the
report's tests: every figure chosen by the test, nothing measured."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from advedge.stats import wilson_interval

PRECISIONS = ("fp32", "fp16", "int8")
THREAT_V2 = {
    "norm": "Linf",
    "eps": 8 / 255,
    "eps_text": "8/255",
    "n": 200,
    "seed": 0,
    "query_n": 200,
    "transfer": [
        {"name": "apgd-ce", "budget": "100 iterations"},
        {"name": "apgd-t", "budget": "9 target classes x 100 iterations"},
        {"name": "cw", "budget": "20 steps"},
    ],
    "query": {"name": "square", "budget": "5000 queries"},
    "summary": "Linf eps 8/255, n = 200, seed 0; transfer: apgd-ce, apgd-t, cw; query: square",
}


def random_flags(rng: np.random.Generator, n: int, p: float) -> str:
    return "".join("1" if v else "0" for v in rng.random(n) < p)


def _latency(p50: float, warning: str | None) -> list[dict[str, Any]]:
    b1: dict[str, Any] = {"batch": 1, "p50_ms": p50, "p99_ms": 1.5 * p50, "images_per_s": 1e3 / p50}
    if warning:
        b1["warning"] = warning
    b8 = {"batch": 8, "p50_ms": 4 * p50, "p99_ms": 6 * p50, "images_per_s": 8e3 / (4 * p50)}
    return [b1, b8]


def artifact(
    i: int,
    *,
    n: int = 200,
    p50: float = 0.2,
    clean: str | None = None,
    worst: str | None = None,
    robust: bool = True,
    schema: int = 2,
    warning: str | None = None,
    precision: str | None = None,
    purifier: bool | None = None,
) -> dict[str, Any]:
    """One ``results`` entry: ``clean``/``worst`` are flag strings (seeded random ones if None);
    the accuracies, intervals and (for schema 1) no flags follow from them."""
    rng = np.random.default_rng(i)
    clean = clean if clean is not None else random_flags(rng, n, 0.8)
    if worst is None:  # surviving every attack needs a clean-correct image
        worst = "".join(
            "1" if c == "1" and v else "0" for c, v in zip(clean, rng.random(n) < 0.25, strict=True)
        )
    precision = precision or PRECISIONS[i % 3]
    purifier = i % 4 == 3 if purifier is None else purifier
    name = f"m{i}.{precision}.onnx"
    entry: dict[str, Any] = {
        "name": name,
        "kind": "fused" if purifier else "classifier",
        "precision": precision,
        "backend": "onnxruntime",
        "bytes": 100_000 + i,
        "clean_acc": clean.count("1") / len(clean),
        "n": len(clean),
        "latency": _latency(p50, warning),
    }
    if robust:
        k = worst.count("1")
        entry["robust"] = {
            "attacks": [
                {"name": "apgd-ce", "kind": "transfer", "n": len(clean), "robust_acc": 0.5},
                {"name": "square", "kind": "query", "n": len(worst), "robust_acc": 0.4},
            ],
            "worst_case_acc": k / len(worst),
            "worst_case_n": len(worst),
            "worst_case_transfer_acc": 0.5,
            "white_box": False,
            "source_sha256": f"{i:064d}",
        }
    if schema == 2:
        entry["label"] = f"{'purifier+' if purifier else ''}m{i} {precision} onnxruntime"
        entry["clean_acc_ci95"] = list(wilson_interval(clean.count("1"), len(clean)))
        entry["clean_flags"] = clean
        if robust:
            rob = entry["robust"]
            rob["worst_case_acc_ci95"] = list(wilson_interval(worst.count("1"), len(worst)))
            rob["worst_case_flags"] = worst
            rob["worst_case_transfer_acc_ci95"] = list(wilson_interval(len(clean) // 2, len(clean)))
            for a in rob["attacks"]:
                a["robust_acc_ci95"] = list(
                    wilson_interval(round(a["robust_acc"] * a["n"]), a["n"])
                )
    return entry


def bench_doc(
    results: list[dict[str, Any]],
    *,
    schema: int = 2,
    robust: bool = True,
    n: int = 200,
    load: bool = True,
) -> dict[str, Any]:
    """A whole bench.json around ``results``."""
    doc: dict[str, Any] = {
        "schema": f"advedge.bench/{schema}",
        "environment": {"cpu": "Test CPU", "gpu": None},
        "settings": {
            "robust": robust,
            "n": n,
            "query_n": None,
            "n_queries": 300,
            "eps": 8 / 255,
            "seed": 0,
        },
        "data": {"path": "data", "split": "test", "n": n},
        "results": results,
        "warnings": [
            f"{r.get('label', r['name'])} batch {lat['batch']}: {lat['warning']}"
            for r in results
            for lat in r["latency"]
            if lat.get("warning")
        ],
    }
    if schema == 2:
        doc["threat_model"] = THREAT_V2 if robust else None
        if load:
            doc["environment"].update(
                load_before=[2.5, 1.25, 0.5], load_after=[3.0, 1.5, 0.75], threads=2
            )
    return doc


def write_bench(folder: Path, doc: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bench.json").write_text(json.dumps(doc), encoding="utf-8")
    return folder


def many(count: int, *, schema: int = 2, robust: bool = True, outlier: bool = True) -> dict:
    """``count`` artifacts between 0.1 and 0.5 ms, the last one a 276 ms outlier (PyTorch eager
    on a busy machine) whose latency carries a variation warning."""
    results = []
    for i in range(count):
        last = outlier and i == count - 1 and count > 1
        p50 = 276.0 if last else 0.1 + 0.4 * i / max(count - 1, 1)
        warning = "high variation (cv 0.40 > 0.15): the machine was busy" if last else None
        results.append(artifact(i, p50=p50, robust=robust, schema=schema, warning=warning))
    return bench_doc(results, schema=schema, robust=robust)


def write_run(
    folder: Path, header: str, rows: list[str], config: dict[str, Any] | None = None
) -> Path:
    """A run directory with metrics.csv (``header`` and ``rows``) and a config.yaml."""
    folder.mkdir(parents=True)
    (folder / "metrics.csv").write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    if config is not None:
        lines = [f"{k}: {json.dumps(v)}" for k, v in config.items()]
        (folder / "config.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder

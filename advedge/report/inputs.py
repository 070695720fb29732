"""The report's inputs: ``bench.json`` (``advedge.bench/1`` and ``/2``) read into one row per
artifact, and training run directories (``metrics.csv``, ``config.yaml``) read into curves.

A row holds fractions (never percent) and, for every accuracy, its 95% interval: the one
bench.json recorded (``advedge.bench/2``) or, failing that, the Wilson interval of
``round(acc * n)`` successes in ``n`` (:func:`advedge.stats.wilson_interval`); None where ``n``
is not recorded. The per-example flags of ``advedge.bench/2`` (``clean_flags``,
``worst_case_flags``: one '0'/'1' per image) are kept under the private keys ``_clean_flags`` and
``_worst_case_flags``, for the paired test of :mod:`advedge.report.analysis`; report.json leaves
them out.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from advedge.config import load_yaml
from advedge.errors import DataError, UsageError
from advedge.stats import wilson_interval

__all__ = [
    "BENCH_SCHEMAS",
    "Bench",
    "Run",
    "eps_text",
    "interval",
    "read_bench",
    "read_run",
    "run_summary",
    "threat_summary",
]

BENCH_SCHEMAS = ("advedge.bench/1", "advedge.bench/2")
_FLAGS = frozenset("01")
# what advedge.bench/1 crafted on the FP32 parent (export/runtime/transfer.py at that schema)
_V1_TRANSFER = {
    "pgd20": ("PGD-20", "20 steps"),
    "apgd-ce": ("APGD-CE", "50 iterations"),
}


@dataclass
class Bench:
    """What one bench.json says beyond its rows: the threat model and the machine's state."""

    source: str
    schema: str
    threat_model: dict[str, Any] | None
    load_before: list[float] | None = None
    load_after: list[float] | None = None
    threads: Any = None
    warnings: list[str] = field(default_factory=list)


@dataclass
class Run:
    """One training run: its ``metrics.csv`` rows and what its ``config.yaml`` says about the
    held-out batch (None where the run does not record it)."""

    name: str
    metrics: list[dict[str, float]]
    method: str | None = None
    purifier: bool = False
    held_out_n: int | None = None
    attack: str | None = None


def eps_text(eps: Any) -> str | None:
    """``8/255`` for an eps that is a whole number of 255ths, else the number; None for None."""
    if not isinstance(eps, (int, float)) or isinstance(eps, bool):
        return None
    k = round(eps * 255)
    return f"{k}/255" if k and abs(eps * 255 - k) < 1e-6 else f"{eps:g}"


def interval(acc: Any, n: Any, given: Any = None, *, what: str = "accuracy") -> list[float] | None:
    """The 95% interval of an accuracy: ``given`` when it is a pair ``[lo, hi]`` of fractions
    around ``acc``, else the Wilson interval of ``round(acc * n)`` successes in ``n``; None when
    ``acc`` or ``n`` is missing.

    Raises:
        DataError: an accuracy outside [0, 1], or a ``given`` that is not ``lo <= acc <= hi``
            within [0, 1].
    """
    if acc is None:
        return None
    if not isinstance(acc, (int, float)) or isinstance(acc, bool) or not 0 <= acc <= 1:
        raise DataError(f"{what} {acc!r} is not a fraction in [0, 1]")
    if given is not None:
        if not (
            isinstance(given, list)
            and len(given) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in given)
            and 0 <= given[0] <= given[1] <= 1
        ):
            raise DataError(f"{what}: its 95% interval {given!r} is not [lo, hi] within [0, 1]")
        if not given[0] - 1e-9 <= acc <= given[1] + 1e-9:
            raise DataError(f"{what} {acc!r} lies outside its 95% interval {given!r}")
        return [float(given[0]), float(given[1])]
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        return None
    return list(wilson_interval(round(acc * n), n))


def _flags(value: Any, n: Any, what: str) -> str | None:
    """A string of '0'/'1' of length ``n`` (when ``n`` is known), or None when absent."""
    if value is None:
        return None
    if not isinstance(value, str) or not value or not set(value) <= _FLAGS:
        raise DataError(f"{what} is not a string of '0' and '1'")
    if isinstance(n, int) and len(value) != n:
        raise DataError(f"{what} holds {len(value)} flags for n = {n} images")
    return value


def threat_summary(tm: dict[str, Any]) -> str:
    """One line stating a threat model: norm, eps, n, seed, the attacks and their budgets."""
    head = [str(tm.get("norm") or "norm not recorded")]
    eps = tm.get("eps_text") or eps_text(tm.get("eps"))
    head.append(f"eps = {eps}" if eps else "eps not recorded")
    if tm.get("n"):
        head.append(f"n = {tm['n']} test images")
    if tm.get("seed") is not None:
        head.append(f"seed {tm['seed']}")
    parts = [", ".join(head)]
    transfer = tm.get("transfer") or []
    if transfer:
        attacks = ", ".join(f"{a.get('name')} ({a.get('budget')})" for a in transfer)
        parts.append(f"transfer from the FP32 PyTorch parent: {attacks}")
    query = tm.get("query")
    if query:
        on = f" on the first {tm['query_n']}" if tm.get("query_n") else ""
        parts.append(f"query on each artifact: {query.get('name')} ({query.get('budget')}){on}")
    return "; ".join(parts)


def _v1_threat_model(doc: dict[str, Any]) -> dict[str, Any] | None:
    """The threat model of an ``advedge.bench/1`` document, from its settings and attacks."""
    settings = doc.get("settings") or {}
    robust = [r["robust"] for r in doc["results"] if r.get("robust")]
    if not settings.get("robust") and not robust:
        return None
    n = settings.get("n") or (doc.get("data") or {}).get("n")
    transfer = []
    for a in (a for rob in robust[:1] for a in rob.get("attacks", [])):
        if a.get("kind") != "query":
            name = str(a.get("name", "an attack"))
            label, budget = _V1_TRANSFER.get(name, (name, "budget not recorded"))
            transfer.append({"name": label, "budget": budget})
    queried = any(a.get("kind") == "query" for rob in robust for a in rob.get("attacks", []))
    n_queries = settings.get("n_queries")
    query = {
        "name": "Square",
        "budget": f"{n_queries} queries" if n_queries else "budget not recorded",
    }
    tm: dict[str, Any] = {
        "norm": "Linf" if settings else None,  # bench/1 ran Linf attacks only
        "eps": settings.get("eps"),
        "eps_text": eps_text(settings.get("eps")),
        "n": n,
        "seed": settings.get("seed"),
        "query_n": settings.get("query_n") or n,
        "transfer": transfer,
        "query": query if queried else None,
        "derived_from": "advedge.bench/1 settings",
    }
    tm["summary"] = (
        threat_summary(tm) if settings else "not recorded (an advedge.bench/1 without settings)"
    )
    return tm


def _threat_model(doc: dict[str, Any], where: Path) -> dict[str, Any] | None:
    if doc["schema"] == "advedge.bench/1":
        return _v1_threat_model(doc)
    tm = doc.get("threat_model")
    if tm is None:
        return None
    if not isinstance(tm, dict):
        raise DataError(f"{where}: threat_model is not a mapping")
    tm = dict(tm)
    if not isinstance(tm.get("summary"), str) or not tm["summary"].strip():
        tm["summary"] = threat_summary(tm)
    return tm


def _load(value: Any) -> list[float] | None:
    """A load average: three numbers, or None."""
    if (
        isinstance(value, list)
        and len(value) == 3
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    ):
        return [float(v) for v in value]
    return None


def read_bench(path: Path) -> tuple[Bench, list[dict[str, Any]]]:
    """One bench.json: what it says about the run, and one row per artifact.

    Raises:
        DataError: not an advedge bench.json of a schema this report reads, or a malformed
            accuracy, interval or flag string.
    """
    doc = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(doc, dict) or doc.get("schema") not in BENCH_SCHEMAS:
        schema = doc.get("schema") if isinstance(doc, dict) else None
        raise DataError(f"{path} is not an advedge bench.json (schema {schema!r})")
    env = doc.get("environment") or {}
    bench = Bench(
        source=str(path),
        schema=doc["schema"],
        threat_model=_threat_model(doc, path),
        load_before=_load(env.get("load_before")),
        load_after=_load(env.get("load_after")),
        threads=env.get("threads"),
        warnings=[str(w) for w in doc.get("warnings") or []],
    )
    n_default = (doc.get("settings") or {}).get("n") or (doc.get("data") or {}).get("n")
    device = env.get("gpu") or env.get("cpu")
    rows = [_row(r, path, n_default, device) for r in doc["results"]]
    return bench, rows


def _latency(r: dict[str, Any]) -> dict[str, Any]:
    """Batch-1 p50/p99, the best throughput and its batch, and every latency warning."""
    lats = [lat for lat in r["latency"] if "p50_ms" in lat]
    b1 = next((lat for lat in lats if lat["batch"] == 1), None)
    best = max(lats, key=lambda lat: lat["images_per_s"], default=None)
    return {
        "p50_b1_ms": b1["p50_ms"] if b1 else None,
        "p99_b1_ms": b1["p99_ms"] if b1 else None,
        "best_batch": best["batch"] if best else None,
        "best_images_per_s": best["images_per_s"] if best else None,
        "latency_warnings": [
            {"batch": lat["batch"], "warning": str(lat["warning"])}
            for lat in r["latency"]
            if lat.get("warning")
        ],
    }


def _attacks(robust: dict[str, Any], n: Any, name: str) -> list[dict[str, Any]]:
    out = []
    for a in robust.get("attacks", []):
        an = a.get("n", n)
        what = f"{name}: {a.get('name', a.get('kind'))} robust_acc"
        out.append(
            {
                "name": a.get("name"),
                "kind": a.get("kind"),
                "n": an,
                "robust_acc": a.get("robust_acc"),
                "robust_acc_ci95": interval(
                    a.get("robust_acc"), an, a.get("robust_acc_ci95"), what=what
                ),
            }
        )
    return out


def _white_box_artifact(robust: dict[str, Any], n: Any, where: str) -> dict[str, Any]:
    """The white-box-artifact figure (APGD on the artifact's replica, scored on the artifact)
    with its interval, and why there is none (bench's ``status`` and ``reason``)."""
    wba = robust.get("white_box_artifact") or {}
    acc = wba.get("worst_case_acc")
    return {
        "white_box_artifact_acc": acc,
        "white_box_artifact_acc_ci95": interval(
            acc, n, wba.get("worst_case_acc_ci95"), what=f"{where}: white-box-artifact accuracy"
        ),
        "white_box_artifact_status": wba.get("status"),
        "white_box_artifact_reason": wba.get("reason") or None,
    }


def _row(r: dict[str, Any], path: Path, n_default: Any, device: Any) -> dict[str, Any]:
    """One artifact's row (fractions), with its intervals and, privately, its flags."""
    name = r["name"]
    n = r.get("n", n_default)
    robust = r.get("robust") or {}
    wn = robust.get("worst_case_n", n)
    where = f"{path}: {name}"
    row: dict[str, Any] = {
        "artifact": name,
        "label": str(r.get("label") or name),
        "source": str(path),
        "kind": r.get("kind"),
        "purifier": r.get("kind") in ("fused", "purifier"),
        "precision": r.get("precision"),
        "backend": r.get("backend"),
        "size_mb": round(r["bytes"] / 1e6, 3),
        "n": n,
        "clean_acc": r.get("clean_acc"),
        "clean_acc_ci95": interval(
            r.get("clean_acc"), n, r.get("clean_acc_ci95"), what=f"{where}: clean_acc"
        ),
        "worst_case_acc": robust.get("worst_case_acc"),
        "worst_case_n": wn if robust else None,
        "worst_case_acc_ci95": interval(
            robust.get("worst_case_acc"),
            wn,
            robust.get("worst_case_acc_ci95"),
            what=f"{where}: worst_case_acc",
        ),
        "worst_case_kinds": sorted({a["kind"] for a in robust.get("attacks", [])}),
        "worst_case_transfer_acc": robust.get("worst_case_transfer_acc"),
        "worst_case_transfer_acc_ci95": interval(
            robust.get("worst_case_transfer_acc"),
            n,
            robust.get("worst_case_transfer_acc_ci95"),
            what=f"{where}: worst_case_transfer_acc",
        ),
        "attacks": _attacks(robust, n, where),
        **_white_box_artifact(robust, n, where),
        "white_box": robust.get("white_box", False),
        "source_sha256": robust.get("source_sha256") if robust else None,
        **_latency(r),
        "device": device,
        "_clean_flags": _flags(r.get("clean_flags"), n, f"{where}: clean_flags"),
        "_worst_case_flags": _flags(
            robust.get("worst_case_flags"), wn, f"{where}: worst_case_flags"
        ),
    }
    return row


# ------------------------------------------------------------------------------ runs
def _read_metrics(path: Path) -> list[dict[str, float]]:
    """metrics.csv: one dict per epoch, numeric cells only (NaN and empty cells left out)."""
    with open(path, newline="", encoding="utf-8") as fh:
        out = []
        for row in csv.DictReader(fh):
            parsed = {}
            for k, v in row.items():
                try:
                    value = float(v)
                except (TypeError, ValueError):
                    continue
                if k is not None and math.isfinite(value):
                    parsed[k] = value
            out.append(parsed)
    return out


def read_run(folder: Path) -> Run:
    """A run directory: its metrics, and from its config.yaml (when readable) the method, the
    held-out n and the attack scored on it.

    A training run (``advedge train``/``distill``) scores PGD-``eval_steps`` at its ``eps`` and
    ``norm``; a purifier run (its config names a ``classifier``) grey-box PGD-10 on ``f`` then
    purified by ``G`` (:meth:`advedge.purifier.train.PurifierTrainer.held_out_scores`).

    Raises:
        DataError: an unreadable metrics.csv.
    """
    try:
        metrics = _read_metrics(folder / "metrics.csv")
    except (OSError, ValueError, csv.Error) as exc:
        raise DataError(f"unreadable metrics {folder / 'metrics.csv'}: {exc}") from None
    run = Run(folder.name, metrics)
    run.purifier = any("g_loss" in m for m in metrics)
    try:
        cfg = load_yaml(folder / "config.yaml") if (folder / "config.yaml").is_file() else {}
    except UsageError:
        cfg = {}  # the curves still tell their story; the held-out details stay unstated
    if not cfg:
        return run
    run.method = str(cfg["method"]) if cfg.get("method") else None
    run.purifier = run.purifier or "classifier" in cfg
    n = cfg.get("eval_n")
    run.held_out_n = n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None
    eps = eps_text(cfg.get("eps"))
    budget = f"{cfg.get('norm', 'Linf')} eps {eps}" if eps else "eps not recorded"
    if run.purifier:
        run.attack = f"grey-box PGD-10 on the classifier, then purified ({budget})"
    elif isinstance(cfg.get("eval_steps"), int):
        run.attack = f"PGD-{cfg['eval_steps']} ({budget})"
    return run


def run_summary(run: Run) -> dict[str, Any]:
    """A run's last held-out figures (fractions, with intervals at its held-out n)."""
    last = run.metrics[-1] if run.metrics else {}
    robust = last.get("test_pgd_acc", last.get("test_greybox_pgd_acc"))
    n = run.held_out_n
    return {
        "epochs": len(run.metrics),
        "method": run.method,
        "purifier": run.purifier,
        "held_out_n": n,
        "attack": run.attack,
        "clean_acc": last.get("test_clean_acc"),
        "clean_acc_ci95": interval(last.get("test_clean_acc"), n, what=f"{run.name} clean"),
        "robust_acc": robust,
        "robust_acc_ci95": interval(robust, n, what=f"{run.name} robust"),
    }

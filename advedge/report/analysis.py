"""What the report concludes from its rows: the Pareto front, which differences the data can
tell apart (an exact McNemar test on per-example flags, or overlapping Wilson intervals), and
the robustness of what ships next to the white-box figure of its FP32 parent."""

from __future__ import annotations

import itertools
import json
import math
from typing import Any

__all__ = [
    "ALPHA",
    "WHITE_BOX_DROP",
    "compare_front",
    "discordant",
    "front_metric",
    "front_of",
    "honest_robustness",
    "mcnemar_exact",
    "pareto_front",
]

ALPHA = 0.05  # a difference with p >= ALPHA is "not distinguishable"


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates (lower-or-equal latency and higher-or-equal
    accuracy, one of them strictly), sorted by latency."""
    front = [i for i in range(len(points)) if not any(_dominates(q, points[i]) for q in points)]
    return sorted(front, key=lambda i: points[i][0])


def _dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """``a`` is at least as fast and as accurate as ``b``, and strictly one of them."""
    return a[0] <= b[0] and a[1] >= b[1] and (a[0] < b[0] or a[1] > b[1])


def mcnemar_exact(b01: int, b10: int) -> float:
    """Two-sided exact McNemar test of paired binary outcomes.

    Of ``m = b01 + b10`` discordant pairs (one artifact right where the other is wrong), under
    the null hypothesis (equal accuracy) each falls either way with probability 1/2, so
    ``min(b01, b10)`` is Binomial(m, 1/2) and::

        p = min(1, 2 * sum_{k=0}^{min(b01, b10)} C(m, k) / 2^m)

    with ``p = 1`` for ``m = 0`` (McNemar, Psychometrika 1947; the exact form: Fagerland,
    Lydersen & Laake, BMC Med. Res. Methodol. 2013). Concordant pairs carry no information.
    Example: 0 vs 5 discordant gives ``2 * (1/2)^5 = 0.0625``.

    Raises:
        ValueError: a negative count.
    """
    if b01 < 0 or b10 < 0:
        raise ValueError(f"discordant counts must be >= 0, got {b01} and {b10}")
    m = b01 + b10
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, k) for k in range(min(b01, b10) + 1))
    return min(1.0, 2 * tail / 2**m)


def discordant(a: str, b: str) -> tuple[int, int]:
    """``(b01, b10)`` of two equal-length '0'/'1' flag strings: images only ``b`` got right, and
    images only ``a`` got right."""
    if len(a) != len(b):
        raise ValueError(f"flags over {len(a)} and {len(b)} images are not paired")
    b01 = sum(1 for x, y in zip(a, b, strict=True) if x == "0" and y == "1")
    b10 = sum(1 for x, y in zip(a, b, strict=True) if x == "1" and y == "0")
    return b01, b10


def front_metric(rows: list[dict[str, Any]]) -> str:
    """The accuracy the Pareto front is drawn on: worst-case robust where any row has it, else
    clean."""
    return "worst_case_acc" if any(r["worst_case_acc"] is not None for r in rows) else "clean_acc"


def _plotted(rows: list[dict[str, Any]], metric: str) -> list[int]:
    """Indices of the rows with a batch-1 latency and the metric."""
    return [i for i, r in enumerate(rows) if r["p50_b1_ms"] is not None and r[metric] is not None]


def front_of(rows: list[dict[str, Any]], metric: str) -> list[int]:
    """Row indices on the Pareto front of ``metric`` against batch-1 p50 latency."""
    idx = _plotted(rows, metric)
    return [idx[k] for k in pareto_front([(rows[i]["p50_b1_ms"], rows[i][metric]) for i in idx])]


def _pairs(rows: list[dict[str, Any]], metric: str, front: list[int]) -> list[tuple[int, int, str]]:
    """(front member, other row, relation): consecutive front members, and each front member
    against every row it dominates."""
    pairs = [(a, b, "next on the front") for a, b in itertools.pairwise(front)]
    for i in _plotted(rows, metric):
        if i in front:
            continue
        p = (rows[i]["p50_b1_ms"], rows[i][metric])
        for f in front:
            if _dominates((rows[f]["p50_b1_ms"], rows[f][metric]), p):
                pairs.append((f, i, "dominates"))
    return pairs


def _flag_key(metric: str) -> str:
    return "_worst_case_flags" if metric == "worst_case_acc" else "_clean_flags"


def _compare(a: dict[str, Any], b: dict[str, Any], metric: str) -> dict[str, Any]:
    """One pair: McNemar on the flags when both rows have them over the same images (same
    bench.json, same n), else whether their 95% Wilson intervals overlap."""
    fa, fb = a[_flag_key(metric)], b[_flag_key(metric)]
    n_key = "worst_case_n" if metric == "worst_case_acc" else "n"
    out: dict[str, Any] = {
        "a": a["artifact"],
        "b": b["artifact"],
        "metric": metric,
        "acc_a": a[metric],
        "acc_b": b[metric],
    }
    if fa and fb and a["source"] == b["source"] and len(fa) == len(fb):
        b01, b10 = discordant(fa, fb)
        p = mcnemar_exact(b01, b10)
        same = p >= ALPHA
        word = "not distinguishable" if same else "distinguishable"
        return {
            **out,
            "n": len(fa),
            "method": "mcnemar-exact",
            "discordant": [b10, b01],  # [only a right, only b right]
            "p_value": p,
            "distinguishable": not same,
            "text": f"{word} at n = {len(fa)} (p = {p:.2g})",
        }
    ca, cb = a[f"{metric}_ci95"], b[f"{metric}_ci95"]
    if ca is None or cb is None:
        return {
            **out,
            "method": None,
            "distinguishable": None,
            "text": "cannot tell: n not recorded",
        }
    overlap = ca[0] <= cb[1] and cb[0] <= ca[1]
    n = a[n_key] if a[n_key] == b[n_key] else f"{a[n_key]} and {b[n_key]}"
    return {
        **out,
        "n": n,
        "method": "wilson-overlap",
        "distinguishable": not overlap,
        "text": (
            f"not distinguishable at n = {n} (95% intervals overlap)"
            if overlap
            else f"distinguishable at n = {n} (95% intervals apart)"
        ),
    }


def compare_front(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Which differences on and next to the Pareto front the data can tell apart.

    Compared: consecutive front members, and each front member against every artifact it
    dominates, on the front's metric (:func:`front_metric`). A pair of rows with per-example
    flags over the same images gets the exact McNemar test (:func:`mcnemar_exact`,
    distinguishable when ``p < 0.05``); otherwise (``advedge.bench/1``, or rows from different
    bench runs) the pair is called distinguishable only when the 95% Wilson intervals are apart,
    a cruder check that misses some real differences.

    Returns:
        ``{"metric", "front", "pairs"}``: the metric, the front's artifacts by latency, and one
        entry per pair (``a`` the front member, ``method``, ``p_value`` for McNemar,
        ``distinguishable``, and the ``text`` the report prints).
    """
    metric = front_metric(rows)
    front = front_of(rows, metric)
    pairs = []
    for f, i, relation in _pairs(rows, metric, front):
        pairs.append({**_compare(rows[f], rows[i], metric), "relation": relation})
    return {"metric": metric, "front": [rows[i]["artifact"] for i in front], "pairs": pairs}


#: An artifact whose white-box-artifact figure is more than this below its FP32 parent's
#: white-box figure is flagged: quantisation (or export) cost that much robustness.
WHITE_BOX_DROP = 0.01


def honest_robustness(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per deployed artifact: its transfer, white-box-artifact and worst-case figures next to
    the white-box worst case of its FP32 PyTorch parent (same source checkpoint), with two
    flags: ``precision_gap`` where transfer robustness exceeds the parent's white-box
    robustness (the precision gap, not extra robustness), and ``white_box_drop`` where the
    white-box attack on the artifact's own arithmetic leaves more than :data:`WHITE_BOX_DROP`
    (1 point) less than the parent's white-box figure (the artifact is less robust than its
    parent)."""

    def key(r: dict[str, Any]) -> str:  # a fused artifact's source is a dict of two sha256
        return json.dumps(r["source_sha256"], sort_keys=True)

    parents = {key(r): r for r in rows if r.get("white_box") and r["source_sha256"]}
    out = []
    for r in rows:
        if r.get("white_box") or r["worst_case_transfer_acc"] is None:
            continue
        parent = parents.get(key(r))
        # like with like: the parent's white-box figure over the same transfer attacks (the
        # set crafted on it), without the query attack
        wb = parent["worst_case_transfer_acc"] if parent else None
        gap = wb is not None and r["worst_case_transfer_acc"] > wb
        wba = r.get("white_box_artifact_acc")
        drop = wb is not None and wba is not None and wba < wb - WHITE_BOX_DROP - 1e-12
        out.append(
            {
                "artifact": r["artifact"],
                "label": r["label"],
                "precision": r["precision"],
                "purifier": r["purifier"],
                "parent": parent["artifact"] if parent else None,
                "white_box_parent_acc": wb,
                "white_box_parent_acc_ci95": parent["worst_case_transfer_acc_ci95"]
                if parent
                else None,
                "transfer_acc": r["worst_case_transfer_acc"],
                "transfer_acc_ci95": r["worst_case_transfer_acc_ci95"],
                "white_box_artifact_acc": wba,
                "white_box_artifact_acc_ci95": r.get("white_box_artifact_acc_ci95"),
                "white_box_artifact_status": r.get("white_box_artifact_status"),
                "white_box_artifact_reason": r.get("white_box_artifact_reason"),
                "worst_case_acc": r["worst_case_acc"],
                "worst_case_acc_ci95": r["worst_case_acc_ci95"],
                "precision_gap": gap,
                "white_box_drop": drop,
            }
        )
    return out

"""The robust accuracy ``advedge bench --robust`` measures on one artifact, and its threat model.

For each artifact (see :mod:`~advedge.export.runtime.craft` for how the transfer set is made):

(a) **transfer**: every array of the transfer set, crafted on the FP32 PyTorch parent, fed to the
    artifact. On the parent itself (a PyTorch runner whose checkpoint is the set's source) these
    are white-box attacks, and the parent's worst case as scored when the set was crafted
    (``TransferSet.survived``) counts too, so that its headline is never above
    ``advedge eval --suite standard``'s on the same images;
(b) **white-box-artifact** (an ONNX artifact, or an engine whose source ONNX is beside it; on
    by default, ``white_box_artifact``): APGD-CE and APGD-T on a differentiable replica of the
    artifact's own graph, every example scored on the artifact, after a parity check of the
    replica against it (:mod:`~advedge.export.runtime.whitebox`); on every image the artifact
    gets right clean, so its figure stands on its own;
(c) **query**: Square run against the artifact's runner itself (no gradients: it attacks the
    artifact's own arithmetic, INT8 included), on the first ``query_n`` images that survived
    clean and every transfer and white-box-artifact attack (the images already broken need no
    more queries);
(d) the **headline**: per example, correct clean and unbroken by every attack, over the first
    ``query_n`` images (all ``n`` by default).

Every accuracy carries its 95% Wilson interval, and the per-example flags behind the clean
accuracy and the headline are kept as strings of ``0``/``1`` (``clean_flags``,
``worst_case_flags``) so that ``advedge report`` can test whether two artifacts differ
(McNemar's test needs the pairs).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
from advedge.export.runtime.craft import Recipe
from advedge.export.runtime.feed import query_attack
from advedge.export.runtime.transfer import TransferSet
from advedge.export.runtime.whitebox import measure_white_box, white_box_attacks

from advedge.stats import wilson_interval

__all__ = ["flags_text", "interval", "measure_robust", "threat_model"]


def flags_text(mask: np.ndarray) -> str:
    """``[n]`` bool as a string of ``0``/``1`` (``1``: correct or survived)."""
    return (np.asarray(mask, dtype=bool).astype(np.uint8) + ord("0")).tobytes().decode("ascii")


def interval(mask: np.ndarray) -> list[float]:
    """The 95% Wilson interval of ``mask``'s mean."""
    return list(wilson_interval(int(np.sum(mask)), len(mask)))


def _eps_text(eps: float) -> str:
    k = eps * 255
    return f"{round(k)}/255" if abs(k - round(k)) < 1e-6 else f"{eps:.6g}"


def threat_model(opts: Any, n: int, num_classes: int, tset: TransferSet | None) -> dict[str, Any]:
    """What the robust figures of one bench mean: norm, eps, images, attacks and budgets, seed.

    Args:
        opts: The bench options (eps, seed, n_iter, n_queries, query_n, data).
        n: The images measured.
        num_classes: The data's classes.
        tset: A transfer set given with ``--transfer-set`` (its own recipe is reported), or None.
    """
    q = n if opts.query_n is None else min(opts.query_n, n)
    if tset is not None and "recipe" not in tset.meta:  # a version 1 set
        transfer = [{"name": a, "budget": "as crafted (transfer set version 1)"} for a in tset.advs]
    elif tset is not None:
        transfer = [{"name": a, "budget": tset.meta["budgets"].get(a, "")} for a in tset.advs]
    else:
        recipe = Recipe(eps=opts.eps, seed=opts.seed, n_iter=opts.n_iter, n_queries=opts.n_queries)
        transfer = recipe.attacks(num_classes)
    query = {"name": "square", "budget": f"{opts.n_queries} queries"}
    white = (
        white_box_attacks(opts.n_iter, num_classes)
        if getattr(opts, "white_box_artifact", False)
        else []
    )
    summary = (
        f"L-inf eps {_eps_text(opts.eps)}, n = {n} test images (official order), seed "
        f"{opts.seed}; crafted on the FP32 parent and fed to every artifact: "
        + ", ".join(f"{a['name']} ({a['budget']})" for a in transfer)
        + (
            "; white-box on each ONNX artifact's own arithmetic (a replica with "
            "straight-through rounding, scored on the artifact): "
            + ", ".join(f"{a['name']} ({a['budget']})" for a in white)
            if white
            else ""
        )
        + f"; on each artifact itself: square ({query['budget']}, first {q} images)"
    )
    return {
        "norm": "Linf",
        "eps": opts.eps,
        "eps_text": _eps_text(opts.eps),
        "n": n,
        "query_n": q,
        "seed": opts.seed,
        "data": str(opts.data),
        "transfer": transfer,
        "white_box_artifact": white,
        "query": query,
        "summary": summary,
    }


def _transfer(art: Any, y: np.ndarray, tset: TransferSet) -> tuple[dict[str, Any], np.ndarray]:
    """Each transfer attack's accuracy on the artifact, and per example whether it survived
    clean and all of them (and, on the parent, the crafting's own verdict)."""
    source, tmeta = art.source, tset.meta
    attacks: list[dict[str, Any]] = []
    worst = art.clean_ok.copy()
    # crafted on this very FP32 PyTorch model, the "transfer" set is a white-box attack on it
    white_box = bool(art.info.gradients and source == tmeta.get("source_sha256"))
    for name, adv in tset.advs.items():
        ok = art.feed.predict(adv) == y
        worst &= ok
        attacks.append(
            {
                "name": name,
                "kind": "white-box" if white_box else "transfer",
                "crafted_on": "fp32 pytorch",
                "budget": (tmeta.get("budgets") or {}).get(name),
                "n": len(y),
                "unperturbed": tmeta["unperturbed"][name],
                "robust_acc": float(ok.mean()),
                "robust_acc_ci95": interval(ok),
            }
        )
    if white_box and tset.survived is not None:
        worst &= tset.survived  # the same model, scored at the crafting's batches
    result: dict[str, Any] = {
        "source_sha256": source,
        "white_box": white_box,
        "transfer_set": {
            "path": None if tset.path is None else str(tset.path),
            "sha256": tmeta["sha256"],
            "schema": tmeta.get("schema"),
        },
        "attacks": attacks,
        "worst_case_transfer_acc": float(worst.mean()),
        "worst_case_transfer_acc_ci95": interval(worst),
    }
    return result, worst


def measure_robust(
    opts: Any,
    art: Any,
    x: np.ndarray,
    y: np.ndarray,
    tset: TransferSet,
    say: Callable[[str], None],
    *,
    test: Any,
) -> dict[str, Any]:
    """The transfer, white-box-artifact and query attacks' accuracy on the artifact, and the
    per-example worst case over them and the clean images (see the module docstring).
    ``test``: the images ``x`` as an :class:`~advedge.data.ImageArrays` (what the white-box
    attacks read, as eval does)."""
    result, worst = _transfer(art, y, tset)
    if getattr(opts, "white_box_artifact", False):
        record, attacks, survived = measure_white_box(opts, art, test, x, y, say)
        result["white_box_artifact"] = record
        result["attacks"] += attacks
        if survived is not None:
            worst &= survived
        elif record["status"] == "unavailable":
            say(f"{art.label}: no white-box-artifact figure: {record['reason']}")
    else:
        result["white_box_artifact"] = {"status": "off", "reason": "--no-white-box-artifact"}
    q = len(y) if opts.query_n is None else min(opts.query_n, len(y))
    worst = worst[:q]
    try:
        __import__("torch")
    except ImportError:
        result["query"] = "skipped: the Square attack needs torch on this machine"
        return _headline(result, worst)
    todo = np.flatnonzero(worst)
    say(
        f"{art.label}: Square ({opts.n_queries} queries) on the artifact itself, "
        f"{len(todo)} of {q} images still robust"
    )
    t0 = time.perf_counter()
    if len(todo):
        ok = query_attack(
            art.feed, x[todo], y[todo], eps=opts.eps, n_queries=opts.n_queries, seed=opts.seed
        )
        worst[todo[~ok]] = False
    result["attacks"].append(
        {
            "name": "square-query",  # the set's "square" ran on the FP32 parent
            "kind": "query",
            "budget": f"{opts.n_queries} queries",
            "n": q,
            "n_attacked": len(todo),
            "cumulative": True,  # run on what the other attacks left: the accuracy after all
            "robust_acc": float(worst.mean()),
            "robust_acc_ci95": interval(worst),
            "seconds": round(time.perf_counter() - t0, 1),
        }
    )
    return _headline(result, worst)


def _headline(result: dict[str, Any], worst: np.ndarray) -> dict[str, Any]:
    result["worst_case_acc"] = float(worst.mean())
    result["worst_case_acc_ci95"] = interval(worst)
    result["worst_case_n"] = len(worst)
    result["worst_case_flags"] = flags_text(worst)
    return result

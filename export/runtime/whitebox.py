"""The white-box attack on an artifact's own arithmetic: ``advedge bench --robust``'s third kind,
``white-box-artifact``.

Transfer from the FP32 parent overstates a quantised artifact's robustness (examples crafted at
one precision transfer poorly to another; Bernhard et al. 2019), and Square needs many queries.
This attack takes gradients through the artifact itself:

1. **Replica.** The artifact's ONNX graph (for a TensorRT engine, the ONNX its sidecar records
   it was built from, checked by sha256) becomes a differentiable PyTorch module,
   :func:`~advedge.export.runtime.replica.build_replica`: the same Q/DQ scales, zero points,
   per-channel axes and FP32 islands, rounding passed straight through (BPDA). For a fused
   purifier + classifier the replica is the whole graph, so the attack is adaptive through the
   quantised purifier.
2. **Parity.** The replica's logits against the artifact's runner (as bench runs it: ONNX
   Runtime's CPU provider at optimisation level ``all`` for an ``.onnx``) on the ``n`` test
   images: top-1 agreement and max ``|Δ|``. Below :data:`MIN_AGREEMENT` no white-box figure is
   reported (``status: unavailable`` with the reason); bench goes on without it.
3. **Attacks.** APGD-CE and APGD-T (advedge's own, as ``advedge eval --suite standard`` builds
   them: ``--n-iter`` iterations, APGD-T over the top 9 other classes, ``--seed``) run on the
   replica through :class:`~advedge.evaluation.core.EvalSettings`, as a cascade whose verdict
   is the **artifact's**: APGD-CE on every image the artifact classifies correctly, APGD-T on
   those the artifact still gets right after APGD-CE's examples.
4. **Scored on the artifact.** Every example is fed to the artifact's runner; only its
   predictions count. ``replica_robust_acc`` says how many of the same examples fooled the
   replica (a gap between the two is examples on the decision boundary, where the replica and
   the artifact may round differently).

Not applicable to a PyTorch artifact (the transfer set is already white-box there), and
unavailable without torch, for an engine whose source ONNX is missing or changed, or for a
graph with an operator the replica does not implement (named in the reason).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from advedge.errors import AdvedgeError
from advedge.stats import wilson_interval
from advedge.utils import sha256_file

__all__ = ["KIND", "MIN_AGREEMENT", "measure_white_box", "replica_source", "white_box_attacks"]

KIND = "white-box-artifact"
#: The top-1 agreement with the artifact below which no white-box figure is reported.
MIN_AGREEMENT = 0.995
_BATCH = 256  # the replica's batch (advedge eval's)


def white_box_attacks(n_iter: int, num_classes: int) -> list[dict[str, str]]:
    """The attacks run on the replica, each with its budget in words (the threat model's)."""
    out = [{"name": "apgd-ce", "budget": f"{n_iter} iterations"}]
    if num_classes >= 4:
        k = min(9, num_classes - 1)
        out.append({"name": "apgd-t", "budget": f"{k} target classes x {n_iter} iterations"})
    return out


def replica_source(art: Any) -> tuple[Path | None, str]:
    """The ONNX graph the replica is built from, or None and why there is none.

    Args:
        art: bench's artifact (its ``path``, ``info`` and ``runner``).
    """
    if art.info.gradients:
        return None, "not applicable: a PyTorch artifact, where the transfer set is white-box"
    path = Path(art.path)
    if path.suffix == ".onnx":
        return path, ""
    sidecar = getattr(art.runner, "sidecar", None) or {}
    name = sidecar.get("source_onnx")
    if path.suffix != ".engine" or not name:
        return None, f"{path.name} records no source ONNX to build the replica from"
    onnx_path = path.with_name(Path(name).name)
    if not onnx_path.is_file():
        return None, f"the engine's source ONNX {onnx_path.name} is not beside it"
    want = sidecar.get("source_onnx_sha256")
    if want and sha256_file(onnx_path) != want:
        return None, f"{onnx_path.name} is not the ONNX the engine was built from (sha256 differs)"
    return onnx_path, ""


def _logits(replica: Any, x: np.ndarray, device: Any) -> np.ndarray:
    import torch

    outs = []
    with torch.no_grad():
        for i in range(0, len(x), _BATCH):
            xb = torch.from_numpy(x[i : i + _BATCH]).to(device)
            outs.append(replica(xb).float().cpu().numpy())
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def _parity(replica: Any, art: Any, x: np.ndarray, device: Any) -> dict[str, Any]:
    """Top-1 agreement and max |Δ| of the replica's logits against the artifact's."""
    mine, theirs = _logits(replica, x, device), art.feed.run(x)
    if mine.shape != theirs.shape:
        raise AdvedgeError(
            f"the replica returns {list(mine.shape)} logits, the artifact {list(theirs.shape)}"
        )
    return {
        "n": len(x),
        "agreement": float((mine.argmax(1) == theirs.argmax(1)).mean()),
        "max_abs_diff": float(np.abs(mine - theirs).max()),
        "min_agreement": MIN_AGREEMENT,
    }


def _closest_replica(
    build: Callable[..., Any], onnx_path: Path, art: Any, x: np.ndarray, device: Any
) -> tuple[Any, dict[str, Any]]:
    """The replica and its parity; where ONNX Runtime would round some biases (see
    :mod:`~advedge.export.runtime.replica`), with and without that rounding, keeping the one
    closer to the artifact's runner (ONNX Runtime rounds them, TensorRT does not): higher
    agreement, then smaller max |Δ|."""
    best: tuple[Any, dict[str, Any]] | None = None
    for rounded in (True, False):
        replica = build(onnx_path, ort_bias_quantization=rounded).to(device)
        replica.num_classes = art.feed.num_classes
        parity = _parity(replica, art, x, device)
        if best is None or (parity["agreement"], -parity["max_abs_diff"]) > (
            best[1]["agreement"],
            -best[1]["max_abs_diff"],
        ):
            best = (replica, parity)
        if not replica.ort_rewrites:
            break  # no bias to round: both are the same replica
    assert best is not None
    return best


def _keeper(x: np.ndarray) -> Any:
    """An :class:`~advedge.evaluation.core.EvalProgress` that keeps every adversarial batch."""
    from advedge.evaluation.core import EvalProgress

    class Keep(EvalProgress):
        def __init__(self) -> None:
            self.adv = x.copy()  # per image its example; clean where the attack did not run

        def on_examples(self, name: str, idx: np.ndarray, x_adv: Any) -> None:
            self.adv[idx] = x_adv.detach().cpu().numpy().astype(np.float32)

    return Keep()


def _attack_replica(
    opts: Any,
    replica: Any,
    art: Any,
    test: Any,
    x: np.ndarray,
    y: np.ndarray,
    device: Any,
    say: Callable[[str], None],
) -> tuple[list[dict[str, Any]], np.ndarray]:
    """The APGD cascade on the replica, judged on the artifact (see the module docstring)."""
    from advedge.evaluation.core import EvalSettings
    from advedge.evaluation.suites import build_suite

    attacks = build_suite(
        "standard", replica, eps=opts.eps, n_iter=opts.n_iter, n_queries=1, seed=opts.seed
    )
    attacks = [a for a in attacks if a.name in ("apgd-ce", "apgd-t")]
    budgets = {a["name"]: a["budget"] for a in white_box_attacks(opts.n_iter, replica.num_classes)}
    alive = art.clean_ok.copy()  # correct on the artifact and unbroken so far
    entries = []
    for attack in attacks:
        todo = np.flatnonzero(alive)
        say(f"{art.label}: {attack.name} on its replica ({len(todo)} images still robust)")
        t0 = time.perf_counter()
        keep = _keeper(x[todo])
        fooled_replica = np.zeros(0, dtype=bool)
        if len(todo):
            EvalSettings(
                eps=opts.eps,
                device=device,
                batch_size=_BATCH,
                flags_n=0,
                seed=opts.seed,
                progress=keep,
            ).run(replica, test.subset(todo), [attack])
            fooled_replica = _logits(replica, keep.adv, device).argmax(1) != y[todo]
            ok = art.feed.predict(keep.adv) == y[todo]
            alive[todo[~ok]] = False
        entries.append(
            {
                "name": f"{attack.name}-artifact",  # the transfer set's apgd-ce is another
                "kind": KIND,
                "crafted_on": "the artifact's replica",
                "budget": budgets[attack.name],
                "n": len(y),
                "n_attacked": len(todo),
                "cumulative": True,  # each on what the earlier ones left: the accuracy after all
                "robust_acc": float(alive.mean()),
                "robust_acc_ci95": list(wilson_interval(int(alive.sum()), len(y))),
                # the same examples on the replica (every image still alive was attacked)
                "replica_robust_acc": float(np.sum(~fooled_replica) / len(y)),
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
    return entries, alive


def measure_white_box(
    opts: Any,
    art: Any,
    test: Any,
    x: np.ndarray,
    y: np.ndarray,
    say: Callable[[str], None],
) -> tuple[dict[str, Any], list[dict[str, Any]], np.ndarray | None]:
    """The white-box-artifact attacks on one artifact (see the module docstring).

    Args:
        opts: bench's options (``eps``, ``n_iter``, ``seed``, ``device``).
        art: bench's artifact: its ``path``, ``info``, ``runner``, ``feed``, ``clean_ok``,
            ``label``.
        test: The test images as an :class:`~advedge.data.ImageArrays` (what eval reads).
        x: The same images, float32 NCHW in [0, 1].
        y: Their labels.
        say: Where progress goes.

    Returns:
        ``(record, attacks, survived)``: ``record`` has ``status`` (``measured``,
        ``unavailable``, ``not applicable``) with its ``reason``, the replica's ``onnx`` and
        ``parity``, and when measured ``worst_case_acc`` with its ``_ci95``; ``attacks`` the
        entries for bench's list; ``survived`` ``[n]`` bool (correct and unbroken on the
        artifact), None unless measured.
    """
    onnx_path, why = replica_source(art)
    if onnx_path is None:
        status = "not applicable" if why.startswith("not applicable") else "unavailable"
        return {"status": status, "reason": why}, [], None
    record: dict[str, Any] = {"onnx": str(onnx_path)}
    try:
        import torch  # noqa: F401
    except ImportError:
        return {**record, "status": "unavailable", "reason": "torch is not installed"}, [], None
    from advedge.export.runtime.replica import build_replica

    from advedge.utils import resolve_device

    try:
        device = resolve_device(getattr(opts, "device", "auto"))
        replica, parity = _closest_replica(build_replica, onnx_path, art, x, device)
        record.update(
            saturation_grad=replica.saturation_grad,
            ort_bias_quantization=replica.ort_rewrites > 0,
            parity=parity,
        )
    except AdvedgeError as exc:
        return {**record, "status": "unavailable", "reason": exc.message}, [], None
    say(
        f"{art.label}: replica of {onnx_path.name}: top-1 agreement "
        f"{100 * parity['agreement']:.2f}%, max |Δ| {parity['max_abs_diff']:.2g}"
    )
    if parity["agreement"] < MIN_AGREEMENT:
        reason = (
            f"the replica agrees with the artifact on {100 * parity['agreement']:.2f}% of the "
            f"top-1 predictions (n = {parity['n']}), below the {100 * MIN_AGREEMENT:.1f}% a "
            "white-box figure needs"
        )
        return {**record, "status": "unavailable", "reason": reason}, [], None
    attacks, survived = _attack_replica(opts, replica, art, test, x, y, device, say)
    record.update(
        status="measured",
        reason="",
        worst_case_acc=float(survived.mean()),
        worst_case_acc_ci95=list(wilson_interval(int(survived.sum()), len(y))),
    )
    return record, attacks, survived

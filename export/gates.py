"""The checks every artifact of ``advedge export`` passes: the parity gate, run on the artifact
itself (ONNX Runtime, or a TensorRT engine), and the accuracy report of a lower precision.

The tolerances are the precision table's (:data:`advedge.export.precisions.PRECISIONS`), with
the CLI's overrides; the comparison is :mod:`advedge.export.parity`'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from advedge.export.parity import Tolerance, compare_outputs, gate
from advedge.export.precisions import PRECISIONS
from advedge.export.runtime.onnxruntime import OrtRunner
from advedge.export.runtime.torch import TorchRunner
from advedge.export.targets import ExportTarget

from advedge.utils import sha256_file

__all__ = [
    "ParityImages",
    "accuracy_report",
    "artifact_entry",
    "gate_onnx",
    "gate_runner",
    "summary",
]


def _labels(classifier: Any, x: np.ndarray) -> np.ndarray:
    return TorchRunner(classifier).run(x, 256).argmax(axis=1)


@dataclass
class ParityImages:
    """The parity gate's inputs per kind (``clean``, ``adversarial``) and PyTorch's outputs on
    them (for a purifier also the classes its classifier gives the purified images)."""

    inputs: dict[str, np.ndarray]
    reference: dict[str, np.ndarray]
    reference_labels: dict[str, np.ndarray]

    @classmethod
    def of(cls, target: ExportTarget, inputs: dict[str, np.ndarray]) -> ParityImages:
        """Run the FP32 PyTorch module of ``target`` on ``inputs``."""
        torch_runner = TorchRunner(target.module)
        ref = {k: torch_runner.run(v, 256) for k, v in inputs.items()}
        ref_labels = (
            {k: _labels(target.classifier, v) for k, v in ref.items()}
            if target.output == "pixels"
            else {}
        )
        return cls(inputs, ref, ref_labels)


def gate_onnx(
    target: ExportTarget, onnx_path: Path, precision: str, images: ParityImages
) -> dict[str, Any]:
    """The parity gate of an ONNX artifact under ONNX Runtime (see :func:`gate_runner`).

    A precision with an ORT reference level (INT8: ``basic``) is checked as its graph is
    written, which is what TensorRT computes; ONNX Runtime's fused x86 int8 kernels are the
    accuracy report's business.
    """
    runner = OrtRunner(onnx_path, optimization=PRECISIONS[precision].reference_level)
    return gate_runner(target, runner, onnx_path.name, precision, images)


def gate_runner(
    target: ExportTarget, runner: Any, artifact: str, precision: str, images: ParityImages
) -> dict[str, Any]:
    """Run ``runner`` on the parity images and gate it against PyTorch.

    The tolerance is the precision's; a purifier's pixel tolerance is capped at ``eps_r / 2``;
    ``--parity-max-abs`` and ``--parity-min-agree`` override it.

    Returns:
        The :class:`~advedge.export.parity.ParityResult` as a dict.

    Raises:
        ParityError: beyond the tolerance.
    """
    figures = {}
    for kind, x in images.inputs.items():
        cand = runner.run(x, 256)
        if target.output == "pixels":
            figures[kind] = compare_outputs(
                images.reference[kind],
                cand,
                reference_labels=images.reference_labels[kind],
                candidate_labels=_labels(target.classifier, cand),
            )
        else:
            figures[kind] = compare_outputs(images.reference[kind], cand)
    n = len(next(iter(images.inputs.values())))
    return gate(
        figures,
        precision=precision,
        output=target.output,
        n=n,
        artifact=artifact,
        tolerance=_tolerance(target, precision),
    ).to_dict()


def _tolerance(target: ExportTarget, precision: str) -> Tolerance:
    base = PRECISIONS[precision].tolerance
    max_logits, max_pixels, min_agree = base.max_abs_logits, base.max_abs_pixels, base.min_agreement
    eps_r = target.metadata.get("eps_r")
    if target.output == "pixels" and eps_r:
        # the purifier's whole correction is bounded by eps_r: a pixel tolerance near eps_r would
        # pass a purifier that does nothing, so it is capped at eps_r / 2
        max_pixels = min(max_pixels, 0.5 * float(eps_r))
    if target.overrides.get("max_abs") is not None:
        max_logits = max_pixels = float(target.overrides["max_abs"])
    if target.overrides.get("min_agree") is not None:
        min_agree = float(target.overrides["min_agree"])
    return Tolerance(max_logits, max_pixels, min_agree)


def summary(parity: dict[str, Any]) -> str:
    """One line of parity figures: ``clean max|Δ| 2e-06, agree 100.0%; adversarial ...``."""
    return "; ".join(
        f"{k} max|Δ| {v['max_abs']:.2g}, agree {100 * v['agreement']:.1f}%"
        for k, v in parity["figures"].items()
    )


def accuracy_report(
    fp32_path: Path,
    low_path: Path,
    precision: str,
    x: np.ndarray,
    y: np.ndarray,
    x_adv: np.ndarray,
    *,
    max_drop: float,
    attack: dict[str, Any],
) -> dict[str, Any]:
    """Clean and transfer-robust accuracy of FP32 vs the low-precision artifact (ONNX Runtime).

    ``accuracy[precision]`` is what an ONNX Runtime CPU session runs by default (for INT8: its
    fused int8 kernels). A precision with an ORT reference level (INT8) also reports
    ``accuracy["<precision>_reference"]``: the Q/DQ arithmetic as written (ONNX Runtime's basic
    optimisation level), which is what TensorRT reproduces; the two differ where ONNX Runtime's
    x86 kernels saturate. The warning fires when either loses more than ``max_drop`` points of
    clean or transfer-robust accuracy.
    """
    runs = [("fp32", fp32_path, "all"), (precision, low_path, "all")]
    level = PRECISIONS[precision].reference_level
    if level != "all":
        runs.append((f"{precision}_reference", low_path, level))
    acc = {}
    for label, path, opt_level in runs:
        runner = OrtRunner(path, optimization=opt_level)
        acc[label] = {
            "clean_acc": float(np.mean(runner.run(x, 256).argmax(1) == y)),
            "transfer_robust_acc": float(np.mean(runner.run(x_adv, 256).argmax(1) == y)),
        }
    drops = {
        label: {
            "clean": round(100 * (acc["fp32"]["clean_acc"] - a["clean_acc"]), 2),
            "transfer_robust": round(
                100 * (acc["fp32"]["transfer_robust_acc"] - a["transfer_robust_acc"]), 2
            ),
        }
        for label, a in acc.items()
        if label != "fp32"
    }
    return {
        "runtime": "onnxruntime-cpu",
        "n": len(y),
        "accuracy": acc,
        "drop_points": drops[precision],
        "drop_points_by_run": drops,
        "max_drop_points": max_drop,
        "transfer_attack": {**attack, "kind": "transfer", "crafted_on": "fp32 pytorch model"},
        "warning": _accuracy_warning(drops, max_drop),
    }


def _accuracy_warning(drops: dict[str, dict[str, float]], max_drop: float) -> str | None:
    lost = [
        f"{label} loses {d[kind]:.1f} points of {kind.replace('_', ' ')} accuracy"
        for label, d in drops.items()
        for kind in ("clean", "transfer_robust")
        if d[kind] > max_drop
    ]
    if not lost:
        return None
    return (
        "; ".join(lost) + f" against fp32 (limit {max_drop:g}); try another "
        "--calib-method, a larger --calib-n, --calib-mix-adv or --keep-fp32"
    )


def artifact_entry(path: Path, kind: str, precision: str, **extra: Any) -> dict[str, Any]:
    """The report's entry of one written artifact: name, kind, precision, size, sha256."""
    return {
        "path": path.name,
        "kind": kind,
        "precision": precision,
        "bytes": path.stat().st_size,
        "sha256": sha256_file(path),
        **extra,
    }

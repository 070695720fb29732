"""The parity gate: an exported artifact must compute what the PyTorch model computes.

After every export the artifact is run (ONNX Runtime on the CPU here) on real images, clean and
adversarial, and compared with the PyTorch model on the same images:

- ``max_abs``: max |a - b| over all outputs (logits, or purified pixels for a purifier);
- ``agreement``: fraction of images whose top-1 class is the same (for a purifier, the class the
  PyTorch classifier gives to each purified image).

Both must be within the precision's tolerance on the clean and on the adversarial images, or
the artifact is refused (:class:`ParityError`, exit 1) and nothing is written. Adversarial
inputs matter: they sit near decision boundaries, where a small numeric difference flips a
class, which is exactly where a deployed defence must agree with the evaluated one.

The tolerances (``logits`` / ``pixels`` max-abs, minimum agreement) are each precision's, in
the precision table :data:`advedge.export.precisions.PRECISIONS`, which also says why they
are what they are.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from advedge.errors import ExportError

__all__ = ["ParityError", "ParityResult", "Tolerance", "compare_outputs", "gate"]


class ParityError(ExportError):
    """The artifact's outputs differ from PyTorch's beyond the tolerance: exit code 1."""


@dataclass(frozen=True)
class Tolerance:
    """Parity thresholds of one precision."""

    max_abs_logits: float
    max_abs_pixels: float
    min_agreement: float


def compare_outputs(
    reference: np.ndarray,
    candidate: np.ndarray,
    *,
    reference_labels: np.ndarray | None = None,
    candidate_labels: np.ndarray | None = None,
) -> dict[str, float]:
    """``max_abs`` and top-1 ``agreement`` between two output arrays of the same shape.

    Labels default to ``argmax(axis=1)`` of the outputs (logits); pass them for image outputs.
    """
    reference = np.asarray(reference, dtype=np.float64)
    candidate = np.asarray(candidate, dtype=np.float64)
    if reference.shape != candidate.shape:
        raise ParityError(
            f"output shapes differ: PyTorch {reference.shape} vs artifact {candidate.shape}"
        )
    if not np.all(np.isfinite(candidate)):
        return {"max_abs": float("inf"), "agreement": 0.0}
    if reference_labels is None:
        reference_labels = reference.argmax(axis=1)
    if candidate_labels is None:
        candidate_labels = candidate.argmax(axis=1)
    agreement = float(np.mean(np.asarray(reference_labels) == np.asarray(candidate_labels)))
    return {
        "max_abs": float(np.max(np.abs(reference - candidate), initial=0.0)),
        "agreement": agreement,
    }


@dataclass
class ParityResult:
    """Parity figures of one artifact: per input kind (``clean``, ``adversarial``)."""

    precision: str
    output: str  # "logits" or "pixels"
    n: int
    figures: dict[str, dict[str, float]]
    tolerance: dict[str, float]
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        parts = [
            f"{kind}: max|Δ| {f['max_abs']:.3g}, top-1 agreement {100 * f['agreement']:.1f}%"
            for kind, f in self.figures.items()
        ]
        return "; ".join(parts)


def gate(
    figures: dict[str, dict[str, float]],
    *,
    precision: str,
    output: str,
    n: int,
    artifact: str,
    tolerance: Tolerance,
) -> ParityResult:
    """Check ``figures`` (from :func:`compare_outputs`, per input kind) against ``tolerance``
    (the precision's, from :data:`advedge.export.precisions.PRECISIONS`, or the CLI's).

    Returns:
        The result, when every kind passes.

    Raises:
        ParityError: naming the artifact, the figure that failed, by how much, and the limit.
    """
    limit = tolerance.max_abs_logits if output == "logits" else tolerance.max_abs_pixels
    failures = []
    for kind, fig in figures.items():
        if not fig["max_abs"] <= limit:  # NaN/inf fail too
            failures.append(f"{kind} max|Δ| {fig['max_abs']:.3g} > {limit:g}")
        if fig["agreement"] < tolerance.min_agreement:
            failures.append(
                f"{kind} top-1 agreement {100 * fig['agreement']:.1f}% < "
                f"{100 * tolerance.min_agreement:.0f}%"
            )
    result = ParityResult(
        precision=precision,
        output=output,
        n=n,
        figures=figures,
        tolerance={"max_abs": limit, "min_agreement": tolerance.min_agreement},
        passed=not failures,
    )
    if failures:
        raise ParityError(
            f"parity failed for {artifact} ({precision}, {n} images): " + "; ".join(failures),
            "the artifact was not written",
        )
    return result

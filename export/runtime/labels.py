"""One human name per artifact, the same in bench.json, the console, the report and the plot."""

from __future__ import annotations

from advedge.export.runtime.base import RunnerInfo

__all__ = ["artifact_label", "unique_labels"]


def artifact_label(info: RunnerInfo, fallback: str) -> str:
    """One human name for an artifact, used everywhere it is shown: what runs in it (the
    classifier's architecture, ``purifier+`` in front for a purifier fused with it), its
    precision (``int8-qat`` for an INT8 artifact of ``advedge qat``, ``int8-ft`` for its FP32
    control, beside post-training quantisation's ``int8``) and its backend: ``"resnet8 int8 onnxruntime"``, ``"resnet8
    int8-qat onnxruntime"``, ``"purifier+resnet8 fp32 torch"``. ``fallback`` (the file name)
    stands in for an architecture the artifact does not record."""
    model = getattr(info, "model", None) or fallback
    if info.kind == "fused":
        model = f"purifier+{model}"
    elif info.kind == "purifier":
        model = f"purifier {model}" if getattr(info, "model", None) else "purifier"
    precision = info.precision or "unknown-precision"
    quantisation = getattr(info, "quantisation", None)
    if quantisation:
        precision = f"{precision}-{quantisation}"
    return " ".join((model, precision, info.backend))


def unique_labels(labels: list[str], names: list[str]) -> list[str]:
    """``labels`` with the file name added to each label two artifacts share, so that every
    label names one artifact."""
    counts = {label: labels.count(label) for label in labels}
    return [
        f"{label} ({name})" if counts[label] > 1 else label
        for label, name in zip(labels, names, strict=True)
    ]

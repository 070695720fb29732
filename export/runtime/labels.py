"""One human name per artifact, the same in bench.json, the console, the report and the plot."""

from __future__ import annotations

from typing import Any

from advedge.export.runtime.base import RunnerInfo

__all__ = ["artifact_label", "unique_labels"]


def artifact_label(info: RunnerInfo, fallback: str) -> str:
    """One human name for an artifact, used everywhere it is shown: what runs in it (the
    classifier's architecture, ``purifier+`` in front for a purifier fused with it), its
    precision and its backend: ``"resnet8 int8 onnxruntime"``, ``"purifier+resnet8 fp32
    torch"``. ``fallback`` (the file name) stands in for an architecture the artifact does
    not record."""
    model = getattr(info, "model", None) or fallback
    if info.kind == "fused":
        model = f"purifier+{model}"
    elif info.kind == "purifier":
        model = f"purifier {model}" if getattr(info, "model", None) else "purifier"
    return " ".join((model, info.precision or "unknown-precision", info.backend))


def unique_labels(results: list[dict[str, Any]]) -> None:
    """Labels that two artifacts share get the file name added, so each names one artifact."""
    seen: dict[str, int] = {}
    for r in results:
        seen[r["label"]] = seen.get(r["label"], 0) + 1
    for r in results:
        if seen[r["label"]] > 1:
            r["label"] = f"{r['label']} ({r['name']})"

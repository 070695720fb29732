"""Small real artifacts for the runner, bench, export and TensorRT tests (not doubles): a seeded
``tiny_cnn`` classifier, its run directory, its FP32 ONNX export with the metadata
``advedge export`` records, and a random calibration set."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from advedge.export.onnx_export import export_onnx

from advedge.checkpoint import save_model
from advedge.models import create_model
from advedge.utils import sha256_file

__all__ = [
    "SHAPE",
    "classifier_artifacts",
    "classifier_run",
    "random_calibration_set",
    "tiny_classifier",
]

SHAPE = [3, 32, 32]


def tiny_classifier(seed: int = 0) -> torch.nn.Module:
    """A ``tiny_cnn`` for 10 classes of 3x32x32 images, its weights drawn from ``seed``."""
    torch.manual_seed(seed)
    return create_model(
        "tiny_cnn", num_classes=10, in_channels=3, mean=[0.5] * 3, std=[0.25] * 3
    ).eval()


def classifier_run(run: Path, model: torch.nn.Module | None = None) -> Path:
    """A run directory ``run`` holding ``model`` (default: :func:`tiny_classifier`)."""
    run.mkdir(parents=True)
    save_model(
        model if model is not None else tiny_classifier(),
        run / "model.safetensors",
        metadata={"dataset": "tiny", "eps": 8 / 255, "input_shape": SHAPE},
    )
    return run


def classifier_artifacts(root: Path, name: str = "a", seed: int = 0) -> tuple[Path, Path]:
    """``root/run_<name>`` and ``root/<name>.fp32.onnx``: one seeded classifier as a run
    directory and as the FP32 ONNX exported from it (its source sha256 recorded)."""
    model = tiny_classifier(seed)
    run = classifier_run(root / f"run_{name}", model)
    onnx_path = export_onnx(
        model,
        root / f"{name}.fp32.onnx",
        input_shape=tuple(SHAPE),
        metadata={
            "kind": "classifier",
            "precision": "fp32",
            "input_shape": SHAPE,
            "source_sha256": sha256_file(run / "model.safetensors"),
        },
    )
    return run, onnx_path


def random_calibration_set(n: int = 64, *, size: int = 32, classes: int = 10) -> Any:
    """A :class:`~advedge.calibration.CalibrationSet` of ``n`` random uint8 ``size`` x ``size``
    RGB images (seed 0), labelled ``0, 1, ..., classes - 1`` in turn, none adversarial."""
    from advedge.calibration import CalibrationSet

    rng = np.random.default_rng(0)
    return CalibrationSet(
        x=rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
        y=np.arange(n, dtype=np.int64) % classes,
        is_adv=np.zeros(n, dtype=bool),
        meta={},
    )

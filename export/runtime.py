"""Runners: one call convention for the PyTorch model and an ONNX Runtime session.

A runner takes float32 NCHW images in [0, 1] as a numpy array and returns the graph's output
as a float32 numpy array, in batches. ``advedge bench`` times them; the parity gate and the
INT8 accuracy report compare them. Torch-free: ONNX Runtime is imported on construction.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from advedge.errors import ExportError

from ._deps import require
from .graph import check_external_data

__all__ = ["OrtRunner", "TorchRunner", "run_batched"]


def run_batched(fn: Any, x: np.ndarray, batch_size: int) -> np.ndarray:
    """Apply ``fn`` to ``x`` in batches and concatenate the results."""
    if len(x) == 0:
        raise ExportError("no images to run")
    outs = [fn(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    return np.concatenate(outs, axis=0)


class OrtRunner:
    """An ONNX Runtime inference session on one ONNX file.

    Args:
        path: The ``.onnx`` file (external-data paths are checked first).
        providers: Execution providers; default ``["CPUExecutionProvider"]``.
        threads: ``intra_op_num_threads`` (0 lets ONNX Runtime choose).
        optimization: ONNX Runtime's graph optimisation level: ``"all"`` (default: what a
            deployment runs; on a CPU it fuses Q/DQ pairs into int8 kernels), ``"basic"`` or
            ``"none"``. With ``"basic"`` a QDQ model is computed as written (quantise, dequantise,
            float op), which is the arithmetic TensorRT's int8 kernels reproduce; ONNX Runtime's
            x86 int8 kernels on CPUs without VNNI can saturate the int8 products instead.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        providers: list[str] | None = None,
        threads: int = 0,
        optimization: str = "all",
    ) -> None:
        ort = require("onnxruntime", purpose="running an ONNX artifact")
        levels = {
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        }
        if optimization not in levels:
            raise ExportError(f"unknown ONNX Runtime optimisation level {optimization!r}")
        self.optimization = optimization
        self.path = Path(path)
        if not self.path.is_file():
            raise ExportError(f"ONNX file not found: {self.path}")
        check_external_data(self.path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads)
        options.log_severity_level = 3
        options.graph_optimization_level = levels[optimization]
        try:
            self.session = ort.InferenceSession(
                str(self.path), options, providers=providers or ["CPUExecutionProvider"]
            )
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ExportError(f"ONNX Runtime cannot load {self.path}: {first[:300]}") from None
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ExportError(f"{self.path} has {len(inputs)} inputs; advedge artifacts have one")
        self.input_name = inputs[0].name
        self.input_shape = list(inputs[0].shape)
        self.output_name = self.session.get_outputs()[0].name

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        return self.session.run([self.output_name], {self.input_name: x})[0].astype(
            np.float32, copy=False
        )

    def run(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Run ``x`` (float32 NCHW) in batches of ``batch_size``."""
        return run_batched(self, x, batch_size)


class TorchRunner:
    """The PyTorch module, behind the same call convention (no gradients, eval mode)."""

    def __init__(self, module: Any, *, device: str = "cpu") -> None:
        self.torch = require("torch", purpose="running the PyTorch model")
        self.device = device
        self.module = module.to(device).eval()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.no_grad():
            out = self.module(
                torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)
            )
        return out.float().cpu().numpy()

    def run(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Run ``x`` (float32 NCHW) in batches of ``batch_size``."""
        return run_batched(self, x, batch_size)

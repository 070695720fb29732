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

__all__ = ["CONTROL_FLOW_OPS", "OrtRunner", "TorchRunner", "control_flow_nodes", "run_batched"]

# Nodes whose work is data-dependent: a Loop's trip count and condition, a Scan's sequence length
# and an If's branch are computed at run time, so a graph holding one can run without bound.
CONTROL_FLOW_OPS = frozenset({"Loop", "Scan", "If"})

# ONNX Runtime's logging: 3 is "error", so its warnings (unused initializers, shape notes, ANSI
# coloured) never reach a user's terminal beside advedge's own one-line messages.
ORT_LOG_SEVERITY = 3


def run_batched(fn: Any, x: np.ndarray, batch_size: int) -> np.ndarray:
    """Apply ``fn`` to ``x`` in batches and concatenate the results."""
    if len(x) == 0:
        raise ExportError("no images to run")
    outs = [fn(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    return np.concatenate(outs, axis=0)


def control_flow_nodes(path: str | os.PathLike[str]) -> list[str]:
    """The control-flow nodes (Loop, Scan, If) of an ONNX file, at any depth, as
    ``"OpType 'name'"``: the main graph, every subgraph and every model-local function.

    Raises:
        ExportError: an unreadable ONNX file.
    """
    onnx = require("onnx", purpose="checking an ONNX file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ExportError(
            f"{path} is not a readable ONNX file ({type(exc).__name__}: {exc})"
        ) from None
    found: list[str] = []

    def walk(nodes: Any) -> None:
        for node in nodes:
            if node.op_type in CONTROL_FLOW_OPS:
                found.append(f"{node.op_type} {node.name or '(unnamed)'!r}")
            for attr in node.attribute:
                if attr.HasField("g"):
                    walk(attr.g.node)
                for sub in attr.graphs:
                    walk(sub.node)

    walk(model.graph.node)
    for fn in model.functions:
        walk(fn.node)
    return found


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
        ort.set_default_logger_severity(ORT_LOG_SEVERITY)  # the environment's logger too
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
        options.log_severity_level = ORT_LOG_SEVERITY
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
        self.input_type = str(inputs[0].type)  # e.g. "tensor(float)"
        output = self.session.get_outputs()[0]
        self.output_name = output.name
        self.output_shape = list(output.shape or [])  # [] where ONNX Runtime cannot tell
        self.output_type = str(output.type)

    @property
    def min_batch(self) -> int:
        """The smallest batch the graph takes: its fixed batch size, or 1 when it is dynamic."""
        b = self.input_shape[0] if self.input_shape else None
        return b if isinstance(b, int) and b > 0 else 1

    @property
    def max_batch(self) -> int | None:
        """The largest batch the graph takes: its fixed batch size, or None when it is dynamic."""
        b = self.input_shape[0] if self.input_shape else None
        return b if isinstance(b, int) and b > 0 else None

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

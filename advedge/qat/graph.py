"""The trainable Q/DQ graph of robust QAT: one INT8 Q/DQ ONNX file (TensorRT's symmetric form) as
a ``torch.nn.Module`` whose FP32 weights and biases are parameters.

:func:`build_qat_graph` reads a file that :func:`advedge.calibration.quantize_qdq` wrote (BN
already folded into the convolutions, Q/DQ placed as TensorRT and ModelOpt place them, activation
scales calibrated) and computes exactly that graph, node by node, with the operators of the
white-box replica (:data:`~advedge.export.runtime.replica_ops.OPS`), so the two never compute a
node differently. What differs from the replica:

- **Trainable.** The FP32 initializer behind each weight QuantizeLinear, and every other FP32
  initializer a Conv, ConvTranspose, Gemm or MatMul takes after its data input (the biases, and
  the weights of layers the file keeps in FP32, such as the final linear layer), is an
  ``nn.Parameter``. Everything else (activation scales, zero points, the normalisation
  constants, shapes) stays fixed; constant subgraphs of it are computed once.
- **Weight scales follow the weights.** Each forward recomputes every weight's scale exactly as
  ONNX Runtime's quantiser computed it from the same weights (:func:`weight_scale`): per output
  channel (the QuantizeLinear's ``axis``) ``max(|min(w, 0)|, max(w, 0))``, divided by 127 in
  float64 and stored as float32, 1.0 where that is below float32's smallest normal; zero point 0.
  Written back with :func:`numpy_weight_scale` (the same arithmetic in numpy), the file's scales
  are what the quantiser would have written for the trained weights, bit for bit.
- **Straight-through fake quantisation.** The weights are rounded to int8 each forward and the
  gradient passes the rounding unchanged (the replica's QuantizeLinear, saturation gradient
  ``zero``; a symmetric max-abs scale never saturates a weight). The scale itself is detached:
  through the rounding's straight-through gradient ``round(w / s) * s`` does not depend on ``s``.
  Activation Q/DQ keep their calibrated scales, so the activations a training step sees are
  rounded and clipped as the artifact rounds and clips them, and so are the ones the inner attack
  differentiates.

TensorRT keeps the FP32 biases in FP32, and so does this graph; ONNX Runtime's CPU provider
rounds some of them (see :mod:`~advedge.export.runtime.replica`), one of the differences the
parity check of the written file measures. Torch and onnx are imported inside the functions.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from advedge.calibration.nodes import verify_qdq
from advedge.errors import ExportError
from advedge.export.runtime.replica import constant_value, read_graph
from advedge.export.runtime.replica_ops import OPS, Q_RANGES, Node

__all__ = [
    "WEIGHTED_OPS",
    "WeightQuant",
    "build_qat_graph",
    "numpy_weight_scale",
    "weight_scale",
]

#: The operators whose initializers after the data input are trainable.
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_INT8 = 3  # the ONNX element type of a symmetric int8 zero point
_TINY = float(np.finfo(np.float32).tiny)
_QDQ = ("QuantizeLinear", "DequantizeLinear")


@dataclass(frozen=True)
class WeightQuant:
    """One weight's Q/DQ pair: the FP32 initializer quantised, its scale's name and its axis
    (None: one scale for the whole tensor)."""

    weight: str
    scale: str
    axis: int | None


def _reduced_axes(ndim: int, axis: int | None) -> tuple[int, ...]:
    return tuple(i for i in range(ndim) if axis is None or i != axis % ndim)


def numpy_weight_scale(w: np.ndarray, axis: int | None) -> np.ndarray:
    """ONNX Runtime's symmetric int8 weight scale of ``w`` (per channel along ``axis``, or one
    for the tensor when ``axis`` is None), float32; see the module docstring."""
    red = _reduced_axes(w.ndim, axis)
    lo = np.minimum(w.min(axis=red), 0).astype(np.float64)
    hi = np.maximum(w.max(axis=red), 0).astype(np.float64)
    scale = np.maximum(np.abs(lo), np.abs(hi)) * 2 / 254
    return np.where(scale < _TINY, 1.0, scale).astype(np.float32)


def weight_scale(w: Any, axis: int | None) -> Any:
    """:func:`numpy_weight_scale` in torch, without a gradient (float64 where the device has
    it, as ONNX Runtime computes it)."""
    import torch

    with torch.no_grad():
        red = _reduced_axes(w.dim(), axis)
        absmax = w.detach().abs().amax(dim=red) if red else w.detach().abs()
        wide = torch.float32 if w.device.type == "mps" else torch.float64
        scale = absmax.to(wide) * 2 / 254
        return torch.where(scale < _TINY, torch.ones_like(scale), scale).to(torch.float32)


@functools.cache
def _graph_class() -> type:
    """The module's class (made here so that torch is imported only when it is used)."""
    import torch

    class QatGraph(torch.nn.Module):
        """A Q/DQ ONNX graph with trainable weights (see the module docstring).

        Attributes:
            path: The file it was built from.
            weight_names: The ONNX initializer of each parameter ``params[i]``.
            weight_quants: The weights quantised by a Q/DQ pair, with their scales.
            num_classes: The logits' last dimension, where the file declares it.
            fake_quant: Whether the Q/DQ pairs quantise (default); False computes the graph
                with every Q/DQ pair as the identity, the same network in FP32 (the control
                run of ``advedge qat --no-fake-quant``).
        """

        def __init__(self, plan: dict[str, Any]) -> None:
            super().__init__()
            self.path: Path = plan["path"]
            self.input_name: str = plan["input"]
            self.output_name: str = plan["output"]
            self.steps: list[Node] = plan["steps"]
            self.weight_names: list[str] = list(plan["weights"])
            self.weight_quants: list[WeightQuant] = plan["quants"]
            self.num_classes = plan["num_classes"]
            self.fake_quant = True
            self.params = torch.nn.ParameterList(
                [torch.nn.Parameter(v.clone()) for v in plan["weights"].values()]
            )
            self._index = {name: i for i, name in enumerate(self.weight_names)}
            self._constants: dict[str, str] = {}
            for k, (name, value) in enumerate(plan["constants"].items()):
                self._constants[name] = f"c{k}"
                self.register_buffer(f"c{k}", value, persistent=False)

        @contextlib.contextmanager
        def quantising(self) -> Iterator[None]:
            """Fake quantisation on for the block (what ships), then as it was: scoring and
            parity never change the mode a run trains in (the ``--no-fake-quant`` control)."""
            before = self.fake_quant
            self.fake_quant = True
            try:
                yield
            finally:
                self.fake_quant = before

        def weight(self, name: str) -> Any:
            """The parameter of the ONNX initializer ``name``."""
            return self.params[self._index[name]]

        def weights(self) -> dict[str, Any]:
            """Every trainable initializer by its ONNX name."""
            return {name: self.params[i] for name, i in self._index.items()}

        def forward(self, x: Any) -> Any:
            env: dict[str, Any] = {n: getattr(self, a) for n, a in self._constants.items()}
            env.update(self.weights())
            if self.fake_quant:  # the scales are read by Q/DQ nodes only
                for q in self.weight_quants:
                    env[q.scale] = weight_scale(env[q.weight], q.axis)
            env[self.input_name] = x.to(torch.float32)
            for node in self.steps:
                if not self.fake_quant and node.op in _QDQ:
                    env[node.outputs[0]] = env[node.inputs[0]]
                    continue
                env[node.outputs[0]] = OPS[node.op](
                    node, [env[n] if n else None for n in node.inputs]
                )
            return env[self.output_name]

    return QatGraph


def _check_node(proto: Any, node: Node, path: Path, elem: dict[str, int]) -> None:
    """Refuse an operator the replica's operators lack; set a QuantizeLinear's saturation range
    and gradient (as the replica does)."""
    if node.op not in OPS or proto.domain not in ("", "ai.onnx"):
        raise ExportError(
            f"{path.name}: QAT has no operator {proto.domain or 'ai.onnx'}::{node.op} "
            f"(node {node.name!r})",
            "covered: " + ", ".join(sorted(OPS)),
        )
    if node.op == "QuantizeLinear":
        if node.attr("block_size", 0) or "output_dtype" in node.attrs:
            raise node.refuse("blocked or output_dtype quantisation")
        zp = node.inputs[2] if len(node.inputs) > 2 else ""
        if not zp or elem.get(zp) != _INT8:
            raise node.refuse("a zero point that is not a constant int8 (TensorRT's form)")
        node.attrs["_range"] = Q_RANGES[_INT8]
        node.attrs["_saturation_grad"] = "zero"


def _weight_quants(graph: Any, floats: dict[str, np.ndarray]) -> list[WeightQuant]:
    """The QuantizeLinear nodes of FP32 initializers, each scale read by its pair alone."""
    readers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    quants = []
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] not in floats:
            continue
        w, scale = floats[node.input[0]], floats.get(node.input[1])
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if scale is None:
            raise ExportError(f"the scale of weight {node.input[0]!r} is not an FP32 constant")
        if scale.size != 1 and (scale.ndim != 1 or scale.size != w.shape[axis % w.ndim]):
            raise ExportError(f"the scale of weight {node.input[0]!r} does not fit axis {axis}")
        pair = {id(node)} | {id(n) for n in readers.get(node.output[0], [])}
        if any(id(r) not in pair for r in readers[node.input[1]]):
            raise ExportError(
                f"the scale {node.input[1]!r} of weight {node.input[0]!r} is shared with another "
                "node; QAT recomputes it from the weight"
            )
        quants.append(WeightQuant(node.input[0], node.input[1], axis if scale.size > 1 else None))
    return quants


def _trainable(graph: Any, floats: dict[str, np.ndarray], quants: list[WeightQuant]) -> list[str]:
    """The initializers trained, in graph order: the quantised weights, then the FP32
    initializers a weighted op takes after its data input."""
    names = [q.weight for q in quants]
    scales = {q.scale for q in quants}
    for node in graph.node:
        if node.op_type in WEIGHTED_OPS:
            names += [n for n in node.input[1:] if n in floats and n not in scales]
    return list(dict.fromkeys(names))


def _fold(node: Node, consts: dict[str, Any]) -> bool:
    """Compute a node whose inputs are all fixed constants once; returns whether it was."""
    import torch

    if node.op == "Constant":  # read as the replica reads it, every value attribute
        consts[node.outputs[0]] = _tensor(constant_value(node))
        return True
    known = [n for n in node.inputs if n]
    if node.op == "Shape" or not known or not all(n in consts for n in known):
        return False
    with torch.no_grad():
        consts[node.outputs[0]] = OPS[node.op](
            node, [consts[n] if n else None for n in node.inputs]
        )
    return True


def _tensor(array: np.ndarray) -> Any:
    import torch

    if array.dtype.kind == "f":
        if array.dtype != np.float32:
            raise ExportError(f"QAT needs an FP32 graph around its Q/DQ pairs, not {array.dtype}")
        return torch.from_numpy(np.array(array, dtype=np.float32))
    if array.dtype.kind in "iub":
        return torch.from_numpy(np.array(array, dtype=np.int64))
    raise ExportError(f"QAT cannot hold a constant of type {array.dtype}")


def _plan(model: Any, path: Path) -> dict[str, Any]:
    """Check every node, choose the parameters, fold the fixed constants, list the steps."""
    from onnx import numpy_helper

    graph = model.graph
    arrays = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    floats = {k: v for k, v in arrays.items() if v.dtype.kind == "f"}
    inputs = [i for i in graph.input if i.name not in arrays]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise ExportError(f"{path.name}: QAT needs one graph input and one output")
    quants = _weight_quants(graph, floats)
    trained = _trainable(graph, floats, quants)
    derived = {q.scale for q in quants} | set(trained)
    consts = {k: _tensor(v) for k, v in arrays.items() if k not in derived}
    elem = {i.name: i.data_type for i in graph.initializer}
    steps = []
    for proto in graph.node:
        node = Node(proto)
        _check_node(proto, node, path, elem)
        if not _fold(node, consts):
            if len(node.outputs) != 1:
                raise node.refuse(f"{len(node.outputs)} outputs")
            steps.append(node)
    used = {n for s in steps for n in s.inputs} | {graph.output[0].name}
    dims = graph.output[0].type.tensor_type.shape.dim
    return {
        "path": path,
        "input": inputs[0].name,
        "output": graph.output[0].name,
        "steps": steps,
        "weights": {n: _tensor(floats[n]) for n in trained},
        "quants": quants,
        "constants": {k: v for k, v in consts.items() if k in used},
        "num_classes": dims[-1].dim_value if dims and dims[-1].dim_value else None,
    }


def build_qat_graph(path: str | os.PathLike[str]) -> Any:
    """The trainable graph of the INT8 Q/DQ ONNX file at ``path``, on the CPU, in train mode.

    Raises:
        ExportError: an unreadable file, a graph that is not TensorRT's symmetric int8 Q/DQ form
            (:func:`~advedge.calibration.nodes.verify_qdq`), or an operator or layout it cannot
            train (named).
    """
    path = Path(path)
    model = read_graph(path, "QAT")
    try:
        verify_qdq(model)
    except ExportError as exc:
        raise ExportError(
            f"{path.name} is not a symmetric int8 Q/DQ graph: {exc.message}",
            "QAT starts from advedge export --precision int8 (--int8-target tensorrt)",
        ) from None
    graph = _graph_class()(_plan(model, path))
    if not graph.weight_quants:
        raise ExportError(f"{path.name} quantises no weight: nothing for QAT to train")
    return graph

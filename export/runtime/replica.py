"""A differentiable PyTorch replica of an exported ONNX graph: the white-box attack's model of
the artifact's own arithmetic.

:func:`build_replica` reads an ONNX file (FP32, FP16, or INT8 Q/DQ in either of advedge's forms:
symmetric int8 for TensorRT, or ONNX Runtime's CPU form with uint8 activations, zero points and
int8 weights and int32 biases stored quantised) and returns a ``torch.nn.Module`` that computes
exactly that graph, node by node, in FP32:

- **QuantizeLinear** is ONNX's own formula, ``q = saturate(round(x / scale) + zero_point)``, with
  round-half-to-even (``torch.round``) and saturation to the zero point's type (int8
  ``[-128, 127]``, uint8 ``[0, 255]``, int16, uint16), per tensor or per channel along ``axis``;
  **DequantizeLinear** is ``(q - zero_point) * scale``. The same scales, zero points and axes as
  the file, and every node the file keeps in FP32 stays FP32.
- **Gradient (BPDA / straight-through estimator).** Rounding has a zero gradient almost
  everywhere, which masks a white-box attack; its backward is the identity (Bengio et al. 2013;
  BPDA, Athalye et al. 2018), so a Q -> DQ pair passes the gradient unchanged **inside** its
  clip range. Outside it, saturation is a real, piecewise-linear part of the artifact's
  function, not a masking artefact: its true derivative is zero there, and that is what the
  replica uses by default (``saturation_grad="zero"``; ``"pass"`` passes the gradient through
  the clip too). Zero is the stronger attack where measured (CIFAR-10, the ResNet-8 PGD-AT
  student, 200 test images, APGD-CE then APGD-T, 20 iterations, scored on the artifact): the
  same 20.0% robust either way on the TensorRT form (and 31.5% either way on a ResNet-20), but
  20.0% with ``"zero"`` against 26.5% with ``"pass"`` on the ONNX Runtime CPU form. There the
  quantiser drops each ReLU, because a uint8 QuantizeLinear whose range starts at 0 saturates
  exactly like it: the saturation *is* the activation function, and passing its gradient
  differentiates a network without ReLUs.
- **FP16 graphs** are computed in FP32 with every FP16 value rounded to FP16 where the graph
  stores one (straight-through too), which is how ONNX Runtime's CPU provider runs most FP16
  nodes (cast to FP32, compute, cast back).
- **ONNX Runtime's own rewrite.** From optimisation level ``basic`` (bench runs ``all``), ONNX
  Runtime quantises the FP32 bias of a Conv or Gemm whose input is dequantised per tensor,
  whose weights are dequantised and whose output reaches a QuantizeLinear through nothing but
  Relu or Clip (its ``WeightBiasQuantization`` transformer): ``bias = round(bias / s) * s``
  with ``s = input scale * weight scale``, int32. With ``ort_bias_quantization`` (default)
  the replica does the same, so that it computes what the artifact computes under ONNX
  Runtime; TensorRT keeps such biases in FP32 (``ort_bias_quantization=False``).
  ``replica.ort_rewrites`` counts the biases rewritten.
- Constant subgraphs (the dequantised weights and biases, reshaped scales) are computed once
  when the replica is built and kept as buffers, so ``.to(device)`` moves them.

Operators covered (every one that advedge's exports of the tiny_cnn, resnet8/18/20,
preact_resnet18, wide_resnet and mobilenetv2 classifiers and of the fused purifier + classifier,
nearest or bilinear, contain in FP32, FP16 and both INT8 forms, plus a few that other exporters
write for the same layers): :data:`~advedge.export.runtime.replica_ops.OPS`. Any other operator,
or an attribute value outside what is implemented, is an :class:`~advedge.errors.ExportError`
naming it, when the replica is built.

**How close it gets.** Bit-exact it is not: a convolution sums in another order than ONNX
Runtime's kernels, and where a sum lands within that rounding of a quantisation tie the two round
to neighbouring integers; in a deep, wide graph such one-step differences add up. Measured on
CIFAR-10 test images against ONNX Runtime 1.32 (CPU, level ``all``): top-1 agreement 100% on the
trained ResNet-8 and ResNet-20 INT8 exports (max |Δ| of the logits 0.0013 and 0.087) and on
random-weight tiny_cnn, resnet8, wide_resnet, mobilenetv2 and fused purifier graphs in every
form; 98-99.6% on random-weight ResNet-18 and PreAct-ResNet-18 INT8 graphs, whose logits lie
close together. bench measures it on every artifact and refuses a white-box figure below 99.5%
(:mod:`~advedge.export.runtime.whitebox`).

Torch-free at import: torch and onnx are imported inside the functions.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import numpy as np
from advedge.export.runtime.replica_ops import FLOAT16, OPS, Q_RANGES, Node, ste

from advedge.errors import ExportError

__all__ = ["SATURATION_GRADS", "build_replica", "constant_value", "read_graph"]

#: How the gradient passes a QuantizeLinear's saturation (see the module docstring).
SATURATION_GRADS = ("zero", "pass")


def _to_tensor(array: np.ndarray) -> tuple[Any, bool]:
    """A constant as the replica holds it: floats as float32 (and whether it was FP16),
    integers as int64."""
    import torch

    if array.dtype.kind == "f":
        value = torch.from_numpy(np.array(array, dtype=np.float32))  # a writable copy
        return value, array.dtype == np.float16
    if array.dtype.kind in "iub":
        return torch.from_numpy(np.array(array, dtype=np.int64)), False
    raise ExportError(f"the white-box replica cannot hold a constant of type {array.dtype}")


def constant_value(node: Node) -> np.ndarray:
    """The value of a Constant node, from whichever value attribute it carries."""
    from onnx import numpy_helper

    for key, value in node.attrs.items():
        if key == "value":
            return numpy_helper.to_array(value)
        if key in ("value_float", "value_floats"):
            return np.array(value, dtype=np.float32)
        if key in ("value_int", "value_ints"):
            return np.array(value, dtype=np.int64)
    raise node.refuse("no value attribute it implements")


@functools.cache
def _replica_class() -> type:
    """The replica's ``nn.Module`` class (made here so that torch is imported only when used)."""
    import torch

    class OnnxReplica(torch.nn.Module):
        """The graph of one ONNX file as a differentiable module (see the module docstring)."""

        def __init__(self, plan: dict[str, Any]) -> None:
            super().__init__()
            self.path: Path = plan["path"]
            self.input_name: str = plan["input"]
            self.output_name: str = plan["output"]
            self.steps: list[Node] = plan["steps"]
            self.half: set[str] = plan["half"]
            self.saturation_grad: str = plan["saturation_grad"]
            self.ort_rewrites: int = plan["ort_rewrites"]
            self.num_classes = plan["num_classes"]
            self._names: dict[str, str] = {}
            for k, (name, value) in enumerate(plan["constants"].items()):
                self._names[name] = f"c{k}"
                self.register_buffer(f"c{k}", value, persistent=False)

        def forward(self, x: Any) -> Any:
            env = {name: getattr(self, attr) for name, attr in self._names.items()}
            x = x.to(torch.float32)
            env[self.input_name] = ste(x, x.half().float()) if self.input_name in self.half else x
            for node in self.steps:
                out = OPS[node.op](node, [env[n] if n else None for n in node.inputs])
                if node.outputs[0] in self.half:  # an FP16 value of the graph
                    out = ste(out, out.half().float())
                env[node.outputs[0]] = out
            return env[self.output_name]

    return OnnxReplica


def _half_output(node: Node, half: set[str], graph_types: dict[str, int]) -> bool:
    """Whether a node's output is FP16: a Cast to FP16, a DequantizeLinear with FP16 scales, or
    an op on FP16 floats (ONNX ops take one float type)."""
    if node.op == "Cast":
        return node.attr("to") == FLOAT16
    if node.op in ("QuantizeLinear", "Shape"):
        return False
    if node.op == "DequantizeLinear":
        return node.inputs[1] in half
    if graph_types.get(node.outputs[0]):
        return graph_types[node.outputs[0]] == FLOAT16
    return any(n in half for n in node.inputs if n)


def _check_node(proto: Any, node: Node, path: Path, elem: dict[str, int], grad: str) -> None:
    """Refuse an operator or attribute the replica does not implement; note a QuantizeLinear's
    saturation range (from its zero point's type) and gradient."""
    import onnx

    if node.op not in OPS or proto.domain not in ("", "ai.onnx"):
        raise ExportError(
            f"{path.name}: the white-box replica has no operator "
            f"{proto.domain or 'ai.onnx'}::{node.op} (node {node.name!r})",
            "covered: " + ", ".join(sorted(OPS)),
        )
    if any(a.type == onnx.AttributeProto.GRAPH for a in proto.attribute):
        raise node.refuse("a subgraph attribute")
    if node.op == "QuantizeLinear":
        if node.attr("block_size", 0) or "output_dtype" in node.attrs:
            raise node.refuse("blocked or output_dtype quantisation")
        zp_type = elem.get(node.inputs[2], -1) if len(node.inputs) > 2 and node.inputs[2] else 2
        if zp_type not in Q_RANGES:
            raise node.refuse(f"a zero point of ONNX type {zp_type} (int8, uint8, int16, uint16)")
        node.attrs["_range"] = Q_RANGES[zp_type]
        node.attrs["_saturation_grad"] = grad


def _reaches_quantize(node: Node, consumers: dict[str, list[Node]]) -> bool:
    """Whether ``node``'s output flows, without branching, through Relu/Clip only into a
    QuantizeLinear (ONNX Runtime's condition for rewriting the bias)."""
    current = node
    while True:
        users = consumers.get(current.outputs[0], [])
        if len(users) != 1:
            return False
        if users[0].op == "QuantizeLinear":
            return True
        if users[0].op not in ("Relu", "Clip"):
            return False
        current = users[0]


def _ort_bias(nodes: list[Node], consts: dict[str, Any], inits: set[str]) -> int:
    """ONNX Runtime's bias quantisation (see the module docstring), applied to ``consts``: each
    rewritten Conv/Gemm gets its own rounded bias. Returns how many were rewritten."""
    import torch

    producer = {o: n for n in nodes for o in n.outputs}
    consumers: dict[str, list[Node]] = {}
    for n in nodes:
        for i in n.inputs:
            consumers.setdefault(i, []).append(n)
    done = 0
    for node in nodes:
        if node.op not in ("Conv", "Gemm") or len(node.inputs) < 3 or node.inputs[2] not in inits:
            continue
        dq_x, dq_w = producer.get(node.inputs[0]), producer.get(node.inputs[1])
        if not (dq_x and dq_w and dq_x.op == dq_w.op == "DequantizeLinear"):
            continue
        s_x, s_w = consts.get(dq_x.inputs[1]), consts.get(dq_w.inputs[1])
        bias = consts[node.inputs[2]]
        if s_x is None or s_w is None or s_x.numel() != 1 or bias.dim() != 1:
            continue
        if s_w.numel() != 1:  # per channel: along the output axis, one scale per bias value
            axis = 0 if node.op == "Conv" or node.attr("transB", 0) else 1
            w_rank = consts[dq_w.inputs[0]].dim() if dq_w.inputs[0] in consts else None
            if s_w.numel() != bias.numel() or dq_w.attr("block_size", 0) or w_rank is None:
                continue
            if dq_w.attr("axis", 1) % w_rank != axis:
                continue
        if not _reaches_quantize(node, consumers):
            continue
        scale = (s_x.reshape(()) * s_w.reshape(-1)).to(torch.float32)
        rounded = torch.round(bias / scale).clamp(-(2**31), 2**31 - 1)
        name = f"{node.inputs[2]}::ort_int32_bias:{node.name}"
        consts[name] = rounded * scale
        node.inputs[2] = name
        done += 1
    return done


def _fold(node: Node, consts: dict[str, Any], half: set[str]) -> bool:
    """Compute a node whose inputs are all constants once (the dequantised weights, a scale);
    returns whether it was folded."""
    import torch

    if node.op == "Constant":
        consts[node.outputs[0]], is_half = _to_tensor(constant_value(node))
        if is_half:
            half.add(node.outputs[0])
        return True
    known = [n for n in node.inputs if n]
    if node.op == "Shape" or not known or not all(n in consts for n in known):
        return False
    with torch.no_grad():
        out = OPS[node.op](node, [consts[n] if n else None for n in node.inputs])
        consts[node.outputs[0]] = out.half().float() if node.outputs[0] in half else out
    return True


def _plan(model: Any, path: Path, saturation_grad: str, ort_bias: bool) -> dict[str, Any]:
    """Check every node, fold the constant subgraphs and list the steps the replica runs."""
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in inits]
    if len(inputs) != 1 or not graph.output:
        raise ExportError(f"{path.name}: the replica needs one graph input and an output")
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.output]}
    consts: dict[str, Any] = {}
    half: set[str] = set()
    elem = {i.name: i.data_type for i in graph.initializer}
    for init in graph.initializer:
        consts[init.name], is_half = _to_tensor(numpy_helper.to_array(init))
        if is_half:
            half.add(init.name)
    if inputs[0].type.tensor_type.elem_type == FLOAT16:
        half.add(inputs[0].name)
    nodes = [Node(p) for p in graph.node]
    steps: list[Node] = []
    for proto, node in zip(graph.node, nodes, strict=True):
        _check_node(proto, node, path, elem, saturation_grad)
        if _half_output(node, half, types):
            half.add(node.outputs[0])
        if not _fold(node, consts, half):
            if len(node.outputs) != 1:
                raise node.refuse(f"{len(node.outputs)} outputs")
            steps.append(node)
    rewrites = _ort_bias(nodes, consts, inits) if ort_bias else 0
    used = {n for s in steps for n in s.inputs} | {graph.output[0].name}
    dims = graph.output[0].type.tensor_type.shape.dim
    return {
        "path": path,
        "input": inputs[0].name,
        "output": graph.output[0].name,
        "steps": steps,
        "half": half,
        "constants": {k: v for k, v in consts.items() if k in used},
        "saturation_grad": saturation_grad,
        "ort_rewrites": rewrites,
        "num_classes": dims[-1].dim_value if dims and dims[-1].dim_value else None,
    }


def read_graph(path: Path, reader: str) -> Any:
    """An ONNX file loaded for a torch interpreter of its graph (``reader`` names it in errors).

    Raises:
        ExportError: an unreadable file, or an opset below 13 (per-channel Q/DQ needs 13).
    """
    import onnx

    try:
        model = onnx.load(str(path))
    except Exception as exc:
        raise ExportError(f"cannot read {path}: {str(exc).splitlines()[0][:300]}") from None
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None and opset < 13:
        raise ExportError(f"{path.name}: opset {opset}; {reader} reads opset 13 and newer")
    return model


def build_replica(
    path: str | os.PathLike[str],
    *,
    saturation_grad: str = "zero",
    ort_bias_quantization: bool = True,
) -> Any:
    """The differentiable replica of the ONNX graph in ``path``, in eval mode on the CPU.

    Args:
        path: An ONNX file (FP32, FP16 or INT8 Q/DQ).
        saturation_grad: ``"zero"`` or ``"pass"`` (:data:`SATURATION_GRADS`).
        ort_bias_quantization: Round the biases ONNX Runtime rounds (see the module docstring).

    Raises:
        ExportError: an unreadable file, or an operator or attribute the replica does not
            implement (named).
        ValueError: an unknown ``saturation_grad``.
    """
    if saturation_grad not in SATURATION_GRADS:
        raise ValueError(f"saturation_grad must be one of {SATURATION_GRADS}")
    path = Path(path)
    model = read_graph(path, "the replica")
    plan = _plan(model, path, saturation_grad, ort_bias_quantization)
    return _replica_class()(plan).eval()

"""The nodes of a graph being quantised: names for unnamed nodes, the FP32 policy (which nodes
stay FP32) and the check that a Q/DQ graph is one TensorRT accepts.

Torch-free; ``onnx`` is imported inside the functions.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from advedge.export._deps import require

from advedge.errors import ExportError, UsageError, did_you_mean

logger = logging.getLogger(__name__)

__all__ = ["count_quantize_nodes", "name_unnamed_nodes", "select_fp32_nodes", "verify_qdq"]

_LINEAR_OPS = ("Gemm", "MatMul")
_HEAD_CHAIN_OPS = ("Mul", "Add", "Clip")


def name_unnamed_nodes(model: Any) -> int:
    """Give every unnamed node of ``model.graph`` the name ``advedge_<op>_<index>``, in place.

    ``index`` is the node's position in the graph, so the names depend only on the graph; a
    name already taken gets a ``_<k>`` suffix. ONNX Runtime excludes nodes from quantisation
    by name, so unnamed nodes could not be kept in FP32 otherwise. Returns how many were named.
    """
    taken = {n.name for n in model.graph.node if n.name}
    named = 0
    for index, node in enumerate(model.graph.node):
        if node.name:
            continue
        base = f"advedge_{node.op_type.lower()}_{index}"
        name, k = base, 1
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        node.name = name
        taken.add(name)
        named += 1
    return named


def select_fp32_nodes(model: Any, policy: str | Sequence[str] = "auto") -> list[str]:
    """Names of the nodes to keep in FP32 under ``policy``, in graph order.

    ``"auto"`` keeps two parts of the network in FP32:

    (a) **The purifier's output head.** For every Tanh node: the Conv that produces its input,
        the Tanh, and the chain of Mul/Add/Clip nodes that consume its output, up to and
        including the first Clip, i.e. ``clamp(x + eps_r * tanh(conv(h)), 0, 1)``. A Tanh whose
        chain reaches no Clip is not a purifier head and is left alone. Why: the inverse
        perturbation ``r`` is a small correction bounded by ``eps_r ~ 10/255``, and it must
        cancel an adversarial perturbation of ``8/255``. Quantising ``x + r`` over its range
        ``[-eps_r, 1 + eps_r]`` to INT8 gives steps of ``~1/127 ~ 2/255``, as coarse as a
        quarter of the correction, and the Tanh/Mul outputs would add their own rounding; the
        head is one small convolution, so FP32 costs little.
    (b) **The classifier's final linear layer.** The node producing each graph output when it
        is a Gemm or MatMul, or an Add of a constant bias onto a MatMul/Gemm (both nodes are
        kept). Why: it keeps the logits, whose differences decide the class, precise, and it
        costs well under 0.1% of the FLOPs of a convolutional classifier.

    ``"none"`` keeps nothing in FP32. A list of node names keeps exactly those.

    Args:
        model: An ``onnx.ModelProto`` (the pre-processed graph that will be quantised).
        policy: ``"auto"``, ``"none"`` or a list of node names.

    Raises:
        UsageError: an unknown policy string, or a listed name that is not a node of the graph.
        ExportError: ``auto`` chose a node that has no name (call :func:`name_unnamed_nodes`).
    """
    nodes = list(model.graph.node)
    names = [n.name for n in nodes]
    if isinstance(policy, str):
        if policy == "none":
            return []
        if policy != "auto":
            raise UsageError(
                f"unknown FP32 policy {policy!r}",
                "use auto, none, or a list of node names",
            )
        chosen = _auto_fp32_nodes(model)
        unnamed = [n.op_type for n in chosen if not n.name]
        if unnamed:
            raise ExportError(
                f"cannot keep unnamed {', '.join(unnamed)} node(s) in FP32",
                "name the graph's nodes first (name_unnamed_nodes)",
            )
        keep = {id(n) for n in chosen}
        return [n.name for n in nodes if id(n) in keep]
    wanted = [str(p) for p in policy]
    known = set(names)
    for name in wanted:
        if name not in known:
            raise UsageError(
                f"no node named {name!r} in the graph to keep in FP32",
                did_you_mean(name, [n for n in names if n]) if any(names) else None,
            )
    want = set(wanted)
    return [name for name in names if name in want]


def _auto_fp32_nodes(model: Any) -> list[Any]:
    graph = model.graph
    producer: dict[str, Any] = {}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for out in node.output:
            producer[out] = node
        for inp in node.input:
            consumers.setdefault(inp, []).append(node)
    constants = {i.name for i in graph.initializer} | {
        out for n in graph.node if n.op_type == "Constant" for out in n.output
    }
    chosen: list[Any] = []

    # (a) purifier heads: Conv -> Tanh -> Mul/Add ... -> Clip
    for tanh in (n for n in graph.node if n.op_type == "Tanh"):
        chain: list[Any] = []
        reached_clip = False
        frontier = list(tanh.output)
        seen: set[int] = set()
        while frontier:
            tensor = frontier.pop()
            for node in consumers.get(tensor, []):
                if node.op_type not in _HEAD_CHAIN_OPS or id(node) in seen:
                    continue
                seen.add(id(node))
                chain.append(node)
                if node.op_type == "Clip":
                    reached_clip = True
                else:
                    frontier.extend(node.output)
        if not reached_clip:
            logger.debug("Tanh %r reaches no Clip: not a purifier head", tanh.name)
            continue
        conv = producer.get(tanh.input[0]) if tanh.input else None
        if conv is not None and conv.op_type == "Conv":
            chosen.append(conv)
        chosen.append(tanh)
        chosen.extend(chain)

    # (b) the classifier's final linear layer
    for out in graph.output:
        node = producer.get(out.name)
        if node is None:
            continue
        if node.op_type in _LINEAR_OPS:
            chosen.append(node)
        elif node.op_type == "Add" and len(node.input) == 2:
            for a, b in (node.input, reversed(node.input)):
                src = producer.get(a)
                if src is not None and src.op_type in _LINEAR_OPS and b in constants:
                    chosen.extend([src, node])
                    break
    return chosen


# --------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------


def verify_qdq(model: Any) -> int:
    """Check a Q/DQ model for TensorRT and return its number of Q -> DQ pairs.

    Every QuantizeLinear and DequantizeLinear must have a constant INT8 zero point equal to 0
    (TensorRT accepts only symmetric quantisation); a constant input of a DequantizeLinear must
    be INT8 (TensorRT cannot dequantise INT32, e.g. quantised biases).

    Raises:
        ExportError: on the first violation, or when the graph has no Q -> DQ pair at all.
    """
    numpy_helper = require("onnx.numpy_helper", purpose="INT8 calibration")
    graph = model.graph
    consts: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute:
            for attr in node.attribute:
                if attr.name == "value":
                    consts[node.output[0]] = numpy_helper.to_array(attr.t)
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for inp in node.input:
            consumers.setdefault(inp, []).append(node)

    pairs = 0
    for node in graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        label = node.name or node.output[0]
        zp_name = node.input[2] if len(node.input) > 2 else ""
        if not zp_name:
            if node.op_type == "QuantizeLinear":
                raise ExportError(
                    f"QuantizeLinear {label!r} has no zero point, so it quantises to uint8",
                    "TensorRT needs int8 with zero point 0",
                )
        else:
            zp = consts.get(zp_name)
            if zp is None:
                raise ExportError(f"the zero point of {node.op_type} {label!r} is not a constant")
            if zp.dtype != np.int8:
                raise ExportError(
                    f"{node.op_type} {label!r} has a {zp.dtype} zero point; TensorRT needs int8"
                )
            if np.any(zp != 0):
                raise ExportError(
                    f"{node.op_type} {label!r} has a non-zero zero point "
                    f"(TensorRT rejects asymmetric quantisation)",
                    "quantise with symmetric activations and weights",
                )
        if node.op_type == "DequantizeLinear":
            data = consts.get(node.input[0])
            if data is not None and data.dtype != np.int8:
                raise ExportError(
                    f"DequantizeLinear {label!r} dequantises a {data.dtype} constant; "
                    "TensorRT accepts only int8 there"
                )
        else:
            if any(c.op_type == "DequantizeLinear" for c in consumers.get(node.output[0], [])):
                pairs += 1
    if pairs == 0:
        raise ExportError(
            "quantisation inserted no Q/DQ pair: nothing in the graph was quantised",
            "check that the model has Conv/Gemm/MatMul layers outside the FP32 set",
        )
    return pairs


def count_quantize_nodes(model: Any) -> int:
    """Q/DQ nodes of a model that is not meant for TensorRT (no symmetric-int8 checks)."""
    n = sum(1 for node in model.graph.node if node.op_type == "QuantizeLinear")
    if n == 0:
        raise ExportError("quantisation inserted no QuantizeLinear: nothing was quantised")
    return n

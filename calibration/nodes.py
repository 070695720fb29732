"""The nodes of a graph being quantised: names for unnamed nodes, the FP32 policy (which nodes
stay FP32), where TensorRT's form puts its Q/DQ pairs, and the check that a Q/DQ graph is one
TensorRT accepts.

Torch-free; ``onnx`` is imported inside the functions.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from advedge.export._deps import require

from advedge.errors import ExportError, UsageError, did_you_mean

logger = logging.getLogger(__name__)

__all__ = [
    "TRT_QUANTIZED_OPS",
    "TrtPlacement",
    "count_quantize_nodes",
    "name_unnamed_nodes",
    "qdq_edges",
    "remove_input_qdq",
    "select_fp32_nodes",
    "trt_placement",
    "verify_qdq",
]

_LINEAR_OPS = ("Gemm", "MatMul")
_HEAD_CHAIN_OPS = ("Mul", "Add", "Clip")

#: The op types whose inputs TensorRT's INT8 form quantises (see :func:`trt_placement`).
TRT_QUANTIZED_OPS: tuple[str, ...] = (
    "Conv",
    "ConvTranspose",
    "Gemm",
    "MatMul",
    "Add",
    "BatchNormalization",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "Resize",
)
_WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_POOLING_OPS = ("MaxPool", "AveragePool", "GlobalAveragePool")
_COPY_OPS = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose")
_BACKBONE_OPS = ("Conv", "ConvTranspose")
_EPILOGUE_OPS = ("Relu", "BatchNormalization")  # fused into the convolution before them
_CONST_OPERAND_OPS = ("Add", "Sub", "Mul", "Div")  # fused too when one operand is a constant


def _graph_maps(graph: Any) -> tuple[dict[str, Any], dict[str, list[Any]], set[str]]:
    """``(producer, consumers, constants)`` of a graph: the node writing each tensor, the
    nodes reading it, and the names of its initializers and Constant outputs."""
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
    return producer, consumers, constants


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
    producer, consumers, constants = _graph_maps(graph)
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
# TensorRT's Q/DQ placement
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrtPlacement:
    """Where the TensorRT form's Q/DQ pairs go beyond what ONNX Runtime's options choose.

    Attributes:
        exclude: Nodes of the quantised op types that are not quantised (``nodes_to_exclude``
            besides the FP32 policy's), e.g. Adds that are not residual adds.
        bypass: ``(node, index)`` inputs whose Q/DQ pair is removed after quantisation
            (:func:`remove_input_qdq`), e.g. the input of a residual Add that TensorRT fuses
            into the convolution producing it.
    """

    exclude: tuple[str, ...] = ()
    bypass: tuple[tuple[str, int], ...] = ()


def trt_placement(model: Any, fp32_nodes: Sequence[str] = ()) -> TrtPlacement:
    """What the TensorRT form quantises in ``model`` (the pre-processed graph) beyond the op
    types of :data:`TRT_QUANTIZED_OPS`, ``fp32_nodes`` being kept in FP32.

    TensorRT fuses a convolution with what follows it (bias, batch norm, ReLU/Clip) and with an
    element-wise Add of another tensor (the residual), so its INT8 graph wants Q/DQ on the
    inputs of Conv/Gemm/MatMul and on the **residual** input of such an Add, never between a
    convolution and its epilogue (no output is quantised). This is the rule NVIDIA ModelOpt's
    ONNX PTQ follows; ``benchmarks/qdq_placement.py`` compares the two node by node.

    * **Add**: quantised only when it is a residual add: both inputs are computed, at least
      one comes from a convolution through fusible epilogue ops only (its *backbone*: Relu,
      BatchNormalization, Add/Sub/Mul/Div of a constant), and they do not share one backbone.
      The input fused into the convolution (bypassed: no Q/DQ) is the one with a backbone;
      when both have one, the one farther from the nearest common ancestor of the two (the
      longer branch of the block; the other is the skip connection), the second on a tie. An
      Add fed straight by a convolution that is also that ancestor is not a residual add.
    * **Conv** that TensorRT has no INT8 kernel for stays unquantised (ModelOpt's rule): fewer
      than 16 input (per group) or output channels, unless an ungrouped square kernel with a
      multiple of 8 channels on one side that reads a graph input or has 16 on one side, or a
      grouped one with a multiple of 8 outputs and a kernel of at least 3; or weights that are
      not constants. No input of such a Conv, or of a weighted node in ``fp32_nodes``, reads a
      Q/DQ pair (one that ONNX Runtime shares with another reader is bypassed).
    * **BatchNormalization**: its data input is quantised unless it follows a convolution,
      which TensorRT fuses it into; its scale, bias, mean and variance never are.
    * **Resize**: its data input is quantised when a convolution (with its epilogue) writes
      it, so that TensorRT resizes in INT8; otherwise not quantised.
    * **MaxPool, AveragePool, GlobalAveragePool**: input quantised when a Conv/Gemm/MatMul
      reads the node's output or writes its input (through copy ops), even one kept in FP32
      (then TensorRT pools in INT8 and dequantises for it); otherwise not quantised.
    """
    graph = model.graph
    producer, consumers, constants = _graph_maps(graph)
    shapes = {i.name: list(i.dims) for i in graph.initializer}
    inputs = {i.name for i in graph.input} - constants
    fp32 = set(fp32_nodes)
    exclude: list[str] = []
    bypass: list[tuple[str, int]] = []
    for node in graph.node:
        if node.op_type == "Add":
            index = _fused_add_input(node, producer, constants)
            if index is None:
                exclude.append(node.name)
            else:
                bypass.append((node.name, index))
        elif node.op_type in _WEIGHTED_OPS:
            no_kernel = node.op_type == "Conv" and not _has_int8_kernel(node, shapes, inputs)
            exclude += [node.name] if no_kernel and node.name not in fp32 else []
            if no_kernel or node.name in fp32:
                bypass.extend((node.name, i) for i in range(len(node.input)))
        elif node.op_type == "BatchNormalization":
            source = producer.get(node.input[0])
            if source is not None and _backbone(source, producer, constants) is not None:
                exclude.append(node.name)
            # its parameters stay FP32, also where another node's Q/DQ pair reaches them
            bypass.extend((node.name, i) for i in range(1, len(node.input)))
        elif node.op_type == "Resize":
            source = producer.get(node.input[0])
            if source is None or _backbone(source, producer, constants) is None:
                exclude.append(node.name)
    for node in graph.node:
        if node.op_type in _POOLING_OPS and not _next_to_weighted(node, producer, consumers):
            exclude.append(node.name)
    return TrtPlacement(tuple(exclude), tuple(bypass))


def _has_int8_kernel(conv: Any, shapes: dict[str, list[int]], inputs: set[str]) -> bool:
    """Whether TensorRT has an INT8 kernel for ``conv`` (see :func:`trt_placement`)."""
    weight = shapes.get(conv.input[1]) if len(conv.input) > 1 else None
    if not weight or len(weight) < 3:
        return False
    attrs = {a.name: a for a in conv.attribute}
    group = attrs["group"].i if "group" in attrs else 1
    kernel = list(attrs["kernel_shape"].ints) if "kernel_shape" in attrs else weight[2:]
    c_out, c_in = weight[0], weight[1]
    if c_out >= 16 and c_in >= 16:
        return True
    if group == 1:
        wide = c_out >= 16 or c_in >= 16 or any(t in inputs for t in conv.input)
        return (c_out % 8 == 0 or c_in % 8 == 0) and wide and len(set(kernel)) == 1
    return c_out % 8 == 0 and all(k >= 3 for k in kernel)


def _next_to_weighted(node: Any, producer: dict[str, Any], consumers: dict[str, list[Any]]) -> bool:
    """Whether a Conv/Gemm/MatMul reads ``node``'s output or writes its input, looking through
    copy ops (Reshape, Flatten, Squeeze, Unsqueeze, Transpose)."""

    def weighted(n: Any) -> bool:
        return n.op_type in _WEIGHTED_OPS

    up = producer.get(node.input[0]) if node.input else None
    while up is not None and up.op_type in _COPY_OPS:
        up = producer.get(up.input[0]) if up.input else None
    if up is not None and weighted(up):
        return True
    frontier = list(node.output)
    while frontier:
        for reader in consumers.get(frontier.pop(), []):
            if weighted(reader):
                return True
            if reader.op_type in _COPY_OPS:
                frontier.extend(reader.output)
    return False


def _fused_add_input(add: Any, producer: dict[str, Any], constants: set[str]) -> int | None:
    """The index of ``add``'s input that TensorRT fuses into a convolution; None when ``add``
    is not a residual add (see :func:`trt_placement`)."""
    inputs = [t for t in add.input if t]
    if len(inputs) != 2 or any(t in constants or t not in producer for t in inputs):
        return None
    first, second = (producer[t] for t in inputs)
    bb = (_backbone(first, producer, constants), _backbone(second, producer, constants))
    if bb[0] is bb[1]:  # neither has a backbone, or both share one
        return None
    lca, d1, d2 = _nearest_common_ancestor(first, second, producer)
    if bb[0] is not None and bb[1] is not None:
        return 0 if d1 > d2 else 1
    index = 0 if bb[0] is not None else 1
    return None if lca is bb[index] else index


def _backbone(node: Any, producer: dict[str, Any], constants: set[str]) -> Any | None:
    """The Conv/ConvTranspose that ``node`` is fused into: ``node`` itself, or the one reached
    through its single computed input across epilogue ops only; None otherwise."""
    for _ in range(8):  # conv, bias, scale, batch norm, activation: a short chain
        if node.op_type in _BACKBONE_OPS:
            return node
        computed = [t for t in node.input if t and t not in constants]
        fusible = node.op_type in _EPILOGUE_OPS or (
            node.op_type in _CONST_OPERAND_OPS and len(node.input) == 2
        )
        if not fusible or len(computed) != 1 or computed[0] not in producer:
            return None
        node = producer[computed[0]]
    return None


def _nearest_common_ancestor(a: Any, b: Any, producer: dict[str, Any]) -> tuple[Any, int, int]:
    """``(node, da, db)``: the common ancestor of nodes ``a`` and ``b`` (each its own ancestor
    at distance 0) with the smallest ``da + db``, shortest distances in edges; ``(None, 0, 0)``
    when they have none."""
    da, db = _distances(a, producer), _distances(b, producer)
    common = [k for k in da if k in db]
    if not common:
        return None, 0, 0
    best = min(common, key=lambda k: (da[k][0] + db[k][0], da[k][0]))
    return da[best][1], da[best][0], db[best][0]


def _distances(start: Any, producer: dict[str, Any]) -> dict[int, tuple[int, Any]]:
    """Every ancestor of ``start`` by ``id``: ``(shortest distance, node)``."""
    seen = {id(start): (0, start)}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        dist = seen[id(node)][0]
        for t in node.input:
            parent = producer.get(t)
            if parent is not None and id(parent) not in seen:
                seen[id(parent)] = (dist + 1, parent)
                queue.append(parent)
    return seen


def remove_input_qdq(model: Any, edges: Iterable[tuple[str, int]]) -> int:
    """Feed each ``(node, index)`` input straight from the tensor its Q -> DQ pair quantises.

    The pair itself, its scale and zero point are deleted once nothing else reads them (a
    pair shared with another consumer stays there). An edge without a Q -> DQ pair is left
    alone. Returns how many inputs were rewired; ``model`` is changed in place.
    """
    graph = model.graph
    producer, _, _ = _graph_maps(graph)
    by_name = {n.name: n for n in graph.node}
    rewired = 0
    for name, index in edges:
        node = by_name.get(name)
        if node is None or index >= len(node.input):
            continue
        dq = producer.get(node.input[index])
        q = producer.get(dq.input[0]) if dq is not None else None
        if dq is None or dq.op_type != "DequantizeLinear" or q is None:
            continue
        if q.op_type == "QuantizeLinear":
            node.input[index] = q.input[0]
            rewired += 1
    if rewired:
        _drop_unread_qdq(graph)
    return rewired


def _drop_unread_qdq(graph: Any) -> None:
    """Delete Q/DQ nodes whose outputs nothing reads, then the constants only they read."""
    dropped: list[Any] = []
    while True:
        read = {t for n in graph.node for t in n.input} | {o.name for o in graph.output}
        dead = [
            n
            for n in graph.node
            if n.op_type in ("QuantizeLinear", "DequantizeLinear")
            and not any(o in read for o in n.output)
        ]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
        dropped.extend(dead)
    read = {t for n in graph.node for t in n.input}
    orphans = {t for n in dropped for t in n.input[1:]} - read
    for init in [i for i in graph.initializer if i.name in orphans]:
        graph.initializer.remove(init)
    gone = {o for n in dropped for o in n.output}
    for info in [v for v in graph.value_info if v.name in gone]:
        graph.value_info.remove(info)


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


def qdq_edges(model: Any) -> frozenset[tuple[str, str, int]]:
    """Where a Q/DQ graph quantises: one ``(tensor, node, index)`` per input ``index`` of
    ``node`` that reads a DequantizeLinear, ``tensor`` being what its QuantizeLinear quantises
    (the DequantizeLinear's own input where no QuantizeLinear feeds it). Two files with the same
    edges place their Q/DQ pairs alike, whatever their scales."""
    producer, _, _ = _graph_maps(model.graph)
    edges = set()
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear":
            continue
        for index, tensor in enumerate(node.input):
            dq = producer.get(tensor)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producer.get(dq.input[0])
            source = q.input[0] if q is not None and q.op_type == "QuantizeLinear" else dq.input[0]
            edges.add((source, node.name, index))
    return frozenset(edges)


def count_quantize_nodes(model: Any) -> int:
    """Q/DQ nodes of a model that is not meant for TensorRT (no symmetric-int8 checks)."""
    n = sum(1 for node in model.graph.node if node.op_type == "QuantizeLinear")
    if n == 0:
        raise ExportError("quantisation inserted no QuantizeLinear: nothing was quantised")
    return n

"""The operators of the white-box replica (:mod:`~advedge.export.runtime.replica`): each ONNX
operator advedge's exports contain, computed in PyTorch as ONNX defines it.

``QuantizeLinear`` is ``saturate(round(x / scale) + zero_point)`` with round-half-to-even and
its gradient straight through the rounding (BPDA); through the saturation the gradient is zero
(``"zero"``, the clip's own derivative) or passed (``"pass"``), as the replica was built.
``DequantizeLinear`` is ``(q - zero_point) * scale``. Every op takes and returns torch tensors
(floats as float32, integers as int64). Torch-free at import.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from advedge.errors import ExportError

__all__ = ["FLOAT", "FLOAT16", "OPS", "Q_RANGES", "Node", "ste"]

FLOAT16, FLOAT = 10, 1
#: The zero point's ONNX element type -> the saturation range of QuantizeLinear.
Q_RANGES = {3: (-128, 127), 2: (0, 255), 5: (-32768, 32767), 4: (0, 65535)}
_INT_TYPES = {2, 3, 4, 5, 6, 7, 12, 13}  # uint8 int8 uint16 int16 int32 int64 uint32 uint64


class Node:
    """One ONNX node, its attributes decoded (bytes as str), and its compile-time facts."""

    def __init__(self, proto: Any) -> None:
        import onnx

        self.op = proto.op_type
        self.name = proto.name or f"{proto.op_type}->{proto.output[0]}"
        self.inputs = list(proto.input)
        self.outputs = list(proto.output)
        self.attrs: dict[str, Any] = {}
        for a in proto.attribute:
            v = onnx.helper.get_attribute_value(a)
            self.attrs[a.name] = v.decode() if isinstance(v, bytes) else v

    def attr(self, key: str, default: Any = None) -> Any:
        return self.attrs.get(key, default)

    def refuse(self, what: str) -> ExportError:
        return ExportError(
            f"the white-box replica cannot compute {self.op} node {self.name!r}: {what}",
            "the replica covers the operators advedge's exports contain",
        )


_Op = Callable[[Node, list[Any]], Any]
#: ONNX operator -> its implementation ``(node, inputs) -> output`` (inputs None where omitted).
OPS: dict[str, _Op] = {}


def _op(*names: str) -> Callable[[_Op], _Op]:
    def add(fn: _Op) -> _Op:
        for n in names:
            OPS[n] = fn
        return fn

    return add


def _args(ins: list[Any], k: int) -> list[Any]:
    """The first ``k`` inputs, None for those the node leaves out."""
    return [*ins, *[None] * (k - len(ins))][:k]


def _torch() -> Any:
    import torch

    return torch


def ste(x: Any, value: Any) -> Any:
    """``value`` forward, the gradient of ``x`` backward (straight through)."""
    return x + (value - x).detach()


def _per_axis(t: Any, x: Any, axis: int) -> Any:
    """A per-channel ``t`` (1-D, one value per slice of ``x`` along ``axis``) reshaped to
    broadcast against ``x``; a scalar or single value unchanged."""
    if t.dim() == 0 or t.numel() == 1:
        return t.reshape(())
    axis = axis % x.dim()
    if t.dim() != 1 or t.numel() != x.shape[axis]:
        raise ExportError(
            f"a per-axis scale of {t.numel()} values does not fit axis {axis} of {list(x.shape)}"
        )
    shape = [1] * x.dim()
    shape[axis] = -1
    return t.reshape(shape)


# ---------------------------------------------------------------------------- quantisation
@_op("QuantizeLinear")
def _quantize(node: Node, ins: list[Any]) -> Any:
    torch = _torch()
    x, scale, zp = _args(ins, 3)
    axis = node.attr("axis", 1)
    lo, hi = node.attrs["_range"]
    s = _per_axis(scale, x, axis)
    z = 0.0 if zp is None else _per_axis(zp.to(torch.float32), x, axis)
    v = x / s
    q = ste(v, torch.round(v)) + z  # round half to even, gradient straight through
    if node.attrs["_saturation_grad"] == "pass":
        return ste(q, q.clamp(lo, hi))
    return q.clamp(lo, hi)  # the clip's own derivative: zero outside the range


@_op("DequantizeLinear")
def _dequantize(node: Node, ins: list[Any]) -> Any:
    torch = _torch()
    x, scale, zp = _args(ins, 3)
    axis = node.attr("axis", 1)
    x = x.to(torch.float32)
    if zp is not None:
        x = x - _per_axis(zp.to(torch.float32), x, axis)
    return x * _per_axis(scale, x, axis)


# ---------------------------------------------------------------------------- layers
def _pads(node: Node, spatial: int) -> tuple[list[int], bool]:
    """The ``pads`` attribute as torch's ``F.pad`` order, and whether they are symmetric."""
    auto = node.attr("auto_pad", "NOTSET")
    if auto not in ("NOTSET", "VALID"):
        raise node.refuse(f"auto_pad {auto}")
    pads = list(node.attr("pads", [0] * (2 * spatial)))
    begin, end = pads[:spatial], pads[spatial:]
    torch_order = [p for i in reversed(range(spatial)) for p in (begin[i], end[i])]
    return torch_order, begin == end


@_op("Conv")
def _conv(node: Node, ins: list[Any]) -> Any:
    import torch.nn.functional as F

    x, w, b = _args(ins, 3)
    if x.dim() != 4:
        raise node.refuse(f"a {x.dim()}-D input (2-D convolutions only)")
    pad, symmetric = _pads(node, 2)
    if not symmetric:
        x = F.pad(x, pad)
    return F.conv2d(
        x,
        w,
        b,
        stride=tuple(node.attr("strides", [1, 1])),
        padding=(pad[2], pad[0]) if symmetric else 0,
        dilation=tuple(node.attr("dilations", [1, 1])),
        groups=node.attr("group", 1),
    )


@_op("Gemm")
def _gemm(node: Node, ins: list[Any]) -> Any:
    a, b, c = _args(ins, 3)
    if node.attr("transA", 0):
        a = a.t()
    if node.attr("transB", 0):
        b = b.t()
    y = node.attr("alpha", 1.0) * (a @ b)
    return y if c is None else y + node.attr("beta", 1.0) * c


@_op("MatMul")
def _matmul(node: Node, ins: list[Any]) -> Any:
    return ins[0] @ ins[1]


@_op("BatchNormalization")
def _batch_norm(node: Node, ins: list[Any]) -> Any:
    import torch.nn.functional as F

    if node.attr("training_mode", 0):
        raise node.refuse("training_mode 1")
    x, scale, bias, mean, var = ins[:5]
    return F.batch_norm(x, mean, var, scale, bias, False, 0.0, node.attr("epsilon", 1e-5))


@_op("MaxPool", "AveragePool")
def _pool(node: Node, ins: list[Any]) -> Any:
    import torch.nn.functional as F

    x = ins[0]
    if x.dim() != 4 or len(node.outputs) > 1:
        raise node.refuse("only 2-D pooling with one output")
    pad, symmetric = _pads(node, 2)
    kernel = tuple(node.attr("kernel_shape"))
    stride = tuple(node.attr("strides", [1, 1]))
    ceil = bool(node.attr("ceil_mode", 0))
    if node.op == "MaxPool":
        if not symmetric:
            x = F.pad(x, pad, value=float("-inf"))
        padding = (pad[2], pad[0]) if symmetric else 0
        dilation = tuple(node.attr("dilations", [1, 1]))
        return F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode=ceil)
    if not symmetric or node.attr("dilations", [1, 1]) != [1, 1]:
        raise node.refuse("asymmetric pads or dilations")
    include = bool(node.attr("count_include_pad", 0))
    return F.avg_pool2d(x, kernel, stride, (pad[2], pad[0]), ceil, include)


@_op("GlobalAveragePool")
def _global_avg(node: Node, ins: list[Any]) -> Any:
    return ins[0].mean(dim=tuple(range(2, ins[0].dim())), keepdim=True)


@_op("Resize")
def _resize(node: Node, ins: list[Any]) -> Any:
    import torch.nn.functional as F

    x = ins[0]
    scales, sizes = _args(ins, 4)[2:4]
    if x.dim() != 4:
        raise node.refuse(f"a {x.dim()}-D input")
    if sizes is not None and sizes.numel():
        size = [int(v) for v in sizes.tolist()]
    elif scales is not None and scales.numel():
        size = [int(np.floor(d * s)) for d, s in zip(x.shape, scales.tolist(), strict=True)]
    else:
        raise node.refuse("neither scales nor sizes")
    if size[:2] != list(x.shape[:2]):
        raise node.refuse("resizing the batch or channel axis")
    mode = node.attr("mode", "nearest")
    ctm = node.attr("coordinate_transformation_mode", "half_pixel")
    if node.attr("antialias", 0):
        raise node.refuse("antialias 1")
    if mode == "nearest" and ctm == "asymmetric" and node.attr("nearest_mode") == "floor":
        return F.interpolate(x, size=size[2:], mode="nearest")
    if mode == "linear" and ctm in ("half_pixel", "pytorch_half_pixel") and min(size[2:]) > 1:
        return F.interpolate(x, size=size[2:], mode="bilinear", align_corners=False)
    if mode == "linear" and ctm == "align_corners":
        return F.interpolate(x, size=size[2:], mode="bilinear", align_corners=True)
    raise node.refuse(f"mode {mode} with coordinate_transformation_mode {ctm}")


# ---------------------------------------------------------------------------- elementwise
@_op("Add")
def _add(node: Node, ins: list[Any]) -> Any:
    return ins[0] + ins[1]


@_op("Sub")
def _sub(node: Node, ins: list[Any]) -> Any:
    return ins[0] - ins[1]


@_op("Mul")
def _mul(node: Node, ins: list[Any]) -> Any:
    return ins[0] * ins[1]


@_op("Div")
def _div(node: Node, ins: list[Any]) -> Any:
    torch = _torch()
    a, b = ins
    if not a.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")
    return a / b


@_op("Relu")
def _relu(node: Node, ins: list[Any]) -> Any:
    return _torch().relu(ins[0])


@_op("Tanh")
def _tanh(node: Node, ins: list[Any]) -> Any:
    return _torch().tanh(ins[0])


@_op("Sigmoid")
def _sigmoid(node: Node, ins: list[Any]) -> Any:
    return _torch().sigmoid(ins[0])


@_op("Clip")
def _clip(node: Node, ins: list[Any]) -> Any:
    x, lo, hi = _args(ins, 3)
    lo = node.attr("min") if lo is None else lo
    hi = node.attr("max") if hi is None else hi
    torch = _torch()
    if lo is not None:
        x = torch.maximum(x, torch.as_tensor(lo, dtype=x.dtype, device=x.device))
    if hi is not None:
        x = torch.minimum(x, torch.as_tensor(hi, dtype=x.dtype, device=x.device))
    return x


@_op("Identity")
def _identity(node: Node, ins: list[Any]) -> Any:
    return ins[0]


@_op("Cast")
def _cast(node: Node, ins: list[Any]) -> Any:
    torch = _torch()
    to = node.attr("to")
    x = ins[0]
    if to in (FLOAT, FLOAT16):  # FP16 rounding is applied by the interpreter after the node
        return x.to(torch.float32)
    if to in _INT_TYPES:
        return x.to(torch.int64)
    raise node.refuse(f"a cast to ONNX type {to}")


# ---------------------------------------------------------------------------- shapes
def _axes(node: Node, ins: list[Any], position: int) -> list[int] | None:
    """``axes`` from the input at ``position`` (newer opsets) or the attribute (older)."""
    if len(ins) > position and ins[position] is not None:
        return [int(a) for a in ins[position].tolist()]
    axes = node.attr("axes")
    return None if axes is None else list(axes)


@_op("ReduceMean")
def _reduce_mean(node: Node, ins: list[Any]) -> Any:
    x = ins[0]
    axes = _axes(node, ins, 1)
    keep = bool(node.attr("keepdims", 1))
    if not axes:
        if node.attr("noop_with_empty_axes", 0):
            return x
        axes = list(range(x.dim()))
    return x.mean(dim=tuple(axes), keepdim=keep)


@_op("Shape")
def _shape(node: Node, ins: list[Any]) -> Any:
    torch = _torch()
    dims = list(ins[0].shape)
    start, end = node.attr("start", 0), node.attr("end", len(dims))
    return torch.tensor(dims[start:end], dtype=torch.int64, device=ins[0].device)


@_op("Concat")
def _concat(node: Node, ins: list[Any]) -> Any:
    return _torch().cat([t for t in ins if t is not None], dim=node.attr("axis"))


@_op("Reshape")
def _reshape(node: Node, ins: list[Any]) -> Any:
    x, shape = ins
    dims = [int(d) for d in shape.tolist()]
    if not node.attr("allowzero", 0):
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


@_op("Flatten")
def _flatten(node: Node, ins: list[Any]) -> Any:
    x = ins[0]
    axis = node.attr("axis", 1) % (x.dim() + 1) if x.dim() else 0
    return x.reshape(int(np.prod(x.shape[:axis])), -1)


@_op("Squeeze", "Unsqueeze")
def _squeeze(node: Node, ins: list[Any]) -> Any:
    x = ins[0]
    axes = _axes(node, ins, 1)
    if node.op == "Squeeze":
        return x.squeeze() if axes is None else x.squeeze(tuple(a % x.dim() for a in axes))
    rank = x.dim() + len(axes or [])
    for a in sorted(a % rank for a in axes or []):
        x = x.unsqueeze(a)
    return x


@_op("Constant")
def _constant(node: Node, ins: list[Any]) -> Any:
    raise node.refuse("a Constant node that was not folded")  # folded when the replica is built

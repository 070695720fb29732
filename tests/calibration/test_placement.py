"""Where the ``tensorrt`` INT8 form puts its Q/DQ pairs (issue 16): as TensorRT's own tool,
NVIDIA ModelOpt's ONNX PTQ, does, never between a convolution (or residual Add) and the
ReLU/Clip TensorRT fuses into it; the ``onnxruntime-cpu`` form keeps ONNX Runtime's placement.

The expected placements were measured with ModelOpt 0.47.0 (``benchmarks/qdq_placement.py``,
results in ``benchmarks/results/qdq_placement.json``; the hand-made residual graph below was
run through ModelOpt the same way, with ``nodes_to_exclude=["fc"]``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from advedge.calibration import CalibrationSet, quantize_qdq, verify_qdq
from advedge.calibration.cache import cache_file
from advedge.calibration.nodes import (
    TRT_QUANTIZED_OPS,
    qdq_edges,
    remove_input_qdq,
    trt_placement,
)

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

SIZE = 8

#: ModelOpt's Q/DQ pairs on advedge's registry models, FP32 ONNX from advedge's export
#: (benchmarks/results/qdq_placement.json; ONNX Runtime's own placement had 29, 66 and 150).
MODELOPT_PAIRS = {"resnet8": 18, "resnet18": 40, "mobilenetv2": 104}

#: ModelOpt's quantised edges (tensor -> consumer, input) on the residual graph below: every
#: Conv input, the residual input of each Add (the skip path) and the input of the pooling next
#: to the (FP32) last layer; never a Conv output into its activation or an Add's fused
#: (longer-branch) input.
RESIDUAL_EDGES = {
    ("x", "conv0", 0),
    ("act0", "conv1", 0),
    ("act0", "add1", 1),
    ("act1", "conv2", 0),
    ("act2", "conv3", 0),
    ("act2", "convsc", 0),
    ("act3", "conv4", 0),
    ("convsc", "add2", 1),
    ("act4", "gap", 0),
    *((f"{c}_w", c, 1) for c in ("conv0", "conv1", "conv2", "conv3", "convsc", "conv4")),
}


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


class _Graph:
    """A small ONNX graph under construction (input ``x`` [N, 3, 8, 8])."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[Any] = []
        self.inits: list[Any] = []

    def const(self, name: str, value: Any) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name))
        return name

    def node(self, op: str, inputs: list[str], name: str, **attrs: Any) -> str:
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def conv(self, name: str, src: str, cin: int, cout: int, k: int = 3, group: int = 1) -> str:
        std = (2 / (cin // group * k * k)) ** 0.5
        w = self.const(f"{name}_w", self.rng.normal(0, std, (cout, cin // group, k, k)))
        b = self.const(f"{name}_b", self.rng.normal(0, 0.1, cout))
        pads = [k // 2] * 4
        return self.node("Conv", [src, w, b], name, pads=pads, group=group, kernel_shape=[k, k])

    def act(self, name: str, src: str, clip: bool) -> str:
        if clip:
            return self.node(
                "Clip", [src, self.const(f"{name}_lo", 0), self.const(f"{name}_hi", 6)], name
            )
        return self.node("Relu", [src], name)

    def model(self, output: str, out_shape: list[Any]) -> Any:
        graph = helper.make_graph(
            self.nodes,
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
            [helper.make_tensor_value_info(output, TensorProto.FLOAT, out_shape)],
            self.inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        return model


def _residual(path: Path, *, clip: bool = False) -> Path:
    """Two ResNet blocks (identity skip, then a 1x1 projection skip), GAP, Flatten, Gemm."""
    g = _Graph()
    a0 = g.act("act0", g.conv("conv0", "x", 3, 16), clip)
    a1 = g.act("act1", g.conv("conv1", a0, 16, 16), clip)
    a2 = g.act("act2", g.node("Add", [g.conv("conv2", a1, 16, 16), a0], "add1"), clip)
    a3 = g.act("act3", g.conv("conv3", a2, 16, 32), clip)
    sc = g.conv("convsc", a2, 16, 32, k=1)
    a4 = g.act("act4", g.node("Add", [g.conv("conv4", a3, 32, 32), sc], "add2"), clip)
    flat = g.node("Flatten", [g.node("GlobalAveragePool", [a4], "gap")], "flat")
    w, b = g.const("fc_w", g.rng.normal(0, 0.3, (4, 32))), g.const("fc_b", np.zeros(4))
    g.node("Gemm", [flat, w, b], "fc", transB=1)
    onnx.save(g.model("fc", ["N", 4]), str(path))
    return path


def _calib(n: int = 32) -> CalibrationSet:
    rng = np.random.default_rng(0)
    return CalibrationSet(
        x=rng.integers(0, 256, size=(n, SIZE, SIZE, 3), dtype=np.uint8),
        y=(np.arange(n) % 4).astype(np.int64),
        is_adv=np.zeros(n, dtype=bool),
        meta={"note": "synthetic"},
    )


def _quantise(src: Path, tmp_path: Path, **kwargs: Any) -> Any:
    kwargs = {"method": "minmax", "batch_size": 16, "cache_dir": tmp_path / "cache", **kwargs}
    return quantize_qdq(
        src, tmp_path / f"{src.stem}.{kwargs.get('target', 'trt')}.onnx", _calib(), **kwargs
    )


def _edges(model: Any) -> set[tuple[str, str, int]]:
    """``(tensor, consumer, input index)`` of every input read through a Q -> DQ pair."""
    producer = {o: n for n in model.graph.node for o in n.output}
    edges = set()
    for node in model.graph.node:
        for index, tensor in enumerate(node.input):
            dq = producer.get(tensor)
            if dq is not None and dq.op_type == "DequantizeLinear":
                q = producer.get(dq.input[0])
                if q is not None and q.op_type == "QuantizeLinear":
                    edges.add((q.input[0], node.name, index))
    return edges


def _activations_behind_qdq(model: Any) -> list[str]:
    """ReLU/Clip nodes fed through a Q/DQ pair straight from a Conv or an Add."""
    producer = {o: n for n in model.graph.node for o in n.output}
    found = []
    for node in model.graph.node:
        dq = producer.get(node.input[0]) if node.op_type in ("Relu", "Clip") else None
        q = producer.get(dq.input[0]) if dq is not None else None
        src = producer.get(q.input[0]) if q is not None else None
        if dq is not None and dq.op_type == "DequantizeLinear" and src is not None:
            found += [node.name] if src.op_type in ("Conv", "Add") else []
    return found


# --------------------------------------------------------------------------------------------
# The tensorrt target
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("clip", [False, True], ids=["relu", "clip"])
def test_trt_target_places_qdq_as_modelopt(tmp_path: Path, clip: bool) -> None:
    src = _residual(tmp_path / "residual.onnx", clip=clip)
    res = _quantise(src, tmp_path)
    q = onnx.load(str(res.path))
    assert _activations_behind_qdq(q) == []
    assert _edges(q) == RESIDUAL_EDGES == qdq_edges(q)  # qdq_edges: what QAT keeps unchanged
    assert res.n_qdq_pairs == verify_qdq(q) == 13  # 7 activations (2 read twice) + 6 weights
    assert res.excluded_nodes == ["fc"]  # the FP32 policy is unchanged


def test_trt_target_verification_still_holds(tmp_path: Path) -> None:
    res = _quantise(_residual(tmp_path / "residual.onnx"), tmp_path, keep_fp32="none")
    q = onnx.load(str(res.path))
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    for node in q.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zp = inits[node.input[2]]
            assert zp.dtype == np.int8 and not zp.any(), node.name
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            assert inits[node.input[0]].dtype == np.int8
    assert _edges(q) == RESIDUAL_EDGES | {("flat", "fc", 0), ("fc_w", "fc", 1)}  # + last layer
    assert res.n_qdq_pairs == verify_qdq(q) == 15
    x = _calib().as_float()
    ref, got = _run(_residual(tmp_path / "ref.onnx"), x), _run(res.path, x)
    assert np.abs(ref - got).max() < 0.1 * np.abs(ref).max()


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@pytest.mark.parametrize("arch", sorted(MODELOPT_PAIRS))
def test_registry_models_get_modelopts_pair_count(tmp_path: Path, arch: str) -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    from advedge.export.onnx_export import export_onnx

    from advedge.models import create_model

    torch.manual_seed(0)
    src = export_onnx(create_model(arch), tmp_path / f"{arch}.onnx", input_shape=(3, 32, 32))
    rng = np.random.default_rng(0)
    calib = CalibrationSet(
        x=rng.integers(0, 256, size=(32, 32, 32, 3), dtype=np.uint8),
        y=np.zeros(32, dtype=np.int64),
        is_adv=np.zeros(32, dtype=bool),
        meta={},
    )
    res = quantize_qdq(src, tmp_path / "q.onnx", calib, method="minmax", use_cache=False)
    q = onnx.load(str(res.path))
    assert res.n_qdq_pairs == verify_qdq(q) == MODELOPT_PAIRS[arch]
    assert _activations_behind_qdq(q) == []


# --------------------------------------------------------------------------------------------
# The CPU target and the cache
# --------------------------------------------------------------------------------------------


def test_cpu_target_keeps_onnxruntime_placement(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from advedge.calibration import quantize as qmod
    from onnxruntime import quantization as ortq

    calls: list[dict[str, Any]] = []
    real = ortq.quantize_static

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(ortq, "quantize_static", spy)
    src = _residual(tmp_path / "residual.onnx")
    res = _quantise(src, tmp_path, target="onnxruntime-cpu")
    (call,) = calls
    assert call["op_types_to_quantize"] is None  # every op type, as before
    assert call["extra_options"] == qmod._CPU_EXTRA_OPTIONS
    assert call["nodes_to_exclude"] == res.excluded_nodes == ["fc"]
    q = onnx.load(str(res.path))
    ops = [n.op_type for n in q.graph.node]
    assert "Relu" not in ops  # ORT folds each ReLU into the uint8 range of its input's Q
    assert ("conv2", "add1", 0) in _edges(q)  # ORT's placement: Add's inputs both quantised

    calls.clear()
    _quantise(src, tmp_path)
    assert calls[0]["op_types_to_quantize"] == list(TRT_QUANTIZED_OPS)
    assert calls[0]["extra_options"]["OpTypesToExcludeOutputQuantization"]


def test_cache_key_names_the_placement(tmp_path: Path) -> None:
    import json

    src = _residual(tmp_path / "residual.onnx")
    trt = _quantise(src, tmp_path)
    cpu = _quantise(src, tmp_path, target="onnxruntime-cpu")
    doc = json.loads(trt.cache_path.read_text())
    assert doc["options"]["placement"] == "trt-fusion/1"
    assert json.loads(cpu.cache_path.read_text())["options"]["placement"] == "onnxruntime"
    # the key without it (the cache files written before this placement) is another file
    key = {k: doc[k] for k in ("model_sha256", "calib_sha256", "method", "options", "onnxruntime")}
    old = {**key, "options": {k: v for k, v in key["options"].items() if k != "placement"}}
    root = trt.cache_path.parent
    assert cache_file(root, trt.model_sha256, trt.calib_sha256, "minmax", key) == trt.cache_path
    assert cache_file(root, trt.model_sha256, trt.calib_sha256, "minmax", old) != trt.cache_path
    again = _quantise(src, tmp_path)
    assert again.cache_hit and again.path.read_bytes() == trt.path.read_bytes()


# --------------------------------------------------------------------------------------------
# The rules, graph by graph
# --------------------------------------------------------------------------------------------


def test_residual_adds_and_their_fused_inputs(tmp_path: Path) -> None:
    placement = trt_placement(onnx.load(str(_residual(tmp_path / "r.onnx"))))
    assert placement.bypass == (("add1", 0), ("add2", 0))  # the longer branch: conv2, conv4
    assert placement.exclude == ()

    g = _Graph()
    c = g.conv("c", "x", 3, 16)
    g.node("Add", [c, g.const("bias", np.ones((1, 16, 1, 1)))], "add_const")  # a bias
    g.node("Add", ["x", g.conv("c3", "x", 3, 3)], "add_input")  # reads the graph input
    r = g.node("Relu", [c], "r")
    g.node("Add", [c, r], "add_same")  # conv -> relu -> add <- conv: not a residual add
    out = g.node("Add", ["add_same", g.node("Mul", ["add_const", "add_input"], "mul")], "out")
    placement = trt_placement(g.model(out, ["N", 16, SIZE, SIZE]))
    assert set(placement.exclude) >= {"add_const", "add_input", "add_same", "out"}
    assert [b for b in placement.bypass if b[0].startswith("add")] == []


def test_convolutions_without_an_int8_kernel_stay_fp32() -> None:
    g = _Graph()
    a = g.conv("first", "x", 3, 8)  # 8 outputs, reads the graph input: has a kernel
    b = g.conv("narrow", a, 8, 8)  # 8 -> 8 in the middle: none
    c = g.conv("wide", b, 8, 16)
    d = g.conv("dw", c, 16, 16, group=16)  # depthwise, 16 outputs, 3x3: has one
    e = g.conv("odd", d, 16, 12, k=1)  # 12 outputs, but 16 inputs: has one
    f = g.conv("tiny", e, 12, 3)  # 12 -> 3: none
    placement = trt_placement(g.model(f, ["N", 3, SIZE, SIZE]))
    assert placement.exclude == ("narrow", "tiny")
    assert {("narrow", 0), ("narrow", 1), ("tiny", 0)} <= set(placement.bypass)


def test_fp32_convolutions_read_no_qdq_pair(tmp_path: Path) -> None:
    g = _Graph()
    a = g.conv("first", "x", 3, 8)
    narrow = g.conv("narrow", a, 8, 8)  # no INT8 kernel; shares its input with "wide"
    out = g.node("Add", [g.conv("wide", a, 8, 16), g.conv("wide2", narrow, 8, 16)], "out")
    src = tmp_path / "fp32conv.onnx"
    onnx.save(g.model(out, ["N", 16, SIZE, SIZE]), str(src))
    for policy in ("auto", ["wide"]):
        q = onnx.load(str(_quantise(src, tmp_path, keep_fp32=policy).path))
        edges = _edges(q)
        assert ("first", "narrow", 0) not in edges and ("narrow_w", "narrow", 1) not in edges
        assert (
            ("first", "wide", 0) in edges if policy == "auto" else ("first", "wide", 0) not in edges
        )
        assert ("x", "first", 0) in edges and ("narrow", "wide2", 0) in edges


def test_batch_norm_resize_and_pooling() -> None:
    g = _Graph()
    bn_params = [g.const(f"bn_{k}", np.ones(16)) for k in ("s", "b", "m", "v")]
    c = g.conv("c", "x", 3, 16)
    fused = g.node("BatchNormalization", [c, *bn_params], "bn_fused")  # follows a conv
    r = g.node("Relu", [fused], "r")
    alone = g.node("BatchNormalization", [g.node("Add", [r, c], "add"), *bn_params], "bn_alone")
    scales = g.const("scales", [1, 1, 2, 2])
    up = g.node("Resize", [r, "", scales], "resize_conv", mode="nearest")
    up_in = g.node("Resize", ["x", "", scales], "resize_input", mode="nearest")
    pool = g.node("MaxPool", [up], "pool_into_conv", kernel_shape=[2, 2], strides=[2, 2])
    c2 = g.conv("c2", pool, 16, 16)
    last = g.node("MaxPool", [up_in], "pool_alone", kernel_shape=[2, 2], strides=[2, 2])
    out = g.node("Add", [g.node("Add", [c2, alone], "s1"), last], "out")
    placement = trt_placement(g.model(out, ["N", 16, SIZE, SIZE]))
    assert {"bn_fused", "resize_input", "pool_alone"} <= set(placement.exclude)
    assert not {"bn_alone", "resize_conv", "pool_into_conv"} & set(placement.exclude)
    for bn in ("bn_fused", "bn_alone"):  # the parameters are never quantised
        assert [i for n, i in placement.bypass if n == bn] == [1, 2, 3, 4]


def test_remove_input_qdq_keeps_shared_pairs_and_drops_orphans() -> None:
    scale = numpy_helper.from_array(np.array(0.1, dtype=np.float32), "t_scale")
    zp = numpy_helper.from_array(np.array(0, dtype=np.int8), "t_zp")
    nodes = [
        helper.make_node("Relu", ["x"], ["t"], name="src"),
        helper.make_node("QuantizeLinear", ["t", "t_scale", "t_zp"], ["tq"], name="q"),
        helper.make_node("DequantizeLinear", ["tq", "t_scale", "t_zp"], ["tdq"], name="dq"),
        helper.make_node("Relu", ["tdq"], ["a"], name="a"),
        helper.make_node("Add", ["tdq", "a"], ["b"], name="b"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("b", TensorProto.FLOAT, [2])],
        [scale, zp],
    )
    model = helper.make_model(graph)
    assert remove_input_qdq(model, [("a", 0), ("missing", 0), ("src", 0)]) == 1
    assert [n.name for n in model.graph.node] == ["src", "q", "dq", "a", "b"]  # b still reads it
    assert list(model.graph.node[3].input) == ["t"]
    assert remove_input_qdq(model, [("b", 0)]) == 1
    assert [n.name for n in model.graph.node] == ["src", "a", "b"]
    assert list(model.graph.node[2].input) == ["t", "a"] and not model.graph.initializer

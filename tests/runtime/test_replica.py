"""The white-box replica of an ONNX artifact (issue 17, section 1): its forward reproduces ONNX
Runtime on FP32, FP16 and both INT8 forms (and a fused purifier + classifier), its Q/DQ
arithmetic is ONNX's (round half to even, saturation, per-channel scales, zero points), its
gradient passes the rounding straight through, and an operator it lacks is named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from advedge.calibration import quantize_qdq
from advedge.export.fp16 import convert_fp16
from advedge.export.onnx_export import export_onnx
from advedge.export.runtime.onnxruntime import OrtRunner
from advedge.export.runtime.replica import build_replica
from fakes.artifacts import random_calibration_set, tiny_classifier
from onnx import TensorProto, helper

from advedge.errors import ExportError
from advedge.models import create_model
from advedge.models.purified import Purified
from advedge.purifier.networks import Generator


def _images(n: int = 48, seed: int = 0) -> np.ndarray:
    """Colour ramps with noise, float32 NCHW in [0, 1] (random nets tell them apart)."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0, 1, (n, 3, 1, 1))
    slope = rng.uniform(-0.5, 0.5, (n, 3, 1, 1))
    ramp = np.linspace(0, 1, 32)[None, None, :, None]
    x = base + slope * ramp + rng.normal(0, 0.04, (n, 3, 32, 32))
    return np.clip(x, 0, 1).astype(np.float32)


def _forward(replica, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return replica(torch.from_numpy(x)).numpy()


@pytest.fixture(scope="module")
def graphs(tmp_path_factory) -> dict[str, Path]:
    """tiny_cnn, resnet8 (residual Adds, biases ONNX Runtime rounds) and a fused purifier +
    tiny_cnn, each as FP32 ONNX, FP16 and INT8 in both forms (minmax ranges: quick)."""
    root = tmp_path_factory.mktemp("replica")
    torch.manual_seed(0)
    nets = {
        "tiny": tiny_classifier(0),
        "resnet8": create_model("resnet8", num_classes=10).eval(),
        "fused": Purified(Generator(3, 4, eps_r=16 / 255, depth=1), tiny_classifier(1)).eval(),
    }
    for p in nets["fused"].purifier.parameters():  # an untrained generator is the identity
        p.data.normal_(0, 0.1) if p.dim() == 4 else None
    for m in nets["resnet8"].modules():  # trained-like batch norms: folded into conv biases
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    calib = random_calibration_set(32)
    out = {}
    for name, net in nets.items():
        fp32 = export_onnx(net, root / f"{name}.fp32.onnx", input_shape=(3, 32, 32))
        out[f"{name}.fp32"] = fp32
        out[f"{name}.fp16"] = convert_fp16(fp32, root / f"{name}.fp16.onnx")
        for target in ("tensorrt", "onnxruntime-cpu"):
            path = root / f"{name}.int8-{target}.onnx"
            quantize_qdq(fp32, path, calib, method="minmax", use_cache=False, target=target)
            out[f"{name}.int8-{target}"] = path
    return out


@pytest.mark.parametrize("net", ["tiny", "resnet8", "fused"])
@pytest.mark.parametrize("form", ["fp32", "fp16", "int8-tensorrt", "int8-onnxruntime-cpu"])
def test_replica_reproduces_onnxruntime(graphs, net, form):
    path = graphs[f"{net}.{form}"]
    x = _images()
    ref = OrtRunner(path, threads=1)(x)  # as bench runs it: CPU provider, optimisation level all
    replica = build_replica(path)
    out = _forward(replica, x)
    assert out.shape == ref.shape and out.dtype == np.float32
    assert (out.argmax(1) == ref.argmax(1)).mean() == 1.0
    tol = {"fp32": 1e-5, "fp16": 5e-3}.get(form, 5e-3)  # int8: a rounding tie or two
    assert np.abs(out - ref).max() <= tol * max(1.0, np.abs(ref).max())
    if form.startswith("int8"):
        # the Q/DQ arithmetic is what makes it match: the FP32 graph is further from it
        fp32 = _forward(build_replica(graphs[f"{net}.fp32"]), x)
        assert np.abs(fp32 - ref).max() > np.abs(out - ref).max()


def test_replica_rounds_the_biases_onnxruntime_rounds(graphs):
    path = graphs["resnet8.int8-tensorrt"]
    x = _images()
    ref = OrtRunner(path, threads=1)(x)
    rounded, kept = build_replica(path), build_replica(path, ort_bias_quantization=False)
    assert rounded.ort_rewrites > 0 and kept.ort_rewrites == 0
    near = np.abs(_forward(rounded, x) - ref).max()
    assert near < np.abs(_forward(kept, x) - ref).max()
    # the ONNX Runtime CPU form stores its biases as int32 already: nothing to round
    assert build_replica(graphs["resnet8.int8-onnxruntime-cpu"]).ort_rewrites == 0


def _qdq_graph(tmp_path: Path, zp_type: int, scales: list[float], zps: list[int]) -> Path:
    """x [N, 3, 2, 2] -> QuantizeLinear (per channel, axis 1) -> DequantizeLinear -> y."""
    scale = helper.make_tensor("s", TensorProto.FLOAT, [3], scales)
    zp = helper.make_tensor("z", zp_type, [3], zps)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], axis=1),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3, 2, 2])],
        [scale, zp],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    path = tmp_path / f"qdq{zp_type}.onnx"
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize(
    "zp_type, zps", [(TensorProto.INT8, [0, 0, 0]), (TensorProto.UINT8, [128, 3, 250])]
)
def test_quantize_linear_is_onnx_arithmetic(tmp_path, zp_type, zps):
    scales = [0.25, 0.5, 0.125]  # powers of two: x / scale is exact, so ties are real ties
    path = _qdq_graph(tmp_path, zp_type, scales, zps)
    ticks = np.array([-300.5, -2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.49, 140.5, 400.0])
    x = np.stack([np.resize(ticks * s, (40,)).reshape(10, 2, 2) for s in scales], 1)
    x = x.astype(np.float32)
    ref = OrtRunner(path, threads=1, optimization="basic")(x)
    np.testing.assert_array_equal(_forward(build_replica(path), x), ref)  # ties, saturation


def test_gradient_passes_the_rounding_and_stops_at_saturation(tmp_path):
    path = _qdq_graph(tmp_path, TensorProto.INT8, [0.25, 0.25, 0.25], [0, 0, 0])
    x = torch.tensor([0.3, -0.1, 10.0, 40.0, -40.0, 31.7]).repeat(2)[:12].reshape(1, 3, 2, 2)
    inside = (x / 0.25).round().abs() <= 127  # the int8 range [-128, 127], from the zero point
    for mode, outside in (("zero", 0.0), ("pass", 1.0)):
        xg = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(build_replica(path, saturation_grad=mode)(xg).sum(), xg)
        assert torch.equal(grad, torch.where(inside, 1.0, outside)), mode
    with pytest.raises(ValueError, match="saturation_grad"):
        build_replica(path, saturation_grad="sometimes")


def test_gradient_reaches_the_input_through_a_quantised_purifier(graphs):
    replica = build_replica(graphs["fused.int8-tensorrt"])
    x = torch.from_numpy(_images(4)).requires_grad_(True)
    (grad,) = torch.autograd.grad(replica(x)[:, 0].sum(), x)
    assert grad.abs().sum() > 0 and torch.isfinite(grad).all()


def test_an_unknown_operator_is_named(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Softplus", ["x"], ["y"], name="soft")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
    )
    path = tmp_path / "softplus.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    with pytest.raises(ExportError, match=r"no operator ai\.onnx::Softplus \(node 'soft'\)"):
        build_replica(path)
    with pytest.raises(ExportError, match="cannot read"):
        build_replica(tmp_path / "missing.onnx")

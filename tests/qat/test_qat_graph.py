"""The trainable Q/DQ graph of robust QAT (issue 17, section 2): before training it computes what
the PTQ file computes (the white-box replica exactly, ONNX Runtime to its rounding), its weight
scales are the quantiser's, gradients pass its rounding straight through (so the inner attack
sees the fake-quantised model), and a trained graph is written back as a file with the PTQ file's
placement that passes the INT8 checks, or is not written at all."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from advedge.calibration import quantize_qdq
from advedge.calibration.nodes import qdq_edges, verify_qdq
from advedge.export.graph import read_onnx_metadata
from advedge.export.onnx_export import export_onnx
from advedge.export.runtime.onnxruntime import OrtRunner
from advedge.export.runtime.replica import build_replica
from fakes.artifacts import random_calibration_set, tiny_classifier
from onnx import numpy_helper

from advedge.errors import ExportError
from advedge.models import create_model
from advedge.qat import build_qat_graph, numpy_weight_scale, weight_scale, write_qat_onnx
from advedge.training.distillation import build_distill_method


def _images(n: int = 64, seed: int = 0) -> np.ndarray:
    """Colour ramps with noise, float32 NCHW in [0, 1] (random nets tell them apart)."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0, 1, (n, 3, 1, 1))
    slope = rng.uniform(-0.5, 0.5, (n, 3, 1, 1))
    ramp = np.linspace(0, 1, 32)[None, None, :, None]
    x = base + slope * ramp + rng.normal(0, 0.04, (n, 3, 32, 32))
    return np.clip(x, 0, 1).astype(np.float32)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """tiny_cnn and resnet8 (batch norms folded into biases, residual adds) in TensorRT's INT8
    form, and resnet8 in ONNX Runtime's CPU form."""
    root = tmp_path_factory.mktemp("qat")
    torch.manual_seed(0)
    nets = {"tiny": tiny_classifier(0), "resnet8": create_model("resnet8", num_classes=10).eval()}
    for m in nets["resnet8"].modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    calib = random_calibration_set(32)
    out = {}
    for name, net in nets.items():
        fp32 = export_onnx(net, root / f"{name}.fp32.onnx", input_shape=(3, 32, 32))
        out[f"{name}.fp32"] = fp32
        out[name] = root / f"{name}.int8.onnx"
        quantize_qdq(fp32, out[name], calib, method="minmax", use_cache=False)
    out["resnet8.cpu"] = root / "resnet8.int8-ortcpu.onnx"
    quantize_qdq(
        out["resnet8.fp32"], out["resnet8.cpu"], calib, method="minmax", use_cache=False,
        target="onnxruntime-cpu",
    )  # fmt: skip
    return out


def _logits(module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("net", ["tiny", "resnet8"])
def test_weight_scales_are_the_quantisers(files, net):
    from onnxruntime.quantization.quant_utils import compute_scale_zp

    model = onnx.load(str(files[net]))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    graph = build_qat_graph(files[net])
    assert graph.weight_quants
    for q in graph.weight_quants:
        w, stored = inits[q.weight], inits[q.scale]
        mine = numpy_weight_scale(w, q.axis)
        assert mine.dtype == np.float32 and np.array_equal(mine, stored), q.weight
        assert np.array_equal(weight_scale(torch.from_numpy(w.copy()), q.axis).numpy(), mine)
        # ONNX Runtime's own function, channel by channel, on the symmetric int8 range
        for c in range(min(3, w.shape[0])):
            ch = w[c]
            zp, s = compute_scale_zp(
                ch.min(), ch.max(), np.array(-127, np.int8), np.array(127, np.int8), True
            )
            assert zp == 0 and s == mine[c]
    zero = np.zeros((2, 3, 3, 3), np.float32)
    zero[1] = 0.5
    assert np.array_equal(numpy_weight_scale(zero, 0), np.array([1.0, 0.5 / 127], np.float32))


@pytest.mark.parametrize("net", ["tiny", "resnet8"])
def test_before_training_it_computes_the_ptq_file(files, net):
    x = _images()
    graph = build_qat_graph(files[net])
    mine = _logits(graph, x)
    replica = _logits(build_replica(files[net], ort_bias_quantization=False), x)
    np.testing.assert_array_equal(mine, replica)  # the same operators on the same values
    ort = OrtRunner(files[net], threads=1)(x)
    assert (mine.argmax(1) == ort.argmax(1)).mean() >= 0.95
    assert np.abs(mine - ort).max() < 0.05 * np.abs(ort).max()
    trained = [n for n, p in graph.weights().items() if p.requires_grad]
    assert trained == graph.weight_names and len(trained) >= 2
    assert {q.weight for q in graph.weight_quants} < set(trained)  # biases / FP32 layers too


def test_without_fake_quantisation_it_is_the_fp32_network(files):
    """The control run's forward: every Q/DQ pair the identity, i.e. the FP32 export (its
    batch norms folded)."""
    x = _images()
    graph = build_qat_graph(files["resnet8"])
    graph.fake_quant = False
    fp32 = OrtRunner(files["resnet8.fp32"], threads=1)(x)
    np.testing.assert_allclose(_logits(graph, x), fp32, atol=1e-4)
    graph.fake_quant = True
    assert np.abs(_logits(graph, x) - fp32).max() > 1e-3  # quantised again


def test_gradients_pass_the_rounding_to_weights_and_inputs(files):
    graph = build_qat_graph(files["resnet8"])
    x = torch.from_numpy(_images(8)).requires_grad_(True)
    graph(x).logsumexp(1).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # the attack's gradient
    for q in graph.weight_quants:  # rounded weights: only a straight-through gradient is nonzero
        assert graph.weight(q.weight).grad.abs().sum() > 0, q.weight
    before = _logits(graph, x.detach().numpy())
    with torch.no_grad():
        w = graph.weight(graph.weight_quants[0].weight)
        w.mul_(1.0 + 1e-6)  # below one int8 step: the fake-quantised forward does not move
    assert np.array_equal(_logits(graph, x.detach().numpy()), before)


def test_the_inner_attack_runs_through_the_fake_quantised_graph(files):
    """ADD's PGD crafts its examples on the graph: they raise its KL from the teacher's soft
    labels ten times more than a random perturbation of the same size (a masked gradient would
    leave PGD no better than its random start)."""
    graph = build_qat_graph(files["resnet8"]).eval()
    teacher = create_model("resnet8", num_classes=10).eval()
    method = build_distill_method("add", teacher=teacher, eps=8 / 255, alpha=2 / 255, steps=10)
    x = torch.from_numpy(_images(16))
    p = torch.softmax(teacher(x), 1).detach()
    x_adv = method.pgd(graph, loss="kl", start="normal")(x, p)
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6

    def kl(z: torch.Tensor) -> float:
        return float(torch.nn.functional.kl_div(torch.log_softmax(z, 1), p, reduction="sum"))

    with torch.no_grad():
        noise = (x + (torch.rand_like(x) * 2 - 1) * 8 / 255).clamp(0, 1)
        clean = kl(graph(x))
        assert kl(graph(x_adv)) - clean > 10 * abs(kl(graph(noise)) - clean) > 0


def _train_a_step(graph) -> None:
    teacher = create_model("resnet8", num_classes=10).eval()
    method = build_distill_method("add", teacher=teacher, eps=8 / 255, alpha=2 / 255, steps=2)
    opt = torch.optim.SGD(graph.parameters(), lr=0.5)
    x = torch.from_numpy(_images(16, seed=1))
    loss = method.loss(graph.train(), x, torch.zeros(16, dtype=torch.long)).loss
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_written_back_file_passes_the_int8_checks(files, tmp_path):
    ptq = files["resnet8"]
    graph = build_qat_graph(ptq)
    start = {n: p.detach().clone() for n, p in graph.weights().items()}
    _train_a_step(graph)
    moved = [n for n, p in graph.weights().items() if not torch.equal(p.detach(), start[n])]
    assert {q.weight for q in graph.weight_quants} <= set(moved)
    x = _images(200, seed=2)
    dst = tmp_path / "r8.int8-qat.onnx"
    record = write_qat_onnx(graph, ptq, dst, {"quantisation": "qat", "precision": "int8"}, x)
    written, before = onnx.load(str(dst)), onnx.load(str(ptq))
    assert verify_qdq(written) == record["qdq_pairs"] == verify_qdq(before)
    assert qdq_edges(written) == qdq_edges(before) and qdq_edges(written)
    inits = {i.name: numpy_helper.to_array(i) for i in written.graph.initializer}
    for q in graph.weight_quants:
        w = graph.weight(q.weight).detach().numpy()
        assert np.array_equal(inits[q.weight], w)
        assert np.array_equal(inits[q.scale], numpy_weight_scale(w, q.axis))
    ort = OrtRunner(dst, threads=1)(x)
    agree = (ort.argmax(1) == _logits(graph, x).argmax(1)).mean()
    assert max(agree, record["agreement_ort_bias_rounding"]) >= 0.995
    assert record["agreement"] == agree and record["written_max_abs_diff"] < 1e-3
    assert read_onnx_metadata(dst)["quantisation"] == "qat"
    # the trained file computes the trained graph, not the PTQ one
    assert not np.allclose(ort, OrtRunner(ptq, threads=1)(x), atol=1e-3)


def test_writing_the_fp32_controls_file_leaves_it_training_in_fp32(files, tmp_path):
    """The parity check quantises (the file does) but hands the graph back in the mode it
    trained in: the --no-fake-quant control must not train its next epoch quantised."""
    ptq = files["resnet8"]
    graph = build_qat_graph(ptq)
    graph.fake_quant = False
    write_qat_onnx(graph, ptq, tmp_path / "ft.onnx", {"precision": "int8"}, _images(64, seed=3))
    assert graph.fake_quant is False
    with graph.quantising():
        assert graph.fake_quant is True
    assert graph.fake_quant is False


def test_a_file_that_fails_a_check_is_not_written(files, tmp_path, monkeypatch):
    import advedge.qat.artifact as artifact

    graph = build_qat_graph(files["tiny"])
    dst = tmp_path / "t.int8-qat.onnx"
    real = artifact.parity

    def disagree(*args, **kwargs):
        return {**real(*args, **kwargs), "agreement": 0.9, "agreement_ort_bias_rounding": 0.98}

    monkeypatch.setattr(artifact, "parity", disagree)
    with pytest.raises(ExportError, match=r"agrees with the trained graph on 98\.00%"):
        write_qat_onnx(graph, files["tiny"], dst, {}, _images(16))
    monkeypatch.setattr(artifact, "parity", real)
    moved = onnx.load(str(files["tiny"]))
    conv = next(n for n in moved.graph.node if n.op_type == "Conv")
    conv.name = "renamed"
    with pytest.raises(ExportError, match="nodes differ"):
        artifact._same_placement(onnx.load(str(files["tiny"])), moved)
    assert not dst.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("form", ["resnet8.cpu", "resnet8.fp32"])
def test_only_the_symmetric_int8_form_is_trained(files, form):
    with pytest.raises(ExportError, match="not a symmetric int8 Q/DQ graph"):
        build_qat_graph(files[form])


def test_a_constant_written_as_value_float_is_read_as_the_replica_reads_it(files, tmp_path):
    """Other exporters write scalars as Constant(value_float=...): the QAT graph folds them
    like the replica (it refused them while it had its own Constant reader)."""
    from onnx import helper

    model = onnx.load(str(files["tiny"]))
    graph = model.graph
    image = graph.input[0].name
    graph.node.insert(0, helper.make_node("Constant", [], ["one"], value_float=1.0))
    graph.node.insert(1, helper.make_node("Mul", [image, "one"], ["scaled"]))
    for node in list(graph.node)[2:]:
        for i, name in enumerate(node.input):
            if name == image:
                node.input[i] = "scaled"
    path = tmp_path / "value_float.int8.onnx"
    onnx.save(model, str(path))
    x = _images(16)
    np.testing.assert_array_equal(
        _logits(build_qat_graph(path), x), _logits(build_qat_graph(files["tiny"]), x)
    )

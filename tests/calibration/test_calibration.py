"""advedge.calibration: calibration sets, explicit INT8 Q/DQ quantisation, caches, legacy TRT.

The ONNX models here are built with ``onnx.helper``: a tiny classifier
(Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm, dynamic batch) and the same classifier
behind a purifier-like head (Conv -> Tanh -> Mul(eps) -> Add(input) -> Clip(0, 1)). The legacy
calibrator is exercised against a minimal stand-in ``trt`` namespace defined in this file (not
TensorRT, and not the full TensorRT double in tests/fakes).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from advedge.calibration import (
    CACHE_SCHEMA,
    CalibrationSet,
    build_calibration_set,
    check_fits,
    default_cache_dir,
    has_legacy_calibrator,
    load_calibration_set,
    make_legacy_calibrator,
    quantize_qdq,
    save_calibration_set,
    select_fp32_nodes,
    verify_qdq,
)
from advedge.calibration.sets import _stratified_indices, _to_uint8

from advedge.errors import DataError, ExportError, UsageError

SIZE = 8
NUM_CLASSES = 4
WIDTH = 16  # the classifier's channels: TensorRT's INT8 convolutions want 16 (nodes.py)
HEAD_NODES = ["node_conv_head", "node_tanh", "node_mul", "node_add", "node_clip"]


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _write_data(
    root: Path,
    *,
    per_class: tuple[int, ...] = (20, 20, 20, 20),
    size: int = SIZE,
    channels: int = 3,
    seed: int = 0,
) -> Path:
    """An npz data directory (train.npz, test.npz) with ``per_class[c]`` train images of class c."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    y_train = np.repeat(np.arange(len(per_class)), per_class).astype(np.int64)
    rng.shuffle(y_train)
    names = np.array([f"class{i}" for i in range(len(per_class))])
    for split, y in (("train", y_train), ("test", np.arange(16, dtype=np.int64) % len(per_class))):
        x = rng.integers(0, 256, size=(len(y), size, size, channels), dtype=np.uint8)
        np.savez(root / f"{split}.npz", x=x, y=y, class_names=names)
    return root


def _random_set(n: int = 64, *, channels: int = 3, size: int = SIZE, seed: int = 0):
    rng = np.random.default_rng(seed)
    return CalibrationSet(
        x=rng.integers(0, 256, size=(n, size, size, channels), dtype=np.uint8),
        y=(np.arange(n) % NUM_CLASSES).astype(np.int64),
        is_adv=np.zeros(n, dtype=bool),
        meta={"note": "synthetic"},
    )


def _make_onnx(
    path: Path,
    *,
    head: bool = False,
    linear: str = "gemm",
    unnamed: bool = False,
    channels: int = 3,
    seed: int = 0,
) -> Path:
    """A tiny classifier, optionally behind a purifier head; input ``x`` [N, C, 8, 8]."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)

    def init(name, value):
        return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)

    nodes, inits = [], []
    src = "x"
    if head:
        nodes += [
            helper.make_node(
                "Conv", ["x", "wp", "bp"], ["pc"], name="node_conv_head", pads=[1, 1, 1, 1]
            ),
            helper.make_node("Tanh", ["pc"], ["pt"], name="node_tanh"),
            helper.make_node("Mul", ["pt", "eps_r"], ["r"], name="node_mul"),
            helper.make_node("Add", ["x", "r"], ["xr"], name="node_add"),
            helper.make_node("Clip", ["xr", "lo", "hi"], ["xp"], name="node_clip"),
        ]
        inits += [
            init("wp", rng.normal(0, 0.3, (channels, channels, 3, 3))),
            init("bp", np.zeros(channels)),
            init("eps_r", 10 / 255),
            init("lo", 0.0),
            init("hi", 1.0),
        ]
        src = "xp"
    nodes += [
        helper.make_node("Conv", [src, "w1", "b1"], ["c1"], name="node_conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="node_relu1"),
        helper.make_node("GlobalAveragePool", ["r1"], ["gap"], name="node_gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="node_flatten"),
    ]
    inits += [
        init("w1", rng.normal(0, 0.5, (WIDTH, channels, 3, 3))),
        init("b1", rng.normal(0, 0.1, WIDTH)),
        init("bf", rng.normal(0, 0.1, NUM_CLASSES)),
    ]
    if linear == "gemm":
        nodes.append(
            helper.make_node("Gemm", ["flat", "wf", "bf"], ["logits"], name="node_linear", transB=1)
        )
        inits.append(init("wf", rng.normal(0, 1, (NUM_CLASSES, WIDTH))))
    else:
        nodes += [
            helper.make_node("MatMul", ["flat", "wf"], ["mm"], name="node_matmul"),
            helper.make_node("Add", ["mm", "bf"], ["logits"], name="node_bias"),
        ]
        inits.append(init("wf", rng.normal(0, 1, (WIDTH, NUM_CLASSES))))
    if unnamed:
        for node in nodes:
            node.name = ""
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", channels, SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", NUM_CLASSES])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _minmax(model: Path, out: Path, calib: Any, tmp_path: Path, **kwargs: Any) -> Any:
    """quantize_qdq with minmax ranges, batches of 16 and the cache in ``tmp_path/cache``."""
    kwargs = {"method": "minmax", "batch_size": 16, "cache_dir": tmp_path / "cache", **kwargs}
    return quantize_qdq(model, out, calib, **kwargs)


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    """Run with basic graph optimisations only: Q/DQ stay float ops (exact fake quantisation).

    ORT's extended optimisations fuse Q/DQ into int8 CPU kernels whose u8s8 products saturate
    on CPUs without VNNI, which is an ORT CPU artefact, not a property of the Q/DQ model.
    """
    ort = pytest.importorskip("onnxruntime")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def _load(path: Path):
    onnx = pytest.importorskip("onnx")
    return onnx.load(str(path))


def _graph_maps(model):
    producer, consumers = {}, {}
    for node in model.graph.node:
        for out in node.output:
            producer[out] = node
        for inp in node.input:
            consumers.setdefault(inp, []).append(node)
    return producer, consumers


def _node(model, name):
    return next(n for n in model.graph.node if n.name == name)


def _fed_by_dq(model, name) -> bool:
    """Whether any input of node ``name`` comes out of a DequantizeLinear."""
    producer, _ = _graph_maps(model)
    return any(
        inp in producer and producer[inp].op_type == "DequantizeLinear"
        for inp in _node(model, name).input
    )


def _feeds_q(model, name) -> bool:
    """Whether any output of node ``name`` goes into a QuantizeLinear."""
    _, consumers = _graph_maps(model)
    return any(
        c.op_type == "QuantizeLinear"
        for out in _node(model, name).output
        for c in consumers.get(out, [])
    )


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return _write_data(tmp_path / "data")


@pytest.fixture
def models(tmp_path: Path) -> dict[str, Path]:
    pytest.importorskip("onnxruntime")
    return {
        "plain": _make_onnx(tmp_path / "plain.onnx"),
        "head": _make_onnx(tmp_path / "head.onnx", head=True),
    }


# --------------------------------------------------------------------------------------------
# Calibration sets
# --------------------------------------------------------------------------------------------


def test_build_is_stratified_from_train_and_deterministic(data_dir: Path) -> None:
    cs = build_calibration_set(data_dir, n=40, seed=3)
    train = np.load(data_dir / "train.npz")
    assert len(cs) == 40
    assert cs.x.dtype == np.uint8 and cs.x.shape == (40, SIZE, SIZE, 3)
    assert np.bincount(cs.y, minlength=NUM_CLASSES).tolist() == [10, 10, 10, 10]
    assert not cs.is_adv.any()
    # every image is a training image with its own label
    lookup = {train["x"][i].tobytes(): int(train["y"][i]) for i in range(len(train["y"]))}
    assert all(lookup[img.tobytes()] == label for img, label in zip(cs.x, cs.y, strict=True))
    assert cs.meta["split"] == "train" and cs.meta["n"] == 40 and cs.meta["seed"] == 3
    assert cs.meta["mix_adv"] == 0.0 and cs.meta["model_sha256"] is None
    assert cs.meta["class_names"] == [f"class{i}" for i in range(NUM_CLASSES)]
    assert cs.meta["source"] == str(data_dir.resolve())
    assert build_calibration_set(data_dir, n=40, seed=3).sha256 == cs.sha256
    assert build_calibration_set(data_dir, n=40, seed=4).sha256 != cs.sha256
    f = cs.as_float()
    assert f.dtype == np.float32 and f.shape == (40, 3, SIZE, SIZE)
    np.testing.assert_allclose(f[5, 2, 1, 4], cs.x[5, 1, 4, 2] / 255.0)


def test_stratified_adversarial_choice_follows_class_sizes() -> None:
    y = np.repeat(np.arange(3), [50, 30, 20]).astype(np.int64)
    idx = _stratified_indices(y, 10, np.random.default_rng(0))
    assert len(np.unique(idx)) == 10
    assert np.bincount(y[idx], minlength=3).tolist() == [5, 3, 2]
    idx = _stratified_indices(y, 7, np.random.default_rng(1))  # 3.5, 2.1, 1.4 -> 4, 2, 1
    assert np.bincount(y[idx], minlength=3).tolist() == [4, 2, 1]


def test_to_uint8_rounds_half_to_even_and_clips() -> None:
    x = np.array([0.5, 1.5, 2.5, 3.5, -4.0, 300.0], dtype=np.float64) / 255.0
    out = _to_uint8(x.reshape(1, 1, 1, 6))
    assert out.shape == (1, 1, 6, 1)
    assert out.ravel().tolist() == [0, 2, 2, 4, 0, 255]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"n": 81}, DataError, "has only 80"),
        ({"n": 0}, UsageError, "positive"),
        ({"mix_adv": 1.5}, UsageError, "mix_adv must lie in"),
        ({"mix_adv": 0.25}, UsageError, "needs a model"),
    ],
)
def test_build_rejects_bad_options(data_dir: Path, kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        build_calibration_set(data_dir, **{"n": 20, **kwargs})


def test_sha256_survives_save_load_and_changes_with_one_pixel(tmp_path: Path) -> None:
    cs = _random_set(16)
    path = save_calibration_set(cs, tmp_path / "sets" / "calib.npz")
    assert path.is_file() and not list(path.parent.glob(".*.tmp"))
    with np.load(path, allow_pickle=False) as npz:  # no pickled objects in the file
        assert sorted(npz.files) == ["is_adv", "meta", "sha256", "x", "y"]
        assert str(npz["sha256"][0]) == cs.sha256
    back = load_calibration_set(path)
    assert back.sha256 == cs.sha256 and back.meta == {"note": "synthetic"}
    np.testing.assert_array_equal(back.x, cs.x)
    changed = CalibrationSet(x=cs.x.copy(), y=cs.y, is_adv=cs.is_adv)
    changed.x[3, 2, 1, 0] ^= 1
    assert changed.sha256 != cs.sha256
    flipped = CalibrationSet(x=cs.x, y=cs.y, is_adv=cs.is_adv.copy())
    flipped.is_adv[0] = True
    assert flipped.sha256 != cs.sha256


def _tamper(path: Path, kind: str) -> None:
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    if kind == "pixel":
        arrays["x"][0, 0, 0, 0] ^= 0xFF
    elif kind == "missing-key":
        del arrays["is_adv"]
    elif kind == "dtype":
        arrays["y"] = arrays["y"].astype(np.int32)
    elif kind == "ndim":
        arrays["x"] = arrays["x"].reshape(len(arrays["x"]), -1)
    elif kind == "garbage":
        path.write_bytes(b"not an npz file at all")
        return
    elif kind == "truncated":
        path.write_bytes(path.read_bytes()[:200])
        return
    elif kind == "object":
        arrays["meta"] = np.array([{"a": 1}], dtype=object)
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


@pytest.mark.parametrize(
    ("kind", "match"),
    [
        ("pixel", "fails its checksum"),
        ("missing-key", "missing key"),
        ("dtype", "labels must be an int64"),
        ("ndim", "images must be a uint8 array"),
        ("garbage", "cannot read calibration set"),
        ("truncated", "cannot read calibration set"),
        ("object", "cannot read calibration set"),
    ],
)
def test_load_refuses_damaged_sets(tmp_path: Path, kind: str, match: str) -> None:
    path = save_calibration_set(_random_set(8), tmp_path / "calib.npz")
    _tamper(path, kind)
    with pytest.raises(ExportError, match=match) as info:
        load_calibration_set(path)
    assert "\n" not in str(info.value)


def test_load_missing_set(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="not found"):
        load_calibration_set(tmp_path / "nope.npz")


def test_mix_adv_perturbations_stay_within_eps_and_fool_the_model(
    data_dir: Path, request: pytest.FixtureRequest
) -> None:
    torch = pytest.importorskip("torch")
    from advedge.models import create_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: thread spin-up on a busy 2-core box costs seconds
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    torch.manual_seed(0)
    model = create_model("tiny_cnn", num_classes=NUM_CLASSES, in_channels=3).eval()
    calls: list[tuple[int, int]] = []
    clean = build_calibration_set(data_dir, n=24, seed=1)
    mixed = build_calibration_set(
        data_dir,
        n=24,
        seed=1,
        mix_adv=0.5,
        model=model,
        eps=8 / 255,
        steps=10,
        batch_size=8,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert mixed.is_adv.sum() == 12 and calls == [(8, 12), (12, 12)]
    assert np.bincount(mixed.y[mixed.is_adv], minlength=NUM_CLASSES).tolist() == [3] * 4
    np.testing.assert_array_equal(mixed.y, clean.y)
    np.testing.assert_array_equal(mixed.x[~mixed.is_adv], clean.x[~mixed.is_adv])
    diff = np.abs(mixed.x.astype(np.int16) - clean.x.astype(np.int16))
    assert diff.max() <= 8  # eps * 255 = 8 grey levels, + 0.5 rounding -> at most 8
    assert (diff[mixed.is_adv].reshape(12, -1).max(axis=1) > 0).all()
    with torch.no_grad():
        pred_clean = model(torch.from_numpy(clean.as_float())).argmax(1).numpy()
        pred_mixed = model(torch.from_numpy(mixed.as_float())).argmax(1).numpy()
    changed = pred_clean != pred_mixed
    assert changed[mixed.is_adv].any() and not changed[~mixed.is_adv].any()
    assert mixed.meta["attack"]["name"] == "pgd"
    assert mixed.meta["attack"]["settings"]["steps"] == 10
    assert len(mixed.meta["model_sha256"]) == 64 and mixed.meta["n_adv"] == 12
    again = build_calibration_set(
        data_dir, n=24, seed=1, mix_adv=0.5, model=model, eps="8/255", batch_size=8
    )
    assert again.sha256 == mixed.sha256  # seeded PGD start: reproducible


def test_check_fits() -> None:
    cs = _random_set(10)
    check_fits(cs, [3, SIZE, SIZE], 10)
    check_fits(cs, ["C", SIZE, SIZE], 4)  # symbolic dims match anything
    mnist_like = _random_set(10, channels=1, size=28)
    with pytest.raises(ExportError, match=r"\[1, 28, 28\].*\[3, 32, 32\]"):
        check_fits(mnist_like, [3, 32, 32], 4)
    with pytest.raises(
        ExportError, match="calibration set of 10 images is smaller than the batch 16"
    ):
        check_fits(cs, [3, SIZE, SIZE], 16)
    with pytest.raises(UsageError):
        check_fits(cs, [3, SIZE, SIZE], 0)


# --------------------------------------------------------------------------------------------
# Explicit INT8 (Q/DQ)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["entropy", "minmax", "percentile"])
def test_quantize_methods_give_symmetric_qdq_close_to_fp32(
    tmp_path: Path, models: dict[str, Path], method: str
) -> None:
    cs = _random_set(64)
    out = tmp_path / f"plain.{method}.onnx"
    res = quantize_qdq(
        models["plain"],
        out,
        cs,
        method=method,
        batch_size=16,
        keep_fp32="none",
        cache_dir=tmp_path / "cache",
    )
    assert res.path == out and out.is_file() and res.method == method
    assert res.excluded_nodes == [] and not res.cache_hit
    assert res.calib_sha256 == cs.sha256 and len(res.model_sha256) == 64
    q = _load(out)
    ops = [n.op_type for n in q.graph.node]
    assert res.n_qdq_pairs == ops.count("QuantizeLinear") >= 5
    assert verify_qdq(q) == res.n_qdq_pairs
    from onnx import numpy_helper

    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    for node in q.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zp = inits[node.input[2]]
            assert zp.dtype == np.int8 and not zp.any()
    assert _fed_by_dq(q, "node_conv1") and _fed_by_dq(q, "node_linear")
    x = cs.as_float()
    ref, got = _run(models["plain"], x), _run(out, x)
    assert (ref.argmax(1) == got.argmax(1)).mean() >= 0.9
    assert np.abs(ref - got).max() < 0.1 * np.abs(ref).max()


def test_auto_policy_keeps_purifier_head_and_final_gemm_in_fp32(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    cs = _random_set(48)
    auto = _minmax(models["head"], tmp_path / "auto.onnx", cs, tmp_path)
    assert auto.excluded_nodes == [*HEAD_NODES, "node_linear"]
    q = _load(auto.path)
    for name in HEAD_NODES:
        assert not _fed_by_dq(q, name), name
    for name in HEAD_NODES[:-1]:
        assert not _feeds_q(q, name), name
    linear = _node(q, "node_linear")
    producer, _ = _graph_maps(q)
    assert linear.input[1] not in producer and linear.input[2] not in producer  # FP32 weights
    assert not _feeds_q(q, "node_linear") and linear.output[0] == "logits"
    assert _fed_by_dq(q, "node_conv1")  # the classifier body is INT8

    none = _minmax(models["head"], tmp_path / "none.onnx", cs, tmp_path, keep_fp32="none")
    assert none.cache_hit  # the ranges do not depend on the FP32 policy
    qn = _load(none.path)
    assert _fed_by_dq(qn, "node_linear")  # the last layer is INT8 too
    # nothing else of the head is: its 3-channel conv has no TensorRT INT8 kernel, its add is
    # no residual add, and a Tanh/Mul/Clip input is never quantised
    for name in HEAD_NODES:
        assert not _fed_by_dq(qn, name), name
    assert none.n_qdq_pairs > auto.n_qdq_pairs
    x = cs.as_float()
    ref = _run(models["head"], x)
    assert np.abs(_run(auto.path, x) - ref).max() < 0.1 * np.abs(ref).max()


def test_select_fp32_nodes_variants(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import helper

    matmul = _load(_make_onnx(tmp_path / "mm.onnx", linear="matmul"))
    assert select_fp32_nodes(matmul, "auto") == ["node_matmul", "node_bias"]
    assert select_fp32_nodes(matmul, "none") == []
    assert select_fp32_nodes(matmul, ["node_relu1", "node_conv1"]) == ["node_conv1", "node_relu1"]
    with pytest.raises(UsageError, match="node_relu"):
        select_fp32_nodes(matmul, ["node_relu"])
    with pytest.raises(UsageError, match="unknown FP32 policy"):
        select_fp32_nodes(matmul, "fp32")
    # a Tanh activation that reaches no Clip is not a purifier head
    head = _load(_make_onnx(tmp_path / "h.onnx", head=True))
    clip = _node(head, "node_clip")
    clip.CopyFrom(helper.make_node("Relu", ["xr"], ["xp"], name="node_clip"))
    onnx.checker.check_model(head)
    assert select_fp32_nodes(head, "auto") == ["node_linear"]


def test_unnamed_nodes_are_named_and_can_be_kept_fp32(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    path = _make_onnx(tmp_path / "unnamed.onnx", head=True, unnamed=True)
    res = _minmax(path, tmp_path / "q.onnx", _random_set(32), tmp_path)
    assert res.excluded_nodes == [
        "advedge_conv_0",
        "advedge_tanh_1",
        "advedge_mul_2",
        "advedge_add_3",
        "advedge_clip_4",
        "advedge_gemm_9",
    ]
    q = _load(res.path)
    assert not _fed_by_dq(q, "advedge_tanh_1") and not _fed_by_dq(q, "advedge_conv_0")


def test_keep_fp32_list_and_bad_options(tmp_path: Path, models: dict[str, Path]) -> None:
    cs = _random_set(32)
    res = _minmax(models["plain"], tmp_path / "q.onnx", cs, tmp_path, keep_fp32=["node_conv1"])
    assert res.excluded_nodes == ["node_conv1"]
    assert not _fed_by_dq(_load(res.path), "node_conv1")
    out = tmp_path / "never.onnx"
    for kwargs, error in (
        ({"method": "kl"}, UsageError),
        ({"keep_fp32": ["no_such_node"]}, UsageError),
        ({"keep_fp32": "fp32"}, UsageError),
        ({"input_name": "image"}, UsageError),
        ({"batch_size": 33}, ExportError),
    ):
        with pytest.raises(error):
            quantize_qdq(models["plain"], out, cs, cache_dir=tmp_path / "cache", **kwargs)
    with pytest.raises(ExportError, match="smaller than the batch 64"):
        quantize_qdq(models["plain"], out, cs, batch_size=64, cache_dir=tmp_path / "cache")
    with pytest.raises(ExportError, match=r"\[1, 8, 8\].*\[3, 8, 8\]"):
        quantize_qdq(
            models["plain"],
            out,
            _random_set(32, channels=1),
            batch_size=8,
            cache_dir=tmp_path / "cache",
        )
    with pytest.raises(ExportError, match="not found"):
        quantize_qdq(tmp_path / "missing.onnx", out, cs, cache_dir=tmp_path / "cache")
    assert not out.exists() and not list(tmp_path.glob(".never.onnx.*"))


def test_calibration_cache_hit_miss_and_corruption(
    tmp_path: Path,
    models: dict[str, Path],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the CLI's setup_logging (run by earlier tests) stops "advedge" records at its own handler
    monkeypatch.setattr(logging.getLogger("advedge"), "propagate", True)
    cache = tmp_path / "cache"
    cs = _random_set(48)
    kw = {"method": "entropy", "batch_size": 16, "cache_dir": cache}
    first = quantize_qdq(models["plain"], tmp_path / "a.onnx", cs, **kw)
    assert not first.cache_hit and first.cache_path is not None and first.cache_path.is_file()
    assert first.cache_path.parent == cache
    doc = json.loads(first.cache_path.read_text())
    assert doc["schema"] == CACHE_SCHEMA and doc["method"] == "entropy"
    assert doc["model_sha256"] == first.model_sha256 and doc["calib_sha256"] == cs.sha256
    assert doc["options"]["activation_symmetric"] is True and doc["onnxruntime"]
    assert "data" in doc["ranges"]

    second = quantize_qdq(models["plain"], tmp_path / "b.onnx", cs, **kw)
    assert second.cache_hit and second.cache_path == first.cache_path
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()

    # another calibration set or another method is another key
    other = quantize_qdq(models["plain"], tmp_path / "c.onnx", _random_set(48, seed=5), **kw)
    assert not other.cache_hit and other.cache_path != first.cache_path
    mm = quantize_qdq(models["plain"], tmp_path / "d.onnx", cs, **{**kw, "method": "minmax"})
    assert not mm.cache_hit and mm.cache_path != first.cache_path

    # the cached ranges are what quantisation uses: change one and the output changes
    ranges = doc["ranges"]["data"]
    ranges["x"]["highest"] = float(ranges["x"]["highest"]) * 10  # conv1's input: quantised
    ranges["x"]["lowest"] = float(ranges["x"]["lowest"]) * 10
    first.cache_path.write_text(json.dumps(doc))
    edited = quantize_qdq(models["plain"], tmp_path / "e.onnx", cs, **kw)
    assert edited.cache_hit
    assert (tmp_path / "e.onnx").read_bytes() != (tmp_path / "a.onnx").read_bytes()

    # a corrupt cache is recomputed, with a warning, and rewritten
    for corrupt in ("{not json", json.dumps({**doc, "ranges": {"data": {"nope": {}}}})):
        first.cache_path.write_text(corrupt)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="advedge.calibration.cache"):
            again = quantize_qdq(models["plain"], tmp_path / "f.onnx", cs, **kw)
        assert not again.cache_hit
        assert any("calibration cache" in r.getMessage() for r in caplog.records)
        assert (tmp_path / "f.onnx").read_bytes() == (tmp_path / "a.onnx").read_bytes()
        assert json.loads(first.cache_path.read_text())["schema"] == CACHE_SCHEMA

    off = quantize_qdq(models["plain"], tmp_path / "g.onnx", cs, **kw, use_cache=False)
    assert off.cache_path is None and not off.cache_hit


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ADVEDGE_CACHE_DIR", str(tmp_path / "adv"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "adv" / "calibration"
    monkeypatch.delenv("ADVEDGE_CACHE_DIR")
    assert default_cache_dir() == tmp_path / "xdg" / "advedge" / "calibration"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "advedge" / "calibration"


def test_quantize_keeps_stdout_clean_and_takes_a_saved_set(
    tmp_path: Path, models: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    path = save_calibration_set(_random_set(32), tmp_path / "calib.npz")
    capsys.readouterr()
    for method in ("entropy", "percentile"):  # both print progress from inside ORT
        res = quantize_qdq(
            models["head"],
            tmp_path / f"{method}.onnx",
            path,
            method=method,
            batch_size=16,
            cache_dir=tmp_path / "cache",
        )
        assert not res.cache_hit and res.calib_sha256 == load_calibration_set(path).sha256
    captured = capsys.readouterr()
    assert captured.out == ""


def test_verify_qdq_rejects_what_tensorrt_rejects(tmp_path: Path, models: dict[str, Path]) -> None:
    from onnx import numpy_helper

    res = _minmax(models["plain"], tmp_path / "q.onnx", _random_set(32), tmp_path, keep_fp32="none")
    q = _load(res.path)
    zp_name = next(n.input[2] for n in q.graph.node if n.op_type == "QuantizeLinear")
    zp = next(i for i in q.graph.initializer if i.name == zp_name)
    zp.CopyFrom(numpy_helper.from_array(np.array(3, dtype=np.int8), zp_name))
    with pytest.raises(ExportError, match="non-zero zero point"):
        verify_qdq(q)
    q = _load(res.path)
    w_dq = next(n for n in q.graph.node if n.op_type == "DequantizeLinear")
    q.graph.initializer.append(numpy_helper.from_array(np.zeros(4, np.int32), "bias_q"))
    w_dq.input[0] = "bias_q"
    with pytest.raises(ExportError, match="int32"):
        verify_qdq(q)
    with pytest.raises(ExportError, match="no Q/DQ pair"):
        verify_qdq(_load(models["plain"]))


def test_calibration_is_torch_free(tmp_path: Path, models: dict[str, Path]) -> None:
    calib = save_calibration_set(_random_set(32), tmp_path / "calib.npz")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        import advedge.calibration as c
        cs = c.load_calibration_set({str(calib)!r})
        res = c.quantize_qdq({str(models["head"])!r}, {str(tmp_path / "q.onnx")!r}, cs,
                             method="minmax", batch_size=16, cache_dir={str(tmp_path / "c")!r})
        loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
        assert loaded == ["torch"] and sys.modules["torch"] is None, loaded
        print(res.n_qdq_pairs, len(res.excluded_nodes))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    pairs, excluded = proc.stdout.split()
    assert int(pairs) > 0 and int(excluded) == 6


# --------------------------------------------------------------------------------------------
# Legacy TensorRT 10 calibrator, against a minimal stand-in (not TensorRT)
# --------------------------------------------------------------------------------------------


class StandInEntropyCalibrator2:
    """Stand-in for ``trt.IInt8EntropyCalibrator2``: records that its __init__ ran."""

    def __init__(self) -> None:
        self.stand_in_init_called = True


class StandInMinMaxCalibrator(StandInEntropyCalibrator2):
    """Stand-in for ``trt.IInt8MinMaxCalibrator``."""


def _stand_in_trt(*, legacy: bool) -> types.SimpleNamespace:
    if legacy:
        return types.SimpleNamespace(
            __version__="10.3.0 (stand-in)",
            IInt8EntropyCalibrator2=StandInEntropyCalibrator2,
            IInt8MinMaxCalibrator=StandInMinMaxCalibrator,
        )
    return types.SimpleNamespace(__version__="11.0.0 (stand-in)")


class HostBuffer:
    """A 'device' buffer in host memory, with a torch-like ``data_ptr()``."""

    def __init__(self, nbytes: int) -> None:
        self.array = np.zeros(nbytes, dtype=np.uint8)
        self.copies: list[np.ndarray] = []

    def data_ptr(self) -> int:
        return int(self.array.ctypes.data)


@pytest.mark.parametrize(
    ("method", "base"),
    [("entropy", StandInEntropyCalibrator2), ("minmax", StandInMinMaxCalibrator)],
)
def test_legacy_calibrator_serves_batches_and_cache(tmp_path: Path, method: str, base) -> None:
    trt = _stand_in_trt(legacy=True)
    assert has_legacy_calibrator(trt)
    cs = _random_set(10)
    buffers: list[HostBuffer] = []

    def alloc(nbytes: int) -> HostBuffer:
        buffers.append(HostBuffer(nbytes))
        return buffers[-1]

    def copy_to_device(buf: HostBuffer, array: np.ndarray) -> None:
        assert array.dtype == np.float32 and array.flags.c_contiguous
        buf.array[:] = array.view(np.uint8).ravel()
        buf.copies.append(array.copy())

    cache_file = tmp_path / "trt" / "calib.cache"
    calib = make_legacy_calibrator(
        trt,
        cs,
        method=method,
        cache_file=cache_file,
        batch_size=4,
        alloc=alloc,
        copy_to_device=copy_to_device,
    )
    assert isinstance(calib, base) and calib.stand_in_init_called
    assert calib.get_batch_size() == 4
    ptrs = [calib.get_batch(["x"]), calib.get_batch(["x"])]
    assert calib.get_batch(["x"]) is None  # 10 images: two full batches, the partial one dropped
    assert calib.get_batch(["x"]) is None
    assert len(buffers) == 1 and buffers[0].array.nbytes == 4 * 3 * SIZE * SIZE * 4
    assert ptrs == [[buffers[0].data_ptr()]] * 2
    np.testing.assert_array_equal(buffers[0].copies[0], cs.as_float()[0:4])
    np.testing.assert_array_equal(buffers[0].copies[1], cs.as_float()[4:8])
    assert calib.read_calibration_cache() is None
    calib.write_calibration_cache(memoryview(b"TRT-8601-EntropyCalibration2\nx: 3c010a14\n"))
    assert cache_file.read_bytes().startswith(b"TRT-8601")
    assert calib.read_calibration_cache() == cache_file.read_bytes()


def test_legacy_calibrator_refused_without_implicit_int8(tmp_path: Path) -> None:
    def make(trt: types.SimpleNamespace, **kwargs):
        kwargs = {"cache_file": tmp_path / "c", "batch_size": 4, **kwargs}
        return make_legacy_calibrator(
            trt, _random_set(8), alloc=lambda n: 0, copy_to_device=lambda b, a: None, **kwargs
        )

    trt = _stand_in_trt(legacy=False)
    assert not has_legacy_calibrator(trt)
    with pytest.raises(
        UsageError, match=r"TensorRT 11\.0\.0 \(stand-in\) has no implicit INT8"
    ) as info:
        make(trt)
    assert "--precision int8" in str(info.value)
    legacy = _stand_in_trt(legacy=True)
    with pytest.raises(UsageError):
        make(legacy, method="percentile")
    with pytest.raises(ExportError, match="smaller than the batch 16"):
        make(legacy, batch_size=16)

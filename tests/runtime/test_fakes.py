"""Fidelity tests of the TensorRT / pycuda test doubles in ``tests/fakes``.

They pin down the documented behaviour the doubles promise (see the docstrings in
``tests/fakes/tensorrt.py`` and ``tests/fakes/pycuda.py``), so code tested against the doubles is
tested against the documented API rather than against whatever the doubles happen to do.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fakes import install_fake_tensorrt
from fakes.pycuda import make_pycuda
from fakes.tensorrt import make_tensorrt

VERSIONS = ["10.3.0", "11.0.0"]


# --------------------------------------------------------------------------------------------
# Tiny ONNX models: input "input" [N, 3, 8, 8] -> Conv -> Relu -> GlobalAveragePool -> Flatten
# -> Gemm -> "logits" [N, 10]
# --------------------------------------------------------------------------------------------


def _tiny_onnx(kind: str = "fp32") -> bytes:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    inits = [
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "B"),
        numpy_helper.from_array(rng.standard_normal((10, 4)).astype(np.float32), "FW"),
        numpy_helper.from_array(rng.standard_normal(10).astype(np.float32), "FB"),
    ]
    nodes = []
    conv_in, conv_w, conv_b = "input", "W", "B"
    if kind == "qdq":
        w_scale = np.float32(np.abs(w).max() / 127)
        inits += [
            numpy_helper.from_array(np.round(w / w_scale).astype(np.int8), "W_q"),
            numpy_helper.from_array(np.array(w_scale, np.float32), "w_scale"),
            numpy_helper.from_array(np.array(0.05, np.float32), "x_scale"),
            numpy_helper.from_array(np.array(0, np.int8), "zp"),
        ]
        nodes += [
            helper.make_node(
                "QuantizeLinear", ["input", "x_scale", "zp"], ["x_q"], name="/q/QuantizeLinear"
            ),
            helper.make_node(
                "DequantizeLinear", ["x_q", "x_scale", "zp"], ["x_dq"], name="/q/DequantizeLinear"
            ),
            helper.make_node(
                "DequantizeLinear", ["W_q", "w_scale", "zp"], ["W_dq"], name="/w/DequantizeLinear"
            ),
        ]
        conv_in, conv_w = "x_dq", "W_dq"
    elif kind == "fp16":
        inits += [numpy_helper.from_array(w.astype(np.float16), "W16")]
        inits[0] = numpy_helper.from_array(rng.standard_normal(4).astype(np.float16), "B")
        nodes.append(
            helper.make_node(
                "Cast", ["input"], ["x16"], name="/cast_in/Cast", to=TensorProto.FLOAT16
            )
        )
        conv_in, conv_w = "x16", "W16"
    else:
        inits.append(numpy_helper.from_array(w, "W"))
    nodes.append(
        helper.make_node(
            "Conv", [conv_in, conv_w, conv_b], ["c"], name="/conv/Conv", pads=[1, 1, 1, 1]
        )
    )
    nodes.append(helper.make_node("Relu", ["c"], ["r"], name="/relu/Relu"))
    relu_out = "r"
    if kind == "fp16":
        nodes.append(
            helper.make_node("Cast", ["r"], ["r32"], name="/cast_out/Cast", to=TensorProto.FLOAT)
        )
        relu_out = "r32"
    nodes += [
        helper.make_node("GlobalAveragePool", [relu_out], ["p"], name="/pool/GlobalAveragePool"),
        helper.make_node("Flatten", ["p"], ["f"], name="/flatten/Flatten"),
        helper.make_node("Gemm", ["f", "FW", "FB"], ["logits"], name="/fc/Gemm", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _reference(model: bytes, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


def _capture_logger(trt: Any) -> Any:
    class Capture(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.records: list[tuple[Any, str]] = []

        def log(self, severity: Any, msg: str) -> None:
            self.records.append((severity, msg))

        def errors(self) -> list[str]:
            return [m for s, m in self.records if s <= trt.ILogger.ERROR]

    return Capture()


def _network(
    trt: Any, logger: Any, model: bytes, *, strongly_typed: bool = True
) -> tuple[Any, Any]:
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(model), [parser.get_error(i).desc() for i in range(parser.num_errors)]
    return builder, network


def _build(
    trt: Any,
    model: bytes,
    *,
    logger: Any = None,
    strongly_typed: bool = True,
    profile: tuple[tuple[int, ...], ...] | None = ((1, 3, 8, 8), (2, 3, 8, 8), (4, 3, 8, 8)),
    verbosity: str = "DETAILED",
    configure: Any = None,
) -> tuple[Any, Any]:
    logger = logger or _capture_logger(trt)
    builder, network = _network(trt, logger, model, strongly_typed=strongly_typed)
    config = builder.create_builder_config()
    config.profiling_verbosity = getattr(trt.ProfilingVerbosity, verbosity)
    if profile is not None:
        prof = builder.create_optimization_profile()
        prof.set_shape("input", *profile)
        assert config.add_optimization_profile(prof) == 0
    if configure is not None:
        configure(builder, network, config)
    return builder.build_serialized_network(network, config), logger


def _engine(trt: Any, plan: Any, logger: Any = None) -> Any:
    return trt.Runtime(logger or _capture_logger(trt)).deserialize_cuda_engine(plan)


def _layers(trt: Any, engine: Any, context: Any = None) -> dict[str, Any]:
    inspector = engine.create_engine_inspector()
    if context is not None:
        inspector.execution_context = context
    return json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))


# --------------------------------------------------------------------------------------------
# End to end, both major versions
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_build_run_matches_onnxruntime(version: str, tmp_path: Path) -> None:
    trt = make_tensorrt(version)
    _, cuda, _ = make_pycuda()
    model = _tiny_onnx()
    path = tmp_path / "tiny.onnx"
    path.write_bytes(model)
    logger = _capture_logger(trt)

    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    assert parser.parse_from_file(str(path))
    assert (network.num_inputs, network.num_outputs) == (1, 1)
    inp, out = network.get_input(0), network.get_output(0)
    assert (inp.name, tuple(inp.shape), inp.dtype) == ("input", (-1, 3, 8, 8), trt.DataType.FLOAT)
    assert (out.name, tuple(out.shape), out.dtype) == ("logits", (-1, 10), trt.DataType.FLOAT)
    assert network.get_flag(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 1 << 26)
    assert config.get_memory_pool_limit(trt.MemoryPoolType.WORKSPACE) == 1 << 26
    cache = config.create_timing_cache(b"")
    assert config.set_timing_cache(cache, ignore_mismatch=False)
    profile = builder.create_optimization_profile()
    profile.set_shape("input", (1, 3, 8, 8), (2, 3, 8, 8), (4, 3, 8, 8))
    assert profile.get_shape("input") == [(1, 3, 8, 8), (2, 3, 8, 8), (4, 3, 8, 8)]
    assert config.add_optimization_profile(profile) == 0
    plan = builder.build_serialized_network(network, config)
    assert plan is not None and not logger.errors()

    # the timing cache filled up, serialises and reloads into a second build
    serialized = config.get_timing_cache().serialize()
    reloaded = config.create_timing_cache(bytes(serialized))
    assert reloaded is not None and bytes(reloaded.serialize()) == bytes(serialized)
    config2 = builder.create_builder_config()
    assert config2.set_timing_cache(reloaded, False)
    config2.add_optimization_profile(profile)
    assert builder.build_serialized_network(network, config2) is not None

    engine = _engine(trt, plan)
    assert engine.num_io_tensors == 2 and engine.num_optimization_profiles == 1
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    assert names == ["input", "logits"]
    assert engine.get_tensor_mode("input") == trt.TensorIOMode.INPUT
    assert engine.get_tensor_mode("logits") == trt.TensorIOMode.OUTPUT
    assert tuple(engine.get_tensor_shape("input")) == (-1, 3, 8, 8)
    assert engine.get_tensor_dtype("logits") == trt.DataType.FLOAT
    assert [tuple(s) for s in engine.get_tensor_profile_shape("input", 0)] == [
        (1, 3, 8, 8),
        (2, 3, 8, 8),
        (4, 3, 8, 8),
    ]
    assert trt.nptype(engine.get_tensor_dtype("input")) is np.float32

    context = engine.create_execution_context()
    stream = cuda.Stream()
    rng = np.random.default_rng(1)
    for batch in (3, 1):
        x = rng.standard_normal((batch, 3, 8, 8)).astype(np.float32)
        assert context.set_input_shape("input", x.shape)
        assert tuple(context.get_tensor_shape("logits")) == (batch, 10)
        assert context.all_binding_shapes_specified and context.infer_shapes() == []
        host_out = cuda.pagelocked_empty(tuple(context.get_tensor_shape("logits")), np.float32)
        d_in, d_out = cuda.mem_alloc(x.nbytes), cuda.mem_alloc(host_out.nbytes)
        cuda.memcpy_htod_async(d_in, x, stream)
        assert context.set_tensor_address("input", int(d_in))
        assert context.set_tensor_address("logits", int(d_out))
        assert context.execute_async_v3(stream.handle)
        cuda.memcpy_dtoh_async(host_out, d_out, stream)
        stream.synchronize()
        assert np.allclose(host_out, _reference(model, x), atol=1e-5)

    # a serialised engine round-trips
    again = _engine(trt, engine.serialize())
    assert again is not None and again.num_layers == engine.num_layers


# --------------------------------------------------------------------------------------------
# Which API exists in which major version
# --------------------------------------------------------------------------------------------


def test_removed_apis_absent_in_11() -> None:
    trt = make_tensorrt("11.0.0")
    for name in (
        "IInt8Calibrator",
        "IInt8EntropyCalibrator2",
        "IInt8MinMaxCalibrator",
        "CalibrationAlgoType",
    ):
        assert not hasattr(trt, name), name
    for flag in ("FP16", "INT8", "BF16", "FP8", "OBEY_PRECISION_CONSTRAINTS", "DIRECT_IO"):
        with pytest.raises(AttributeError):
            getattr(trt.BuilderFlag, flag)
    assert hasattr(trt.BuilderFlag, "TF32") and hasattr(trt.BuilderFlag, "VERSION_COMPATIBLE")
    # STRONGLY_TYPED is kept (deprecated, ignored: every 11.x network is strongly typed)
    assert hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    assert not hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH")
    builder = trt.Builder(trt.Logger())
    config = builder.create_builder_config()
    for attr in (
        "int8_calibrator",
        "set_calibration_profile",
        "get_calibration_profile",
        "quantization_flags",
    ):
        assert not hasattr(config, attr), attr
    assert not hasattr(builder, "platform_has_fast_fp16") and not hasattr(
        builder, "platform_has_fast_int8"
    )
    plan, _ = _build(trt, _tiny_onnx())
    engine = _engine(trt, plan)
    assert not hasattr(engine, "device_memory_size") and engine.device_memory_size_v2 > 0


def test_weak_typing_api_present_in_10() -> None:
    trt = make_tensorrt("10.3.0")
    assert trt.BuilderFlag.INT8 != trt.BuilderFlag.FP16
    assert hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH")
    cal = trt.IInt8EntropyCalibrator2()
    assert cal.get_algorithm() == trt.CalibrationAlgoType.ENTROPY_CALIBRATION_2
    assert trt.IInt8MinMaxCalibrator().get_algorithm() == trt.CalibrationAlgoType.MINMAX_CALIBRATION
    builder = trt.Builder(trt.Logger())
    config = builder.create_builder_config()
    assert config.int8_calibrator is None
    config.int8_calibrator = cal
    assert config.int8_calibrator is cal
    assert builder.platform_has_fast_fp16 and builder.platform_has_fast_int8
    assert config.get_flag(trt.BuilderFlag.TF32)  # on by default

    class NoBaseInit(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:  # forgets trt.IInt8EntropyCalibrator2.__init__(self)
            pass

    with pytest.raises(TypeError):
        config.int8_calibrator = NoBaseInit()


# --------------------------------------------------------------------------------------------
# TensorRT 10 legacy INT8 calibration
# --------------------------------------------------------------------------------------------


def _calibrator_class(trt: Any, cuda: Any) -> type:
    class Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self, batches: list[np.ndarray], cache: bytes | None = None) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.batches = list(batches)
            self.cache = cache
            self.batch_size = batches[0].shape[0]
            self.device = cuda.mem_alloc(batches[0].nbytes)
            self.calls = {"get_batch_size": 0, "get_batch": 0, "read": 0, "write": 0}
            self.names: list[str] = []
            self.written: bytes | None = None

        def get_batch_size(self) -> int:
            self.calls["get_batch_size"] += 1
            return self.batch_size

        def get_batch(self, names: list[str]) -> list[int] | None:
            self.calls["get_batch"] += 1
            self.names = list(names)
            if not self.batches:
                return None
            cuda.memcpy_htod(self.device, np.ascontiguousarray(self.batches.pop(0)))
            return [int(self.device)]

        def read_calibration_cache(self) -> bytes | None:
            self.calls["read"] += 1
            return self.cache

        def write_calibration_cache(self, cache: Any) -> None:
            self.calls["write"] += 1
            self.written = bytes(cache)

    return Calibrator


def test_legacy_int8_calibration_calls_the_calibrator() -> None:
    trt = make_tensorrt("10.3.0")
    _, cuda, _ = make_pycuda()
    Calibrator = _calibrator_class(trt, cuda)
    rng = np.random.default_rng(2)
    batches = [rng.standard_normal((2, 3, 8, 8)).astype(np.float32) for _ in range(3)]
    cal = Calibrator(batches)

    def int8(builder: Any, network: Any, config: Any) -> None:
        config.set_flag(trt.BuilderFlag.INT8)
        config.int8_calibrator = cal

    plan, logger = _build(trt, _tiny_onnx(), strongly_typed=False, configure=int8)
    assert plan is not None, logger.errors()
    assert cal.calls == {"get_batch_size": 1, "get_batch": 4, "read": 1, "write": 1}
    assert cal.names == ["input"]
    assert cal.written is not None and cal.written.startswith(b"TRT-100300-EntropyCalibration2\n")
    assert b"input: " in cal.written and b"logits: " in cal.written
    # calibrated Conv/Gemm run in Int8 (weakly typed path)
    conv = next(x for x in _layers(trt, _engine(trt, plan))["Layers"] if x["Name"] == "/conv/Conv")
    assert conv["Weights"]["Type"] == "Int8" and "i8i8" in conv["TacticName"]

    # a cache returned by read_calibration_cache() means no get_batch() calls
    cached = Calibrator(batches, cache=cal.written)

    def from_cache(builder: Any, network: Any, config: Any) -> None:
        config.set_flag(trt.BuilderFlag.INT8)
        config.int8_calibrator = cached

    plan, logger = _build(trt, _tiny_onnx(), strongly_typed=False, configure=from_cache)
    assert plan is not None, logger.errors()
    assert cached.calls["read"] == 1 and cached.calls["get_batch"] == 0


def test_calibration_with_no_batches_fails() -> None:
    trt = make_tensorrt("10.3.0")
    _, cuda, _ = make_pycuda()
    cal = _calibrator_class(trt, cuda)([np.zeros((2, 3, 8, 8), np.float32)])
    cal.batches.clear()

    def int8(builder: Any, network: Any, config: Any) -> None:
        config.set_flag(trt.BuilderFlag.INT8)
        config.int8_calibrator = cal

    plan, logger = _build(trt, _tiny_onnx(), strongly_typed=False, configure=int8)
    assert plan is None and any("Calibration failure" in m for m in logger.errors())


def test_precision_flags_rejected_on_strongly_typed_network_10() -> None:
    trt = make_tensorrt("10.3.0")
    plan, logger = _build(
        trt, _tiny_onnx(), configure=lambda b, n, c: c.set_flag(trt.BuilderFlag.FP16)
    )
    assert plan is None and any("strongly typed" in m for m in logger.errors())
    # the same flag on a weakly typed network builds, with Half layers
    plan, _ = _build(
        trt,
        _tiny_onnx(),
        strongly_typed=False,
        configure=lambda b, n, c: c.set_flag(trt.BuilderFlag.FP16),
    )
    relu = next(x for x in _layers(trt, _engine(trt, plan))["Layers"] if x["Name"] == "/relu/Relu")
    assert relu["Outputs"][0]["Format/Datatype"] == "Half"


# --------------------------------------------------------------------------------------------
# Strong typing: precisions come from the ONNX; inspector JSON per version
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_layer_precision_follows_the_onnx(version: str) -> None:
    trt = make_tensorrt(version)
    key = "Format/Datatype" if version.startswith("10") else "DataType"

    def conv_of(kind: str) -> dict[str, Any]:
        plan, logger = _build(trt, _tiny_onnx(kind))
        assert plan is not None, logger.errors()
        layers = _layers(trt, _engine(trt, plan))["Layers"]
        assert not any("QuantizeLinear" in x["Name"] for x in layers)  # Q/DQ folded
        return next(x for x in layers if x["Name"] == "/conv/Conv")

    qdq = conv_of("qdq")
    assert qdq["Inputs"][0][key] == "Int8" and qdq["Weights"]["Type"] == "Int8"
    fp16 = conv_of("fp16")
    assert fp16["Inputs"][0][key] == "Half" and fp16["Weights"]["Type"] == "Half"
    fp32 = conv_of("fp32")
    assert fp32["Inputs"][0][key] == "Float" and fp32["Weights"]["Type"] == "Float"


def test_qdq_engine_runs_like_onnxruntime() -> None:
    trt = make_tensorrt("11.0.0")
    _, cuda, _ = make_pycuda()
    model = _tiny_onnx("qdq")
    plan, _ = _build(trt, model)
    context = _engine(trt, plan).create_execution_context()
    x = np.random.default_rng(3).standard_normal((2, 3, 8, 8)).astype(np.float32)
    out = np.empty((2, 10), np.float32)
    d_in, d_out = cuda.mem_alloc(x.nbytes), cuda.mem_alloc(out.nbytes)
    cuda.memcpy_htod(d_in, x)
    assert context.set_input_shape("input", x.shape)
    assert context.execute_v2([int(d_in), int(d_out)])
    cuda.memcpy_dtoh(out, d_out)
    assert np.allclose(out, _reference(model, x), atol=1e-5)


def test_inspector_json_bindings_vs_io_tensors() -> None:
    trt10, trt11 = make_tensorrt("10.3.0"), make_tensorrt("11.0.0")
    info10 = _layers(trt10, _engine(trt10, _build(trt10, _tiny_onnx())[0]))
    assert info10["Bindings"] == ["input", "logits"] and "I/O Tensors" not in info10
    engine11 = _engine(trt11, _build(trt11, _tiny_onnx())[0])
    info11 = _layers(trt11, engine11)
    assert "Bindings" not in info11
    first = info11["I/O Tensors"][0]
    assert first["Name"] == "input" and first["IOMode"] == "Input" and first["DataType"] == "Float"
    assert first["ProfileInfo"][0]["MaxShape"] == [4, 3, 8, 8]
    # with an execution context whose shapes are set, dimensions become concrete
    context = engine11.create_execution_context()
    context.set_input_shape("input", (2, 3, 8, 8))
    conv = next(x for x in _layers(trt11, engine11, context)["Layers"] if x["Name"] == "/conv/Conv")
    assert conv["Outputs"][0]["Dimensions"] == [2, 4, 8, 8] and "Format" in conv["Outputs"][0]
    # LAYER_NAMES_ONLY (the default): names only
    names = _layers(
        trt10, _engine(trt10, _build(trt10, _tiny_onnx(), verbosity="LAYER_NAMES_ONLY")[0])
    )
    assert names["Layers"] == [
        "/conv/Conv",
        "/relu/Relu",
        "/pool/GlobalAveragePool",
        "/flatten/Flatten",
        "/fc/Gemm",
    ]


# --------------------------------------------------------------------------------------------
# Failure modes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("runtime_version", "cc"),
    [("10.4.0", (8, 7)), ("10.3.0", (8, 6)), ("11.0.0", (8, 7))],
)
def test_engine_is_tied_to_version_and_device(runtime_version: str, cc: tuple[int, int]) -> None:
    plan, _ = _build(make_tensorrt("10.3.0", compute_capability=(8, 7)), _tiny_onnx())
    other = make_tensorrt(runtime_version, compute_capability=cc)
    logger = _capture_logger(other)
    assert other.Runtime(logger).deserialize_cuda_engine(plan) is None
    assert logger.errors()
    assert _engine(make_tensorrt("10.3.0", compute_capability=(8, 7)), plan) is not None


def test_garbage_is_not_an_engine_or_a_timing_cache() -> None:
    trt = make_tensorrt("10.3.0")
    logger = _capture_logger(trt)
    assert trt.Runtime(logger).deserialize_cuda_engine(b"\x00" * 64) is None
    assert any("Magic tag does not match" in m for m in logger.errors())
    config = trt.Builder(logger).create_builder_config()
    assert config.create_timing_cache(b"not a timing cache") is None
    assert any("timing cache will not be used" in m for m in logger.errors())


def test_dynamic_input_needs_a_profile() -> None:
    trt = make_tensorrt("11.0.0")
    plan, logger = _build(trt, _tiny_onnx(), profile=None)
    assert plan is None
    assert any("no optimization profile has been defined" in m for m in logger.errors())


def test_profile_validation() -> None:
    trt = make_tensorrt("10.3.0")
    profile = trt.Builder(trt.Logger()).create_optimization_profile()
    with pytest.raises(RuntimeError, match="opt is inconsistent"):
        profile.set_shape("input", (4, 3, 8, 8), (2, 3, 8, 8), (8, 3, 8, 8))

    def wrong_name(builder: Any, network: Any, config: Any) -> None:
        config._profiles.clear()
        prof = builder.create_optimization_profile()
        prof.set_shape("images", (1, 3, 8, 8), (1, 3, 8, 8), (1, 3, 8, 8))
        config.add_optimization_profile(prof)

    plan, logger = _build(trt, _tiny_onnx(), configure=wrong_name)
    assert plan is None and logger.errors()
    # a static dimension contradicted by the profile
    plan, logger = _build(trt, _tiny_onnx(), profile=((1, 4, 8, 8), (1, 4, 8, 8), (1, 4, 8, 8)))
    assert plan is None and any("does not match network definition" in m for m in logger.errors())


def test_execution_context_refuses_bad_shapes_and_missing_addresses() -> None:
    trt = make_tensorrt("10.3.0")
    _, cuda, _ = make_pycuda()
    logger = _capture_logger(trt)
    plan, _ = _build(trt, _tiny_onnx())
    context = trt.Runtime(logger).deserialize_cuda_engine(plan).create_execution_context()
    stream = cuda.Stream()
    assert not context.all_binding_shapes_specified and context.infer_shapes() == ["input"]
    assert not context.execute_async_v3(stream.handle)  # input shape not set
    assert not context.set_input_shape("input", (5, 3, 8, 8))  # batch above the profile max
    assert not context.set_input_shape("input", (2, 3, 8))  # wrong rank
    assert context.set_input_shape("input", (2, 3, 8, 8))
    d_in = cuda.mem_alloc(2 * 3 * 8 * 8 * 4)
    assert context.set_tensor_address("input", int(d_in))
    assert not context.execute_async_v3(stream.handle)  # output address not set
    assert any("Address is not set for output tensor logits" in m for m in logger.errors())
    small = cuda.mem_alloc(4)
    assert context.set_tensor_address("logits", int(small))
    assert not context.execute_async_v3(stream.handle)  # output buffer too small
    with pytest.raises(TypeError):
        context.execute_async_v3(stream)  # a Stream object, not its handle


def test_parser_reports_errors(tmp_path: Path) -> None:
    trt = make_tensorrt("10.3.0")
    logger = _capture_logger(trt)
    network = trt.Builder(logger).create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert not parser.parse(b"definitely not onnx")
    assert parser.num_errors == 1
    error = parser.get_error(0)
    assert (
        error.code() == trt.ErrorCode.MODEL_DESERIALIZE_FAILED
        and error.desc()
        and error.node() == -1
    )
    parser.clear_errors()
    assert parser.num_errors == 0
    assert not parser.parse_from_file(str(tmp_path / "missing.onnx"))
    with pytest.raises(TypeError):
        parser.parse_from_file(tmp_path / "missing.onnx")  # the binding takes str, not a Path


def test_host_memory_is_a_buffer_without_len() -> None:
    trt = make_tensorrt("10.3.0")
    plan, _ = _build(trt, _tiny_onnx())
    raw = bytes(plan)
    assert plan.nbytes == len(raw) == memoryview(plan).nbytes
    assert np.frombuffer(plan, dtype=np.uint8).size == plan.nbytes
    assert plan.dtype == trt.DataType.UINT8
    assert plan  # truthy, although it has no len()
    with pytest.raises(TypeError):
        len(plan)
    assert _engine(trt, raw) is not None and _engine(trt, memoryview(plan)) is not None


# --------------------------------------------------------------------------------------------
# pycuda double and installation
# --------------------------------------------------------------------------------------------


def test_pycuda_double_copies_and_checks_pointers() -> None:
    _, cuda, autoinit = make_pycuda(compute_capability=(7, 2))
    assert cuda.Device(0).compute_capability() == (7, 2) and cuda.Device.count() == 1
    assert autoinit.context is cuda.Context.get_current()
    x = np.arange(12, dtype=np.float32)
    d = cuda.mem_alloc(x.nbytes)
    cuda.memcpy_htod(d, x)
    y = np.empty_like(x)
    cuda.memcpy_dtoh(y, d)
    assert np.array_equal(x, y)
    with pytest.raises(cuda.LogicError):
        cuda.memcpy_htod(d, np.zeros(13, np.float32))  # larger than the allocation
    with pytest.raises(cuda.LogicError):
        cuda.memcpy_htod(y.ctypes.data, x)  # a host address is not a device pointer
    d.free()
    with pytest.raises(cuda.LogicError):
        cuda.memcpy_dtoh(y, d)
    stream = cuda.Stream()
    assert isinstance(stream.handle, int) and stream.handle != 0
    pinned = cuda.pagelocked_empty((2, 3), np.float16)
    assert pinned.shape == (2, 3) and isinstance(pinned.base, cuda.PagelockedHostAllocation)


def test_install_fake_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    trt = install_fake_tensorrt(monkeypatch, version="11.0.0", compute_capability=(8, 9))
    import pycuda.autoinit  # noqa: F401
    import pycuda.driver as cuda
    import tensorrt

    assert tensorrt is trt and tensorrt.__version__ == "11.0.0"
    assert sys.modules["pycuda.driver"] is cuda
    assert cuda.Device(0).compute_capability() == (8, 9)


# --------------------------------------------------------------------------------------------
# Enum values, queued (asynchronous) work, devices, and the torch-CUDA double
# --------------------------------------------------------------------------------------------


def test_network_creation_flag_values_per_major() -> None:
    """NvInfer.h numbers: 10.x keeps the ignored EXPLICIT_BATCH at 0; 11.x removed it and
    renumbered (11.1: STRONGLY_TYPED=0, PREFER_JIT_PYTHON_PLUGINS=1, PREFER_AOT_PYTHON_PLUGINS=2)."""
    flags10 = make_tensorrt("10.3.0").NetworkDefinitionCreationFlag
    assert {f.name: int(f) for f in flags10} == {
        "EXPLICIT_BATCH": 0,
        "STRONGLY_TYPED": 1,
        "PREFER_JIT_PYTHON_PLUGINS": 2,
        "PREFER_AOT_PYTHON_PLUGINS": 3,
    }
    trt11 = make_tensorrt("11.1.0")
    flags11 = trt11.NetworkDefinitionCreationFlag
    assert {f.name: int(f) for f in flags11} == {
        "STRONGLY_TYPED": 0,
        "PREFER_JIT_PYTHON_PLUGINS": 1,
        "PREFER_AOT_PYTHON_PLUGINS": 2,
    }
    network = trt11.Builder(trt11.Logger()).create_network(1 << int(flags11.STRONGLY_TYPED))
    assert network.flags == 1 and network.get_flag(flags11.STRONGLY_TYPED)
    assert not network.get_flag(flags11.PREFER_JIT_PYTHON_PLUGINS)


def test_pycuda_async_copies_complete_only_at_synchronisation() -> None:
    _, cuda, _ = make_pycuda()
    stream = cuda.Stream()
    x = np.arange(8, dtype=np.float32)
    d = cuda.mem_alloc(x.nbytes)
    cuda.memcpy_htod_async(d, x, stream)
    x[:] = -1  # pageable memory was staged at the call: the copy still carries 0..7
    assert not stream.is_done()
    out = np.zeros(8, np.float32)
    cuda.memcpy_dtoh_async(out, d, stream)
    assert not out.any()  # still queued: the host array holds its old bytes
    stream.synchronize()
    assert stream.is_done() and np.array_equal(out, np.arange(8, dtype=np.float32))
    # page-locked memory is read when the copy runs, not when it is issued
    pinned = cuda.pagelocked_empty(8, np.float32)
    pinned[:] = 1
    cuda.memcpy_htod_async(d, pinned, stream)
    pinned[:] = 2
    cuda.memcpy_dtoh_async(out, d, stream)
    cuda.Context.synchronize()  # the whole context waits too
    assert (out == 2).all()
    # events mark a place in a stream; elapsed time needs both to have run
    start, end = cuda.Event(), cuda.Event()
    start.record(stream)
    cuda.memcpy_dtoh_async(out, d, stream)
    end.record(stream)
    assert not end.query()
    with pytest.raises(cuda.LogicError, match="not ready"):
        end.time_since(start)
    end.synchronize()
    assert end.query() and end.time_since(start) >= 0


def test_legacy_default_stream_orders_blocking_streams_but_not_non_blocking_ones() -> None:
    _, cuda, _ = make_pycuda()
    blocking, free = cuda.Stream(), cuda.Stream(flags=1)
    d1, d2 = cuda.mem_alloc(4), cuda.mem_alloc(4)
    one, two = np.ones(1, np.float32), np.full(1, 2, np.float32)
    cuda.memcpy_htod_async(d1, one, blocking)
    cuda.memcpy_htod_async(d2, two, free)
    got = np.zeros(1, np.float32)
    cuda.memcpy_dtoh(got, d1)  # synchronous, on the default stream: waits for `blocking`
    assert got[0] == 1 and blocking.is_done()
    cuda.memcpy_dtoh(got, d2)  # but not for a non-blocking stream
    assert got[0] == 0 and not free.is_done()
    free.synchronize()
    cuda.memcpy_dtoh(got, d2)
    assert got[0] == 2


def _context_and_buffers(trt: Any, cuda: Any, batch: int = 2) -> tuple[Any, Any, Any, Any]:
    plan, _ = _build(trt, _tiny_onnx())
    context = _engine(trt, plan).create_execution_context()
    assert context.set_input_shape("input", (batch, 3, 8, 8))
    d_in, d_out = cuda.mem_alloc(batch * 3 * 8 * 8 * 4), cuda.mem_alloc(batch * 10 * 4)
    assert context.set_tensor_address("input", int(d_in))
    assert context.set_tensor_address("logits", int(d_out))
    return context, d_in, d_out, plan


def test_execute_async_v3_runs_when_its_stream_is_synchronised() -> None:
    trt = make_tensorrt("10.3.0")
    _, cuda, _ = make_pycuda()
    context, d_in, d_out, _ = _context_and_buffers(trt, cuda)
    x = np.random.default_rng(5).standard_normal((2, 3, 8, 8)).astype(np.float32)
    stream = cuda.Stream()
    cuda.memcpy_htod_async(d_in, x, stream)
    assert context.execute_async_v3(stream.handle)
    out = np.zeros((2, 10), np.float32)
    cuda.memcpy_dtoh_async(out, d_out, stream)
    assert not out.any()
    stream.synchronize()
    assert np.allclose(out, _reference(_tiny_onnx(), x), atol=1e-5)
    # an input copied on another stream that nobody waited for: a race, raised at the sync
    other = cuda.Stream(flags=1)
    cuda.memcpy_htod_async(d_in, x * 2, other)
    assert context.execute_async_v3(stream.handle)
    with pytest.raises(cuda.LaunchError, match="still being written"):
        stream.synchronize()
    other.synchronize()


def test_engine_runs_on_the_device_it_was_deserialised_on() -> None:
    trt = make_tensorrt("10.3.0")
    _, cuda, _ = make_pycuda(device_count=2)
    assert cuda.Device.count() == 2
    logger = _capture_logger(trt)
    plan, _ = _build(trt, _tiny_onnx())
    context = trt.Runtime(logger).deserialize_cuda_engine(plan).create_execution_context()  # dev 0
    assert context.set_input_shape("input", (1, 3, 8, 8))
    primary = cuda.Device(1).retain_primary_context()
    assert cuda.Context.get_current() != primary  # retained, not made current
    primary.push()
    assert cuda.Context.get_device() == cuda.Device(1)
    d_in, d_out, stream1 = cuda.mem_alloc(3 * 8 * 8 * 4), cuda.mem_alloc(40), cuda.Stream()
    context.set_tensor_address("input", int(d_in))
    context.set_tensor_address("logits", int(d_out))
    assert not context.execute_async_v3(stream1.handle)  # device 1 current, engine on device 0
    cuda.Context.pop()
    with pytest.raises(cuda.LogicError, match="invalid resource handle"):
        cuda.memcpy_htod_async(d_in, np.zeros(192, np.float32), stream1)  # device 1's stream
    assert not context.execute_async_v3(cuda.Stream().handle)  # buffers of device 1
    assert any("memory of device 1" in m for m in logger.errors())
    with pytest.raises(cuda.LogicError, match="invalid device ordinal"):
        cuda.Device(2)


def test_torch_cuda_double() -> None:
    from fakes.device import Machine, device_of
    from fakes.torch_cuda import make_torch_cuda

    machine = Machine(device_count=2, compute_capability=(9, 0))
    torch = make_torch_cuda(machine)
    assert torch.cuda.is_available() and torch.cuda.device_count() == 2
    assert torch.cuda.get_device_capability(1) == (9, 0) and "1" in torch.cuda.get_device_name(1)
    assert torch.cuda.current_stream().cuda_stream == 0  # the legacy default stream
    with pytest.raises(RuntimeError, match="invalid device ordinal"):
        torch.cuda.set_device(2)
    dev1 = torch.device("cuda", 1)
    stream = torch.cuda.Stream(device=dev1)
    assert stream.cuda_stream != 0 and stream.device == dev1
    buf = torch.empty(32, dtype=torch.uint8, device=dev1)
    assert device_of(buf.data_ptr()) == 1 and buf[8:16].data_ptr() == buf.data_ptr() + 8
    x = np.arange(32, dtype=np.uint8)
    with torch.cuda.stream(stream):
        assert torch.cuda.current_stream(dev1) == stream
        assert torch.cuda.current_device() == 1  # like torch's StreamContext
        buf.copy_(torch.from_numpy(x), non_blocking=True)
        out = np.zeros(32, np.uint8)
        torch.from_numpy(out).copy_(buf, non_blocking=True)
    assert torch.cuda.current_device() == 0 and torch.cuda.current_stream(dev1).cuda_stream == 0
    assert not out.any() and not stream.query()  # queued on `stream`
    torch.cuda.current_stream(dev1).synchronize()
    assert not out.any()  # the default stream does not wait for a torch (non-blocking) stream
    stream.synchronize()
    assert np.array_equal(out, x)
    # a blocking copy (non_blocking=False) completes before it returns
    y = np.zeros(32, np.uint8)
    torch.from_numpy(y).copy_(buf)
    assert np.array_equal(y, x) and np.array_equal(buf.cpu().numpy(), x)
    with torch.cuda.device(1):
        assert torch.cuda.current_device() == 1
    assert torch.cuda.current_device() == 0


def test_torch_cuda_buffers_feed_the_fake_engine() -> None:
    from fakes.device import Machine
    from fakes.torch_cuda import make_torch_cuda

    trt = make_tensorrt("11.1.0")
    torch = make_torch_cuda(Machine())
    plan, _ = _build(trt, _tiny_onnx())
    context = _engine(trt, plan).create_execution_context()
    x = np.random.default_rng(6).standard_normal((3, 3, 8, 8)).astype(np.float32)
    assert context.set_input_shape("input", x.shape)
    d_in = torch.empty(x.nbytes, dtype=torch.uint8, device=torch.device("cuda", 0))
    d_out = torch.empty(3 * 10 * 4, dtype=torch.uint8, device="cuda")
    context.set_tensor_address("input", d_in.data_ptr())
    context.set_tensor_address("logits", d_out.data_ptr())
    stream = torch.cuda.Stream()
    out = np.zeros((3, 10), np.float32)
    with torch.cuda.stream(stream):
        d_in.copy_(torch.from_numpy(x.view(np.uint8).reshape(-1)), non_blocking=True)
        assert context.execute_async_v3(stream.cuda_stream)
        torch.from_numpy(out.view(np.uint8).reshape(-1)).copy_(d_out, non_blocking=True)
    assert not out.any()
    stream.synchronize()
    assert np.allclose(out, _reference(_tiny_onnx(), x), atol=1e-5)


def test_install_fake_tensorrt_with_devices_and_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    from advedge.export.tensorrt import cuda_backend

    install_fake_tensorrt(monkeypatch, version="10.3.0", device_count=3, torch_cuda=True)
    import pycuda.driver as cuda

    assert cuda.Device.count() == 3
    backend = cuda_backend(2)
    assert (backend.name, backend.index, backend.capability()) == ("torch", 2, (8, 7))

"""advedge.export.tensorrt and ``advedge export --trt`` against the TensorRT TEST DOUBLE.

TensorRT cannot be installed here (no GPU, no vendor index). Everything in this file runs against
``tests/fakes`` (a double of the documented TensorRT 10.x/11.x and pycuda APIs whose engines run
the embedded ONNX with ONNX Runtime). It shows that advedge calls the documented API the
documented way and handles its failures; it does not show that an engine builds or runs on a
real device (see the README's "What was verified where").
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from advedge.export.graph import read_sidecar
from advedge.export.onnx_export import export_onnx
from advedge.export.runtime import OrtRunner
from advedge.export.runtime.tensorrt import TrtRunner
from advedge.export.tensorrt import BatchProfile, build_engine, engine_filename
from conftest import argv
from fakes import install_fake_tensorrt
from fakes.artifacts import classifier_run, random_calibration_set, tiny_classifier

from advedge.cli import main
from advedge.errors import ExportError, UsageError

ENGINE_RE = re.compile(
    r"^(?P<name>.+)\.(?P<prec>[a-z0-9-]+)\.trt(?P<ver>[\d.]+)\.sm(?P<cc>\d+)\.b(?P<lo>\d+)-(?P<hi>\d+)\.engine$"
)


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("trt") / "tiny.fp32.onnx"
    return export_onnx(tiny_classifier(), path, input_shape=(3, 32, 32))


@pytest.mark.parametrize("version", ["10.3.0", "11.2.0"])
def test_strongly_typed_build_writes_named_engine_layers_and_sidecar(
    monkeypatch, tmp_path, onnx_file, version
):
    trt = install_fake_tensorrt(monkeypatch, version=version, compute_capability=(8, 7))
    profile = BatchProfile(1, 8, 32)
    cache = tmp_path / "timing.cache"
    build = build_engine(
        onnx_file,
        tmp_path,
        name="tiny",
        precision="fp32",
        profile=profile,
        workspace_mib=256,
        timing_cache=cache,
    )
    m = ENGINE_RE.match(build.engine.name)
    assert m and m["name"] == "tiny" and m["ver"] == version and m["cc"] == "87"
    assert (m["lo"], m["hi"]) == ("1", "32")
    assert build.engine.name == engine_filename("tiny", "fp32", version, (8, 7), profile)
    info = read_sidecar(build.sidecar)
    assert info["tensorrt_version"] == version and info["compute_capability"] == [8, 7]
    assert info["strongly_typed"] is True and info["workspace_mib"] == 256
    assert info["profile"]["min_batch"] == 1 and info["profile"]["max_batch"] == 32
    assert info["layer_precisions"] and "unknown" not in info["layer_precisions"]
    layers = json.loads(build.layers.read_text())
    assert layers["Layers"]
    io_key = "Bindings" if version.startswith("10") else "I/O Tensors"
    assert io_key in layers
    assert cache.is_file() and cache.stat().st_size > 0
    # the network really was created strongly typed
    assert trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED is not None


def test_timing_cache_is_read_back_and_a_corrupt_one_does_not_fail(
    monkeypatch, tmp_path, onnx_file
):
    install_fake_tensorrt(monkeypatch, version="10.3.0")
    cache = tmp_path / "timing.cache"

    def build(folder: str):
        return build_engine(
            onnx_file,
            tmp_path / folder,
            name="t",
            precision="fp32",
            profile=BatchProfile(),
            timing_cache=cache,
        )

    build("a")
    first = cache.read_bytes()
    build("b")
    assert cache.read_bytes()[:16] == first[:16]  # same cache format, reused
    cache.write_bytes(b"garbage, not a timing cache")
    b = build("c")
    assert b.engine.is_file() and cache.read_bytes() != b"garbage, not a timing cache"


@pytest.mark.parametrize("version", ["10.3.0", "11.2.0"])
def test_runner_matches_onnx_runtime_and_splits_big_batches(
    monkeypatch, tmp_path, onnx_file, version
):
    install_fake_tensorrt(monkeypatch, version=version)
    build = build_engine(
        onnx_file, tmp_path, name="tiny", precision="fp32", profile=BatchProfile(1, 4, 8)
    )
    runner = TrtRunner(build.engine)
    assert runner.backend.name == "pycuda"  # torch here has no CUDA
    x = np.random.default_rng(0).random((21, 3, 32, 32), dtype=np.float32)
    out = runner.run(x)
    ref = OrtRunner(onnx_file).run(x)
    assert out.shape == (21, 10) and np.allclose(out, ref, atol=1e-5)


def test_runner_info_of_an_engine(monkeypatch, tmp_path, onnx_file):
    install_fake_tensorrt(monkeypatch, version="11.2.0")
    build = build_engine(
        onnx_file, tmp_path, name="tiny", precision="fp16", profile=BatchProfile(2, 4, 8)
    )
    info = TrtRunner(build.engine).info
    assert (info.backend, info.precision, info.batch_range) == ("tensorrt", "fp16", (2, 8))
    assert info.batch_range_source == "the engine's profile" and info.kind == "classifier"
    assert not info.gradients and not info.host_compute  # activations live on the GPU
    assert info.size_bytes == build.engine.stat().st_size


def test_engine_from_another_tensorrt_or_gpu_is_refused_at_load(monkeypatch, tmp_path, onnx_file):
    install_fake_tensorrt(monkeypatch, version="10.3.0", compute_capability=(8, 7))
    build = build_engine(onnx_file, tmp_path, name="tiny", precision="fp32", profile=BatchProfile())
    install_fake_tensorrt(monkeypatch, version="10.4.0", compute_capability=(8, 7))
    with pytest.raises(ExportError, match=r"built by TensorRT 10\.3\.0; this device has 10\.4\.0"):
        TrtRunner(build.engine)
    install_fake_tensorrt(monkeypatch, version="10.3.0", compute_capability=(8, 9))
    with pytest.raises(ExportError, match="built for sm87; this GPU is sm89"):
        TrtRunner(build.engine)
    # a sidecar edited to lie: TensorRT itself refuses to deserialise, still one clear error
    side = build.sidecar
    info = json.loads(side.read_text())
    info["compute_capability"] = [8, 9]
    side.write_text(json.dumps(info))
    with pytest.raises(ExportError, match="cannot deserialise"):
        TrtRunner(build.engine)


def test_corrupt_engine_is_one_error(monkeypatch, tmp_path, onnx_file):
    install_fake_tensorrt(monkeypatch)
    build = build_engine(onnx_file, tmp_path, name="tiny", precision="fp32", profile=BatchProfile())
    build.engine.write_bytes(b"\x00" * 100)
    with pytest.raises(ExportError, match="cannot deserialise"):
        TrtRunner(build.engine)


def test_parser_rejection_is_one_error(monkeypatch, tmp_path):
    install_fake_tensorrt(monkeypatch)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(ExportError, match=r"parser rejected bad\.onnx"):
        build_engine(bad, tmp_path, name="bad", precision="fp32", profile=BatchProfile())
    assert not list(tmp_path.glob("*.engine"))


def test_legacy_calibrator_only_where_tensorrt_has_it(monkeypatch, tmp_path, onnx_file):
    from advedge.calibration import make_legacy_calibrator
    from advedge.export.tensorrt import cuda_backend

    trt = install_fake_tensorrt(monkeypatch, version="10.3.0")
    backend = cuda_backend()
    cache = tmp_path / "calib.cache"

    def calibrator_of(trt):
        return make_legacy_calibrator(
            trt,
            random_calibration_set(),
            method="entropy",
            cache_file=cache,
            batch_size=16,
            alloc=backend.alloc,
            copy_to_device=backend.to_device,
        )

    calibrator = calibrator_of(trt)
    build = build_engine(
        onnx_file,
        tmp_path,
        name="tiny",
        precision="int8-legacy",
        profile=BatchProfile(1, 16, 16),
        legacy_calibrator=calibrator,
        backend=backend,
    )
    info = read_sidecar(build.sidecar)
    assert info["strongly_typed"] is False and info["implicit_int8_calibrator"]
    assert cache.is_file() and cache.stat().st_size > 0  # TensorRT wrote its calibration cache
    assert info["layer_precisions"].get("Int8", 0) > 0
    trt11 = install_fake_tensorrt(monkeypatch, version="11.2.0")
    assert not hasattr(trt11, "IInt8EntropyCalibrator2")
    with pytest.raises(UsageError, match="no implicit INT8"):
        calibrator_of(trt11)
    with pytest.raises(UsageError, match="no implicit INT8"):
        build_engine(
            onnx_file,
            tmp_path,
            name="t",
            precision="int8-legacy",
            profile=BatchProfile(),
            legacy_calibrator=object(),
        )


# ------------------------------------------------------------------------------ CLI --trt
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return classifier_run(tmp_path_factory.mktemp("trt_run") / "run")


SMALL = {"calib_n": "64", "parity_n": "16", "report_n": "16", "json": True}


def _export_int8_trt(run_dir: Path, out: Path, data: Path, **options: object) -> int:
    """``advedge export --precision int8 --trt`` of ``run_dir``, calibrated on ``data``;
    ``options`` are further flags, as :func:`conftest.argv` writes them."""
    return main(
        argv(
            "export",
            model=str(run_dir),
            out=str(out),
            precision="int8",
            calib_data=str(data),
            trt=True,
            **options,
        )
    )


def _export_engine(
    capsys: pytest.CaptureFixture[str], run_dir: Path, tmp_path: Path, data: Path, **options: object
) -> dict:
    """:func:`_export_int8_trt` into ``tmp_path/out`` with the SMALL sizes and a cache dir in
    ``tmp_path``, which must succeed; returns the engine's entry of the JSON report."""
    rc = _export_int8_trt(
        run_dir, tmp_path / "out", data, cache_dir=str(tmp_path / "cc"), **SMALL, **options
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    engines = [a for a in json.loads(captured.out)["artifacts"] if a["path"].endswith(".engine")]
    assert len(engines) == 1
    return engines[0]


@pytest.mark.parametrize("version", ["10.3.0", "11.2.0"])
def test_cli_int8_trt_builds_from_the_qdq_onnx(
    monkeypatch, tmp_path, run_dir, tiny_npz_data, capsys, version
):
    install_fake_tensorrt(monkeypatch, version=version)
    out = tmp_path / "out"
    eng = _export_engine(
        capsys, run_dir, tmp_path, tiny_npz_data, min_batch="1", opt_batch="4", max_batch="16"
    )
    assert ENGINE_RE.match(Path(eng["path"]).name)["prec"] == "int8"
    assert eng["engine"]["source_onnx"] == "tiny_cnn.int8.onnx"
    assert eng["engine"]["layer_precisions"].get("Int8", 0) > 0
    assert (out / "timing.cache").is_file()
    stem = Path(eng["path"]).name[: -len(".engine")]
    assert (out / f"{stem}.layers.json").is_file() and (out / f"{stem}.json").is_file()
    # the engine runs and agrees with the QDQ ONNX it came from
    x = np.random.default_rng(0).random((5, 3, 32, 32), dtype=np.float32)
    got = TrtRunner(eng["path"]).run(x)
    ref = OrtRunner(out / "tiny_cnn.int8.onnx").run(x)  # the double runs ORT defaults
    assert np.allclose(got, ref, atol=1e-4)


def test_cli_legacy_calibrator_refused_on_tensorrt_11(
    monkeypatch, tmp_path, run_dir, tiny_npz_data, capsys
):
    install_fake_tensorrt(monkeypatch, version="11.2.0")
    out = tmp_path / "out"
    rc = _export_int8_trt(run_dir, out, tiny_npz_data, trt_calibrator="legacy-entropy")
    err = capsys.readouterr().err
    assert rc == 2 and "no implicit INT8 calibrator" in err
    assert not out.exists()


def test_cli_ortcpu_int8_cannot_become_an_engine(
    monkeypatch, tmp_path, run_dir, tiny_npz_data, capsys
):
    install_fake_tensorrt(monkeypatch, version="10.3.0")
    rc = _export_int8_trt(run_dir, tmp_path / "o", tiny_npz_data, int8_target="onnxruntime-cpu")
    assert rc == 2 and "cannot be built into a TensorRT engine" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_legacy_calibrator_on_tensorrt_10(
    monkeypatch, tmp_path, run_dir, tiny_npz_data, capsys
):
    install_fake_tensorrt(monkeypatch, version="10.3.0")
    out = tmp_path / "out"
    eng = _export_engine(
        capsys,
        run_dir,
        tmp_path,
        tiny_npz_data,
        calib_batch="16",
        trt_calibrator="legacy-minmax",
        max_batch="16",
        opt_batch="16",
    )
    assert ".int8-legacy.trt10.3.0." in eng["path"]
    assert (
        eng["engine"]["source_onnx"] == "tiny_cnn.fp32.onnx" and not eng["engine"]["strongly_typed"]
    )
    (cache,) = out.glob("tiny_cnn.*-*.minmax.calib.cache")  # keyed by model and set hashes
    assert cache.stat().st_size > 0
    assert eng["parity"]["passed"]  # the engine itself went through the parity gate


def test_inspector_type_strings_of_real_tensorrt_are_understood():
    from advedge.export.tensorrt.builder import layer_precisions

    layers = {
        "Layers": [
            {"Name": "a", "Outputs": [{"Format/Datatype": "Row major linear FP32"}]},
            {
                "Name": "b",
                "Outputs": [
                    {"Format/Datatype": "Channel major FP16 format where channel % 8 == 0"}
                ],
            },
            {"Name": "c", "Outputs": [{"Format/Datatype": "Row major linear Int8 format"}]},
            {"Name": "d", "Outputs": [{"DataType": "Half", "Format": "kLINEAR"}]},
            "e",
        ]
    }
    assert layer_precisions(json.dumps(layers)) == {"Float": 1, "Half": 2, "Int8": 1, "unknown": 1}


def test_cli_trt_writes_the_timing_cache_where_asked_and_legacy_calibrates_at_its_own_batch(
    monkeypatch, tmp_path, run_dir, tiny_npz_data, capsys
):
    install_fake_tensorrt(monkeypatch, version="10.3.0")
    cache = tmp_path / "elsewhere" / "my.cache"
    out = tmp_path / "out"
    options = {
        "calib_batch": "16",
        "trt_calibrator": "legacy-entropy",
        "opt_batch": "4",
        "max_batch": "32",
        "timing_cache": str(cache),
    }
    _export_engine(capsys, run_dir, tmp_path, tiny_npz_data, **options)
    assert (
        cache.is_file() and not (out / "my.cache").exists() and not (out / "timing.cache").exists()
    )
    (calib_cache,) = out.glob("*.entropy.calib.cache")
    marked = calib_cache.read_bytes() + b"\n"  # still a valid cache, but recognisable
    calib_cache.write_bytes(marked)
    # a rerun finds the calibration cache in --out: TensorRT reads it instead of calibrating
    # (a recalibration would write a fresh cache without the mark)
    _export_engine(capsys, run_dir, tmp_path, tiny_npz_data, **options)
    assert calib_cache.read_bytes() == marked


def test_layer_precisions_count_what_each_layer_computes_in():
    """An INT8 convolution feeding a float consumer outputs Float but computes in Int8; reformat,
    shuffle and constant layers compute nothing and are counted apart."""
    from advedge.export.tensorrt.builder import compute_precision, layer_precisions

    def io(text: str, v11: bool) -> dict:
        return {"DataType": text.split()[-2], "Format": text} if v11 else {"Format/Datatype": text}

    for v11 in (False, True):
        int8, fp32 = "Row major linear Int8 format", "Row major linear FP32 format"
        conv = {
            "Name": "/conv/Conv + /relu/Relu",
            "LayerType": "CaskConvolution",
            "Inputs": [io("Thirty-two wide channel vectorized row major Int8 format", v11)],
            "Outputs": [io(fp32, v11)],
            "ParameterType": "Convolution",
            "Weights": {"Type": "Int8", "Count": 432},
            "Bias": {"Type": "Float", "Count": 16},
        }
        gemm = {
            "Name": "/fc/Gemm",
            "LayerType": "CaskGemmMatrixMultiply",
            "Inputs": [io(int8, v11)],
            "Outputs": [io(fp32, v11)],
            "Weights": {"Type": "Int8", "Count": 160},
        }
        quantize = {
            "Name": "/q/QuantizeLinear",
            "LayerType": "Scale",
            "Inputs": [io(fp32, v11)],
            "Outputs": [io(int8, v11)],
        }
        reformat = {
            "Name": "Reformatting CopyNode for Input Tensor 0 to /conv/Conv + /relu/Relu",
            "LayerType": "Reformat",
            "Inputs": [io(int8, v11)],
            "Outputs": [io("Thirty-two wide channel vectorized row major Int8 format", v11)],
            "ParameterType": "Reformat",
        }
        shuffle = {
            "Name": "/flatten/Flatten",
            "LayerType": "NoOp",
            "Inputs": [io(int8, v11)],
            "Outputs": [io(int8, v11)],
        }
        const = {"Name": "fc.weight", "LayerType": "Constant", "Outputs": [io(int8, v11)]}
        doc = {
            "Layers": [quantize, reformat, conv, shuffle, gemm, const, "/pool/GlobalAveragePool"]
        }
        assert compute_precision(conv) == "Int8"
        assert layer_precisions(json.dumps(doc)) == {
            "Float": 1,
            "Int8": 2,
            "reformat": 3,
            "unknown": 1,
        }
    # a weighted layer whose inputs name no type: its weights'
    assert compute_precision({"Name": "c", "Weights": {"Type": "Half"}, "Outputs": []}) == "Half"
    assert layer_precisions(json.dumps({"Layers": ["Reformatting CopyNode for Output 0"]})) == {
        "reformat": 1
    }


@pytest.mark.parametrize("version", ["10.3.0", "11.2.0"])
def test_qdq_engine_counts_its_int8_layers_whose_outputs_are_float(monkeypatch, tmp_path, version):
    """Built by the double from a Q/DQ ONNX whose convolution output is not requantised (its
    ReLU takes floats): the convolution computes in Int8 and is counted so."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    scale = np.float32(np.abs(w).max() / 127)
    inits = [
        numpy_helper.from_array(np.round(w / scale).astype(np.int8), "W_q"),
        numpy_helper.from_array(np.array(scale, np.float32), "w_scale"),
        numpy_helper.from_array(np.array(0.05, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "zp"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["input", "x_scale", "zp"], ["xq"], name="q"),
        helper.make_node("DequantizeLinear", ["xq", "x_scale", "zp"], ["xdq"], name="dq"),
        helper.make_node("DequantizeLinear", ["W_q", "w_scale", "zp"], ["W"], name="wdq"),
        helper.make_node("Conv", ["xdq", "W"], ["c"], name="/conv/Conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["logits"], name="/relu/Relu"),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4, 8, 8])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "qdq.onnx"
    onnx.save(model, path)
    install_fake_tensorrt(monkeypatch, version=version)
    build = build_engine(path, tmp_path, name="q", precision="int8", profile=BatchProfile(1, 2, 4))
    assert build.info["layer_precisions"] == {"Int8": 1, "Float": 1}


def test_tensorrt_log_is_bounded_and_keeps_its_errors(monkeypatch):
    """A runner lives as long as a benchmark and TensorRT may warn on every call: the logger
    keeps the latest messages only, never lets warnings push its errors out, and puts each
    distinct warning on advedge's log once."""
    from advedge.export.tensorrt import engine
    from advedge.export.tensorrt.engine import LOG_KEEP, make_logger

    trt = install_fake_tensorrt(monkeypatch)
    logged: list[str] = []
    monkeypatch.setattr(engine.logger, "warning", lambda fmt, *a: logged.append(fmt % a))
    log = make_logger(trt)
    sev = trt.ILogger.Severity
    log.log(sev.ERROR, "the first error")
    for i in range(20 * LOG_KEEP):
        log.log(sev.WARNING, "Using default stream in enqueueV3() may lead to ...")
        log.log(sev.INFO, f"info {i}")
    log.log(sev.ERROR, "the last error")
    assert len(log.messages) <= LOG_KEEP
    assert log.messages[-1] == (sev.ERROR, "the last error")
    assert log.errors() == ["the first error", "the last error"]
    assert log.counts["WARNING"] == 20 * LOG_KEEP and log.counts["ERROR"] == 2
    assert logged == ["TensorRT: Using default stream in enqueueV3() may lead to ..."]
    for i in range(3 * LOG_KEEP):
        log.log(sev.ERROR, f"error {i}")
    assert len(log.errors()) == LOG_KEEP and log.errors()[-1] == f"error {3 * LOG_KEEP - 1}"

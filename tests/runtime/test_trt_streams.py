"""TensorRT I/O on streams and devices, against the TEST DOUBLES (tests/fakes), on both buffer
routes: pycuda, and torch CUDA tensors (the default wherever torch has CUDA; here through the
torch-CUDA double, since torch on this machine has none).

The doubles queue async copies and ``execute_async_v3`` on their stream and run them only when
someone synchronises, and they tie an engine to the device it was deserialised on, so these
tests fail on a runner that hands TensorRT the default stream, orders a copy on another stream,
reads its output before synchronising, or ignores the device index. They do not show what a real
GPU does (see the README's "What was verified where").
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from advedge.export.onnx_export import export_onnx
from advedge.export.runtime import OrtRunner
from advedge.export.runtime.tensorrt import TrtRunner, open_engine
from advedge.export.tensorrt import BatchProfile, build_engine, cuda_backend
from fakes import device as fake_device
from fakes import install_fake_tensorrt
from fakes.artifacts import random_calibration_set, tiny_classifier

from advedge.errors import ExportError, UsageError

ROUTES = ["pycuda", "torch"]


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("trt_streams") / "tiny.fp32.onnx"
    return export_onnx(tiny_classifier(), path, input_shape=(3, 32, 32))


def _install(monkeypatch, route: str, **kw):
    return install_fake_tensorrt(monkeypatch, torch_cuda=route == "torch", **kw)


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 3, 32, 32), dtype=np.float32)


def _spy_streams(monkeypatch, trt) -> list[int]:
    """Record every stream handle ``execute_async_v3`` is given."""
    handles: list[int] = []
    original = trt.IExecutionContext.execute_async_v3

    def spy(self, stream_handle):
        handles.append(int(stream_handle))
        return original(self, stream_handle)

    monkeypatch.setattr(trt.IExecutionContext, "execute_async_v3", spy)
    return handles


@pytest.mark.parametrize("route", ROUTES)
def test_tensorrt_gets_one_non_default_stream_of_the_runner(
    monkeypatch, tmp_path, onnx_file, route
):
    trt = _install(monkeypatch, route, version="10.3.0")
    build = build_engine(
        onnx_file, tmp_path, name="tiny", precision="fp32", profile=BatchProfile(1, 4, 8)
    )
    assert build.info["buffers"] == route
    handles = _spy_streams(monkeypatch, trt)
    runner = TrtRunner(build.engine)
    assert runner.backend.name == route
    x = _images(11)
    out = runner.run(x)  # 8 + 3: two engine calls
    runner.timed(x[:4])
    assert np.allclose(out, OrtRunner(onnx_file).run(x), atol=1e-5)
    assert len(handles) == 3 and set(handles) == {runner.backend.stream_handle}
    assert handles[0] != 0  # never the default stream
    warnings = [m for _, m in runner.logger.messages if "default stream" in m]
    assert not warnings, warnings


@pytest.mark.parametrize("route", ROUTES)
def test_output_is_read_only_after_the_stream_is_synchronised(
    monkeypatch, tmp_path, onnx_file, route
):
    """The double writes a host array of a device-to-host copy only when the stream is
    synchronised; the runner's results (which it reads after synchronising) are right."""
    _install(monkeypatch, route, version="11.2.0")
    build = build_engine(
        onnx_file, tmp_path, name="tiny", precision="fp32", profile=BatchProfile(1, 4, 8)
    )
    runner = TrtRunner(build.engine)
    backend = runner.backend
    x = _images(4, seed=1)
    with backend.activated():
        buf = backend.alloc(x.nbytes)
        backend.to_device(buf, x)  # waited for: usable from any stream
        out = np.zeros_like(x)
        backend.to_host(buf, out)
        assert not out.any()  # queued, not done
        backend.synchronize()
    assert np.array_equal(out, x)
    got = runner.run(x)
    assert np.allclose(got, OrtRunner(onnx_file).run(x), atol=1e-5)


@pytest.mark.parametrize("route", ROUTES)
def test_stage_timers_stop_after_the_work_they_time(monkeypatch, tmp_path, onnx_file, route):
    """The engine's work runs only when the stream is synchronised (in the double, as on a GPU
    it finishes only then): the compute stage must include it."""
    trt = _install(monkeypatch, route, version="10.3.0")
    build = build_engine(
        onnx_file, tmp_path, name="tiny", precision="fp32", profile=BatchProfile(1, 4, 8)
    )
    runner = TrtRunner(build.engine)
    original = trt.IExecutionContext._run

    def slow(self, *args):
        time.sleep(0.05)
        return original(self, *args)

    monkeypatch.setattr(trt.IExecutionContext, "_run", slow)
    _, stages = runner.timed(_images(4))
    assert stages["compute_s"] >= 0.045
    assert stages["h2d_s"] < stages["compute_s"] and stages["d2h_s"] < stages["compute_s"]


@pytest.mark.parametrize("route", ROUTES)
def test_a_failure_of_the_queued_engine_run_is_one_error(monkeypatch, tmp_path, onnx_file, route):
    """The engine runs asynchronously, so its failure surfaces at the synchronise (as CUDA's
    error: pycuda's LaunchError, torch's RuntimeError): the runner makes it one ExportError."""
    _install(monkeypatch, route, version="11.2.0")
    build = build_engine(
        onnx_file, tmp_path, name="tiny", precision="fp32", profile=BatchProfile(1, 4, 8)
    )
    runner = TrtRunner(build.engine)

    def broken(self, feeds):
        raise RuntimeError("kernel fault")

    monkeypatch.setattr(type(runner.engine._runner), "run", broken)
    with pytest.raises(ExportError, match=r"failed to run tiny.*kernel fault"):
        runner.run(_images(2))
    with pytest.raises(ExportError, match="kernel fault"):
        runner.timed(_images(2))
    assert any("kernel fault" in m for m in runner.logger.errors())


@pytest.mark.parametrize("route", ROUTES)
def test_runner_on_the_second_of_two_gpus(monkeypatch, tmp_path, onnx_file, route):
    _install(monkeypatch, route, version="10.3.0", device_count=2)
    build = build_engine(
        onnx_file, tmp_path, name="tiny", precision="fp32", profile=BatchProfile(1, 4, 8), device=1
    )
    runner = TrtRunner(build.engine, device=1)
    assert runner.backend.index == 1
    x = _images(5, seed=2)
    assert np.allclose(runner.run(x), OrtRunner(onnx_file).run(x), atol=1e-5)
    assert runner.engine._device == 1  # deserialised with device 1 current
    assert {fake_device.device_of(int(b)) for b in runner._buffers.values()} == {1}
    # torch's current device becomes the runner's (torch.cuda.set_device); pycuda's primary
    # context is pushed only around TensorRT calls
    assert fake_device.active().current_device() == (1 if route == "torch" else 0)
    # and the same engine through the bench's opener, by its device string
    opened = open_engine(build.engine, "tensorrt", device="cuda:1")
    assert opened.backend.index == 1
    assert np.allclose(opened.run(x), runner.run(x), atol=0)


@pytest.mark.parametrize("route", ROUTES)
def test_a_device_that_is_not_there_is_one_error(monkeypatch, tmp_path, onnx_file, route):
    _install(monkeypatch, route, version="10.3.0", device_count=2)
    build = build_engine(
        onnx_file, tmp_path, name="tiny", precision="fp32", profile=BatchProfile(1, 4, 8)
    )
    with pytest.raises(ExportError, match="device 2"):
        TrtRunner(build.engine, device=2)
    with pytest.raises(UsageError, match="bad CUDA device"):
        open_engine(build.engine, "tensorrt", device="gpu one")
    assert open_engine(build.engine, "tensorrt", device="auto").backend.index == 0


def test_pycuda_route_does_not_rely_on_autoinit(monkeypatch):
    """advedge retains the device's primary context; ``pycuda.autoinit``'s own context (always
    on device 0) is not what it runs in."""
    install_fake_tensorrt(monkeypatch, device_count=2)
    import pycuda.autoinit
    import pycuda.driver as cuda

    backend = cuda_backend(1)
    with backend.activated():
        current = cuda.Context.get_current()
        assert current == cuda.Device(1).retain_primary_context()
        assert current != pycuda.autoinit.context
    assert cuda.Context.get_current() == pycuda.autoinit.context  # popped again


@pytest.mark.parametrize("route", ROUTES)
def test_legacy_calibrator_feeds_batches_that_have_landed(monkeypatch, tmp_path, onnx_file, route):
    """The calibrator's copy must be complete when ``get_batch`` returns (TensorRT reads it on
    a stream of its own): the double fails the calibration on a copy still queued."""
    from advedge.calibration import make_legacy_calibrator
    from advedge.export.graph import read_sidecar

    trt = _install(monkeypatch, route, version="10.3.0")
    backend = cuda_backend()
    calibrator = make_legacy_calibrator(
        trt,
        random_calibration_set(),
        method="minmax",
        cache_file=tmp_path / "calib.cache",
        batch_size=16,
        alloc=backend.alloc,
        copy_to_device=backend.to_device,
    )
    build = build_engine(
        onnx_file,
        tmp_path,
        name="tiny",
        precision="int8-legacy",
        profile=BatchProfile(1, 16, 16),
        legacy_calibrator=calibrator,
        backend=backend,
    )
    assert read_sidecar(build.sidecar)["layer_precisions"].get("Int8", 0) > 0
    # the same with a copy that only queues: TensorRT would read a batch still in flight
    lazy = make_legacy_calibrator(
        trt,
        random_calibration_set(),
        method="minmax",
        cache_file=tmp_path / "other.cache",
        batch_size=16,
        alloc=backend.alloc,
        copy_to_device=backend.to_device_async,
    )
    with pytest.raises(ExportError, match="still writes it"):
        build_engine(
            onnx_file,
            tmp_path / "lazy",
            name="tiny",
            precision="int8-legacy",
            profile=BatchProfile(1, 16, 16),
            legacy_calibrator=lazy,
            backend=backend,
        )

"""advedge.workflow.doctor: every backend check against the real CPU backends (torch, ONNX
Runtime), the TensorRT TEST DOUBLE (tests/fakes: not TensorRT), runners made to misbehave, and
the version probes. Tiny model, a handful of images: each run takes seconds."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from advedge.export.runtime import OrtRunner, Runner, RunnerInfo, TorchRunner
from fakes import install_fake_tensorrt

from advedge.errors import UsageError
from advedge.workflow import backend_checks, toolchain
from advedge.workflow.backend_checks import BACKEND_CHECKS, BackendJob, GpuClock, check_timer
from advedge.workflow.doctor import STATUSES, DoctorOptions, run_doctor

CPU = ["torch", "onnxruntime"]
ABSENT_HERE = ["torch-cudagraph", "onnxruntime-cuda", "onnxruntime-trt", "tensorrt"]


def _lines(doc: dict, backend: str) -> dict[str, dict]:
    return {c["check"]: c for c in doc["checks"] if c["backend"] == backend}


def _doctor(tmp_path: Path, backends: list[str], **kw) -> dict:
    scratch = tmp_path / "scratch"
    scratch.mkdir(exist_ok=True)
    doc = run_doctor(DoctorOptions(device="cpu", backends=backends, tmp_dir=str(scratch), **kw))
    assert list(scratch.iterdir()) == []  # the temporary folder and everything in it is gone
    return doc


@pytest.fixture(scope="module")
def cpu_doc(tmp_path_factory) -> dict:
    """One run over the CPU backends and the ones this machine lacks."""
    return _doctor(tmp_path_factory.mktemp("doctor"), CPU + ABSENT_HERE)


def test_cpu_backends_run_for_real_and_pass_every_check(cpu_doc):
    assert cpu_doc["schema"] == "advedge.doctor/1" and cpu_doc["ok"] is True
    assert cpu_doc["device"] == "cpu"
    for backend in CPU:
        lines = _lines(cpu_doc, backend)
        assert list(lines) == ["load", *BACKEND_CHECKS], lines
        assert {c["status"] for c in lines.values()} == {"ok"}, lines
        parity = lines["parity"]["data"]
        assert parity["max_abs"] <= parity["tolerance"] == 1e-3
        assert parity["agreement"] == 1.0 and parity["n"] == 8
        timer = lines["timer"]["data"]
        assert timer["share"] >= 0.5 and 0 < timer["measured_s"] <= timer["wall_s"]
    # the real artifacts: advedge's checkpoint and advedge's FP32 ONNX export
    assert _lines(cpu_doc, "torch")["load"]["data"]["kind"] == "checkpoint"
    assert _lines(cpu_doc, "onnxruntime")["load"]["data"]["artifact"] == "doctor.fp32.onnx"
    # the torch runner splits its time; ONNX Runtime's only has the total
    assert _lines(cpu_doc, "torch")["timer"]["data"]["measured"] == "compute_s"
    assert _lines(cpu_doc, "onnxruntime")["timer"]["data"]["measured"] == "total_s"


def test_backends_absent_here_are_missing_with_a_hint_not_failed(cpu_doc):
    for backend in ABSENT_HERE:
        lines = _lines(cpu_doc, backend)
        assert list(lines) == ["load"], lines  # nothing more is tried
        assert lines["load"]["status"] == "missing" and lines["load"]["hint"], lines
    assert "CUDA" in _lines(cpu_doc, "torch-cudagraph")["load"]["detail"]
    assert "onnxruntime-gpu" in _lines(cpu_doc, "onnxruntime-cuda")["load"]["hint"]
    assert "TensorRT" in _lines(cpu_doc, "tensorrt")["load"]["hint"]
    summary = cpu_doc["summary"]
    assert summary["passed"] == CPU and summary["failed_backends"] == []
    assert summary["missing_backends"] == sorted(ABSENT_HERE)
    assert summary["ok"] == 2 * (1 + len(BACKEND_CHECKS)) and summary["failed"] == 0


def test_versions_name_the_toolchain(cpu_doc):
    import onnxruntime
    import torch

    v = cpu_doc["versions"]
    assert v["torch"] == torch.__version__ and v["onnxruntime"] == onnxruntime.__version__
    assert "CPUExecutionProvider" in v["onnxruntime_providers"]
    assert v["tensorrt"] is None and v["python"].count(".") == 2
    assert v["cuda"] == torch.version.cuda  # None on this CPU build


@pytest.mark.parametrize("version", ["10.3.0", "11.2.0"])
def test_tensorrt_against_the_double(monkeypatch, tmp_path, version):
    """The engine is built by advedge's builder, opened by open_runner and checked; the double
    runs the engine's ONNX with ONNX Runtime, and its pycuda events time the call."""
    install_fake_tensorrt(monkeypatch, version=version, compute_capability=(8, 7))
    doc = _doctor(tmp_path, ["tensorrt"])
    lines = _lines(doc, "tensorrt")
    assert {c["status"] for c in lines.values()} == {"ok"}, lines
    engine = lines["load"]["data"]["artifact"]
    assert re.fullmatch(rf"doctor\.fp32\.trt{re.escape(version)}\.sm87\.b1-32\.engine", engine)
    assert lines["parity"]["data"]["max_abs"] <= 1e-3
    timer = lines["timer"]["data"]
    assert timer["measured"] == "compute_s" and "event_s" in timer  # pycuda's events
    assert "CUDA events" in lines["timer"]["detail"]
    assert doc["versions"]["tensorrt"] == version and doc["versions"]["pycuda"]


def test_tensorrt_with_torch_cuda_buffers_against_the_doubles(monkeypatch, tmp_path):
    """The default route wherever torch has CUDA: the engine's buffers are torch CUDA tensors
    (tests/fakes/torch_cuda.py, the torch-CUDA double)."""
    import fakes
    from advedge.export.tensorrt import cuda as cuda_module

    install_fake_tensorrt(monkeypatch, version="10.3.0")
    fakes.install_fake_torch_cuda(monkeypatch)
    allocated: list[int] = []
    real_alloc = cuda_module.TorchCuda.alloc

    def alloc(self, nbytes):
        allocated.append(nbytes)
        return real_alloc(self, nbytes)

    monkeypatch.setattr(cuda_module.TorchCuda, "alloc", alloc)
    lines = _lines(_doctor(tmp_path, ["tensorrt"]), "tensorrt")
    assert {c["status"] for c in lines.values()} == {"ok"}, lines
    assert allocated  # the torch-CUDA buffers carried the engine's input and output


def test_wrong_logits_fail_parity_with_the_figure(monkeypatch, tmp_path):
    real = OrtRunner.__call__
    monkeypatch.setattr(OrtRunner, "__call__", lambda self, batch: real(self, batch) + 0.5)
    doc = _doctor(tmp_path, CPU)
    parity = _lines(doc, "onnxruntime")["parity"]
    assert parity["status"] == "failed"
    assert parity["detail"].startswith("max |Δ logits| 5.0e-01 > 1e-03"), parity
    assert doc["ok"] is False and doc["summary"]["failed_backends"] == ["onnxruntime"]
    assert doc["summary"]["passed"] == ["torch"]  # the other backend is unaffected


def test_a_timer_that_misses_the_compute_fails(monkeypatch, tmp_path):
    """A compute stage stopped before the work (what a missing synchronise looks like): the
    work lands in the next stage and the compute share is tiny."""
    real = TorchRunner.timed

    def early_stop(self, batch):
        out, t = real(self, batch)
        moved = t["compute_s"] * 0.99
        return out, {**t, "compute_s": t["compute_s"] - moved, "d2h_s": t["d2h_s"] + moved}

    monkeypatch.setattr(TorchRunner, "timed", early_stop)
    timer = _lines(_doctor(tmp_path, ["torch"]), "torch")["timer"]
    assert timer["status"] == "failed" and "the timer misses the work" in timer["detail"]
    assert timer["data"]["share"] < 0.5


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (lambda t: {**t, "h2d_s": -1e-5}, "h2d_s = -1e-05 s is not positive"),
        (lambda t: {**t, "compute_s": t["compute_s"] + 1.0}, "over total_s"),
        (lambda t: {**t, "total_s": t["total_s"] + 1.0}, "over the"),
    ],
    ids=["negative stage", "stages over total", "total over wall"],
)
def test_impossible_stage_times_fail_the_timer(monkeypatch, tmp_path, bad, message):
    real = TorchRunner.timed

    def timed(self, batch):
        out, times = real(self, batch)
        return out, bad(times)

    monkeypatch.setattr(TorchRunner, "timed", timed)
    timer = _lines(_doctor(tmp_path, ["torch"]), "torch")["timer"]
    assert timer["status"] == "failed" and message in timer["detail"], timer


class _GpuRunner(Runner):
    """A pretend GPU runner: fixed logits, and ``timed`` reporting the given stage times."""

    def __init__(self, compute_s: float) -> None:
        self.compute_s = compute_s

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return np.zeros((len(batch), 10), np.float32)

    def timed(self, batch):
        time.sleep(self.compute_s)
        s = self.compute_s
        return self(batch), {"h2d_s": 1e-6, "compute_s": s, "d2h_s": 1e-6, "total_s": s + 2e-6}

    def describe(self) -> RunnerInfo:
        return RunnerInfo(backend="fake-gpu", device="cuda:0", host_compute=False)


def _gpu_verdict(monkeypatch, *, compute_s: float, event_s: float, busy_s: float) -> dict:
    clock = GpuClock(lambda: None, lambda _: (event_s, busy_s))
    monkeypatch.setattr(backend_checks, "gpu_clock", lambda device, runner=None: clock)
    job = BackendJob(
        "fake-gpu",
        _GpuRunner(compute_s),
        np.zeros((2, 3, 32, 32), np.float32),
        np.zeros((2, 10), np.float32),
        "fp32",
        "cuda:0",
        repeats=3,
    )
    return vars(check_timer(job))


def test_gpu_timer_verdicts_from_cuda_events(monkeypatch):
    """The GPU rules, on a pretend runner and a pretend event clock (no GPU here)."""
    ok = _gpu_verdict(monkeypatch, compute_s=2e-3, event_s=3e-3, busy_s=1e-5)
    assert ok["ok"] and "the GPU was idle" in ok["detail"]
    early = _gpu_verdict(monkeypatch, compute_s=2e-3, event_s=0.1, busy_s=1e-5)
    assert not early["ok"] and "under 10% of the event time" in early["detail"]
    busy = _gpu_verdict(monkeypatch, compute_s=2e-3, event_s=3e-3, busy_s=0.05)
    assert not busy["ok"] and "still busy" in busy["detail"]


def test_without_cuda_events_a_gpu_runner_is_judged_on_the_host_clock(monkeypatch):
    monkeypatch.delitem(sys.modules, "pycuda.autoinit", raising=False)  # no pycuda context
    job = BackendJob(
        "fake-gpu",
        _GpuRunner(1e-3),
        np.zeros((2, 3, 32, 32), np.float32),
        np.zeros((2, 10), np.float32),
        "fp32",
        "cuda:0",
        repeats=2,
    )
    outcome = check_timer(job)
    assert outcome.ok and "host clock only" in outcome.detail


def test_an_export_that_fails_is_failed_for_its_backends_and_leaves_nothing(monkeypatch, tmp_path):
    from advedge.export import onnx_export

    from advedge.errors import ExportError

    def broken(*args, **kwargs):
        raise ExportError("torch's ONNX exporter failed: a test said so")

    monkeypatch.setattr(onnx_export, "export_onnx", broken)
    doc = _doctor(tmp_path, ["torch", "onnxruntime"])  # asserts the scratch folder is empty
    load = _lines(doc, "onnxruntime")["load"]
    assert load["status"] == "failed" and "a test said so" in load["detail"]
    assert _lines(doc, "torch")["timer"]["status"] == "ok" and doc["ok"] is False


def test_an_exception_in_a_check_is_one_failed_line(monkeypatch, tmp_path):
    def boom(self, x, batch_size=None):
        raise RuntimeError("first line\nsecond line")

    monkeypatch.setattr(OrtRunner, "run", boom)
    parity = _lines(_doctor(tmp_path, ["onnxruntime"]), "onnxruntime")["parity"]
    assert parity["status"] == "failed"
    assert parity["detail"] == "unexpected RuntimeError: first line"


def test_bad_options_are_refused():
    with pytest.raises(UsageError, match="did you mean 'tensorrt'"):
        run_doctor(DoctorOptions(backends=["tensorrtt"]))
    with pytest.raises(UsageError, match="CUDA is not available"):
        run_doctor(DoctorOptions(device="cuda", backends=["torch"]))


def test_every_status_is_one_of_three(cpu_doc):
    assert {c["status"] for c in cpu_doc["checks"]} <= set(STATUSES)
    assert all("\n" not in c["detail"] for c in cpu_doc["checks"])


# ------------------------------------------------------------------------------ versions


def test_a_probe_that_raises_gives_none_not_a_crash(monkeypatch):
    probes = toolchain.VERSION_PROBES.copy()

    def broken() -> dict:
        raise OSError("unreadable")

    probes.register("broken", toolchain.Probe(broken, ("broken_field",)))
    monkeypatch.setattr(toolchain, "VERSION_PROBES", probes)
    versions = toolchain.toolchain_versions()
    assert versions["broken_field"] is None and versions["python"]


def test_commands_are_bounded_and_missing_ones_are_none():
    assert toolchain.read_command(["advedge-no-such-command"]) is None
    start = time.perf_counter()
    assert toolchain.read_command(["sleep", "5"], timeout=0.3) is None
    assert time.perf_counter() - start < 3
    assert toolchain.read_command(["echo", "hello"]) == "hello"


def test_jetson_fields_are_read_where_the_files_are(monkeypatch):
    files = {"/etc/nv_tegra_release": "# R36 (release), REVISION: 3.0, GCID: 1\nmore"}
    monkeypatch.setattr(toolchain, "_read_file", lambda path: files.get(str(path)))
    monkeypatch.setattr(
        toolchain, "read_command", lambda cmd, timeout=5.0: "NV Power Mode: MAXN\n0"
    )
    found = toolchain.VERSION_PROBES["jetson"].read()
    assert found["jetson_release"] == "R36 (release), REVISION: 3.0, GCID: 1"
    assert found["jetson_power_mode"] == "NV Power Mode: MAXN"
    files.clear()
    assert toolchain.VERSION_PROBES["jetson"].read()["jetson_release"] is None


def test_gpus_from_nvidia_smi_when_torch_sees_none(monkeypatch):
    answers = {
        "index,name,driver_version,compute_cap": None,  # an older driver: asked again
        "index,name,driver_version": "0, NVIDIA H200, 570.86.15",
    }

    def smi(cmd, timeout=5.0):
        return answers[cmd[1].split("=", 1)[1]]

    monkeypatch.setattr(toolchain, "read_command", smi)
    found = toolchain.VERSION_PROBES["nvidia"].read()
    assert found["nvidia_driver"] == "570.86.15"
    assert found["gpus"] == [{"index": 0, "name": "NVIDIA H200", "compute_capability": None}]


def test_without_torch_every_backend_is_missing_not_a_crash(monkeypatch, tmp_path):
    """The reference model needs PyTorch: on a device without it, doctor says so per backend."""
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    doc = _doctor(tmp_path, ["torch", "onnxruntime"])
    assert doc["ok"] is True and doc["versions"]["torch"] is None
    for line in doc["checks"]:
        assert (line["check"], line["status"]) == ("load", "missing"), line
        assert "PyTorch" in line["detail"] and "pip install torch" in line["hint"]


def test_the_gpu_clock_records_on_the_stream_the_runner_works_on(monkeypatch):
    """A TensorRT runner queues its work on a stream of its own; events on any other stream
    (the default one) would bracket none of it, and without pycuda.autoinit there is no current
    context outside the runner's own activation."""
    from types import SimpleNamespace

    install_fake_tensorrt(monkeypatch)
    monkeypatch.delitem(sys.modules, "pycuda.autoinit", raising=False)
    import pycuda.driver as drv
    from advedge.export.tensorrt.cuda import PyCuda

    backend = PyCuda(0)
    seen = []
    real = drv.Event.record

    def record(self, stream=None):
        seen.append(stream)
        return real(self, stream)

    monkeypatch.setattr(drv.Event, "record", record)
    clock = backend_checks.gpu_clock("cuda:0", SimpleNamespace(backend=backend))
    assert clock is not None
    clock.start()
    event_s, busy_s = clock.stop()
    assert seen == [backend.stream, backend.stream]
    assert event_s >= 0 and busy_s >= 0

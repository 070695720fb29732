"""Strongly typed TensorRT engines from advedge's ONNX artifacts, and a runner for them.

The ONNX file already carries its precision (FP32, FP16 with FP32 I/O, or INT8 as symmetric
Q/DQ pairs), so the network is parsed as STRONGLY_TYPED: TensorRT takes every layer's type from
the file instead of choosing kernels by builder flags. That is the only mode TensorRT 11 has
(it removed ``BuilderFlag.FP16``/``INT8`` and implicit calibration) and it works the same on
TensorRT 10, which Jetson Orin keeps (JetPack 6 ships 10.3).

Build (:func:`build_engine`):

1. parse the ONNX into a strongly typed network (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``
   where the enum still has it; TensorRT versions without the flag type every network strongly);
2. one optimisation profile over the batch axis (min/opt/max), a workspace limit, a timing
   cache read from and written back to a file, detailed profiling verbosity;
3. ``build_serialized_network``; the engine is written as
   ``<name>.<precision>.trt<version>.sm<cc>.b<min>-<max>.engine`` because an engine runs only on
   the TensorRT version and GPU architecture that built it, and beside it go
   ``<engine stem>.layers.json`` (the engine inspector's layer information) and
   ``<engine stem>.json`` (versions, GPU, profile, source ONNX hash, layer precision counts).

The legacy implicit INT8 path (TensorRT 10 only: a weakly typed network, ``BuilderFlag.INT8``
and an ``IInt8EntropyCalibrator2``/``IInt8MinMaxCalibrator`` with a calibration cache file) is
offered only where the installed TensorRT still has the calibrator classes, detected by feature
(``hasattr(trt, "IInt8EntropyCalibrator2")``), never by version number.

I/O buffers are torch CUDA tensors (``data_ptr()``, the current stream) when torch with CUDA is
importable, else pycuda allocations (extra ``[trt]``). TensorRT, torch and pycuda are imported
lazily; without TensorRT every entry point raises MissingDependencyError (exit 3).

Engines must be built on the device that will run them.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from advedge.export._deps import require
from advedge.export.graph import read_sidecar, write_sidecar

import advedge
from advedge.errors import ExportError, UsageError
from advedge.utils import atomic_write_bytes, atomic_write_text, sha256_file

__all__ = [
    "BatchProfile",
    "EngineBuild",
    "TrtRunner",
    "build_engine",
    "check_engine_compatible",
    "cuda_backend",
    "engine_filename",
    "has_legacy_calibrator",
    "load_tensorrt",
]

ENGINE_SCHEMA = "advedge.training.engine/1"

logger = logging.getLogger(__name__)


def load_tensorrt() -> Any:
    """Import TensorRT or raise MissingDependencyError (exit 3) with an install hint."""
    return require("tensorrt", purpose="building or running a TensorRT engine (--trt)")


def has_legacy_calibrator(trt: Any) -> bool:
    """Whether this TensorRT still has implicit INT8 calibration (feature test, not version)."""
    return hasattr(trt, "IInt8EntropyCalibrator2")


@dataclass(frozen=True)
class BatchProfile:
    """The optimisation profile over the batch axis."""

    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 64

    def __post_init__(self) -> None:
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise UsageError(
                f"batch profile must satisfy 1 <= min <= opt <= max, got "
                f"{self.min_batch}/{self.opt_batch}/{self.max_batch}"
            )

    def shapes(self, chw: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        return tuple((b, *chw) for b in (self.min_batch, self.opt_batch, self.max_batch))


def engine_filename(
    name: str, precision: str, trt_version: str, cc: tuple[int, int], profile: BatchProfile
) -> str:
    """``<name>.<precision>.trt<version>.sm<cc>.b<min>-<max>.engine``, e.g.
    ``resnet8.int8.trt10.3.0.sm87.b1-64.engine``."""
    return (
        f"{name}.{precision}.trt{trt_version}.sm{cc[0]}{cc[1]}."
        f"b{profile.min_batch}-{profile.max_batch}.engine"
    )


# --------------------------------------------------------------------------------------------
# CUDA buffers: torch CUDA tensors when available, else pycuda
# --------------------------------------------------------------------------------------------


class _Buffer:
    """A device buffer; ``int(buf)`` is its device pointer."""

    def __init__(self, ptr: int, owner: Any, nbytes: int) -> None:
        self.ptr = int(ptr)
        self.owner = owner  # keeps the allocation alive
        self.nbytes = nbytes

    def __int__(self) -> int:
        return self.ptr


class _TorchCuda:
    name = "torch"

    def __init__(self, torch: Any, device: int) -> None:
        self.torch = torch
        self.device = torch.device("cuda", device)

    @property
    def stream(self) -> Any:
        """The current CUDA stream, fetched at each use (a caller may have switched it)."""
        return self.torch.cuda.current_stream(self.device)

    @property
    def stream_handle(self) -> int:
        return int(self.stream.cuda_stream)

    def capability(self) -> tuple[int, int]:
        return tuple(self.torch.cuda.get_device_capability(self.device))  # type: ignore[return-value]

    def gpu_name(self) -> str:
        return str(self.torch.cuda.get_device_name(self.device))

    def alloc(self, nbytes: int) -> _Buffer:
        t = self.torch.empty(max(1, nbytes), dtype=self.torch.uint8, device=self.device)
        return _Buffer(t.data_ptr(), t, nbytes)

    def to_device(self, buf: _Buffer, array: np.ndarray) -> None:
        src = self.torch.from_numpy(np.ascontiguousarray(array).view(np.uint8).reshape(-1))
        buf.owner[: src.numel()].copy_(src, non_blocking=False)

    def to_host(self, buf: _Buffer, out: np.ndarray) -> None:
        out.view(np.uint8).reshape(-1)[:] = buf.owner[: out.nbytes].cpu().numpy()

    def synchronize(self) -> None:
        self.stream.synchronize()


class _PyCuda:
    name = "pycuda"

    def __init__(self, device: int) -> None:
        self.cuda = require("pycuda.driver", purpose="TensorRT I/O buffers without torch")
        try:
            require("pycuda.autoinit", purpose="TensorRT I/O buffers without torch")
            self.dev = self.cuda.Device(device)
            self.stream = self.cuda.Stream()
        except ImportError:
            raise
        except Exception as exc:  # pycuda's driver errors when there is no usable GPU
            raise ExportError(f"no usable CUDA device {device}: {exc}") from None

    @property
    def stream_handle(self) -> int:
        return int(self.stream.handle)

    def capability(self) -> tuple[int, int]:
        major, minor = self.dev.compute_capability()
        return int(major), int(minor)

    def gpu_name(self) -> str:
        return str(self.dev.name())

    def alloc(self, nbytes: int) -> _Buffer:
        mem = self.cuda.mem_alloc(max(1, nbytes))
        return _Buffer(int(mem), mem, nbytes)

    def to_device(self, buf: _Buffer, array: np.ndarray) -> None:
        # The source is pageable host memory and the consumer may be TensorRT on its own stream
        # (the calibrator): wait for the copy to land before handing out the pointer.
        self.cuda.memcpy_htod_async(buf.owner, np.ascontiguousarray(array), self.stream)
        self.stream.synchronize()

    def to_host(self, buf: _Buffer, out: np.ndarray) -> None:
        self.cuda.memcpy_dtoh_async(out, buf.owner, self.stream)

    def synchronize(self) -> None:
        self.stream.synchronize()


def cuda_backend(device: int = 0, prefer: str = "auto") -> Any:
    """The buffer backend: torch CUDA tensors if torch sees a GPU (``prefer="auto"|"torch"``),
    else pycuda.

    Raises:
        MissingDependencyError: neither torch with CUDA nor pycuda is importable.
    """
    if prefer in ("auto", "torch"):
        try:
            import torch
        except ImportError:
            torch = None
        if torch is not None and torch.cuda.is_available():
            return _TorchCuda(torch, device)
        if prefer == "torch":
            raise ExportError("torch cannot see a CUDA device", "install pycuda or a CUDA torch")
    return _PyCuda(device)


# --------------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------------


def _make_logger(trt: Any) -> Any:
    """A TensorRT logger that keeps warnings and errors, so failures can name their cause."""

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.messages: list[tuple[Any, str]] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in (
                trt.ILogger.Severity.INTERNAL_ERROR,
                trt.ILogger.Severity.ERROR,
                trt.ILogger.Severity.WARNING,
            ):
                self.messages.append((severity, str(msg)))
                if severity == trt.ILogger.Severity.WARNING:
                    logger.warning("TensorRT: %s", msg)

        def errors(self) -> list[str]:
            bad = (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR)
            return [m for s, m in self.messages if s in bad]

    return _Logger()


@dataclass
class EngineBuild:
    """What :func:`build_engine` wrote and measured."""

    engine: Path
    layers: Path
    sidecar: Path
    timing_cache: Path | None
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)


_TYPE_WORDS = (
    "Int8",
    "Half",
    "Float",
    "BFloat16",
    "FP8",
    "Int4",
    "FP4",
    "Int32",
    "Int64",
    "Bool",
    "UInt8",
)


_TYPE_ALIASES = {"FP32": "Float", "FP16": "Half", "BF16": "BFloat16", "INT8": "Int8"}


def _type_word(text: Any) -> str | None:
    """The data type named in an inspector string: ``"Int8"``, ``"Row major linear FP32"``,
    ``"Channel major FP16 format where channel % 8 == 0"``; normalised to TensorRT's DataType
    names (Float, Half, Int8, ...)."""
    if not isinstance(text, str):
        return None
    for word in text.replace("/", " ").replace(",", " ").split():
        word = _TYPE_ALIASES.get(word, word)
        if word in _TYPE_WORDS:
            return word
    return None


def _layer_precisions(inspector_json: str) -> dict[str, int]:
    """Count layers per output data type from the engine inspector's JSON.

    The inspector has no per-layer "precision" field: the type is read from the layer's first
    output, ``"Format/Datatype"`` in TensorRT 10 (e.g. ``"Row major linear Int8 format"``) and
    ``"DataType"`` in TensorRT 11. Layers listed by name only count as ``"unknown"``.
    """
    try:
        data = json.loads(inspector_json)
    except json.JSONDecodeError:
        return {}
    counts: Counter[str] = Counter()
    for layer in data.get("Layers", []) if isinstance(data, dict) else []:
        precision = None
        if isinstance(layer, dict):
            outputs = layer.get("Outputs") or []
            first = outputs[0] if outputs and isinstance(outputs[0], dict) else {}
            precision = _type_word(first.get("DataType")) or _type_word(
                first.get("Format/Datatype")
            )
        counts[precision or "unknown"] += 1
    return dict(counts)


def build_engine(
    onnx_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    name: str,
    precision: str,
    profile: BatchProfile,
    workspace_mib: int = 1024,
    timing_cache: str | os.PathLike[str] | None = None,
    legacy_calibrator: Any = None,
    device: int = 0,
    backend: Any = None,
) -> EngineBuild:
    """Build a serialised engine from an ONNX artifact; see the module docstring.

    Args:
        onnx_path: The ONNX file (FP32, FP16 or QDQ INT8).
        out_dir: Where the engine, its layer JSON and its sidecar go.
        name: Artifact name (first part of the file name).
        precision: Label for the file name (``fp32``, ``fp16``, ``int8``, ``int8-legacy``).
        profile: Batch min/opt/max.
        workspace_mib: Workspace memory-pool limit.
        timing_cache: File to read the timing cache from (if present) and write it back to.
        legacy_calibrator: An implicit INT8 calibrator (TensorRT 10 only). The network is then
            weakly typed with ``BuilderFlag.INT8``; ``onnx_path`` should be the FP32 ONNX.
        device: CUDA device index.
        backend: CUDA buffer backend (default :func:`cuda_backend`).

    Raises:
        MissingDependencyError: TensorRT (or a CUDA backend) is not installed.
        UsageError: a legacy calibrator on a TensorRT without implicit calibration.
        ExportError: the parser or the builder failed (with TensorRT's own error lines).
    """
    trt = load_tensorrt()
    onnx_path = Path(onnx_path)
    out_dir = Path(out_dir)
    if workspace_mib < 1:
        raise UsageError(f"workspace must be at least 1 MiB, got {workspace_mib}")
    if legacy_calibrator is not None and not has_legacy_calibrator(trt):
        raise UsageError(
            f"TensorRT {trt.__version__} has no implicit INT8 calibration (removed in 11)",
            "use --precision int8, which builds from the explicit Q/DQ ONNX",
        )
    backend = backend or cuda_backend(device)
    cc = backend.capability()
    start = time.perf_counter()
    trt_logger = _make_logger(trt)
    builder = trt.Builder(trt_logger)
    strongly_typed = legacy_calibrator is None
    flags = 0
    typed_flag = getattr(
        getattr(trt, "NetworkDefinitionCreationFlag", None), "STRONGLY_TYPED", None
    )
    if strongly_typed and typed_flag is not None:
        flags |= 1 << int(typed_flag)
    network = builder.create_network(flags)
    if typed_flag is not None and hasattr(network, "get_flag"):
        strongly_typed = bool(network.get_flag(typed_flag)) or not has_legacy_calibrator(trt)
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i).desc()) for i in range(parser.num_errors)]
        raise ExportError(
            f"TensorRT's ONNX parser rejected {onnx_path.name}: "
            + ("; ".join(errors[:3]) or "no error message")
        )
    if network.num_inputs != 1:
        raise ExportError(
            f"{onnx_path.name} has {network.num_inputs} inputs; expected one image input"
        )
    inp = network.get_input(0)
    chw = tuple(int(d) for d in tuple(inp.shape)[1:])
    if any(d < 1 for d in chw):
        raise ExportError(
            f"{onnx_path.name}: only the batch axis may be dynamic, got {tuple(inp.shape)}"
        )

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mib) << 20)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    cache_path = Path(timing_cache) if timing_cache is not None else None
    cache_bytes = (
        cache_path.read_bytes() if cache_path is not None and cache_path.is_file() else b""
    )
    cache = config.create_timing_cache(cache_bytes)
    if cache is None or not config.set_timing_cache(cache, False):
        # a cache from another TensorRT/GPU: start afresh rather than fail the build
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)
    opt_profile = builder.create_optimization_profile()
    opt_profile.set_shape(inp.name, *profile.shapes(chw))
    config.add_optimization_profile(opt_profile)
    if legacy_calibrator is not None:
        config.set_flag(trt.BuilderFlag.INT8)
        config.int8_calibrator = legacy_calibrator
        # Calibration runs at the calibration profile's shape: make it the calibrator's batch,
        # whatever the runtime profile's opt batch is.
        calib_batch = int(legacy_calibrator.get_batch_size())
        calib_profile = builder.create_optimization_profile()
        calib_profile.set_shape(inp.name, *((calib_batch, *chw),) * 3)
        config.set_calibration_profile(calib_profile)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        errors = trt_logger.errors()
        raise ExportError(
            f"TensorRT could not build an engine from {onnx_path.name}: "
            + ("; ".join(errors[:3]) or "no error message")
        )
    engine_bytes = bytes(memoryview(serialized))
    seconds = time.perf_counter() - start

    version = str(trt.__version__)
    engine_path = out_dir / engine_filename(name, precision, version, cc, profile)
    stem = engine_path.name[: -len(".engine")]
    layers_path = out_dir / f"{stem}.layers.json"
    sidecar = out_dir / f"{stem}.json"

    runtime = trt.Runtime(trt_logger)
    engine = runtime.deserialize_cuda_engine(engine_bytes)
    if engine is None:
        raise ExportError(
            f"TensorRT built an engine it cannot deserialise: {trt_logger.errors()[:1]}"
        )
    inspector = engine.create_engine_inspector()
    layer_info = str(inspector.get_engine_information(trt.LayerInformationFormat.JSON))

    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(engine_path, engine_bytes)
    atomic_write_text(layers_path, layer_info)
    written_cache = None
    if cache_path is not None:
        atomic_write_bytes(cache_path, bytes(memoryview(config.get_timing_cache().serialize())))
        written_cache = cache_path
    info = {
        "schema": ENGINE_SCHEMA,
        "engine": engine_path.name,
        "name": name,
        "precision": precision,
        "tensorrt_version": version,
        "compute_capability": list(cc),
        "gpu": backend.gpu_name(),
        "buffers": backend.name,
        "strongly_typed": strongly_typed,
        "implicit_int8_calibrator": type(legacy_calibrator).__name__ if legacy_calibrator else None,
        "profile": {"input": inp.name, **asdict(profile), "chw": list(chw)},
        "workspace_mib": int(workspace_mib),
        "timing_cache": written_cache.name if written_cache else None,
        "source_onnx": onnx_path.name,
        "source_onnx_sha256": sha256_file(onnx_path),
        "engine_sha256": sha256_file(engine_path),
        "engine_bytes": len(engine_bytes),
        "layer_precisions": _layer_precisions(layer_info),
        "build_seconds": round(seconds, 3),
        "advedge_version": advedge.__version__,
    }
    write_sidecar(sidecar, info)
    return EngineBuild(engine_path, layers_path, sidecar, written_cache, seconds, info)


# --------------------------------------------------------------------------------------------
# Load and run
# --------------------------------------------------------------------------------------------


def engine_sidecar(engine_path: str | os.PathLike[str]) -> Path:
    """``x.engine`` -> ``x.json``."""
    p = Path(engine_path)
    return (
        p.with_name(p.name[: -len(".engine")] + ".json")
        if p.name.endswith(".engine")
        else p.with_suffix(".json")
    )


def check_engine_compatible(
    info: dict[str, Any], trt_version: str, cc: tuple[int, int], source: str
) -> None:
    """Refuse an engine built by another TensorRT version or for another GPU architecture.

    Raises:
        ExportError: naming what differs and telling to rebuild on this device.
    """
    built_version = str(info.get("tensorrt_version"))
    built_cc = tuple(info.get("compute_capability") or ())
    if built_version != str(trt_version):
        raise ExportError(
            f"{source} was built by TensorRT {built_version}; this device has {trt_version}",
            "engines are not portable: rebuild it here with advedge export --trt",
        )
    if built_cc != tuple(cc):
        raise ExportError(
            f"{source} was built for sm{''.join(map(str, built_cc))}; this GPU is sm{cc[0]}{cc[1]}",
            "engines are not portable: rebuild it here with advedge export --trt",
        )


class TrtRunner:
    """Run a serialised engine on numpy batches (float32 NCHW in [0, 1]).

    The engine's sidecar is checked first (TensorRT version and GPU), then the engine is
    deserialised; a batch above the profile's maximum is split.
    """

    def __init__(
        self, engine_path: str | os.PathLike[str], *, device: int = 0, backend: Any = None
    ) -> None:
        trt = load_tensorrt()
        self.trt = trt
        self.path = Path(engine_path)
        if not self.path.is_file():
            raise ExportError(f"engine not found: {self.path}")
        self.backend = backend or cuda_backend(device)
        cc = self.backend.capability()
        self.info = read_sidecar(engine_sidecar(self.path))
        check_engine_compatible(self.info, str(trt.__version__), cc, self.path.name)
        self.logger = _make_logger(trt)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise ExportError(
                f"TensorRT {trt.__version__} cannot deserialise {self.path.name}: "
                + ("; ".join(self.logger.errors()[:2]) or "corrupt or foreign engine"),
                "rebuild it on this device with advedge export --trt",
            )
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) != mode]
        if len(self.inputs) != 1 or len(self.outputs) != 1:
            raise ExportError(f"{self.path.name}: expected one input and one output, got {names}")
        lo, _, hi = self.engine.get_tensor_profile_shape(self.inputs[0], 0)
        self.min_batch, self.max_batch = int(lo[0]), int(hi[0])
        self.out_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.outputs[0])))
        self.in_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.inputs[0])))
        self._buffers: dict[str, Any] = {}

    def _buffer(self, name: str, nbytes: int) -> Any:
        buf = self._buffers.get(name)
        if buf is None or buf.nbytes < nbytes:
            buf = self.backend.alloc(nbytes)
            self._buffers[name] = buf
        return buf

    def _run_one(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=self.in_dtype)
        name_in, name_out = self.inputs[0], self.outputs[0]
        if not self.context.set_input_shape(name_in, tuple(x.shape)):
            raise ExportError(f"input shape {tuple(x.shape)} is outside the engine's profile")
        out_shape = tuple(int(d) for d in self.context.get_tensor_shape(name_out))
        out = np.empty(out_shape, dtype=self.out_dtype)
        buf_in = self._buffer(name_in, x.nbytes)
        buf_out = self._buffer(name_out, out.nbytes)
        self.backend.to_device(buf_in, x)
        self.context.set_tensor_address(name_in, int(buf_in))
        self.context.set_tensor_address(name_out, int(buf_out))
        if not self.context.execute_async_v3(self.backend.stream_handle):
            raise ExportError(
                f"TensorRT failed to run {self.path.name}: {self.logger.errors()[-1:]}"
            )
        self.backend.to_host(buf_out, out)
        self.backend.synchronize()
        return out.astype(np.float32, copy=False)

    def timed(self, x: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
        """Run one batch (within the profile) with each stage timed on its own: host-to-device
        copy, the engine, device-to-host copy (the stream is synchronised between stages)."""
        x = np.ascontiguousarray(x, dtype=self.in_dtype)
        name_in, name_out = self.inputs[0], self.outputs[0]
        if not self.min_batch <= len(x) <= self.max_batch:
            raise ExportError(
                f"batch {len(x)} is outside the engine's profile {self.min_batch}-{self.max_batch}"
            )
        if not self.context.set_input_shape(name_in, tuple(x.shape)):
            raise ExportError(f"input shape {tuple(x.shape)} is outside the engine's profile")
        out = np.empty(
            tuple(int(d) for d in self.context.get_tensor_shape(name_out)), self.out_dtype
        )
        buf_in, buf_out = self._buffer(name_in, x.nbytes), self._buffer(name_out, out.nbytes)
        self.context.set_tensor_address(name_in, int(buf_in))
        self.context.set_tensor_address(name_out, int(buf_out))
        t0 = time.perf_counter()
        self.backend.to_device(buf_in, x)
        self.backend.synchronize()
        t1 = time.perf_counter()
        if not self.context.execute_async_v3(self.backend.stream_handle):
            raise ExportError(
                f"TensorRT failed to run {self.path.name}: {self.logger.errors()[-1:]}"
            )
        self.backend.synchronize()
        t2 = time.perf_counter()
        self.backend.to_host(buf_out, out)
        self.backend.synchronize()
        t3 = time.perf_counter()
        times = {"h2d_s": t1 - t0, "compute_s": t2 - t1, "d2h_s": t3 - t2, "total_s": t3 - t0}
        return out.astype(np.float32, copy=False), times

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if len(x) < self.min_batch:
            raise ExportError(f"batch {len(x)} is below the engine's minimum {self.min_batch}")
        parts = [self._run_one(x[i : i + self.max_batch]) for i in range(0, len(x), self.max_batch)]
        return np.concatenate(parts, axis=0)

    def run(self, x: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        """Run ``x`` in batches (at most the profile's maximum)."""
        step = min(batch_size or self.max_batch, self.max_batch)
        parts = []
        for i in range(0, len(x), step):
            chunk = x[i : i + step]
            if len(chunk) < self.min_batch:  # pad the tail up to the profile's minimum
                pad = np.repeat(chunk[-1:], self.min_batch - len(chunk), axis=0)
                parts.append(self(np.concatenate([chunk, pad]))[: len(chunk)])
            else:
                parts.append(self(chunk))
        return np.concatenate(parts, axis=0)

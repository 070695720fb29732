"""Build a strongly typed TensorRT engine from one of advedge's ONNX artifacts.

The ONNX file already carries its precision (FP32, FP16 with FP32 I/O, or INT8 as symmetric
Q/DQ pairs), so the network is parsed as STRONGLY_TYPED: TensorRT takes every layer's type from
the file instead of choosing kernels by builder flags. That is the only mode TensorRT 11 has
(it removed ``BuilderFlag.FP16``/``INT8`` and implicit calibration) and it works the same on
TensorRT 10, which Jetson Orin keeps (JetPack 6 ships 10.3).

:func:`build_engine`:

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
(:func:`advedge.calibration.legacy.has_legacy_calibrator`), never by version number.

Engines must be built on the device that will run them.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from advedge.calibration.legacy import has_legacy_calibrator
from advedge.export.graph import write_sidecar
from advedge.export.tensorrt.cuda import cuda_backend
from advedge.export.tensorrt.engine import (
    ENGINE_SCHEMA,
    BatchProfile,
    engine_filename,
    load_tensorrt,
    make_logger,
)

import advedge
from advedge.errors import ExportError, UsageError
from advedge.utils import atomic_write_bytes, atomic_write_text, sha256_file

__all__ = ["EngineBuild", "build_engine", "compute_precision", "layer_precisions"]


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


#: Layers that only move or re-lay data (TensorRT inserts reformats between tactics' formats;
#: a Shuffle or NoOp reshapes; a Constant holds weights): counted as ``"reformat"``.
_DATA_MOVEMENT = ("reformat", "shuffle", "noop", "constant")


def _moves_data_only(layer: Any) -> bool:
    """Whether an inspector layer (a dict, or a bare name) only moves or re-lays data."""
    if isinstance(layer, str):
        name = layer.lower()
        return name.startswith("reformatting copynode") or "<reformat>" in name
    kinds = {str(layer.get(k, "")).lower() for k in ("LayerType", "ParameterType")}
    name = str(layer.get("Name", "")).lower()
    return bool(kinds & set(_DATA_MOVEMENT)) or name.startswith("reformatting copynode")


def _tensor_type(tensor: Any) -> str | None:
    """The data type of an inspector I/O entry: ``"DataType"`` (TensorRT 11) or
    ``"Format/Datatype"`` (TensorRT 10, e.g. ``"Row major linear Int8 format"``)."""
    if not isinstance(tensor, dict):
        return None
    return _type_word(tensor.get("DataType")) or _type_word(tensor.get("Format/Datatype"))


def compute_precision(layer: Any) -> str:
    """What an inspector layer computes in: its first input's data type (an INT8 convolution
    takes Int8 inputs and Int8 weights, whatever type its output is), else its weights' type,
    else its first output's; ``"reformat"`` for a layer that only moves data; ``"unknown"``
    for a layer listed by name only."""
    if _moves_data_only(layer):
        return "reformat"
    if not isinstance(layer, dict):
        return "unknown"
    inputs, outputs = layer.get("Inputs") or [], layer.get("Outputs") or []
    weights = layer.get("Weights") if isinstance(layer.get("Weights"), dict) else {}
    return (
        (_tensor_type(inputs[0]) if inputs else None)
        or _type_word(weights.get("Type"))
        or (_tensor_type(outputs[0]) if outputs else None)
        or "unknown"
    )


def layer_precisions(inspector_json: str) -> dict[str, int]:
    """Count the engine's layers by the data type they compute in (:func:`compute_precision`)
    from the engine inspector's JSON: ``{"Int8": 12, "Float": 2, "reformat": 3}``.

    The inspector has no per-layer "precision" field. A layer's output type is no measure (an
    INT8 convolution whose consumer needs floats outputs Float), so the count takes the type of
    what goes in. Layers that only move data (reformats, shuffles, constants) are counted apart
    as ``"reformat"``; layers listed by name only count as ``"unknown"``.
    """
    try:
        data = json.loads(inspector_json)
    except json.JSONDecodeError:
        return {}
    layers = data.get("Layers", []) if isinstance(data, dict) else []
    return dict(Counter(compute_precision(layer) for layer in layers))


def _parse_network(
    trt: Any, builder: Any, trt_logger: Any, onnx_path: Path, typed: bool
) -> tuple[Any, Any, bool]:
    """The parsed network, its parser (which owns the weights: keep it alive until the build)
    and whether the network is strongly typed."""
    flags = 0
    typed_flag = getattr(
        getattr(trt, "NetworkDefinitionCreationFlag", None), "STRONGLY_TYPED", None
    )
    if typed and typed_flag is not None:
        flags |= 1 << int(typed_flag)
    network = builder.create_network(flags)
    strongly_typed = typed
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
    return network, parser, strongly_typed


def _image_input(network: Any, onnx_path: Path) -> tuple[Any, tuple[int, ...]]:
    """The network's input and its per-image shape (only the batch axis may be dynamic)."""
    inp = network.get_input(0)
    chw = tuple(int(d) for d in tuple(inp.shape)[1:])
    if any(d < 1 for d in chw):
        raise ExportError(
            f"{onnx_path.name}: only the batch axis may be dynamic, got {tuple(inp.shape)}"
        )
    return inp, chw


def _configure(
    trt: Any,
    builder: Any,
    *,
    workspace_mib: int,
    cache_path: Path | None,
    profile: BatchProfile,
    inp: Any,
    chw: tuple[int, ...],
    legacy_calibrator: Any,
) -> Any:
    """The builder config: workspace, timing cache, the batch profile and, on the legacy path,
    the implicit INT8 calibrator with a calibration profile at its batch size."""
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mib) << 20)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
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
    return config


@dataclass
class _Network:
    """What a build produced: the serialised engine, the config (its timing cache), the input's
    name and per-image shape, whether it is strongly typed, and the logger that saw it."""

    engine_bytes: bytes
    config: Any
    input_name: str
    chw: tuple[int, ...]
    strongly_typed: bool
    logger: Any


def _build(
    trt: Any,
    onnx_path: Path,
    *,
    profile: BatchProfile,
    workspace_mib: int,
    cache_path: Path | None,
    legacy_calibrator: Any,
) -> _Network:
    """Parse, configure and build (steps 1 and 2 of the module docstring)."""
    trt_logger = make_logger(trt)
    builder = trt.Builder(trt_logger)
    network, _parser, strongly_typed = _parse_network(
        trt, builder, trt_logger, onnx_path, typed=legacy_calibrator is None
    )
    inp, chw = _image_input(network, onnx_path)
    config = _configure(
        trt,
        builder,
        workspace_mib=workspace_mib,
        cache_path=cache_path,
        profile=profile,
        inp=inp,
        chw=chw,
        legacy_calibrator=legacy_calibrator,
    )
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        errors = trt_logger.errors()
        raise ExportError(
            f"TensorRT could not build an engine from {onnx_path.name}: "
            + ("; ".join(errors[:3]) or "no error message")
        )
    engine_bytes = bytes(memoryview(serialized))
    return _Network(engine_bytes, config, inp.name, chw, strongly_typed, trt_logger)


def _inspect(trt: Any, trt_logger: Any, engine_bytes: bytes) -> str:
    """The engine inspector's layer information (JSON) of a freshly built engine."""
    runtime = trt.Runtime(trt_logger)
    engine = runtime.deserialize_cuda_engine(engine_bytes)
    if engine is None:
        raise ExportError(
            f"TensorRT built an engine it cannot deserialise: {trt_logger.errors()[:1]}"
        )
    inspector = engine.create_engine_inspector()
    return str(inspector.get_engine_information(trt.LayerInformationFormat.JSON))


def _write_files(
    built: _Network,
    engine_path: Path,
    layers_path: Path,
    layer_info: str,
    cache_path: Path | None,
) -> Path | None:
    """The engine, its layer JSON and the timing cache (when one is kept): the cache written."""
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(engine_path, built.engine_bytes)
    atomic_write_text(layers_path, layer_info)
    if cache_path is None:
        return None
    atomic_write_bytes(cache_path, bytes(memoryview(built.config.get_timing_cache().serialize())))
    return cache_path


def _check_options(trt: Any, workspace_mib: int, legacy_calibrator: Any) -> None:
    if workspace_mib < 1:
        raise UsageError(f"workspace must be at least 1 MiB, got {workspace_mib}")
    if legacy_calibrator is not None and not has_legacy_calibrator(trt):
        raise UsageError(
            f"TensorRT {trt.__version__} has no implicit INT8 calibration (removed in 11)",
            "use --precision int8, which builds from the explicit Q/DQ ONNX",
        )


def _build_facts(built: _Network, backend: Any, legacy_calibrator: Any) -> dict[str, Any]:
    """The sidecar's GPU, buffer library and typing entries."""
    return {
        "gpu": backend.gpu_name(),
        "buffers": backend.name,
        "strongly_typed": built.strongly_typed,
        "implicit_int8_calibrator": type(legacy_calibrator).__name__ if legacy_calibrator else None,
    }


def _file_facts(onnx_path: Path, engine_path: Path, built: _Network) -> dict[str, Any]:
    """The sidecar's source ONNX and engine file entries."""
    return {
        "source_onnx": onnx_path.name,
        "source_onnx_sha256": sha256_file(onnx_path),
        "engine_sha256": sha256_file(engine_path),
        "engine_bytes": len(built.engine_bytes),
    }


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
    device: int | str = 0,
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
        device: CUDA device: an index or ``"cuda:N"`` (used when no ``backend`` is given).
        backend: CUDA buffer backend (default :func:`~advedge.export.tensorrt.cuda.cuda_backend`
            on ``device``); the build runs with its device current.

    Raises:
        MissingDependencyError: TensorRT (or a CUDA backend) is not installed.
        UsageError: a legacy calibrator on a TensorRT without implicit calibration.
        ExportError: the parser or the builder failed (with TensorRT's own error lines).
    """
    trt = load_tensorrt()
    onnx_path = Path(onnx_path)
    _check_options(trt, workspace_mib, legacy_calibrator)
    backend = backend or cuda_backend(device)
    cc = backend.capability()
    start = time.perf_counter()
    cache_path = Path(timing_cache) if timing_cache is not None else None
    with backend.activated():  # TensorRT builds for, and calibrates on, the current device
        built = _build(
            trt,
            onnx_path,
            profile=profile,
            workspace_mib=workspace_mib,
            cache_path=cache_path,
            legacy_calibrator=legacy_calibrator,
        )
        seconds = time.perf_counter() - start
        layer_info = _inspect(trt, built.logger, built.engine_bytes)

    version = str(trt.__version__)
    engine_path = Path(out_dir) / engine_filename(name, precision, version, cc, profile)
    stem = engine_path.name[: -len(".engine")]
    layers_path, sidecar = (engine_path.with_name(f"{stem}{e}") for e in (".layers.json", ".json"))
    written_cache = _write_files(built, engine_path, layers_path, layer_info, cache_path)
    info = {
        "schema": ENGINE_SCHEMA,
        "engine": engine_path.name,
        "name": name,
        "precision": precision,
        "tensorrt_version": version,
        "compute_capability": list(cc),
        **_build_facts(built, backend, legacy_calibrator),
        "profile": {"input": built.input_name, **asdict(profile), "chw": list(built.chw)},
        "workspace_mib": int(workspace_mib),
        "timing_cache": written_cache.name if written_cache else None,
        **_file_facts(onnx_path, engine_path, built),
        "layer_precisions": layer_precisions(layer_info),
        "build_seconds": round(seconds, 3),
        "advedge_version": advedge.__version__,
    }
    write_sidecar(sidecar, info)
    return EngineBuild(engine_path, layers_path, sidecar, written_cache, seconds, info)

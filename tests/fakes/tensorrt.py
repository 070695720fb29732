"""Test double of the TensorRT 10.x / 11.x Python API (``import tensorrt``). NOT TensorRT.

``make_tensorrt(version)`` returns a fresh module object named ``tensorrt``. The major version
(10 or 11) decides which API exists. Nothing here touches a GPU: an "engine" is bytes this module
defines (a magic tag, a JSON header with the TensorRT version, compute capability, I/O tensors,
optimisation profiles and layer information, then the ONNX model), and ``execute_async_v3`` /
``execute_v2`` read the inputs from fake device memory (``tests/fakes/device.py``, shared by the
pycuda and torch-CUDA doubles, so pointers and stream handles of either library work), run the
embedded ONNX with ONNX Runtime on the CPU, and write the outputs back, so runners built on the
double produce real numbers. Reduced-precision numerics are NOT simulated: an engine computes at
the ONNX graph's own precision even when its layer information says Half or Int8.

Execution is asynchronous as on a GPU: ``execute_async_v3(stream)`` checks what TensorRT checks
at enqueue time and returns, and the run itself is queued on that stream (the legacy default
stream for handle 0, with TensorRT's warning about it); it reads its inputs and writes its
outputs only when the stream is synchronised, after the work queued before it on that stream. An
input still being written by work queued on another stream that nobody waited for is a race: the
run fails, logged and raised (``DeviceFault``, pycuda's ``LaunchError``, torch's RuntimeError)
from the call that synchronises. ``execute_v2`` runs on the legacy default stream and waits. An
engine belongs to the device that was current when it was deserialised; enqueueing it with
another device current, on another device's stream or with another device's memory fails
(``False``, error logged; real TensorRT's behaviour there is an invalid handle or an illegal
memory access). ``NetworkDefinitionCreationFlag`` has NvInfer.h's values: 10.x EXPLICIT_BATCH=0,
STRONGLY_TYPED=1, PREFER_JIT_PYTHON_PLUGINS=2, PREFER_AOT_PYTHON_PLUGINS=3; 11.x (11.1)
STRONGLY_TYPED=0, PREFER_JIT_PYTHON_PLUGINS=1, PREFER_AOT_PYTHON_PLUGINS=2.

Documented behaviour modelled, and where it comes from
----------------------------------------------------------------
TensorRT Python API reference (docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/
and the 11.0.0 / 11.4.0 copies of it): names and signatures of ``Logger``/``ILogger`` (severity
levels also exposed on the classes), ``Builder`` (``create_network(flags=0)``,
``create_builder_config()``, ``create_optimization_profile()``,
``build_serialized_network(network, config)`` -> ``IHostMemory`` or None),
``NetworkDefinitionCreationFlag`` (10.x: ``EXPLICIT_BATCH`` deprecated/ignored,
``STRONGLY_TYPED``; 11.0: ``EXPLICIT_BATCH`` gone, ``STRONGLY_TYPED`` "deprecated in TensorRT 11.0;
strongly typed mode is always enabled; retained for API compatibility but ignored"),
``INetworkDefinition`` (``num_inputs``/``num_outputs``/``num_layers``, ``get_input``/``get_output``/
``get_layer``, ``flags``, ``get_flag``), ``ITensor`` (``name``, ``shape``, ``dtype``),
``IBuilderConfig`` (``set/get_memory_pool_limit``, ``profiling_verbosity`` defaulting to
``LAYER_NAMES_ONLY``, ``set/clear/get_flag`` and ``flags`` with TF32 on by default,
``add_optimization_profile`` -> index or -1, ``create_timing_cache``/``set_timing_cache``/
``get_timing_cache``, ``hardware_compatibility_level``), ``ITimingCache`` (``serialize``,
``combine(input_cache, ignore_mismatch)``, ``reset``), ``IOptimizationProfile`` (``set_shape``
raising RuntimeError "Shape provided for min/opt/max is inconsistent with other shapes." exactly as
the binding does, ``get_shape`` -> ``[]`` or ``[min, opt, max]``), ``OnnxParser``
(``parse(model: buffer, path=None)``, ``parse_from_file(model: str)``, ``num_errors``,
``get_error(i)`` -> ``ParserError`` with ``code()``/``desc()``/``node()``/``node_name()``/
``node_operator()``, ``clear_errors()``), ``IHostMemory`` (buffer protocol only, plus ``nbytes`` and
``dtype``: the reference lists ``__buffer__``/``__release_buffer__`` and no ``__len__``, so
``len(mem)`` raises TypeError here too; use ``mem.nbytes`` or ``bytes(mem)``), ``Runtime``
(``deserialize_cuda_engine(serialized_engine: buffer)`` -> ``ICudaEngine`` or None,
``engine_host_code_allowed``), ``ICudaEngine`` (``num_io_tensors``, ``get_tensor_name``,
``get_tensor_mode`` -> ``TensorIOMode``, ``get_tensor_shape``, ``get_tensor_dtype``,
``get_tensor_profile_shape(name, profile_index)`` -> ``[min, opt, max]``,
``num_optimization_profiles``, ``num_layers``, ``create_execution_context()``,
``create_engine_inspector()``, ``serialize()``, ``device_memory_size_v2``), ``IExecutionContext``
(``set_input_shape`` -> bool, ``get_tensor_shape``, ``set_tensor_address(name, memory: int)`` ->
bool, ``execute_async_v3(stream_handle: int)`` -> bool, ``execute_v2(bindings)``,
``all_binding_shapes_specified``, ``all_shape_inputs_specified``, ``infer_shapes()`` -> names of
insufficiently specified inputs), ``EngineInspector`` (the Python class is ``EngineInspector``;
``get_engine_information(format)``/``get_layer_information(i, format)``; detail governed by the
build's ``ProfilingVerbosity``: DETAILED = names and parameters, LAYER_NAMES_ONLY = names only,
NONE = nothing), ``LayerInformationFormat``, ``ProfilingVerbosity``, ``TensorIOMode``,
``DataType``, ``nptype``, ``volume``, and (10.x) ``IInt8Calibrator``/``IInt8EntropyCalibrator``/
``IInt8EntropyCalibrator2``/``IInt8MinMaxCalibrator``/``CalibrationAlgoType`` ("deprecated in
TensorRT 10.1, superseded by explicit quantization"; subclasses must call the base ``__init__``;
``get_batch(names)`` returns device pointers, or None/``[]`` when there is no data left).

Calibrator protocol (NVIDIA/TensorRT ``python/src/infer/pyInt8.cpp`` and the IInt8Calibrator C++
reference): ``read_calibration_cache()`` first (None or an empty buffer = no cache); with a valid
cache the builder does not call ``get_batch``; otherwise ``get_batch_size()`` and then
``get_batch(names)`` until it returns None or an empty list, reading each input from its device
pointer (the calibration profile's OPT shape, or profile 0 with the warning "Calibration Profile is
not defined. Calibrating with Profile 0"), then ``write_calibration_cache(cache)`` with a read-only
``memoryview``. The cache is text: ``TRT-<NV_TENSORRT_VERSION>-<Algorithm>`` then ``name: <hex
float32 scale>`` lines (scales here are amax/127 over the batches, not an entropy search). A network
with Q/DQ nodes is explicitly quantized: the calibrator is not used (warning).

"Migrating from TensorRT 10.x to 11.x" and "Removed Python APIs and Replacements"
(docs.nvidia.com/deeplearning/tensorrt/latest/api/migration/tensorrt-10x-to-11x*.html), "Python
Migration Patterns for TensorRT 11.x" (...-python-api-patterns.html): 11.x removes weak typing.
Absent in 11 here: ``BuilderFlag.FP16/INT8/FP8/BF16/INT4/FP4/OBEY_PRECISION_CONSTRAINTS/
PREFER_PRECISION_CONSTRAINTS/DIRECT_IO``, ``IBuilderConfig.int8_calibrator``,
``set/get_calibration_profile``, ``set/get/clear_quantization_flag``, ``quantization_flags``,
``QuantizationFlag``, ``IInt8*Calibrator``, ``CalibrationAlgoType``,
``ICudaEngine.device_memory_size`` and ``get_device_memory_size_for_profile`` (replaced by the
``_v2`` forms),
``Builder.platform_has_fast_fp16/platform_has_fast_int8/platform_has_tf32`` (the 11.0 Builder
page lists none of them), ``IBuilderConfig.algorithm_selector`` (IAlgorithmSelector removed),
``has_implicit_batch_dimension``, ``NetworkDefinitionCreationFlag.EXPLICIT_BATCH``. Every 11.x
network is strongly typed. A missing enum member raises AttributeError, as pybind11 does.

"IEngineInspector JSON Output" migration page (.../tensorrt-10x-to-11x-IEngineInspector.html):
10.x JSON has ``"Bindings"``: a list of I/O tensor names; 11.x replaces it with ``"I/O Tensors"``:
objects with ``Name``, ``IOMode``, ``DataType``, ``Dimensions``, ``Location``,
``IsShapeInferenceIO`` and ``ProfileInfo`` (``MinShape``/``OptShape``/``MaxShape``/``Format``).
The 11.0 overview also says the layer ``Format/Datatype`` field is split: here 10.x layer I/O carry
``"Format/Datatype"`` (the bare type, e.g. ``"Int8"``, without an execution context; ``"Row major
linear Int8 format"`` with one, as real engines print) and 11.x layer I/O carry ``"DataType"`` plus
``"Format"`` (with an execution context). Exact 11.x layer strings are not given by the docs.

Strong typing (Builder page, STRONGLY_TYPED: "every tensor has a data type defined in the network
following only type inference rules and the inputs/operator annotations"): layer precisions come
from the ONNX: a layer fed by DequantizeLinear is Int8, fp16 tensors (fp16 initializers, Cast to
FLOAT16) give Half, otherwise Float. Engine layers are one per ONNX node, named after the node
(``(Unnamed Layer* i) [Op]`` when it has no name) with ``Metadata`` ``[ONNX Layer: name]``;
Q/DQ nodes fold into the layers they wrap, Constant/Identity and constant-only subgraphs fold away.
In the 10.x weakly typed path the FP16 flag makes internal float layers Half and INT8 with a
completed calibration makes Conv/ConvTranspose/Gemm/MatMul Int8; Q/DQ are explicit type
constraints and give Int8 with or without the INT8 flag. Setting FP16/INT8/BF16/FP8/INT4/FP4 or the
precision-constraint flags on a STRONGLY_TYPED 10.x network makes the build fail (error logged,
None returned); the reference only says precision settings are "not allowed" for strongly typed
networks, so the exact message is this double's.

Failure modes (C++ reference: builder returns nullptr and reports through the logger;
deserialize_cuda_engine returns None, NVIDIA/TensorRT#3834; the plan is tied to one GPU,
"The engine plan file is generated on an incompatible device, expecting compute X got compute Y,
please rebuild." NVIDIA/TensorRT#2176; "Version tag does not match" for another TensorRT version,
and Engine Compatibility page: "By default, TensorRT engines are compatible only with the version
of TensorRT used to build them"; a corrupt timing cache logs "Magic tag does not match" and "The
timing cache will not be used!", NVIDIA/TensorRT#3566; Builder performance page: "Setting the
buffer size to 0 creates a new empty timing cache"): build returns None and logs an ERROR for a
dynamic input without a profile ("Network has dynamic or shape inputs, but no optimization
profile has been defined."), a profile that misses a dynamic input, names a non-input, has the
wrong rank or contradicts a static dimension, a network without outputs, or a failed calibration;
``deserialize_cuda_engine`` returns None for non-engine bytes, another TensorRT version (unless the
engine was built VERSION_COMPATIBLE for an older or equal version and ``engine_host_code_allowed``
is set) or another compute capability (unless built with ``HardwareCompatibilityLevel.AMPERE_PLUS``
and the device is sm_80 or newer); ``set_input_shape`` returns False outside the active profile;
``execute_async_v3`` returns False if an input shape or a tensor address is missing, if an address
is not inside a live fake device allocation large enough for the tensor (checked at enqueue; a real
GPU would fault later), if the stream handle is not 0 or a live fake stream, or on a device
mismatch (above). The legacy calibrator's ``get_batch`` pointer must hold its batch when
``get_batch`` returns (TensorRT reads it on a stream of its own): a copy into it still queued is a
"Calibration failure".

Not modelled: building networks layer by layer (``add_input``, ``add_convolution``...), layer fusion
other than folding Q/DQ, reformat layers (a real engine inserts them between tactics' formats),
plugins, refit, DLA, weight streaming, setting layer precisions, dynamic ranges, the legacy
calibrator's entropy search, ``IOutputAllocator``, TensorRT's auxiliary streams and input-consumed
events, per-minor-version differences inside a major.
"""

from __future__ import annotations

import enum
import hashlib
import json
import operator
import os
import struct
import sys
import time
import types
from collections.abc import Iterable
from typing import Any, ClassVar

import numpy as np

from . import device as _dev

__all__ = ["make_tensorrt"]

_ENGINE_MAGIC = b"FAKETRT-PLAN\x00\x01"
_CACHE_MAGIC = b"FAKETRT-TIMINGCACHE\x00\x01"


# --------------------------------------------------------------------------------------------
# Enums (pybind11 enums in the real module; IntEnum here, with pybind-style str())
# --------------------------------------------------------------------------------------------


class _TrtEnum(enum.IntEnum):
    def __str__(self) -> str:
        return f"{type(self).__name__}.{self.name}"

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


def _enum(name: str, members: dict[str, int]) -> type[_TrtEnum]:
    return _TrtEnum(name, members)  # type: ignore[return-value]


def _numbered(name: str, members: str) -> type[_TrtEnum]:
    """An enum whose (space-separated) members are numbered from 0, as NvInfer.h numbers them."""
    return _enum(name, {m: i for i, m in enumerate(members.split())})


class DataType(_TrtEnum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    FP8 = 6
    BF16 = 7
    INT64 = 8
    INT4 = 9
    FP4 = 10

    @property
    def itemsize(self) -> float:
        return _ITEMSIZE[self]


_ITEMSIZE = {
    DataType.FLOAT: 4,
    DataType.HALF: 2,
    DataType.INT8: 1,
    DataType.INT32: 4,
    DataType.BOOL: 1,
    DataType.UINT8: 1,
    DataType.FP8: 1,
    DataType.BF16: 2,
    DataType.INT64: 8,
    DataType.INT4: 0.5,
    DataType.FP4: 0.5,
}
_NPTYPE = {
    DataType.FLOAT: np.float32,
    DataType.HALF: np.float16,
    DataType.INT8: np.int8,
    DataType.INT32: np.int32,
    DataType.INT64: np.int64,
    DataType.BOOL: np.bool_,
    DataType.UINT8: np.uint8,
}
# Names TensorRT uses in layer information ("Float", "Half", "Int8"...)
_DT_JSON = {
    DataType.FLOAT: "Float",
    DataType.HALF: "Half",
    DataType.INT8: "Int8",
    DataType.INT32: "Int32",
    DataType.BOOL: "Bool",
    DataType.UINT8: "UInt8",
    DataType.FP8: "FP8",
    DataType.BF16: "BFloat16",
    DataType.INT64: "Int64",
    DataType.INT4: "Int4",
    DataType.FP4: "FP4",
}
_DT_FORMAT = {
    DataType.FLOAT: "FP32",
    DataType.HALF: "FP16",
    DataType.INT8: "Int8",
    DataType.INT32: "Int32",
    DataType.BOOL: "Bool",
    DataType.UINT8: "UInt8",
    DataType.FP8: "FP8",
    DataType.BF16: "BF16",
    DataType.INT64: "Int64",
    DataType.INT4: "Int4",
    DataType.FP4: "FP4",
}
_FLOATING = {DataType.FLOAT, DataType.HALF, DataType.BF16}

# ONNX TensorProto.DataType -> DataType (types TensorRT cannot represent are absent)
_ONNX_TO_DT = {
    1: DataType.FLOAT,
    2: DataType.UINT8,
    3: DataType.INT8,
    6: DataType.INT32,
    7: DataType.INT64,
    9: DataType.BOOL,
    10: DataType.HALF,
    16: DataType.BF16,
    17: DataType.FP8,
    22: DataType.INT4,
    23: DataType.FP4,
}
_ONNX_TYPE_NAME = {
    4: "UINT16",
    5: "INT16",
    8: "STRING",
    11: "DOUBLE",
    12: "UINT32",
    13: "UINT64",
    14: "COMPLEX64",
    15: "COMPLEX128",
}


TensorIOMode = _numbered("TensorIOMode", "NONE INPUT OUTPUT")


TensorLocation = _numbered("TensorLocation", "DEVICE HOST")


MemoryPoolType = _numbered(
    "MemoryPoolType",
    "WORKSPACE DLA_MANAGED_SRAM DLA_LOCAL_DRAM DLA_GLOBAL_DRAM TACTIC_DRAM TACTIC_SHARED_MEMORY",
)


ProfilingVerbosity = _numbered("ProfilingVerbosity", "LAYER_NAMES_ONLY NONE DETAILED")


LayerInformationFormat = _numbered("LayerInformationFormat", "ONELINE JSON")


HardwareCompatibilityLevel = _numbered("HardwareCompatibilityLevel", "NONE AMPERE_PLUS")


ExecutionContextAllocationStrategy = _numbered(
    "ExecutionContextAllocationStrategy",
    "STATIC ON_PROFILE_CHANGE USER_MANAGED",
)


EngineCapability = _numbered("EngineCapability", "STANDARD SAFETY DLA_STANDALONE")


DeviceType = _numbered("DeviceType", "GPU DLA")


ErrorCode = _numbered(
    "ErrorCode",
    "SUCCESS INTERNAL_ERROR MEM_ALLOC_FAILED MODEL_DESERIALIZE_FAILED INVALID_VALUE INVALID_GRAPH"
    " INVALID_NODE UNSUPPORTED_GRAPH UNSUPPORTED_NODE UNSUPPORTED_NODE_ATTR UNSUPPORTED_NODE_INPUT"
    " UNSUPPORTED_NODE_DATATYPE UNSUPPORTED_NODE_DYNAMIC UNSUPPORTED_NODE_SHAPE REFIT_FAILED",
)


OnnxParserFlag = _numbered("OnnxParserFlag", "NATIVE_INSTANCENORM")


CalibrationAlgoType = _numbered(
    "CalibrationAlgoType",
    "LEGACY_CALIBRATION ENTROPY_CALIBRATION ENTROPY_CALIBRATION_2 MINMAX_CALIBRATION",
)


QuantizationFlag = _numbered("QuantizationFlag", "CALIBRATE_BEFORE_FUSION")


_CALIB_NAMES = {
    CalibrationAlgoType.LEGACY_CALIBRATION: "LegacyCalibration",
    CalibrationAlgoType.ENTROPY_CALIBRATION: "EntropyCalibration",
    CalibrationAlgoType.ENTROPY_CALIBRATION_2: "EntropyCalibration2",
    CalibrationAlgoType.MINMAX_CALIBRATION: "MinMaxCalibration",
}

# BuilderFlag values as in NvInfer.h (10.x)
_BUILDER_FLAGS_10 = {
    "FP16": 0,
    "INT8": 1,
    "DEBUG": 2,
    "GPU_FALLBACK": 3,
    "REFIT": 4,
    "DISABLE_TIMING_CACHE": 5,
    "TF32": 6,
    "SPARSE_WEIGHTS": 7,
    "SAFETY_SCOPE": 8,
    "OBEY_PRECISION_CONSTRAINTS": 9,
    "PREFER_PRECISION_CONSTRAINTS": 10,
    "DIRECT_IO": 11,
    "REJECT_EMPTY_ALGORITHMS": 12,
    "VERSION_COMPATIBLE": 13,
    "EXCLUDE_LEAN_RUNTIME": 14,
    "FP8": 15,
    "ERROR_ON_TIMING_CACHE_MISS": 16,
    "BF16": 17,
    "DISABLE_COMPILATION_CACHE": 18,
    "STRIP_PLAN": 19,
    "REFIT_IDENTICAL": 20,
    "WEIGHT_STREAMING": 21,
    "INT4": 22,
    "REFIT_INDIVIDUAL": 23,
    "STRICT_NANS": 24,
    "MONITOR_MEMORY": 25,
    "FP4": 26,
    "EDITABLE_TIMING_CACHE": 27,
}
_REMOVED_IN_11 = {
    "FP16",
    "INT8",
    "FP8",
    "BF16",
    "INT4",
    "FP4",
    "OBEY_PRECISION_CONSTRAINTS",
    "PREFER_PRECISION_CONSTRAINTS",
    "DIRECT_IO",
}
_PRECISION_FLAGS = (
    "FP16",
    "INT8",
    "BF16",
    "FP8",
    "INT4",
    "FP4",
    "OBEY_PRECISION_CONSTRAINTS",
    "PREFER_PRECISION_CONSTRAINTS",
)


Severity = _numbered("Severity", "INTERNAL_ERROR ERROR WARNING INFO VERBOSE")

# NetworkDefinitionCreationFlag values as NvInfer.h numbers them: 10.x keeps the ignored
# EXPLICIT_BATCH at 0; 11.x removed it and renumbered from 0 (11.1: STRONGLY_TYPED=0, JIT=1,
# AOT=2). Code must shift by int(flag), never by a literal bit.
_NDCF_10 = {
    "EXPLICIT_BATCH": 0,
    "STRONGLY_TYPED": 1,
    "PREFER_JIT_PYTHON_PLUGINS": 2,
    "PREFER_AOT_PYTHON_PLUGINS": 3,
}
_NDCF_11 = {"STRONGLY_TYPED": 0, "PREFER_JIT_PYTHON_PLUGINS": 1, "PREFER_AOT_PYTHON_PLUGINS": 2}


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _as_int(value: Any, what: str) -> int:
    if isinstance(value, (float, str, bytes)):
        raise TypeError(f"{what}: expected an integer, got {type(value).__name__}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{what}: expected an integer, got {type(value).__name__}") from None


def _as_address(value: Any, what: str) -> int:
    """pybind11 converts anything with __index__ or __int__ (not float/str) to an address."""
    if isinstance(value, (float, str, bytes)) or value is None:
        raise TypeError(f"{what}(): incompatible function arguments (memory: int)")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise TypeError(f"{what}(): incompatible function arguments (memory: int)") from None


class Dims(tuple):
    """Tensor dimensions (a tuple of ints; -1 marks a dynamic dimension)."""

    MAX_DIMS = 8

    def __new__(cls, shape: Iterable[Any] = ()) -> Dims:
        vals = tuple(_as_int(v, "Dims") for v in shape)
        if len(vals) > cls.MAX_DIMS:
            raise ValueError(f"Dims supports at most {cls.MAX_DIMS} dimensions, got {len(vals)}")
        return super().__new__(cls, vals)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (tuple, list)):
            return tuple(self) == tuple(other)
        return NotImplemented

    def __ne__(self, other: object) -> bool:
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    __hash__ = tuple.__hash__

    def __repr__(self) -> str:
        return repr(tuple(self))


def _to_dims(shape: Any, what: str = "shape") -> Dims:
    if isinstance(shape, Dims):
        return shape
    if isinstance(shape, (str, bytes)) or not isinstance(shape, Iterable):
        raise TypeError(f"{what}: expected a sequence of ints (Dims), got {type(shape).__name__}")
    return Dims(shape)


def volume(iterable: Iterable[Any]) -> int:
    """Product of the values (1 for an empty sequence), as ``tensorrt.volume``."""
    out = 1
    for v in iterable:
        out *= int(v)
    return out


def nptype(trt_type: Any) -> type:
    """The numpy type for a ``DataType``; TypeError when there is none (as ``tensorrt.nptype``)."""
    try:
        return _NPTYPE[DataType(int(trt_type))]
    except (KeyError, ValueError):
        raise TypeError(
            "Could not resolve TensorRT datatype to an equivalent numpy datatype."
        ) from None


def _nbytes(dt: DataType, shape: Iterable[int]) -> int:
    return int(np.ceil(volume(shape) * _ITEMSIZE[dt]))


def _version_int(version: str) -> int:
    parts = [int(p) for p in version.split(".")[:3]] + [0, 0, 0]
    return parts[0] * 10000 + parts[1] * 100 + parts[2]


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))


def _buffer_bytes(obj: Any, what: str) -> bytes:
    if isinstance(obj, str):
        raise TypeError(f"{what}: expected a buffer (bytes, IHostMemory, memoryview...), got str")
    try:
        return bytes(memoryview(obj).cast("B"))
    except TypeError:
        raise TypeError(
            f"{what}: expected a buffer (bytes, IHostMemory, memoryview...), got "
            f"{type(obj).__name__}"
        ) from None


class _ContextManager:
    """Real objects still accept ``with`` (deprecated, no effect)."""

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


# --------------------------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------------------------


class ILogger:
    """Base class for application loggers: override ``log(severity, msg)`` and call
    ``ILogger.__init__(self)``."""

    Severity = Severity
    INTERNAL_ERROR = Severity.INTERNAL_ERROR
    ERROR = Severity.ERROR
    WARNING = Severity.WARNING
    INFO = Severity.INFO
    VERBOSE = Severity.VERBOSE

    def __init__(self) -> None:
        self._trt_base_initialised = True

    def log(self, severity: Severity, msg: str) -> None:
        raise RuntimeError('Tried to call pure virtual function "ILogger::log"')


class Logger(ILogger):
    """The stock logger: prints messages at ``min_severity`` or more severe to stderr."""

    def __init__(self, min_severity: Severity = Severity.WARNING) -> None:
        super().__init__()
        self.min_severity = Severity(int(min_severity))

    def log(self, severity: Severity, msg: str) -> None:
        if int(severity) <= int(self.min_severity):
            tag = "FEWIV"[int(severity)]
            stamp = time.strftime("%m/%d/%Y-%H:%M:%S")
            print(f"[{stamp}] [TRT] [{tag}] {msg}", file=sys.stderr)


def _check_logger(logger: Any, what: str) -> ILogger:
    if not isinstance(logger, ILogger):
        raise TypeError(f"{what}(): incompatible constructor arguments (logger: tensorrt.ILogger)")
    if not getattr(logger, "_trt_base_initialised", False):
        raise TypeError(f"{type(logger).__name__}.__init__() must call ILogger.__init__(self)")
    return logger


def _log(logger: ILogger, severity: Severity, msg: str) -> None:
    logger.log(severity, msg)


# --------------------------------------------------------------------------------------------
# ONNX analysis (what the parser puts into the network)
# --------------------------------------------------------------------------------------------

_QUANTIZABLE = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
_FOLDED = {"QuantizeLinear", "DequantizeLinear", "Constant", "Identity"}
_LAYER_TYPES = {
    "Conv": ("CaskConvolution", "Convolution"),
    "ConvTranspose": ("CaskDeconvolution", "Deconvolution"),
    "Gemm": ("CaskGemmMatrixMultiply", "MatrixMultiply"),
    "MatMul": ("CaskGemmMatrixMultiply", "MatrixMultiply"),
    "MaxPool": ("CaskPooling", "Pooling"),
    "AveragePool": ("CaskPooling", "Pooling"),
    "GlobalAveragePool": ("CaskPooling", "Pooling"),
    "GlobalMaxPool": ("CaskPooling", "Pooling"),
    "Reshape": ("Shuffle", "Shuffle"),
    "Flatten": ("Shuffle", "Shuffle"),
    "Transpose": ("Shuffle", "Shuffle"),
    "Squeeze": ("Shuffle", "Shuffle"),
    "Unsqueeze": ("Shuffle", "Shuffle"),
    "Softmax": ("CaskSoftMaxV2", "SoftMax"),
    "Cast": ("Cast", "Cast"),
    "Concat": ("Concatenation", "Concatenation"),
    "Slice": ("Slice", "Slice"),
    "Gather": ("Gather", "Gather"),
    "BatchNormalization": ("Scale", "Scale"),
}
_POINTWISE = {
    "Relu",
    "LeakyRelu",
    "Sigmoid",
    "Tanh",
    "Clip",
    "HardSigmoid",
    "HardSwish",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Pow",
    "Sqrt",
    "Exp",
    "Log",
    "Abs",
    "Neg",
    "Erf",
    "Max",
    "Min",
    "Elu",
    "Selu",
    "Softplus",
}


class _ParseError(Exception):
    def __init__(
        self, code: ErrorCode, desc: str, node: int = -1, node_name: str = "", op: str = ""
    ) -> None:
        super().__init__(desc)
        self.code = code
        self.desc = desc
        self.node = node
        self.node_name = node_name
        self.op = op


def _type_and_shape(value_info: Any) -> tuple[int, tuple[int, ...] | None]:
    tt = value_info.type.tensor_type
    if not tt.HasField("shape"):
        return tt.elem_type, None
    dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim)
    return tt.elem_type, dims


class _OnnxGraph:
    """What the parser learned from the ONNX model (kept by the network, used by the build)."""

    def __init__(self, model_bytes: bytes, model: Any) -> None:
        import onnx

        self.model_bytes = model_bytes
        graph = model.graph
        self.initializers: dict[str, tuple[int, int]] = {
            t.name: (t.data_type, volume(t.dims)) for t in graph.initializer
        }
        try:
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
        except Exception:
            inferred = model
        self.types: dict[str, int] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        ig = inferred.graph
        for vi in [*ig.value_info, *ig.input, *ig.output]:
            elem, shape = _type_and_shape(vi)
            if elem:
                self.types[vi.name] = elem
            if shape is not None:
                self.shapes[vi.name] = shape
        for t in graph.initializer:
            self.types[t.name] = t.data_type
            self.shapes[t.name] = tuple(t.dims)

        self.inputs: list[tuple[str, DataType, tuple[int, ...]]] = []
        self.outputs: list[tuple[str, DataType, tuple[int, ...]]] = []
        for vi in graph.input:
            if vi.name in self.initializers:
                continue
            self.inputs.append(self._io(vi, "input"))
        for vi in graph.output:
            self.outputs.append(self._io(vi, "output"))

        self.nodes: list[dict[str, Any]] = []
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = {}
        local_functions = {(f.domain, f.name) for f in model.functions}
        for i, node in enumerate(graph.node):
            if (
                node.domain not in ("", "ai.onnx")
                and (node.domain, node.op_type) not in local_functions
            ):
                raise _ParseError(
                    ErrorCode.UNSUPPORTED_NODE,
                    f"No importer registered for op: {node.op_type} (domain {node.domain})",
                    i,
                    node.name,
                    node.op_type,
                )
            self.nodes.append(
                {
                    "onnx_name": node.name,
                    "name": node.name or f"(Unnamed Layer* {i}) [{node.op_type}]",
                    "op": node.op_type,
                    "inputs": list(node.input),
                    "outputs": list(node.output),
                }
            )
            for out in node.output:
                self.producer[out] = i
            for inp in node.input:
                if inp:
                    self.consumers.setdefault(inp, []).append(i)
        self.has_qdq = any(n["op"] in ("QuantizeLinear", "DequantizeLinear") for n in self.nodes)

    def _io(self, vi: Any, kind: str) -> tuple[str, DataType, tuple[int, ...]]:
        elem, shape = _type_and_shape(vi)
        if elem == 0 and vi.name in self.types:
            elem = self.types[vi.name]
        if shape is None:
            shape = self.shapes.get(vi.name)
        if elem not in _ONNX_TO_DT:
            name = _ONNX_TYPE_NAME.get(elem, str(elem))
            raise _ParseError(
                ErrorCode.UNSUPPORTED_GRAPH,
                f"Network {kind} '{vi.name}' has unsupported ONNX data type {name}",
            )
        if shape is None:
            raise _ParseError(ErrorCode.INVALID_GRAPH, f"Network {kind} '{vi.name}' has no shape")
        return vi.name, _ONNX_TO_DT[elem], shape

    def dtype(self, tensor: str) -> DataType:
        return _ONNX_TO_DT.get(self.types.get(tensor, 1), DataType.FLOAT)

    def is_constant(self, tensor: str) -> bool:
        """An initializer, a Constant, or computed from constants only (weights, folded away)."""
        memo = self.__dict__.setdefault("_constant_memo", {})
        if tensor not in memo:
            memo[tensor] = False  # guards against cycles in malformed graphs
            if tensor in self.initializers:
                memo[tensor] = True
            elif tensor in self.producer:
                node = self.nodes[self.producer[tensor]]
                ins = [t for t in node["inputs"] if t]
                memo[tensor] = node["op"] == "Constant" or (
                    bool(ins) and all(self.is_constant(t) for t in ins)
                )
        return memo[tensor]

    def plan_layers(self, *, strong: bool, fp16: bool, int8_implicit: bool) -> list[dict[str, Any]]:
        """Engine layers (Q/DQ, Constant and Identity folded away) with their precisions."""
        io_names = {n for n, _, _ in self.inputs} | {n for n, _, _ in self.outputs}

        def weak(dt: DataType, tensor: str, *, int8: bool) -> DataType:
            if strong or dt not in _FLOATING or tensor in io_names:
                return dt
            if int8:
                return DataType.INT8
            return DataType.HALF if fp16 else DataType.FLOAT

        layers = []
        for node in self.nodes:
            op = node["op"]
            real_inputs = [t for t in node["inputs"] if t]
            if op in _FOLDED or (real_inputs and all(self.is_constant(t) for t in real_inputs)):
                continue  # Q/DQ fold into their consumers; constant subgraphs are folded away
            implicit_q = int8_implicit and not strong and op in _QUANTIZABLE
            acts, weights = [], []
            for t in node["inputs"]:
                if not t:
                    continue
                p = self.producer.get(t)
                if p is not None and self.nodes[p]["op"] == "DequantizeLinear":
                    src = self.nodes[p]["inputs"][0]
                    if self.is_constant(src):
                        weights.append((self.dtype(src), volume(self.shapes.get(src, ()))))
                    else:
                        acts.append((t, self.dtype(src), self.shapes.get(t)))
                elif self.is_constant(t):
                    wdt = self.dtype(t)
                    if implicit_q and wdt in _FLOATING:
                        wdt = DataType.INT8
                    elif not strong and wdt in _FLOATING:
                        wdt = DataType.HALF if fp16 else DataType.FLOAT
                    weights.append((wdt, volume(self.shapes.get(t, ()))))
                else:
                    acts.append((t, weak(self.dtype(t), t, int8=implicit_q), self.shapes.get(t)))
            outs = []
            for t in node["outputs"]:
                cons = self.consumers.get(t, [])
                if cons and all(self.nodes[c]["op"] == "QuantizeLinear" for c in cons):
                    q = self.nodes[cons[0]]["outputs"][0]
                    outs.append((t, self.dtype(q), self.shapes.get(t)))
                else:
                    outs.append((t, weak(self.dtype(t), t, int8=implicit_q), self.shapes.get(t)))
            quantized = any(
                dt in (DataType.INT8, DataType.FP8, DataType.INT4) for _, dt, _ in acts
            ) or any(dt in (DataType.INT8, DataType.FP8, DataType.INT4) for dt, _ in weights)
            if quantized:
                precision = DataType.INT8
            elif outs:
                precision = outs[0][1]
            else:
                precision = DataType.FLOAT
            layer_type, param_type = _LAYER_TYPES.get(
                op, ("PointWiseV2", "PointWise") if op in _POINTWISE else (op, op)
            )
            layers.append(
                {
                    "name": node["name"],
                    "onnx_name": node["onnx_name"] or node["name"],
                    "op": op,
                    "layer_type": layer_type,
                    "parameter_type": param_type,
                    "precision": int(precision),
                    "inputs": [
                        {"name": n, "dtype": int(d), "shape": list(s) if s is not None else None}
                        for n, d, s in acts
                    ],
                    "outputs": [
                        {"name": n, "dtype": int(d), "shape": list(s) if s is not None else None}
                        for n, d, s in outs
                    ],
                    "weights": {"dtype": int(weights[0][0]), "count": weights[0][1]}
                    if weights and op in _QUANTIZABLE
                    else None,
                    "bias": {"dtype": int(weights[1][0]), "count": weights[1][1]}
                    if len(weights) > 1 and op in _QUANTIZABLE
                    else None,
                }
            )
        return layers


def _load_onnx(data: bytes, path: str | None) -> tuple[bytes, Any]:
    import onnx
    from onnx import external_data_helper

    try:
        model = onnx.load_from_string(data)
    except Exception as exc:
        raise _ParseError(
            ErrorCode.MODEL_DESERIALIZE_FAILED, f"Failed to parse ONNX model: {exc}"
        ) from None
    if not model.graph.node and not model.graph.output:
        raise _ParseError(
            ErrorCode.MODEL_DESERIALIZE_FAILED,
            "Failed to parse ONNX model: empty or not an ONNX ModelProto",
        )
    external = [t for t in model.graph.initializer if external_data_helper.uses_external_data(t)]
    if external:
        if path is None:
            raise _ParseError(
                ErrorCode.INVALID_VALUE,
                f"Initializer '{external[0].name}' has external data; pass the model path to "
                "parse()",
            )
        try:
            external_data_helper.load_external_data_for_model(
                model, os.path.dirname(os.path.abspath(path))
            )
        except Exception as exc:
            raise _ParseError(
                ErrorCode.INVALID_VALUE, f"Failed to load external weights: {exc}"
            ) from None
        data = model.SerializeToString()
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise _ParseError(ErrorCode.INVALID_GRAPH, f"Invalid ONNX graph: {exc}") from None
    return data, model


# --------------------------------------------------------------------------------------------
# Execution with ONNX Runtime
# --------------------------------------------------------------------------------------------


class _OrtRunner:
    def __init__(self, model_bytes: bytes) -> None:
        self._model_bytes = model_bytes
        self._session: Any = None
        self._shape_cache: dict[Any, dict[str, tuple[int, ...]]] = {}

    @property
    def session(self) -> Any:
        if self._session is None:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 1
            opts.inter_op_num_threads = 1
            opts.log_severity_level = 3
            self._session = ort.InferenceSession(
                self._model_bytes, opts, providers=["CPUExecutionProvider"]
            )
        return self._session

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        sess = self.session
        names = [o.name for o in sess.get_outputs()]
        return dict(zip(names, sess.run(names, feeds), strict=True))

    def concrete_shapes(
        self, input_shapes: dict[str, tuple[int, ...]], input_types: dict[str, DataType]
    ) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape for concrete input shapes (ONNX shape inference, else a dry run)."""
        key = tuple(sorted(input_shapes.items()))
        if key in self._shape_cache:
            return self._shape_cache[key]
        import onnx

        model = onnx.load_from_string(self._model_bytes)
        for vi in model.graph.input:
            if vi.name in input_shapes:
                dims = vi.type.tensor_type.shape.dim
                for d, v in zip(dims, input_shapes[vi.name], strict=False):
                    d.dim_value = int(v)
        shapes: dict[str, tuple[int, ...]] = dict(input_shapes)
        try:
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
            for vi in [*inferred.graph.value_info, *inferred.graph.output]:
                _, s = _type_and_shape(vi)
                if s is not None and all(v >= 0 for v in s):
                    shapes[vi.name] = s
        except Exception:
            pass
        if any(o.name not in shapes for o in model.graph.output):
            feeds = {n: np.zeros(s, dtype=nptype(input_types[n])) for n, s in input_shapes.items()}
            for name, arr in self.run(feeds).items():
                shapes[name] = tuple(arr.shape)
        self._shape_cache[key] = shapes
        return shapes


# --------------------------------------------------------------------------------------------
# Version-independent bases; make_tensorrt() derives per-module classes carrying ``_lib``
# --------------------------------------------------------------------------------------------


class _Lib:
    def __init__(self, version: str, cc: tuple[int, int]) -> None:
        self.version = version
        self.major = _version_tuple(version)[0]
        self.cc = cc
        self.mod: types.ModuleType | None = None

    def __getattr__(self, name: str) -> Any:  # the module's classes and enums
        return getattr(self.mod, name)


class _IHostMemory(bytes):
    """Host memory owned by TensorRT. Exposes the buffer protocol, ``nbytes`` and ``dtype``."""

    _ALLOWED: ClassVar[frozenset[str]] = frozenset({"nbytes", "dtype", "_lib"})

    def __getattribute__(self, name: str) -> Any:
        if name.startswith("__") or name in _IHostMemory._ALLOWED:
            return super().__getattribute__(name)
        raise AttributeError(f"'tensorrt.IHostMemory' object has no attribute '{name}'")

    @property
    def nbytes(self) -> int:
        return bytes.__len__(self)

    @property
    def dtype(self) -> DataType:
        return DataType.UINT8

    def __len__(self) -> int:
        raise TypeError("object of type 'tensorrt.IHostMemory' has no len()")

    def __bool__(self) -> bool:  # a pybind object without __len__ is always truthy
        return True

    def __getitem__(self, item: Any) -> Any:
        raise TypeError("'tensorrt.IHostMemory' object is not subscriptable")

    def __iter__(self) -> Any:
        raise TypeError("'tensorrt.IHostMemory' object is not iterable")

    def __contains__(self, item: Any) -> bool:
        raise TypeError("argument of type 'tensorrt.IHostMemory' is not iterable")

    def __eq__(self, other: object) -> bool:
        return self is other

    def __ne__(self, other: object) -> bool:
        return self is not other

    __hash__ = object.__hash__

    def __add__(self, other: Any) -> Any:
        return NotImplemented

    def __mul__(self, other: Any) -> Any:
        return NotImplemented

    __rmul__ = __mul__

    def __mod__(self, other: Any) -> Any:
        return NotImplemented

    def __repr__(self) -> str:
        return f"<tensorrt.tensorrt.IHostMemory object at {id(self):#x}>"

    __str__ = __repr__

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class _ITensor:
    _lib: _Lib

    def __init__(
        self,
        name: str,
        dtype: DataType,
        shape: tuple[int, ...],
        *,
        is_input: bool = False,
        is_output: bool = False,
    ) -> None:
        self._name = name
        self._dtype = dtype
        self._shape = Dims(shape)
        self._is_input = is_input
        self._is_output = is_output

    name = property(lambda self: self._name)
    dtype = property(lambda self: self._dtype)
    shape = property(lambda self: self._shape)
    is_network_input = property(lambda self: self._is_input)
    is_network_output = property(lambda self: self._is_output)
    is_shape_tensor = property(lambda self: False)
    is_execution_tensor = property(lambda self: True)
    location = property(lambda self: TensorLocation.DEVICE)

    def __repr__(self) -> str:
        return f"<ITensor {self._name} {self._dtype} {self._shape}>"


class _ILayer:
    _lib: _Lib

    def __init__(self, node: dict[str, Any], graph: _OnnxGraph) -> None:
        self._node = node
        self._graph = graph
        self.name = node["name"]

    @property
    def precision(self) -> DataType:
        outs = self._node["outputs"]
        return self._graph.dtype(outs[0]) if outs else DataType.FLOAT

    @property
    def num_inputs(self) -> int:
        return len(self._node["inputs"])

    @property
    def num_outputs(self) -> int:
        return len(self._node["outputs"])

    def _tensor(self, name: str) -> Any:
        return self._lib.ITensor(name, self._graph.dtype(name), self._graph.shapes.get(name, ()))

    def get_input(self, index: int) -> Any:
        names = self._node["inputs"]
        return self._tensor(names[index]) if 0 <= index < len(names) and names[index] else None

    def get_output(self, index: int) -> Any:
        names = self._node["outputs"]
        return self._tensor(names[index]) if 0 <= index < len(names) else None

    def get_output_type(self, index: int) -> DataType:
        return self._graph.dtype(self._node["outputs"][index])


class _INetworkDefinition(_ContextManager):
    _lib: _Lib

    def __init__(self, builder: Any, flags: int) -> None:
        self._builder = builder
        self._flags = flags
        self._graph: _OnnxGraph | None = None
        self._inputs: list[Any] = []
        self._outputs: list[Any] = []
        self.name = "Unnamed Network 0"

    @property
    def flags(self) -> int:
        return self._flags

    def get_flag(self, flag: Any) -> bool:
        return bool(self._flags & (1 << int(flag)))

    @property
    def _strongly_typed(self) -> bool:
        if self._lib.major >= 11:
            return True
        return self.get_flag(self._lib.NetworkDefinitionCreationFlag.STRONGLY_TYPED)

    @property
    def num_inputs(self) -> int:
        return len(self._inputs)

    @property
    def num_outputs(self) -> int:
        return len(self._outputs)

    @property
    def num_layers(self) -> int:
        return len(self._graph.nodes) if self._graph else 0

    def get_input(self, index: int) -> Any:
        return self._inputs[index] if 0 <= index < len(self._inputs) else None

    def get_output(self, index: int) -> Any:
        return self._outputs[index] if 0 <= index < len(self._outputs) else None

    def get_layer(self, index: int) -> Any:
        if self._graph is None or not 0 <= index < len(self._graph.nodes):
            return None
        return self._lib.ILayer(self._graph.nodes[index], self._graph)

    def _populate(self, graph: _OnnxGraph) -> None:
        self._graph = graph
        self._inputs = [self._lib.ITensor(n, d, s, is_input=True) for n, d, s in graph.inputs]
        self._outputs = [self._lib.ITensor(n, d, s, is_output=True) for n, d, s in graph.outputs]


class _NetworkV10:
    @property
    def has_implicit_batch_dimension(self) -> bool:
        return False


class _ParserError:
    def __init__(self, err: _ParseError) -> None:
        self._err = err

    def code(self) -> ErrorCode:
        return self._err.code

    def desc(self) -> str:
        return self._err.desc

    def node(self) -> int:
        return self._err.node

    def node_name(self) -> str:
        return self._err.node_name

    def node_operator(self) -> str:
        return self._err.op

    def file(self) -> str:
        return "ModelImporter.cpp"

    def func(self) -> str:
        return "parseGraph"

    def line(self) -> int:
        return 0

    def __str__(self) -> str:
        e = self._err
        return (
            f"In node {e.node} with name: {e.node_name} and operator: {e.op} "
            f"({e.code.name}): {e.desc}"
        )


class _FlagBits:
    """``set_flag``, ``clear_flag`` and ``get_flag`` on the bit field ``flags`` (bit ``int(flag)``
    per enum member), as the parser and the builder config have them."""

    flags: int

    def set_flag(self, flag: Any) -> None:
        self.flags |= 1 << int(flag)

    def clear_flag(self, flag: Any) -> None:
        self.flags &= ~(1 << int(flag))

    def get_flag(self, flag: Any) -> bool:
        return bool(self.flags & (1 << int(flag)))


class _OnnxParser(_FlagBits, _ContextManager):
    _lib: _Lib

    def __init__(self, network: Any, logger: Any) -> None:
        if not isinstance(network, self._lib.INetworkDefinition):
            raise TypeError(
                "OnnxParser(): incompatible constructor arguments (network: "
                "tensorrt.INetworkDefinition)"
            )
        self._network = network
        self._logger = _check_logger(logger, "OnnxParser")
        self._errors: list[Any] = []
        self.flags = 0

    @property
    def num_errors(self) -> int:
        return len(self._errors)

    def get_error(self, index: int) -> Any:
        return self._errors[index] if 0 <= index < len(self._errors) else None

    def clear_errors(self) -> None:
        self._errors.clear()

    def supports_operator(self, op_name: str) -> bool:
        import onnx

        return bool(onnx.defs.has(op_name))

    def get_used_vc_plugin_libraries(self) -> list[str]:
        return []

    def _fail(self, err: _ParseError) -> bool:
        self._errors.append(self._lib.ParserError(err))
        where = (
            f"In node {err.node} with name: {err.node_name} and operator: {err.op} "
            if err.node >= 0
            else ""
        )
        _log(
            self._logger, Severity.ERROR, f"ModelImporter.cpp: {where}({err.code.name}): {err.desc}"
        )
        return False

    def parse(self, model: Any, path: str | None = None) -> bool:
        data = _buffer_bytes(model, "OnnxParser.parse")
        if path is not None and not isinstance(path, str):
            raise TypeError("parse(): incompatible function arguments (path: str = None)")
        return self._parse(data, path)

    def parse_from_file(self, model: str) -> bool:
        if not isinstance(model, str):
            raise TypeError(
                "parse_from_file(): incompatible function arguments (model: str); pass str(path)"
            )
        try:
            with open(model, "rb") as f:
                data = f.read()
        except OSError as exc:
            return self._fail(
                _ParseError(
                    ErrorCode.MODEL_DESERIALIZE_FAILED, f"Failed to open file: {model} ({exc})"
                )
            )
        return self._parse(data, model)

    def _parse(self, data: bytes, path: str | None) -> bool:
        if self._network._graph is not None:
            return self._fail(
                _ParseError(ErrorCode.INVALID_GRAPH, "The network already holds a parsed model")
            )
        try:
            data, model = _load_onnx(data, path)
            graph = _OnnxGraph(data, model)
        except _ParseError as err:
            return self._fail(err)
        self._network._populate(graph)
        return True


class _IOptimizationProfile:
    _lib: _Lib

    def __init__(self) -> None:
        self._shapes: dict[str, list[Dims | None]] = {}
        self.extra_memory_target = 1.0

    @staticmethod
    def _consistent(entry: list[Dims | None], which: int, dims: Dims) -> bool:
        if any(d < 0 for d in dims):
            return False
        for k, other in enumerate(entry):
            if other is None or k == which:
                continue
            if len(other) != len(dims):
                return False
            if k < which and any(o > d for o, d in zip(other, dims, strict=True)):
                return False
            if k > which and any(o < d for o, d in zip(other, dims, strict=True)):
                return False
        return True

    def set_shape(self, input: str, min: Any, opt: Any, max: Any) -> None:
        entry = self._shapes.setdefault(str(input), [None, None, None])
        for which, (label, value) in enumerate((("min", min), ("opt", opt), ("max", max))):
            dims = _to_dims(value, label)
            if not self._consistent(entry, which, dims):
                raise RuntimeError(f"Shape provided for {label} is inconsistent with other shapes.")
            entry[which] = dims

    def get_shape(self, input: str) -> list[Dims]:
        entry = self._shapes.get(str(input))
        if entry is None or entry[0] is None:
            return []
        return [d if d is not None else Dims(()) for d in entry]

    def _valid(self) -> bool:
        return all(all(d is not None for d in e) for e in self._shapes.values())

    def __bool__(self) -> bool:
        return self._valid()


class _ITimingCache:
    _lib: _Lib

    def __init__(self, version: str, cc: tuple[int, int], entries: dict[str, str]) -> None:
        self._version = version
        self._cc = tuple(cc)
        self._entries = dict(entries)

    def serialize(self) -> Any:
        header = json.dumps(
            {
                "trt_version": self._version,
                "compute_capability": list(self._cc),
                "entries": self._entries,
            },
            sort_keys=True,
        )
        return self._lib.IHostMemory(_CACHE_MAGIC + header.encode())

    def combine(self, input_cache: Any, ignore_mismatch: bool) -> bool:
        if not isinstance(input_cache, self._lib.ITimingCache):
            raise TypeError(
                "combine(): incompatible function arguments (input_cache: tensorrt.ITimingCache)"
            )
        if input_cache._version != self._version:
            return False
        if input_cache._cc != self._cc and not ignore_mismatch:
            return False
        for k, v in input_cache._entries.items():
            self._entries.setdefault(k, v)
        return True

    def reset(self) -> bool:
        self._entries.clear()
        return True


class _IBuilderConfig(_FlagBits, _ContextManager):
    _lib: _Lib

    def __init__(self, builder: Any) -> None:
        self._builder = builder
        self._flags = 1 << int(self._lib.BuilderFlag.TF32)
        self._pools = {
            MemoryPoolType.WORKSPACE: _dev.TOTAL_MEMORY,
            MemoryPoolType.DLA_MANAGED_SRAM: 0,
            MemoryPoolType.DLA_LOCAL_DRAM: 0,
            MemoryPoolType.DLA_GLOBAL_DRAM: 0,
            MemoryPoolType.TACTIC_DRAM: _dev.TOTAL_MEMORY,
            MemoryPoolType.TACTIC_SHARED_MEMORY: 48 * 1024,
        }
        self._profiles: list[Any] = []
        self._timing_cache: Any = None
        self._profiling_verbosity = ProfilingVerbosity.LAYER_NAMES_ONLY
        self._hw_level = HardwareCompatibilityLevel.NONE
        self.builder_optimization_level = 3
        self.avg_timing_iterations = 1
        self.max_aux_streams = -1
        self.engine_capability = EngineCapability.STANDARD
        self.default_device_type = DeviceType.GPU
        self.DLA_core = -1
        self.profile_stream = 0
        # 10.x calibration state (only reachable through the 10.x mixin)
        self._int8_calibrator: Any = None
        self._calibration_profile: Any = None
        self._quantization_flags = 0

    # flags
    @property
    def flags(self) -> int:
        return self._flags

    @flags.setter
    def flags(self, value: int) -> None:
        self._flags = _as_int(value, "flags")

    def _has(self, name: str) -> bool:
        member = self._lib.BuilderFlag.__members__.get(name)
        return member is not None and self.get_flag(member)

    # memory pools
    def set_memory_pool_limit(self, pool: Any, pool_size: int) -> None:
        size = _as_int(pool_size, "set_memory_pool_limit")
        if size < 0:
            raise TypeError(
                "set_memory_pool_limit(): incompatible function arguments (pool_size: int >= 0)"
            )
        self._pools[MemoryPoolType(int(pool))] = size

    def get_memory_pool_limit(self, pool: Any) -> int:
        return self._pools[MemoryPoolType(int(pool))]

    # verbosity / compatibility
    @property
    def profiling_verbosity(self) -> ProfilingVerbosity:
        return self._profiling_verbosity

    @profiling_verbosity.setter
    def profiling_verbosity(self, value: Any) -> None:
        if not isinstance(value, ProfilingVerbosity):
            raise TypeError("profiling_verbosity must be a tensorrt.ProfilingVerbosity")
        self._profiling_verbosity = value

    @property
    def hardware_compatibility_level(self) -> HardwareCompatibilityLevel:
        return self._hw_level

    @hardware_compatibility_level.setter
    def hardware_compatibility_level(self, value: Any) -> None:
        self._hw_level = HardwareCompatibilityLevel(int(value))

    # profiles
    def add_optimization_profile(self, profile: Any) -> int:
        if not isinstance(profile, self._lib.IOptimizationProfile):
            raise TypeError(
                "add_optimization_profile(): incompatible function arguments (profile: "
                "tensorrt.IOptimizationProfile)"
            )
        if not profile._valid():
            _log(
                self._builder._logger,
                Severity.ERROR,
                "IBuilderConfig::addOptimizationProfile: Error Code 3: API Usage Error "
                "(Parameter check failed, condition: profile->isValid())",
            )
            return -1
        self._profiles.append(profile)
        return len(self._profiles) - 1

    @property
    def num_optimization_profiles(self) -> int:
        return len(self._profiles)

    # timing cache
    def create_timing_cache(self, serialized_timing_cache: Any) -> Any:
        data = _buffer_bytes(serialized_timing_cache, "create_timing_cache")
        lib = self._lib
        if not data:
            return lib.ITimingCache(lib.version, lib.cc, {})
        logger = self._builder._logger
        try:
            if not data.startswith(_CACHE_MAGIC):
                raise ValueError
            header = json.loads(data[len(_CACHE_MAGIC) :].decode())
            version, cc, entries = (
                header["trt_version"],
                tuple(header["compute_capability"]),
                header["entries"],
            )
        except (ValueError, KeyError, UnicodeDecodeError):
            _log(
                logger,
                Severity.ERROR,
                "Error Code 1: Serialization (Serialization assertion magicTagRead == "
                "kMAGIC_TAG failed.Magic tag does not match)",
            )
            _log(logger, Severity.ERROR, "Error Code 4: The timing cache will not be used!")
            return None
        if version != lib.version:
            _log(
                logger,
                Severity.ERROR,
                "Error Code 1: Serialization (Version tag does not match: timing cache from "
                f"TensorRT {version}, this is {lib.version})",
            )
            _log(logger, Severity.ERROR, "Error Code 4: The timing cache will not be used!")
            return None
        return lib.ITimingCache(version, cc, entries)

    def set_timing_cache(self, cache: Any, ignore_mismatch: bool) -> bool:
        if not isinstance(cache, self._lib.ITimingCache):
            raise TypeError(
                "set_timing_cache(): incompatible function arguments (cache: "
                "tensorrt.ITimingCache, ignore_mismatch: bool)"
            )
        if cache._cc != tuple(self._lib.cc) and not ignore_mismatch:
            _log(
                self._builder._logger,
                Severity.ERROR,
                "IBuilderConfig::setTimingCache: Error Code 3: API Usage Error (timing cache "
                "was created on a device with compute capability "
                f"{cache._cc[0]}.{cache._cc[1]}; pass ignore_mismatch=True to use it)",
            )
            return False
        self._timing_cache = cache
        return True

    def get_timing_cache(self) -> Any:
        return self._timing_cache

    def reset(self) -> None:
        self.__init__(self._builder)  # type: ignore[misc]


class _BuilderConfigV10:
    """The weak-typing / implicit-INT8 part of IBuilderConfig that TensorRT 11 removed."""

    @property
    def int8_calibrator(self) -> Any:
        return self._int8_calibrator  # type: ignore[attr-defined]

    @int8_calibrator.setter
    def int8_calibrator(self, calibrator: Any) -> None:
        lib = self._lib  # type: ignore[attr-defined]
        if calibrator is not None:
            if not isinstance(calibrator, lib.IInt8Calibrator):
                raise TypeError("int8_calibrator must be a tensorrt.IInt8Calibrator (or None)")
            if not getattr(calibrator, "_trt_base_initialised", False):
                raise TypeError(
                    f"{type(calibrator).__name__}.__init__() must call the base class __init__ "
                    "(e.g. trt.IInt8EntropyCalibrator2.__init__(self))"
                )
        self._int8_calibrator = calibrator

    @property
    def algorithm_selector(self) -> Any:
        return None

    def set_calibration_profile(self, profile: Any) -> bool:
        if profile is not None and not profile._valid():
            return False
        self._calibration_profile = profile
        return True

    def get_calibration_profile(self) -> Any:
        return self._calibration_profile  # type: ignore[attr-defined]

    @property
    def quantization_flags(self) -> int:
        return self._quantization_flags  # type: ignore[attr-defined]

    @quantization_flags.setter
    def quantization_flags(self, value: int) -> None:
        self._quantization_flags = int(value)

    def set_quantization_flag(self, flag: Any) -> None:
        self._quantization_flags |= 1 << int(flag)

    def clear_quantization_flag(self, flag: Any) -> None:
        self._quantization_flags &= ~(1 << int(flag))

    def get_quantization_flag(self, flag: Any) -> bool:
        return bool(self._quantization_flags & (1 << int(flag)))  # type: ignore[attr-defined]


# ---- INT8 calibrators (TensorRT 10 only) -------------------------------------------------


class IInt8Calibrator:
    """[DEPRECATED in TensorRT 10.1] Application-implemented calibrator. Subclasses must call
    the base ``__init__`` and implement ``get_batch_size``, ``get_batch``,
    ``read_calibration_cache`` and ``write_calibration_cache``."""

    def __init__(self) -> None:
        self._trt_base_initialised = True

    def get_batch_size(self) -> int:
        raise RuntimeError('Tried to call pure virtual function "IInt8Calibrator::getBatchSize"')

    def get_algorithm(self) -> CalibrationAlgoType:
        raise RuntimeError('Tried to call pure virtual function "IInt8Calibrator::getAlgorithm"')

    def get_batch(self, names: list[str]) -> list[int] | None:
        return []

    def read_calibration_cache(self) -> Any:
        return None

    def write_calibration_cache(self, cache: Any) -> None:
        return None


class IInt8EntropyCalibrator(IInt8Calibrator):
    def get_algorithm(self) -> CalibrationAlgoType:
        return CalibrationAlgoType.ENTROPY_CALIBRATION


class IInt8EntropyCalibrator2(IInt8Calibrator):
    def get_algorithm(self) -> CalibrationAlgoType:
        return CalibrationAlgoType.ENTROPY_CALIBRATION_2


class IInt8MinMaxCalibrator(IInt8Calibrator):
    def get_algorithm(self) -> CalibrationAlgoType:
        return CalibrationAlgoType.MINMAX_CALIBRATION


def _parse_calibration_cache(data: bytes) -> tuple[str, dict[str, float]] | None:
    try:
        lines = data.decode("ascii").splitlines()
        header = lines[0]
        if not header.startswith("TRT-"):
            return None
        scales = {}
        for line in lines[1:]:
            if not line.strip():
                continue
            name, hexval = line.rsplit(":", 1)
            scales[name.strip()] = struct.unpack(">f", bytes.fromhex(hexval.strip()))[0]
        return header, scales
    except (UnicodeDecodeError, IndexError, ValueError, struct.error):
        return None


# ---- Builder ------------------------------------------------------------------------------


class _Builder(_ContextManager):
    _lib: _Lib

    def __init__(self, logger: Any) -> None:
        self._logger = _check_logger(logger, "Builder")
        self.logger = logger
        self.max_threads = os.cpu_count() or 1
        self.error_recorder = None
        self.gpu_allocator = None

    @property
    def num_DLA_cores(self) -> int:
        return 0

    @property
    def max_DLA_batch_size(self) -> int:
        return 1

    def create_network(self, flags: int = 0) -> Any:
        return self._lib.INetworkDefinition(self, _as_int(flags, "create_network"))

    def create_builder_config(self) -> Any:
        return self._lib.IBuilderConfig(self)

    def create_optimization_profile(self) -> Any:
        return self._lib.IOptimizationProfile()

    def is_network_supported(self, network: Any, config: Any) -> bool:
        return network._graph is not None

    def reset(self) -> None:
        pass

    def build_engine_with_config(self, network: Any, config: Any) -> Any:
        plan = self.build_serialized_network(network, config)
        if plan is None:
            return None
        return self._lib.Runtime(self._logger).deserialize_cuda_engine(plan)

    # -- the build -------------------------------------------------------------------------
    def _error(self, msg: str) -> None:
        _log(self._logger, Severity.ERROR, msg)

    def build_serialized_network(self, network: Any, config: Any) -> Any:
        lib = self._lib
        if not isinstance(network, lib.INetworkDefinition) or not isinstance(
            config, lib.IBuilderConfig
        ):
            raise TypeError(
                "build_serialized_network(): incompatible function arguments (network: "
                "tensorrt.INetworkDefinition, config: tensorrt.IBuilderConfig)"
            )
        graph = network._graph
        if graph is None or network.num_outputs == 0:
            self._error(
                "IBuilder::buildSerializedNetwork: Error Code 4: API Usage Error (Network must "
                "have at least one output)"
            )
            return None
        strong = network._strongly_typed
        if lib.major == 10 and strong:
            bad = [f for f in _PRECISION_FLAGS if config._has(f)]
            if bad:
                self._error(
                    "IBuilder::buildSerializedNetwork: Error Code 4: API Usage Error "
                    "(BuilderFlag::k"
                    + ", BuilderFlag::k".join(bad)
                    + " cannot be set for a strongly typed network: precisions come from the "
                    "network's types)"
                )
                return None

        profiles = self._check_profiles(network, config)
        if profiles is None:
            return None
        _log(
            self._logger,
            Severity.INFO,
            f"Detected {network.num_inputs} inputs and {network.num_outputs} output network "
            "tensors.",
        )
        if config._has("TF32") and lib.cc < (8, 0):
            _log(
                self._logger,
                Severity.INFO,
                "BuilderFlag::kTF32 is set but hardware does not support TF32. Disabling TF32.",
            )

        fp16 = lib.major == 10 and not strong and config._has("FP16")
        int8 = lib.major == 10 and not strong and config._has("INT8")
        calibration: dict[str, Any] | None = None
        if int8:
            if graph.has_qdq:
                if config._int8_calibrator is not None:
                    _log(
                        self._logger,
                        Severity.WARNING,
                        "Calibrator won't be used in explicit precision mode. Use quantization "
                        "aware training to generate network with Quantize/Dequantize nodes.",
                    )
            elif config._int8_calibrator is None:
                _log(
                    self._logger,
                    Severity.WARNING,
                    "Calibrator is not being used. Users must provide dynamic range for all "
                    "tensors that are not Int32 or Bool.",
                )
            else:
                calibration = self._calibrate(network, config, profiles)
                if calibration is None:
                    return None
        layers = graph.plan_layers(strong=strong, fp16=fp16, int8_implicit=calibration is not None)

        cache = config._timing_cache
        if cache is None:
            _log(
                self._logger,
                Severity.INFO,
                "Local timing cache in use. Profiling results in this builder pass will not be "
                "stored.",
            )
        elif not config._has("DISABLE_TIMING_CACHE"):
            for layer in layers:
                sig = json.dumps(
                    [
                        lib.cc,
                        layer["op"],
                        layer["precision"],
                        layer["inputs"],
                        layer["outputs"],
                        layer["weights"],
                    ],
                    sort_keys=True,
                )
                key = hashlib.sha1(sig.encode()).hexdigest()[:32]
                cache._entries.setdefault(key, hashlib.sha1(key.encode()).hexdigest()[:16])

        header = {
            "trt_version": lib.version,
            "compute_capability": list(lib.cc),
            "hardware_compatibility_level": int(config.hardware_compatibility_level),
            "version_compatible": config._has("VERSION_COMPATIBLE"),
            "exclude_lean_runtime": config._has("EXCLUDE_LEAN_RUNTIME"),
            "strongly_typed": strong,
            "builder_flags": config.flags,
            "profiling_verbosity": int(config.profiling_verbosity),
            "workspace": config.get_memory_pool_limit(MemoryPoolType.WORKSPACE),
            "name": network.name,
            "io": [
                {"name": n, "mode": "input", "dtype": int(d), "shape": list(s)}
                for n, d, s in graph.inputs
            ]
            + [
                {"name": n, "mode": "output", "dtype": int(d), "shape": list(s)}
                for n, d, s in graph.outputs
            ],
            "profiles": [
                {n: [list(mn), list(op), list(mx)] for n, (mn, op, mx) in p.items()}
                for p in profiles
            ],
            "layers": layers,
            "calibration": calibration,
        }
        head = json.dumps(header, sort_keys=True).encode()
        blob = _ENGINE_MAGIC + struct.pack("<Q", len(head)) + head + graph.model_bytes
        return lib.IHostMemory(blob)

    def _check_profiles(
        self, network: Any, config: Any
    ) -> list[dict[str, tuple[Dims, Dims, Dims]]] | None:
        inputs = {t.name: t for t in network._inputs}
        dynamic = [t.name for t in network._inputs if any(d < 0 for d in t.shape)]
        if not config._profiles:
            if dynamic:
                self._error(
                    "IBuilder::buildSerializedNetwork: Error Code 4: API Usage Error (Network "
                    "has dynamic or shape inputs, but no optimization profile has been "
                    "defined.)"
                )
                return None
            return [{n: (t.shape, t.shape, t.shape) for n, t in inputs.items()}]
        out = []
        for index, profile in enumerate(config._profiles):
            resolved: dict[str, tuple[Dims, Dims, Dims]] = {}
            for name, entry in profile._shapes.items():
                if name not in inputs:
                    self._error(
                        "IBuilder::buildSerializedNetwork: Error Code 4: API Usage Error "
                        f"(Optimization profile {index} sets dimensions for '{name}', which is "
                        "not a network input)"
                    )
                    return None
                if any(d is None for d in entry):
                    self._error(
                        "IBuilder::buildSerializedNetwork: Error Code 4: API Usage Error "
                        f"(Optimization profile {index} is incomplete for input '{name}')"
                    )
                    return None
                mn, op, mx = entry
                declared = inputs[name].shape
                if len(mn) != len(declared):
                    self._error(
                        "IBuilder::buildSerializedNetwork: Error Code 4: API Usage Error "
                        f"({name}: optimization profile {index} has {len(mn)} dimensions, the "
                        f"network input has {len(declared)})"
                    )
                    return None
                for axis, d in enumerate(declared):
                    if d >= 0 and not (mn[axis] == op[axis] == mx[axis] == d):
                        self._error(
                            "IBuilder::buildSerializedNetwork: Error Code 4: API Usage Error "
                            f"({name}: for dimension number {axis} in profile {index} "
                            f"does not match network definition (got min={mn[axis]}, "
                            f"opt={op[axis]}, max={mx[axis]}), expected min=opt=max={d}).)"
                        )
                        return None
                resolved[name] = (mn, op, mx)
            for name in dynamic:
                if name not in resolved:
                    self._error(
                        "IBuilder::buildSerializedNetwork: Error Code 4: API Usage Error "
                        f"(Optimization profile {index} does not define dimensions for dynamic "
                        f"input '{name}')"
                    )
                    return None
            for name, t in inputs.items():
                resolved.setdefault(name, (t.shape, t.shape, t.shape))
            out.append(resolved)
        return out

    def _calibrate(
        self, network: Any, config: Any, profiles: list[dict[str, Any]]
    ) -> dict[str, Any] | None:
        cal = config._int8_calibrator
        algo = CalibrationAlgoType(int(cal.get_algorithm()))
        header = f"TRT-{_version_int(self._lib.version)}-{_CALIB_NAMES[algo]}"
        raw = cal.read_calibration_cache()
        if raw is not None:
            data = _buffer_bytes(raw, "read_calibration_cache() result")
            if data:
                parsed = _parse_calibration_cache(data)
                if parsed is not None and parsed[0] == header:
                    return {"header": header, "scales": parsed[1], "batches": 0, "from_cache": True}
                _log(
                    self._logger,
                    Severity.WARNING,
                    "Calibration table does not match calibrator algorithm type or TensorRT "
                    "version; recalibrating.",
                )

        batch_size = cal.get_batch_size()
        _as_int(batch_size, "get_batch_size() result")
        if config._calibration_profile is not None:
            shapes = {n: e[1] for n, e in config._calibration_profile._shapes.items()}
            for t in network._inputs:
                shapes.setdefault(t.name, t.shape)
        else:
            if any(any(d < 0 for d in t.shape) for t in network._inputs):
                _log(
                    self._logger,
                    Severity.WARNING,
                    "Calibration Profile is not defined. Calibrating with Profile 0",
                )
            shapes = {n: e[1] for n, e in profiles[0].items()}
        names = [t.name for t in network._inputs]
        dtypes = {t.name: t.dtype for t in network._inputs}
        runner = _OrtRunner(network._graph.model_bytes)
        amax: dict[str, float] = {}
        batches = 0
        while True:
            result = cal.get_batch(names)
            if result is None or len(result) == 0:
                break
            if len(result) != len(names):
                self._error(
                    f"Calibration failure: get_batch() returned {len(result)} pointers for "
                    f"{len(names)} inputs {names}"
                )
                return None
            feeds = {}
            for name, ptr in zip(names, result, strict=True):
                if isinstance(ptr, (float, str, bytes)):
                    raise TypeError("get_batch() must return a list of int device pointers")
                shape, dt = tuple(shapes[name]), dtypes[name]
                nbytes = _nbytes(dt, shape)
                view = _dev.device_view(int(ptr), nbytes)
                if view is None:
                    self._error(
                        f"Calibration failure: get_batch() pointer {int(ptr):#x} for '{name}' "
                        f"is not a device allocation of at least {nbytes} bytes (shape {shape})"
                    )
                    return None
                racing = _dev.pending_write(int(ptr), nbytes)
                if racing is not None:  # TensorRT reads the batch on a stream of its own
                    self._error(
                        f"Calibration failure: get_batch() returned {int(ptr):#x} for '{name}' "
                        f"while {racing} still writes it (the batch must be on the device "
                        "when get_batch() returns)"
                    )
                    return None
                feeds[name] = view.copy().view(nptype(dt)).reshape(shape)
            batches += 1
            for name, arr in feeds.items():
                amax[name] = max(
                    amax.get(name, 0.0), float(np.abs(arr.astype(np.float64)).max(initial=0.0))
                )
            try:
                for name, arr in runner.run(feeds).items():
                    amax[name] = max(
                        amax.get(name, 0.0), float(np.abs(arr.astype(np.float64)).max(initial=0.0))
                    )
            except Exception as exc:
                _log(
                    self._logger,
                    Severity.WARNING,
                    f"Calibration could not run the network on a batch ({exc}); only input "
                    "ranges are recorded",
                )
        if batches == 0:
            self._error(
                "Calibration failure occurred with no scaling factors detected. This could be "
                "due to no int8 calibrator or insufficient custom scales for network layers."
            )
            return None
        scales = {name: (a / 127.0 if a > 0 else 1.0 / 127.0) for name, a in amax.items()}
        text = (
            header
            + "\n"
            + "".join(f"{n}: {struct.pack('>f', s).hex()}\n" for n, s in scales.items())
        )
        cal.write_calibration_cache(memoryview(text.encode("ascii")).toreadonly())
        return {
            "header": header,
            "scales": scales,
            "batches": batches,
            "from_cache": False,
            "batch_size": int(batch_size),
        }


class _BuilderV10:
    @property
    def platform_has_tf32(self) -> bool:
        return self._lib.cc >= (8, 0)  # type: ignore[attr-defined]

    @property
    def platform_has_fast_fp16(self) -> bool:
        return self._lib.cc >= (5, 3) and self._lib.cc != (6, 1)  # type: ignore[attr-defined]

    @property
    def platform_has_fast_int8(self) -> bool:
        return self._lib.cc >= (6, 1)  # type: ignore[attr-defined]


# ---- Runtime, engine, context, inspector -------------------------------------------------------


class _Runtime(_ContextManager):
    _lib: _Lib

    def __init__(self, logger: Any) -> None:
        self._logger = _check_logger(logger, "Runtime")
        self.logger = logger
        self.engine_host_code_allowed = False
        self.max_threads = 1
        self.DLA_core = 0
        self.error_recorder = None
        self.gpu_allocator = None

    @property
    def num_DLA_cores(self) -> int:
        return 0

    def _error(self, msg: str) -> None:
        _log(self._logger, Severity.ERROR, msg)

    def deserialize_cuda_engine(self, serialized_engine: Any) -> Any:
        lib = self._lib
        data = _buffer_bytes(serialized_engine, "deserialize_cuda_engine")
        try:
            if not data.startswith(_ENGINE_MAGIC):
                raise ValueError
            n = struct.unpack_from("<Q", data, len(_ENGINE_MAGIC))[0]
            start = len(_ENGINE_MAGIC) + 8
            header = json.loads(data[start : start + n].decode())
            model_bytes = data[start + n :]
        except (ValueError, struct.error, UnicodeDecodeError):
            self._error(
                "IRuntime::deserializeCudaEngine: Error Code 1: Serialization (Serialization "
                "assertion magicTagRead == kMAGIC_TAG failed.Magic tag does not match)"
            )
            return None
        built = header["trt_version"]
        if built != lib.version:
            newer_ok = header.get("version_compatible") and _version_tuple(built) <= _version_tuple(
                lib.version
            )
            if not newer_ok:
                self._error(
                    "IRuntime::deserializeCudaEngine: Error Code 1: Serialization "
                    "(Serialization assertion stdVersionRead == kSERIALIZATION_VERSION failed."
                    "Version tag does not match. Note: Current Version: "
                    f"{_version_int(lib.version)}, Serialized Engine Version: "
                    f"{_version_int(built)})"
                )
                return None
            if not header.get("exclude_lean_runtime") and not self.engine_host_code_allowed:
                self._error(
                    "IRuntime::deserializeCudaEngine: Error Code 1: Serialization (the engine "
                    "is version compatible and embeds host code; set "
                    "Runtime.engine_host_code_allowed = True to deserialize it)"
                )
                return None
        cc = tuple(header["compute_capability"])
        if cc != tuple(lib.cc):
            ampere_plus = header.get("hardware_compatibility_level") == int(
                HardwareCompatibilityLevel.AMPERE_PLUS
            )
            if not (ampere_plus and tuple(lib.cc) >= (8, 0)):
                self._error(
                    "IRuntime::deserializeCudaEngine: Error Code 4: Internal Error (The engine "
                    "plan file is generated on an incompatible device, "
                    f"expecting compute {lib.cc[0]}.{lib.cc[1]} got compute {cc[0]}.{cc[1]}, "
                    "please rebuild.)"
                )
                self._error(
                    "IRuntime::deserializeCudaEngine: Error Code 4: Internal Error (Engine "
                    "deserialization failed.)"
                )
                return None
        return lib.ICudaEngine(self, header, model_bytes, data)


class _ICudaEngine(_ContextManager):
    _lib: _Lib

    def __init__(
        self, runtime: Any, header: dict[str, Any], model_bytes: bytes, plan: bytes
    ) -> None:
        self._runtime = runtime
        self._logger = runtime._logger
        self._header = header
        self._plan = plan
        self._io = [
            (t["name"], t["mode"], DataType(t["dtype"]), Dims(t["shape"])) for t in header["io"]
        ]
        self._io_by_name = {t[0]: t for t in self._io}
        self._profiles = [
            {n: tuple(Dims(s) for s in v) for n, v in p.items()} for p in header["profiles"]
        ]
        self._runner = _OrtRunner(model_bytes)
        self.name = header.get("name", "")
        self._device = _dev.active().current_device()  # an engine lives on the current device

    def _error(self, msg: str) -> None:
        _log(self._logger, Severity.ERROR, msg)

    @property
    def num_io_tensors(self) -> int:
        return len(self._io)

    @property
    def num_layers(self) -> int:
        return len(self._header["layers"])

    @property
    def num_optimization_profiles(self) -> int:
        return len(self._profiles)

    @property
    def max_workspace_size(self) -> int:
        return self._header["workspace"]

    @property
    def device_memory_size_v2(self) -> int:
        return 256 * (1 + len(self._runner._model_bytes) // 256)

    def get_device_memory_size_for_profile_v2(self, profile_index: int) -> int:
        return self.device_memory_size_v2

    @property
    def refittable(self) -> bool:
        return False

    @property
    def engine_capability(self) -> EngineCapability:
        return EngineCapability.STANDARD

    @property
    def hardware_compatibility_level(self) -> HardwareCompatibilityLevel:
        return HardwareCompatibilityLevel(self._header["hardware_compatibility_level"])

    @property
    def streamable_weights_size(self) -> int:
        return 0

    def get_tensor_name(self, index: int) -> str | None:
        if not 0 <= index < len(self._io):
            self._error(
                f"ICudaEngine::getIOTensorName: Error Code 3: API Usage Error (index {index} "
                f"out of range [0, {len(self._io)}))"
            )
            return None
        return self._io[index][0]

    def _lookup(self, name: str, api: str) -> tuple[str, str, DataType, Dims] | None:
        entry = self._io_by_name.get(name)
        if entry is None:
            self._error(
                f"ICudaEngine::{api}: Error Code 3: API Usage Error (Parameter check failed, "
                f"condition: tensor '{name}' is not an I/O tensor of the engine)"
            )
        return entry

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        entry = self._io_by_name.get(name)
        if entry is None:
            return TensorIOMode.NONE
        return TensorIOMode.INPUT if entry[1] == "input" else TensorIOMode.OUTPUT

    def get_tensor_shape(self, name: str) -> Dims:
        entry = self._lookup(name, "getTensorShape")
        return entry[3] if entry else Dims(())

    def get_tensor_dtype(self, name: str) -> DataType:
        entry = self._lookup(name, "getTensorDataType")
        return entry[2] if entry else DataType.FLOAT

    def get_tensor_location(self, name: str) -> TensorLocation:
        return TensorLocation.DEVICE

    def is_shape_inference_io(self, name: str) -> bool:
        return False

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[Dims]:
        entry = self._lookup(name, "getProfileShape")
        if entry is None or entry[1] != "input" or not 0 <= profile_index < len(self._profiles):
            if entry is not None:
                self._error(
                    "ICudaEngine::getProfileShape: Error Code 3: API Usage Error (no profile "
                    f"shapes for '{name}' in profile {profile_index})"
                )
            return []
        return list(self._profiles[profile_index][name])

    def create_execution_context(
        self, strategy: Any = ExecutionContextAllocationStrategy.STATIC
    ) -> Any:
        return self._lib.IExecutionContext(self)

    def create_engine_inspector(self) -> Any:
        return self._lib.EngineInspector(self)

    def serialize(self) -> Any:
        return self._lib.IHostMemory(self._plan)


class _EngineV10:
    @property
    def device_memory_size(self) -> int:
        return self.device_memory_size_v2  # type: ignore[attr-defined]

    def get_device_memory_size_for_profile(self, profile_index: int) -> int:
        return self.device_memory_size_v2  # type: ignore[attr-defined]

    @property
    def has_implicit_batch_dimension(self) -> bool:
        return False


class _IExecutionContext(_ContextManager):
    _lib: _Lib

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self._shapes: dict[str, Dims] = {}
        self._addresses: dict[str, int] = {}
        self._profile = 0
        self.name = ""
        self.debug_sync = False

    engine = property(lambda self: self._engine)

    def _error(self, msg: str) -> None:
        self._engine._error(msg)

    @property
    def active_optimization_profile(self) -> int:
        return self._profile

    def set_optimization_profile_async(self, profile_index: int, stream_handle: int) -> bool:
        _as_int(stream_handle, "set_optimization_profile_async")
        if not 0 <= profile_index < self._engine.num_optimization_profiles:
            self._error(
                "IExecutionContext::setOptimizationProfileAsync: Error Code 3: API Usage Error "
                f"(profile index {profile_index} out of range)"
            )
            return False
        self._profile = profile_index
        self._shapes.clear()
        return True

    def _inputs(self) -> list[tuple[str, str, DataType, Dims]]:
        return [t for t in self._engine._io if t[1] == "input"]

    def set_input_shape(self, name: str, shape: Any) -> bool:
        dims = _to_dims(shape)
        entry = self._engine._io_by_name.get(name)
        if entry is None or entry[1] != "input":
            self._error(
                "IExecutionContext::setInputShape: Error Code 3: API Usage Error (Parameter "
                f"check failed, condition: '{name}' is not an input tensor)"
            )
            return False
        mn, _, mx = self._engine._profiles[self._profile][name]
        declared = entry[3]
        if len(dims) != len(declared):
            self._error(
                "IExecutionContext::setInputShape: Error Code 3: API Usage Error (Parameter "
                f"check failed, condition: engineDims.nbDims == dimensions.nbDims. {name}: "
                f"expected {len(declared)} dimensions, got {len(dims)})"
            )
            return False
        for axis, (d, lo, hi) in enumerate(zip(dims, mn, mx, strict=True)):
            if not lo <= d <= hi:
                self._error(
                    "IExecutionContext::setInputShape: Error Code 3: API Usage Error "
                    "(Parameter check failed, condition: satisfyProfile. "
                    f"Set dimension [{', '.join(map(str, dims))}] for tensor {name} does not "
                    "satisfy any optimization profiles. "
                    f"Dimension {axis} must be in [{lo}, {hi}] for profile {self._profile})"
                )
                return False
        self._shapes[name] = dims
        return True

    def _input_shape(self, name: str) -> Dims | None:
        if name in self._shapes:
            return self._shapes[name]
        declared = self._engine._io_by_name[name][3]
        return declared if all(d >= 0 for d in declared) else None

    def _missing_inputs(self) -> list[str]:
        return [n for n, _, _, _ in self._inputs() if self._input_shape(n) is None]

    @property
    def all_binding_shapes_specified(self) -> bool:
        return not self._missing_inputs()

    @property
    def all_shape_inputs_specified(self) -> bool:
        return True

    def infer_shapes(self) -> list[str]:
        return self._missing_inputs()

    def _concrete(self) -> dict[str, tuple[int, ...]] | None:
        if self._missing_inputs():
            return None
        shapes = {n: tuple(self._input_shape(n) or ()) for n, _, _, _ in self._inputs()}
        types_ = {n: dt for n, _, dt, _ in self._inputs()}
        return self._engine._runner.concrete_shapes(shapes, types_)

    def get_tensor_shape(self, name: str) -> Dims:
        entry = self._engine._lookup(name, "getTensorShape")
        if entry is None:
            return Dims(())
        if entry[1] == "input":
            return self._input_shape(name) or entry[3]
        if all(d >= 0 for d in entry[3]):
            return entry[3]
        concrete = self._concrete()
        if concrete is None or name not in concrete:
            return entry[3]
        return Dims(concrete[name])

    def set_tensor_address(self, name: str, memory: Any) -> bool:
        ptr = _as_address(memory, "set_tensor_address")
        if name not in self._engine._io_by_name:
            self._error(
                "IExecutionContext::setTensorAddress: Error Code 3: API Usage Error (Parameter "
                f"check failed, condition: '{name}' is not an input or output tensor)"
            )
            return False
        self._addresses[name] = ptr
        return True

    def get_tensor_address(self, name: str) -> int:
        return self._addresses.get(name, 0)

    def set_input_consumed_event(self, event: int) -> bool:
        return True

    def execute_v2(self, bindings: list[Any]) -> bool:
        io = self._engine._io
        if len(bindings) != len(io):
            self._error(
                "IExecutionContext::executeV2: Error Code 3: API Usage Error (expected "
                f"{len(io)} bindings, got {len(bindings)})"
            )
            return False
        for (name, _, _, _), ptr in zip(io, bindings, strict=True):
            self._addresses[name] = _as_address(ptr, "execute_v2")
        # synchronous: on the legacy default stream, and complete before it returns
        stream = _dev.stream_record(0)
        assert stream is not None
        if not self._enqueue(stream, "executeV2"):
            return False
        try:
            _dev.synchronize(stream)
        except _dev.DeviceFault:
            return False  # the error was logged when the run failed
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        handle = _as_int(stream_handle, "execute_async_v3")
        stream = _dev.stream_record(handle) if _dev.is_stream_handle(handle) else None
        if stream is None:
            self._error(
                "IExecutionContext::enqueueV3: Error Code 1: Cuda Runtime (invalid resource "
                f"handle: {handle:#x} is not a live CUDA stream)"
            )
            return False
        if handle == 0:
            _log(
                self._engine._logger,
                Severity.WARNING,
                "Using default stream in enqueueV3() may lead to performance issues due to "
                "additional calls to cudaStreamSynchronize() by TensorRT to ensure correct "
                "synchronization. Please use non-default stream instead.",
            )
        return self._enqueue(stream, "enqueueV3")

    def _check_device(self, stream: Any, api: str) -> bool:
        """The engine runs on the device it was deserialised on: that device must be current,
        and the stream and every tensor address must belong to it."""
        want = self._engine._device
        current = _dev.active().current_device()
        if current != want or stream.device != want:
            self._error(
                f"IExecutionContext::{api}: Error Code 1: Cuda Runtime (invalid resource handle: "
                f"the engine was deserialised on device {want}; the current device is {current} "
                f"and the stream belongs to device {stream.device})"
            )
            return False
        for name, ptr in self._addresses.items():
            where = _dev.device_of(ptr)
            if where is not None and where != want:
                self._error(
                    f"IExecutionContext::{api}: Error Code 1: Cuda Runtime (an illegal memory "
                    f"access was encountered: '{name}' at {ptr:#x} is memory of device {where}, "
                    f"the engine runs on device {want})"
                )
                return False
        return True

    def _check_addresses(self, api: str) -> dict[str, tuple[int, int, Dims | None]] | None:
        """Each I/O tensor's address, byte count and (inputs) shape, or None (error logged)."""
        missing = self._missing_inputs()
        if missing:
            self._error(
                f"IExecutionContext::{api}: Error Code 3: API Usage Error (Parameter check "
                "failed, condition: mContext.validateInputShapes(). Not all shapes are "
                "specified. Following input tensors' dimensions are not specified: "
                f"{', '.join(missing)}.)"
            )
            return None
        plan: dict[str, tuple[int, int, Dims | None]] = {}
        for name, mode, dt, _ in self._engine._io:
            ptr = self._addresses.get(name)
            kind = "input" if mode == "input" else "output"
            if not ptr:
                self._error(
                    f"IExecutionContext::{api}: Error Code 3: API Usage Error (Parameter "
                    f"check failed, condition: address is set. Address is not set for {kind} "
                    f"tensor {name}. Call setInputTensorAddress() or setTensorAddress() before "
                    "enqueue/execute.)"
                )
                return None
            shape = self._input_shape(name) if mode == "input" else self.get_tensor_shape(name)
            known = shape is not None and all(d >= 0 for d in shape)
            nbytes = _nbytes(dt, tuple(shape)) if known else 0  # type: ignore[arg-type]
            if _dev.device_view(ptr, nbytes) is None:
                self._error(
                    f"IExecutionContext::{api}: Error Code 1: Cuda Runtime (an illegal memory "
                    f"access was encountered: {kind} '{name}' needs {nbytes} bytes at "
                    f"{ptr:#x}, which is not inside a live device allocation)"
                )
                return None
            plan[name] = (ptr, nbytes, Dims(shape) if mode == "input" else None)
        return plan

    def _enqueue(self, stream: Any, api: str) -> bool:
        """Check what real TensorRT checks when work is enqueued, then queue the run on
        ``stream``: it reads the inputs and writes the outputs when the stream gets there."""
        plan = self._check_addresses(api)
        if plan is None or not self._check_device(stream, api):
            return False
        outputs = [(plan[n][0], plan[n][1]) for n, m, _, _ in self._engine._io if m != "input"]
        _dev.enqueue(
            stream,
            lambda: self._run(plan, stream, api),
            f"{api} of {self._engine.name or 'an engine'}",
            writes=outputs,
        )
        return True

    def _run(self, plan: dict[str, tuple[int, int, Dims | None]], stream: Any, api: str) -> None:
        """The queued run: inputs from device memory, the embedded ONNX, outputs back."""
        feeds = {}
        for name, mode, dt, _ in self._engine._io:
            if mode != "input":
                continue
            ptr, nbytes, shape = plan[name]
            racing = _dev.pending_write(ptr, nbytes, other_than=stream)
            if racing is not None:
                self._fail(
                    f"{api}: input '{name}' at {ptr:#x} is still being written by {racing}: "
                    "nothing orders that stream before this one (a race on a real GPU)"
                )
            view = _dev.device_view(ptr, nbytes)
            if view is None:
                self._fail(f"{api}: input '{name}' at {ptr:#x} was freed before the engine ran")
            feeds[name] = view.copy().view(nptype(dt)).reshape(tuple(shape))  # type: ignore[union-attr,arg-type]
        try:
            results = self._engine._runner.run(feeds)
        except Exception as exc:
            self._fail(f"{api}: execution failed: {exc}")
        for name, mode, dt, _ in self._engine._io:
            if mode == "input":
                continue
            arr = np.ascontiguousarray(results[name], dtype=nptype(dt))
            view = _dev.device_view(plan[name][0], arr.nbytes)
            if view is None:
                self._fail(
                    f"{api}: output '{name}' needs {arr.nbytes} bytes at {plan[name][0]:#x}, "
                    "which is not inside a live device allocation"
                )
            view[:] = arr.reshape(-1).view(np.uint8)  # type: ignore[index]

    def _fail(self, msg: str) -> None:
        """A failure of queued work: logged, and raised at the next synchronisation."""
        self._error(f"IExecutionContext: Error Code 1: Cuda Runtime ({msg})")
        raise _dev.DeviceFault(msg)


class _EngineInspector:
    _lib: _Lib

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self.execution_context: Any = None
        self.error_recorder = None

    def _layer_tensor(
        self, t: dict[str, Any], concrete: dict[str, tuple[int, ...]] | None
    ) -> dict[str, Any]:
        dt = DataType(t["dtype"])
        shape = t["shape"]
        if concrete is not None and t["name"] in concrete:
            shape = list(concrete[t["name"]])
        out: dict[str, Any] = {
            "Name": t["name"],
            "Location": "Device",
            "Dimensions": shape if shape is not None else [],
        }
        if self._lib.major >= 11:
            if concrete is not None:
                out["Format"] = f"Row major linear {_DT_FORMAT[dt]} format (kLINEAR)"
            out["DataType"] = _DT_JSON[dt]
        else:
            out["Format/Datatype"] = (
                f"Row major linear {_DT_FORMAT[dt]} format"
                if concrete is not None
                else _DT_JSON[dt]
            )
        return out

    def _concrete(self) -> dict[str, tuple[int, ...]] | None:
        ctx = self.execution_context
        if ctx is None:
            return None
        return ctx._concrete()

    def _layer(self, layer: dict[str, Any], concrete: dict[str, tuple[int, ...]] | None) -> Any:
        verbosity = ProfilingVerbosity(self._engine._header["profiling_verbosity"])
        if verbosity != ProfilingVerbosity.DETAILED:
            return layer["name"]
        prec = DataType(layer["precision"])
        code = {DataType.INT8: "i8i8_i8i32_f32", DataType.HALF: "f16f16_f16f16_f16"}.get(
            prec, "f32f32_f32f32_f32"
        )
        cc = self._lib.cc
        info: dict[str, Any] = {
            "Name": layer["name"],
            "LayerType": layer["layer_type"],
            "Inputs": [self._layer_tensor(t, concrete) for t in layer["inputs"]],
            "Outputs": [self._layer_tensor(t, concrete) for t in layer["outputs"]],
            "ParameterType": layer["parameter_type"],
        }
        if layer["weights"]:
            info["Weights"] = {
                "Type": _DT_JSON[DataType(layer["weights"]["dtype"])],
                "Count": layer["weights"]["count"],
            }
        if layer["bias"]:
            info["Bias"] = {
                "Type": _DT_JSON[DataType(layer["bias"]["dtype"])],
                "Count": layer["bias"]["count"],
            }
        info["TacticName"] = f"sm{cc[0]}{cc[1]}_xmma_{layer['layer_type'].lower()}_{code}"
        info["TacticValue"] = "0x" + hashlib.sha1(layer["name"].encode()).hexdigest()[:16]
        info["StreamId"] = 0
        info["Metadata"] = f"[ONNX Layer: {layer['onnx_name']}]"
        return info

    def _io_section(self, concrete: dict[str, tuple[int, ...]] | None) -> tuple[str, Any]:
        eng = self._engine
        if self._lib.major < 11:
            return "Bindings", [n for n, _, _, _ in eng._io]
        tensors = []
        for name, mode, dt, shape in eng._io:
            dims = (
                list(concrete[name]) if concrete is not None and name in concrete else list(shape)
            )
            fmt = f"Row major linear {_DT_FORMAT[dt]} format (kLINEAR)"
            profile_info = []
            for p in eng._profiles:
                if mode == "input":
                    mn, op, mx = p[name]
                    profile_info.append(
                        {
                            "MinShape": list(mn),
                            "OptShape": list(op),
                            "MaxShape": list(mx),
                            "Format": fmt,
                        }
                    )
                else:
                    profile_info.append({"Format": fmt})
            tensors.append(
                {
                    "Name": name,
                    "IOMode": "Input" if mode == "input" else "Output",
                    "DataType": _DT_JSON[dt],
                    "Dimensions": dims,
                    "Location": "Device",
                    "IsShapeInferenceIO": False,
                    "ProfileInfo": profile_info,
                }
            )
        return "I/O Tensors", tensors

    @staticmethod
    def _oneline(layer: Any) -> str:
        if isinstance(layer, str):
            return layer
        parts = []
        for k, v in layer.items():
            if isinstance(v, list):
                v = (
                    "["
                    + ", ".join(
                        "{ " + ", ".join(f"{a}: {b}" for a, b in t.items()) + " }" for t in v
                    )
                    + "]"
                )
            elif isinstance(v, dict):
                v = "{" + ", ".join(f"{a}: {b}" for a, b in v.items()) + "}"
            parts.append(f"{k}: {v}")
        return ", ".join(parts)

    def get_layer_information(self, layer_index: int, format: Any) -> str:
        layers = self._engine._header["layers"]
        verbosity = ProfilingVerbosity(self._engine._header["profiling_verbosity"])
        if not 0 <= layer_index < len(layers) or verbosity == ProfilingVerbosity.NONE:
            return ""
        layer = self._layer(layers[layer_index], self._concrete())
        if LayerInformationFormat(int(format)) == LayerInformationFormat.JSON:
            return json.dumps(layer)
        return self._oneline(layer)

    def get_engine_information(self, format: Any) -> str:
        verbosity = ProfilingVerbosity(self._engine._header["profiling_verbosity"])
        concrete = self._concrete()
        layers = (
            []
            if verbosity == ProfilingVerbosity.NONE
            else [self._layer(x, concrete) for x in self._engine._header["layers"]]
        )
        key, io = self._io_section(concrete)
        if LayerInformationFormat(int(format)) == LayerInformationFormat.JSON:
            return json.dumps({"Layers": layers, key: io}, indent=2)
        lines = [self._oneline(x) for x in layers]
        lines.append(f"{key}: " + json.dumps(io))
        return "\n".join(lines) + "\n"


def _init_libnvinfer_plugins(logger: Any, namespace: str) -> bool:
    _check_logger(logger, "init_libnvinfer_plugins")
    return True


# --------------------------------------------------------------------------------------------
# The module factory
# --------------------------------------------------------------------------------------------


def make_tensorrt(
    version: str = "10.3.0", *, compute_capability: tuple[int, int] = (8, 7)
) -> types.ModuleType:
    """A fresh fake ``tensorrt`` module for ``version`` (major 10 or 11) on a device with
    ``compute_capability``."""
    major = _version_tuple(version)[0]
    if major not in (10, 11):
        raise ValueError(f"the TensorRT double models major versions 10 and 11, not {version!r}")
    lib = _Lib(version, (int(compute_capability[0]), int(compute_capability[1])))
    mod = types.ModuleType(
        "tensorrt", f"Test double of TensorRT {version} (tests/fakes/tensorrt.py); not TensorRT."
    )
    lib.mod = mod

    def cls(name: str, *bases: type) -> type:
        return type(name, bases, {"_lib": lib, "__module__": "tensorrt", "__qualname__": name})

    flags = {k: v for k, v in _BUILDER_FLAGS_10.items() if major == 10 or k not in _REMOVED_IN_11}
    ndcf = _NDCF_10 if major == 10 else _NDCF_11

    v10 = major == 10
    attrs: dict[str, Any] = {
        "__version__": version,
        "Dims": Dims,
        "DataType": DataType,
        "TensorIOMode": TensorIOMode,
        "TensorLocation": TensorLocation,
        "MemoryPoolType": MemoryPoolType,
        "ProfilingVerbosity": ProfilingVerbosity,
        "LayerInformationFormat": LayerInformationFormat,
        "HardwareCompatibilityLevel": HardwareCompatibilityLevel,
        "ExecutionContextAllocationStrategy": ExecutionContextAllocationStrategy,
        "EngineCapability": EngineCapability,
        "DeviceType": DeviceType,
        "ErrorCode": ErrorCode,
        "OnnxParserFlag": OnnxParserFlag,
        "BuilderFlag": _enum("BuilderFlag", flags),
        "NetworkDefinitionCreationFlag": _enum("NetworkDefinitionCreationFlag", ndcf),
        "ILogger": ILogger,
        "Logger": Logger,
        "nptype": nptype,
        "volume": volume,
        "init_libnvinfer_plugins": _init_libnvinfer_plugins,
        "IHostMemory": cls("IHostMemory", _IHostMemory),
        "ITensor": cls("ITensor", _ITensor),
        "ILayer": cls("ILayer", _ILayer),
        "INetworkDefinition": cls(
            "INetworkDefinition", _INetworkDefinition, *((_NetworkV10,) if v10 else ())
        ),
        "ParserError": cls("ParserError", _ParserError),
        "OnnxParser": cls("OnnxParser", _OnnxParser),
        "IOptimizationProfile": cls("IOptimizationProfile", _IOptimizationProfile),
        "ITimingCache": cls("ITimingCache", _ITimingCache),
        "IBuilderConfig": cls(
            "IBuilderConfig", _IBuilderConfig, *((_BuilderConfigV10,) if v10 else ())
        ),
        "Builder": cls("Builder", _Builder, *((_BuilderV10,) if v10 else ())),
        "Runtime": cls("Runtime", _Runtime),
        "ICudaEngine": cls("ICudaEngine", _ICudaEngine, *((_EngineV10,) if v10 else ())),
        "IExecutionContext": cls("IExecutionContext", _IExecutionContext),
        "EngineInspector": cls("EngineInspector", _EngineInspector),
    }
    if v10:
        attrs.update(
            {
                "IInt8Calibrator": IInt8Calibrator,
                "IInt8EntropyCalibrator": IInt8EntropyCalibrator,
                "IInt8EntropyCalibrator2": IInt8EntropyCalibrator2,
                "IInt8MinMaxCalibrator": IInt8MinMaxCalibrator,
                "CalibrationAlgoType": CalibrationAlgoType,
                "QuantizationFlag": QuantizationFlag,
            }
        )
    for name, value in attrs.items():
        setattr(mod, name, value)
    mod.__all__ = sorted(k for k in attrs if not k.startswith("_"))  # type: ignore[attr-defined]
    return mod

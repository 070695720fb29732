"""Explicit INT8: ONNX Runtime static quantisation to symmetric Q/DQ pairs, for TensorRT.

TensorRT 11 builds INT8 only from Q/DQ nodes in the ONNX graph (strongly typed networks), and
TensorRT 10 accepts the same graph, so the portable INT8 artifact is a Q/DQ ONNX file. It is
produced here in four steps:

1. **Pre-processing**: ``onnxruntime.quantization.shape_inference.quant_pre_process`` (shape
   inference and basic graph optimisation). Unnamed nodes are named first
   (``advedge_<op>_<index>``) so that they can be kept in FP32 by name.
2. **Calibration**: the FP32 model runs on a :class:`~advedge.calibration.sets.CalibrationSet`
   in batches, and each activation tensor gets a range ``[lo, hi]`` from ``entropy`` (the
   threshold that minimises the KL divergence between the FP32 and the quantised histogram),
   ``minmax`` (the observed extremes) or ``percentile`` (the 99.999th percentile of ``|x|``).
3. **Quantisation** (``quantize_static``, QDQ format): activations and weights are INT8 and
   **symmetric**, ``scale = max(|lo|, |hi|) / 127`` and zero point 0, because TensorRT rejects
   non-zero zero points. Weights are per output channel and stay FP32 behind a Q/DQ pair
   (``AddQDQPairToWeight``), biases stay FP32 (``QuantizeBias=False``): TensorRT's
   DequantizeLinear takes only INT8 input, so the INT32 biases ORT would otherwise write cannot
   be parsed. Nodes chosen by :func:`select_fp32_nodes` stay FP32. **Placement** (``tensorrt``
   target) as TensorRT's own tool, NVIDIA ModelOpt's ONNX PTQ, places it: Q/DQ on the inputs of
   Conv/Gemm/MatMul and on the residual input of a residual Add, never on an output, so none
   sits between a convolution and the bias, batch norm, ReLU/Clip or Add TensorRT fuses into it
   (rules: :func:`~advedge.calibration.nodes.trt_placement`; edge-by-edge check against
   ModelOpt: ``benchmarks/qdq_placement.py``). ORT's own placement, kept for the CPU target,
   adds a requantisation per layer (resnet8, resnet18, mobilenetv2: 29, 66, 150 pairs; 18, 40,
   104 now, as ModelOpt).
4. **Verification**: every QuantizeLinear/DequantizeLinear has an INT8 zero point equal to 0
   and an INT8 (never INT32) quantised input, and at least one Q/DQ pair exists; only then is
   the file written (atomically).

Calibration is the slow step, so its ranges are cached as JSON, keyed by the FP32 file's sha256,
the calibration set's content sha256, the method, the options that change ranges or placement,
and the ONNX Runtime version (see :func:`default_cache_dir` for where). A hit skips calibration and yields a
byte-identical model. A corrupt cache file is logged and recomputed, never fatal.

ONNX Runtime prints progress with ``print()``, logs with ANSI colours straight to stderr and lets
numpy warn; all of it runs under :func:`advedge.export._deps.quiet_onnxruntime`, which logs it
at debug instead, so ``--json`` output on stdout stays clean and an error on stderr stays one
line. Torch-free; ``onnx`` and ``onnxruntime`` are imported inside the functions.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import types
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from advedge.calibration.cache import (
    cache_file,
    default_cache_dir,
    ranges_usable,
    read_cache,
    write_cache,
)
from advedge.calibration.nodes import (
    TRT_QUANTIZED_OPS,
    TrtPlacement,
    count_quantize_nodes,
    name_unnamed_nodes,
    remove_input_qdq,
    select_fp32_nodes,
    trt_placement,
    verify_qdq,
)
from advedge.calibration.sets import CalibrationSet, check_fits, load_calibration_set
from advedge.export._deps import quiet_onnxruntime, require
from advedge.export.graph import (
    check_external_data,
    check_onnx,
    graph_input,
    set_onnx_metadata,
)

from advedge.errors import ExportError, UsageError, did_you_mean
from advedge.registry import Registry
from advedge.utils import atomic_path, sha256_file

logger = logging.getLogger(__name__)

__all__ = [
    "CALIBRATION_METHODS",
    "TARGETS",
    "CalibrationMethod",
    "QuantizeOptions",
    "QuantizeResult",
    "check_method",
    "check_target",
    "quantize_artifact",
    "quantize_qdq",
]


@dataclass(frozen=True)
class CalibrationMethod:
    """How ONNX Runtime runs one calibration method.

    Attributes:
        ort_name: Its member of ``onnxruntime.quantization.CalibrationMethod``.
        options: The options ONNX Runtime's calibrator uses (its defaults in onnxruntime 1.x),
            recorded in the cache key so that a change of defaults shows up as another key.
    """

    ort_name: str
    options: Mapping[str, Any]


#: Calibration methods, by their names on the command line.
CALIBRATION_METHODS: Registry[CalibrationMethod] = Registry("calibration method")
CALIBRATION_METHODS.register(
    "entropy",
    CalibrationMethod("Entropy", {"num_bins": 128, "num_quantized_bins": 128}),
    description="the range whose quantised histogram is closest (KL divergence) to FP32's",
)
CALIBRATION_METHODS.register(
    "minmax",
    CalibrationMethod("MinMax", {"moving_average": False}),
    description="the observed extremes",
)
CALIBRATION_METHODS.register(
    "percentile",
    CalibrationMethod("Percentile", {"num_bins": 2048, "percentile": 99.999}),
    description="the 99.999th percentile of |x|",
)

_EXTRA_OPTIONS = {
    "ActivationSymmetric": True,
    "WeightSymmetric": True,
    "QuantizeBias": False,
    "AddQDQPairToWeight": True,
    "OpTypesToExcludeOutputQuantization": list(TRT_QUANTIZED_OPS),
    "ForceQuantizeNoInputCheck": True,  # a pooling op's input is quantised for its own sake
}

#: What the Q/DQ graph is for. ``tensorrt`` (default, the portable artifact): the symmetric
#: INT8 form above. ``onnxruntime-cpu``: the form ONNX Runtime's x86 CPU kernels run fastest
#: (uint8 activations with a zero point, int8 per-channel weights stored quantised, int32
#: biases), fused into QLinearConv/QLinearMatMul on CPUs without VNNI where its signed-int8
#: activation kernels are slow. TensorRT rejects that form (non-zero zero points, int32 DQ), so
#: it is never built into an engine.
TARGETS: tuple[str, ...] = ("tensorrt", "onnxruntime-cpu")

_CPU_EXTRA_OPTIONS = {"ActivationSymmetric": False, "WeightSymmetric": True}


def _choose(names: Iterable[str]) -> str:
    """``"choose a, b or c"``."""
    *first, last = list(names)
    return f"choose {', '.join(first)} or {last}" if first else f"choose {last}"


def check_method(method: str) -> CalibrationMethod:
    """The calibration method named ``method`` (a command's option check).

    Raises:
        UsageError: an unknown method; the hint names every method.
    """
    if method not in CALIBRATION_METHODS:
        raise UsageError(f"unknown calibration method {method!r}", _choose(CALIBRATION_METHODS))
    return CALIBRATION_METHODS[method]


def check_target(target: str) -> None:
    """Refuse an unknown INT8 target (see :data:`TARGETS`) with a UsageError naming them."""
    if target not in TARGETS:
        raise UsageError(f"unknown INT8 target {target!r}", _choose(TARGETS))


@dataclass
class QuantizeResult:
    """What :func:`quantize_qdq` did.

    Attributes:
        path: The Q/DQ ONNX file written.
        method: ``entropy``, ``minmax`` or ``percentile``.
        excluded_nodes: Nodes kept in FP32, in graph order.
        cache_path: The calibration cache file (None with the cache off).
        cache_hit: Whether the ranges came from the cache (calibration skipped).
        model_sha256: sha256 of the FP32 ONNX file.
        calib_sha256: Content sha256 of the calibration set.
        n_qdq_pairs: QuantizeLinear -> DequantizeLinear pairs in the output (activations and
            weights).
        seconds: Wall time of the whole call.
    """

    path: Path
    method: str
    excluded_nodes: list[str]
    cache_path: Path | None
    cache_hit: bool
    model_sha256: str
    calib_sha256: str
    n_qdq_pairs: int
    seconds: float
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types, for results and sidecar JSON."""
        doc = {f.name: getattr(self, f.name) for f in fields(self)}
        cache = None if self.cache_path is None else str(self.cache_path)
        return {
            **doc,
            "path": str(self.path),
            "excluded_nodes": list(self.excluded_nodes),
            "cache_path": cache,
        }


# --------------------------------------------------------------------------------------------
# The calibration data reader and ORT's console output
# --------------------------------------------------------------------------------------------


def _make_reader(ortq: Any, input_name: str, images: np.ndarray, batch_size: int, drop_last: bool):
    """A ``CalibrationDataReader`` yielding ``{input_name: float32 NCHW batch}``.

    Batches are ``images[i : i + batch_size]``; the last partial batch is kept unless
    ``drop_last`` (a model with a fixed batch dimension cannot take it).
    """

    starts = range(0, len(images) - (len(images) % batch_size if drop_last else 0), batch_size)

    class _Reader(ortq.CalibrationDataReader):
        def __init__(self) -> None:
            self.rewind()

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._batches, None)

        def __len__(self) -> int:
            return len(starts)

        def rewind(self) -> None:
            self._batches = iter({input_name: images[i : i + batch_size]} for i in starts)

    return _Reader()


def _one_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    return f"{type(exc).__name__}: {text[:240]}"


# --------------------------------------------------------------------------------------------
# quantize_qdq
# --------------------------------------------------------------------------------------------


@dataclass
class _Run:
    """One call of :func:`quantize_qdq`: what its steps share."""

    src: Path
    out: Path
    calib: CalibrationSet
    method: str
    spec: CalibrationMethod
    batch_size: int
    keep_fp32: str | Sequence[str]
    target: str
    ort: Any  # the onnx and onnxruntime modules, by short name
    input_name: str = ""
    fixed_batch: int | None = None
    model_sha: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    key: dict[str, Any] = field(default_factory=dict)
    cache_path: Path | None = None
    cache_hit: bool = False
    placement: TrtPlacement = field(default_factory=TrtPlacement)

    @property
    def for_trt(self) -> bool:
        """Whether the Q/DQ graph is TensorRT's symmetric INT8 form."""
        return self.target == "tensorrt"


def quantize_qdq(
    fp32_onnx: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    calib: CalibrationSet | str | os.PathLike[str],
    *,
    method: str = "entropy",
    batch_size: int = 32,
    keep_fp32: str | Sequence[str] = "auto",
    cache_dir: str | os.PathLike[str] | None = None,
    input_name: str | None = None,
    use_cache: bool = True,
    target: str = "tensorrt",
) -> QuantizeResult:
    """Quantise an FP32 ONNX classifier (or purifier + classifier) to symmetric INT8 Q/DQ.

    See the module docstring for the steps. The output is written atomically only after it
    passed :func:`verify_qdq`; on any failure ``out_path`` is left untouched.

    Args:
        fp32_onnx: The FP32 ONNX file (input ``[N, C, H, W]`` float in [0, 1]).
        out_path: Where to write the Q/DQ ONNX file.
        calib: A :class:`CalibrationSet` or the path of a saved one.
        method: ``entropy``, ``minmax`` or ``percentile``.
        batch_size: Images per calibration batch; the set must hold at least one batch. The
            last partial batch is used unless the model's batch dimension is fixed.
        keep_fp32: ``"auto"``, ``"none"`` or node names (see :func:`select_fp32_nodes`). Names
            refer to the pre-processed graph: nodes keep their names there unless ORT's basic
            optimisations fused them away (e.g. a BatchNormalization folded into its Conv).
        cache_dir: Calibration cache directory; default :func:`default_cache_dir`.
        input_name: The image input, when the model has several inputs.
        use_cache: False neither reads nor writes the cache.
        target: ``tensorrt`` (symmetric INT8, the default and the only form an engine is built
            from) or ``onnxruntime-cpu`` (see :data:`TARGETS`).

    Raises:
        UsageError: unknown method or policy, bad batch size, unknown input or node name.
        ExportError: missing or unreadable model, a calibration set that does not fit, ONNX
            Runtime failing, or an output that TensorRT would reject.
        MissingDependencyError: onnx or onnxruntime is not installed.
    """
    t0 = time.perf_counter()
    run = _check_request(fp32_onnx, out_path, calib, method, target, batch_size, keep_fp32)
    model = _read_model(run, input_name)
    _cache_key(run, cache_dir if use_cache else None, use_cache)
    with tempfile.TemporaryDirectory(prefix="advedge-quant-") as tmp_name:
        tmp = Path(tmp_name)
        pre, excluded, tensors = _preprocess(run, model, tmp)
        del model
        ranges_file = tmp / "ranges.json"
        run.cache_hit = _cached_ranges(run, ranges_file, tensors)
        _quantize_static(run, pre, tmp / "qdq.onnx", ranges_file, excluded)
        if run.cache_path is not None and not run.cache_hit:
            write_cache(run.cache_path, run.key, ranges_file)
        n_pairs = _verify_and_write(run, tmp / "qdq.onnx")
    seconds = time.perf_counter() - t0
    logger.debug(  # the export's staging paths: a detail (advedge calibrate prints a table)
        "quantised %s -> %s (%s, %d Q/DQ pairs, %d FP32 nodes, cache %s) in %.1f s",
        run.src,
        run.out,
        method,
        n_pairs,
        len(excluded),
        "hit" if run.cache_hit else ("miss" if run.cache_path else "off"),
        seconds,
    )
    return QuantizeResult(
        path=run.out,
        method=method,
        excluded_nodes=list(excluded),
        cache_path=run.cache_path,
        cache_hit=run.cache_hit,
        model_sha256=run.model_sha,
        calib_sha256=run.calib.sha256,
        n_qdq_pairs=n_pairs,
        seconds=seconds,
        options=run.options,
    )


def _check_request(
    fp32_onnx: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    calib: CalibrationSet | str | os.PathLike[str],
    method: str,
    target: str,
    batch_size: int,
    keep_fp32: str | Sequence[str],
) -> _Run:
    """The options, the FP32 file, the calibration set and the libraries, before any work."""
    spec = CALIBRATION_METHODS.get(method)
    if target not in TARGETS:
        raise UsageError(f"unknown INT8 target {target!r}", did_you_mean(target, TARGETS))
    src = Path(fp32_onnx)
    if not src.is_file():
        raise ExportError(f"ONNX model not found: {src}", "export the FP32 model first")
    check_external_data(src)  # before onnx.load follows any external-data path
    if not isinstance(calib, CalibrationSet):
        calib = load_calibration_set(calib)
    if isinstance(keep_fp32, str) and keep_fp32 not in ("auto", "none"):
        raise UsageError(
            f"unknown FP32 policy {keep_fp32!r}", "use auto, none, or a list of node names"
        )
    modules = {
        "onnx": "onnx",
        "ort": "onnxruntime",
        "ortq": "onnxruntime.quantization",
        "calibrate": "onnxruntime.quantization.calibrate",
        "shape_inference": "onnxruntime.quantization.shape_inference",
    }
    ort = types.SimpleNamespace(
        **{k: require(m, purpose="INT8 calibration") for k, m in modules.items()}
    )
    return _Run(src, Path(out_path), calib, method, spec, batch_size, keep_fp32, target, ort)


def _read_model(run: _Run, input_name: str | None) -> Any:
    """Load the FP32 model and check that the calibration set and batch size fit its input."""
    try:
        model = run.ort.onnx.load(str(run.src))
    except Exception as exc:
        raise ExportError(f"cannot read ONNX model {run.src}: {_one_line(exc)}") from None
    run.input_name, dims = graph_input(model, input_name)
    check_fits(run.calib, dims[1:], run.batch_size)
    run.fixed_batch = dims[0] if isinstance(dims[0], int) and dims[0] > 0 else None
    if run.fixed_batch is not None and run.fixed_batch != run.batch_size:
        raise ExportError(
            f"the model's batch dimension is fixed at {run.fixed_batch} but the calibration "
            f"batch size is {run.batch_size}",
            f"use batch_size={run.fixed_batch}, or export with a dynamic batch axis",
        )
    return model


def _cache_key(run: _Run, cache_dir: str | os.PathLike[str] | None, use_cache: bool) -> None:
    """The options that change the ranges, the cache key and the cache file (with the cache)."""
    run.model_sha = sha256_file(run.src)
    run.options = {
        "target": run.target,
        "activation_symmetric": run.for_trt,
        "weight_symmetric": True,
        "per_channel": True,
        "batch_size": int(run.batch_size),
        "drop_last": run.fixed_batch is not None,
        "calibrator": dict(run.spec.options),
        "preprocess": "quant_pre_process",
        "placement": "trt-fusion/1" if run.for_trt else "onnxruntime",  # its version
    }
    run.key = {
        "model_sha256": run.model_sha,
        "calib_sha256": run.calib.sha256,
        "method": run.method,
        "options": run.options,
        "onnxruntime": run.ort.ort.__version__,
    }
    if use_cache:
        root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        run.cache_path = cache_file(root, run.model_sha, run.calib.sha256, run.method, run.key)


def _preprocess(run: _Run, model: Any, tmp: Path) -> tuple[Path, list[str], set[str]]:
    """Name the nodes and run ORT's pre-processing; returns the pre-processed file, the nodes
    kept in FP32 and the tensor names of the graph."""
    onnx = run.ort.onnx
    named, pre = tmp / "named.onnx", tmp / "pre.onnx"
    name_unnamed_nodes(model)
    onnx.save(model, str(named))
    try:
        with quiet_onnxruntime(capture_prints=True):
            run.ort.shape_inference.quant_pre_process(str(named), str(pre))
    except Exception as exc:
        raise ExportError(
            f"ONNX Runtime could not pre-process {run.src}: {_one_line(exc)}"
        ) from None
    pre_model = onnx.load(str(pre))
    if name_unnamed_nodes(pre_model):
        onnx.save(pre_model, str(pre))
    excluded = select_fp32_nodes(pre_model, run.keep_fp32)
    if run.for_trt:
        run.placement = trt_placement(pre_model, excluded)
    tensors = {v for n in pre_model.graph.node for v in (*n.input, *n.output)}
    return pre, excluded, tensors


def _cached_ranges(run: _Run, ranges_file: Path, tensors: set[str]) -> bool:
    """Write the cached ranges to ``ranges_file`` when the cache holds usable ones."""
    if run.cache_path is None:
        return False
    ranges = read_cache(run.cache_path, run.key)
    if ranges is None:
        return False
    ranges_file.write_text(json.dumps(ranges), encoding="utf-8")
    if ranges_usable(run.ort.calibrate, ranges_file, run.spec.ort_name, tensors):
        return True
    ranges_file.unlink()
    return False


def _quantize_static(
    run: _Run, pre: Path, qdq: Path, ranges_file: Path, excluded: list[str]
) -> None:
    """ORT's ``quantize_static`` into ``qdq``; a cache hit that ORT cannot apply is recomputed."""
    ortq = run.ort.ortq
    images = run.calib.as_float()
    skip = [*excluded, *(n for n in run.placement.exclude if n not in excluded)]

    def quantize() -> None:
        reader = _make_reader(
            ortq, run.input_name, images, run.batch_size, run.fixed_batch is not None
        )
        with quiet_onnxruntime(capture_prints=True):
            ortq.quantize_static(
                str(pre),
                str(qdq),
                reader,
                quant_format=ortq.QuantFormat.QDQ,
                per_channel=True,
                activation_type=ortq.QuantType.QInt8 if run.for_trt else ortq.QuantType.QUInt8,
                weight_type=ortq.QuantType.QInt8,
                calibrate_method=getattr(ortq.CalibrationMethod, run.spec.ort_name),
                op_types_to_quantize=list(TRT_QUANTIZED_OPS) if run.for_trt else None,
                nodes_to_exclude=skip,
                extra_options=dict(_EXTRA_OPTIONS if run.for_trt else _CPU_EXTRA_OPTIONS),
                calibration_cache_path=str(ranges_file),
            )

    try:
        try:
            quantize()
        except Exception as exc:
            if not run.cache_hit:
                raise
            logger.warning(
                "calibration cache %s could not be applied (%s); recomputing",
                run.cache_path,
                _one_line(exc),
            )
            run.cache_hit = False
            ranges_file.unlink(missing_ok=True)
            quantize()
    except Exception as exc:
        raise ExportError(
            f"ONNX Runtime failed to quantise {run.src} ({run.method}): {_one_line(exc)}"
        ) from None


def _verify_and_write(run: _Run, qdq: Path) -> int:
    """Check the Q/DQ model for its target, then write it to ``run.out``; returns its pairs."""
    qmodel = run.ort.onnx.load(str(qdq))
    if run.for_trt and remove_input_qdq(qmodel, run.placement.bypass):
        run.ort.onnx.save(qmodel, str(qdq))
    n_pairs = verify_qdq(qmodel) if run.for_trt else count_quantize_nodes(qmodel)
    del qmodel
    with atomic_path(run.out) as tmp_out:
        shutil.copyfile(qdq, tmp_out)
    return n_pairs


# --------------------------------------------------------------------------------------------
# The options advedge export and advedge calibrate share
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantizeOptions:
    """The quantisation options of ``advedge export`` and ``advedge calibrate``.

    Attributes:
        method: A name of :data:`CALIBRATION_METHODS`.
        batch_size: Images per calibration batch.
        keep_fp32: ``auto``, ``none`` or comma-separated node names (the CLI's form).
        cache_dir: Calibration cache directory; None: :func:`default_cache_dir`.
        target: A name of :data:`TARGETS`.
    """

    method: str = "entropy"
    batch_size: int = 32
    keep_fp32: str = "auto"
    cache_dir: str | None = None
    target: str = "tensorrt"

    def fp32_policy(self) -> str | list[str]:
        """``keep_fp32`` as :func:`quantize_qdq` takes it: ``auto``, ``none`` or a name list."""
        if self.keep_fp32 in ("auto", "none"):
            return self.keep_fp32
        return [s for s in self.keep_fp32.split(",") if s]


def quantize_artifact(
    src: Path, dst: Path, calib: CalibrationSet, options: QuantizeOptions, metadata: dict[str, Any]
) -> QuantizeResult:
    """Quantise the FP32 ONNX ``src`` into the checked artifact ``dst``.

    :func:`quantize_qdq` with ``options``; then ``dst`` carries ``metadata`` with ``precision``
    ``int8`` and ``int8_target`` set, and passes :func:`advedge.export.graph.check_onnx`.

    Raises:
        As :func:`quantize_qdq` and :func:`~advedge.export.graph.check_onnx`.
    """
    onnx = require("onnx", purpose="INT8 quantisation")
    result = quantize_qdq(
        src,
        dst,
        calib,
        method=options.method,
        batch_size=options.batch_size,
        keep_fp32=options.fp32_policy(),
        cache_dir=options.cache_dir,
        target=options.target,
    )
    model = onnx.load(str(dst))
    set_onnx_metadata(model, {**metadata, "precision": "int8", "int8_target": options.target})
    onnx.save_model(model, str(dst))
    check_onnx(dst)
    return result

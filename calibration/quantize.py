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
   be parsed. Nodes chosen by :func:`select_fp32_nodes` stay FP32.
4. **Verification**: every QuantizeLinear/DequantizeLinear has an INT8 zero point equal to 0
   and an INT8 (never INT32) quantised input, and at least one Q/DQ pair exists; only then is
   the file written (atomically).

Calibration is the slow step, so its ranges are cached as JSON, keyed by the FP32 file's sha256,
the calibration set's content sha256, the method, the options that change ranges and the ONNX
Runtime version (see :func:`default_cache_dir` for where). A hit skips calibration and yields a
byte-identical model. A corrupt cache file is logged and recomputed, never fatal.

ONNX Runtime prints progress with ``print()``, logs with ANSI colours straight to stderr and lets
numpy warn; all of it runs under :func:`advedge.export.runtime.quiet_onnxruntime`, which logs it
at debug instead, so ``--json`` output on stdout stays clean and an error on stderr stays one
line. Torch-free; ``onnx`` and ``onnxruntime`` are imported inside the functions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from advedge.calibration.sets import CalibrationSet, check_fits, load_calibration_set
from advedge.export.graph import graph_input
from advedge.export.runtime import quiet_onnxruntime

from advedge.errors import ExportError, UsageError, did_you_mean
from advedge.utils import atomic_path, atomic_write_text, sha256_file

logger = logging.getLogger(__name__)

__all__ = [
    "CACHE_SCHEMA",
    "METHODS",
    "TARGETS",
    "QuantizeResult",
    "default_cache_dir",
    "name_unnamed_nodes",
    "quantize_qdq",
    "select_fp32_nodes",
    "verify_qdq",
]

#: Calibration methods, by their names on the command line.
METHODS: tuple[str, ...] = ("entropy", "minmax", "percentile")

#: ``schema`` field of calibration cache files.
CACHE_SCHEMA = "advedge.calibration-cache/1"

_ORT_METHOD = {"entropy": "Entropy", "minmax": "MinMax", "percentile": "Percentile"}

# Options that ONNX Runtime's calibrators use (their defaults in onnxruntime 1.x); recorded in the
# cache key so that a change of defaults shows up as a different key.
_CALIBRATOR_OPTIONS: dict[str, dict[str, Any]] = {
    "entropy": {"num_bins": 128, "num_quantized_bins": 128},
    "minmax": {"moving_average": False},
    "percentile": {"num_bins": 2048, "percentile": 99.999},
}

_EXTRA_OPTIONS = {
    "ActivationSymmetric": True,
    "WeightSymmetric": True,
    "QuantizeBias": False,
    "AddQDQPairToWeight": True,
}

#: What the Q/DQ graph is for. ``tensorrt`` (default, the portable artifact): the symmetric
#: INT8 form above. ``onnxruntime-cpu``: the form ONNX Runtime's x86 CPU kernels run fastest
#: (uint8 activations with a zero point, int8 per-channel weights stored quantised, int32
#: biases), fused into QLinearConv/QLinearMatMul on CPUs without VNNI where its signed-int8
#: activation kernels are slow. TensorRT rejects that form (non-zero zero points, int32 DQ), so
#: it is never built into an engine.
TARGETS: tuple[str, ...] = ("tensorrt", "onnxruntime-cpu")

_CPU_EXTRA_OPTIONS = {"ActivationSymmetric": False, "WeightSymmetric": True}

_LINEAR_OPS = ("Gemm", "MatMul")
_HEAD_CHAIN_OPS = ("Mul", "Add", "Clip")


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
        return {
            "path": str(self.path),
            "method": self.method,
            "excluded_nodes": list(self.excluded_nodes),
            "cache_path": None if self.cache_path is None else str(self.cache_path),
            "cache_hit": self.cache_hit,
            "model_sha256": self.model_sha256,
            "calib_sha256": self.calib_sha256,
            "n_qdq_pairs": self.n_qdq_pairs,
            "seconds": self.seconds,
            "options": self.options,
        }


def default_cache_dir() -> Path:
    """Where calibration caches live by default.

    ``$ADVEDGE_CACHE_DIR/calibration`` if set, else ``$XDG_CACHE_HOME/advedge/calibration``,
    else ``~/.cache/advedge/calibration``.
    """
    if os.environ.get("ADVEDGE_CACHE_DIR"):
        return Path(os.environ["ADVEDGE_CACHE_DIR"]).expanduser() / "calibration"
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "advedge" / "calibration"
    return Path.home() / ".cache" / "advedge" / "calibration"


# --------------------------------------------------------------------------------------------
# Node names and the FP32 policy
# --------------------------------------------------------------------------------------------


def name_unnamed_nodes(model: Any) -> int:
    """Give every unnamed node of ``model.graph`` the name ``advedge_<op>_<index>``, in place.

    ``index`` is the node's position in the graph, so the names depend only on the graph; a
    name already taken gets a ``_<k>`` suffix. ONNX Runtime excludes nodes from quantisation
    by name, so unnamed nodes could not be kept in FP32 otherwise. Returns how many were named.
    """
    taken = {n.name for n in model.graph.node if n.name}
    named = 0
    for index, node in enumerate(model.graph.node):
        if node.name:
            continue
        base = f"advedge_{node.op_type.lower()}_{index}"
        name, k = base, 1
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        node.name = name
        taken.add(name)
        named += 1
    return named


def select_fp32_nodes(model: Any, policy: str | Sequence[str] = "auto") -> list[str]:
    """Names of the nodes to keep in FP32 under ``policy``, in graph order.

    ``"auto"`` keeps two parts of the network in FP32:

    (a) **The purifier's output head.** For every Tanh node: the Conv that produces its input,
        the Tanh, and the chain of Mul/Add/Clip nodes that consume its output, up to and
        including the first Clip, i.e. ``clamp(x + eps_r * tanh(conv(h)), 0, 1)``. A Tanh whose
        chain reaches no Clip is not a purifier head and is left alone. Why: the inverse
        perturbation ``r`` is a small correction bounded by ``eps_r ~ 10/255``, and it must
        cancel an adversarial perturbation of ``8/255``. Quantising ``x + r`` over its range
        ``[-eps_r, 1 + eps_r]`` to INT8 gives steps of ``~1/127 ~ 2/255``, as coarse as a
        quarter of the correction, and the Tanh/Mul outputs would add their own rounding; the
        head is one small convolution, so FP32 costs little.
    (b) **The classifier's final linear layer.** The node producing each graph output when it
        is a Gemm or MatMul, or an Add of a constant bias onto a MatMul/Gemm (both nodes are
        kept). Why: it keeps the logits, whose differences decide the class, precise, and it
        costs well under 0.1% of the FLOPs of a convolutional classifier.

    ``"none"`` keeps nothing in FP32. A list of node names keeps exactly those.

    Args:
        model: An ``onnx.ModelProto`` (the pre-processed graph that will be quantised).
        policy: ``"auto"``, ``"none"`` or a list of node names.

    Raises:
        UsageError: an unknown policy string, or a listed name that is not a node of the graph.
        ExportError: ``auto`` chose a node that has no name (call :func:`name_unnamed_nodes`).
    """
    nodes = list(model.graph.node)
    names = [n.name for n in nodes]
    if isinstance(policy, str):
        if policy == "none":
            return []
        if policy != "auto":
            raise UsageError(
                f"unknown FP32 policy {policy!r}",
                "use auto, none, or a list of node names",
            )
        chosen = _auto_fp32_nodes(model)
        unnamed = [n.op_type for n in chosen if not n.name]
        if unnamed:
            raise ExportError(
                f"cannot keep unnamed {', '.join(unnamed)} node(s) in FP32",
                "name the graph's nodes first (name_unnamed_nodes)",
            )
        keep = {id(n) for n in chosen}
        return [n.name for n in nodes if id(n) in keep]
    wanted = [str(p) for p in policy]
    known = set(names)
    for name in wanted:
        if name not in known:
            raise UsageError(
                f"no node named {name!r} in the graph to keep in FP32",
                did_you_mean(name, [n for n in names if n]) if any(names) else None,
            )
    want = set(wanted)
    return [name for name in names if name in want]


def _auto_fp32_nodes(model: Any) -> list[Any]:
    graph = model.graph
    producer: dict[str, Any] = {}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for out in node.output:
            producer[out] = node
        for inp in node.input:
            consumers.setdefault(inp, []).append(node)
    constants = {i.name for i in graph.initializer} | {
        out for n in graph.node if n.op_type == "Constant" for out in n.output
    }
    chosen: list[Any] = []

    # (a) purifier heads: Conv -> Tanh -> Mul/Add ... -> Clip
    for tanh in (n for n in graph.node if n.op_type == "Tanh"):
        chain: list[Any] = []
        reached_clip = False
        frontier = list(tanh.output)
        seen: set[int] = set()
        while frontier:
            tensor = frontier.pop()
            for node in consumers.get(tensor, []):
                if node.op_type not in _HEAD_CHAIN_OPS or id(node) in seen:
                    continue
                seen.add(id(node))
                chain.append(node)
                if node.op_type == "Clip":
                    reached_clip = True
                else:
                    frontier.extend(node.output)
        if not reached_clip:
            logger.debug("Tanh %r reaches no Clip: not a purifier head", tanh.name)
            continue
        conv = producer.get(tanh.input[0]) if tanh.input else None
        if conv is not None and conv.op_type == "Conv":
            chosen.append(conv)
        chosen.append(tanh)
        chosen.extend(chain)

    # (b) the classifier's final linear layer
    for out in graph.output:
        node = producer.get(out.name)
        if node is None:
            continue
        if node.op_type in _LINEAR_OPS:
            chosen.append(node)
        elif node.op_type == "Add" and len(node.input) == 2:
            for a, b in (node.input, reversed(node.input)):
                src = producer.get(a)
                if src is not None and src.op_type in _LINEAR_OPS and b in constants:
                    chosen.extend([src, node])
                    break
    return chosen


# --------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------


def verify_qdq(model: Any) -> int:
    """Check a Q/DQ model for TensorRT and return its number of Q -> DQ pairs.

    Every QuantizeLinear and DequantizeLinear must have a constant INT8 zero point equal to 0
    (TensorRT accepts only symmetric quantisation); a constant input of a DequantizeLinear must
    be INT8 (TensorRT cannot dequantise INT32, e.g. quantised biases).

    Raises:
        ExportError: on the first violation, or when the graph has no Q -> DQ pair at all.
    """
    numpy_helper = _onnx_numpy_helper()
    graph = model.graph
    consts: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute:
            for attr in node.attribute:
                if attr.name == "value":
                    consts[node.output[0]] = numpy_helper.to_array(attr.t)
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for inp in node.input:
            consumers.setdefault(inp, []).append(node)

    pairs = 0
    for node in graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        label = node.name or node.output[0]
        zp_name = node.input[2] if len(node.input) > 2 else ""
        if not zp_name:
            if node.op_type == "QuantizeLinear":
                raise ExportError(
                    f"QuantizeLinear {label!r} has no zero point, so it quantises to uint8",
                    "TensorRT needs int8 with zero point 0",
                )
        else:
            zp = consts.get(zp_name)
            if zp is None:
                raise ExportError(f"the zero point of {node.op_type} {label!r} is not a constant")
            if zp.dtype != np.int8:
                raise ExportError(
                    f"{node.op_type} {label!r} has a {zp.dtype} zero point; TensorRT needs int8"
                )
            if np.any(zp != 0):
                raise ExportError(
                    f"{node.op_type} {label!r} has a non-zero zero point "
                    f"(TensorRT rejects asymmetric quantisation)",
                    "quantise with symmetric activations and weights",
                )
        if node.op_type == "DequantizeLinear":
            data = consts.get(node.input[0])
            if data is not None and data.dtype != np.int8:
                raise ExportError(
                    f"DequantizeLinear {label!r} dequantises a {data.dtype} constant; "
                    "TensorRT accepts only int8 there"
                )
        else:
            if any(c.op_type == "DequantizeLinear" for c in consumers.get(node.output[0], [])):
                pairs += 1
    if pairs == 0:
        raise ExportError(
            "quantisation inserted no Q/DQ pair: nothing in the graph was quantised",
            "check that the model has Conv/Gemm/MatMul layers outside the FP32 set",
        )
    return pairs


def _count_pairs(model: Any) -> int:
    """Q/DQ nodes of a model that is not meant for TensorRT (no symmetric-int8 checks)."""
    n = sum(1 for node in model.graph.node if node.op_type == "QuantizeLinear")
    if n == 0:
        raise ExportError("quantisation inserted no QuantizeLinear: nothing was quantised")
    return n


def _onnx_numpy_helper() -> Any:
    return _require("onnx.numpy_helper")


def _require(module: str) -> Any:
    from advedge.export._deps import require

    return require(module, purpose="INT8 calibration")


# --------------------------------------------------------------------------------------------
# The calibration data reader and ORT's console output
# --------------------------------------------------------------------------------------------


def _make_reader(ortq: Any, input_name: str, images: np.ndarray, batch_size: int, drop_last: bool):
    """A ``CalibrationDataReader`` yielding ``{input_name: float32 NCHW batch}``.

    Batches are ``images[i : i + batch_size]``; the last partial batch is kept unless
    ``drop_last`` (a model with a fixed batch dimension cannot take it).
    """

    class _Reader(ortq.CalibrationDataReader):
        def __init__(self) -> None:
            stop = len(images) - (len(images) % batch_size if drop_last else 0)
            self._starts = list(range(0, stop, batch_size))
            self._pos = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self._pos >= len(self._starts):
                return None
            start = self._starts[self._pos]
            self._pos += 1
            return {input_name: images[start : start + batch_size]}

        def __len__(self) -> int:
            return len(self._starts)

        def rewind(self) -> None:
            self._pos = 0

    return _Reader()


def _one_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    return f"{type(exc).__name__}: {text[:240]}"


# --------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------


def _cache_file(
    cache_dir: Path, model_sha: str, calib_sha: str, method: str, key: dict[str, Any]
) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return cache_dir / f"{model_sha[:16]}-{calib_sha[:16]}-{method}-{digest[:12]}.json"


def _read_cache(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """The ``ranges`` payload of a valid cache file for ``key``; None (logged) otherwise."""
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        logger.warning("ignoring corrupt calibration cache %s (%s); recomputing", path, exc)
        return None
    if not isinstance(doc, dict) or doc.get("schema") != CACHE_SCHEMA:
        logger.warning("ignoring calibration cache %s: not a %s file", path, CACHE_SCHEMA)
        return None
    mismatch = [k for k, v in key.items() if doc.get(k) != v]
    if mismatch:
        logger.warning(
            "ignoring calibration cache %s: its %s differ(s) from this run; recomputing",
            path,
            ", ".join(mismatch),
        )
        return None
    ranges = doc.get("ranges")
    if not isinstance(ranges, dict) or not isinstance(ranges.get("data"), dict):
        logger.warning("ignoring calibration cache %s: no ranges in it; recomputing", path)
        return None
    return ranges


def _ranges_usable(ortq_calibrate: Any, ranges_file: Path, method: str, tensors: set[str]) -> bool:
    """Whether ORT can load ``ranges_file`` for ``method`` and it names tensors of the graph."""
    try:
        data = ortq_calibrate.load_tensors_data(ranges_file)
        ok_method = data.calibration_method == getattr(
            ortq_calibrate.CalibrationMethod, _ORT_METHOD[method]
        )
        names = set(data.data)
    except Exception as exc:  # any failure to parse means a corrupt cache
        logger.warning("ignoring calibration cache: ORT cannot read its ranges (%s)", exc)
        return False
    if not ok_method or not names or not names <= tensors:
        logger.warning("ignoring calibration cache: its ranges do not match this graph")
        return False
    return True


def _write_cache(path: Path, key: dict[str, Any], ranges_file: Path) -> bool:
    try:
        ranges = json.loads(ranges_file.read_text(encoding="utf-8"))
        doc = {"schema": CACHE_SCHEMA, **key, "ranges": ranges}
        atomic_write_text(path, json.dumps(doc, sort_keys=True) + "\n")
    except (OSError, ValueError) as exc:
        logger.warning("could not write the calibration cache %s (%s)", path, exc)
        return False
    return True


# --------------------------------------------------------------------------------------------
# quantize_qdq
# --------------------------------------------------------------------------------------------


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
    if method not in METHODS:
        raise UsageError(f"unknown calibration method {method!r}", did_you_mean(method, METHODS))
    if target not in TARGETS:
        raise UsageError(f"unknown INT8 target {target!r}", did_you_mean(target, TARGETS))
    for_trt = target == "tensorrt"
    fp32_onnx, out_path = Path(fp32_onnx), Path(out_path)
    if not fp32_onnx.is_file():
        raise ExportError(f"ONNX model not found: {fp32_onnx}", "export the FP32 model first")
    from advedge.export.graph import check_external_data

    check_external_data(fp32_onnx)  # before onnx.load follows any external-data path
    if not isinstance(calib, CalibrationSet):
        calib = load_calibration_set(calib)
    if isinstance(keep_fp32, str) and keep_fp32 not in ("auto", "none"):
        raise UsageError(
            f"unknown FP32 policy {keep_fp32!r}", "use auto, none, or a list of node names"
        )

    onnx = _require("onnx")
    ort = _require("onnxruntime")
    ortq = _require("onnxruntime.quantization")
    ortq_calibrate = _require("onnxruntime.quantization.calibrate")
    shape_inference = _require("onnxruntime.quantization.shape_inference")

    try:
        model = onnx.load(str(fp32_onnx))
    except Exception as exc:
        raise ExportError(f"cannot read ONNX model {fp32_onnx}: {_one_line(exc)}") from None
    name, dims = graph_input(model, input_name)
    check_fits(calib, dims[1:], batch_size)
    fixed_batch = dims[0] if isinstance(dims[0], int) and dims[0] > 0 else None
    if fixed_batch is not None and fixed_batch != batch_size:
        raise ExportError(
            f"the model's batch dimension is fixed at {fixed_batch} but the calibration batch "
            f"size is {batch_size}",
            f"use batch_size={fixed_batch}, or export with a dynamic batch axis",
        )

    model_sha = sha256_file(fp32_onnx)
    calib_sha = calib.sha256
    options = {
        "target": target,
        "activation_symmetric": for_trt,
        "weight_symmetric": True,
        "per_channel": True,
        "batch_size": int(batch_size),
        "drop_last": fixed_batch is not None,
        "calibrator": _CALIBRATOR_OPTIONS[method],
        "preprocess": "quant_pre_process",
    }
    key = {
        "model_sha256": model_sha,
        "calib_sha256": calib_sha,
        "method": method,
        "options": options,
        "onnxruntime": ort.__version__,
    }
    cache_path: Path | None = None
    if use_cache:
        cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        cache_path = _cache_file(cache_root, model_sha, calib_sha, method, key)

    with tempfile.TemporaryDirectory(prefix="advedge-quant-") as tmp_name:
        tmp = Path(tmp_name)
        named, pre, qdq, ranges_file = (
            tmp / "named.onnx",
            tmp / "pre.onnx",
            tmp / "qdq.onnx",
            tmp / "ranges.json",
        )
        name_unnamed_nodes(model)
        onnx.save(model, str(named))
        del model
        try:
            with quiet_onnxruntime(capture_prints=True):
                shape_inference.quant_pre_process(str(named), str(pre))
        except Exception as exc:
            raise ExportError(
                f"ONNX Runtime could not pre-process {fp32_onnx}: {_one_line(exc)}"
            ) from None
        pre_model = onnx.load(str(pre))
        if name_unnamed_nodes(pre_model):
            onnx.save(pre_model, str(pre))
        excluded = select_fp32_nodes(pre_model, keep_fp32)
        tensors = {v for n in pre_model.graph.node for v in (*n.input, *n.output)}
        del pre_model

        cache_hit = False
        if cache_path is not None:
            ranges = _read_cache(cache_path, key)
            if ranges is not None:
                ranges_file.write_text(json.dumps(ranges), encoding="utf-8")
                cache_hit = _ranges_usable(ortq_calibrate, ranges_file, method, tensors)
                if not cache_hit:
                    ranges_file.unlink()

        images = calib.as_float()

        def run_quantizer() -> None:
            reader = _make_reader(ortq, name, images, batch_size, fixed_batch is not None)
            with quiet_onnxruntime(capture_prints=True):
                ortq.quantize_static(
                    str(pre),
                    str(qdq),
                    reader,
                    quant_format=ortq.QuantFormat.QDQ,
                    per_channel=True,
                    activation_type=ortq.QuantType.QInt8 if for_trt else ortq.QuantType.QUInt8,
                    weight_type=ortq.QuantType.QInt8,
                    calibrate_method=getattr(ortq.CalibrationMethod, _ORT_METHOD[method]),
                    nodes_to_exclude=list(excluded),
                    extra_options=dict(_EXTRA_OPTIONS if for_trt else _CPU_EXTRA_OPTIONS),
                    calibration_cache_path=str(ranges_file),
                )

        try:
            try:
                run_quantizer()
            except Exception as exc:
                if not cache_hit:
                    raise
                logger.warning(
                    "calibration cache %s could not be applied (%s); recomputing",
                    cache_path,
                    _one_line(exc),
                )
                cache_hit = False
                ranges_file.unlink(missing_ok=True)
                run_quantizer()
        except Exception as exc:
            raise ExportError(
                f"ONNX Runtime failed to quantise {fp32_onnx} ({method}): {_one_line(exc)}"
            ) from None

        if cache_path is not None and not cache_hit:
            _write_cache(cache_path, key, ranges_file)

        qmodel = onnx.load(str(qdq))
        n_pairs = verify_qdq(qmodel) if for_trt else _count_pairs(qmodel)
        del qmodel
        with atomic_path(out_path) as tmp_out:
            shutil.copyfile(qdq, tmp_out)

    seconds = time.perf_counter() - t0
    logger.info(
        "quantised %s -> %s (%s, %d Q/DQ pairs, %d FP32 nodes, cache %s) in %.1f s",
        fp32_onnx,
        out_path,
        method,
        n_pairs,
        len(excluded),
        "hit" if cache_hit else ("miss" if cache_path else "off"),
        seconds,
    )
    return QuantizeResult(
        path=out_path,
        method=method,
        excluded_nodes=list(excluded),
        cache_path=cache_path,
        cache_hit=cache_hit,
        model_sha256=model_sha,
        calib_sha256=calib_sha,
        n_qdq_pairs=n_pairs,
        seconds=seconds,
        options=options,
    )

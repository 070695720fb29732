"""The export precisions: the one table of what ``advedge export --precision`` can write.

Each entry of :data:`PRECISIONS` is an :class:`ExportPrecision`: its converter (the
parity-checked FP32 ONNX -> this precision's ONNX), its parity tolerance, the options it needs
or accepts, and a one-line description. The option checks, the parity gate, the accuracy report
and the check of what ``out`` already holds all read this table, so adding a precision is one
entry here (plus its tests).

The tolerances: FP32 differs from PyTorch by float rounding only; FP16 keeps about 3 decimal
digits; INT8 differs by up to a quantisation step per layer, so its gate only catches a broken
graph (a wrong range, a missed Q/DQ pair). Whether a lower precision keeps the accuracy is the
accuracy report's job, which compares accuracies, not outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from advedge.calibration.quantize import QuantizeOptions, quantize_artifact
from advedge.calibration.sets import CalibrationSet, save_calibration_set
from advedge.export.fp16 import clamp_warning, convert_fp16
from advedge.export.graph import read_onnx_metadata
from advedge.export.parity import Tolerance

from advedge.registry import Registry

__all__ = ["PRECISIONS", "Conversion", "ExportPrecision"]


@dataclass(frozen=True)
class Conversion:
    """One conversion: the FP32 ONNX of one export target into another precision.

    Attributes:
        fp32: The FP32 ONNX, already through its parity gate.
        stage: The folder the converted file (and a saved calibration set) is written into.
        name: The target's name: the converted file is ``NAME.<precision>[-variant].onnx``.
        calib: The calibration set (precisions that need calibration).
        quantize: The quantisation options (``--calib-method``, ``--keep-fp32``, ...).
        save_set: Also save ``calib`` as ``stage/calibration.npz`` (once).
    """

    fp32: Path
    stage: Path
    name: str
    calib: CalibrationSet | None = None
    quantize: QuantizeOptions = field(default_factory=QuantizeOptions)
    save_set: bool = False


#: A converter: the conversion -> (the checked file it wrote, what its sidecar records).
Converter = Callable[[Conversion], tuple[Path, dict[str, Any]]]


@dataclass(frozen=True)
class ExportPrecision:
    """One precision of ``advedge export``.

    Attributes:
        tolerance: The parity gate's default tolerance (``--parity-max-abs`` and
            ``--parity-min-agree`` override it).
        convert: FP32 ONNX -> this precision's ONNX; None for FP32 itself (no conversion, no
            accuracy report).
        needs_calibration: Refused without ``--calib-data``; the export builds or loads a
            calibration set (and saves one built from a data directory as calibration.npz).
        legacy_calibrator: Accepts ``--trt-calibrator legacy-*`` (with ``--trt``).
        reference_level: The ONNX Runtime optimisation level that computes what TensorRT does,
            for the parity gate and the accuracy report's reference run (``all``: no separate
            reference run).
        note: A few words the ``--precision`` help shows after the name (``"FP32 I/O"``).
    """

    tolerance: Tolerance
    convert: Converter | None = None
    needs_calibration: bool = False
    legacy_calibrator: bool = False
    reference_level: str = "all"
    note: str = ""


def _to_fp16(job: Conversion) -> tuple[Path, dict[str, Any]]:
    path = convert_fp16(job.fp32, job.stage / f"{job.name}.fp16.onnx")
    clamped = read_onnx_metadata(path).get("fp16_clamped")
    if not clamped:
        return path, {}
    return path, {"fp16_clamped": clamped, "warning": f"FP16: {clamp_warning(clamped)}"}


def _to_int8(job: Conversion) -> tuple[Path, dict[str, Any]]:
    if job.calib is None:
        raise ValueError("int8 needs a calibration set")
    if job.save_set and not (job.stage / "calibration.npz").exists():
        save_calibration_set(job.calib, job.stage / "calibration.npz")
    cpu = job.quantize.target == "onnxruntime-cpu"
    int8 = job.stage / f"{job.name}.{'int8-ortcpu' if cpu else 'int8'}.onnx"
    meta = read_onnx_metadata(job.fp32)
    result = quantize_artifact(job.fp32, int8, job.calib, job.quantize, meta)
    calibration = {
        "method": result.method,
        "n": len(job.calib),
        "calib_sha256": result.calib_sha256,
        "mix_adv": job.calib.meta.get("mix_adv"),
        "fp32_nodes": list(result.excluded_nodes),
        "qdq_pairs": result.n_qdq_pairs,
        "cache": str(result.cache_path) if result.cache_path else None,
        "cache_hit": result.cache_hit,
        "target": job.quantize.target,
        "symmetric": not cpu,
        "per_channel_weights": True,
    }
    return int8, {"calibration": calibration}


#: The precisions of ``advedge export``, in the order the CLI lists them.
PRECISIONS: Registry[ExportPrecision] = Registry("precision")
PRECISIONS.register(
    "fp32",
    ExportPrecision(Tolerance(max_abs_logits=1e-3, max_abs_pixels=1e-4, min_agreement=0.99)),
    description="the ONNX as exported (opset 18 by default, dynamic batch)",
)
PRECISIONS.register(
    "fp16",
    ExportPrecision(
        Tolerance(max_abs_logits=0.1, max_abs_pixels=4e-3, min_agreement=0.97),
        convert=_to_fp16,
        note="FP32 I/O",
    ),
    description="FP16 inside, FP32 inputs and outputs (onnxconverter-common)",
)
PRECISIONS.register(
    "int8",
    ExportPrecision(
        Tolerance(max_abs_logits=3.0, max_abs_pixels=0.1, min_agreement=0.85),
        convert=_to_int8,
        needs_calibration=True,
        legacy_calibrator=True,
        reference_level="basic",
        note="symmetric Q/DQ",
    ),
    description="symmetric INT8 Q/DQ calibrated on --calib-data",
)

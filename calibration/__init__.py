"""advedge.calibration: INT8 calibration for deployed artifacts.

Modules:

* :mod:`~advedge.calibration.sets`: calibration sets. A stratified sample of a dataset's
  training split, optionally mixed with PGD adversarial examples (``mix_adv``), held as uint8
  NHWC and identified by a content sha256; saved as an npz file that loads without pickle and
  is verified against its hash.
* :mod:`~advedge.calibration.quantize`: explicit INT8. ONNX Runtime static quantisation to
  symmetric Q/DQ pairs (zero point 0, INT8 weights per channel, FP32 biases), the portable INT8
  artifact that TensorRT 10 and 11 both build strongly typed. Keeps the purifier's output head
  and the final linear layer in FP32 (``keep_fp32="auto"``) and caches calibration ranges.
* :mod:`~advedge.calibration.nodes`: naming a graph's nodes, the FP32 policy and the check
  that a Q/DQ graph is one TensorRT accepts; :mod:`~advedge.calibration.cache`: the
  calibration cache of activation ranges.
* :mod:`~advedge.calibration.calibrate`: ``advedge calibrate`` (:func:`calibrate_file`): an
  existing FP32 ONNX file quantised, all or nothing.
* :mod:`~advedge.calibration.legacy`: the implicit calibrator of TensorRT 10
  (``IInt8EntropyCalibrator2`` / ``IInt8MinMaxCalibrator``), offered only where the installed
  TensorRT still has it.

Torch-free at import: nothing here imports torch, onnx, onnxruntime, TensorRT or CUDA at module
level. ``onnx``/``onnxruntime`` are imported inside the functions that need them (with an install
hint when missing), and torch only inside the function that crafts adversarial examples, so a
device with numpy and ONNX Runtime alone can load calibration sets and quantise.
"""

from __future__ import annotations

from advedge.calibration.cache import CACHE_SCHEMA, default_cache_dir
from advedge.calibration.calibrate import calibrate_file
from advedge.calibration.legacy import (
    LEGACY_METHODS,
    device_pointer,
    has_legacy_calibrator,
    make_legacy_calibrator,
)
from advedge.calibration.nodes import name_unnamed_nodes, select_fp32_nodes, verify_qdq
from advedge.calibration.quantize import (
    CALIBRATION_METHODS,
    TARGETS,
    QuantizeOptions,
    QuantizeResult,
    quantize_artifact,
    quantize_qdq,
)
from advedge.calibration.sets import (
    SET_SCHEMA,
    CalibrationSet,
    build_calibration_set,
    check_fits,
    load_calibration_set,
    save_calibration_set,
)

__all__ = [
    "CACHE_SCHEMA",
    "CALIBRATION_METHODS",
    "LEGACY_METHODS",
    "SET_SCHEMA",
    "TARGETS",
    "CalibrationSet",
    "QuantizeOptions",
    "QuantizeResult",
    "build_calibration_set",
    "calibrate_file",
    "check_fits",
    "default_cache_dir",
    "device_pointer",
    "has_legacy_calibrator",
    "load_calibration_set",
    "make_legacy_calibrator",
    "name_unnamed_nodes",
    "quantize_artifact",
    "quantize_qdq",
    "save_calibration_set",
    "select_fp32_nodes",
    "verify_qdq",
]

"""FP16 ONNX with FP32 inputs and outputs, by onnxconverter-common's maintained converter.

``float16.convert_float_to_float16(model, keep_io_types=True)`` turns every float32 initializer
and value into float16 and puts Cast nodes at the graph's inputs and outputs, so callers still
feed float32 images in [0, 1] and read float32 logits. TensorRT builds a strongly typed engine
from it with the same precisions (FP16 layers, FP32 I/O).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from advedge.export._deps import require
from advedge.export.graph import check_onnx, read_onnx_metadata, set_onnx_metadata

from advedge.errors import ExportError
from advedge.utils import atomic_path

__all__ = ["MAX_FINITE", "MIN_POSITIVE", "clamp_warning", "convert_fp16", "fp16_clamps"]

logger = logging.getLogger(__name__)

#: onnxconverter-common's defaults (``convert_float_to_float16``'s ``max_finite_val`` and
#: ``min_positive_val``): the magnitudes it clamps constants to.
MAX_FINITE = 1e4
MIN_POSITIVE = 1e-7


def fp16_clamps(model: Any) -> dict[str, Any]:
    """What FP16 conversion will clamp in a model's float32 initializers and Constant nodes:
    ``{"above": n, "below": n, "tensors": [names]}`` (values with ``|x| >= MAX_FINITE``, nonzero
    values with ``|x| <= MIN_POSITIVE``); empty when nothing is clamped."""
    from onnx import TensorProto, numpy_helper

    tensors = list(model.graph.initializer)
    for node in model.graph.node:
        if node.op_type == "Constant":
            tensors += [a.t for a in node.attribute if a.HasField("t")]
    above = below = 0
    names: list[str] = []
    for t in tensors:
        if t.data_type != TensorProto.FLOAT:
            continue
        a = np.abs(numpy_helper.to_array(t))
        n_above = int(np.count_nonzero(a >= MAX_FINITE))
        n_below = int(np.count_nonzero((a > 0) & (a <= MIN_POSITIVE)))
        if n_above or n_below:
            above, below = above + n_above, below + n_below
            names.append(t.name)
    return {"above": above, "below": below, "tensors": names} if names else {}


def clamp_warning(clamped: dict[str, Any]) -> str:
    """One line on what :func:`fp16_clamps` found."""
    return (
        f"{clamped['above']} weight values at or above {MAX_FINITE:g} clamped to ±{MAX_FINITE:g} "
        f"and {clamped['below']} nonzero ones at or below {MIN_POSITIVE:g} raised to "
        f"±{MIN_POSITIVE:g}, in {len(clamped['tensors'])} tensors "
        f"({', '.join(clamped['tensors'][:3])}{'...' if len(clamped['tensors']) > 3 else ''})"
    )


def convert_fp16(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Convert the FP32 ONNX ``src`` into an FP16 one with FP32 I/O at ``dst`` (checked).

    The metadata is carried over with ``precision`` set to ``fp16``. The converter clamps
    constants silently (its warnings are suppressed here, as it prints and warns freely): every
    value at or above :data:`MAX_FINITE` in magnitude becomes ±1e4 and every nonzero one at or
    below :data:`MIN_POSITIVE` becomes ±1e-7. :func:`fp16_clamps` counts them first; where any
    was clamped a warning is logged and the counts are kept in the metadata (``fp16_clamped``).

    Raises:
        ExportError: the converter or the checker failed.
    """
    onnx = require("onnx", purpose="FP16 conversion")
    float16 = require("onnxconverter_common.float16", purpose="FP16 conversion")
    model = onnx.load(str(src))
    meta = read_onnx_metadata(model)
    clamped = fp16_clamps(model)
    if clamped:
        logger.warning("FP16 conversion of %s: %s", Path(src).name, clamp_warning(clamped))
        meta = {**meta, "fp16_clamped": clamped}
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            converted = float16.convert_float_to_float16(model, keep_io_types=True)
    except Exception as exc:
        raise ExportError(f"FP16 conversion of {src} failed: {type(exc).__name__}: {exc}") from None
    set_onnx_metadata(converted, {**meta, "precision": "fp16"})
    dst = Path(dst)
    with atomic_path(dst) as tmp:
        onnx.save_model(converted, str(tmp))
        check_onnx(tmp)
    return dst

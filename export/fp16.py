"""FP16 ONNX with FP32 inputs and outputs, by onnxconverter-common's maintained converter.

``float16.convert_float_to_float16(model, keep_io_types=True)`` turns every float32 initializer
and value into float16 and puts Cast nodes at the graph's inputs and outputs, so callers still
feed float32 images in [0, 1] and read float32 logits. TensorRT builds a strongly typed engine
from it with the same precisions (FP16 layers, FP32 I/O).
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path

from advedge.export._deps import require
from advedge.export.graph import check_onnx, read_onnx_metadata, set_onnx_metadata

from advedge.errors import ExportError
from advedge.utils import atomic_path

__all__ = ["convert_fp16"]


def convert_fp16(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Convert the FP32 ONNX ``src`` into an FP16 one with FP32 I/O at ``dst`` (checked).

    The metadata is carried over with ``precision`` set to ``fp16``.

    Raises:
        ExportError: the converter or the checker failed.
    """
    onnx = require("onnx", purpose="FP16 conversion")
    float16 = require("onnxconverter_common.float16", purpose="FP16 conversion")
    model = onnx.load(str(src))
    meta = read_onnx_metadata(model)
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

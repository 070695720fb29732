"""PyTorch -> ONNX: a classifier, a purifier, or both fused into one graph.

The exported graph takes float images in [0, 1], NCHW, with a dynamic batch axis named
``batch`` (input ``input``), and returns ``logits`` (classifier, fused) or ``purified``
(purifier alone). It goes through torch's current exporter (``torch.onnx.export(...,
dynamo=True)``, default opset 18) with its optimiser on, which folds constants (batch norm into
convolutions, Clip's bounds into initializers: TensorRT needs those), then every remaining
``Constant`` node is moved into the initializers and the file is checked with
``onnx.checker`` (``full_check=True``). torch is imported inside the function.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any

from advedge.export._deps import require
from advedge.export.graph import (
    check_onnx,
    constants_to_initializers,
    set_onnx_metadata,
    unfolded_clip_bounds,
)

from advedge.errors import ExportError, UsageError
from advedge.utils import atomic_path

__all__ = ["DEFAULT_OPSET", "INPUT_NAME", "export_onnx"]

DEFAULT_OPSET = 18
INPUT_NAME = "input"
#: The opsets torch's exporter can write (it converts down from 18 for older ones).
SUPPORTED_OPSETS = range(17, 24)


def export_onnx(
    module: Any,
    path: str | os.PathLike[str],
    *,
    input_shape: tuple[int, int, int] | list[int],
    output_name: str = "logits",
    opset: int = DEFAULT_OPSET,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Export ``module`` (an ``nn.Module`` in pixel space) to a checked ONNX file.

    Args:
        module: The model; put in eval mode on the CPU, in float32, for the export.
        path: Where to write the ``.onnx`` (atomically; nothing is left on failure).
        input_shape: ``[C, H, W]`` of one image.
        output_name: Name of the graph output.
        opset: ONNX opset (17-23; 18 by default).
        metadata: ``metadata_props`` to set (see :data:`advedge.export.graph.METADATA_KEYS`).

    Returns:
        ``path``.

    Raises:
        UsageError: an opset outside 17-23.
        ExportError: the exporter failed, a Clip bound could not be folded, or the checker
            rejected the graph.
    """
    if opset not in SUPPORTED_OPSETS:
        raise UsageError(
            f"opset {opset} is not supported",
            f"use {SUPPORTED_OPSETS.start}-{SUPPORTED_OPSETS.stop - 1} (default {DEFAULT_OPSET})",
        )
    torch = require("torch", purpose="ONNX export from PyTorch")
    onnx = require("onnx", purpose="ONNX export")
    require("onnxscript", purpose="ONNX export")
    c, h, w = (int(v) for v in input_shape)
    module = module.to("cpu").float().eval()
    dummy = torch.rand(2, c, h, w, generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1)
    level = logging.getLogger("torch.onnx").level
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
            torch.no_grad(),
        ):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module,
                (dummy,),
                dynamo=True,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[output_name],
                dynamic_shapes=({0: batch},),
                optimize=True,
                verbose=False,
                external_data=False,
            )
    except Exception as exc:
        raise ExportError(f"torch's ONNX exporter failed: {_root_cause(exc)}") from None
    finally:
        logging.getLogger("torch.onnx").setLevel(level)
    model = program.model_proto
    constants_to_initializers(model)
    bad = unfolded_clip_bounds(model)
    if bad:
        raise ExportError(
            f"Clip bounds of {', '.join(bad[:3])} are not constants after folding",
            "TensorRT needs constant Clip bounds; clamp with Python numbers, not tensors",
        )
    model.producer_name = "advedge"
    set_onnx_metadata(model, metadata or {})
    path = Path(path)
    with atomic_path(path) as tmp:
        onnx.save_model(model, str(tmp))
        check_onnx(tmp)
    return path


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _root_cause(exc: BaseException, limit: int = 300) -> str:
    """One line naming the innermost cause of an exporter failure, without colour codes.

    torch's exporter wraps the real error in a banner ("Failed to export the model with
    torch.export. This is step 1/3 ..."); the cause chain holds the useful message.
    """
    inner = exc
    seen = set()
    while (inner.__cause__ or inner.__context__) is not None and id(inner) not in seen:
        seen.add(id(inner))
        inner = inner.__cause__ or inner.__context__  # type: ignore[assignment]
    text = _ANSI.sub("", str(inner)).strip()
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"{type(inner).__name__}: {first}"[:limit]

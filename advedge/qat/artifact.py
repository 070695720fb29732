"""Writing a QAT graph back into its Q/DQ ONNX file, and the checks the file must pass.

:func:`write_qat_onnx` copies the PTQ file the graph was built from, with three changes only:
the trained FP32 weights and biases replace their initializers, each weight's scale initializer
is recomputed from its trained weight as the quantiser computes it
(:func:`~advedge.qat.graph.numpy_weight_scale`), and the metadata says ``quantisation: qat``. The
nodes, the activation scales and the zero points are the PTQ file's. It is written atomically,
and only after it has passed, in this order:

1. ``onnx.checker`` (full check);
2. :func:`~advedge.calibration.nodes.verify_qdq`: every zero point an int8 0, no int32 dequantised,
   at least one Q/DQ pair (what TensorRT accepts);
3. the same Q/DQ placement as the PTQ file: the same nodes in the same order and the same
   quantised edges (:func:`~advedge.calibration.nodes.qdq_edges`);
4. parity on test images: the file as written computes the trained graph (the white-box
   replica of the written file against the graph, max |Δ| of the logits at most
   :data:`MAX_WRITTEN_DIFF`), and ONNX Runtime, as ``advedge bench`` runs it, agrees with it on
   at least :data:`~advedge.export.runtime.whitebox.MIN_AGREEMENT` of the top-1 predictions.
   ONNX Runtime rounds some FP32 biases that TensorRT keeps (see
   :mod:`~advedge.export.runtime.replica`); agreement is counted against the graph's arithmetic
   with that rounding where it is closer, and both figures are recorded.

A file that fails a check is never written: :class:`~advedge.errors.ExportError` names the check.
"""

from __future__ import annotations

import copy
import itertools
import os
from pathlib import Path
from typing import Any

import numpy as np

from advedge.calibration.nodes import qdq_edges, verify_qdq
from advedge.errors import ExportError
from advedge.export.graph import check_onnx, set_onnx_metadata
from advedge.export.runtime.whitebox import MIN_AGREEMENT
from advedge.qat.graph import numpy_weight_scale
from advedge.utils import atomic_path

__all__ = ["MAX_WRITTEN_DIFF", "graph_logits", "parity", "qat_initializers", "write_qat_onnx"]

#: The largest |Δ| of the logits between the trained graph and the replica of the file written
#: from it (the same operators on the same values: float rounding only).
MAX_WRITTEN_DIFF = 1e-3
_BATCH = 256


def qat_initializers(graph: Any) -> dict[str, np.ndarray]:
    """The initializers a graph writes back: every trained weight and bias, float32, and the
    scale of each quantised weight recomputed from it."""
    out = {name: p.detach().cpu().numpy().astype(np.float32) for name, p in graph.weights().items()}
    for q in graph.weight_quants:
        out[q.scale] = numpy_weight_scale(out[q.weight], q.axis)
    return out


def graph_logits(module: Any, x: np.ndarray) -> np.ndarray:
    """The logits of a torch module (the graph, a replica) on float32 NCHW images, in batches,
    on the module's device, without gradients."""
    import torch

    tensors = itertools.chain(module.parameters(), module.buffers())
    device = next(tensors, torch.zeros(())).device
    outs = []
    with torch.no_grad():
        for i in range(0, len(x), _BATCH):
            outs.append(
                module(torch.from_numpy(x[i : i + _BATCH]).to(device)).float().cpu().numpy()
            )
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def _replace_initializers(model: Any, values: dict[str, np.ndarray]) -> None:
    from onnx import numpy_helper

    by_name = {i.name: i for i in model.graph.initializer}
    for name, value in values.items():
        init = by_name.get(name)
        if init is None:
            raise ExportError(f"the PTQ file has no initializer {name!r} to write back")
        old = numpy_helper.to_array(init)
        if old.shape != value.shape or old.dtype != value.dtype:
            raise ExportError(
                f"initializer {name!r} is {old.dtype}{list(old.shape)} in the PTQ file, "
                f"{value.dtype}{list(value.shape)} after QAT"
            )
        init.CopyFrom(numpy_helper.from_array(value, name))


def _same_placement(ptq: Any, written: Any) -> None:
    """The written graph's nodes and Q/DQ edges are the PTQ file's."""

    def nodes(m: Any) -> list[tuple[str, str, tuple[str, ...]]]:
        return [(n.op_type, n.name, tuple(n.input)) for n in m.graph.node]

    if nodes(ptq) != nodes(written):
        raise ExportError("the written graph's nodes differ from the PTQ file's")
    before, after = qdq_edges(ptq), qdq_edges(written)
    if before != after:
        raise ExportError(
            f"the written Q/DQ placement differs from the PTQ file's ({len(before ^ after)} edges)"
        )


def parity(graph: Any, path: Path, x: np.ndarray) -> dict[str, Any]:
    """The written file against the trained graph (quantising) on ``x`` (see the module
    docstring)."""
    from advedge.export.runtime.onnxruntime import OrtRunner
    from advedge.export.runtime.replica import build_replica

    with graph.quantising():  # the file quantises, whatever the graph trained with
        mine = graph_logits(graph, x)
    written = graph_logits(build_replica(path, ort_bias_quantization=False), x)
    ort = OrtRunner(path, threads=1).run(x)
    rounded = build_replica(path)  # ONNX Runtime's bias rounding
    ort_like = graph_logits(rounded, x) if rounded.ort_rewrites else written
    top = ort.argmax(1)
    record = {
        "n": len(x),
        "written_max_abs_diff": float(np.abs(mine - written).max()),
        "agreement": float((mine.argmax(1) == top).mean()),
        "max_abs_diff": float(np.abs(mine - ort).max()),
        "agreement_ort_bias_rounding": float((ort_like.argmax(1) == top).mean()),
        "ort_rounded_biases": int(rounded.ort_rewrites),
        "min_agreement": MIN_AGREEMENT,
        "artifact_predictions": top,
    }
    return record


def write_qat_onnx(
    graph: Any,
    ptq: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    metadata: dict[str, Any],
    x: np.ndarray,
) -> dict[str, Any]:
    """Write ``graph`` back into a copy of the PTQ file ``ptq`` at ``dst`` (atomically), with
    ``metadata`` added, once it has passed the checks of the module docstring on the test
    images ``x`` (float32 NCHW in [0, 1]).

    Returns:
        The parity record (``n``, ``agreement``, ``max_abs_diff``,
        ``agreement_ort_bias_rounding``, ``written_max_abs_diff``, ``qdq_pairs``, and
        ``artifact_predictions``: the file's top-1 class of each image under ONNX Runtime).

    Raises:
        ExportError: a failed check (nothing is written).
    """
    import onnx

    ptq_model = onnx.load(str(ptq))
    model = copy.deepcopy(ptq_model)
    _replace_initializers(model, qat_initializers(graph))
    set_onnx_metadata(model, metadata)
    with atomic_path(dst) as tmp:
        onnx.save(model, str(tmp))
        check_onnx(tmp)
        written = onnx.load(str(tmp))
        pairs = verify_qdq(written)
        _same_placement(ptq_model, written)
        record = parity(graph, tmp, x)
        if record["written_max_abs_diff"] > MAX_WRITTEN_DIFF:
            raise ExportError(
                f"the written file computes logits up to {record['written_max_abs_diff']:.3g} "
                f"away from the trained graph's (at most {MAX_WRITTEN_DIFF:g})"
            )
        best = max(record["agreement"], record["agreement_ort_bias_rounding"])
        if best < MIN_AGREEMENT:
            raise ExportError(
                f"ONNX Runtime on the QAT file agrees with the trained graph on "
                f"{100 * best:.2f}% of the top-1 predictions (n = {len(x)}), below "
                f"{100 * MIN_AGREEMENT:.1f}%",
                "nothing was written",
            )
    return {**record, "qdq_pairs": pairs}

"""Robust quantisation-aware training (``advedge qat``): a student's INT8 Q/DQ file, fine-tuned
with fake quantisation in the loop under an adversarial distillation loss, written back as the
same symmetric Q/DQ ONNX.

Modules, lowest first: :mod:`~advedge.qat.graph` (the trainable Q/DQ graph: the file's weights as
parameters, its weight scales recomputed as the quantiser computes them, straight-through
rounding), :mod:`~advedge.qat.artifact` (the write-back and its checks), :mod:`~advedge.qat.config`
(:class:`QatConfig`), :mod:`~advedge.qat.sources` (the student and its PTQ file) and
:mod:`~advedge.qat.train` (:func:`run_qat`: the epochs, the checkpoints).
"""

from advedge.qat.artifact import write_qat_onnx
from advedge.qat.config import QatConfig
from advedge.qat.graph import build_qat_graph, numpy_weight_scale, weight_scale
from advedge.qat.train import METRIC_COLUMNS, QatResult, artifact_name, check_inputs, run_qat

__all__ = [
    "METRIC_COLUMNS",
    "QatConfig",
    "QatResult",
    "artifact_name",
    "build_qat_graph",
    "check_inputs",
    "numpy_weight_scale",
    "run_qat",
    "weight_scale",
    "write_qat_onnx",
]

"""Runners: one call convention for every artifact advedge deploys, and ``advedge bench``.

- :mod:`~advedge.export.runtime.base`: the :class:`Runner` contract, its :class:`RunnerInfo`,
  the :data:`BACKENDS` registry and :func:`open_runner`;
- :mod:`~advedge.export.runtime.torch`, :mod:`~advedge.export.runtime.onnxruntime`,
  :mod:`~advedge.export.runtime.tensorrt`: the backends (each registers itself on import);
- :mod:`~advedge.export.runtime.bench`: latency and robust accuracy on the artifact itself,
  with :mod:`~advedge.export.runtime.environment` (the machine it ran on) and
  :mod:`~advedge.export.runtime.transfer` (its transfer sets).

Torch-free at import: each backend imports its library when a runner is made.
"""

from advedge.export._deps import ORT_LOG_SEVERITY, ORT_QUIET_SEVERITY, quiet_onnxruntime
from advedge.export.runtime.base import BACKENDS, Runner, RunnerInfo, artifact_kind, open_runner

# the backends register in this order: --backend lists them so, "auto" picks per file type
from advedge.export.runtime.torch import TorchRunner  # isort: skip
from advedge.export.runtime.onnxruntime import OrtRunner  # isort: skip
from advedge.export.runtime.tensorrt import TrtRunner  # isort: skip

__all__ = [
    "BACKENDS",
    "ORT_LOG_SEVERITY",
    "ORT_QUIET_SEVERITY",
    "OrtRunner",
    "Runner",
    "RunnerInfo",
    "TorchRunner",
    "TrtRunner",
    "artifact_kind",
    "open_runner",
    "quiet_onnxruntime",
]

"""Strongly typed TensorRT engines from advedge's ONNX artifacts.

- :mod:`~advedge.export.tensorrt.builder`: :func:`build_engine` (see its module docstring for
  the strongly typed build and the legacy implicit INT8 path);
- :mod:`~advedge.export.tensorrt.engine`: what building and running share (importing TensorRT,
  the batch profile, the engine's file name and sidecar, the compatibility check);
- :mod:`~advedge.export.tensorrt.cuda`: the CUDA I/O buffers (torch CUDA tensors, else pycuda)
  on a stream of their own and the chosen device.

The runner for a built engine is :class:`advedge.export.runtime.tensorrt.TrtRunner`. TensorRT,
torch and pycuda are imported lazily; without TensorRT every entry point raises
MissingDependencyError (exit 3).
"""

from advedge.export.tensorrt.builder import EngineBuild, build_engine
from advedge.export.tensorrt.cuda import cuda_backend, cuda_index
from advedge.export.tensorrt.engine import (
    BatchProfile,
    check_engine_compatible,
    engine_filename,
    load_tensorrt,
)

__all__ = [
    "BatchProfile",
    "EngineBuild",
    "build_engine",
    "check_engine_compatible",
    "cuda_backend",
    "cuda_index",
    "engine_filename",
    "load_tensorrt",
]

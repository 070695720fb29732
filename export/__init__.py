"""advedge.export: the deploy side of advedge.

- :mod:`~advedge.export.onnx_export`: PyTorch -> ONNX (classifier, purifier, or both fused);
- :mod:`~advedge.export.graph`: the ONNX checker, the external-data guard, metadata and sidecars;
- :mod:`~advedge.export.parity`: the parity gate (artifact vs PyTorch, clean and adversarial);
- :mod:`~advedge.export.fp16`: FP16 with FP32 I/O (onnxconverter-common);
- :mod:`~advedge.export.runtime`: runners with one call convention (PyTorch, ONNX Runtime) and
  the one helper that keeps ONNX Runtime's console output off stderr;
- :mod:`~advedge.export.tensorrt`: strongly typed TensorRT 10/11 engines and their runner;
- :mod:`~advedge.export.exporter`: ``advedge export`` and ``advedge calibrate``.

Nothing here imports torch, onnx, ONNX Runtime, TensorRT or pycuda at module level: a device
that has only numpy and ONNX Runtime or TensorRT can run artifacts.
"""

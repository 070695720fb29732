"""advedge.export: the deploy side of advedge.

Graph level (below :mod:`advedge.calibration`):

- :mod:`~advedge.export._deps`: lazy imports of the optional libraries, and the one helper that
  keeps ONNX Runtime's console output off stderr;
- :mod:`~advedge.export.onnx_export`: PyTorch -> ONNX (classifier, purifier, or both fused);
- :mod:`~advedge.export.graph`: the ONNX checker, the external-data guard, metadata and sidecars;
- :mod:`~advedge.export.parity`: the parity comparison and gate (artifact vs PyTorch);
- :mod:`~advedge.export.fp16`: FP16 with FP32 I/O (onnxconverter-common).

Runtime (above :mod:`advedge.calibration`):

- :mod:`~advedge.export.runtime`: runners with one call convention (PyTorch, ONNX Runtime,
  TensorRT) and ``advedge bench``;
- :mod:`~advedge.export.tensorrt`: strongly typed TensorRT 10/11 engines.

``advedge export`` (above the runtime):

- :mod:`~advedge.export.precisions`: the precision table (converter, parity tolerance, options);
- :mod:`~advedge.export.targets`: what is exported, the test images and the PGD examples;
- :mod:`~advedge.export.gates`: the parity gate on an artifact and the accuracy report;
- :mod:`~advedge.export.artifacts`: staging in ``out`` and what ``out`` already holds;
- :mod:`~advedge.export.exporter`: :func:`~advedge.export.exporter.export_artifacts`.

``advedge calibrate`` is :func:`advedge.calibration.calibrate_file`.

Nothing here imports torch, onnx, ONNX Runtime, TensorRT or pycuda at module level: a device
that has only numpy and ONNX Runtime or TensorRT can run artifacts.
"""

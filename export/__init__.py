"""advedge.export: the deploy side of advedge.

It will hold ONNX export with a parity gate (classifier, purifier, or both fused), the strongly
typed TensorRT engine builder, and the runtime runners (torch, ONNX Runtime, TensorRT) used by
``advedge bench``. Nothing here imports torch at module level: a device that has only numpy,
ONNX Runtime or TensorRT can run artifacts.
"""

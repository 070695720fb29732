"""advedge.calibration: INT8 calibration for deployed artifacts.

It will hold calibration sets, explicit INT8 quantisation as symmetric Q/DQ pairs in the ONNX
graph, the legacy TensorRT 10 implicit calibrator (where the installed TensorRT still has
``IInt8EntropyCalibrator2``) and calibration caches. Nothing here imports torch at module level.
"""

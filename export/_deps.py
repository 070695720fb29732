"""Lazy imports of the deploy side's optional libraries, with an install hint when absent.

Nothing in ``advedge.export`` or ``advedge.calibration`` imports torch, onnx, onnxruntime,
TensorRT or pycuda at module level: a device may have only some of them.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from advedge.errors import MissingDependencyError

__all__ = ["require"]

# module -> (pip extra that installs it, what it is)
_EXTRAS = {
    "onnx": ("export", "the onnx package"),
    "onnxruntime": ("export", "ONNX Runtime"),
    "onnxscript": ("export", "onnxscript (torch's ONNX exporter)"),
    "onnxconverter_common": ("export", "onnxconverter-common (the float16 converter)"),
    "tensorrt": ("trt", "TensorRT"),
    "pycuda": ("trt", "pycuda"),
    "torch": ("", "PyTorch"),
}


def require(module: str, *, purpose: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependencyError` (exit code 3) with a hint.

    Args:
        module: Dotted module name, e.g. ``"onnxruntime.quantization"``.
        purpose: What needs it, for the message (e.g. ``"INT8 calibration"``).
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        root = module.split(".")[0]
        extra, what = _EXTRAS.get(root, ("", root))
        if root == "tensorrt":
            hint = (
                "install TensorRT on the device that will run the engine (JetPack ships it on "
                "Jetson; `pip install tensorrt` on a desktop GPU); engines are not portable"
            )
        elif root == "torch":
            hint = "pip install torch (this step runs on the host)"
        else:
            hint = f"pip install 'advedge[{extra}]'" if extra else f"pip install {root}"
        raise MissingDependencyError(
            f"{purpose} needs {what}, which cannot be imported ({type(exc).__name__}: {exc})",
            hint,
        ) from None

"""The legacy implicit INT8 calibrator of TensorRT 10 (entropy or min-max, with a cache file).

TensorRT 11 removed implicit calibration (``IInt8EntropyCalibrator2``, ``config.int8_calibrator``
and the INT8 builder flag); there INT8 comes only from Q/DQ nodes in the ONNX (see
:mod:`advedge.calibration.quantize`). JetPack 6 ships TensorRT 10.3, which still has it, so this
path is offered where the installed TensorRT has the class, detected by feature
(``hasattr(trt, "IInt8EntropyCalibrator2")``), never by version number.

The calibrator class is created at call time as a subclass of the installed TensorRT's base
class, because the base class exists only once ``tensorrt`` is imported (and not at all in
TensorRT 11). Device memory is someone else's business: the TensorRT module injects ``alloc``
and ``copy_to_device`` (torch CUDA tensors, or pycuda where there is no torch), so this module
imports neither CUDA nor TensorRT.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from advedge.calibration.sets import CalibrationSet

from advedge.errors import ExportError, UsageError
from advedge.utils import atomic_write_bytes

logger = logging.getLogger(__name__)

__all__ = ["LEGACY_METHODS", "device_pointer", "has_legacy_calibrator", "make_legacy_calibrator"]

#: Methods of the legacy calibrator and the TensorRT base class each one uses.
LEGACY_METHODS: dict[str, str] = {
    "entropy": "IInt8EntropyCalibrator2",
    "minmax": "IInt8MinMaxCalibrator",
}


def has_legacy_calibrator(trt: Any) -> bool:
    """Whether the TensorRT module ``trt`` still has implicit INT8 calibration (TensorRT <= 10)."""
    return hasattr(trt, "IInt8EntropyCalibrator2")


def device_pointer(buf: Any) -> int:
    """The device address of a buffer from ``alloc``: ``buf.data_ptr()`` (a torch tensor) or
    ``int(buf)`` (a pycuda ``DeviceAllocation``, or a plain integer address)."""
    if hasattr(buf, "data_ptr"):
        return int(buf.data_ptr())
    return int(buf)


def make_legacy_calibrator(
    trt: Any,
    calib: CalibrationSet,
    *,
    method: str = "entropy",
    cache_file: str | os.PathLike[str],
    batch_size: int,
    alloc: Callable[[int], Any],
    copy_to_device: Callable[[Any, np.ndarray], None],
) -> Any:
    """An implicit INT8 calibrator for ``trt.IBuilderConfig.int8_calibrator``.

    The returned object subclasses ``trt.IInt8EntropyCalibrator2`` (``method="entropy"``) or
    ``trt.IInt8MinMaxCalibrator`` (``"minmax"``) and implements the methods TensorRT calls:

    * ``get_batch_size()`` -> ``batch_size``.
    * ``get_batch(names)`` -> ``[pointer]`` for the next batch of ``batch_size`` float32 NCHW
      images in [0, 1] (copied into one device buffer of ``batch_size * C * H * W * 4`` bytes,
      allocated once with ``alloc(nbytes)`` and filled with ``copy_to_device(buf, array)``), or
      None when the set is exhausted. TensorRT calibrates with full batches only, so a last
      partial batch is dropped: ``len(calib) // batch_size`` batches are served.
    * ``read_calibration_cache()`` -> the bytes of ``cache_file``, or None if it does not exist
      (TensorRT then calibrates). The file is TensorRT's own cache format; key its name by the
      model and the calibration set (their sha256) so that a stale cache is never read.
    * ``write_calibration_cache(cache)`` writes ``cache_file`` atomically.

    Args:
        trt: The imported ``tensorrt`` module.
        calib: The calibration set.
        method: ``entropy`` or ``minmax``.
        cache_file: TensorRT's calibration cache file.
        batch_size: Images per batch; the calibration profile's batch dimension.
        alloc: ``alloc(nbytes) -> buffer`` on the device; the pointer is
            :func:`device_pointer` of the buffer.
        copy_to_device: ``copy_to_device(buffer, array)`` copies a contiguous float32 array and
            has finished when it returns: TensorRT reads the batch on a stream of its own, as
            soon as ``get_batch`` returns (the CUDA backends' ``to_device`` waits; their
            ``to_device_async`` does not, and must not be used here).

    Raises:
        UsageError: the installed TensorRT has no implicit calibrator (TensorRT 11), an unknown
            method, or a batch size below 1.
        ExportError: the set is smaller than one batch.
    """
    base = _legacy_base(trt, calib, method, batch_size)
    cache_path = Path(cache_file)
    images = calib.as_float()
    n_batches = len(images) // int(batch_size)
    if n_batches * batch_size < len(images):
        logger.info(
            "legacy calibration uses %d of %d images (%d full batches of %d)",
            n_batches * batch_size,
            len(images),
            n_batches,
            batch_size,
        )
    methods = _calibrator_methods(
        base, images, batch_size, n_batches, cache_path, alloc, copy_to_device
    )
    cls = type(
        f"Advedge{LEGACY_METHODS[method][1:]}",
        (base,),
        {
            **methods,
            "__doc__": f"advedge's legacy {method} calibrator over {len(images)} images.",
            "n_batches": n_batches,
            "cache_file": cache_path,
        },
    )
    return cls()


def _legacy_base(trt: Any, calib: CalibrationSet, method: str, batch_size: int) -> Any:
    """The TensorRT calibrator class of ``method``, once the request is checked."""
    version = getattr(trt, "__version__", "(unknown version)")
    if not has_legacy_calibrator(trt):
        raise UsageError(
            f"the installed TensorRT {version} has no implicit INT8 calibrator "
            "(removed in TensorRT 11)",
            "use --precision int8, which builds from the explicit Q/DQ ONNX",
        )
    if method not in LEGACY_METHODS:
        raise UsageError(f"unknown legacy calibration method {method!r}", "use entropy or minmax")
    base = getattr(trt, LEGACY_METHODS[method], None)
    if base is None:
        raise UsageError(
            f"the installed TensorRT {version} has no {LEGACY_METHODS[method]}",
            "use method entropy",
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise UsageError(f"calibration batch size must be an integer, got {batch_size!r}")
    if batch_size < 1:
        raise UsageError(f"calibration batch size must be >= 1, got {batch_size}")
    if len(calib) < batch_size:
        raise ExportError(
            f"calibration set of {len(calib)} images is smaller than the batch {batch_size}",
            "use a smaller batch size or a larger calibration set",
        )
    return base


def _calibrator_methods(
    base: Any,
    images: np.ndarray,
    batch_size: int,
    n_batches: int,
    cache_path: Path,
    alloc: Callable[[int], Any],
    copy_to_device: Callable[[Any, np.ndarray], None],
) -> dict[str, Any]:
    """The methods TensorRT calls on a calibrator (see :func:`make_legacy_calibrator`)."""

    def __init__(self: Any) -> None:
        base.__init__(self)  # TensorRT's pybind base classes need their __init__ called
        self._batch = 0
        self._buf: Any = None
        self._ptr = 0

    def get_batch_size(self: Any) -> int:
        return int(batch_size)

    def get_batch(self: Any, names: list[str], *args: Any) -> list[int] | None:
        if self._batch >= n_batches:
            return None
        if len(names) != 1:
            raise ExportError(
                f"the legacy calibrator feeds one image input, the network has {len(names)}"
            )
        start = self._batch * batch_size
        array = np.ascontiguousarray(images[start : start + batch_size])
        if self._buf is None:
            self._buf = alloc(array.nbytes)
            self._ptr = device_pointer(self._buf)
        copy_to_device(self._buf, array)
        self._batch += 1
        return [self._ptr]

    def read_calibration_cache(self: Any) -> bytes | None:
        if cache_path.is_file():
            logger.info("reading TensorRT calibration cache %s", cache_path)
            return cache_path.read_bytes()
        return None

    def write_calibration_cache(self: Any, cache: Any) -> None:
        atomic_write_bytes(cache_path, bytes(cache))
        logger.info("wrote TensorRT calibration cache %s", cache_path)

    return {
        "__init__": __init__,
        "get_batch_size": get_batch_size,
        "get_batch": get_batch,
        "read_calibration_cache": read_calibration_cache,
        "write_calibration_cache": write_calibration_cache,
    }

"""CUDA device buffers for TensorRT's I/O: torch CUDA tensors when torch sees a GPU, else pycuda.

Both backends offer the same small interface (``alloc``, ``to_device``, ``to_host``,
``synchronize``, ``stream_handle``, ``capability``, ``gpu_name``); the engine builder, the
TensorRT runner and the legacy calibrator use it. torch and pycuda are imported lazily.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from advedge.export._deps import require

from advedge.errors import ExportError

__all__ = ["Buffer", "PyCuda", "TorchCuda", "cuda_backend"]


class Buffer:
    """A device buffer; ``int(buf)`` is its device pointer."""

    def __init__(self, ptr: int, owner: Any, nbytes: int) -> None:
        self.ptr = int(ptr)
        self.owner = owner  # keeps the allocation alive
        self.nbytes = nbytes

    def __int__(self) -> int:
        return self.ptr


class TorchCuda:
    """Buffers as torch CUDA tensors (``data_ptr()``), on torch's current stream."""

    name = "torch"

    def __init__(self, torch: Any, device: int) -> None:
        self.torch = torch
        self.device = torch.device("cuda", device)

    @property
    def stream(self) -> Any:
        """The current CUDA stream, fetched at each use (a caller may have switched it)."""
        return self.torch.cuda.current_stream(self.device)

    @property
    def stream_handle(self) -> int:
        return int(self.stream.cuda_stream)

    def capability(self) -> tuple[int, int]:
        return tuple(self.torch.cuda.get_device_capability(self.device))  # type: ignore[return-value]

    def gpu_name(self) -> str:
        return str(self.torch.cuda.get_device_name(self.device))

    def alloc(self, nbytes: int) -> Buffer:
        t = self.torch.empty(max(1, nbytes), dtype=self.torch.uint8, device=self.device)
        return Buffer(t.data_ptr(), t, nbytes)

    def to_device(self, buf: Buffer, array: np.ndarray) -> None:
        src = self.torch.from_numpy(np.ascontiguousarray(array).view(np.uint8).reshape(-1))
        buf.owner[: src.numel()].copy_(src, non_blocking=False)

    def to_host(self, buf: Buffer, out: np.ndarray) -> None:
        out.view(np.uint8).reshape(-1)[:] = buf.owner[: out.nbytes].cpu().numpy()

    def synchronize(self) -> None:
        self.stream.synchronize()


class PyCuda:
    """Buffers as pycuda allocations on a stream of its own (devices without torch)."""

    name = "pycuda"

    def __init__(self, device: int) -> None:
        self.cuda = require("pycuda.driver", purpose="TensorRT I/O buffers without torch")
        try:
            require("pycuda.autoinit", purpose="TensorRT I/O buffers without torch")
            self.dev = self.cuda.Device(device)
            self.stream = self.cuda.Stream()
        except ImportError:
            raise
        except Exception as exc:  # pycuda's driver errors when there is no usable GPU
            raise ExportError(f"no usable CUDA device {device}: {exc}") from None

    @property
    def stream_handle(self) -> int:
        return int(self.stream.handle)

    def capability(self) -> tuple[int, int]:
        major, minor = self.dev.compute_capability()
        return int(major), int(minor)

    def gpu_name(self) -> str:
        return str(self.dev.name())

    def alloc(self, nbytes: int) -> Buffer:
        mem = self.cuda.mem_alloc(max(1, nbytes))
        return Buffer(int(mem), mem, nbytes)

    def to_device(self, buf: Buffer, array: np.ndarray) -> None:
        # The source is pageable host memory and the consumer may be TensorRT on its own stream
        # (the calibrator): wait for the copy to land before handing out the pointer.
        self.cuda.memcpy_htod_async(buf.owner, np.ascontiguousarray(array), self.stream)
        self.stream.synchronize()

    def to_host(self, buf: Buffer, out: np.ndarray) -> None:
        self.cuda.memcpy_dtoh_async(out, buf.owner, self.stream)

    def synchronize(self) -> None:
        self.stream.synchronize()


def cuda_backend(device: int = 0, prefer: str = "auto") -> Any:
    """The buffer backend: torch CUDA tensors if torch sees a GPU (``prefer="auto"|"torch"``),
    else pycuda.

    Raises:
        MissingDependencyError: neither torch with CUDA nor pycuda is importable.
    """
    if prefer in ("auto", "torch"):
        try:
            import torch
        except ImportError:
            torch = None
        if torch is not None and torch.cuda.is_available():
            return TorchCuda(torch, device)
        if prefer == "torch":
            raise ExportError("torch cannot see a CUDA device", "install pycuda or a CUDA torch")
    return PyCuda(device)

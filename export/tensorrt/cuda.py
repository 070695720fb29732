"""CUDA device buffers for TensorRT's I/O: torch CUDA tensors when torch sees a GPU, else pycuda.

Both backends offer the same small interface; the engine builder, the TensorRT runner and the
legacy calibrator use it:

- ``activated()``: a context manager that makes the backend's device current while TensorRT is
  called (TensorRT runs on the CUDA runtime's current device, which is per thread);
- ``stream_handle``: the backend's own stream, a non-blocking stream made once per backend.
  TensorRT's ``execute_async_v3`` gets this handle, never the default stream (on the default
  stream TensorRT warns and synchronises on every call);
- ``alloc(nbytes)`` -> :class:`Buffer`;
- ``to_device_async(buf, array)`` and ``to_host(buf, out)``: copies queued on that same stream,
  so they are ordered with the engine's work; ``out`` may be read only after ``synchronize()``;
- ``to_device(buf, array)``: the same copy, waited for before it returns, for a consumer on
  another stream (the legacy calibrator hands the pointer to TensorRT's own stream);
- ``synchronize()``: waits for everything queued on the stream;
- ``capability()``, ``gpu_name()``, ``index`` (the CUDA device index) and ``name``.

Device ``N`` is honoured on both: torch's current device is set to ``N`` (``torch.cuda.set_device``)
and re-asserted around each TensorRT call; with pycuda advedge retains the **primary context** of
``Device(N)`` and pushes it around each call, instead of importing ``pycuda.autoinit`` (which
always creates a new, non-primary context on device 0). The primary context is the one the CUDA
runtime uses, so TensorRT, pycuda and a torch in the same process share one context per device.

torch and pycuda are imported lazily; the torch module comes from :func:`_import_torch`, where
the tests put a double of torch's CUDA API (``tests/fakes/torch_cuda.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
from advedge.export._deps import require

from advedge.errors import ExportError, UsageError

__all__ = ["Buffer", "PyCuda", "TorchCuda", "cuda_backend", "cuda_index"]


class Buffer:
    """A device buffer; ``int(buf)`` is its device pointer."""

    def __init__(self, ptr: int, owner: Any, nbytes: int) -> None:
        self.ptr = int(ptr)
        self.owner = owner  # keeps the allocation alive
        self.nbytes = nbytes

    def __int__(self) -> int:
        return self.ptr


def cuda_index(device: str | int | None) -> int:
    """The CUDA device index of ``"cuda:N"`` or ``N``; 0 for ``None``, ``"auto"``, ``"cuda"`` and
    ``"cpu"`` (bench's ``--device`` also says where PyTorch runs, and a TensorRT engine runs on a
    GPU whatever it says, as ONNX Runtime's GPU providers do).

    Raises:
        UsageError: a negative index or a string that names no device.
    """
    if device is None:
        return 0
    if isinstance(device, int) and not isinstance(device, bool):
        if device < 0:
            raise UsageError(f"bad CUDA device index {device}", "write cuda:0, cuda:1...")
        return device
    text = str(device).strip().lower()
    if text in ("auto", "cuda", "cpu"):
        return 0
    head, _, index = text.partition(":")
    if head == "cuda" and index.isdigit():
        return int(index)
    raise UsageError(f"bad CUDA device {device!r}", "write auto, cuda or cuda:N")


class TorchCuda:
    """Buffers as torch CUDA tensors (``data_ptr()``), on a torch stream of the backend's own."""

    name = "torch"

    def __init__(self, torch: Any, device: int) -> None:
        self.torch = torch
        self.index = int(device)
        count = int(torch.cuda.device_count())
        if not 0 <= self.index < count:
            raise ExportError(f"no CUDA device {self.index}: torch sees {count}")
        self.device = torch.device("cuda", self.index)
        # TensorRT uses the CUDA runtime's current device, which is torch's current device
        torch.cuda.set_device(self.device)
        self.stream = torch.cuda.Stream(device=self.device)
        self._in_flight: list[Any] = []  # host tensors a queued copy still reads or writes

    @contextlib.contextmanager
    def activated(self) -> Iterator[None]:
        """This backend's device as the current device (per thread) while TensorRT is called."""
        with self.torch.cuda.device(self.device):
            yield

    @property
    def stream_handle(self) -> int:
        return int(self.stream.cuda_stream)

    def capability(self) -> tuple[int, int]:
        major, minor = self.torch.cuda.get_device_capability(self.device)
        return int(major), int(minor)

    def gpu_name(self) -> str:
        return str(self.torch.cuda.get_device_name(self.device))

    def alloc(self, nbytes: int) -> Buffer:
        # allocated on the backend's stream: torch's caching allocator ties a block to the
        # stream current at allocation and reuses it only when that stream is past its use
        with self.torch.cuda.stream(self.stream):
            t = self.torch.empty(max(1, nbytes), dtype=self.torch.uint8, device=self.device)
        return Buffer(t.data_ptr(), t, nbytes)

    def _bytes(self, array: np.ndarray) -> Any:
        """A host uint8 tensor over ``array``'s memory (no copy)."""
        return self.torch.from_numpy(array.view(np.uint8).reshape(-1))

    def to_device_async(self, buf: Buffer, array: np.ndarray) -> None:
        src = self._bytes(np.ascontiguousarray(array))
        with self.torch.cuda.stream(self.stream):
            buf.owner[: src.numel()].copy_(src, non_blocking=True)
        self._in_flight.append(src)

    def to_device(self, buf: Buffer, array: np.ndarray) -> None:
        self.to_device_async(buf, array)
        self.synchronize()

    def to_host(self, buf: Buffer, out: np.ndarray) -> None:
        if not out.flags.c_contiguous:
            raise ExportError("to_host needs a contiguous host array")
        dst = self._bytes(out)
        with self.torch.cuda.stream(self.stream):
            dst.copy_(buf.owner[: out.nbytes], non_blocking=True)
        self._in_flight.append(dst)

    def synchronize(self) -> None:
        self.stream.synchronize()
        self._in_flight.clear()


class PyCuda:
    """Buffers as pycuda allocations on a stream of its own, in the device's primary context
    (devices without torch)."""

    name = "pycuda"

    def __init__(self, device: int) -> None:
        self.cuda = require("pycuda.driver", purpose="TensorRT I/O buffers without torch")
        self.index = int(device)
        try:
            self.cuda.init()
            self.dev = self.cuda.Device(self.index)
            self.context = self.dev.retain_primary_context()
            with self.activated():
                self.stream = self.cuda.Stream()
        except ImportError:
            raise
        except Exception as exc:  # pycuda's driver errors when there is no usable GPU
            raise ExportError(f"no usable CUDA device {device}: {exc}") from None
        self._in_flight: list[Any] = []

    @contextlib.contextmanager
    def activated(self) -> Iterator[None]:
        """The device's primary context pushed (current) while TensorRT is called."""
        self.context.push()
        try:
            yield
        finally:
            self.cuda.Context.pop()

    @property
    def stream_handle(self) -> int:
        return int(self.stream.handle)

    def capability(self) -> tuple[int, int]:
        major, minor = self.dev.compute_capability()
        return int(major), int(minor)

    def gpu_name(self) -> str:
        return str(self.dev.name())

    def alloc(self, nbytes: int) -> Buffer:
        with self.activated():
            mem = self.cuda.mem_alloc(max(1, nbytes))
        return Buffer(int(mem), mem, nbytes)

    def to_device_async(self, buf: Buffer, array: np.ndarray) -> None:
        src = np.ascontiguousarray(array)
        with self.activated():
            self.cuda.memcpy_htod_async(buf.owner, src, self.stream)
        self._in_flight.append(src)

    def to_device(self, buf: Buffer, array: np.ndarray) -> None:
        self.to_device_async(buf, array)
        self.synchronize()

    def to_host(self, buf: Buffer, out: np.ndarray) -> None:
        with self.activated():
            self.cuda.memcpy_dtoh_async(out, buf.owner, self.stream)
        self._in_flight.append(out)

    def synchronize(self) -> None:
        with self.activated():
            self.stream.synchronize()
        self._in_flight.clear()


def _import_torch() -> Any:
    """torch, or None where it is not installed (the tests' seam for a torch-CUDA double)."""
    try:
        import torch
    except ImportError:
        return None
    return torch


def cuda_backend(device: str | int | None = 0, prefer: str = "auto") -> Any:
    """The buffer backend on CUDA device ``device`` (an index or ``"cuda:N"``): torch CUDA
    tensors if torch sees a GPU (``prefer="auto"|"torch"``), else pycuda.

    Raises:
        MissingDependencyError: neither torch with CUDA nor pycuda is importable.
        ExportError: no such device.
        UsageError: ``device`` names no CUDA device.
    """
    index = cuda_index(device)
    if prefer in ("auto", "torch"):
        torch = _import_torch()
        if torch is not None and torch.cuda.is_available():
            return TorchCuda(torch, index)
        if prefer == "torch":
            raise ExportError("torch cannot see a CUDA device", "install pycuda or a CUDA torch")
    return PyCuda(index)

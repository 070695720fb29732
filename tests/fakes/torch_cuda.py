"""Test double of the small part of torch's CUDA API that advedge's TensorRT I/O uses. NOT torch.

``make_torch_cuda(machine)`` returns a stand-in for the ``torch`` module as
:class:`advedge.export.tensorrt.cuda.TorchCuda` sees it (it is handed the module): ``device``
(torch's real ``torch.device``), the dtypes ``uint8``/``float32``, ``from_numpy``, ``empty``, and a
``cuda`` namespace. Tensors on ``"cuda"`` live in the pretend machine's device memory
(``tests/fakes/device.py``), so ``data_ptr()`` is a pointer the TensorRT double reads and writes,
and streams are the machine's streams, so ``Stream.cuda_stream`` is a handle ``execute_async_v3``
accepts. Nothing else of torch is replaced: the real torch keeps working beside it.

Surface modelled, following the torch.cuda reference (pytorch.org/docs/stable/cuda.html), its
"CUDA semantics" notes (streams, ``non_blocking``) and the tutorial "A guide on good usage of
non_blocking and pin_memory()":

* ``cuda.is_available()``, ``device_count()``, ``current_device()``, ``set_device(device)``
  (the device's primary context becomes current: what TensorRT, on the CUDA runtime, then uses),
  ``device(device)`` (a context manager that switches the current device and restores it),
  ``get_device_capability(device=None)``, ``get_device_name(device=None)``,
  ``synchronize(device=None)`` (all queued work of the device);
  a bad ordinal raises RuntimeError ("CUDA error: invalid device ordinal");
* ``cuda.Stream(device=None, priority=0)``: a new non-blocking stream (torch creates its streams
  with ``cudaStreamNonBlocking``) with ``cuda_stream`` (the handle), ``device``,
  ``synchronize()``, ``query()``; ``current_stream(device=None)`` and
  ``default_stream(device=None)`` (the legacy default stream, ``cuda_stream == 0``, until a
  ``cuda.stream(s)`` block makes ``s`` current; like torch's ``StreamContext`` it also switches
  the current device to the stream's); ``cuda.Event(enable_timing=False)`` with
  ``record(stream=None)``, ``synchronize()``, ``query()``, ``elapsed_time(end)``;
* ``empty(*size, dtype=, device=, pin_memory=False)``: a CUDA tensor for a ``cuda`` device, else a
  host tensor; ``from_numpy(array)``: a host tensor sharing the array's memory;
* tensors: ``data_ptr()``, ``numel()``, ``nbytes``, ``dtype``, ``device``, ``is_cuda``,
  ``is_pinned()``, ``pin_memory()``, 1-D ``[a:b]`` views, ``numpy()`` (host), ``cpu()`` (CUDA: a
  blocking copy) and ``copy_(src, non_blocking=False)``. A copy between host and device is queued
  on the **current stream of the CUDA tensor's device** and runs when that stream (or the
  device) is synchronised; with ``non_blocking=False`` torch waits for it before returning. A
  pageable host source is read at the call (CUDA stages pageable memory), a pinned one when the
  copy runs; a host destination is written when the copy runs, pinned or not (the tutorial:
  reading it before a synchronisation may see incomplete data).

Not modelled: every other torch function and tensor method, dtype conversion in ``copy_``
(source and destination must have the same dtype and number of elements), broadcasting,
multi-dimensional views, the caching allocator's reuse and its stream bookkeeping
(``record_stream``), ``wait_stream`` and other cross-stream waits, graphs, autocast.
"""

from __future__ import annotations

import contextlib
import time
import types
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np

from . import device as _dev

__all__ = ["make_torch_cuda"]


def make_torch_cuda(  # long: one closure per torch.cuda name, as the module lists them
    machine: _dev.Machine | None = None,
) -> types.ModuleType:
    """A stand-in ``torch`` module (see the module docstring) over ``machine`` (default: the
    active pretend machine)."""
    import torch as real

    dtypes = {
        real.uint8: np.dtype(np.uint8),
        real.int8: np.dtype(np.int8),
        real.float32: np.dtype(np.float32),
        real.float16: np.dtype(np.float16),
        real.int32: np.dtype(np.int32),
        real.int64: np.dtype(np.int64),
    }
    m = machine or _dev.active()
    mod = types.ModuleType("torch", "Test double of torch's CUDA API (tests/fakes/torch_cuda.py).")
    cuda = types.ModuleType("torch.cuda", "Test double of torch.cuda (not torch).")
    current: dict[int, Any] = {}  # device -> its current Stream
    defaults: dict[int, Any] = {}

    def _index(device: Any = None) -> int:
        if device is None:
            return m.current_device()
        if isinstance(device, Stream):
            return device._rec.device
        if isinstance(device, str):
            device = real.device(device)
        if isinstance(device, real.device):
            if device.type != "cuda":
                raise ValueError(f"Expected a cuda device, but got: {device}")
            return m.current_device() if device.index is None else int(device.index)
        return int(device)

    def _valid(device: Any = None) -> int:
        index = _index(device)
        if not m.valid(index):
            raise RuntimeError("CUDA error: invalid device ordinal")
        return index

    def _wait(rec: _dev.StreamRecord, upto: int | None = None) -> None:
        try:
            _dev.synchronize(rec, upto)
        except _dev.DeviceFault as exc:
            raise RuntimeError(f"CUDA error: {exc}") from None

    class Stream:
        def __init__(self, device: Any = None, priority: int = 0, **kwargs: Any) -> None:
            self._rec = _dev.new_stream(_valid(device), blocking=False)

        @classmethod
        def _default(cls, index: int) -> Stream:
            if index not in defaults:
                s = cls.__new__(cls)
                s._rec = _dev.stream_record(0, index)
                defaults[index] = s
            return defaults[index]

        @property
        def cuda_stream(self) -> int:
            return self._rec.handle

        @property
        def device(self) -> Any:
            return real.device("cuda", self._rec.device)

        def synchronize(self) -> None:
            _wait(self._rec)

        def query(self) -> bool:
            return not _dev.pending(self._rec)

        def __eq__(self, other: object) -> bool:
            return isinstance(other, Stream) and other._rec is self._rec

        def __hash__(self) -> int:
            return id(self._rec)

        def __repr__(self) -> str:
            return f"<torch.cuda.Stream device=cuda:{self._rec.device} cuda_stream={self.cuda_stream:#x}>"

    def current_stream(device: Any = None) -> Stream:
        index = _valid(device)
        return current.get(index) or Stream._default(index)

    def default_stream(device: Any = None) -> Stream:
        return Stream._default(_valid(device))

    @contextlib.contextmanager
    def device_ctx(device: Any) -> Iterator[None]:
        index = _valid(device)
        before = m.current_device()
        m.set_device(index)
        try:
            yield
        finally:
            m.set_device(before)

    @contextlib.contextmanager
    def stream_ctx(stream: Stream | None) -> Iterator[None]:
        if stream is None:
            yield
            return
        index = stream._rec.device
        before_device, before = m.current_device(), current.get(index)
        m.set_device(index)
        current[index] = stream
        try:
            yield
        finally:
            if before is None:
                current.pop(index, None)
            else:
                current[index] = before
            m.set_device(before_device)

    def set_device(device: Any) -> None:
        m.set_device(_valid(device))

    def synchronize(device: Any = None) -> None:
        try:
            _dev.synchronize_device(_valid(device))
        except _dev.DeviceFault as exc:
            raise RuntimeError(f"CUDA error: {exc}") from None

    class Event:
        def __init__(self, enable_timing: bool = False, **kwargs: Any) -> None:
            self._timing = enable_timing
            self._t: float | None = None
            self._at: tuple[_dev.StreamRecord, int] | None = None

        def record(self, stream: Stream | None = None) -> None:
            rec = (stream or current_stream())._rec
            self._t = None

            def mark() -> None:
                self._t = time.perf_counter()

            self._at = (rec, _dev.enqueue(rec, mark, "cudaEventRecord"))

        def synchronize(self) -> None:
            if self._at is not None:
                _wait(*self._at)

        def query(self) -> bool:
            return self._at is None or self._t is not None

        def elapsed_time(self, end: Event) -> float:
            if not (self._timing and end._timing):
                raise RuntimeError(
                    "Both events must be created with argument 'enable_timing=True'."
                )
            if self._t is None or end._t is None:
                raise RuntimeError("CUDA error: device not ready")
            return (end._t - self._t) * 1000.0

    # ------------------------------------------------------------------------------- tensors
    class _Tensor:
        is_cuda = False

        def __init__(self, dtype: Any, numel: int) -> None:
            self.dtype = dtype
            self._np = dtypes[dtype]
            self._numel = int(numel)

        def numel(self) -> int:
            return self._numel

        @property
        def nbytes(self) -> int:
            return self._numel * self._np.itemsize

        def _span(self, item: Any) -> tuple[int, int]:
            if not isinstance(item, slice) or item.step not in (None, 1):
                raise TypeError("the torch-CUDA double has 1-D [a:b] views only")
            start, stop, _ = item.indices(self._numel)
            return start, max(start, stop)

        def copy_(self, src: Any, non_blocking: bool = False) -> Any:
            if not isinstance(src, _Tensor):
                raise TypeError(f"copy_(): argument 'src' must be Tensor, not {type(src).__name__}")
            if src.dtype != self.dtype or src.numel() != self.numel():
                raise RuntimeError(
                    f"the torch-CUDA double copies like for like only: {src.dtype}[{src.numel()}] "
                    f"into {self.dtype}[{self.numel()}]"
                )
            cuda_side = self if self.is_cuda else src
            if not cuda_side.is_cuda:
                self._host()[:] = src._host()  # host to host: at once
                return self
            rec = current_stream(cuda_side._device)._rec
            _queue_copy(self, src, rec)
            if not non_blocking:
                _wait(rec)
            return self

    class HostTensor(_Tensor):
        """A CPU tensor over a numpy array (shared memory, as ``torch.from_numpy``)."""

        def __init__(self, array: np.ndarray, pinned: bool = False) -> None:
            array = np.asarray(array)
            if not array.flags.c_contiguous:
                raise ValueError("the torch-CUDA double takes contiguous arrays only")
            dtype = {v: k for k, v in dtypes.items()}[array.dtype]
            super().__init__(dtype, array.size)
            self._array = array.reshape(-1)
            self._pinned = pinned
            self.device = real.device("cpu")

        def _host(self) -> np.ndarray:
            return self._array

        def numpy(self) -> np.ndarray:
            return self._array

        def data_ptr(self) -> int:
            return int(self._array.ctypes.data)

        def is_pinned(self) -> bool:
            return self._pinned

        def pin_memory(self) -> HostTensor:
            return HostTensor(self._array.copy(), pinned=True)

        def __getitem__(self, item: Any) -> HostTensor:
            a, b = self._span(item)
            return HostTensor(self._array[a:b], pinned=self._pinned)

    class CudaTensor(_Tensor):
        """A tensor in the pretend machine's device memory."""

        is_cuda = True

        def __init__(self, dtype: Any, numel: int, device: int, base: Any = None, offset: int = 0):
            super().__init__(dtype, numel)
            self._device = device
            self.device = real.device("cuda", device)
            if base is None:
                self._base = self
                self._ptr = _dev.HEAP.alloc(max(self.nbytes, 1), device)
                weakref.finalize(self, _dev.HEAP.free, self._ptr)
            else:
                self._base = base  # keeps the allocation alive
                self._ptr = base._ptr + offset

        def data_ptr(self) -> int:
            return self._ptr

        def is_pinned(self) -> bool:
            return False

        def _host(self) -> np.ndarray:
            view = _dev.device_view(self._ptr, self.nbytes)
            if view is None:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return view.view(self._np)

        def __getitem__(self, item: Any) -> CudaTensor:
            a, b = self._span(item)
            return CudaTensor(
                self.dtype, b - a, self._device, base=self._base, offset=a * self._np.itemsize
            )

        def cpu(self) -> HostTensor:
            out = HostTensor(np.empty(self.numel(), self._np))
            return out.copy_(self)

    def _queue_copy(dst: Any, src: Any, rec: _dev.StreamRecord) -> None:
        """Queue ``dst <- src`` (at least one of them on the device) on ``rec``."""
        staged = not src.is_cuda and not src.is_pinned()  # pageable memory is staged at the call
        data = src._host().copy() if staged else None
        writes = [(dst._ptr, dst.nbytes)] if dst.is_cuda else []

        def run() -> None:
            dst._host()[:] = data if data is not None else src._host()

        _dev.enqueue(rec, run, "torch copy_", writes=writes)

    def from_numpy(array: np.ndarray) -> HostTensor:
        return HostTensor(array)

    def empty(
        *size: Any, dtype: Any = None, device: Any = None, pin_memory: bool = False, **kw: Any
    ) -> Any:
        dims = tuple(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list)) else size
        numel = int(np.prod([int(d) for d in dims], dtype=np.int64))
        dtype = real.float32 if dtype is None else dtype
        dev = real.device(device) if isinstance(device, str) else device
        if dev is not None and dev.type == "cuda":
            return CudaTensor(dtype, numel, _valid(dev))
        return HostTensor(np.empty(numel, dtypes[dtype]), pinned=pin_memory)

    for name, obj in {
        "is_available": lambda: m.device_count > 0,
        "device_count": lambda: m.device_count,
        "current_device": m.current_device,
        "set_device": set_device,
        "device": device_ctx,
        "get_device_capability": lambda device=None: (_valid(device), m.cc)[1],
        "get_device_name": lambda device=None: m.name(_valid(device)),
        "synchronize": synchronize,
        "Stream": Stream,
        "Event": Event,
        "current_stream": current_stream,
        "default_stream": default_stream,
        "stream": stream_ctx,
    }.items():
        setattr(cuda, name, obj)
    for name, obj in {
        "cuda": cuda,
        "device": real.device,
        "uint8": real.uint8,
        "int8": real.int8,
        "float16": real.float16,
        "float32": real.float32,
        "int32": real.int32,
        "int64": real.int64,
        "from_numpy": from_numpy,
        "empty": empty,
        "Tensor": _Tensor,
        "__version__": f"{real.__version__} (CUDA double)",
    }.items():
        setattr(mod, name, obj)
    return mod

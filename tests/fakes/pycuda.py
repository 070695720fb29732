"""Test double of the small part of pycuda that advedge uses. NOT pycuda, and no GPU is involved.

``make_pycuda()`` returns three fresh module objects (``pycuda``, ``pycuda.driver``,
``pycuda.autoinit``). "Device memory" is ordinary host memory owned by this module: a device
pointer is a plain ``int`` that is the host address of a 256-byte aligned numpy buffer, so the
TensorRT double (``tests/fakes/tensorrt.py``) can read inputs and write outputs through
:func:`device_view`. Every pointer handed to a copy is checked against the live allocations, so a
wrong size, a freed allocation or a host address passed as a device pointer fails loudly
(``driver.LogicError``) instead of corrupting memory.

Surface modelled, following the pycuda driver reference (documen.tician.de/pycuda/driver.html)
and pycuda's own binding table (inducer/pycuda, ``src/wrapper/wrap_cudadrv.cpp``):

* ``init(flags=0)``; ``Device(ordinal)`` with ``count()`` (static), ``name()``,
  ``compute_capability()`` -> ``(major, minor)``, ``total_memory()``, ``make_context(flags=0)``;
* ``Context``: ``get_current()``, ``get_device()``, ``synchronize()``, ``pop()`` (static),
  ``push()``, ``detach()``;
* ``mem_alloc(nbytes)`` -> ``DeviceAllocation`` (``int(alloc)`` is the pointer, ``free()``;
  like pycuda it defines ``__int__`` but not ``__index__``; the memory is released when the
  allocation object is garbage collected, as in pycuda);
* ``memcpy_htod(dest, src)``, ``memcpy_dtoh(dest, src)``, ``memcpy_dtod(dest, src, size)``,
  ``memcpy_htod_async(dest, src, stream=None)``, ``memcpy_dtoh_async(dest, src, stream=None)``,
  ``memcpy_dtod_async``, ``memset_d8/d16/d32``; host side is any contiguous buffer (numpy
  array), ``dtoh`` needs a writable one; the byte count is the host buffer's size;
* ``Stream(flags=0)`` with ``handle`` (int), ``synchronize()``, ``is_done()``;
  ``Event(flags=0)`` with ``record(stream=None)``, ``synchronize()``, ``query()``,
  ``time_since(start)`` / ``time_till(end)`` in milliseconds;
* ``pagelocked_empty(shape, dtype, order="C", mem_flags=0)`` (and ``_zeros``, ``_empty_like``,
  ``_zeros_like``): numpy arrays whose ``base`` is a ``PagelockedHostAllocation``;
* ``mem_get_info()``, ``get_version()``, ``get_driver_version()``;
* exceptions ``Error``, ``LogicError``, ``MemoryError``, ``RuntimeError``, ``LaunchError``;
* ``pycuda.autoinit`` with ``context`` and ``device``.

Deliberate simplifications: copies and "kernels" run synchronously (``*_async`` complete before
they return and ``Stream.is_done()`` is always True); ``pycuda.autoinit`` is treated as already
imported, so a context is current from the start (as after ``import pycuda.autoinit``); there
is exactly one device.
"""

from __future__ import annotations

import itertools
import threading
import time
import types
import weakref
from typing import Any

import numpy as np

__all__ = ["device_view", "is_stream_handle", "make_pycuda"]

_ALIGNMENT = 256  # cudaMalloc returns 256-byte aligned pointers
_TOTAL_MEMORY = 8 * 1024**3


class _Block:
    __slots__ = ("base", "nbytes", "storage")

    def __init__(self, nbytes: int) -> None:
        self.storage = np.zeros(nbytes + _ALIGNMENT, dtype=np.uint8)
        addr = self.storage.ctypes.data
        self.base = addr + (-addr % _ALIGNMENT)
        self.nbytes = nbytes

    def view(self, ptr: int, nbytes: int) -> np.ndarray:
        start = ptr - self.storage.ctypes.data
        return self.storage[start : start + nbytes]


class _Heap:
    """Process-wide fake device memory: every fake pycuda module allocates from it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._blocks: dict[int, _Block] = {}

    def alloc(self, nbytes: int) -> int:
        block = _Block(nbytes)
        with self._lock:
            self._blocks[block.base] = block
        return block.base

    def free(self, ptr: int) -> None:
        with self._lock:
            self._blocks.pop(ptr, None)

    def view(self, ptr: int, nbytes: int) -> np.ndarray | None:
        with self._lock:
            for block in self._blocks.values():
                if block.base <= ptr < block.base + max(block.nbytes, 1):
                    if ptr + nbytes > block.base + block.nbytes:
                        return None
                    return block.view(ptr, nbytes)
        return None

    def used(self) -> int:
        with self._lock:
            return sum(b.nbytes for b in self._blocks.values())


_HEAP = _Heap()
_STREAM_HANDLES: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
_HANDLE_COUNTER = itertools.count(0x7F0000001000, 0x100)


def device_view(ptr: int, nbytes: int) -> np.ndarray | None:
    """A writable uint8 view of ``nbytes`` of fake device memory at ``ptr``, or None if that
    range is not inside one live allocation (for the TensorRT double)."""
    if nbytes == 0:
        return np.zeros(0, dtype=np.uint8)
    return _HEAP.view(int(ptr), int(nbytes))


def is_stream_handle(handle: int) -> bool:
    """Whether ``handle`` is the ``.handle`` of a live fake ``Stream``."""
    return int(handle) in _STREAM_HANDLES


def make_pycuda(
    compute_capability: tuple[int, int] = (8, 7),
) -> tuple[types.ModuleType, types.ModuleType, types.ModuleType]:
    """Build fresh ``pycuda``, ``pycuda.driver`` and ``pycuda.autoinit`` module objects."""
    cc = (int(compute_capability[0]), int(compute_capability[1]))
    drv = types.ModuleType("pycuda.driver", "Test double of pycuda.driver (not pycuda).")
    state: dict[str, Any] = {"initialized": False, "stack": []}

    class Error(Exception):
        """Base class of the driver's errors."""

    class LogicError(Error):
        """A CUDA call was used wrongly (bad pointer, size, context...)."""

    class LaunchError(Error):
        pass

    class CudaMemoryError(Error):
        pass

    class CudaRuntimeError(Error):
        pass

    CudaMemoryError.__name__ = CudaMemoryError.__qualname__ = "MemoryError"
    CudaRuntimeError.__name__ = CudaRuntimeError.__qualname__ = "RuntimeError"

    def _need_init(what: str) -> None:
        if not state["initialized"]:
            raise LogicError(f"{what} failed: initialization error (call cuda.init() first)")

    def _need_context(what: str) -> None:
        _need_init(what)
        if not state["stack"]:
            raise LogicError(
                f"{what} failed: invalid device context - no currently active context?"
            )

    def init(flags: int = 0) -> None:
        state["initialized"] = True

    class Device:
        def __init__(self, ordinal: int) -> None:
            _need_init("cuDeviceGet")
            if not 0 <= int(ordinal) < 1:
                raise LogicError("cuDeviceGet failed: invalid device ordinal")
            self._ordinal = int(ordinal)

        @staticmethod
        def count() -> int:
            _need_init("cuDeviceGetCount")
            return 1

        def name(self) -> str:
            return f"Fake CUDA device sm_{cc[0]}{cc[1]} (test double)"

        def compute_capability(self) -> tuple[int, int]:
            return cc

        def total_memory(self) -> int:
            return _TOTAL_MEMORY

        def make_context(self, flags: int = 0) -> Context:
            ctx = Context(self)
            state["stack"].append(ctx)
            return ctx

        def __eq__(self, other: object) -> bool:
            return isinstance(other, Device) and other._ordinal == self._ordinal

        def __hash__(self) -> int:
            return hash(("fake-cuda-device", self._ordinal))

    class Context:
        def __init__(self, device: Device) -> None:
            self._device = device

        def push(self) -> None:
            state["stack"].append(self)

        @staticmethod
        def pop() -> None:
            if not state["stack"]:
                raise LogicError("cuCtxPopCurrent failed: invalid device context")
            state["stack"].pop()

        @staticmethod
        def get_current() -> Context | None:
            return state["stack"][-1] if state["stack"] else None

        @staticmethod
        def get_device() -> Device:
            _need_context("cuCtxGetDevice")
            return state["stack"][-1]._device

        @staticmethod
        def synchronize() -> None:
            _need_context("cuCtxSynchronize")

        def detach(self) -> None:
            if self in state["stack"]:
                state["stack"].remove(self)

    class DeviceAllocation:
        """Owns fake device memory; ``int(alloc)`` is the device pointer."""

        def __init__(self, ptr: int, nbytes: int) -> None:
            self._ptr = ptr
            self._nbytes = nbytes
            self._valid = True

        def __int__(self) -> int:
            return self._ptr

        def free(self) -> None:
            if self._valid:
                self._valid = False
                _HEAP.free(self._ptr)

        def __del__(self) -> None:
            try:  # noqa: SIM105 - module globals may already be gone at interpreter shutdown
                self.free()
            except Exception:
                pass

        def __repr__(self) -> str:
            return f"<pycuda._driver.DeviceAllocation object at {self._ptr:#x}>"

    class PagelockedHostAllocation(bytearray):
        """Stands in for page-locked host memory (the ``base`` of ``pagelocked_empty`` arrays)."""

        def free(self) -> None:
            pass

        def get_flags(self) -> int:
            return 0

    def mem_alloc(nbytes: int) -> DeviceAllocation:
        _need_context("cuMemAlloc")
        nbytes = int(nbytes)
        if nbytes <= 0:
            raise LogicError("cuMemAlloc failed: invalid argument")
        if nbytes > _TOTAL_MEMORY - _HEAP.used():
            raise CudaMemoryError("cuMemAlloc failed: out of memory")
        return DeviceAllocation(_HEAP.alloc(nbytes), nbytes)

    def mem_get_info() -> tuple[int, int]:
        _need_context("cuMemGetInfo")
        return _TOTAL_MEMORY - _HEAP.used(), _TOTAL_MEMORY

    def _dev_ptr(dest: Any, what: str) -> int:
        if isinstance(dest, DeviceAllocation):
            if not dest._valid:
                raise LogicError(f"{what} failed: invalid argument (allocation was freed)")
            return int(dest)
        if isinstance(dest, (int, np.integer)) and not isinstance(dest, bool):
            return int(dest)
        raise TypeError(
            f"{what}: expected a DeviceAllocation or an int device pointer, got "
            f"{type(dest).__name__}"
        )

    def _device_range(ptr: int, nbytes: int, what: str) -> np.ndarray:
        view = device_view(ptr, nbytes)
        if view is None:
            raise LogicError(
                f"{what} failed: invalid argument ({nbytes} bytes at {ptr:#x} is not inside a "
                "live device allocation)"
            )
        return view

    def _host_buffer(obj: Any, *, writable: bool, what: str) -> memoryview:
        try:
            mv = memoryview(obj)
        except TypeError:
            raise TypeError(f"{what}: expected a buffer object, got {type(obj).__name__}") from None
        if not mv.contiguous:
            raise ValueError("ndarray is not contiguous")
        if writable and mv.readonly:
            raise TypeError(f"{what}: expected a writable buffer object")
        return mv.cast("B") if mv.ndim != 1 or mv.format != "B" else mv

    def _check_stream(stream: Any, what: str) -> None:
        if stream is not None and not isinstance(stream, Stream):
            raise TypeError(f"{what}: stream must be a pycuda.driver.Stream or None")

    def memcpy_htod(dest: Any, src: Any) -> None:
        _need_context("cuMemcpyHtoD")
        host = _host_buffer(src, writable=False, what="memcpy_htod")
        dev = _device_range(_dev_ptr(dest, "cuMemcpyHtoD"), host.nbytes, "cuMemcpyHtoD")
        dev[:] = np.frombuffer(host, dtype=np.uint8)

    def memcpy_dtoh(dest: Any, src: Any) -> None:
        _need_context("cuMemcpyDtoH")
        host = _host_buffer(dest, writable=True, what="memcpy_dtoh")
        dev = _device_range(_dev_ptr(src, "cuMemcpyDtoH"), host.nbytes, "cuMemcpyDtoH")
        np.frombuffer(host, dtype=np.uint8)[:] = dev

    def memcpy_dtod(dest: Any, src: Any, size: int) -> None:
        _need_context("cuMemcpyDtoD")
        src_view = _device_range(_dev_ptr(src, "cuMemcpyDtoD"), int(size), "cuMemcpyDtoD")
        dst_view = _device_range(_dev_ptr(dest, "cuMemcpyDtoD"), int(size), "cuMemcpyDtoD")
        dst_view[:] = src_view.copy()

    def memcpy_htod_async(dest: Any, src: Any, stream: Any = None) -> None:
        _check_stream(stream, "memcpy_htod_async")
        memcpy_htod(dest, src)

    def memcpy_dtoh_async(dest: Any, src: Any, stream: Any = None) -> None:
        _check_stream(stream, "memcpy_dtoh_async")
        memcpy_dtoh(dest, src)

    def memcpy_dtod_async(dest: Any, src: Any, size: int, stream: Any = None) -> None:
        _check_stream(stream, "memcpy_dtod_async")
        memcpy_dtod(dest, src, size)

    def _memset(dest: Any, data: int, count: int, dtype: Any, what: str) -> None:
        _need_context(what)
        itemsize = np.dtype(dtype).itemsize
        view = _device_range(_dev_ptr(dest, what), int(count) * itemsize, what)
        view.view(dtype)[:] = data

    def memset_d8(dest: Any, data: int, size: int) -> None:
        _memset(dest, data, size, np.uint8, "cuMemsetD8")

    def memset_d16(dest: Any, data: int, size: int) -> None:
        _memset(dest, data, size, np.uint16, "cuMemsetD16")

    def memset_d32(dest: Any, data: int, size: int) -> None:
        _memset(dest, data, size, np.uint32, "cuMemsetD32")

    class Stream:
        def __init__(self, flags: int = 0) -> None:
            _need_context("cuStreamCreate")
            self._handle = next(_HANDLE_COUNTER)
            _STREAM_HANDLES[self._handle] = self

        @property
        def handle(self) -> int:
            return self._handle

        def synchronize(self) -> None:
            pass

        def is_done(self) -> bool:
            return True

    class Event:
        def __init__(self, flags: int = 0) -> None:
            _need_context("cuEventCreate")
            self._t: float | None = None

        def record(self, stream: Any = None) -> Event:
            _check_stream(stream, "Event.record")
            self._t = time.perf_counter()
            return self

        def synchronize(self) -> Event:
            return self

        def query(self) -> bool:
            return True

        def time_since(self, event: Event) -> float:
            if self._t is None or event._t is None:
                raise LogicError(
                    "cuEventElapsedTime failed: invalid resource handle (event not recorded)"
                )
            return (self._t - event._t) * 1000.0

        def time_till(self, event: Event) -> float:
            return event.time_since(self)

    def pagelocked_empty(
        shape: Any, dtype: Any, order: str = "C", mem_flags: int = 0
    ) -> np.ndarray:
        dt = np.dtype(dtype)
        shape_t = (int(shape),) if np.isscalar(shape) else tuple(int(s) for s in shape)
        count = int(np.prod(shape_t, dtype=np.int64))
        alloc = PagelockedHostAllocation(max(count * dt.itemsize, 1))
        return np.ndarray(shape_t, dtype=dt, buffer=alloc, order=order)  # base is the allocation

    def pagelocked_zeros(
        shape: Any, dtype: Any, order: str = "C", mem_flags: int = 0
    ) -> np.ndarray:
        arr = pagelocked_empty(shape, dtype, order, mem_flags)
        arr.fill(0)
        return arr

    def pagelocked_empty_like(array: np.ndarray, mem_flags: int = 0) -> np.ndarray:
        return pagelocked_empty(array.shape, array.dtype, "C", mem_flags)

    def pagelocked_zeros_like(array: np.ndarray, mem_flags: int = 0) -> np.ndarray:
        return pagelocked_zeros(array.shape, array.dtype, "C", mem_flags)

    def get_version() -> tuple[int, int, int]:
        return (12, 2, 0)

    def get_driver_version() -> int:
        return 12020

    for name, obj in {
        "Error": Error,
        "LogicError": LogicError,
        "LaunchError": LaunchError,
        "MemoryError": CudaMemoryError,
        "RuntimeError": CudaRuntimeError,
        "init": init,
        "Device": Device,
        "Context": Context,
        "DeviceAllocation": DeviceAllocation,
        "PagelockedHostAllocation": PagelockedHostAllocation,
        "HostAllocation": PagelockedHostAllocation,
        "mem_alloc": mem_alloc,
        "mem_get_info": mem_get_info,
        "memcpy_htod": memcpy_htod,
        "memcpy_dtoh": memcpy_dtoh,
        "memcpy_dtod": memcpy_dtod,
        "memcpy_htod_async": memcpy_htod_async,
        "memcpy_dtoh_async": memcpy_dtoh_async,
        "memcpy_dtod_async": memcpy_dtod_async,
        "memset_d8": memset_d8,
        "memset_d16": memset_d16,
        "memset_d32": memset_d32,
        "Stream": Stream,
        "Event": Event,
        "pagelocked_empty": pagelocked_empty,
        "pagelocked_zeros": pagelocked_zeros,
        "pagelocked_empty_like": pagelocked_empty_like,
        "pagelocked_zeros_like": pagelocked_zeros_like,
        "get_version": get_version,
        "get_driver_version": get_driver_version,
    }.items():
        setattr(drv, name, obj)

    # ``import pycuda.autoinit`` initialises the driver and makes a context on device 0 current.
    init()
    device = Device(0)
    context = device.make_context()
    autoinit = types.ModuleType("pycuda.autoinit", "Test double of pycuda.autoinit (not pycuda).")
    autoinit.device = device  # type: ignore[attr-defined]
    autoinit.context = context  # type: ignore[attr-defined]

    pkg = types.ModuleType("pycuda", "Test double of pycuda (not pycuda).")
    pkg.__path__ = []  # a package, so ``import pycuda.driver`` resolves through sys.modules
    pkg.VERSION = (2024, 1)  # type: ignore[attr-defined]
    pkg.VERSION_TEXT = "2024.1"  # type: ignore[attr-defined]
    pkg.driver = drv  # type: ignore[attr-defined]
    pkg.autoinit = autoinit  # type: ignore[attr-defined]
    drv.__package__ = autoinit.__package__ = "pycuda"
    return pkg, drv, autoinit

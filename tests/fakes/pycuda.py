"""Test double of the small part of pycuda that advedge uses. NOT pycuda, and no GPU is involved.

``make_pycuda()`` returns three fresh module objects (``pycuda``, ``pycuda.driver``,
``pycuda.autoinit``) over a pretend machine (:class:`fakes.device.Machine`: devices, contexts,
fake device memory, streams whose work runs only when waited for). A device pointer is a plain
``int`` into fake device memory, so the TensorRT double (``tests/fakes/tensorrt.py``) can read
inputs and write outputs through :func:`device_view`. Every pointer handed to a copy is checked
against the live allocations, so a wrong size, a freed allocation or a host address passed as a
device pointer fails loudly (``driver.LogicError``) instead of corrupting memory.

Surface modelled, following the pycuda driver reference (documen.tician.de/pycuda/driver.html)
and pycuda's own binding table (inducer/pycuda, ``src/wrapper/wrap_cudadrv.cpp``):

* ``init(flags=0)``; ``Device(ordinal)`` with ``count()`` (static), ``name()``,
  ``compute_capability()`` -> ``(major, minor)``, ``total_memory()``, ``make_context(flags=0)``
  (a new context, pushed: current), ``retain_primary_context()`` (the device's primary context,
  the one the CUDA runtime and so TensorRT and torch use; "not made current", pycuda 2017.1+);
* ``Context``: ``get_current()``, ``get_device()``, ``synchronize()`` (waits for all work of the
  current context's device), ``pop()`` (static), ``push()``, ``detach()``;
* ``mem_alloc(nbytes)`` -> ``DeviceAllocation`` on the current context's device (``int(alloc)``
  is the pointer, ``free()``; like pycuda it defines ``__int__`` but not ``__index__``; the memory
  is released when the allocation object is garbage collected, as in pycuda);
* ``memcpy_htod(dest, src)``, ``memcpy_dtoh(dest, src)``, ``memcpy_dtod(dest, src, size)``,
  ``memset_d8/d16/d32``: synchronous, on the legacy default stream (they first wait for earlier
  work of every blocking stream, then complete before they return);
* ``memcpy_htod_async(dest, src, stream=None)``, ``memcpy_dtoh_async(dest, src, stream=None)``,
  ``memcpy_dtod_async``: queued on the stream (None: the legacy default stream) and run only when
  the stream is synchronised (or an event after them, or the context). A pageable source is read
  when the call is made (CUDA stages pageable memory before an async host-to-device copy
  returns); a page-locked one (``pagelocked_empty``) when the copy runs. A device-to-host copy
  writes its host array when it runs, page-locked or not: real CUDA happens to finish a copy into
  pageable memory before returning, which its documentation tells not to rely on, so the double
  is stricter. Host side is any contiguous buffer (numpy array), ``dtoh`` needs a writable one;
  the byte count is the host buffer's size;
* ``Stream(flags=0)`` on the current context's device (``flags=1``: non-blocking, not ordered
  with the legacy default stream) with ``handle`` (int), ``synchronize()``, ``is_done()``;
  ``Event(flags=0)`` with ``record(stream=None)``, ``synchronize()``, ``query()``,
  ``time_since(start)`` / ``time_till(end)`` in milliseconds (between the moments the queued
  markers ran; "not ready" until both have);
* ``pagelocked_empty(shape, dtype, order="C", mem_flags=0)`` (and ``_zeros``, ``_empty_like``,
  ``_zeros_like``): numpy arrays whose ``base`` is a ``PagelockedHostAllocation``;
* ``mem_get_info()``, ``get_version()``, ``get_driver_version()``;
* exceptions ``Error``, ``LogicError``, ``MemoryError``, ``RuntimeError``, ``LaunchError`` (queued
  work that fails raises ``LaunchError`` from the call that waited for it);
* ``pycuda.autoinit`` with ``context`` and ``device``.

Deliberate simplifications: ``pycuda.autoinit`` is treated as already imported, so the driver is
initialised and a (non-primary) context on device 0 is current from the start, as after
``import pycuda.autoinit``; a stream used while another device's context is current is refused
(``LogicError``, "invalid resource handle"); queued work runs on the thread that waits for it; one
context stack serves every thread.
"""

from __future__ import annotations

import time
import types
from typing import Any

import numpy as np

from . import device as _dev
from .device import device_view, is_stream_handle

__all__ = ["device_view", "is_stream_handle", "make_pycuda"]


def _pinned(obj: Any) -> bool:
    """Whether ``obj`` is page-locked host memory of the double (a ``pagelocked_empty`` array
    or a view of one)."""
    while obj is not None:
        if type(obj).__name__ == "PagelockedHostAllocation":
            return True
        obj = getattr(obj, "base", None)
    return False


def make_pycuda(  # long: one closure per module object, as pycuda's binding table lists them
    compute_capability: tuple[int, int] = (8, 7),
    *,
    device_count: int = 1,
    machine: _dev.Machine | None = None,
) -> tuple[types.ModuleType, types.ModuleType, types.ModuleType]:
    """Build fresh ``pycuda``, ``pycuda.driver`` and ``pycuda.autoinit`` module objects on
    ``machine`` (default: a new machine of ``device_count`` GPUs of ``compute_capability``)."""
    m = machine or _dev.Machine(device_count, compute_capability)
    drv = types.ModuleType("pycuda.driver", "Test double of pycuda.driver (not pycuda).")
    state: dict[str, Any] = {"initialized": False, "wrappers": {}}

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

    def _need_context(what: str) -> int:
        _need_init(what)
        if not m.stack:
            raise LogicError(
                f"{what} failed: invalid device context - no currently active context?"
            )
        return m.current_device()

    def _wait(rec: _dev.StreamRecord, upto: int | None = None) -> None:
        try:
            _dev.synchronize(rec, upto)
        except _dev.DeviceFault as exc:
            raise LaunchError(f"cuStreamSynchronize failed: {exc}") from None

    def init(flags: int = 0) -> None:
        state["initialized"] = True

    class Device:
        def __init__(self, ordinal: int) -> None:
            _need_init("cuDeviceGet")
            if not m.valid(int(ordinal)):
                raise LogicError("cuDeviceGet failed: invalid device ordinal")
            self._ordinal = int(ordinal)

        @staticmethod
        def count() -> int:
            _need_init("cuDeviceGetCount")
            return m.device_count

        def name(self) -> str:
            return m.name(self._ordinal)

        def compute_capability(self) -> tuple[int, int]:
            return m.cc

        def total_memory(self) -> int:
            return _dev.TOTAL_MEMORY

        def make_context(self, flags: int = 0) -> Context:
            ctx = _context(_dev.Ctx(self._ordinal))
            m.stack.append(ctx._ctx)
            return ctx

        def retain_primary_context(self) -> Context:
            return _context(m.primary(self._ordinal))

        def __eq__(self, other: object) -> bool:
            return isinstance(other, Device) and other._ordinal == self._ordinal

        def __hash__(self) -> int:
            return hash(("fake-cuda-device", self._ordinal))

    class Context:
        def __init__(self, ctx: _dev.Ctx) -> None:
            self._ctx = ctx

        def push(self) -> None:
            m.stack.append(self._ctx)

        @staticmethod
        def pop() -> None:
            if not m.stack:
                raise LogicError("cuCtxPopCurrent failed: invalid device context")
            m.stack.pop()

        @staticmethod
        def get_current() -> Context | None:
            return _context(m.stack[-1]) if m.stack else None

        @staticmethod
        def get_device() -> Device:
            return Device(_need_context("cuCtxGetDevice"))

        @staticmethod
        def synchronize() -> None:
            device = _need_context("cuCtxSynchronize")
            try:
                _dev.synchronize_device(device)
            except _dev.DeviceFault as exc:
                raise LaunchError(f"cuCtxSynchronize failed: {exc}") from None

        def detach(self) -> None:
            if self._ctx in m.stack:
                m.stack.remove(self._ctx)

        def __eq__(self, other: object) -> bool:
            return isinstance(other, Context) and other._ctx is self._ctx

        def __hash__(self) -> int:
            return id(self._ctx)

    def _context(ctx: _dev.Ctx) -> Context:
        if ctx not in state["wrappers"]:
            state["wrappers"][ctx] = Context(ctx)
        return state["wrappers"][ctx]

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
                _dev.HEAP.free(self._ptr)

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
        device = _need_context("cuMemAlloc")
        nbytes = int(nbytes)
        if nbytes <= 0:
            raise LogicError("cuMemAlloc failed: invalid argument")
        if nbytes > _dev.TOTAL_MEMORY - _dev.HEAP.used(device):
            raise CudaMemoryError("cuMemAlloc failed: out of memory")
        return DeviceAllocation(_dev.HEAP.alloc(nbytes, device), nbytes)

    def mem_get_info() -> tuple[int, int]:
        device = _need_context("cuMemGetInfo")
        return _dev.TOTAL_MEMORY - _dev.HEAP.used(device), _dev.TOTAL_MEMORY

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

    def _stream(stream: Any, what: str) -> _dev.StreamRecord:
        """The record of ``stream`` (None: the legacy default stream of the current device)."""
        device = _need_context(what)
        if stream is None:
            rec = _dev.stream_record(0, device)
            assert rec is not None
            return rec
        if not isinstance(stream, Stream):
            raise TypeError(f"{what}: stream must be a pycuda.driver.Stream or None")
        if stream._rec.device != device:
            raise LogicError(
                f"{what} failed: invalid resource handle (the stream belongs to device "
                f"{stream._rec.device}; the current context is on device {device})"
            )
        return stream._rec

    def _htod(dest: Any, src: Any, stream: Any, what: str) -> None:
        rec = _stream(stream, what)
        host = _host_buffer(src, writable=False, what=what)
        ptr = _dev_ptr(dest, what)
        dev = _device_range(ptr, host.nbytes, what)
        data = host if _pinned(src) else bytes(host)  # pageable memory is staged at the call

        def run() -> None:
            dev[:] = np.frombuffer(data, dtype=np.uint8)

        _dev.enqueue(rec, run, what, writes=[(ptr, host.nbytes)])

    def _dtoh(dest: Any, src: Any, stream: Any, what: str) -> None:
        rec = _stream(stream, what)
        host = _host_buffer(dest, writable=True, what=what)
        dev = _device_range(_dev_ptr(src, what), host.nbytes, what)

        def run() -> None:
            np.frombuffer(host, dtype=np.uint8)[:] = dev

        _dev.enqueue(rec, run, what)

    def _dtod(dest: Any, src: Any, size: int, stream: Any, what: str) -> None:
        rec = _stream(stream, what)
        dst_ptr = _dev_ptr(dest, what)
        src_view = _device_range(_dev_ptr(src, what), int(size), what)
        dst_view = _device_range(dst_ptr, int(size), what)

        def run() -> None:
            dst_view[:] = src_view.copy()

        _dev.enqueue(rec, run, what, writes=[(dst_ptr, int(size))])

    def _now(what: str) -> None:
        """Wait for the synchronous call just queued on the legacy default stream."""
        rec = _dev.stream_record(0, m.current_device())
        assert rec is not None
        try:
            _dev.synchronize(rec)
        except _dev.DeviceFault as exc:
            raise LaunchError(f"{what} failed: {exc}") from None

    def memcpy_htod(dest: Any, src: Any) -> None:
        _htod(dest, src, None, "cuMemcpyHtoD")
        _now("cuMemcpyHtoD")

    def memcpy_dtoh(dest: Any, src: Any) -> None:
        _dtoh(dest, src, None, "cuMemcpyDtoH")
        _now("cuMemcpyDtoH")

    def memcpy_dtod(dest: Any, src: Any, size: int) -> None:
        _dtod(dest, src, size, None, "cuMemcpyDtoD")
        _now("cuMemcpyDtoD")

    def memcpy_htod_async(dest: Any, src: Any, stream: Any = None) -> None:
        _htod(dest, src, stream, "cuMemcpyHtoDAsync")

    def memcpy_dtoh_async(dest: Any, src: Any, stream: Any = None) -> None:
        _dtoh(dest, src, stream, "cuMemcpyDtoHAsync")

    def memcpy_dtod_async(dest: Any, src: Any, size: int, stream: Any = None) -> None:
        _dtod(dest, src, size, stream, "cuMemcpyDtoDAsync")

    def _memset(dest: Any, data: int, count: int, dtype: Any, what: str) -> None:
        rec = _stream(None, what)
        itemsize = np.dtype(dtype).itemsize
        ptr = _dev_ptr(dest, what)
        view = _device_range(ptr, int(count) * itemsize, what)

        def run() -> None:
            view.view(dtype)[:] = data

        _dev.enqueue(rec, run, what, writes=[(ptr, int(count) * itemsize)])
        _now(what)

    def memset_d8(dest: Any, data: int, size: int) -> None:
        _memset(dest, data, size, np.uint8, "cuMemsetD8")

    def memset_d16(dest: Any, data: int, size: int) -> None:
        _memset(dest, data, size, np.uint16, "cuMemsetD16")

    def memset_d32(dest: Any, data: int, size: int) -> None:
        _memset(dest, data, size, np.uint32, "cuMemsetD32")

    class Stream:
        def __init__(self, flags: int = 0) -> None:
            device = _need_context("cuStreamCreate")
            self._rec = _dev.new_stream(device, blocking=not int(flags) & 1)

        @property
        def handle(self) -> int:
            return self._rec.handle

        def synchronize(self) -> None:
            _wait(self._rec)

        def is_done(self) -> bool:
            return not _dev.pending(self._rec)

    class Event:
        def __init__(self, flags: int = 0) -> None:
            _need_context("cuEventCreate")
            self._t: float | None = None
            self._at: tuple[_dev.StreamRecord, int] | None = None

        def record(self, stream: Any = None) -> Event:
            rec = _stream(stream, "cuEventRecord")
            self._t = None

            def mark() -> None:
                self._t = time.perf_counter()

            self._at = (rec, _dev.enqueue(rec, mark, "cuEventRecord"))
            return self

        def synchronize(self) -> Event:
            if self._at is not None:
                _wait(*self._at)
            return self

        def query(self) -> bool:
            return self._at is None or self._t is not None

        def time_since(self, event: Event) -> float:
            if self._at is None or event._at is None:
                raise LogicError(
                    "cuEventElapsedTime failed: invalid resource handle (event not recorded)"
                )
            if self._t is None or event._t is None:
                raise LogicError("cuEventElapsedTime failed: device not ready")
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

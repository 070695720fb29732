"""The pretend GPU machine that the CUDA doubles share. NOT CUDA, and no GPU is involved.

The pycuda double (``tests/fakes/pycuda.py``), the torch-CUDA double (``tests/fakes/torch_cuda.py``)
and the TensorRT double (``tests/fakes/tensorrt.py``) all work on this one model, so a device
pointer from either buffer library can be handed to a fake engine, and a stream handle from either
library can be handed to ``execute_async_v3``.

What is modelled, following the CUDA programming guide ("Asynchronous Concurrent Execution",
"Default Stream") and the CUDA runtime API's "API synchronization behavior" and "Stream
synchronization behavior" pages:

* **Device memory** is ordinary host memory owned by this module: a device pointer is a plain
  ``int``, the host address of a 256-byte aligned numpy buffer, tagged with the device it was
  allocated on. :func:`device_view` gives the TensorRT double a view of it; a range that is not
  inside one live allocation is refused.
* **Streams and queued work.** Every asynchronous operation (an async copy, an engine run) is a
  closure queued on a stream, in issue order; nothing runs when it is issued. Queued work runs,
  in issue order, only when something waits for it: the stream's ``synchronize()``, an event
  recorded after it being synchronised, a device-wide synchronise, or a synchronous call
  (``memcpy_htod``, a blocking torch copy). A host array that a queued device-to-host copy will
  write therefore holds its old bytes until then, and a copy queued on one stream is not seen
  by work on another stream until someone waits for it.
* **The legacy default stream** (handle 0, one per device): work on it waits for all earlier work
  of the device's blocking streams, and later work on a blocking stream waits for it.
  Non-blocking streams (pycuda ``Stream(flags=1)``; every torch stream, which torch creates with
  ``cudaStreamNonBlocking``) are not ordered with it.
* **Devices and contexts.** ``Machine(device_count, compute_capability)`` is a pretend machine of
  identical GPUs with a stack of current contexts (the driver API's current context, which is
  also the runtime API's current device: pushing a context or ``cudaSetDevice`` changes what the
  CUDA runtime, and so TensorRT, uses). Each device has one primary context. The most recently
  made machine is the active one (:func:`active`).
* **Errors at synchronisation.** A queued operation that fails (freed memory, a fake engine
  whose inputs are still being written by another stream) raises :class:`DeviceFault` from the
  call that waited for it, as an asynchronous CUDA error surfaces at the next synchronising call.

Not modelled: concurrency (queued work runs on the calling thread, one operation at a time),
per-thread current contexts (one stack for the process), peer access, streams' priorities,
memory pools and the caching allocator's stream reuse rules, real timing of device work (an
event's time is when its queued marker runs).
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = [
    "DeviceFault",
    "Machine",
    "StreamRecord",
    "active",
    "device_of",
    "device_view",
    "discard_pending",
    "enqueue",
    "is_stream_handle",
    "new_stream",
    "pending",
    "pending_write",
    "stream_record",
    "synchronize",
    "synchronize_device",
]

_ALIGNMENT = 256  # cudaMalloc returns 256-byte aligned pointers
TOTAL_MEMORY = 8 * 1024**3  # per device


class DeviceFault(RuntimeError):
    """An error of queued device work, raised by the call that waited for it."""


# --------------------------------------------------------------------------------- memory
class _Block:
    __slots__ = ("base", "device", "nbytes", "storage")

    def __init__(self, nbytes: int, device: int) -> None:
        self.storage = np.zeros(nbytes + _ALIGNMENT, dtype=np.uint8)
        addr = self.storage.ctypes.data
        self.base = addr + (-addr % _ALIGNMENT)
        self.nbytes = nbytes
        self.device = device

    def view(self, ptr: int, nbytes: int) -> np.ndarray:
        start = ptr - self.storage.ctypes.data
        return self.storage[start : start + nbytes]


class _Heap:
    """Process-wide fake device memory: every double allocates from it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._blocks: dict[int, _Block] = {}

    def alloc(self, nbytes: int, device: int = 0) -> int:
        block = _Block(nbytes, device)
        with self._lock:
            self._blocks[block.base] = block
        return block.base

    def free(self, ptr: int) -> None:
        with self._lock:
            self._blocks.pop(ptr, None)

    def block(self, ptr: int) -> _Block | None:
        with self._lock:
            for block in self._blocks.values():
                if block.base <= ptr < block.base + max(block.nbytes, 1):
                    return block
        return None

    def view(self, ptr: int, nbytes: int) -> np.ndarray | None:
        block = self.block(ptr)
        if block is None or ptr + nbytes > block.base + block.nbytes:
            return None
        return block.view(ptr, nbytes)

    def used(self, device: int | None = None) -> int:
        with self._lock:
            return sum(
                b.nbytes for b in self._blocks.values() if device is None or b.device == device
            )


HEAP = _Heap()


def device_view(ptr: int, nbytes: int) -> np.ndarray | None:
    """A writable uint8 view of ``nbytes`` of fake device memory at ``ptr``, or None if that
    range is not inside one live allocation."""
    if nbytes == 0:
        return np.zeros(0, dtype=np.uint8)
    return HEAP.view(int(ptr), int(nbytes))


def device_of(ptr: int) -> int | None:
    """The device whose memory ``ptr`` points into, or None."""
    block = HEAP.block(int(ptr))
    return None if block is None else block.device


# ------------------------------------------------------------------------ machine, contexts
@dataclass(eq=False)
class Ctx:
    """A CUDA context: the device it belongs to, and whether it is the device's primary one."""

    device: int
    primary: bool = False


class Machine:
    """A pretend machine of ``device_count`` identical GPUs of ``compute_capability``."""

    def __init__(self, device_count: int = 1, compute_capability: tuple[int, int] = (8, 7)):
        if device_count < 1:
            raise ValueError("a pretend machine has at least one GPU")
        self.device_count = int(device_count)
        self.cc = (int(compute_capability[0]), int(compute_capability[1]))
        self.stack: list[Ctx] = []
        self._primary: dict[int, Ctx] = {}
        activate(self)

    def valid(self, device: int) -> bool:
        return 0 <= int(device) < self.device_count

    def primary(self, device: int) -> Ctx:
        """The device's primary context (the CUDA runtime's, so torch's and TensorRT's)."""
        if device not in self._primary:
            self._primary[device] = Ctx(int(device), primary=True)
        return self._primary[device]

    def current_device(self) -> int:
        """The device of the current context; the runtime API starts on device 0."""
        return self.stack[-1].device if self.stack else 0

    def set_device(self, device: int) -> None:
        """``cudaSetDevice``: the device's primary context replaces the current context."""
        if self.stack:
            self.stack[-1] = self.primary(device)
        else:
            self.stack.append(self.primary(device))

    def name(self, device: int) -> str:
        return f"Fake CUDA device {device} sm_{self.cc[0]}{self.cc[1]} (test double)"


_ACTIVE: list[Machine] = []


def activate(machine: Machine) -> None:
    """Make ``machine`` the one the TensorRT double asks for the current device."""
    _ACTIVE[:] = [machine]


def active() -> Machine:
    """The most recently made machine (a one-GPU machine if none was made)."""
    if not _ACTIVE:
        Machine()
    return _ACTIVE[0]


# ------------------------------------------------------------------------- streams, work
@dataclass(eq=False)
class StreamRecord:
    """The machine's record of a stream: its handle, device, and whether it is the legacy
    default stream or a blocking stream (ordered with the default stream)."""

    handle: int
    device: int
    blocking: bool = True
    default: bool = False


@dataclass(eq=False)
class _Work:
    seq: int
    stream: StreamRecord
    fn: Callable[[], None]
    what: str
    writes: list[tuple[int, int]]


_LOCK = threading.RLock()
_STREAMS: weakref.WeakValueDictionary[int, StreamRecord] = weakref.WeakValueDictionary()
_DEFAULT: dict[int, StreamRecord] = {}
_WORK: list[_Work] = []
_SEQ = itertools.count()
_HANDLES = itertools.count(0x7F0000001000, 0x100)


def discard_pending() -> None:
    """Drop all queued work (a test's leftovers must not run in the next test)."""
    with _LOCK:
        _WORK.clear()


def new_stream(device: int, *, blocking: bool = True) -> StreamRecord:
    """A new stream on ``device``; keep the record alive as long as the stream object lives."""
    rec = StreamRecord(next(_HANDLES), int(device), blocking=blocking)
    _STREAMS[rec.handle] = rec
    return rec


def _default(device: int) -> StreamRecord:
    if device not in _DEFAULT:
        _DEFAULT[device] = StreamRecord(0, device, blocking=True, default=True)
    return _DEFAULT[device]


def stream_record(handle: int, device: int | None = None) -> StreamRecord | None:
    """The live stream of ``handle`` (0: the legacy default stream of ``device``, or of the
    current device), or None."""
    handle = int(handle)
    if handle == 0:
        return _default(active().current_device() if device is None else int(device))
    return _STREAMS.get(handle)


def is_stream_handle(handle: int) -> bool:
    """Whether ``handle`` is 0 or the handle of a live fake stream (of either library)."""
    return int(handle) == 0 or int(handle) in _STREAMS


def enqueue(
    stream: StreamRecord,
    fn: Callable[[], None],
    what: str,
    *,
    writes: list[tuple[int, int]] | None = None,
) -> int:
    """Queue ``fn`` on ``stream``; returns its place in issue order. ``writes`` lists the
    ``(pointer, nbytes)`` device ranges it will write (see :func:`pending_write`)."""
    with _LOCK:
        seq = next(_SEQ)
        _WORK.append(_Work(seq, stream, fn, what, list(writes or ())))
        return seq


def pending(stream: StreamRecord) -> bool:
    """Whether work queued on ``stream`` has not run yet."""
    with _LOCK:
        return any(w.stream is stream for w in _WORK)


def pending_write(ptr: int, nbytes: int, *, other_than: StreamRecord | None = None) -> str | None:
    """What queued work (on a stream other than ``other_than``) will still write into
    ``[ptr, ptr + nbytes)``, or None."""
    with _LOCK:
        for w in _WORK:
            if w.stream is other_than:
                continue
            for start, size in w.writes:
                if start < ptr + nbytes and ptr < start + size:
                    return f"{w.what} queued on stream {w.stream.handle:#x}"
    return None


def _run(todo: list[_Work]) -> None:
    with _LOCK:
        for w in todo:
            if w in _WORK:
                _WORK.remove(w)
    first: BaseException | None = None
    for w in todo:
        try:
            w.fn()
        except Exception as exc:  # an asynchronous error: surfaces at this synchronisation
            if first is None:
                first = exc
    if first is not None:
        if isinstance(first, DeviceFault):
            raise first
        raise DeviceFault(str(first)) from first


def synchronize(stream: StreamRecord, upto: int | None = None) -> None:
    """Run the work queued on ``stream`` (up to its item ``upto``, if given) and whatever it
    must wait for on the legacy default stream (see the module docstring)."""
    with _LOCK:
        mine = [w for w in _WORK if w.stream is stream and (upto is None or w.seq <= upto)]
        if not mine:
            return
        last = mine[-1].seq
        cutoff = -1
        if stream.default:
            cutoff = last  # waits for every earlier blocking-stream item of its device
        elif stream.blocking:
            earlier = [
                w.seq
                for w in _WORK
                if w.stream.default and w.stream.device == stream.device and w.seq < last
            ]
            cutoff = max(earlier, default=-1)
        todo = [
            w
            for w in _WORK
            if (w.stream is stream and w.seq <= last)
            or (
                w.seq <= cutoff
                and w.stream.device == stream.device
                and (w.stream.blocking or w.stream.default)
            )
        ]
    _run(todo)


def synchronize_device(device: int | None = None) -> None:
    """Run all queued work of ``device`` (None: of every device), as ``cudaDeviceSynchronize``
    or ``cuCtxSynchronize`` wait for it."""
    with _LOCK:
        todo = [w for w in _WORK if device is None or w.stream.device == device]
    _run(todo)

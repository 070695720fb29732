"""The TensorRT runner (backend ``tensorrt``): a serialised engine on numpy batches.

The engine's sidecar is checked first (TensorRT version and GPU: engines are not portable), then
the engine is deserialised. I/O buffers come from :mod:`advedge.export.tensorrt.cuda` (torch CUDA
tensors, else pycuda). TensorRT, torch and pycuda are imported on construction; without TensorRT
it raises MissingDependencyError (exit 3).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from advedge.export.graph import read_sidecar
from advedge.export.runtime.base import (
    Runner,
    RunnerInfo,
    model_name,
    register_backend,
    stage_times,
)
from advedge.export.tensorrt.cuda import cuda_backend, cuda_index
from advedge.export.tensorrt.engine import (
    check_engine_compatible,
    engine_sidecar,
    load_tensorrt,
    make_logger,
)

from advedge.errors import ExportError

__all__ = ["TrtRunner", "open_engine"]


class TrtRunner(Runner):
    """Run a serialised engine on numpy batches (float32 NCHW in [0, 1]).

    Args:
        engine_path: The ``.engine`` file; its sidecar ``<stem>.json`` must be beside it.
        device: CUDA device: an index or ``"cuda:N"`` (used when no ``backend`` is given).
        backend: CUDA buffer backend (default :func:`~advedge.export.tensorrt.cuda.cuda_backend`
            on ``device``); kept as :attr:`backend`. The engine's sidecar is kept as
            :attr:`sidecar`.

    The engine is deserialised and run with the backend's device current, on the backend's own
    stream (never the default stream): the input copy, the engine and the output copy are queued
    on it in order, and the host output is read only after the stream is synchronised.
    A batch above the profile's maximum is split; :meth:`run` pads a batch below its minimum.
    """

    def __init__(
        self,
        engine_path: str | os.PathLike[str],
        *,
        device: int | str = 0,
        backend: Any = None,
    ) -> None:
        trt = load_tensorrt()
        self.trt = trt
        self.path = Path(engine_path)
        if not self.path.is_file():
            raise ExportError(f"engine not found: {self.path}")
        self.backend = backend or cuda_backend(device)
        cc = self.backend.capability()
        self.sidecar = read_sidecar(engine_sidecar(self.path))
        check_engine_compatible(self.sidecar, str(trt.__version__), cc, self.path.name)
        self.logger = make_logger(trt)
        with self.backend.activated():  # an engine and its context live on the current device
            self.runtime = trt.Runtime(self.logger)
            self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
            if self.engine is None:
                raise ExportError(
                    f"TensorRT {trt.__version__} cannot deserialise {self.path.name}: "
                    + ("; ".join(self.logger.errors()[:2]) or "corrupt or foreign engine"),
                    "rebuild it on this device with advedge export --trt",
                )
            self.context = self.engine.create_execution_context()
        self._read_io(trt)
        self._buffers: dict[str, Any] = {}

    def _read_io(self, trt: Any) -> None:
        """The engine's one input and one output, its batch range and I/O types."""
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) != mode]
        if len(self.inputs) != 1 or len(self.outputs) != 1:
            raise ExportError(f"{self.path.name}: expected one input and one output, got {names}")
        lo, _, hi = self.engine.get_tensor_profile_shape(self.inputs[0], 0)
        self.min_batch, self.max_batch = int(lo[0]), int(hi[0])
        self.out_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.outputs[0])))
        self.in_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.inputs[0])))

    @property
    def batch_range(self) -> tuple[int, int | None]:
        """The engine profile's smallest and largest batch."""
        return (self.min_batch, self.max_batch)

    def _buffer(self, name: str, nbytes: int) -> Any:
        buf = self._buffers.get(name)
        if buf is None or buf.nbytes < nbytes:
            buf = self.backend.alloc(nbytes)
            self._buffers[name] = buf
        return buf

    def _bind(self, x: np.ndarray) -> tuple[Any, Any, np.ndarray]:
        """Set the input shape and both tensor addresses: ``(input buffer, output buffer,
        host output array)``."""
        name_in, name_out = self.inputs[0], self.outputs[0]
        if not self.context.set_input_shape(name_in, tuple(x.shape)):
            raise ExportError(f"input shape {tuple(x.shape)} is outside the engine's profile")
        out = np.empty(
            tuple(int(d) for d in self.context.get_tensor_shape(name_out)), self.out_dtype
        )
        buf_in, buf_out = self._buffer(name_in, x.nbytes), self._buffer(name_out, out.nbytes)
        self.context.set_tensor_address(name_in, int(buf_in))
        self.context.set_tensor_address(name_out, int(buf_out))
        return buf_in, buf_out, out

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self.backend.stream_handle):
            raise ExportError(
                f"TensorRT failed to run {self.path.name}: {self.logger.errors()[-1:]}"
            )

    def _wait(self) -> None:
        """Synchronise the stream. The engine's work runs asynchronously, so a failure in it
        (an illegal address, a kernel fault) surfaces here, as CUDA's error: one ExportError."""
        try:
            self.backend.synchronize()
        except ExportError:
            raise
        except Exception as exc:  # pycuda's LaunchError, torch's RuntimeError
            raise ExportError(f"TensorRT failed to run {self.path.name}: {exc}") from None

    def _run_one(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=self.in_dtype)
        with self.backend.activated():
            buf_in, buf_out, out = self._bind(x)
            self.backend.to_device_async(buf_in, x)
            self._execute()
            self.backend.to_host(buf_out, out)
            self._wait()  # out is valid only now
        return out.astype(np.float32, copy=False)

    def timed(self, batch: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
        """Run one batch (within the profile) with each stage timed on its own: host-to-device
        copy, the engine, device-to-host copy (each timer stops after the stream is
        synchronised, so it measures the queued work, not its issue)."""
        x = np.ascontiguousarray(batch, dtype=self.in_dtype)
        if not self.min_batch <= len(x) <= self.max_batch:
            raise ExportError(
                f"batch {len(x)} is outside the engine's profile {self.min_batch}-{self.max_batch}"
            )
        with self.backend.activated():
            buf_in, buf_out, out = self._bind(x)
            self._wait()  # nothing earlier is timed
            t0 = time.perf_counter()
            self.backend.to_device_async(buf_in, x)
            self._wait()
            t1 = time.perf_counter()
            self._execute()
            self._wait()
            t2 = time.perf_counter()
            self.backend.to_host(buf_out, out)
            self._wait()
            t3 = time.perf_counter()
        return out.astype(np.float32, copy=False), stage_times(t0, t1, t2, t3)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if len(batch) < self.min_batch:
            raise ExportError(f"batch {len(batch)} is below the engine's minimum {self.min_batch}")
        step = self.max_batch
        parts = [self._run_one(batch[i : i + step]) for i in range(0, len(batch), step)]
        return np.concatenate(parts, axis=0)

    def describe(self) -> RunnerInfo:
        """The engine's GPU, precision and batch profile from its sidecar, and the kind, source,
        input shape and architecture of the ONNX it was built from (the sidecar's
        ``artifact``)."""
        side = self.sidecar
        art = side.get("artifact") if isinstance(side.get("artifact"), dict) else {}
        shape = side.get("input_shape") or art.get("input_shape")
        kind = side.get("kind") or art.get("kind") or "classifier"
        arch = side.get("architecture") or art.get("architecture")
        return RunnerInfo(
            backend="tensorrt",
            device=side.get("gpu"),
            precision=side.get("precision"),
            kind=kind,
            source_sha256=side["source_sha256"]
            if "source_sha256" in side
            else art.get("source_sha256"),
            input_shape=tuple(shape) if shape else None,
            batch_range=self.batch_range,
            batch_range_source="the engine's profile",
            size_bytes=self.path.stat().st_size,
            model=model_name({"architecture": arch, "kind": kind}),
        )


def open_engine(
    path: Path,
    name: str,
    *,
    device: str = "auto",
    threads: int | None = None,
    batch_sizes: Any = None,
) -> TrtRunner:
    """The ``tensorrt`` backend's runner for an engine on CUDA device ``device`` (``"cuda:N"``:
    device N; ``"auto"``, ``"cuda"`` and ``"cpu"``: device 0, see
    :func:`~advedge.export.tensorrt.cuda.cuda_index`). ``threads`` and ``batch_sizes`` are
    unused: the engine's profile is fixed at build.

    Raises:
        UsageError: ``device`` is malformed.
    """
    return TrtRunner(path, device=cuda_index(device))


register_backend(
    "tensorrt",
    "engine",
    open_engine,
    description="advedge's TensorRT runner (torch CUDA or pycuda)",
    default=True,
)

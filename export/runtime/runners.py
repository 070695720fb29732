"""One runner protocol for every artifact advedge deploys, chosen by file type.

A runner has ``run(batch: np.ndarray) -> np.ndarray`` (float32 NCHW images in [0, 1] in, logits
out), ``timed(batch)`` (the output plus the seconds of each stage it can separate: host-to-device,
compute, device-to-host) and ``metadata()`` (backend, device, precision, artifact path and size).
Backends:

===================  ========================  ===========================================
backend              artifact                  notes
===================  ========================  ===========================================
``torch``            run dir / .safetensors    eager PyTorch (CPU or CUDA)
``torch-compile``    run dir / .safetensors    ``torch.compile`` (first calls compile)
``torch-cudagraph``  run dir / .safetensors    CUDA graphs, one per batch size (CUDA only)
``onnxruntime``      .onnx                     ONNX Runtime, CPU execution provider
``onnxruntime-cuda`` .onnx                     ONNX Runtime, CUDA execution provider
``onnxruntime-trt``  .onnx                     ONNX Runtime, TensorRT execution provider
``tensorrt``         .engine                   advedge's TensorRT runner (torch CUDA or pycuda)
===================  ========================  ===========================================

``backend="auto"`` picks by the file: ``.engine`` -> tensorrt, ``.onnx`` -> onnxruntime, a run
directory or ``.safetensors`` -> torch. A backend that cannot run here (no CUDA, no provider,
no TensorRT) raises MissingDependencyError (exit 3) with a hint. Torch-free at import.
"""

from __future__ import annotations

import abc
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from advedge.export._deps import require

from advedge.errors import ExportError, MissingDependencyError, UsageError, did_you_mean

__all__ = ["BACKENDS", "artifact_kind", "open_runner"]

BACKENDS = (
    "torch",
    "torch-compile",
    "torch-cudagraph",
    "onnxruntime",
    "onnxruntime-cuda",
    "onnxruntime-trt",
    "tensorrt",
)

_ORT_PROVIDERS = {
    "onnxruntime": "CPUExecutionProvider",
    "onnxruntime-cuda": "CUDAExecutionProvider",
    "onnxruntime-trt": "TensorrtExecutionProvider",
}


def artifact_kind(path: str | os.PathLike[str]) -> str:
    """``"engine"``, ``"onnx"`` or ``"checkpoint"``, by the file type.

    Raises:
        ExportError: a path that does not exist or is of no known type.
    """
    p = Path(path)
    if not p.exists():
        raise ExportError(f"artifact not found: {p}")
    if p.is_dir():
        if (p / "model.safetensors").is_file():
            return "checkpoint"
        if (p / "purifier.safetensors").is_file():
            return "checkpoint"  # a purifier run: run in front of the classifier it guards
        raise ExportError(
            f"{p} is a folder without model.safetensors", "pass an artifact file or a run directory"
        )
    suffix = p.suffix.lower()
    if suffix == ".engine":
        return "engine"
    if suffix == ".onnx":
        return "onnx"
    if suffix == ".safetensors":
        return "checkpoint"
    raise ExportError(
        f"unknown artifact type {suffix or '(no suffix)'}: {p.name}",
        "bench takes .onnx, .engine, .safetensors or a run directory",
    )


def _default_backend(kind: str) -> str:
    return {"engine": "tensorrt", "onnx": "onnxruntime", "checkpoint": "torch"}[kind]


def _check_backend_fits(kind: str, backend: str, path: Path) -> None:
    wants = (
        "engine"
        if backend == "tensorrt"
        else "onnx"
        if backend.startswith("onnxruntime")
        else "checkpoint"
    )
    if wants != kind:
        raise UsageError(f"backend {backend} cannot run {path.name} (a {kind})")


class _Base(abc.ABC):
    """What every runner shares: ``timed`` from ``run``, and ``metadata``."""

    backend = ""

    def __init__(self, path: Path) -> None:
        self.path = path

    @abc.abstractmethod
    def run(self, batch: np.ndarray) -> np.ndarray:
        """Logits of a float32 NCHW batch in [0, 1]."""

    def timed(self, batch: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
        """The output and its wall time (``total_s``); subclasses split it where they can."""
        t0 = time.perf_counter()
        out = self.run(batch)
        return out, {"total_s": time.perf_counter() - t0}

    def metadata(self) -> dict[str, Any]:
        size = self.path.stat().st_size if self.path.is_file() else _dir_size(self.path)
        return {"backend": self.backend, "path": str(self.path), "bytes": size, **self._extra()}

    def _extra(self) -> dict[str, Any]:
        return {}


def _dir_size(path: Path) -> int:
    return sum(
        f.stat().st_size
        for f in (path / "model.safetensors", path / "purifier.safetensors")
        if f.is_file()
    )


class OrtBackend(_Base):
    """ONNX Runtime with one execution provider (no silent fallback to the CPU)."""

    def __init__(self, path: Path, backend: str, *, threads: int = 0) -> None:
        super().__init__(path)
        ort = require("onnxruntime", purpose=f"backend {backend}")
        provider = _ORT_PROVIDERS[backend]
        if provider not in ort.get_available_providers():
            raise MissingDependencyError(
                f"ONNX Runtime here has no {provider} (available: {', '.join(ort.get_available_providers())})",
                "install onnxruntime-gpu on a CUDA machine" if backend != "onnxruntime" else None,
            )
        from advedge.export.runtime import OrtRunner, control_flow_nodes

        flow = control_flow_nodes(path)
        if flow:
            # Refused rather than run under a timeout: a Loop's trip count and condition (or a
            # Scan's length) are data, so the graph may never finish; a timeout cannot tell a
            # slow artifact from an endless one, and ONNX Runtime's native run cannot be stopped
            # from Python reliably. advedge's artifacts (classifiers, purifiers, both fused) are
            # feed-forward graphs and never hold one.
            more = f" and {len(flow) - 3} more" if len(flow) > 3 else ""
            raise ExportError(
                f"{path.name} holds control flow ({', '.join(flow[:3])}{more}): refused, "
                "its run time is not bounded",
                "bench feed-forward classifier or purifier graphs, as advedge export writes them",
            )
        self.backend = backend
        self.inner = OrtRunner(path, providers=[provider], threads=threads)
        _check_onnx_io(path, self.inner)

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.inner(batch)

    def _extra(self) -> dict[str, Any]:
        from advedge.export.graph import read_onnx_metadata

        meta = read_onnx_metadata(self.path)
        return {
            "device": "cpu" if self.backend == "onnxruntime" else "cuda",
            "precision": meta.get("precision"),
            "artifact_metadata": meta,
        }


_FLOAT_OUTPUTS = ("tensor(float)", "tensor(float16)", "tensor(double)", "tensor(bfloat16)")


def _check_onnx_io(path: Path, inner: Any) -> None:
    """One float32 NCHW image input and a ``[batch, classes]`` float output, or refuse."""
    if inner.input_type != "tensor(float)":
        raise ExportError(
            f"{path.name} takes {inner.input_type} input; advedge runs artifacts on float32 "
            "images in [0, 1]",
            "export the model with advedge export (float32 NCHW input)",
        )
    if len(inner.input_shape) != 4:
        raise ExportError(
            f"{path.name} takes a rank-{len(inner.input_shape)} input {inner.input_shape}; "
            "advedge runs artifacts on NCHW image batches"
        )
    if inner.output_type not in _FLOAT_OUTPUTS:
        raise ExportError(f"{path.name} returns {inner.output_type}, not float logits")
    if inner.output_shape and len(inner.output_shape) != 2:  # unknown: checked on the logits
        raise ExportError(
            f"{path.name} returns a rank-{len(inner.output_shape)} output "
            f"{inner.output_shape}, not [batch, classes] logits"
        )


def _purified_from_run(path: Path, device: Any) -> tuple[Any, dict[str, Any]]:
    """A purifier run directory -> ``f(G(x))`` with the classifier its checkpoint records.

    The metadata says what the fused ONNX export would say (kind ``fused``, both sha256), so
    bench treats it as the FP32 PyTorch parent of the fused artifacts.
    """
    from advedge.checkpoint import load_model
    from advedge.errors import CheckpointError
    from advedge.models.purified import Purified
    from advedge.purifier import load_purifier
    from advedge.utils import sha256_file

    gen = load_purifier(path, device=device)
    gmeta = dict(gen.checkpoint_metadata)
    clf = (gmeta.get("classifier") or {}).get("path")
    if not clf or not Path(clf).is_file():
        raise CheckpointError(
            f"{path}: the classifier this purifier was trained against is not at {clf!r}",
            "bench the fused ONNX instead, or restore the classifier run",
        )
    if sha256_file(clf) != (gmeta.get("classifier") or {}).get("sha256"):
        raise CheckpointError(
            f"{path}: the classifier at {clf} changed since the purifier was trained"
        )
    model = Purified(gen, load_model(clf, device=device)).eval()
    meta = {
        "kind": "fused",
        "input_shape": gmeta.get("input_shape"),
        "source_sha256": {
            "purifier": sha256_file(path / "purifier.safetensors"),
            "classifier": sha256_file(clf),
        },
    }
    return model, meta


class TorchBackend(_Base):
    """A checkpoint in PyTorch: eager, ``torch.compile`` or CUDA graphs."""

    def __init__(self, path: Path, backend: str, *, device: str = "auto") -> None:
        super().__init__(path)
        torch = require("torch", purpose=f"backend {backend}")
        from advedge.checkpoint import load_model
        from advedge.utils import resolve_device

        self.torch = torch
        self.backend = backend
        self.device = resolve_device(device)
        if backend == "torch-cudagraph" and self.device.type != "cuda":
            raise MissingDependencyError(
                "CUDA graphs need a CUDA device", "run on a GPU or use --backend torch"
            )
        if path.is_dir() and (path / "purifier.safetensors").is_file():
            self.model, self.meta = _purified_from_run(path, self.device)
        else:
            self.model = load_model(path, device=self.device)
            self.meta = dict(getattr(self.model, "checkpoint_metadata", {}))
        self.fn = torch.compile(self.model) if backend == "torch-compile" else self.model
        self._graphs: dict[tuple[int, ...], Any] = {}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def _graph(self, shape: tuple[int, ...]) -> Any:
        torch = self.torch
        if shape not in self._graphs:
            static_in = torch.zeros(shape, device=self.device)
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream), torch.no_grad():
                for _ in range(3):  # warm-up on a side stream, as CUDA graph capture requires
                    self.model(static_in)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph), torch.no_grad():
                static_out = self.model(static_in)
            self._graphs[shape] = (graph, static_in, static_out)
        return self._graphs[shape]

    def timed(self, batch: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
        torch = self.torch
        t0 = time.perf_counter()
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
        self._sync()
        t1 = time.perf_counter()
        with torch.no_grad():
            if self.backend == "torch-cudagraph":
                graph, static_in, static_out = self._graph(tuple(x.shape))
                static_in.copy_(x)
                graph.replay()
                y = static_out
            else:
                y = self.fn(x)
        self._sync()
        t2 = time.perf_counter()
        out = y.float().cpu().numpy()
        t3 = time.perf_counter()
        return out, {"h2d_s": t1 - t0, "compute_s": t2 - t1, "d2h_s": t3 - t2, "total_s": t3 - t0}

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.timed(batch)[0]

    def _extra(self) -> dict[str, Any]:
        return {"device": str(self.device), "precision": "fp32", "artifact_metadata": self.meta}


class TrtBackend(_Base):
    """A TensorRT engine through :class:`advedge.export.tensorrt.TrtRunner`."""

    backend = "tensorrt"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        from advedge.export.tensorrt import TrtRunner

        self.inner = TrtRunner(path)

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.inner.run(batch)

    def timed(self, batch: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
        return self.inner.timed(batch)

    def _extra(self) -> dict[str, Any]:
        info = self.inner.info
        return {
            "device": info.get("gpu"),
            "precision": info.get("precision"),
            "artifact_metadata": info,
        }


def open_runner(
    path: str | os.PathLike[str], *, backend: str = "auto", device: str = "auto", threads: int = 0
) -> Any:
    """The runner for an artifact (see the module docstring).

    Raises:
        ExportError: missing artifact or unknown file type.
        UsageError: unknown backend, or one that cannot run this kind of file.
        MissingDependencyError: the backend cannot run on this machine (exit 3).
    """
    p = Path(path)
    kind = artifact_kind(p)
    if backend == "auto":
        backend = _default_backend(kind)
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r}", did_you_mean(backend, BACKENDS))
    _check_backend_fits(kind, backend, p)
    if backend == "tensorrt":
        return TrtBackend(p)
    if backend.startswith("onnxruntime"):
        return OrtBackend(p, backend, threads=threads)
    return TorchBackend(p, backend, device=device)

"""The runner contract: one call convention for every artifact advedge deploys.

A :class:`Runner` takes float32 NCHW images in [0, 1] as a numpy array and returns float32 logits:

- ``runner(batch)`` runs one batch as given;
- ``runner.run(x, batch_size=None)`` runs any number of images in batches the runner takes (at
  most ``batch_size`` and the runner's largest batch; a last batch below its smallest batch is
  padded with copies of its last image, whose outputs are dropped);
- ``runner.timed(batch)`` returns the output and the seconds of each stage the runner can
  separate (``h2d_s``, ``compute_s``, ``d2h_s``), always with the wall time ``total_s``;
- ``runner.info`` is a :class:`RunnerInfo`: what ``advedge bench`` records and checks, and the
  only thing it reads about a runner.

Backends live in :data:`BACKENDS` (name -> :class:`Backend`); :func:`open_runner` picks one by
name or by the artifact's file type. Adding a backend is one module that registers its opener,
plus its tests. The registered backends:

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
import functools
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from advedge.errors import ExportError, UsageError
from advedge.registry import Registry

__all__ = [
    "BACKENDS",
    "Backend",
    "Runner",
    "RunnerInfo",
    "artifact_bytes",
    "artifact_kind",
    "model_name",
    "open_runner",
    "stage_times",
]

#: The file types a backend runs, as :func:`artifact_kind` names them.
ARTIFACT_KINDS = ("engine", "onnx", "checkpoint")


@dataclass(frozen=True)
class RunnerInfo:
    """What a runner runs and how: everything ``advedge bench`` records or checks.

    Attributes:
        backend: The registered backend name (``"onnxruntime"``, ``"torch"``, ``"tensorrt"``...).
        device: Where it computes: ``"cpu"``, ``"cuda"``, ``"cuda:0"``, an engine's GPU name.
        precision: The arithmetic it runs in: ``"fp32"``, ``"fp16"``, ``"int8"``, or
            ``"int8-simulated"`` (an INT8 Q/DQ graph computed in FP32 on dequantised values, as
            ONNX Runtime's CUDA provider runs it); None where the artifact does not say.
        stored_precision: The artifact's own precision where it differs from ``precision``
            (``"int8"`` for an ``"int8-simulated"`` run); None where they agree.
        kind: What the artifact computes: ``"classifier"``, ``"purifier"`` or ``"fused"``.
        source_sha256: The sha256 of the checkpoint the artifact came from (a checkpoint is its
            own source); for a fused artifact ``{"purifier": ..., "classifier": ...}``; None
            where unknown.
        input_shape: The ``[C, H, W]`` the artifact records in its metadata, or None.
        graph_input_shape: The per-image input dimensions the graph itself declares (ints, or
            names for dynamic axes); empty where the runner does not report them.
        batch_range: The smallest and largest batch it takes (None: no upper limit).
        batch_range_source: What sets that range, for messages ("the engine's profile").
        gradients: Whether gradients through it are available (a PyTorch model): an attack
            crafted on its own source checkpoint is then white-box.
        host_compute: Whether it computes in host memory (its activations count against the
            machine's RAM), rather than on a GPU.
        size_bytes: The artifact's size on disk.
        model: The architecture the artifact records (a checkpoint's ``architecture``, the
            ONNX metadata's, an engine sidecar's); for a fused purifier + classifier (kind
            ``"fused"``) the classifier's. None where the artifact does not say.
        threads: The intra-op CPU threads the runner computes with, where it sets them (an ONNX
            Runtime session); None where it does not (PyTorch uses the process-wide count
            :func:`~advedge.export.runtime.threads.apply_threads` sets; TensorRT, the GPU).
        quantisation: How an INT8 artifact's weights were made, where its metadata says:
            ``"qat"`` (fine-tuned with fake quantisation, ``advedge qat``) or ``"ft"`` (its
            control: fine-tuned in FP32, quantised afterwards); None for post-training
            quantisation and for the other precisions.
    """

    backend: str
    device: str | None = None
    precision: str | None = None
    stored_precision: str | None = None
    kind: str = "classifier"
    source_sha256: str | Mapping[str, str] | None = None
    input_shape: tuple[int, ...] | None = None
    graph_input_shape: tuple[Any, ...] = ()
    batch_range: tuple[int, int | None] = (1, None)
    batch_range_source: str = "the graph's batch size"
    gradients: bool = False
    host_compute: bool = False
    size_bytes: int = 0
    model: str | None = None
    threads: int | None = None
    quantisation: str | None = None


def model_name(metadata: Mapping[str, Any]) -> str | None:
    """The :attr:`RunnerInfo.model` of an artifact from its metadata: the ``architecture``
    recorded, and for a fused artifact (``kind: fused``, whose architecture ``advedge export``
    writes as ``purifier-generator+<classifier>``) the classifier's part."""
    arch = metadata.get("architecture")
    if not isinstance(arch, str) or not arch:
        return None
    if metadata.get("kind") == "fused":
        return arch.rsplit("+", 1)[-1]
    return arch


def stage_times(t0: float, t1: float, t2: float, t3: float) -> dict[str, float]:
    """The stage split of :meth:`Runner.timed` from four clock readings: before the
    host-to-device copy, before the compute, before the device-to-host copy, and at the end."""
    return {"h2d_s": t1 - t0, "compute_s": t2 - t1, "d2h_s": t3 - t2, "total_s": t3 - t0}


class Runner(abc.ABC):
    """An artifact behind advedge's one call convention (see the module docstring).

    Subclasses implement ``__call__`` (one batch as given) and ``describe`` (the
    :class:`RunnerInfo`, computed once on first use of :attr:`info`), and override
    :attr:`batch_range` and :meth:`timed` where they know better than the defaults.
    """

    @abc.abstractmethod
    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Logits of one float32 NCHW batch in [0, 1], run as given."""

    @abc.abstractmethod
    def describe(self) -> RunnerInfo:
        """What this runner runs and how (read once, through :attr:`info`)."""

    @functools.cached_property
    def info(self) -> RunnerInfo:
        """The runner's :class:`RunnerInfo`."""
        return self.describe()

    @property
    def batch_range(self) -> tuple[int, int | None]:
        """The smallest and largest batch this runner takes (None: no upper limit)."""
        return (1, None)

    def timed(self, batch: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
        """The output of one batch and its wall time (``total_s``); runners that can split it
        into host-to-device, compute and device-to-host stages do so (:func:`stage_times`)."""
        t0 = time.perf_counter()
        out = self(batch)
        return out, {"total_s": time.perf_counter() - t0}

    def run(self, x: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        """Run ``x`` (float32 NCHW) in batches of at most ``batch_size`` images (None: as few
        calls as the runner's largest batch allows); a last batch below the runner's smallest
        one is padded with copies of its last image and the padding's outputs dropped.

        Raises:
            ExportError: no images.
        """
        if len(x) == 0:
            raise ExportError("no images to run")
        lo, hi = self.batch_range
        step = batch_size or len(x)
        if hi is not None:
            step = min(step, hi)
        parts = []
        for i in range(0, len(x), step):
            chunk = x[i : i + step]
            if len(chunk) < lo:
                pad = np.repeat(chunk[-1:], lo - len(chunk), axis=0)
                parts.append(self(np.concatenate([chunk, pad]))[: len(chunk)])
            else:
                parts.append(self(chunk))
        return np.concatenate(parts, axis=0)


#: How a backend opens an artifact: ``opener(path, name, device=, threads=, batch_sizes=)``.
Opener = Callable[..., Runner]


@dataclass(frozen=True)
class Backend:
    """A registered runner backend.

    Attributes:
        artifact: The file type it runs (``"engine"``, ``"onnx"`` or ``"checkpoint"``).
        open: ``open(path, name, *, device, threads, batch_sizes)``: the runner for ``path``;
            ``name`` is the registered name (one opener may serve several backends);
            ``device``, ``threads`` and ``batch_sizes`` as :func:`open_runner` takes them.
        default: Whether ``backend="auto"`` picks it for its file type (one per type).
    """

    artifact: str
    open: Opener
    default: bool = False


#: Runner backends by name, in the order ``--backend`` lists them.
BACKENDS: Registry[Backend] = Registry("backend")


def register_backend(
    name: str, artifact: str, opener: Opener, *, description: str, default: bool = False
) -> None:
    """Register ``opener`` as backend ``name`` for ``artifact`` files (see :class:`Backend`)."""
    if artifact not in ARTIFACT_KINDS:
        raise ValueError(f"unknown artifact kind {artifact!r}")
    BACKENDS.register(name, Backend(artifact, opener, default), description=description)


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


def artifact_bytes(path: Path) -> int:
    """An artifact's size on disk: the file, or a run directory's checkpoint files."""
    if path.is_file():
        return path.stat().st_size
    return sum(
        f.stat().st_size
        for f in (path / "model.safetensors", path / "purifier.safetensors")
        if f.is_file()
    )


def _default_backend(kind: str) -> str:
    return next(n for n, b in BACKENDS.items() if b.artifact == kind and b.default)


def open_runner(
    path: str | os.PathLike[str],
    *,
    backend: str = "auto",
    device: str = "auto",
    threads: int | None = None,
    batch_sizes: Sequence[int] | None = None,
) -> Runner:
    """The runner for an artifact (see the module docstring).

    Args:
        path: An ``.engine``, an ``.onnx``, a ``.safetensors`` checkpoint or a run directory.
        backend: A name from :data:`BACKENDS`, or ``"auto"`` (by the file type).
        device: For PyTorch backends: ``"auto"``, ``"cpu"``, ``"cuda"``...
        threads: For ONNX Runtime: ``intra_op_num_threads``; None: the count
            :func:`~advedge.export.runtime.threads.apply_threads` set, else ONNX Runtime's
            choice; 0: ONNX Runtime's choice. PyTorch backends use the process-wide count.
        batch_sizes: The batch sizes the caller will run, where a backend prepares for them
            (ONNX Runtime's TensorRT provider builds its optimisation profile to cover them);
            None: the backend's default.

    Raises:
        ExportError: missing artifact or unknown file type.
        UsageError: unknown backend, or one that cannot run this kind of file.
        MissingDependencyError: the backend cannot run on this machine (exit 3).
    """
    p = Path(path)
    kind = artifact_kind(p)
    name = _default_backend(kind) if backend == "auto" else backend
    entry = BACKENDS.get(name)
    if entry.artifact != kind:
        what = {
            "engine": "a TensorRT engine",
            "onnx": "an ONNX model",
            "checkpoint": "a checkpoint",
        }
        runs = {"engine": "engines", "onnx": "ONNX models", "checkpoint": "checkpoints"}
        fits = [n for n, b in BACKENDS.items() if b.artifact == kind]
        raise UsageError(
            f"backend {name} runs {runs[entry.artifact]}, and {p.name} is {what[kind]}",
            "choose " + ", ".join(["auto", *fits]),
        )
    return entry.open(p, name, device=device, threads=threads, batch_sizes=batch_sizes)

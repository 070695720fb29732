"""The PyTorch runner (backends ``torch``, ``torch-compile``, ``torch-cudagraph``).

:class:`TorchRunner` puts a module behind the runner convention (no gradients, eval mode): the
parity gate of ``advedge export`` wraps the model it exports in one, and ``advedge bench`` opens
a checkpoint or run directory with :func:`open_checkpoint` (a purifier run directory runs in
front of the classifier its checkpoint records). Torch is imported on construction only.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from advedge.export._deps import require
from advedge.export.runtime.base import (
    Runner,
    RunnerInfo,
    artifact_bytes,
    model_name,
    register_backend,
    stage_times,
)

from advedge.errors import ExportError, MissingDependencyError

__all__ = ["MAX_SHAPES", "MODES", "TorchRunner", "bucket", "open_checkpoint"]

#: Backend name -> how the module runs: eagerly, ``torch.compile``-d, or as CUDA graphs.
MODES = {"torch": "eager", "torch-compile": "compile", "torch-cudagraph": "cudagraph"}


#: Most graphs (CUDA graphs) or compiled shapes (torch.compile) one runner keeps: the exact
#: batches :meth:`TorchRunner.timed` is asked for, and for other calls the power-of-two
#: buckets :meth:`TorchRunner.__call__` pads to (13 up to bench's largest batch, 4096).
MAX_SHAPES = 24


def bucket(batch: int) -> int:
    """The power of two at or above ``batch``: the size an untimed call is padded to."""
    return 1 << max(0, int(batch) - 1).bit_length()


class TorchRunner(Runner):
    """A PyTorch module behind the runner convention (no gradients, eval mode).

    Args:
        module: The model (moved to ``device``, put in eval mode).
        device: Where it runs.
        mode: ``"eager"``, ``"compile"`` (``torch.compile``) or ``"cudagraph"`` (CUDA graphs;
            CUDA only).
        path: The checkpoint it was loaded from, if any (for :attr:`info`).
        metadata: The checkpoint's metadata (kind, architecture, input shape, source sha256
            where recorded).

    Shapes, for ``compile`` and ``cudagraph``: :meth:`timed` (what bench times) runs each batch
    size as it is, compiled or captured for exactly that size, so a latency is always the
    latency of that batch. Other calls (:meth:`run`, the accuracy and attack passes, whose
    batches shrink: a tail batch, Square's ever fewer images) use a size already prepared for,
    else pad to the next power of two with copies of the last image and drop the padding's
    outputs. So one runner prepares at most :data:`MAX_SHAPES` sizes, and never more than
    that many graphs (all sharing one memory pool) or compiled variants.

    ``compile`` compiles with ``dynamic=False``: every size gets its own static kernels (with
    ``dynamic=None`` the second size would recompile to dynamic-shape kernels, and every later
    size would be timed on those). Dynamo's recompile limit is raised to cover
    :data:`MAX_SHAPES` and, where this torch has the switch, hitting it raises instead of
    falling back to eager silently. :meth:`shapes` says which sizes ran how.
    """

    def __init__(
        self,
        module: Any,
        *,
        device: Any = "cpu",
        mode: str = "eager",
        path: Path | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self.torch = require("torch", purpose="running the PyTorch model")
        self.device = self.torch.device(device)
        self.module = module.to(self.device).eval()
        self.mode = mode
        self.fn = self._compiled() if mode == "compile" else self.module
        self.path = path
        self.metadata = dict(metadata or {})
        self._graphs: dict[tuple[int, ...], Any] = {}
        self._pool: Any = None
        self._prepared: set[int] = set()
        self.padded_calls = 0

    def _compiled(self) -> Any:
        dynamo = self.torch._dynamo.config
        wanted = {
            "recompile_limit": MAX_SHAPES + 1,  # torch >= 2.6; cache_size_limit before
            "cache_size_limit": MAX_SHAPES + 1,
            "fail_on_recompile_limit_hit": True,  # raise rather than run eager silently
        }
        # Dynamo reads its config when a call compiles, so the limits hold for this runner's
        # calls only (a training run's torch.compile in the same process keeps its own).
        self._limits = {k: v for k, v in wanted.items() if hasattr(dynamo, k)}
        return self.torch.compile(self.module, dynamic=False)

    def shapes(self) -> dict[str, Any]:
        """The batch sizes compiled or captured so far and how many calls were padded to one
        (empty for eager)."""
        if self.mode == "eager":
            return {}
        return {"prepared_batches": sorted(self._prepared), "padded_calls": self.padded_calls}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def _graph(self, shape: tuple[int, ...]) -> Any:
        """The CUDA graph of one input shape, captured on first use into the runner's one
        memory pool (graphs replay one at a time and their outputs are copied out before the
        next replay, which is what sharing a pool requires)."""
        torch = self.torch
        if shape not in self._graphs:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            static_in = torch.zeros(shape, device=self.device)
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream), torch.no_grad():
                for _ in range(3):  # warm-up on a side stream, as CUDA graph capture requires
                    self.module(static_in)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool), torch.no_grad():
                static_out = self.module(static_in)
            self._graphs[shape] = (graph, static_in, static_out)
        return self._graphs[shape]

    def _size_for(self, batch: int, exact: bool) -> int:
        """The size a batch runs at: itself when timed or already prepared, else its bucket."""
        if self.mode == "eager" or exact or batch in self._prepared:
            size = batch
        else:
            size = next((b for b in sorted(self._prepared) if batch <= b <= bucket(batch)), None)
            size = size or bucket(batch)
        if size not in self._prepared and len(self._prepared) >= MAX_SHAPES:
            size = next((b for b in sorted(self._prepared) if b >= batch), None) or size
            if size not in self._prepared:
                raise ExportError(
                    f"{self.mode}: batch {batch} needs a new shape, and this runner already "
                    f"holds {MAX_SHAPES}",
                    "run larger batches first, or use --backend torch",
                )
        if self.mode != "eager":
            self._prepared.add(size)
        return size

    def _forward(self, x: Any) -> Any:
        torch = self.torch
        with torch.no_grad():
            if self.mode == "cudagraph":
                graph, static_in, static_out = self._graph(tuple(x.shape))
                static_in.copy_(x)
                graph.replay()
                return static_out
            if self.mode == "compile":
                with torch._dynamo.config.patch(self._limits):
                    return self.fn(x)
            return self.fn(x)

    def _timed(self, batch: np.ndarray, exact: bool) -> tuple[np.ndarray, dict[str, float]]:
        torch = self.torch
        n = len(batch)
        size = self._size_for(n, exact)
        t0 = time.perf_counter()
        arr = np.ascontiguousarray(batch, dtype=np.float32)
        if size > n:
            self.padded_calls += 1
            arr = np.concatenate([arr, np.repeat(arr[-1:], size - n, axis=0)])
        x = torch.from_numpy(arr).to(self.device)
        self._sync()
        t1 = time.perf_counter()
        y = self._forward(x)
        self._sync()
        t2 = time.perf_counter()
        out = y[:n].float().cpu().numpy()
        return out, stage_times(t0, t1, t2, time.perf_counter())

    def timed(self, batch: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
        """The logits of one batch, run at exactly its size and timed by stage (the device is
        synchronised between them)."""
        return self._timed(batch, exact=True)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self._timed(batch, exact=False)[0]

    def describe(self) -> RunnerInfo:
        """FP32 on this device, with gradients; kind, source, input shape and architecture from
        the checkpoint's metadata (a checkpoint is its own source)."""
        meta = self.metadata
        shape = meta.get("input_shape")
        return RunnerInfo(
            backend=next(n for n, m in MODES.items() if m == self.mode),
            device=str(self.device),
            precision="fp32",
            kind=meta.get("kind") or "classifier",
            source_sha256=self._source(),
            input_shape=tuple(shape) if shape else None,
            gradients=True,
            host_compute=self.device.type == "cpu",
            size_bytes=artifact_bytes(self.path) if self.path is not None else 0,
            model=model_name(meta),
        )

    def _source(self) -> Any:
        from advedge.checkpoint import FORMAT
        from advedge.utils import sha256_file

        if "source_sha256" in self.metadata:
            return self.metadata["source_sha256"]
        if self.path is not None and self.metadata.get("format") == FORMAT:
            p = self.path / "model.safetensors" if self.path.is_dir() else self.path
            return sha256_file(p)
        return None


def _purified_from_run(path: Path, device: Any) -> tuple[Any, dict[str, Any]]:
    """A purifier run directory -> ``f(G(x))`` with the classifier its checkpoint records.

    The metadata says what the fused ONNX export would say (kind ``fused``, the architecture
    ``purifier-generator+<classifier>``, both sha256), so bench treats it as the FP32 PyTorch
    parent of the fused artifacts.
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
    classifier = load_model(clf, device=device)
    model = Purified(gen, classifier).eval()
    arch = dict(getattr(classifier, "checkpoint_metadata", {})).get("architecture")
    meta = {
        "kind": "fused",
        "architecture": f"purifier-generator+{arch}" if arch else None,
        "input_shape": gmeta.get("input_shape"),
        "source_sha256": {
            "purifier": sha256_file(path / "purifier.safetensors"),
            "classifier": sha256_file(clf),
        },
    }
    return model, meta


def open_checkpoint(
    path: Path,
    name: str,
    *,
    device: str = "auto",
    threads: int | None = None,
    batch_sizes: Any = None,
) -> TorchRunner:
    """Backend ``name``'s runner for a checkpoint or run directory.

    ``threads`` is unused: PyTorch's thread count is the process's, set by
    :func:`~advedge.export.runtime.threads.apply_threads`; so is ``batch_sizes`` (shapes are
    prepared on first use, see :class:`TorchRunner`).

    Raises:
        MissingDependencyError: no torch, or CUDA graphs without a CUDA device (exit 3).
        CheckpointError: not a loadable advedge checkpoint (or purifier run).
    """
    require("torch", purpose=f"backend {name}")
    from advedge.checkpoint import load_model
    from advedge.utils import resolve_device

    where = resolve_device(device)
    if MODES[name] == "cudagraph" and where.type != "cuda":
        raise MissingDependencyError(
            "CUDA graphs need a CUDA device", "run on a GPU or use --backend torch"
        )
    if path.is_dir() and (path / "purifier.safetensors").is_file():
        model, meta = _purified_from_run(path, where)
    else:
        model = load_model(path, device=where)
        meta = dict(getattr(model, "checkpoint_metadata", {}))
    return TorchRunner(model, device=where, mode=MODES[name], path=path, metadata=meta)


register_backend(
    "torch", "checkpoint", open_checkpoint, description="eager PyTorch (CPU or CUDA)", default=True
)
register_backend(
    "torch-compile",
    "checkpoint",
    open_checkpoint,
    description="torch.compile (first calls compile)",
)
register_backend(
    "torch-cudagraph",
    "checkpoint",
    open_checkpoint,
    description="CUDA graphs, one per batch size, one memory pool (CUDA only)",
)

"""The ONNX Runtime runner (backends ``onnxruntime``, ``onnxruntime-cuda``, ``onnxruntime-trt``).

:class:`OrtRunner` is one inference session on one ONNX file; the parity gate and the INT8
accuracy report of ``advedge export`` use it directly. Opened as a backend (``advedge bench``),
the file is checked first: the execution provider must exist here (no silent fallback to the
CPU), the graph must be feed-forward (no Loop, Scan or If) and take float32 NCHW images and
return ``[batch, classes]`` float logits. Torch-free: ONNX Runtime is imported on construction.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from advedge.export._deps import ORT_LOG_SEVERITY, quiet_active, require
from advedge.export.graph import (
    check_external_data,
    graph_input,
    load_onnx_graph,
    read_onnx_metadata,
)
from advedge.export.runtime.base import Runner, RunnerInfo, model_name, register_backend
from advedge.export.runtime.threads import configured_threads
from advedge.export.tensorrt.cuda import cuda_index

from advedge.errors import ExportError, MissingDependencyError

__all__ = [
    "CONTROL_FLOW_OPS",
    "PROVIDERS",
    "OrtRunner",
    "control_flow_nodes",
    "open_onnx",
    "ort_trt_cache_dir",
    "trt_provider_options",
]

# Nodes whose work is data-dependent: a Loop's trip count and condition, a Scan's sequence length
# and an If's branch are computed at run time, so a graph holding one can run without bound.
CONTROL_FLOW_OPS = frozenset({"Loop", "Scan", "If"})

#: Backend name -> the one ONNX Runtime execution provider it runs on.
PROVIDERS = {
    "onnxruntime": "CPUExecutionProvider",
    "onnxruntime-cuda": "CUDAExecutionProvider",
    "onnxruntime-trt": "TensorrtExecutionProvider",
}

_FLOAT_OUTPUTS = ("tensor(float)", "tensor(float16)", "tensor(double)", "tensor(bfloat16)")


class OrtRunner(Runner):
    """An ONNX Runtime inference session on one ONNX file.

    Args:
        path: The ``.onnx`` file (external-data paths are checked first).
        providers: Execution providers; default ``["CPUExecutionProvider"]``. The first is the
            one asked for: a session that did not start it (ONNX Runtime falls back to the CPU
            silently when a GPU provider fails to start) is refused (:meth:`_check_providers`).
        provider_options: One options dict per provider (ONNX Runtime's ``provider_options``).
        threads: ``intra_op_num_threads``; None (default): the count
            :func:`~advedge.export.runtime.threads.apply_threads` set in this process, else
            ONNX Runtime's choice; 0: ONNX Runtime's choice. With a count set, the session also
            runs nodes one at a time (sequential execution, one inter-op thread): advedge's
            graphs are a chain of layers, so a second pool would only compete for the CPUs.
            The count in effect is :attr:`threads` (None: ONNX Runtime's choice).
        optimization: ONNX Runtime's graph optimisation level: ``"all"`` (default: what a
            deployment runs; on a CPU it fuses Q/DQ pairs into int8 kernels), ``"basic"`` or
            ``"none"``. With ``"basic"`` a QDQ model is computed as written (quantise, dequantise,
            float op), which is the arithmetic TensorRT's int8 kernels reproduce; ONNX Runtime's
            x86 int8 kernels on CPUs without VNNI can saturate the int8 products instead.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        providers: list[str] | None = None,
        provider_options: list[dict[str, Any]] | None = None,
        threads: int | None = None,
        optimization: str = "all",
    ) -> None:
        ort = require("onnxruntime", purpose="running an ONNX artifact")
        if not quiet_active():  # the environment's logger too (quieter while quiet)
            ort.set_default_logger_severity(ORT_LOG_SEVERITY)
        levels = {
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        }
        if optimization not in levels:
            raise ExportError(f"unknown ONNX Runtime optimisation level {optimization!r}")
        self.optimization = optimization
        self.path = Path(path)
        if not self.path.is_file():
            raise ExportError(f"ONNX file not found: {self.path}")
        check_external_data(self.path)
        options = ort.SessionOptions()
        count = configured_threads() if threads is None else int(threads)
        self.threads = count or None
        if self.threads is not None:
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
            options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.options = options
        options.log_severity_level = ORT_LOG_SEVERITY
        options.graph_optimization_level = levels[optimization]
        self.providers = list(providers or ["CPUExecutionProvider"])
        self.provider_options = [dict(o) for o in provider_options or [{} for _ in self.providers]]
        try:
            self.session = ort.InferenceSession(
                str(self.path),
                options,
                providers=self.providers,
                provider_options=self.provider_options,
            )
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ExportError(f"ONNX Runtime cannot load {self.path}: {first[:300]}") from None
        self._check_providers()
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ExportError(f"{self.path} has {len(inputs)} inputs; advedge artifacts have one")
        self.input_name = inputs[0].name
        self.input_shape = list(inputs[0].shape)
        self.input_type = str(inputs[0].type)  # e.g. "tensor(float)"
        output = self.session.get_outputs()[0]
        self.output_name = output.name
        self.output_shape = list(output.shape or [])  # [] where ONNX Runtime cannot tell
        self.output_type = str(output.type)

    def _check_providers(self) -> None:
        """Refuse a session that does not run on the provider asked for.

        ``get_available_providers()`` lists what this build of ONNX Runtime was compiled with,
        not what starts: a CUDA or TensorRT provider whose libraries (CUDA, cuDNN, TensorRT)
        fail to load is dropped with a warning at log level 2, which advedge's log level (3)
        hides, and the session runs on the CPU. Numbers labelled ``onnxruntime-cuda`` would then
        be CPU numbers, so the session's own provider list is checked.

        Raises:
            MissingDependencyError: the first provider asked for is not the session's (exit 3).
        """
        wanted = self.providers[0]
        running = list(self.session.get_providers())
        if wanted not in running:
            raise MissingDependencyError(
                f"ONNX Runtime could not start {wanted} for {self.path.name} and would run it on "
                f"{', '.join(running) or 'nothing'}: refused, the numbers would not be {wanted}'s",
                "check the CUDA, cuDNN and TensorRT libraries onnxruntime-gpu needs "
                "(advedge doctor lists them)",
            )

    @property
    def batch_range(self) -> tuple[int, int | None]:
        """The graph's fixed batch size twice, or ``(1, None)`` when its batch axis is dynamic."""
        b = self.input_shape[0] if self.input_shape else None
        return (b, b) if isinstance(b, int) and b > 0 else (1, None)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(batch, dtype=np.float32)
        return self.session.run([self.output_name], {self.input_name: x})[0].astype(
            np.float32, copy=False
        )

    def computed_precision(self, stored: str | None) -> str | None:
        """The arithmetic this session runs an artifact of precision ``stored`` in.

        An INT8 Q/DQ graph runs in int8 only where the provider fuses each Q/DQ pair into an
        int8 kernel: the CPU provider at optimisation level ``all`` (QLinearConv, MatMulInteger)
        and the TensorRT provider (explicit quantisation). ONNX Runtime's CUDA provider has
        QuantizeLinear/DequantizeLinear and MatMulInteger kernels but no int8 convolution, so it
        computes each convolution in FP32 on dequantised values (fake quantisation), as does any
        provider with graph fusion switched off: ``"int8-simulated"``. Other precisions run as
        stored.
        """
        if stored != "int8":
            return stored
        provider = self.providers[0]
        if provider == "TensorrtExecutionProvider":
            return stored
        if provider == "CPUExecutionProvider" and self.optimization == "all":
            return stored
        return "int8-simulated"

    def describe(self) -> RunnerInfo:
        """The session's provider and threads, and the precision, kind, source, input shape and
        architecture the ONNX metadata records (written by ``advedge export``)."""
        meta = read_onnx_metadata(self.path)
        provider = self.providers[0]
        name = next((n for n, p in PROVIDERS.items() if p == provider), "onnxruntime")
        shape = meta.get("input_shape")
        stored = meta.get("precision")
        computed = self.computed_precision(stored)
        return RunnerInfo(
            backend=name,
            device="cpu" if name == "onnxruntime" else "cuda",
            precision=computed,
            stored_precision=stored if computed != stored else None,
            kind=meta.get("kind") or "classifier",
            source_sha256=meta.get("source_sha256"),
            input_shape=tuple(shape) if shape else None,
            graph_input_shape=tuple(self.input_shape[1:]),
            batch_range=self.batch_range,
            host_compute=provider == "CPUExecutionProvider",
            size_bytes=self.path.stat().st_size,
            model=model_name(meta),
            threads=self.threads,
            quantisation=meta.get("quantisation") if stored == "int8" else None,
        )


def control_flow_nodes(path: str | os.PathLike[str]) -> list[str]:
    """The control-flow nodes (Loop, Scan, If) of an ONNX file, at any depth, as
    ``"OpType 'name'"``: the main graph, every subgraph and every model-local function.

    Raises:
        ExportError: an unreadable ONNX file.
    """
    model = load_onnx_graph(path)
    found: list[str] = []

    def walk(nodes: Any) -> None:
        for node in nodes:
            if node.op_type in CONTROL_FLOW_OPS:
                found.append(f"{node.op_type} {node.name or '(unnamed)'!r}")
            for attr in node.attribute:
                if attr.HasField("g"):
                    walk(attr.g.node)
                for sub in attr.graphs:
                    walk(sub.node)

    walk(model.graph.node)
    for fn in model.functions:
        walk(fn.node)
    return found


def _check_feed_forward(path: Path) -> None:
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


def _check_io(path: Path, runner: OrtRunner) -> None:
    """One float32 NCHW image input and a ``[batch, classes]`` float output, or refuse."""
    if runner.input_type != "tensor(float)":
        raise ExportError(
            f"{path.name} takes {runner.input_type} input; advedge runs artifacts on float32 "
            "images in [0, 1]",
            "export the model with advedge export (float32 NCHW input)",
        )
    if len(runner.input_shape) != 4:
        raise ExportError(
            f"{path.name} takes a rank-{len(runner.input_shape)} input {runner.input_shape}; "
            "advedge runs artifacts on NCHW image batches"
        )
    if runner.output_type not in _FLOAT_OUTPUTS:
        raise ExportError(f"{path.name} returns {runner.output_type}, not float logits")
    if runner.output_shape and len(runner.output_shape) != 2:  # unknown: checked on the logits
        raise ExportError(
            f"{path.name} returns a rank-{len(runner.output_shape)} output "
            f"{runner.output_shape}, not [batch, classes] logits"
        )


def open_onnx(
    path: Path,
    name: str,
    *,
    device: str = "auto",
    threads: int | None = None,
    batch_sizes: Sequence[int] | None = None,
) -> OrtRunner:
    """Backend ``name``'s runner for an ONNX artifact, checked for bench (module docstring).

    ``device``: ``"cuda:N"`` runs a GPU provider on device N (else device 0); the CPU provider
    ignores it. ``batch_sizes``: the batches the caller will run, which the TensorRT provider's
    optimisation profile covers (:func:`trt_provider_options`).

    Raises:
        MissingDependencyError: no ONNX Runtime, not this backend's provider, or a provider that
            did not start (exit 3).
        ExportError: control flow, or an input or output that is not an image classifier's.
    """
    ort = require("onnxruntime", purpose=f"backend {name}")
    provider = PROVIDERS[name]
    if provider not in ort.get_available_providers():
        raise MissingDependencyError(
            f"ONNX Runtime here has no {provider} (available: {', '.join(ort.get_available_providers())})",
            "install onnxruntime-gpu on a CUDA machine" if name != "onnxruntime" else None,
        )
    _check_feed_forward(path)
    options: dict[str, Any] = {}
    if provider != "CPUExecutionProvider":
        options["device_id"] = cuda_index(device)
    if provider == "TensorrtExecutionProvider":
        options.update(trt_provider_options(path, batch_sizes))
    runner = OrtRunner(path, providers=[provider], provider_options=[options], threads=threads)
    _check_io(path, runner)
    return runner


#: The TensorRT provider's profile without a caller's batch sizes: batch 1 to eval's 256.
DEFAULT_TRT_BATCHES = (1, 32, 256)


def ort_trt_cache_dir() -> Path:
    """Where the TensorRT provider's engines and timing cache go: ``ort-trt`` beside advedge's
    calibration caches (``$ADVEDGE_CACHE_DIR``, else ``$XDG_CACHE_HOME/advedge``, else
    ``~/.cache/advedge``)."""
    from advedge.calibration.cache import default_cache_dir

    return default_cache_dir().parent / "ort-trt"


def trt_provider_options(
    path: Path, batch_sizes: Sequence[int] | None = None, cache_dir: Path | None = None
) -> dict[str, Any]:
    """The TensorRT execution provider's options for an advedge artifact.

    Without them the provider builds an engine for the first input shape it sees and rebuilds
    it for each new one (a tail batch, Square's shrinking batches), and builds again in every
    process. So:

    - an explicit optimisation profile, batch ``min(batch_sizes, 1)`` to ``max(batch_sizes)``
      with the largest as the optimum (``trt_profile_{min,opt,max}_shapes``,
      ``"input:NxCxHxW"``), for a graph with a dynamic batch axis;
    - the engine and timing caches on (``trt_engine_cache_*``, ``trt_timing_cache_*``) in
      ``cache_dir`` (default :func:`ort_trt_cache_dir`), which the provider keys by the
      graph, the profile and the GPU;
    - ``trt_int8_enable`` for an INT8 Q/DQ graph (the provider builds explicit quantisation
      with TensorRT's INT8 flag) and ``trt_fp16_enable`` for an FP16 one.
    """
    model = load_onnx_graph(path)
    name, dims = graph_input(model)
    meta = read_onnx_metadata(model)
    sizes = sorted({int(b) for b in (batch_sizes or DEFAULT_TRT_BATCHES)})
    folder = Path(cache_dir) if cache_dir is not None else ort_trt_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    opts: dict[str, Any] = {
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(folder),
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": str(folder),
    }
    chw = dims[1:]
    if not isinstance(dims[0], int) and all(isinstance(d, int) and d > 0 for d in chw):
        shape = "x".join(str(d) for d in chw)
        opts["trt_profile_min_shapes"] = f"{name}:{sizes[0]}x{shape}"
        opts["trt_profile_opt_shapes"] = f"{name}:{sizes[-1]}x{shape}"
        opts["trt_profile_max_shapes"] = f"{name}:{sizes[-1]}x{shape}"
    if meta.get("precision") == "int8":
        opts["trt_int8_enable"] = "True"
    elif meta.get("precision") == "fp16":
        opts["trt_fp16_enable"] = "True"
    return opts


register_backend(
    "onnxruntime",
    "onnx",
    open_onnx,
    description="ONNX Runtime, CPU execution provider",
    default=True,
)
register_backend(
    "onnxruntime-cuda", "onnx", open_onnx, description="ONNX Runtime, CUDA execution provider"
)
register_backend(
    "onnxruntime-trt", "onnx", open_onnx, description="ONNX Runtime, TensorRT execution provider"
)

"""Runners: one call convention for the PyTorch model and an ONNX Runtime session.

A runner takes float32 NCHW images in [0, 1] as a numpy array and returns the graph's output
as a float32 numpy array, in batches. ``advedge bench`` times them; the parity gate and the
INT8 accuracy report compare them. :func:`quiet_onnxruntime` is the one place advedge keeps
ONNX Runtime's console output off stderr (export, calibrate and the quantiser use it). Torch-free:
ONNX Runtime is imported on construction.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from advedge.export._deps import require
from advedge.export.graph import check_external_data

from advedge.errors import ExportError

__all__ = [
    "CONTROL_FLOW_OPS",
    "ORT_LOG_SEVERITY",
    "ORT_QUIET_SEVERITY",
    "OrtRunner",
    "TorchRunner",
    "control_flow_nodes",
    "ort_default_severity",
    "quiet_onnxruntime",
    "run_batched",
]

logger = logging.getLogger(__name__)

# Nodes whose work is data-dependent: a Loop's trip count and condition, a Scan's sequence length
# and an If's branch are computed at run time, so a graph holding one can run without bound.
CONTROL_FLOW_OPS = frozenset({"Loop", "Scan", "If"})

# ONNX Runtime's logging: 3 is "error", so its warnings (unused initializers, shape notes, ANSI
# coloured) never reach a user's terminal beside advedge's own one-line messages.
ORT_LOG_SEVERITY = 3


def run_batched(fn: Any, x: np.ndarray, batch_size: int) -> np.ndarray:
    """Apply ``fn`` to ``x`` in batches and concatenate the results."""
    if len(x) == 0:
        raise ExportError("no images to run")
    outs = [fn(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    return np.concatenate(outs, axis=0)


def control_flow_nodes(path: str | os.PathLike[str]) -> list[str]:
    """The control-flow nodes (Loop, Scan, If) of an ONNX file, at any depth, as
    ``"OpType 'name'"``: the main graph, every subgraph and every model-local function.

    Raises:
        ExportError: an unreadable ONNX file.
    """
    onnx = require("onnx", purpose="checking an ONNX file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ExportError(
            f"{path} is not a readable ONNX file ({type(exc).__name__}: {exc})"
        ) from None
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


# --------------------------------------------------------------------------------------------
# ONNX Runtime's console output
# --------------------------------------------------------------------------------------------


class _DebugLines(io.TextIOBase):
    """A text stream that logs every complete line at debug (ONNX Runtime's ``print()``)."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self._prefix = prefix
        self._buf = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._buf += text
        while "\n" in self._buf:
            line, self._buf = self._buf.split("\n", 1)
            if line.strip():
                logger.debug("%s%s", self._prefix, line.rstrip())
        return len(text)

    def flush(self) -> None:
        if self._buf.strip():
            logger.debug("%s%s", self._prefix, self._buf.rstrip())
        self._buf = ""


class _ToDebug(logging.Handler):
    """Forward another library's log records to advedge's logger at debug."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith("advedge"):
            # ours (never forwarded again: no loop). On the root logger this handler stands in
            # for Python's last resort, which would have printed advedge's warnings when
            # nothing else is configured: keep doing that.
            lone = not logging.getLogger("advedge").handlers
            if lone and record.levelno >= logging.WARNING and logging.lastResort is not None:
                logging.lastResort.handle(record)
            return
        try:
            text = record.getMessage()
        except Exception:  # a malformed record must not break the caller
            text = str(record.msg)
        logger.debug("%s %s: %s", record.name, record.levelname.lower(), text)


_QUIET_DEPTH = 0
#: ONNX Runtime's default logger severity while quiet: 4 is fatal only. The sessions ONNX
#: Runtime's quantiser creates itself (pre-processing, calibration) log warnings and errors as
#: ANSI-coloured lines straight to stderr; every such failure also comes back as a Python
#: exception, which advedge reports in one line.
ORT_QUIET_SEVERITY = 4


def ort_default_severity(ort: Any) -> int:
    """ONNX Runtime's default logger severity now, where ONNX Runtime tells it; otherwise the
    severity advedge sets for its own sessions (:data:`ORT_LOG_SEVERITY`).

    ONNX Runtime (1.x) offers a setter but no getter; the fallback never reports a level more
    verbose than advedge's own, so restoring it never brings ONNX Runtime's warnings back.
    """
    getter = getattr(ort, "get_default_logger_severity", None)
    if callable(getter):
        try:
            return int(getter())
        except Exception:  # an ORT whose getter fails: fall back
            pass
    return ORT_LOG_SEVERITY


def quiet_active() -> bool:
    """Whether a :func:`quiet_onnxruntime` context is active in this process."""
    return _QUIET_DEPTH > 0


@contextlib.contextmanager
def quiet_onnxruntime(*, capture_prints: bool = False) -> Iterator[None]:
    """Keep ONNX Runtime's and numpy's chatter off stderr; errors then stay one line.

    The one place advedge quiets ONNX Runtime (``advedge export``, ``advedge calibrate`` and
    the quantiser use it). While active:

    * ONNX Runtime's default logger severity is :data:`ORT_QUIET_SEVERITY`; when the outermost
      context exits it is set back to the severity found on entry (see
      :func:`ort_default_severity`: the one ONNX Runtime reports, else advedge's own
      :data:`ORT_LOG_SEVERITY`), never to a hard-coded level. Sessions created with their own
      ``log_severity_level`` keep theirs;
    * Python warnings (numpy's ``RuntimeWarning``, ONNX Runtime's deprecations) are recorded
      and logged at debug on advedge's logger instead of printed;
    * records of the ``onnxruntime`` loggers, and of the root logger when it has no handler
      (ONNX Runtime's quantiser calls ``logging.warning`` at module level, which would
      otherwise install a root handler printing to stderr), are logged at debug; handlers
      added to the root logger meanwhile are removed;
    * with ``capture_prints``, ``print()`` output (ONNX Runtime's calibration progress) is
      logged at debug, line by line, so stdout stays clean for ``--json``.

    Nests: only the outermost context changes and restores ONNX Runtime's severity.
    """
    global _QUIET_DEPTH
    root = logging.getLogger()
    before = list(root.handlers)
    ort_logger = logging.getLogger("onnxruntime")
    forward = _ToDebug()
    ort_logger.addHandler(forward)
    propagate, ort_logger.propagate = ort_logger.propagate, False
    root_forward = None
    if not root.handlers:
        root_forward = _ToDebug()
        root.addHandler(root_forward)
    ort = None
    found = ORT_LOG_SEVERITY
    if _QUIET_DEPTH == 0:
        try:
            import onnxruntime as ort

            found = ort_default_severity(ort)
            ort.set_default_logger_severity(ORT_QUIET_SEVERITY)
        except Exception:  # not installed, or an ORT without the call: nothing to quiet
            ort = None
    _QUIET_DEPTH += 1
    prints = _DebugLines("onnxruntime: ") if capture_prints else None
    try:
        with contextlib.ExitStack() as stack:
            caught = stack.enter_context(warnings.catch_warnings(record=True))
            warnings.simplefilter("default")
            if prints is not None:
                stack.enter_context(contextlib.redirect_stdout(prints))
            try:
                yield
            finally:
                for w in caught:
                    logger.debug(
                        "%s: %s (%s:%s)", w.category.__name__, w.message, w.filename, w.lineno
                    )
    finally:
        if prints is not None:
            prints.flush()
        _QUIET_DEPTH -= 1
        if ort is not None:
            with contextlib.suppress(Exception):
                ort.set_default_logger_severity(found)
        ort_logger.removeHandler(forward)
        ort_logger.propagate = propagate
        for handler in list(root.handlers):
            if handler not in before:
                root.removeHandler(handler)


class OrtRunner:
    """An ONNX Runtime inference session on one ONNX file.

    Args:
        path: The ``.onnx`` file (external-data paths are checked first).
        providers: Execution providers; default ``["CPUExecutionProvider"]``.
        threads: ``intra_op_num_threads`` (0 lets ONNX Runtime choose).
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
        threads: int = 0,
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
        options.intra_op_num_threads = int(threads)
        options.log_severity_level = ORT_LOG_SEVERITY
        options.graph_optimization_level = levels[optimization]
        try:
            self.session = ort.InferenceSession(
                str(self.path), options, providers=providers or ["CPUExecutionProvider"]
            )
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ExportError(f"ONNX Runtime cannot load {self.path}: {first[:300]}") from None
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

    @property
    def min_batch(self) -> int:
        """The smallest batch the graph takes: its fixed batch size, or 1 when it is dynamic."""
        b = self.input_shape[0] if self.input_shape else None
        return b if isinstance(b, int) and b > 0 else 1

    @property
    def max_batch(self) -> int | None:
        """The largest batch the graph takes: its fixed batch size, or None when it is dynamic."""
        b = self.input_shape[0] if self.input_shape else None
        return b if isinstance(b, int) and b > 0 else None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        return self.session.run([self.output_name], {self.input_name: x})[0].astype(
            np.float32, copy=False
        )

    def run(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Run ``x`` (float32 NCHW) in batches of ``batch_size``."""
        return run_batched(self, x, batch_size)


class TorchRunner:
    """The PyTorch module, behind the same call convention (no gradients, eval mode)."""

    def __init__(self, module: Any, *, device: str = "cpu") -> None:
        self.torch = require("torch", purpose="running the PyTorch model")
        self.device = device
        self.module = module.to(device).eval()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.no_grad():
            out = self.module(
                torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)
            )
        return out.float().cpu().numpy()

    def run(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Run ``x`` (float32 NCHW) in batches of ``batch_size``."""
        return run_batched(self, x, batch_size)

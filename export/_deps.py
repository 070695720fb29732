"""The deploy side's optional libraries: lazy imports with an install hint when absent, and the
one place advedge keeps ONNX Runtime's console output off stderr (:func:`quiet_onnxruntime`).

Nothing in ``advedge.export`` or ``advedge.calibration`` imports torch, onnx, onnxruntime,
TensorRT or pycuda at module level: a device may have only some of them.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import warnings
from collections.abc import Iterator
from types import ModuleType
from typing import Any

from advedge.errors import MissingDependencyError

__all__ = [
    "ORT_LOG_SEVERITY",
    "ORT_QUIET_SEVERITY",
    "ort_default_severity",
    "quiet_active",
    "quiet_onnxruntime",
    "require",
]

logger = logging.getLogger(__name__)

# ONNX Runtime's logging: 3 is "error", so its warnings (unused initializers, shape notes, ANSI
# coloured) never reach a user's terminal beside advedge's own one-line messages.
ORT_LOG_SEVERITY = 3

# module -> (pip extra that installs it, what it is)
_EXTRAS = {
    "onnx": ("export", "the onnx package"),
    "onnxruntime": ("export", "ONNX Runtime"),
    "onnxscript": ("export", "onnxscript (torch's ONNX exporter)"),
    "onnxconverter_common": ("export", "onnxconverter-common (the float16 converter)"),
    "tensorrt": ("trt", "TensorRT"),
    "pycuda": ("trt", "pycuda"),
    "torch": ("", "PyTorch"),
}


def require(module: str, *, purpose: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependencyError` (exit code 3) with a hint.

    Args:
        module: Dotted module name, e.g. ``"onnxruntime.quantization"``.
        purpose: What needs it, for the message (e.g. ``"INT8 calibration"``).
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        root = module.split(".")[0]
        extra, what = _EXTRAS.get(root, ("", root))
        if root == "tensorrt":
            hint = (
                "install TensorRT on the device that will run the engine (JetPack ships it on "
                "Jetson; `pip install tensorrt` on a desktop GPU); engines are not portable"
            )
        elif root == "torch":
            hint = "pip install torch (this step runs on the host)"
        else:
            hint = f"pip install 'advedge[{extra}]'" if extra else f"pip install {root}"
        raise MissingDependencyError(
            f"{purpose} needs {what}, which cannot be imported ({type(exc).__name__}: {exc})",
            hint,
        ) from None


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

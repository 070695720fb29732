"""What building and running a TensorRT engine share: importing TensorRT, a logger that keeps
its errors, the batch profile, the engine's file name and sidecar, and the compatibility check.

An engine runs only on the TensorRT version and GPU architecture that built it, so its file name
records both (``<name>.<precision>.trt<version>.sm<cc>.b<min>-<max>.engine``) and its sidecar
(``<engine stem>.json``) is checked before the engine is deserialised.
"""

from __future__ import annotations

import logging
import os
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from advedge.export._deps import require

from advedge.errors import ExportError, UsageError

__all__ = [
    "ENGINE_SCHEMA",
    "LOG_KEEP",
    "BatchProfile",
    "check_engine_compatible",
    "engine_filename",
    "engine_sidecar",
    "load_tensorrt",
    "make_logger",
]

ENGINE_SCHEMA = "advedge.engine/1"

logger = logging.getLogger(__name__)


def load_tensorrt() -> Any:
    """Import TensorRT or raise MissingDependencyError (exit 3) with an install hint."""
    return require("tensorrt", purpose="building or running a TensorRT engine (--trt)")


#: How many of the latest warnings and errors a TensorRT logger keeps (each kind).
LOG_KEEP = 200


def make_logger(trt: Any, keep: int = LOG_KEEP) -> Any:
    """A TensorRT logger that keeps the latest ``keep`` warnings and errors (``messages``),
    so failures can name their cause, and separately the latest ``keep`` errors (``errors()``),
    which warnings never push out. ``counts`` has how many of each severity were seen in all.

    The log is bounded: a runner lives as long as a benchmark and TensorRT may warn on every
    call. Each distinct warning is also logged once on advedge's logger.
    """
    sev = trt.ILogger.Severity
    bad = (sev.INTERNAL_ERROR, sev.ERROR)
    kept = (*bad, sev.WARNING)

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.messages: deque[tuple[Any, str]] = deque(maxlen=keep)
            self._errors: deque[str] = deque(maxlen=keep)
            self._warned: set[str] = set()
            self.counts: Counter[str] = Counter()

        def log(self, severity: Any, msg: str) -> None:
            if severity not in kept:
                return
            text = str(msg)
            self.counts[getattr(severity, "name", str(severity))] += 1
            self.messages.append((severity, text))
            if severity in bad:
                self._errors.append(text)
            elif text not in self._warned:
                if len(self._warned) < 10 * keep:  # remember a bounded number of texts
                    self._warned.add(text)
                logger.warning("TensorRT: %s", text)

        def errors(self) -> list[str]:
            return list(self._errors)

    return _Logger()


@dataclass(frozen=True)
class BatchProfile:
    """The optimisation profile over the batch axis."""

    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 64

    def __post_init__(self) -> None:
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise UsageError(
                f"batch profile must satisfy 1 <= min <= opt <= max, got "
                f"{self.min_batch}/{self.opt_batch}/{self.max_batch}"
            )

    def shapes(self, chw: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        """The min, opt and max input shapes for images of shape ``chw``."""
        return tuple((b, *chw) for b in (self.min_batch, self.opt_batch, self.max_batch))


def engine_filename(
    name: str, precision: str, trt_version: str, cc: tuple[int, int], profile: BatchProfile
) -> str:
    """``<name>.<precision>.trt<version>.sm<cc>.b<min>-<max>.engine``, e.g.
    ``resnet8.int8.trt10.3.0.sm87.b1-64.engine``."""
    return (
        f"{name}.{precision}.trt{trt_version}.sm{cc[0]}{cc[1]}."
        f"b{profile.min_batch}-{profile.max_batch}.engine"
    )


def engine_sidecar(engine_path: str | os.PathLike[str]) -> Path:
    """``x.engine`` -> ``x.json``."""
    p = Path(engine_path)
    return (
        p.with_name(p.name[: -len(".engine")] + ".json")
        if p.name.endswith(".engine")
        else p.with_suffix(".json")
    )


def check_engine_compatible(
    info: dict[str, Any], trt_version: str, cc: tuple[int, int], source: str
) -> None:
    """Refuse an engine built by another TensorRT version or for another GPU architecture.

    Raises:
        ExportError: naming what differs and telling to rebuild on this device.
    """
    built_version = str(info.get("tensorrt_version"))
    built_cc = tuple(info.get("compute_capability") or ())
    if built_version != str(trt_version):
        raise ExportError(
            f"{source} was built by TensorRT {built_version}; this device has {trt_version}",
            "engines are not portable: rebuild it here with advedge export --trt",
        )
    if built_cc != tuple(cc):
        raise ExportError(
            f"{source} was built for sm{''.join(map(str, built_cc))}; this GPU is sm{cc[0]}{cc[1]}",
            "engines are not portable: rebuild it here with advedge export --trt",
        )

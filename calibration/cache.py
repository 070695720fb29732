"""The calibration cache: the activation ranges of one calibration, as JSON.

Calibration is the slow step of :func:`advedge.calibration.quantize_qdq`, so its ranges are
cached, keyed by the FP32 file's sha256, the calibration set's content sha256, the method, the
options that change ranges and the ONNX Runtime version. A corrupt cache file is logged and
recomputed, never fatal. Torch-free.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from advedge.utils import atomic_write_text

logger = logging.getLogger(__name__)

__all__ = [
    "CACHE_SCHEMA",
    "cache_file",
    "default_cache_dir",
    "ranges_usable",
    "read_cache",
    "write_cache",
]

#: ``schema`` field of calibration cache files.
CACHE_SCHEMA = "advedge.calibration-cache/1"


def default_cache_dir() -> Path:
    """Where calibration caches live by default.

    ``$ADVEDGE_CACHE_DIR/calibration`` if set, else ``$XDG_CACHE_HOME/advedge/calibration``,
    else ``~/.cache/advedge/calibration``.
    """
    if os.environ.get("ADVEDGE_CACHE_DIR"):
        return Path(os.environ["ADVEDGE_CACHE_DIR"]).expanduser() / "calibration"
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "advedge" / "calibration"
    return Path.home() / ".cache" / "advedge" / "calibration"


def cache_file(
    cache_dir: Path, model_sha: str, calib_sha: str, method: str, key: dict[str, Any]
) -> Path:
    """The cache file of ``key`` in ``cache_dir``."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return cache_dir / f"{model_sha[:16]}-{calib_sha[:16]}-{method}-{digest[:12]}.json"


def read_cache(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """The ``ranges`` payload of a valid cache file for ``key``; None (logged) otherwise."""
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        logger.warning("ignoring corrupt calibration cache %s (%s); recomputing", path, exc)
        return None
    if not isinstance(doc, dict) or doc.get("schema") != CACHE_SCHEMA:
        logger.warning("ignoring calibration cache %s: not a %s file", path, CACHE_SCHEMA)
        return None
    mismatch = [k for k, v in key.items() if doc.get(k) != v]
    if mismatch:
        logger.warning(
            "ignoring calibration cache %s: its %s differ(s) from this run; recomputing",
            path,
            ", ".join(mismatch),
        )
        return None
    ranges = doc.get("ranges")
    if not isinstance(ranges, dict) or not isinstance(ranges.get("data"), dict):
        logger.warning("ignoring calibration cache %s: no ranges in it; recomputing", path)
        return None
    return ranges


def ranges_usable(ortq_calibrate: Any, ranges_file: Path, ort_name: str, tensors: set[str]) -> bool:
    """Whether ORT can load ``ranges_file`` for the method ``ort_name`` (ORT's name) and it
    names tensors of the graph."""
    try:
        data = ortq_calibrate.load_tensors_data(ranges_file)
        ok_method = data.calibration_method == getattr(ortq_calibrate.CalibrationMethod, ort_name)
        names = set(data.data)
    except Exception as exc:  # any failure to parse means a corrupt cache
        logger.warning("ignoring calibration cache: ORT cannot read its ranges (%s)", exc)
        return False
    if not ok_method or not names or not names <= tensors:
        logger.warning("ignoring calibration cache: its ranges do not match this graph")
        return False
    return True


def write_cache(path: Path, key: dict[str, Any], ranges_file: Path) -> bool:
    """Store the ranges of ``ranges_file`` under ``key``; False (logged) when it cannot."""
    try:
        ranges = json.loads(ranges_file.read_text(encoding="utf-8"))
        doc = {"schema": CACHE_SCHEMA, **key, "ranges": ranges}
        atomic_write_text(path, json.dumps(doc, sort_keys=True) + "\n")
    except (OSError, ValueError) as exc:
        logger.warning("could not write the calibration cache %s (%s)", path, exc)
        return False
    return True

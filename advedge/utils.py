"""Small helpers shared across advedge: fractions, atomic writes, seeding, devices, hashing."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import platform
import random
import re
import tempfile
from collections.abc import Callable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

from advedge.errors import UsageError

logger = logging.getLogger(__name__)

__all__ = [
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "autocast_context",
    "available_memory",
    "cpu_model",
    "current_umask",
    "environment",
    "parse_eps",
    "parse_fraction",
    "resolve_device",
    "seed_everything",
    "sha256_file",
    "to_jsonable",
]


# A plain decimal number (no sign other than a leading one, no underscores, no inf or nan) and
# ``a/b`` of two such numbers.
_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d{1,4})?"
_FRACTION = re.compile(rf"(?P<num>{_NUMBER})(?:\s*/\s*(?P<den>{_NUMBER}))?")


def parse_fraction(value: str | float | int, *, name: str = "value") -> float:
    """Parse ``"8/255"``, ``"0.03"`` or a number into a float.

    Text must be a plain number or exactly ``a/b`` with ``a`` and ``b`` plain numbers:
    ``8/255/2`` and ``8/(255)`` are refused, not read some other way.

    Raises:
        UsageError: if the value is not a number or a fraction ``a/b`` with ``b != 0``.
    """
    if isinstance(value, bool):
        raise UsageError(f"{name} must be a number, got {value!r}")
    if isinstance(value, (int, float)):
        try:
            out = float(value)
        except OverflowError:  # an int beyond float's range
            raise UsageError(f"{name} must be finite, got an integer beyond float range") from None
    else:
        text = str(value).strip()
        match = _FRACTION.fullmatch(text) if len(text) <= 200 else None
        if match is None:
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            raise UsageError(f"{name} must be a number or a fraction such as 8/255, got {shown}")
        num, den = match.group("num"), match.group("den")
        try:
            # Exact (8/255 is the float nearest 8/255); exponents have at most 4 digits, so
            # Fraction never builds a huge integer.
            out = float(num) if den is None else float(Fraction(num) / Fraction(den))
        except ZeroDivisionError:
            raise UsageError(f"{name} must not divide by zero, got {value!r}") from None
        except OverflowError:
            raise UsageError(f"{name} must be finite, got {value!r}") from None
    if not math.isfinite(out):
        raise UsageError(f"{name} must be finite, got {value!r}")
    return out


def parse_eps(value: str | float | int, *, name: str = "eps") -> float:
    """Parse a perturbation budget or step size; it must lie in (0, 1] in pixel units.

    Raises:
        UsageError: if the value does not parse or lies outside (0, 1].
    """
    out = parse_fraction(value, name=name)
    if not 0.0 < out <= 1.0:
        raise UsageError(
            f"{name} must lie in (0, 1] (pixel space), got {value}",
            "write it as a fraction of the pixel range, e.g. 8/255",
        )
    return out


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only on success.

    The temporary file lives in the same directory, so the final ``os.replace`` is atomic on
    POSIX: readers see either the old file or the complete new one, never a partial write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        # mkstemp creates 0600 files; give the result the permissions a plain open() would.
        os.chmod(tmp_path, 0o666 & ~current_umask())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def current_umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def available_memory() -> int | None:
    """Bytes of memory available to this process now (``MemAvailable``), or None where that
    cannot be told."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, then rename)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (temporary file, then rename)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Return the hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def resolve_device(device: str = "auto") -> Any:
    """Turn ``auto|cpu|cuda|cuda:N|mps`` into a ``torch.device``.

    Raises:
        UsageError: for an unknown device string, or CUDA asked for but not available.
    """
    import torch

    device = (device or "auto").strip().lower()
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"unknown device {device!r}", "use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            "--device cuda was asked for but CUDA is not available", "use --device cpu"
        )
    return dev


def autocast_context(device: Any, amp: str) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    """A factory of autocast contexts for ``amp`` (``auto`` = bf16 on CUDA, off on CPU).

    Args:
        device: The ``torch.device`` the model runs on.
        amp: ``off``, ``bf16``, ``fp16`` or ``auto``.
    """
    import torch

    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "off"
    if amp == "off":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def environment() -> dict[str, Any]:
    """Describe the machine and library versions, for results JSON."""
    import numpy as np
    import torch

    from advedge import __version__

    env: dict[str, Any] = {
        "advedge": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "cuda": torch.version.cuda,
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        idx = torch.cuda.current_device()
        env["gpu"] = torch.cuda.get_device_name(idx)
        major, minor = torch.cuda.get_device_capability(idx)
        env["compute_capability"] = f"{major}.{minor}"
    else:
        env["gpu"] = None
    return env


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo, else what the platform module reports)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def to_jsonable(obj: Any) -> Any:
    """Convert numpy scalars/arrays, paths and tuples to plain JSON types; NaN becomes None."""
    import numpy as np

    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)

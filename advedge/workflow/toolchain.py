"""What ``advedge doctor`` reports before it runs anything: the toolchain's versions.

:data:`VERSION_PROBES` holds one small function per part of the toolchain (Python and advedge,
PyTorch with its CUDA and cuDNN, ONNX, ONNX Runtime with its execution providers, TensorRT,
pycuda, the NVIDIA driver and GPUs, a Jetson's power mode and clocks). Each returns a dict of
fields; :func:`toolchain_versions` merges them in registration order. A probe never fails the
report: what cannot be found is None, and a probe that raises gives None for each of its fields
(logged at debug). Nothing here changes a setting: commands are read-only queries
(``nvidia-smi --query-gpu``, ``nvpmodel -q``), each with a short timeout.

Adding a probe is one function registered with ``@VERSION_PROBES.register("name")`` that
returns its fields (and lists them in ``FIELDS`` of its registration, so a failed probe still
reports them as None).
"""

from __future__ import annotations

import glob
import importlib
import importlib.metadata
import logging
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import advedge
from advedge.export.runtime.environment import read_command
from advedge.registry import Registry, first_doc_line

__all__ = ["COMMAND_TIMEOUT_S", "VERSION_PROBES", "Probe", "read_command", "toolchain_versions"]

logger = logging.getLogger(__name__)

#: Seconds any command a probe runs may take before it is abandoned (its field is then None).
COMMAND_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Probe:
    """One part of the toolchain: ``read()`` returns ``fields``' values (None: not found)."""

    read: Callable[[], dict[str, Any]]
    fields: tuple[str, ...]


#: The version probes, in the order the report lists their fields.
VERSION_PROBES: Registry[Probe] = Registry("version probe")


def _read_file(path: str | Path) -> str | None:
    try:
        return Path(path).read_text(errors="replace").strip() or None
    except OSError:
        return None


def _module_version(name: str, dist: str | None = None) -> str | None:
    """``name.__version__`` when it imports, else the installed distribution's version."""
    try:
        module = importlib.import_module(name)
        version = getattr(module, "__version__", None) or getattr(module, "VERSION_TEXT", None)
        if version:
            return str(version)
    except Exception:  # not installed, or installed but broken: say what metadata says
        pass
    try:
        return importlib.metadata.version(dist or name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _probe(name: str, *fields: str) -> Callable[[Callable[[], dict[str, Any]]], Any]:
    def add(read: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
        VERSION_PROBES.register(name, Probe(read, fields), description=first_doc_line(read))
        return read

    return add


@_probe("python", "python", "advedge", "platform")
def _python() -> dict[str, Any]:
    """Python, advedge and the operating system."""
    return {
        "python": platform.python_version(),
        "advedge": advedge.__version__,
        "platform": platform.platform(terse=True),
    }


@_probe("torch", "torch", "cuda", "cudnn")
def _torch() -> dict[str, Any]:
    """PyTorch, the CUDA it was built with (None: a CPU build) and the cuDNN it loads."""
    try:
        import torch
    except ImportError:
        return {"torch": None, "cuda": None, "cudnn": None}
    cudnn = None
    try:
        if torch.backends.cudnn.is_available():
            cudnn = torch.backends.cudnn.version()
    except Exception:  # a CUDA build without the cuDNN libraries
        cudnn = None
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": cudnn}


@_probe("onnx", "onnx")
def _onnx() -> dict[str, Any]:
    """The onnx package (advedge's exporter writes and checks graphs with it)."""
    return {"onnx": _module_version("onnx")}


@_probe("onnxruntime", "onnxruntime", "onnxruntime_providers")
def _onnxruntime() -> dict[str, Any]:
    """ONNX Runtime and the execution providers this build offers (whether each starts is the
    backend checks' business)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return {"onnxruntime": None, "onnxruntime_providers": None}
    return {
        "onnxruntime": str(ort.__version__),
        "onnxruntime_providers": list(ort.get_available_providers()),
    }


@_probe("tensorrt", "tensorrt", "pycuda")
def _tensorrt() -> dict[str, Any]:
    """TensorRT and pycuda (versions only: no CUDA context is made here)."""
    return {"tensorrt": _module_version("tensorrt"), "pycuda": _module_version("pycuda")}


def _torch_gpus() -> list[dict[str, Any]]:
    try:
        import torch

        if not torch.cuda.is_available():
            return []
        return [
            {
                "index": i,
                "name": torch.cuda.get_device_name(i),
                "compute_capability": "{}.{}".format(*torch.cuda.get_device_capability(i)),
            }
            for i in range(torch.cuda.device_count())
        ]
    except Exception:
        return []


def _smi_gpus() -> tuple[str | None, list[dict[str, Any]]]:
    """The driver version and the GPUs as ``nvidia-smi`` lists them (older drivers do not know
    the ``compute_cap`` field: asked again without it)."""
    for fields in ("index,name,driver_version,compute_cap", "index,name,driver_version"):
        text = read_command(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"])
        if not text:
            continue
        driver, gpus = None, []
        for line in text.splitlines():
            parts = [p.strip() for p in line.split(",")]
            if len(parts) < 3:
                continue
            driver = parts[2]
            gpu: dict[str, Any] = {"index": int(parts[0]) if parts[0].isdigit() else parts[0]}
            gpu["name"] = parts[1]
            gpu["compute_capability"] = parts[3] if len(parts) > 3 else None
            gpus.append(gpu)
        return driver, gpus
    return None, []


def _nvml_driver() -> str | None:
    try:
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:
        return None


def _proc_driver() -> str | None:
    """The kernel module's version from ``/proc/driver/nvidia/version`` (``... Kernel Module
    535.104.05 ...``)."""
    text = _read_file("/proc/driver/nvidia/version")
    if not text:
        return None
    words = text.splitlines()[0].split()
    if "Module" in words and words.index("Module") + 1 < len(words):
        return words[words.index("Module") + 1]
    return None


@_probe("nvidia", "nvidia_driver", "gpus")
def _nvidia() -> dict[str, Any]:
    """The NVIDIA driver (nvidia-smi, else pynvml, else /proc/driver/nvidia/version) and every
    GPU with its compute capability (as torch sees them, else as nvidia-smi lists them)."""
    driver, smi_gpus = _smi_gpus()
    gpus = _torch_gpus() or smi_gpus
    driver = driver or _nvml_driver() or _proc_driver()
    return {"nvidia_driver": driver, "gpus": gpus}


def _clocks() -> dict[str, str]:
    """Current clocks a Jetson exposes read-only: each devfreq device (GPU, memory controller)
    and each CPU, in MHz."""
    clocks: dict[str, str] = {}
    for path in sorted(glob.glob("/sys/class/devfreq/*/cur_freq")):
        value = _read_file(path)
        if value and value.isdigit():
            clocks[Path(path).parent.name] = f"{int(value) / 1e6:.0f} MHz"
    for path in sorted(glob.glob("/sys/devices/system/cpu/cpu[0-9]*/cpufreq/scaling_cur_freq")):
        value = _read_file(path)
        if value and value.isdigit():
            clocks[Path(path).parents[1].name] = f"{int(value) / 1e3:.0f} MHz"
    return clocks


@_probe("jetson", "jetson_release", "jetson_power_mode", "jetson_clocks")
def _jetson() -> dict[str, Any]:
    """On a Jetson: the L4T release, the power mode (``nvpmodel -q``) and the current clocks;
    None elsewhere. Read only: no mode or clock is changed."""
    release = _read_file("/etc/nv_tegra_release")
    if release is None:
        return {"jetson_release": None, "jetson_power_mode": None, "jetson_clocks": None}
    mode = read_command(["nvpmodel", "-q"])
    return {
        "jetson_release": release.splitlines()[0].lstrip("# ").strip(),
        "jetson_power_mode": mode.splitlines()[0].strip() if mode else None,
        "jetson_clocks": _clocks() or None,
    }


def toolchain_versions() -> dict[str, Any]:
    """Every probe's fields, merged in registration order (see the module docstring)."""
    versions: dict[str, Any] = {}
    for name, probe in VERSION_PROBES.items():
        try:
            found = probe.read()
        except Exception as exc:  # a probe must never fail the report
            logger.debug("version probe %s failed: %s: %s", name, type(exc).__name__, exc)
            found = {}
        versions.update({field: found.get(field) for field in probe.fields})
    return versions

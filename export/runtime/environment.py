"""The environment record ``advedge bench`` writes beside its measurements: CPU (and the CPUs and
physical cores this process may use), GPU and compute capability, library and driver versions,
and on a Jetson the power mode, the clocks and a tegrastats sample. Reading it never fails: what
cannot be read is recorded as None.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
from advedge.export.runtime.threads import cpus_available, default_threads

import advedge
from advedge.utils import cpu_model

__all__ = ["environment_manifest", "read_command"]


def read_command(cmd: list[str], timeout: float = 5.0) -> str | None:
    """The stripped stdout of a read-only command, or None where it is not installed, fails,
    prints nothing or takes longer than ``timeout`` seconds."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() or None if res.returncode == 0 else None


def environment_manifest() -> dict[str, Any]:
    """The machine a benchmark ran on: CPU, GPU and compute capability, library and driver
    versions, and on a Jetson the power mode, the clocks and a tegrastats sample."""
    env: dict[str, Any] = {
        "advedge": advedge.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_available": cpus_available(),  # this process's affinity: what it may run on
        "physical_cores_available": default_threads(),
        "numpy": np.__version__,
    }
    for mod in ("torch", "onnxruntime", "tensorrt"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:
            env[mod] = None
    env["gpu"] = env["compute_capability"] = env["cuda"] = None
    try:
        import torch

        env["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
            env["compute_capability"] = "{}.{}".format(*torch.cuda.get_device_capability(0))
    except Exception:
        pass
    smi = read_command(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"])
    env["driver"] = smi.split(",")[-1].strip() if smi else None
    if env["gpu"] is None and smi:
        env["gpu"] = smi.split(",")[0].strip()
    jetson = Path("/etc/nv_tegra_release").is_file()
    env["jetson"] = jetson
    if jetson:
        env["nvpmodel"] = read_command(["nvpmodel", "-q"])
        env["jetson_clocks"] = read_command(["jetson_clocks", "--show"])
        env["tegrastats"] = read_command(
            ["timeout", "2", "tegrastats", "--interval", "500"], timeout=4
        )
    return env

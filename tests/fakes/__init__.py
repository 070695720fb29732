"""Test doubles of TensorRT and pycuda. These are NOT the real libraries.

TensorRT and pycuda need an NVIDIA GPU and NVIDIA's package index, neither of which the test
machine has. ``tests/fakes/tensorrt.py`` models the documented TensorRT 10.x and 11.x Python API
(which names exist in which major version, how builds, deserialisation and execution fail) and
``tests/fakes/pycuda.py`` the part of pycuda that moves data to and from "device" memory (host
memory owned by the double). An engine built by the double really runs: it embeds the ONNX model
and executes it with ONNX Runtime on the CPU. Each module's docstring lists the documentation
each behaviour follows and what is not modelled.

Passing tests against these doubles shows that code uses the documented API the documented way;
it does not show that an engine builds, or performs, on a real device.

``tests/fakes/artifacts.py`` is no double: it makes small real artifacts (a seeded tiny
classifier, its run directory and its FP32 ONNX) for the runner, bench and TensorRT tests.
"""

from __future__ import annotations

import importlib.machinery
import sys
import types
from typing import Any

__all__ = ["install_fake_tensorrt"]


def install_fake_tensorrt(
    monkeypatch: Any,
    version: str = "10.3.0",
    compute_capability: tuple[int, int] = (8, 7),
) -> types.ModuleType:
    """Put fresh doubles in ``sys.modules`` as ``tensorrt``, ``pycuda``, ``pycuda.driver`` and
    ``pycuda.autoinit`` (undone by ``monkeypatch`` at the end of the test) and return the fake
    ``tensorrt`` module.

    Args:
        monkeypatch: pytest's ``monkeypatch`` fixture.
        version: TensorRT version to impersonate; the major version (10 or 11) decides the API.
        compute_capability: ``(major, minor)`` of the pretend GPU (engines are tied to it).
    """
    from .pycuda import make_pycuda
    from .tensorrt import make_tensorrt

    trt = make_tensorrt(version, compute_capability=compute_capability)
    pycuda, driver, autoinit = make_pycuda(compute_capability=compute_capability)
    # Real modules have a __spec__; importlib.util.find_spec (which torch.export calls for
    # optional backends) raises ValueError on a module in sys.modules whose __spec__ is None.
    for module in (trt, pycuda, driver, autoinit):
        module.__spec__ = importlib.machinery.ModuleSpec(module.__name__, None)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "pycuda", pycuda)
    monkeypatch.setitem(sys.modules, "pycuda.driver", driver)
    monkeypatch.setitem(sys.modules, "pycuda.autoinit", autoinit)
    return trt

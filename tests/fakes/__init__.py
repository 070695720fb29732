"""Test doubles of TensorRT, pycuda and torch's CUDA API. These are NOT the real libraries.

TensorRT and pycuda need an NVIDIA GPU and NVIDIA's package index, neither of which the test
machine has, and torch here has no CUDA. ``tests/fakes/tensorrt.py`` models the documented
TensorRT 10.x and 11.x Python API (which names exist in which major version, the enums' values,
how builds, deserialisation and execution fail), ``tests/fakes/pycuda.py`` the part of pycuda and
``tests/fakes/torch_cuda.py`` the part of ``torch.cuda`` that move data to and from "device"
memory. All three share one pretend machine, ``tests/fakes/device.py``: GPUs (one, or several
with ``device_count``), contexts and the current device, device memory (host memory owned by the
double) and streams whose queued work (async copies, ``execute_async_v3``) runs only when
someone synchronises, so a missing synchronise, a copy on the wrong stream or the wrong device
fails a test. An engine built by the double really runs: it embeds the ONNX model and executes
it with ONNX Runtime on the CPU. Each module's docstring lists the documentation each behaviour
follows and what is not modelled.

Passing tests against these doubles shows that code uses the documented API the documented way;
it does not show that an engine builds, or performs, on a real device.

Helpers:

- :func:`install_fake_tensorrt`: the TensorRT and pycuda doubles in ``sys.modules``
  (``torch_cuda=True`` adds the torch-CUDA double, see below);
- :func:`install_fake_torch_cuda`: the torch-CUDA double as the torch that
  :mod:`advedge.export.tensorrt.cuda` sees (its ``_import_torch``), so ``cuda_backend()`` returns
  a ``TorchCuda`` over it, as on a machine whose torch has CUDA; the real ``torch`` module is not
  touched. Install it after :func:`install_fake_tensorrt` (it uses that pretend machine).

``tests/fakes/artifacts.py`` is no double: it makes small real artifacts (a seeded tiny
classifier, its run directory and its FP32 ONNX) for the runner, bench and TensorRT tests.
"""

from __future__ import annotations

import importlib.machinery
import sys
import types
from typing import Any

__all__ = ["install_fake_tensorrt", "install_fake_torch_cuda"]


def install_fake_tensorrt(
    monkeypatch: Any,
    version: str = "10.3.0",
    compute_capability: tuple[int, int] = (8, 7),
    *,
    device_count: int = 1,
    torch_cuda: bool = False,
) -> types.ModuleType:
    """Put fresh doubles in ``sys.modules`` as ``tensorrt``, ``pycuda``, ``pycuda.driver`` and
    ``pycuda.autoinit`` (undone by ``monkeypatch`` at the end of the test) and return the fake
    ``tensorrt`` module. Work a previous test left queued on the pretend machine is dropped.

    Args:
        monkeypatch: pytest's ``monkeypatch`` fixture.
        version: TensorRT version to impersonate; the major version (10 or 11) decides the API.
        compute_capability: ``(major, minor)`` of the pretend GPUs (engines are tied to it).
        device_count: How many GPUs the pretend machine has (all alike).
        torch_cuda: Also install the torch-CUDA double (:func:`install_fake_torch_cuda`), so
            advedge's I/O buffers take the torch route.
    """
    from .device import Machine, discard_pending
    from .pycuda import make_pycuda
    from .tensorrt import make_tensorrt

    discard_pending()
    machine = Machine(device_count, compute_capability)
    trt = make_tensorrt(version, compute_capability=compute_capability)
    pycuda, driver, autoinit = make_pycuda(machine=machine)
    # Real modules have a __spec__; importlib.util.find_spec (which torch.export calls for
    # optional backends) raises ValueError on a module in sys.modules whose __spec__ is None.
    for module in (trt, pycuda, driver, autoinit):
        module.__spec__ = importlib.machinery.ModuleSpec(module.__name__, None)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "pycuda", pycuda)
    monkeypatch.setitem(sys.modules, "pycuda.driver", driver)
    monkeypatch.setitem(sys.modules, "pycuda.autoinit", autoinit)
    if torch_cuda:
        install_fake_torch_cuda(monkeypatch)
    return trt


def install_fake_torch_cuda(monkeypatch: Any) -> types.ModuleType:
    """Make :func:`advedge.export.tensorrt.cuda.cuda_backend` see the torch-CUDA double (on the
    pretend machine of the last :func:`install_fake_tensorrt`) instead of the real torch, undone
    by ``monkeypatch``; returns the double (``.cuda`` is the fake ``torch.cuda``)."""
    from advedge.export.tensorrt import cuda as cuda_module

    from .device import active
    from .torch_cuda import make_torch_cuda

    fake = make_torch_cuda(active())
    monkeypatch.setattr(cuda_module, "_import_torch", lambda: fake)
    return fake

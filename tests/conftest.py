"""Shared pytest fixtures."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

# One intra-op thread for the tests' tiny models, here and in the CLI subprocesses they start:
# on a busy machine threads fight other processes for the cores and a tiny forward pass waits
# at every barrier (bench --threads measured eager ResNet-8 at batch 1 17x slower with two
# threads than with one on a loaded 2-core machine; benchmarks/results/threads_cpu.md), and on a
# quiet one these models are too small to gain from a second thread.
os.environ.setdefault("OMP_NUM_THREADS", "1")
try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover - torch is a test dependency
    pass


def write_npz_dataset(
    root: Path,
    *,
    n_train: int = 128,
    n_test: int = 64,
    num_classes: int = 10,
    size: int = 32,
    channels: int = 3,
    seed: int = 0,
) -> Path:
    """Write a tiny random dataset in advedge's npz format (``train.npz`` and ``test.npz``).

    Keys: ``x`` uint8 ``[N, size, size, channels]``, ``y`` int64 (every class present),
    ``class_names``. Returns ``root``.
    """
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = np.array([f"class{i}" for i in range(num_classes)])
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, size=(n, size, size, channels), dtype=np.uint8)
        y = (np.arange(n) % num_classes).astype(np.int64)
        np.savez(root / f"{split}.npz", x=x, y=y, class_names=names)
    return root


@pytest.fixture
def npz_dataset_factory(tmp_path: Path) -> Callable[..., Path]:
    """A callable ``make(name="data", **kw)`` that writes a tiny npz dataset under tmp_path."""

    def make(name: str = "data", **kw: int) -> Path:
        return write_npz_dataset(tmp_path / name, **kw)

    return make


@pytest.fixture(scope="session")
def tiny_npz_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A session-wide tiny npz dataset: 10 classes, 128 train / 64 test 32x32 RGB images."""
    return write_npz_dataset(tmp_path_factory.mktemp("tiny_npz") / "data")


def argv(*words: str, **options: object) -> list[str]:
    """A command line from keyword options: ``argv("bench", batch_sizes="1,8", json=True)`` ->
    ``["bench", "--batch-sizes", "1,8", "--json"]``; a list value repeats the flag."""
    out = list(words)
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            out.append(flag)
        elif isinstance(value, (list, tuple)):
            for item in value:
                out += [flag, str(item)]
        else:
            out += [flag, str(value)]
    return out


@pytest.fixture
def cli_error(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str]]:
    """``cli_error(*words, **options) -> (exit code, the single error line or "")``:
    ``advedge`` run in-process on :func:`argv` of its arguments; it must not print a traceback
    or more than one ``error:`` line."""
    from advedge.cli import main

    def run(*words: object, **options: object) -> tuple[int, str]:
        capsys.readouterr()
        code = main(argv(*(str(w) for w in words), **options))
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert "Traceback" not in err, err
        assert len(errors) <= 1, err
        return code, errors[0] if errors else ""

    return run


@pytest.fixture
def read_only(monkeypatch: pytest.MonkeyPatch):
    """``make(folder)``: no file can be created in ``folder`` any more. chmod, and for root,
    who ignores permission bits, ``chattr +i`` (an immutable folder); where root cannot set
    that flag, the kernel's answer is imitated: creating a file or folder in ``folder`` fails
    with EACCES, as the outputs' write probe would find on a read-only folder."""
    made: list[Path] = []
    immutable: list[Path] = []

    def make(folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o555)
        made.append(folder)
        if os.geteuid() != 0:
            return
        if shutil.which("chattr") and (
            subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
        ):
            immutable.append(folder)
            return
        real_open, real_mkdir = os.open, os.mkdir

        def refused(path: object) -> bool:
            parent = Path(os.fsdecode(path)).resolve().parent  # type: ignore[arg-type]
            return parent in {m.resolve() for m in made}

        def guarded_open(path, flags, *args, **kwargs):
            if flags & os.O_CREAT and refused(path):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real_open(path, flags, *args, **kwargs)

        def guarded_mkdir(path, *args, **kwargs):
            if refused(path):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real_mkdir(path, *args, **kwargs)

        monkeypatch.setattr(os, "open", guarded_open)
        monkeypatch.setattr(os, "mkdir", guarded_mkdir)

    yield make
    for folder in immutable:
        subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
    for folder in made:
        folder.chmod(0o755)


def train_tiny(data: Path, out: Path, **overrides: object) -> Path:
    """Train a ``tiny_cnn`` naturally for one epoch into ``out`` (a test's distillation teacher
    or purifier classifier); ``overrides`` replace TrainConfig fields. Returns ``out``."""
    from advedge.training.config import TrainConfig
    from advedge.training.engine import train

    options: dict[str, object] = {"data": str(data), "model": "tiny_cnn", "out": str(out)}
    options |= {"method": "natural", "epochs": 1, "batch_size": 32, "eval_n": 16, "eval_steps": 1}
    train(TrainConfig(**{**options, **overrides}))  # type: ignore[arg-type]
    return out


def small_net(seed: int, channels: int = 3, classes: int = 4, bn: bool = True):
    """A seeded conv net (Conv -> [BatchNorm] -> ReLU -> pool -> Linear) for the attack tests;
    with ``bn`` its BatchNorm is layer 1."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Conv2d(channels, 4, 3, padding=1)]
    if bn:
        layers.append(nn.BatchNorm2d(4))
    layers += [nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, classes)]
    return nn.Sequential(*layers)


def attack_cases(names: object, sizes: list[int]) -> dict[str, object]:
    """``@given(**attack_cases(FACTORIES, sizes))``: hypothesis strategies for an attack's
    invariant test: an attack name (a key of ``names``), seed, eps, norm, batch, channels, image
    size (from ``sizes``), train mode and saturated pixels."""
    from hypothesis import strategies as st

    return {
        "name": st.sampled_from(sorted(names)),  # type: ignore[call-overload]
        "seed": st.integers(0, 10_000),
        "eps": st.floats(1 / 255, 1.0),
        "norm": st.sampled_from(["Linf", "L2"]),
        "batch": st.integers(1, 5),
        "channels": st.sampled_from([1, 3]),
        "size": st.sampled_from(sizes),
        "train_mode": st.booleans(),
        "saturate": st.booleans(),
    }


def random_images(seed: int, batch: int, channels: int, size: int, *, saturate: bool = False):
    """``(x, y)``: ``batch`` random images in [0, 1] and labels of 4 classes drawn from ``seed``;
    ``saturate`` puts every pixel at a box edge (0 or 1), which exercises an attack's clipping."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, channels, size, size, generator=g)
    if saturate:
        x = (x > 0.5).float()
    y = torch.randint(0, 4, (batch,), generator=g)
    return x, y


def assert_attack_invariants(model, x, x_adv, *, eps: float, norm: str, train_mode: bool) -> None:
    """``x_adv`` has the shape and dtype of ``x``, is detached, lies in [0, 1] and in the
    ``norm`` ball of radius ``eps`` around ``x``; ``model`` is back in its mode with no
    parameter gradients."""
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert not x_adv.requires_grad
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    delta = (x_adv - x).flatten(1)
    if norm == "Linf":
        assert float(delta.abs().max()) <= eps + 1e-6
    else:
        assert float(delta.norm(dim=1).max()) <= eps + 1e-5
    assert model.training == train_mode
    assert all(p.grad is None for p in model.parameters())


def run_bench(artifact: object, data: object, **options: object) -> int:
    """``advedge bench`` on ``artifact`` (a path, or a list of paths) and ``data``; ``options``
    are further flags, as :func:`argv` writes them. Returns the exit code."""
    from advedge.cli import main

    paths = [str(a) for a in artifact] if isinstance(artifact, list) else str(artifact)
    return main(argv("bench", artifact=paths, data=str(data), **options))


def robust_flags(model: object, query_n: int, n_queries: int, n_iter: int) -> dict[str, object]:
    """bench's --robust flags: the transfer set crafted on ``model`` with ``n_iter`` APGD
    iterations, Square with ``n_queries`` queries on the first ``query_n`` images."""
    return {
        "robust": True,
        "model": str(model),
        "query_n": query_n,
        "n_queries": n_queries,
        "n_iter": n_iter,
    }

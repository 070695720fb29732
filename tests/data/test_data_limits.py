"""Untrusted numbers in datasets and checkpoints are bounded; non-finite results are refused.

Each test guards one finding of a red-team review: labels that ask for a billion classes, a
checkpoint whose metadata asks for a 64 TB head, an npz header that declares 1e11 elements,
images too small for the models, unreadable data folders and NaN weights that still got an
accuracy. Errors must be one named line (DataError / CheckpointError exit 1, UsageError exit 2),
never "unexpected X".
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import write_npz_dataset
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from advedge.checkpoint import load_model, read_metadata, save_model
from advedge.data import (
    MAX_ARRAY_ELEMENTS,
    MAX_CLASSES,
    MAX_IMAGE_SIZE,
    MIN_IMAGE_SIZE,
    ImageArrays,
    load_dataset,
)
from advedge.data import formats as data_formats
from advedge.data import npz as data_npz
from advedge.errors import AdvedgeError, CheckpointError, DataError, UsageError
from advedge.evaluation import evaluate
from advedge.models import create_model
from advedge.models.registry import (
    MAX_ARCH_INT,
    MAX_PARAMETERS,
    check_input_size,
    min_input_size,
)
from advedge.registry import Registry


# --------------------------------------------------------------------------------- helpers
def _images(n: int, size: int = 8, channels: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, size, size, channels), dtype=np.uint8)


def _write(path: Path, x: np.ndarray, y: np.ndarray, **extra: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=x, y=np.asarray(y, dtype=np.int64), **extra)


def _train(
    cli_error: Callable[..., tuple[int, str]], data: Path, out: Path, **kw: Any
) -> tuple[int, str]:
    options: dict[str, Any] = {
        "data": data,
        "model": "tiny_cnn",
        "method": "natural",
        "epochs": 1,
        "out": out,
        "batch_size": 8,
        "eval_n": 8,
        "device": "cpu",
    }
    options.update(kw)
    return cli_error("train", **options)


def _npy(shape: tuple[int, ...], descr: str = "|u1", payload: bytes = b"\0" * 16) -> bytes:
    """An .npy file whose header declares ``shape`` but which holds only ``payload``."""
    buf = io.BytesIO()
    header = {"descr": descr, "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue() + payload


def _real_npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _rewrite_metadata(src: Path, dst: Path, **changes: str) -> Path:
    with safe_open(str(src), framework="pt") as fh:
        meta = dict(fh.metadata())
    meta.update(changes)
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(load_file(str(src)), str(dst), metadata=meta)
    return dst


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "ckpt" / "model.safetensors"
    path.parent.mkdir()
    save_model(
        create_model("tiny_cnn", num_classes=10),
        path,
        metadata={"input_shape": [3, 8, 8], "eps": 8 / 255, "epochs": 1},
    )
    return path


@pytest.fixture
def small_data(tmp_path: Path) -> Path:
    return write_npz_dataset(tmp_path / "data", n_train=20, n_test=16, size=8)


# ------------------------------------------------------- 1. classes derived from labels
def _no_per_class_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if loading goes on to what grows with the class count: enumerating the
    classes (their default names) or building the dataset that holds them."""
    real_range = range

    def bounded_range(*args: int) -> range:
        if max(args, default=0) > MAX_CLASSES:
            raise AssertionError(f"the data module enumerated range{args}")
        return real_range(*args)

    def not_built(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the dataset was built although a label is out of bounds")

    monkeypatch.setattr(data_formats, "range", bounded_range, raising=False)
    monkeypatch.setattr(data_formats, "ImageArrays", not_built)
    monkeypatch.setattr(data_formats, "Dataset", not_built)


@pytest.mark.parametrize("label", [10**9, 2**63 - 1])
def test_label_asking_for_too_many_classes_is_refused_at_load(
    tmp_path: Path, label: int, monkeypatch: pytest.MonkeyPatch
):
    _write(tmp_path / "train.npz", _images(4), [0, 1, 2, 3])
    _write(tmp_path / "test.npz", _images(3), [0, label, 1])
    _no_per_class_work(monkeypatch)  # the refusal comes first, not after a billion names
    with pytest.raises(DataError) as info:
        load_dataset(tmp_path)
    message = str(info.value)
    assert "test.npz" in message and str(label) in message and str(MAX_CLASSES) in message
    assert "\n" not in message


def test_label_asking_for_a_billion_classes_fails_train_before_a_model_is_built(
    tmp_path: Path, cli_error, monkeypatch: pytest.MonkeyPatch
):
    import advedge.training.engine

    def no_model(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a model was built")

    monkeypatch.setattr(advedge.training.engine, "create_model", no_model)
    _no_per_class_work(monkeypatch)  # refused while the data loads, before anything is sized
    _write(tmp_path / "d" / "train.npz", _images(8), [0, 1, 2, 10**9, 0, 1, 2, 3])
    _write(tmp_path / "d" / "test.npz", _images(4), [0, 1, 2, 3])
    code, error = _train(cli_error, tmp_path / "d", tmp_path / "run")
    assert code == 1, error
    assert "train.npz" in error and "1000000000" in error
    assert "unexpected" not in error
    assert not (tmp_path / "run").exists()


def test_negative_label_is_refused_naming_file_and_value(tmp_path: Path):
    _write(tmp_path / "test.npz", _images(3), [0, -7, 1])
    with pytest.raises(DataError) as info:
        load_dataset(tmp_path)
    message = str(info.value)
    assert "test.npz" in message and "-7" in message and "negative" in message


def test_class_names_beyond_the_class_bound_are_refused(tmp_path: Path):
    _write(tmp_path / "ok" / "test.npz", _images(2), [0, MAX_CLASSES - 1])
    assert load_dataset(tmp_path / "ok").num_classes == MAX_CLASSES  # the bound itself is fine
    names = np.array([f"c{i}" for i in range(MAX_CLASSES + 1)])
    _write(tmp_path / "test.npz", _images(2), [0, 1], class_names=names)
    with pytest.raises(DataError, match=rf"test\.npz: class_names lists {MAX_CLASSES + 1}"):
        load_dataset(tmp_path)


# ----------------------------------------------- 2. checkpoint metadata and create_model
@pytest.mark.parametrize("k", [10**12, MAX_CLASSES + 1, 2**63 - 1])
def test_create_model_refuses_absurd_num_classes(k: int):
    with pytest.raises(UsageError, match="num_classes must be at most"):
        create_model("tiny_cnn", num_classes=k)


def _guard_factory(monkeypatch: pytest.MonkeyPatch, name: str) -> list[str]:
    """Record every build of model ``name`` by its device; fail the test on a real one (any
    device but ``meta``, where a size probe allocates nothing)."""
    import dataclasses

    from advedge.models import registry

    entry = registry.MODELS[name]
    builds: list[str] = []

    def factory(**kwargs: Any) -> Any:
        device = torch.get_default_device().type
        builds.append(device)
        if device != "meta":
            raise AssertionError(f"{name} was built for real on {device}")
        return entry.factory(**kwargs)

    guarded = Registry(registry.MODELS.family)
    for key, value in registry.MODELS.items():
        replaced = dataclasses.replace(entry, factory=factory) if key == name else value
        guarded.register(key, replaced, description=registry.MODELS.description(key))
    monkeypatch.setattr(registry, "MODELS", guarded)
    return builds


def test_create_model_refuses_absurd_architecture_sizes(monkeypatch: pytest.MonkeyPatch):
    builds = _guard_factory(monkeypatch, "wide_resnet")
    with pytest.raises(UsageError, match="'depth'"):
        create_model("wide_resnet", num_classes=10, depth=10**9)
    assert builds == []  # refused from the argument alone: not even a size probe
    with pytest.raises(UsageError, match=rf"more than the {MAX_PARAMETERS:,}"):
        create_model("wide_resnet", num_classes=10, depth=10, widen_factor=MAX_ARCH_INT)
    assert builds == ["meta"]  # counted on the meta device, never allocated


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"num_classes": "1000000000000"}, "num_classes"),
        (
            {
                "num_classes": "1000000000000",
                "arch_kwargs": json.dumps({"num_classes": 10**12, "in_channels": 3}),
            },
            "num_classes",
        ),
        ({"arch_kwargs": json.dumps({"num_classes": 10**12})}, "arch_kwargs.num_classes"),
        (
            {"arch_kwargs": json.dumps({"num_classes": 10, "in_channels": 7})},
            "arch_kwargs.in_channels",
        ),
        ({"input_shape": "[3, 1000000, 1000000]"}, "input_shape"),
        ({"input_shape": "[5, 32, 32]"}, "input_shape"),
        ({"input_shape": "[3, 0, 32]"}, "input_shape"),
        ({"eps": "NaN"}, "eps"),
        ({"eps": "-1"}, "eps"),
        ({"epochs": "1e300"}, "epochs"),
        ({"mean": "[0.5, Infinity, 0.5]"}, "mean[1]"),
        (
            {"arch_kwargs": json.dumps({"num_classes": 10, "mean": [float("nan")] * 3})},
            "arch_kwargs.mean[0]",
        ),
    ],
)
def test_checkpoint_metadata_numbers_are_bounded_naming_the_field(
    tiny_checkpoint: Path, tmp_path: Path, changes: dict[str, str], field: str
):
    bad = _rewrite_metadata(tiny_checkpoint, tmp_path / "bad" / "model.safetensors", **changes)
    with pytest.raises(CheckpointError) as info:
        load_model(bad)
    message = str(info.value)
    assert f"metadata {field}" in message
    assert "\n" not in message


def test_checkpoint_architecture_arguments_are_bounded(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    bad = _rewrite_metadata(
        tiny_checkpoint,
        tmp_path / "bad" / "model.safetensors",
        architecture="wide_resnet",
        arch_kwargs=json.dumps({"num_classes": 10, "depth": 10**9}),
    )
    builds = _guard_factory(monkeypatch, "wide_resnet")

    def no_weights(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the weights were read although the architecture is refused")

    monkeypatch.setattr(safetensors.torch, "load_file", no_weights)
    with pytest.raises(CheckpointError, match=r"arch_kwargs.*'depth'"):
        load_model(bad)
    assert builds == []  # refused from the metadata, before any model or weights


def test_eval_of_a_checkpoint_asking_for_a_trillion_classes_fails_cleanly(
    tiny_checkpoint: Path, small_data: Path, tmp_path: Path, cli_error
):
    bad = _rewrite_metadata(
        tiny_checkpoint,
        tmp_path / "bad" / "model.safetensors",
        num_classes="1000000000000",
        arch_kwargs=json.dumps({"num_classes": 10**12}),
    )
    out = tmp_path / "results.json"
    code, error = cli_error("eval", model=bad, data=small_data, n=8, out=out)
    assert code == 1
    assert "num_classes" in error and "unexpected" not in error
    assert not out.exists()
    meta = read_metadata(tiny_checkpoint)  # the untouched checkpoint still loads
    assert meta["num_classes"] == 10 and meta["input_shape"] == [3, 8, 8]
    assert load_model(tiny_checkpoint).num_classes == 10


# --------------------------------------------------------- 3. npz headers before loading
def _crafted_npz(path: Path, x_member: bytes, *, name: str = "x.npy") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(name, x_member)
        zf.writestr("y.npy", _real_npy(np.array([0, 1], dtype=np.int64)))
    return path


@pytest.fixture
def read_array_spy(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """Record the shape of every array numpy's npz reader loads."""
    shapes: list[tuple[int, ...]] = []
    real = np.lib.format.read_array

    def spy(fp: Any, *args: Any, **kwargs: Any) -> np.ndarray:
        array = real(fp, *args, **kwargs)
        shapes.append(array.shape)
        return array

    monkeypatch.setattr(np.lib.format, "read_array", spy)
    return shapes


def test_npz_header_declaring_1e11_elements_is_refused_before_allocating(
    tmp_path: Path, read_array_spy: list[tuple[int, ...]], monkeypatch: pytest.MonkeyPatch
):
    def no_allocation(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("numpy was asked to load the array")

    monkeypatch.setattr(np.lib.format, "read_array", no_allocation)
    bad = _crafted_npz(tmp_path / "test.npz", _npy((100_000, 1000, 1000, 1)))
    with pytest.raises(DataError) as info:
        load_dataset(tmp_path)
    message = str(info.value)
    assert str(bad) in message and "'x'" in message and "elements" in message
    assert f"{MAX_ARRAY_ELEMENTS:,}" in message


def test_npz_header_declaring_more_data_than_the_member_holds_is_refused(
    tmp_path: Path, read_array_spy: list[tuple[int, ...]]
):
    _crafted_npz(tmp_path / "test.npz", _npy((1000, 32, 32, 3)))  # 3 MB declared, 16 B held
    with pytest.raises(DataError, match=r"test\.npz: array 'x' declares .* holds only 16 bytes"):
        load_dataset(tmp_path)
    assert read_array_spy == []


def test_npz_arrays_larger_than_available_memory_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(data_npz, "available_memory", lambda: 100)
    _write(tmp_path / "test.npz", _images(4), [0, 1, 0, 1])
    with pytest.raises(DataError, match=r"test\.npz: its arrays need .* GiB of memory"):
        load_dataset(tmp_path)


@pytest.mark.parametrize(
    ("member", "name", "words"),
    [
        (b"not an npy file at all", "x.npy", "broken header"),
        (b"raw bytes that np.load would hand over", "x", "not a numpy array"),
        (_npy((2, 8, 8, 3), descr="|O"), "x.npy", "Python objects"),
    ],
)
def test_npz_members_that_are_not_plain_arrays_are_refused(
    tmp_path: Path, member: bytes, name: str, words: str
):
    _crafted_npz(tmp_path / "test.npz", member, name=name)
    with pytest.raises(DataError, match=words):
        load_dataset(tmp_path)


# ------------------------------------------------------------------ 4. too-small images
def test_one_pixel_images_are_refused_at_load(tmp_path: Path):
    _write(tmp_path / "train.npz", _images(4, size=1), [0, 1, 0, 1])
    _write(tmp_path / "test.npz", _images(4, size=1), [0, 1, 0, 1])
    with pytest.raises(DataError) as info:
        load_dataset(tmp_path)
    message = str(info.value)
    assert "1x1" in message and f"{MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE}" in message


def test_images_wider_than_the_bound_are_refused_at_load(tmp_path: Path):
    _write(tmp_path / "test.npz", np.zeros((2, 2, MAX_IMAGE_SIZE + 1, 1), np.uint8), [0, 1])
    with pytest.raises(DataError, match=rf"test\.npz: images are 2x{MAX_IMAGE_SIZE + 1}"):
        load_dataset(tmp_path)


def test_training_on_one_pixel_images_fails_cleanly(tmp_path: Path, cli_error):
    _write(tmp_path / "d" / "train.npz", _images(16, size=1), np.arange(16) % 2)
    _write(tmp_path / "d" / "test.npz", _images(8, size=1), np.arange(8) % 2)
    code, error = _train(cli_error, tmp_path / "d", tmp_path / "run")
    assert code == 1
    assert "1x1" in error and "unexpected" not in error


def test_min_input_size_of_the_registered_models():
    assert min_input_size("tiny_cnn") == MIN_IMAGE_SIZE  # the load-time floor is this minimum
    assert min_input_size("tiny_cnn", training=True) == 4
    assert min_input_size("resnet18", training=True) == 9
    assert min_input_size(create_model("resnet8", num_classes=3)) == 1
    for name in ("resnet18", "wrn34_10", "mobilenetv2", "preact_resnet18", "resnet20"):
        assert min_input_size(name) <= MIN_IMAGE_SIZE, name
    with pytest.raises(UsageError, match="resnet18 needs images of at least 9x9 to train, got 8x8"):
        check_input_size("resnet18", 8, 8, training=True)
    check_input_size("resnet18", 32, 32, training=True)


def test_eval_refuses_images_smaller_than_the_architecture_accepts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli_error
):
    from advedge.models import registry
    from advedge.models.base import ImageClassifier

    class Pool4(ImageClassifier):
        def __init__(self, *, num_classes: int, in_channels: int, mean: Any, std: Any) -> None:
            super().__init__(mean=mean, std=std)
            self.conv = nn.Conv2d(in_channels, 4, 3, padding=1)
            self.pool = nn.MaxPool2d(4)
            self.fc = nn.Linear(4, num_classes)

        def _features(self, x: torch.Tensor) -> torch.Tensor:
            return self.pool(self.conv(x)).mean((2, 3))

    monkeypatch.setattr(registry, "MODELS", registry.MODELS.copy())
    registry._min_side.cache_clear()

    @registry.register_model("pool4_test")
    def pool4_test(*, num_classes: int, in_channels: int, mean: Any, std: Any) -> Pool4:
        """A model that needs 4x4 inputs."""
        return Pool4(num_classes=num_classes, in_channels=in_channels, mean=mean, std=std)

    data = write_npz_dataset(tmp_path / "d", n_train=4, n_test=8, num_classes=2, size=2)
    ckpt = tmp_path / "m.safetensors"
    save_model(create_model("pool4_test", num_classes=2), ckpt, metadata={"input_shape": [3, 2, 2]})
    out = tmp_path / "results.json"
    code, error = cli_error("eval", model=ckpt, data=data, n=4, attacks="fgsm", out=out)
    registry._min_side.cache_clear()
    assert code == 1, error
    assert "2x2" in error and "4x4" in error and "unexpected" not in error
    assert not out.exists()


# ------------------------------------------------------------------ 5. unreadable data
@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0,
    reason="root reads a chmod 000 folder anyway; the monkeypatched variants below run instead",
)
def test_unreadable_data_folder_chmod_000_is_a_data_error(small_data: Path):
    small_data.chmod(0)
    try:
        with pytest.raises(DataError, match=rf"cannot read {small_data}: permission denied"):
            load_dataset(small_data)
    finally:
        small_data.chmod(0o755)


def test_unreadable_data_folder_is_a_data_error(
    small_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli_error
):
    real_access = os.access

    def access(path: Any, mode: int, *args: Any, **kwargs: Any) -> bool:
        if Path(path) == small_data:
            return False  # what chmod 000 means to anyone but root
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)
    with pytest.raises(DataError, match=rf"^cannot read {small_data}: permission denied"):
        load_dataset(small_data)
    code, error = _train(cli_error, small_data, tmp_path / "run")
    assert code == 1
    assert f"cannot read {small_data}: permission denied" in error


def test_unreadable_npz_file_is_a_data_error(small_data: Path, monkeypatch: pytest.MonkeyPatch):
    target = small_data / "test.npz"
    real_open = builtins.open

    def guarded_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(file, (str, os.PathLike)) and Path(file) == target:
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    with pytest.raises(DataError, match=rf"^cannot read {target}: permission denied"):
        load_dataset(small_data)


def test_unreadable_class_folder_is_a_data_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from PIL import Image

    for cls in ("cat", "dog"):
        (tmp_path / "test" / cls).mkdir(parents=True)
        Image.fromarray(_images(1)[0]).save(tmp_path / "test" / cls / "0.png")
    locked = tmp_path / "test" / "dog"
    real_listdir = os.listdir

    def listdir(path: Any = ".") -> list[str]:
        if Path(path) == locked:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_listdir(path)

    monkeypatch.setattr(os, "listdir", listdir)
    with pytest.raises(DataError, match=rf"^cannot read {locked}: permission denied"):
        load_dataset(tmp_path)


# --------------------------------------------------------------- 6. non-finite logits
def test_eval_of_nan_weights_is_refused_and_writes_nothing(
    tiny_checkpoint: Path, small_data: Path, tmp_path: Path, cli_error
):
    state = load_file(str(tiny_checkpoint))
    state["fc.weight"] = torch.full_like(state["fc.weight"], float("nan"))
    with safe_open(str(tiny_checkpoint), framework="pt") as fh:
        meta = dict(fh.metadata())
    bad = tmp_path / "nan" / "model.safetensors"
    bad.parent.mkdir()
    save_file(state, str(bad), metadata=meta)
    out = tmp_path / "results.json"
    code, error = cli_error("eval", model=bad, data=small_data, n=8, attacks="fgsm", out=out)
    assert code == 1
    assert "the model produces non-finite logits (NaN/inf) on 16 of 16 images" in error
    assert not out.exists()
    assert not Path(f"{out}.state.json").exists()


class _NanOffGrid(nn.Module):
    """Finite logits on clean images (multiples of 1/255), NaN on anything else."""

    def __init__(self, num_classes: int = 2) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.fc = nn.Linear(3 * 8 * 8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.fc(x.flatten(1))
        off_grid = ((x * 255 - (x * 255).round()).abs().flatten(1) > 1e-3).any(1, keepdim=True)
        return torch.where(off_grid, torch.full_like(logits, float("nan")), logits)


def _arrays(n: int = 8, names: tuple[str, ...] = ("a", "b")) -> ImageArrays:
    return ImageArrays(_images(n), np.arange(n, dtype=np.int64) % len(names), names)


def test_non_finite_logits_met_during_an_attack_are_refused():
    from advedge.attacks import build_attack

    torch.manual_seed(0)
    model = _NanOffGrid()
    eps = 0.01  # not a multiple of 1/255: adversarial pixels leave the grid
    attack = build_attack("fgsm", model, eps=eps, norm="Linf", seed=0)
    with pytest.raises(AdvedgeError, match=r"non-finite logits \(NaN/inf\) on \d+ of \d+ fgsm"):
        evaluate(model, _arrays(), [attack], eps=eps, flags_n=0)


def test_model_with_another_number_of_outputs_is_refused_before_attacking():
    from advedge.attacks import build_attack

    model = nn.Sequential(nn.Flatten(1), nn.Linear(3 * 8 * 8, 5))
    called: list[int] = []
    attack = build_attack("fgsm", model, eps=8 / 255, norm="Linf", seed=0)
    real_call = attack.__call__

    class Spy(type(attack)):  # type: ignore[misc]
        def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            called.append(len(x))
            return real_call(x, y)

    attack.__class__ = Spy
    names = tuple(f"c{i}" for i in range(10))
    with pytest.raises(DataError, match="the model outputs 5 classes but the data has 10"):
        evaluate(model, _arrays(20, names), [attack], eps=8 / 255, flags_n=0)
    assert called == []

"""Checkpoints: round trip, metadata, atomic writes, corrupt/foreign/malicious files."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from advedge.checkpoint import (
    load_model,
    load_state,
    read_metadata,
    save_model,
    save_state,
)
from advedge.errors import CheckpointError
from advedge.models import create_model


def _saved(tmp_path: Path, arch: str = "tiny_cnn", **kw) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    model = create_model(arch, num_classes=7, **kw)
    path = save_model(
        model,
        tmp_path / "model.safetensors",
        metadata={"dataset": "toy", "method": "pgd-at", "eps": 8 / 255, "input_shape": [3, 32, 32]},
    )
    return model, path


def test_round_trip_rebuilds_from_file_alone(tmp_path):
    model, path = _saved(tmp_path)
    loaded = load_model(path)
    assert loaded.arch == "tiny_cnn" and not loaded.training
    x = torch.rand(3, 3, 32, 32)
    model.eval()
    assert torch.equal(model(x), loaded(x))
    meta = read_metadata(path)
    assert meta["architecture"] == "tiny_cnn"
    assert meta["num_classes"] == 7
    assert meta["eps"] == pytest.approx(8 / 255)
    assert meta["input_shape"] == [3, 32, 32]
    assert meta["dataset"] == "toy" and meta["method"] == "pgd-at"
    assert len(meta["mean"]) == 3 and len(meta["std"]) == 3
    assert "advedge_version" in meta
    # a run directory works too
    assert load_model(tmp_path).arch == "tiny_cnn"


def test_arch_kwargs_survive(tmp_path):
    model = create_model("mobilenetv2", num_classes=10, width_mult=0.5)
    save_model(model, tmp_path / "m.safetensors")
    loaded = load_model(tmp_path / "m.safetensors")
    assert loaded.arch_kwargs["width_mult"] == 0.5
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in model.parameters())


def test_truncated_file_is_a_clear_error(tmp_path):
    _, path = _saved(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated or corrupt|not a readable"):
        load_model(path)


def test_garbage_file_is_a_clear_error(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(os.urandom(256))
    with pytest.raises(CheckpointError):
        load_model(path)


def test_checkpoint_of_another_architecture(tmp_path):
    _, path = _saved(tmp_path)
    with pytest.raises(CheckpointError, match="tiny_cnn checkpoint, not resnet20"):
        load_model(path, expected_arch="resnet20")


def test_tensors_not_matching_recorded_architecture(tmp_path):
    """A file whose metadata claims one architecture but holds another's weights."""
    from safetensors.torch import save_file

    _, real = _saved(tmp_path)
    meta = {k: (v if isinstance(v, str) else str(v)) for k, v in _raw_meta(real).items()}
    other = create_model("resnet8", num_classes=7)
    fake = tmp_path / "fake.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(fake), metadata=meta)
    with pytest.raises(CheckpointError, match="does not hold tiny_cnn weights"):
        load_model(fake)


def _raw_meta(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return fh.metadata()


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as fh:
        pickle.dump({"model": _Payload(str(marker))}, fh)
    with pytest.raises(CheckpointError, match="refusing"):
        load_model(evil)
    with pytest.raises(CheckpointError, match="refusing"):
        load_state(evil)
    assert not marker.exists()


def test_state_round_trip_weights_only(tmp_path):
    state = {
        "epoch": 3,
        "t": torch.arange(4),
        "metrics": [{"a": 1.0}],
        "rng": torch.get_rng_state(),
    }
    save_state(state, tmp_path / "state.pt")
    back = load_state(tmp_path / "state.pt")
    assert back["epoch"] == 3 and torch.equal(back["t"], torch.arange(4))


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    model, path = _saved(tmp_path)
    before = path.read_bytes()
    import advedge.checkpoint as ck

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", boom)
    with pytest.raises(OSError):
        save_model(model, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temp file left


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match=r"has no model\.safetensors"):
        load_model(tmp_path)


def test_atomic_files_get_normal_permissions(tmp_path):
    _, path = _saved(tmp_path)
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask

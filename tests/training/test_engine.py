"""The training engine: learning, checkpoints per epoch, exact resume, schedules, real data."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from advedge.checkpoint import load_model, load_state, read_metadata
from advedge.errors import UsageError
from advedge.models import create_model
from advedge.training.config import TrainConfig
from advedge.training.engine import TrainCallbacks, Trainer, train
from advedge.training.schedule import lr_lambda

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


def colour_dataset(root: Path, n_train: int = 256, n_test: int = 128, classes: int = 4) -> Path:
    """Classes told apart by their mean colour, plus noise: a model can learn them quickly."""
    rng = np.random.default_rng(0)
    palette = rng.uniform(40, 215, size=(classes, 3))

    def split(n):
        y = np.arange(n) % classes
        x = palette[y][:, None, None, :] + rng.normal(0, 25, size=(n, 16, 16, 3))
        return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64)

    root.mkdir(parents=True, exist_ok=True)
    names = np.array([f"c{i}" for i in range(classes)])
    xt, yt = split(n_train)
    np.savez(root / "train.npz", x=xt, y=yt, class_names=names)
    xs, ys = split(n_test)
    np.savez(root / "test.npz", x=xs, y=ys, class_names=names)
    return root


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _cfg(data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(
        data=str(data),
        model="tiny_cnn",
        method="natural",
        epochs=3,
        out=str(out),
        batch_size=32,
        lr=0.05,
        eval_n=64,
        eval_steps=2,
        steps=2,
        seed=0,
        channels_last=False,  # no timing probe: runs must be bit-reproducible
    )
    base.update(kw)
    return TrainConfig(**base)


def test_natural_training_learns_and_writes_run_dir(tmp_path):
    data = colour_dataset(tmp_path / "data")
    result = train(_cfg(data, tmp_path / "run"))
    run = tmp_path / "run"
    for name in ("model.safetensors", "state.pt", "config.yaml", "metrics.csv"):
        assert (run / name).is_file(), name
    rows = _rows(run / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert float(rows[-1]["test_clean_acc"]) > 0.8, rows
    assert float(rows[-1]["lr"]) < float(rows[0]["lr"])
    assert result.metrics[-1]["epoch"] == 3
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["model"] == "tiny_cnn" and cfg["resolved"]["dataset"]["num_classes"] == 4
    meta = read_metadata(run)
    assert meta["method"] == "natural" and meta["epochs"] == 3
    assert meta["input_shape"] == [3, 16, 16]
    model = load_model(run)
    assert model.num_classes == 4


def test_resume_is_exact(tmp_path):
    """Two epochs in one go equal one epoch, a stop, and a resume: same weights, same rows."""
    data = colour_dataset(tmp_path / "data", n_train=96, n_test=32)
    kw = dict(method="pgd-at", epochs=2)
    train(_cfg(data, tmp_path / "straight", **kw))

    class StopAfterEpoch1(TrainCallbacks):
        def on_epoch_end(self, row):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(_cfg(data, tmp_path / "split", **kw)).run(callbacks=StopAfterEpoch1())
    out = train(_cfg(data, tmp_path / "split", **kw), resume=True)
    assert out.resumed_from == 1 and out.epochs_run == 1
    a = load_model(tmp_path / "straight").state_dict()
    b = load_model(tmp_path / "split").state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows_a = _rows(tmp_path / "straight" / "metrics.csv")
    rows_b = _rows(tmp_path / "split" / "metrics.csv")
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(rows_a) == strip(rows_b)


def test_resume_refuses_other_options_and_overwrite(tmp_path):
    data = colour_dataset(tmp_path / "data", n_train=64, n_test=32)
    train(_cfg(data, tmp_path / "run", epochs=1))
    before = (tmp_path / "run" / "model.safetensors").read_bytes()
    with pytest.raises(UsageError, match="already holds"):
        train(_cfg(data, tmp_path / "run", epochs=1))
    with pytest.raises(UsageError, match="lr"):
        train(_cfg(data, tmp_path / "run", epochs=2, lr=0.2), resume=True)
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == before


def test_interrupt_mid_epoch_keeps_last_complete_epoch(tmp_path):
    data = colour_dataset(tmp_path / "data", n_train=128, n_test=32)

    class StopInEpoch2(TrainCallbacks):
        def on_batch_end(self, *, epoch, batch, loss, acc):
            if epoch == 1 and batch >= 1:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(_cfg(data, tmp_path / "run", epochs=3)).run(callbacks=StopInEpoch2())
    state = load_state(tmp_path / "run" / "state.pt")
    assert state["epoch"] == 1
    assert not list((tmp_path / "run").glob("*.tmp"))
    out = train(_cfg(data, tmp_path / "run", epochs=3), resume=True)
    assert out.resumed_from == 1
    assert [r["epoch"] for r in out.metrics] == [1, 2, 3]


def test_methods_run_and_record_settings(tmp_path):
    data = colour_dataset(tmp_path / "data", n_train=64, n_test=32)
    for method in ("pgd-at", "trades", "fgsm-rs"):
        train(_cfg(data, tmp_path / method, method=method, epochs=1))
        meta = read_metadata(tmp_path / method)
        assert meta["method"] == method
        assert meta["eps"] == pytest.approx(8 / 255)
        settings = meta["method_settings"]
        if method == "fgsm-rs":
            assert settings["alpha"] == pytest.approx(1.25 * 8 / 255) and settings["steps"] == 1
        if method == "trades":
            assert settings["beta"] == 6.0


def test_grayscale_data_trains_one_channel_model(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "gray"
    root.mkdir()
    for split, n in (("train", 64), ("test", 32)):
        y = np.arange(n) % 3
        x = (y[:, None, None] * 80 + rng.integers(0, 30, size=(n, 28, 28))).astype(np.uint8)
        np.savez(root / f"{split}.npz", x=x, y=y.astype(np.int64))
    train(_cfg(root, tmp_path / "run", epochs=1))
    model = load_model(tmp_path / "run")
    assert model.in_channels == 1
    assert read_metadata(tmp_path / "run")["input_shape"] == [1, 28, 28]


def test_lr_schedules():
    cos = lr_lambda("cosine", 100, (0.5, 0.75), 0.1)
    assert cos(0) == 1.0 and cos(50) == pytest.approx(0.5) and cos(100) == pytest.approx(0.0)
    step = lr_lambda("multistep", 100, (0.5, 0.75), 0.1)
    assert step(49) == 1.0 and step(50) == pytest.approx(0.1) and step(80) == pytest.approx(0.01)
    assert lr_lambda("constant", 100, (0.5,), 0.1)(99) == 1.0


def test_config_validation():
    with pytest.raises(UsageError, match="resnet18"):
        TrainConfig(data="d", model="resnet81")
    with pytest.raises(UsageError, match="trades"):
        TrainConfig(data="d", model="tiny_cnn", method="trade")
    with pytest.raises(UsageError, match="eps"):
        TrainConfig(data="d", model="tiny_cnn", eps=0.0)
    with pytest.raises(UsageError, match="epochs"):
        TrainConfig(data="d", model="tiny_cnn", epochs=0)
    assert math.isclose(TrainConfig(data="d", model="tiny_cnn").resolved_alpha, 2 / 255)


@pytest.mark.skipif(not (SHARED / "cifar10").is_dir(), reason="../shared/data/cifar10 absent")
def test_real_cifar10_train_then_eval_and_pgd_sanity(tmp_path):
    """Natural training on real CIFAR-10, then PGD-20 must cut accuracy to well under half."""
    from advedge.evaluation import evaluate_checkpoint

    cfg = TrainConfig(
        data=str(SHARED / "cifar10"),
        model="resnet8",
        method="natural",
        epochs=3,
        out=str(tmp_path / "nat"),
        subset=2000,
        batch_size=64,
        lr=0.05,
        eval_n=64,
        eval_steps=2,
    )
    train(cfg)
    res = evaluate_checkpoint(
        str(tmp_path / "nat"), str(SHARED / "cifar10"), attacks=["pgd"], steps=20, n=200, flags_n=50
    )
    clean = res["clean_acc"]
    pgd = res["attacks"][0]["robust_acc"]
    assert clean > 0.25, res  # it learned something on 2,000 images
    assert pgd < 0.5 * clean, res  # and a non-robust model falls to PGD-20
    assert res["worst_case_acc"] <= pgd
    assert res["n_examples"] == 200 and res["dataset"]["name"] == "cifar10"


def test_stale_temporary_files_are_cleaned_on_resume(tmp_path):
    data = colour_dataset(tmp_path / "data", n_train=64, n_test=32)
    train(_cfg(data, tmp_path / "run", epochs=1))
    stale = tmp_path / "run" / ".state.pt.abc123.tmp"
    stale.write_bytes(b"half a write")  # what SIGKILL during an atomic write leaves
    train(_cfg(data, tmp_path / "run", epochs=2), resume=True)
    assert not stale.exists()


def test_layout_probe_decides_once_and_resume_keeps_the_choice(tmp_path, monkeypatch):
    import advedge.training.device as device
    from advedge.config import load_yaml

    data = colour_dataset(tmp_path / "data", n_train=64, n_test=16)
    calls = []

    def fake_probe(model, x, **kw):
        calls.append(tuple(x.shape))
        return True

    monkeypatch.setattr(device, "channels_last_is_faster", fake_probe)
    cfg = dict(channels_last=None, epochs=1)
    train(_cfg(data, tmp_path / "run", **cfg))
    assert calls == [(32, 3, 16, 16)]
    assert load_state(tmp_path / "run" / "state.pt")["channels_last"] is True
    assert load_yaml(tmp_path / "run" / "config.yaml")["resolved"]["channels_last"] is True
    # A resumed run reuses the stored layout instead of probing again.
    monkeypatch.setattr(device, "channels_last_is_faster", lambda *a, **k: calls.append(0))
    train(_cfg(data, tmp_path / "run", **{**cfg, "epochs": 2}), resume=True)
    assert calls == [(32, 3, 16, 16)]


def test_layout_probe_times_both_formats_without_touching_the_model():
    from advedge.training.device import channels_last_is_faster

    model = create_model("tiny_cnn", num_classes=10).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert isinstance(channels_last_is_faster(model, torch.rand(4, 3, 32, 32)), bool)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())

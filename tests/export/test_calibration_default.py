"""``advedge export --precision int8`` without ``--calib-data``: the training split of the dataset
the checkpoint records, said in the log; one clear error when there is none to use."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from advedge.checkpoint import save_model
from advedge.cli import main
from advedge.models import create_model

META = {"eps": 8 / 255, "input_shape": [3, 32, 32], "method": "natural"}


def _run(root: Path, metadata: dict, config: dict | None = None) -> Path:
    """A classifier run directory: model.safetensors with ``metadata`` (and a config.yaml)."""
    torch.manual_seed(0)
    root.mkdir(parents=True)
    save_model(
        create_model("tiny_cnn", num_classes=10), root / "model.safetensors", metadata=metadata
    )
    if config is not None:
        (root / "config.yaml").write_text(yaml.safe_dump(config))
    return root


def _export_int8(model: Path, out: Path, *extra: str) -> int:
    words = ["export", "--model", str(model), "--out", str(out), "--precision", "int8"]
    return main([*words, "--calib-n", "32", "--parity-n", "8", "--report-n", "8", *extra])


def test_int8_calibrates_on_the_training_split_of_the_recorded_dataset(
    tiny_npz_data, tmp_path, capsys
):
    # what advedge train records: the dataset's name in the weights, its folder in config.yaml
    config = {"resolved": {"dataset": {"name": "data", "root": str(tiny_npz_data)}}}
    run = _run(tmp_path / "run", {**META, "dataset": "data"}, config)
    out = tmp_path / "out"
    rc = _export_int8(run, out)
    err = capsys.readouterr().err
    assert rc == 0, err
    said = " ".join(err.split())  # rich wraps long lines
    assert (
        f"calibrating on 32 images of the training split of {tiny_npz_data}, the dataset the "
        "checkpoint records" in said
    )
    calib = np.load(out / "calibration.npz")
    train = np.load(tiny_npz_data / "train.npz")["x"]
    test = np.load(tiny_npz_data / "test.npz")["x"]
    train_images = {image.tobytes() for image in train}
    test_images = {image.tobytes() for image in test}
    assert len(calib["x"]) == 32
    assert all(image.tobytes() in train_images for image in calib["x"])  # the training split
    assert not any(image.tobytes() in test_images for image in calib["x"])  # never the test split
    assert (out / "tiny_cnn.int8.onnx").is_file()


@pytest.mark.parametrize(
    ("metadata", "config", "code", "needle"),
    [
        (META, None, 2, "the checkpoint records no dataset"),
        # a recorded folder that is gone and a name that is no dataset here
        (
            {**META, "dataset": "gone"},
            {"resolved": {"dataset": {"root": "/nonexistent/advedge/gone"}}},
            1,
            "(/nonexistent/advedge/gone) is not on this machine",
        ),
    ],
    ids=["none recorded", "recorded but absent"],
)
def test_int8_without_a_recorded_dataset_is_one_error_naming_calib_data(
    tmp_path, capsys, metadata, config, code, needle
):
    run = _run(tmp_path / "run", metadata, config)
    out = tmp_path / "out"
    rc = _export_int8(run, out)
    err = capsys.readouterr().err
    assert rc == code, err
    assert len(err.strip().splitlines()) == 1
    assert needle in err and "--calib-data" in err
    assert not out.exists()

"""bench --robust against the evaluation protocol: on the FP32 parent, bench's headline is never
above ``advedge eval --suite standard``'s on the same images (issue 14, section 1)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import argv
from fakes.artifacts import classifier_run, tiny_classifier

from advedge.cli import main
from advedge.data import to_tensor

N = 8
EPS = "8/255"
QUERIES = "40"


def _ramps(n: int, rng: np.random.Generator) -> np.ndarray:
    """Colour ramps with a little noise: images a random tiny_cnn tells apart (on noise it
    predicts one class for everything)."""
    base = rng.integers(0, 256, (n, 1, 1, 3))
    slope = rng.integers(-128, 128, (n, 1, 1, 3))
    ramp = np.linspace(0, 1, 32)[None, :, None, None]
    noise = rng.normal(0, 10, (n, 32, 32, 3))
    return np.clip(base + slope * ramp + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def parent(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny_cnn run directory and a dataset it classifies correctly when clean (its labels
    are the model's own predictions), with margins that small attacks break on some images and
    not on others."""
    root = tmp_path_factory.mktemp("protocol")
    model = tiny_classifier(0)
    rng = np.random.default_rng(0)
    data = root / "data"
    data.mkdir()
    names = np.array([f"class{i}" for i in range(10)])
    for split, n in (("train", 32), ("test", 2 * N)):
        x = _ramps(n, rng)
        with torch.no_grad():
            y = model(to_tensor(x)).argmax(1).numpy().astype(np.int64)
        np.savez(data / f"{split}.npz", x=x, y=y, class_names=names)
    return classifier_run(root / "run", model), data


def test_bench_headline_on_the_parent_is_never_above_eval_standard(parent, tmp_path, capsys):
    run, data = parent
    rc = main(
        argv(
            "eval",
            model=str(run),
            data=str(data),
            suite="standard",
            n=str(N),
            eps=EPS,
            n_queries=QUERIES,
            flags_n="0",
            out=str(tmp_path / "eval.json"),
        )
    )
    assert rc == 0, capsys.readouterr().err
    ev = json.loads((tmp_path / "eval.json").read_text())
    # the setting has teeth: the attacks break some images and not all of them
    assert ev["clean_acc"] == 1.0 and 0.0 < ev["worst_case_acc"] < 1.0, ev["worst_case_acc"]
    rc = main(
        argv(
            "bench",
            artifact=[str(run)],
            data=str(data),
            batch_sizes="4",  # another batch than eval's: the parent's verdict still counts
            warmup="1",
            iters="1",
            n=str(N),
            robust=True,
            model=str(run),
            eps=EPS,
            n_queries=QUERIES,
            out=str(tmp_path / "bench"),
        )
    )
    assert rc == 0, capsys.readouterr().err
    doc = json.loads((tmp_path / "bench" / "bench.json").read_text())
    (row,) = doc["results"]
    rob = row["robust"]
    assert rob["white_box"] is True and row["clean_acc"] == ev["clean_acc"]
    # the same attacks, budgets, images, batches and seeds as eval's cascade
    assert [a["name"] for a in rob["attacks"]][:3] == [a["name"] for a in ev["attacks"]]
    assert rob["worst_case_transfer_acc"] <= ev["worst_case_acc"]
    assert rob["worst_case_acc"] <= ev["worst_case_acc"]
    # per example too: every image eval breaks, bench breaks
    survived = np.array([c == "1" for c in rob["worst_case_flags"]])
    (tset,) = (tmp_path / "bench").glob("transfer-*.npz")
    with np.load(tset) as z:
        crafted = z["source_survived"]
    assert not (survived & ~crafted).any()
    assert crafted.mean() <= ev["worst_case_acc"]
    tm = doc["threat_model"]
    assert tm["eps_text"] == EPS and tm["n"] == N and tm["seed"] == 0
    assert {"apgd-ce", "apgd-t", "square", "cw"} <= {a["name"] for a in tm["transfer"]}

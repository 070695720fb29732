"""bench --robust's white-box-artifact attack (issue 17, section 1): APGD on the artifact's own
replica, scored on the artifact; stronger than transfer where transfer is weak; its parity
rule; its kind in bench.json, the threat model and the report."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import advedge.export.runtime.replica as replica_mod
import numpy as np
import onnx
import pytest
import torch
from advedge.calibration import quantize_qdq
from advedge.export.graph import set_onnx_metadata
from advedge.export.onnx_export import export_onnx
from advedge.export.runtime.whitebox import MIN_AGREEMENT, replica_source
from conftest import run_bench
from fakes.artifacts import SHAPE, classifier_run, random_calibration_set, tiny_classifier

from advedge.cli import main
from advedge.data import to_tensor
from advedge.report.analysis import WHITE_BOX_DROP, honest_robustness
from advedge.utils import sha256_file

N = 16
FLAGS = {"eps": "8/255", "n_iter": "5", "n_queries": "20", "warmup": "1", "iters": "1"}


def _ramps(n: int, rng: np.random.Generator) -> np.ndarray:
    base = rng.integers(0, 256, (n, 1, 1, 3))
    slope = rng.integers(-128, 128, (n, 1, 1, 3))
    ramp = np.linspace(0, 1, 32)[None, :, None, None]
    noise = rng.normal(0, 10, (n, 32, 32, 3))
    return np.clip(base + slope * ramp + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def weak_transfer(tmp_path_factory) -> dict[str, Path]:
    """An INT8 artifact whose recorded parent (run ``a``, seed 1) is another network than the
    one it computes (seed 0): transfer from the parent is weak by construction, while a
    white-box attack on the artifact's own arithmetic is not. The data's labels are the
    artifact's own predictions, so every image counts."""
    root = tmp_path_factory.mktemp("whitebox")
    parent, shipped = tiny_classifier(1), tiny_classifier(0)
    run = classifier_run(root / "run_a", parent)
    fp32 = export_onnx(shipped, root / "b.fp32.onnx", input_shape=tuple(SHAPE))
    art = root / "b.int8.onnx"
    quantize_qdq(fp32, art, random_calibration_set(32), method="minmax", use_cache=False)
    model = onnx.load(str(art))
    meta = {"kind": "classifier", "precision": "int8", "input_shape": SHAPE}
    set_onnx_metadata(model, {**meta, "source_sha256": sha256_file(run / "model.safetensors")})
    onnx.save(model, str(art))
    rng = np.random.default_rng(0)
    data = root / "data"
    data.mkdir()
    for split, n in (("train", 16), ("test", N)):
        x = _ramps(n, rng)
        with torch.no_grad():
            y = shipped(to_tensor(x)).argmax(1).numpy().astype(np.int64)
        np.savez(
            data / f"{split}.npz", x=x, y=y, class_names=np.array([f"c{i}" for i in range(10)])
        )
    return {"run": run, "art": art, "data": data, "root": root}


def _bench(capsys, paths: list[Path], data: Path, out: Path, **flags: object) -> dict:
    rc = run_bench(paths, data, batch_sizes="8", n=str(N), out=str(out), **{**FLAGS, **flags})
    assert rc == 0, capsys.readouterr().err
    capsys.readouterr()
    return json.loads((out / "bench.json").read_text())


@pytest.fixture(scope="module")
def measured(weak_transfer, tmp_path_factory) -> tuple[dict, Path]:
    """One bench of the FP32 parent and the INT8 artifact (the transfer set crafted once)."""
    out = tmp_path_factory.mktemp("wb") / "bench"
    w = weak_transfer
    rc = run_bench(
        [w["run"], w["art"]], w["data"], batch_sizes="8", n=str(N), out=str(out),
        robust=True, model=str(w["run"]), **FLAGS,
    )  # fmt: skip
    assert rc == 0
    return json.loads((out / "bench.json").read_text()), out


def test_white_box_on_the_artifact_breaks_what_transfer_misses(measured):
    doc, _ = measured
    parent, art = doc["results"]
    assert parent["robust"]["white_box_artifact"]["status"] == "not applicable"
    rob = art["robust"]
    wb = rob["white_box_artifact"]
    assert wb["status"] == "measured" and wb["onnx"].endswith("b.int8.onnx")
    parity = wb["parity"]
    assert parity["n"] == N and parity["agreement"] >= MIN_AGREEMENT
    assert 0 <= parity["max_abs_diff"] < 0.05 and wb["saturation_grad"] == "zero"
    entries = {a["name"]: a for a in rob["attacks"]}
    for name in ("apgd-ce-artifact", "apgd-t-artifact"):
        e = entries[name]
        assert e["kind"] == "white-box-artifact" and e["n"] == N and e["cumulative"]
        assert e["robust_acc_ci95"][0] <= e["robust_acc"] <= e["robust_acc_ci95"][1]
    assert entries["apgd-t-artifact"]["robust_acc"] == wb["worst_case_acc"]
    # transfer from another network is weak; the attack on the artifact's own arithmetic
    # breaks at least as many images, and here strictly more
    assert art["clean_acc"] == 1.0
    assert wb["worst_case_acc"] <= rob["worst_case_transfer_acc"]
    assert wb["worst_case_acc"] < rob["worst_case_transfer_acc"] - 0.2
    # the headline is the per-example worst over transfer, white-box-artifact and query
    assert rob["worst_case_acc"] <= wb["worst_case_acc"]
    tm = doc["threat_model"]
    assert [a["name"] for a in tm["white_box_artifact"]] == ["apgd-ce", "apgd-t"]
    assert "white-box on each ONNX artifact's own arithmetic" in tm["summary"]


def test_the_report_shows_the_white_box_artifact_column(measured, tmp_path, capsys):
    _, bench_dir = measured
    out = tmp_path / "report"
    rc = main(["report", str(bench_dir), "--out", str(out), "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    doc = json.loads(captured.out)
    rows = {r["artifact"]: r for r in doc["rows"]}
    assert "white-box-artifact" in rows["b.int8.onnx"]["worst_case_kinds"]
    (ships,) = doc["robustness_of_what_ships"]
    assert ships["white_box_artifact_acc"] == rows["b.int8.onnx"]["white_box_artifact_acc"]
    assert ships["white_box_artifact_acc"] is not None
    md = (out / "report.md").read_text()
    assert "| white-box on the artifact % |" in md and "white-box-artifact" in md


def test_a_replica_that_disagrees_gives_no_white_box_figure(
    weak_transfer, measured, tmp_path, capsys, monkeypatch
):
    real = replica_mod.build_replica

    def wrong(*args, **kwargs):  # the same graph, its logits reversed: it disagrees
        replica = real(*args, **kwargs)
        forward = replica.forward
        replica.forward = lambda x: -forward(x)
        return replica

    monkeypatch.setattr(replica_mod, "build_replica", wrong)
    (tset,) = measured[1].glob("transfer-*.npz")
    doc = _bench(
        capsys, [weak_transfer["art"]], weak_transfer["data"], tmp_path / "b",
        robust=True, transfer_set=str(tset),
    )  # fmt: skip
    rob = doc["results"][0]["robust"]
    wb = rob["white_box_artifact"]
    assert wb["status"] == "unavailable" and wb["parity"]["agreement"] < MIN_AGREEMENT
    assert "below the 99.5% a white-box figure needs" in wb["reason"]
    assert "worst_case_acc" not in wb
    assert all(a["kind"] != "white-box-artifact" for a in rob["attacks"])
    # bench still completes, and the report says why there is no figure
    rows = honest_robustness(
        [
            {**_row(0.5), "white_box": True, "artifact": "p"},
            {
                **_row(None),
                "white_box_artifact_status": "unavailable",
                "white_box_artifact_reason": wb["reason"],
            },
        ]
    )
    assert rows[0]["white_box_artifact_acc"] is None and not rows[0]["white_box_drop"]


def test_no_white_box_artifact_switches_it_off(weak_transfer, measured, tmp_path, capsys):
    (tset,) = measured[1].glob("transfer-*.npz")
    doc = _bench(
        capsys, [weak_transfer["art"]], weak_transfer["data"], tmp_path / "b",
        robust=True, transfer_set=str(tset), no_white_box_artifact=True,
    )  # fmt: skip
    rob = doc["results"][0]["robust"]
    assert rob["white_box_artifact"]["status"] == "off"
    assert all(a["kind"] != "white-box-artifact" for a in rob["attacks"])
    assert doc["threat_model"]["white_box_artifact"] == []


def _row(wba: float | None) -> dict:
    return {
        "artifact": "a.int8.onnx",
        "label": "a int8",
        "precision": "int8",
        "purifier": False,
        "source_sha256": "0" * 64,
        "worst_case_transfer_acc": 0.5,
        "worst_case_transfer_acc_ci95": [0.4, 0.6],
        "worst_case_acc": 0.4,
        "worst_case_acc_ci95": [0.3, 0.5],
        "white_box_artifact_acc": wba,
        "white_box_artifact_acc_ci95": None if wba is None else [wba - 0.1, wba + 0.1],
    }


@pytest.mark.parametrize(
    "wba, flagged", [(0.49, False), (0.5 - WHITE_BOX_DROP, False), (0.48, True)]
)
def test_an_artifact_more_than_a_point_below_its_parent_is_flagged(wba, flagged):
    parent = {**_row(0.5), "white_box": True, "artifact": "run"}
    (t,) = honest_robustness([parent, _row(wba)])
    assert t["white_box_parent_acc"] == 0.5 and t["white_box_artifact_acc"] == wba
    assert t["white_box_drop"] is flagged


def test_an_engine_is_attacked_through_its_source_onnx(tmp_path):
    onnx_path = tmp_path / "m.int8.onnx"
    onnx_path.write_bytes(b"graph")
    engine = tmp_path / "m.int8.trt10.sm87.b1-8.engine"

    def art(path: Path, sidecar: dict | None = None, gradients: bool = False):
        return SimpleNamespace(
            path=path,
            info=SimpleNamespace(gradients=gradients),
            runner=SimpleNamespace(sidecar=sidecar),
        )

    good = {"source_onnx": onnx_path.name, "source_onnx_sha256": sha256_file(onnx_path)}
    assert replica_source(art(engine, good)) == (onnx_path, "")
    assert replica_source(art(onnx_path)) == (onnx_path, "")
    _, why = replica_source(art(engine, {**good, "source_onnx_sha256": "0" * 64}))
    assert "not the ONNX the engine was built from" in why
    _, why = replica_source(art(engine, {"source_onnx": "gone.onnx"}))
    assert "gone.onnx is not beside it" in why
    _, why = replica_source(art(engine, {}))
    assert "records no source ONNX" in why
    _, why = replica_source(art(tmp_path / "run", gradients=True))
    assert why.startswith("not applicable")

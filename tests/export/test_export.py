"""advedge.export: ONNX export, the checker and external-data guard, the parity gate, FP16, the
``advedge export`` CLI and its refusals (no partial artifacts)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from advedge.export.graph import (
    METADATA_KEYS,
    check_external_data,
    check_onnx,
    read_onnx_metadata,
    read_sidecar,
    unfolded_clip_bounds,
)
from advedge.export.onnx_export import export_onnx
from advedge.export.parity import ParityError, Tolerance, compare_outputs, gate
from advedge.export.precisions import PRECISIONS
from advedge.export.runtime import OrtRunner, TorchRunner
from fakes.artifacts import random_calibration_set
from onnx import TensorProto, helper

from advedge.checkpoint import save_model
from advedge.cli import main
from advedge.errors import ExportError
from advedge.models import create_model
from advedge.models.purified import Purified
from advedge.purifier import save_purifier
from advedge.purifier.networks import Generator

EPS = 8 / 255
CIFAR_MEAN, CIFAR_STD = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]


def _classifier(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = create_model("tiny_cnn", num_classes=10, in_channels=3, mean=CIFAR_MEAN, std=CIFAR_STD)
    return m.eval()


def _purifier(seed: int = 1) -> Generator:
    torch.manual_seed(seed)
    g = Generator(3, 8, eps_r=10 / 255)
    with torch.no_grad():  # the output conv starts at zero (identity); make G do something
        for p in g.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return g.eval()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export_runs")
    meta = {"dataset": "tiny", "eps": EPS, "input_shape": [3, 32, 32], "method": "natural"}
    model_dir = root / "classifier"
    model_dir.mkdir()
    save_model(_classifier(), model_dir / "model.safetensors", metadata=meta)
    pur_dir = root / "purifier"
    pur_dir.mkdir()
    save_purifier(
        _purifier(),
        pur_dir / "purifier.safetensors",
        metadata={"input_shape": [3, 32, 32], "eps": EPS, "eps_r": 10 / 255, "method": "ipcm"},
    )
    return {"model": model_dir, "purifier": pur_dir}


def _cli(*args: str) -> int:
    return main(list(args))


def _export(
    model: Path, out: Path, *extra: str, data: Path | None = None, n: int | None = None
) -> int:
    """``advedge export --model MODEL --out OUT [--data DATA] [--parity-n N --report-n N] ...``."""
    args = ["export", "--model", str(model), "--out", str(out)]
    if data is not None:
        args += ["--data", str(data)]
    if n is not None:
        args += ["--parity-n", str(n), "--report-n", str(n)]
    return _cli(*args, *extra)


def _calibrate(src: Path, data: Path, out: Path, *extra: str) -> int:
    """``advedge calibrate --onnx SRC --data DATA --out OUT ...``."""
    return _cli("calibrate", "--onnx", str(src), "--data", str(data), "--out", str(out), *extra)


# ------------------------------------------------------------------------------ export_onnx
def test_classifier_export_is_checked_dynamic_and_matches_torch(tmp_path):
    model = _classifier()
    path = export_onnx(
        model,
        tmp_path / "m.onnx",
        input_shape=(3, 32, 32),
        metadata={"kind": "classifier", "precision": "fp32", "eps": EPS},
    )
    proto = onnx.load(str(path))
    assert proto.opset_import[0].version == 18
    (inp,) = proto.graph.input
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 32, 32]
    assert proto.graph.output[0].name == "logits"
    meta = read_onnx_metadata(proto)
    assert meta["kind"] == "classifier" and meta["eps"] == pytest.approx(EPS)
    runner = OrtRunner(path)
    for n in (1, 5):  # the batch axis is dynamic
        x = torch.rand(n, 3, 32, 32)
        ref = model(x).detach().numpy()
        assert np.abs(runner(x.numpy()) - ref).max() < 1e-4


def test_purifier_clip_bounds_are_initializers_and_output_is_bounded(tmp_path):
    g = _purifier()
    path = export_onnx(g, tmp_path / "g.onnx", input_shape=(3, 32, 32), output_name="purified")
    proto = onnx.load(str(path))
    clips = [n for n in proto.graph.node if n.op_type == "Clip"]
    assert clips and not unfolded_clip_bounds(proto)
    assert not [n for n in proto.graph.node if n.op_type == "Constant"]
    x = np.random.default_rng(0).random((4, 3, 32, 32), dtype=np.float32)
    out = OrtRunner(path)(x)
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert np.abs(out - x).max() <= 10 / 255 + 1e-6
    assert np.abs(out - x).max() > 1e-4  # G really changes the image


def test_fused_graph_is_purifier_then_classifier(tmp_path):
    f, g = _classifier(), _purifier()
    path = export_onnx(Purified(g, f), tmp_path / "fused.onnx", input_shape=(3, 32, 32))
    x = torch.rand(3, 3, 32, 32)
    ref = f(g(x)).detach().numpy()
    out = OrtRunner(path)(x.numpy())
    assert np.abs(out - ref).max() < 1e-4
    assert np.abs(out - f(x).detach().numpy()).max() > 1e-5  # not the classifier alone


def test_bad_opset_is_a_usage_error(tmp_path):
    from advedge.errors import UsageError

    with pytest.raises(UsageError, match="opset 9"):
        export_onnx(_classifier(), tmp_path / "m.onnx", input_shape=(3, 32, 32), opset=9)
    assert not (tmp_path / "m.onnx").exists()


# ------------------------------------------------------------------------------ checker, external data
def _tiny_graph(initializer: TensorProto | None = None, bad: bool = False) -> onnx.ModelProto:
    inp = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    w = initializer or helper.make_tensor("w", TensorProto.FLOAT, [1, 4], [1.0, 2.0, 3.0, 4.0])
    node = helper.make_node("Add", ["x", "missing" if bad else "w"], ["y"])
    graph = helper.make_graph([node], "g", [inp], [out], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_checker_failure_is_one_export_error(tmp_path):
    path = tmp_path / "bad.onnx"
    onnx.save(_tiny_graph(bad=True), str(path))
    with pytest.raises(ExportError, match="fails the ONNX checker"):
        check_onnx(path)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not a protobuf" * 10)
    with pytest.raises(ExportError):
        check_onnx(garbage)


def _external(location: str) -> TensorProto:
    t = helper.make_tensor("w", TensorProto.FLOAT, [1, 4], [0.0] * 4)
    t.ClearField("float_data")
    t.data_location = TensorProto.EXTERNAL
    t.external_data.add(key="location", value=location)
    return t


@pytest.mark.parametrize("location", ["../outside.bin", "/etc/passwd", "sub/../../outside.bin"])
def test_external_data_outside_the_folder_is_refused(tmp_path, location):
    folder = tmp_path / "model"
    folder.mkdir()
    (tmp_path / "outside.bin").write_bytes(b"\x00" * 16)
    path = folder / "m.onnx"
    onnx.save(_tiny_graph(_external(location)), str(path))
    with pytest.raises(ExportError, match="points outside its folder"):
        check_external_data(path)
    with pytest.raises(ExportError, match="outside"):
        OrtRunner(path)


def test_external_data_through_a_symlink_is_refused(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (tmp_path / "secret.bin").write_bytes(b"\x00" * 16)
    os.symlink(tmp_path / "secret.bin", folder / "weights.bin")
    path = folder / "m.onnx"
    onnx.save(_tiny_graph(_external("weights.bin")), str(path))
    with pytest.raises(ExportError, match="outside"):
        check_external_data(path)


def test_external_data_inside_the_folder_is_accepted(tmp_path):
    path = tmp_path / "m.onnx"
    model = _tiny_graph()
    onnx.save(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="m.bin",
        size_threshold=0,
    )
    check_onnx(path)
    out = OrtRunner(path)(np.zeros((1, 4), np.float32))
    assert out.tolist() == [[1.0, 2.0, 3.0, 4.0]]


# ------------------------------------------------------------------------------ parity
def test_compare_outputs_measures_max_abs_and_agreement():
    ref = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [0.0, 3.0]])
    cand = ref.copy()
    cand[1] = [1.5, 1.0]  # flips the second image's class
    figs = compare_outputs(ref, cand)
    assert figs["max_abs"] == pytest.approx(1.5)
    assert figs["agreement"] == pytest.approx(0.75)
    assert compare_outputs(ref, np.full_like(ref, np.nan))["max_abs"] == float("inf")


def test_gate_names_what_failed_and_by_how_much():
    figs = {
        "clean": {"max_abs": 1e-6, "agreement": 1.0},
        "adversarial": {"max_abs": 0.5, "agreement": 0.9},
    }
    with pytest.raises(ParityError) as info:
        gate(
            figs,
            precision="fp32",
            output="logits",
            n=10,
            artifact="m.fp32.onnx",
            tolerance=PRECISIONS["fp32"].tolerance,
        )
    msg = str(info.value)
    assert "adversarial max|Δ| 0.5 > 0.001" in msg and "90.0% < 99%" in msg
    assert "clean max" not in msg
    ok = gate(
        figs, precision="fp32", output="logits", n=10, artifact="m", tolerance=Tolerance(1, 1, 0.5)
    )
    assert ok.passed


# ------------------------------------------------------------------------------ CLI
def test_cli_export_fp32_and_fp16_write_artifacts_and_json(runs, tiny_npz_data, tmp_path, capsys):
    out = tmp_path / "out"
    rc = _export(runs["model"], out, "--precision", "fp16", "--json", data=tiny_npz_data, n=32)
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    names = sorted(Path(a["path"]).name for a in report["artifacts"])
    assert names == ["tiny_cnn.fp16.onnx", "tiny_cnn.fp32.onnx"]
    for a in report["artifacts"]:
        assert a["bytes"] == Path(a["path"]).stat().st_size > 0
        assert a["parity"]["passed"] and set(a["parity"]["figures"]) == {"clean", "adversarial"}
    fp16 = next(a for a in report["artifacts"] if a["precision"] == "fp16")
    acc = fp16["accuracy_report"]
    assert acc["n"] == 32 and acc["transfer_attack"]["kind"] == "transfer"
    # FP16 inside, FP32 at the edges
    proto = onnx.load(str(out / "tiny_cnn.fp16.onnx"))
    assert proto.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert proto.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert any(t.data_type == TensorProto.FLOAT16 for t in proto.graph.initializer)
    side = read_sidecar(out / "tiny_cnn.fp16.json")
    assert set(METADATA_KEYS) <= set(side) and side["precision"] == "fp16"
    assert side["sha256"] == fp16["sha256"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # staging removed


def test_cli_export_purifier_beside_and_fused(runs, tiny_npz_data, tmp_path, capsys):
    out = tmp_path / "pair"
    assert (
        _export(
            runs["model"],
            out,
            "--purifier",
            str(runs["purifier"]),
            "--json",
            data=tiny_npz_data,
            n=16,
        )
        == 0
    )
    kinds = {a["kind"] for a in json.loads(capsys.readouterr().out)["artifacts"]}
    assert kinds == {"classifier", "purifier"}
    pur = read_sidecar(out / "purifier.fp32.json")
    assert pur["parity"]["output"] == "pixels" and pur["kind"] == "purifier"
    fused = tmp_path / "fused"
    assert (
        _export(
            runs["model"],
            fused,
            "--purifier",
            str(runs["purifier"]),
            "--fuse",
            "--json",
            data=tiny_npz_data,
            n=16,
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    (art,) = report["artifacts"]
    assert art["kind"] == "fused" and Path(art["path"]).name == "tiny_cnn-purified.fp32.onnx"
    meta = read_onnx_metadata(art["path"])
    assert set(meta["source_sha256"]) == {"purifier", "classifier"}


def _zero_fp32_tolerance(monkeypatch: pytest.MonkeyPatch) -> None:
    import advedge.export.gates as gates

    fp32 = dataclasses.replace(PRECISIONS["fp32"], tolerance=Tolerance(0.0, 0.0, 1.0))
    monkeypatch.setattr(gates, "PRECISIONS", {**PRECISIONS, "fp32": fp32})


def test_cli_parity_failure_exits_1_and_writes_nothing(
    runs, tiny_npz_data, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "out"
    out.mkdir()
    earlier = out / "earlier.txt"
    earlier.write_text("earlier work")
    _zero_fp32_tolerance(monkeypatch)
    # zero tolerance: the float rounding differences between torch and ONNX Runtime fail it
    rc = _export(runs["model"], out, data=tiny_npz_data, n=8)
    err = capsys.readouterr().err
    assert rc == 1
    assert "parity failed" in err and "max|Δ| " in err and " > 0;" in err and "not written" in err
    assert sorted(p.name for p in out.iterdir()) == ["earlier.txt"]
    assert earlier.read_text() == "earlier work"


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["--precision", "bf16"], 2, "precision 'bf16'"),
        # int8 without --calib-data: the dataset the checkpoint records ("tiny") is not here
        (["--precision", "int8"], 1, "(tiny) is not on this machine"),
        (["--fuse"], 2, "--fuse needs --purifier"),
        (["--opset", "9"], 2, "opset 9"),
        (["--trt", "--min-batch", "8", "--max-batch", "4"], 2, "min <= opt <= max"),
        (["--precision", "fp16", "--trt-calibrator", "legacy-entropy"], 2, "legacy calibrator"),
    ],
)
def test_cli_bad_options_fail_in_one_line_without_output(
    runs, tiny_npz_data, tmp_path, capsys, args, code, needle
):
    out = tmp_path / "never"
    rc = _export(runs["model"], out, *args, data=tiny_npz_data, n=8)
    err = capsys.readouterr().err
    assert rc == code, err
    assert needle in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_trt_without_tensorrt_exits_3_with_a_hint(
    runs, tiny_npz_data, tmp_path, capsys, monkeypatch
):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    out = tmp_path / "out"
    rc = _export(runs["model"], out, "--trt", data=tiny_npz_data)
    err = capsys.readouterr().err
    assert rc == 3
    assert "TensorRT" in err and "device that will run the engine" in err
    assert not out.exists()


def test_cli_missing_and_wrong_checkpoints(runs, tiny_npz_data, tmp_path, capsys):
    rc = _export(tmp_path / "nope", tmp_path / "o")
    assert rc == 1 and "not found" in capsys.readouterr().err
    # a purifier given as the classifier
    rc = _export(runs["purifier"] / "purifier.safetensors", tmp_path / "o", data=tiny_npz_data)
    assert rc == 1
    assert not (tmp_path / "o").exists()


def test_cli_data_of_another_shape_is_refused(runs, npz_dataset_factory, tmp_path, capsys):
    mnistish = npz_dataset_factory("gray", size=28, channels=1)
    rc = _export(runs["model"], tmp_path / "o", data=mnistish)
    err = capsys.readouterr().err
    assert rc == 1 and "[1, 28, 28]" in err and "[3, 32, 32]" in err
    assert not (tmp_path / "o").exists()


def test_torch_runner_and_ort_runner_agree_in_batches(tmp_path):
    model = _classifier()
    path = export_onnx(model, tmp_path / "m.onnx", input_shape=(3, 32, 32))
    x = np.random.default_rng(1).random((37, 3, 32, 32), dtype=np.float32)
    a = TorchRunner(model).run(x, batch_size=16)
    b = OrtRunner(path).run(x, batch_size=16)
    assert a.shape == b.shape == (37, 10)
    assert np.abs(a - b).max() < 1e-4


def test_deploy_side_runs_and_calibrates_without_torch(tmp_path):
    """The import rule: both packages import, run ONNX Runtime and calibrate where torch cannot
    be imported at all."""
    from advedge.calibration import save_calibration_set

    path = export_onnx(_classifier(), tmp_path / "m.onnx", input_shape=(3, 32, 32))
    npz = save_calibration_set(random_calibration_set(), tmp_path / "calib.npz")
    code = f"""
import sys
sys.modules["torch"] = None  # `import torch` now raises ImportError
import numpy as np
import advedge.export, advedge.calibration
from advedge.export import graph, parity, runtime, tensorrt, fp16, onnx_export, exporter
from advedge.calibration import load_calibration_set, quantize_qdq
from advedge.export.runtime import OrtRunner
x = np.random.default_rng(1).random((4, 3, 32, 32), dtype=np.float32)
fp32 = OrtRunner({str(path)!r}).run(x)
cs = load_calibration_set({str(npz)!r})
res = quantize_qdq({str(path)!r}, {str(tmp_path / "q.onnx")!r}, cs, method="minmax",
                   batch_size=16, cache_dir={str(tmp_path / "cache")!r})
int8 = OrtRunner({str(tmp_path / "q.onnx")!r}, optimization="basic").run(x)
assert sys.modules["torch"] is None
print(fp32.shape, int8.shape, res.n_qdq_pairs > 0)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "(4, 10) (4, 10) True"


# ------------------------------------------------------------------------------ int8 and calibrate
def test_cli_export_int8_reports_accuracy_and_saves_the_set(runs, tiny_npz_data, tmp_path, capsys):
    out = tmp_path / "q"
    rc = _export(
        runs["model"],
        out,
        "--precision",
        "int8",
        "--calib-data",
        str(tiny_npz_data),
        "--calib-n",
        "64",
        "--calib-mix-adv",
        "0.25",
        "--cache-dir",
        str(tmp_path / "cc"),
        "--json",
        "--parity-n",
        "16",
        "--report-n",
        "32",
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    report = json.loads(captured.out)
    int8 = next(a for a in report["artifacts"] if a["precision"] == "int8")
    acc = int8["accuracy_report"]
    assert set(acc["accuracy"]) == {"fp32", "int8", "int8_reference"}
    assert acc["n"] == 32 and "clean" in acc["drop_points"]
    cal = int8["calibration"]
    assert cal["n"] == 64 and cal["mix_adv"] == 0.25 and cal["symmetric"] and not cal["cache_hit"]
    assert "node_linear" in cal["fp32_nodes"] or any(
        "gemm" in n.lower() or "linear" in n.lower() for n in cal["fp32_nodes"]
    )
    from advedge.calibration import load_calibration_set

    saved = load_calibration_set(out / "calibration.npz")
    assert len(saved) == 64 and saved.sha256 == cal["calib_sha256"] and saved.is_adv.sum() == 16
    # the saved set reproduces the calibration on a second export: the ranges come from the cache
    rc = _export(
        runs["model"],
        tmp_path / "q2",
        "--precision",
        "int8",
        "--calib-data",
        str(out / "calibration.npz"),
        "--cache-dir",
        str(tmp_path / "cc"),
        "--json",
        data=tiny_npz_data,
        n=16,
    )
    again = json.loads(capsys.readouterr().out)
    cal2 = next(a for a in again["artifacts"] if a["precision"] == "int8")["calibration"]
    assert rc == 0 and cal2["cache_hit"] and cal2["calib_sha256"] == cal["calib_sha256"]
    assert (tmp_path / "q2" / "tiny_cnn.int8.onnx").read_bytes() == (
        out / "tiny_cnn.int8.onnx"
    ).read_bytes()


def test_accuracy_report_warns_when_the_low_precision_model_loses_accuracy(tmp_path):
    from advedge.export.gates import accuracy_report

    good = export_onnx(_classifier(0), tmp_path / "good.onnx", input_shape=(3, 32, 32))
    other = export_onnx(_classifier(7), tmp_path / "other.onnx", input_shape=(3, 32, 32))
    x = np.random.default_rng(0).random((64, 3, 32, 32), dtype=np.float32)
    y = OrtRunner(good).run(x).argmax(1)  # fp32 is 100% right on its own labels
    rep = accuracy_report(good, other, "fp16", x, y, x, max_drop=2.0, attack={"name": "pgd"})
    assert rep["accuracy"]["fp32"]["clean_acc"] == 1.0
    assert rep["drop_points"]["clean"] > 2.0
    assert rep["warning"] and "loses" in rep["warning"] and "limit 2" in rep["warning"]
    same = accuracy_report(good, good, "fp16", x, y, x, max_drop=2.0, attack={"name": "pgd"})
    assert same["warning"] is None and same["drop_points"]["clean"] == 0.0


def test_cli_calibrate_quantises_an_existing_onnx(runs, tiny_npz_data, tmp_path, capsys):
    src = export_onnx(
        _classifier(),
        tmp_path / "m.fp32.onnx",
        input_shape=(3, 32, 32),
        metadata={"kind": "classifier", "precision": "fp32"},
    )
    out = tmp_path / "m.int8.onnx"
    rc = _calibrate(
        src,
        tiny_npz_data,
        out,
        "--method",
        "percentile",
        "--n",
        "64",
        "--save-set",
        str(tmp_path / "set.npz"),
        "--cache-dir",
        str(tmp_path / "cc"),
        "--json",
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    payload = json.loads(captured.out)
    assert payload["method"] == "percentile" and payload["n"] == 64 and payload["qdq_pairs"] > 0
    meta = read_onnx_metadata(out)
    assert meta["precision"] == "int8" and meta["kind"] == "classifier"
    assert (
        read_sidecar(tmp_path / "m.int8.json")["calibration"]["calib_sha256"]
        == payload["calib_sha256"]
    )
    assert (tmp_path / "set.npz").is_file()


@pytest.mark.parametrize(
    ("extra", "code", "needle"),
    [
        (["--n", "8", "--batch-size", "32"], 1, "smaller than the batch"),
        (["--mix-adv", "0.5"], 2, "--mix-adv needs --model"),
        (["--method", "kl"], 2, "unknown calibration method"),
    ],
)
def test_cli_calibrate_refusals(tiny_npz_data, tmp_path, capsys, extra, code, needle):
    src = export_onnx(_classifier(), tmp_path / "m.onnx", input_shape=(3, 32, 32))
    out = tmp_path / "q.onnx"
    rc = _calibrate(src, tiny_npz_data, out, "--cache-dir", str(tmp_path / "cc"), *extra)
    err = capsys.readouterr().err
    assert rc == code and needle in err
    assert not out.exists()


def test_cli_calibrate_set_of_another_image_shape(npz_dataset_factory, tmp_path, capsys):
    gray = npz_dataset_factory("gray", size=28, channels=1)
    src = export_onnx(_classifier(), tmp_path / "m.onnx", input_shape=(3, 32, 32))
    rc = _calibrate(
        src, gray, tmp_path / "q.onnx", "--n", "32", "--cache-dir", str(tmp_path / "cc")
    )
    err = capsys.readouterr().err
    assert rc == 1 and "28" in err and "32" in err
    assert not (tmp_path / "q.onnx").exists()


def test_cli_calibrate_refuses_an_onnx_failing_the_checker(tiny_npz_data, tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    onnx.save(_tiny_graph(bad=True), str(bad))
    rc = _calibrate(bad, tiny_npz_data, tmp_path / "q.onnx")
    err = capsys.readouterr().err
    assert rc == 1 and "fails the ONNX checker" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "q.onnx").exists()


# ------------------------------------------------------------------------------ ONNX Runtime's logs
class _FakeOrt:
    """ONNX Runtime's default-logger calls, recorded; a getter only where asked for."""

    def __init__(self, level: int | None) -> None:
        self.level = 2 if level is None else level
        self.calls: list[int] = []
        if level is not None:
            self.get_default_logger_severity = lambda: self.level

    def set_default_logger_severity(self, level: int) -> None:
        self.calls.append(level)
        self.level = level


@pytest.mark.parametrize(
    ("found", "restored"),
    [(None, 3), (1, 1), (3, 3), (4, 4)],
    ids=["no getter", "verbose", "advedge's", "quieter"],
)
def test_quiet_onnxruntime_restores_the_severity_it_found(monkeypatch, found, restored):
    from advedge.export.runtime import ORT_LOG_SEVERITY, ORT_QUIET_SEVERITY, quiet_onnxruntime

    fake = _FakeOrt(found)
    monkeypatch.setitem(sys.modules, "onnxruntime", fake)
    with quiet_onnxruntime():
        assert fake.level == ORT_QUIET_SEVERITY
        with quiet_onnxruntime(capture_prints=True):  # nested: no change, no restore
            assert fake.level == ORT_QUIET_SEVERITY
        assert fake.level == ORT_QUIET_SEVERITY
    # what ONNX Runtime reported; without a getter advedge's own level, never ORT's default 2
    assert fake.level == restored and fake.calls == [ORT_QUIET_SEVERITY, restored]
    assert found is not None or restored == ORT_LOG_SEVERITY


def test_one_quiet_helper_and_no_calibration_privates_in_export():
    import ast

    import advedge.calibration.quantize as quantize
    import advedge.export._deps as deps
    import advedge.export.exporter as exporter
    import advedge.export.runtime as runtime

    assert quantize.quiet_onnxruntime is deps.quiet_onnxruntime
    assert runtime.quiet_onnxruntime is deps.quiet_onnxruntime
    assert exporter.quiet_onnxruntime is deps.quiet_onnxruntime
    assert not hasattr(quantize, "_graph_input")
    root = Path(exporter.__file__).parent
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and "calibration" in (node.module or ""):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path.name} imports {private} from {node.module}"

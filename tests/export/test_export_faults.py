"""Faults of ``advedge export`` and ``advedge calibrate`` found by a red team: one writer per
output, no mix of two models' artifacts, nothing left behind by a failure or a kill, the
external-data guard inside ONNX local functions, one-line errors, and a full disk."""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from advedge.calibration import save_calibration_set
from advedge.export.graph import check_external_data, check_onnx, read_sidecar
from advedge.export.onnx_export import export_onnx
from conftest import write_npz_dataset
from fakes.artifacts import random_calibration_set
from onnx import TensorProto, helper

from advedge.checkpoint import save_model
from advedge.cli import main
from advedge.errors import ExportError
from advedge.locks import lock_path
from advedge.models import create_model
from advedge.utils import sha256_file

EPS = 8 / 255
CIFAR_MEAN, CIFAR_STD = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]
META = {"dataset": "tiny", "eps": EPS, "input_shape": [3, 32, 32], "method": "natural"}


def _classifier(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = create_model("tiny_cnn", num_classes=10, in_channels=3, mean=CIFAR_MEAN, std=CIFAR_STD)
    return m.eval()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two different tiny_cnn checkpoints (same architecture, other weights)."""
    root = tmp_path_factory.mktemp("fault_runs")
    out = {}
    for label, seed in (("a", 0), ("b", 7)):
        folder = root / label
        folder.mkdir()
        save_model(_classifier(seed), folder / "model.safetensors", metadata=META)
        out[label] = folder
    return out


@pytest.fixture(scope="module")
def fp32_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("fault_onnx")
    return export_onnx(
        _classifier(),
        folder / "m.fp32.onnx",
        input_shape=(3, 32, 32),
        metadata={"kind": "classifier", "precision": "fp32"},
    )


def _cli(*args: str) -> int:
    return main(list(args))


def _export(model: Path, out: Path, data: Path, *extra: str) -> int:
    return _cli(
        "export",
        "--model",
        str(model),
        "--out",
        str(out),
        "--data",
        str(data),
        "--parity-n",
        "8",
        "--report-n",
        "8",
        *extra,
    )


def _calibrate(src: Path, data: Path, out: Path, tmp_path: Path, *extra: str) -> int:
    return _cli(
        "calibrate",
        "--onnx",
        str(src),
        "--data",
        str(data),
        "--out",
        str(out),
        "--n",
        "32",
        "--batch-size",
        "16",
        "--method",
        "minmax",
        "--cache-dir",
        str(tmp_path / "cc"),
        *extra,
    )


def _listing(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones included) with its content."""
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def hold_lock():
    """``hold(out)``: take the output lock of ``out`` as another advedge process would."""
    fds: list[int] = []

    def hold(out: Path) -> None:
        path = lock_path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, json.dumps({"pid": 4242, "host": "elsewhere", "since": "now"}).encode())
        fds.append(fd)

    yield hold
    for fd in fds:
        os.close(fd)


# ------------------------------------------------------------------------------ 5. external data
def _external_tensor(name: str, location: str) -> TensorProto:
    t = helper.make_tensor(name, TensorProto.FLOAT, [1, 4], [0.0] * 4)
    t.ClearField("float_data")
    t.data_location = TensorProto.EXTERNAL
    t.external_data.add(key="location", value=location)
    return t


def _model_with_function(body: list[onnx.NodeProto]) -> onnx.ModelProto:
    fn = helper.make_function(
        "local",
        "AddSecret",
        ["x"],
        ["y"],
        body,
        opset_imports=[helper.make_opsetid("", 18)],
    )
    inp = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    call = helper.make_node("AddSecret", ["x"], ["y"], domain="local")
    graph = helper.make_graph([call], "g", [inp], [out])
    return helper.make_model(
        graph,
        functions=[fn],
        opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("local", 1)],
    )


def _secret_layout(tmp_path: Path) -> Path:
    (tmp_path / "secret.txt").write_bytes(b"\x00" * 16)
    folder = tmp_path / "a" / "b" / "c"
    folder.mkdir(parents=True)
    return folder


def test_external_data_guard_walks_onnx_local_functions(tmp_path):
    folder = _secret_layout(tmp_path)
    const = helper.make_node(
        "Constant", [], ["c"], value=_external_tensor("c", "../../../secret.txt")
    )
    add = helper.make_node("Add", ["x", "c"], ["y"])
    path = folder / "m.onnx"
    onnx.save(_model_with_function([const, add]), str(path))
    with pytest.raises(ExportError, match="points outside its folder"):
        check_external_data(path)
    with pytest.raises(ExportError, match="points outside"):
        check_onnx(path)


def test_external_data_guard_walks_subgraphs_inside_local_functions(tmp_path):
    folder = _secret_layout(tmp_path)
    secret = helper.make_node(
        "Constant", [], ["c"], value=_external_tensor("c", "../../../secret.txt")
    )
    out_c = helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 4])
    then_g = helper.make_graph([secret], "then", [], [out_c])
    else_g = helper.make_graph(
        [helper.make_node("Constant", [], ["c"], value_floats=[0.0, 0.0, 0.0, 0.0])],
        "else",
        [],
        [out_c],
    )
    cond = helper.make_node("Constant", [], ["cond"], value_int=1)
    cast = helper.make_node("Cast", ["cond"], ["b"], to=TensorProto.BOOL)
    branch = helper.make_node("If", ["b"], ["c2"], then_branch=then_g, else_branch=else_g)
    add = helper.make_node("Add", ["x", "c2"], ["y"])
    path = folder / "m.onnx"
    onnx.save(_model_with_function([cond, cast, branch, add]), str(path))
    with pytest.raises(ExportError, match="points outside its folder"):
        check_external_data(path)


# ------------------------------------------------------------------------------ 1. one writer
def test_export_refuses_a_second_writer_of_the_same_out(
    runs, tiny_npz_data, tmp_path, capsys, hold_lock, monkeypatch
):
    out = tmp_path / "out"
    hold_lock(out)
    rc, err = _export_refused(monkeypatch, capsys, runs["a"], out, tiny_npz_data)
    assert rc == 1, err
    line = _one_error_line(err)
    assert "being written by another advedge process" in line and "pid 4242" in line
    assert not out.exists()


def test_calibrate_refuses_a_second_writer_of_the_same_file(
    fp32_onnx, tiny_npz_data, tmp_path, capsys, hold_lock, monkeypatch
):
    import advedge.calibration.calibrate as calibration

    out = tmp_path / "q.int8.onnx"
    hold_lock(out)
    monkeypatch.setattr(calibration, "quantize_artifact", _no_work)
    rc = _calibrate(fp32_onnx, tiny_npz_data, out, tmp_path)
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "being written by another advedge process" in _one_error_line(err)
    assert not out.exists() and not (tmp_path / "q.int8.json").exists()


def _zero_fp32_tolerance(monkeypatch: pytest.MonkeyPatch) -> None:
    """Zero parity tolerance for fp32: float rounding between torch and ORT then fails it."""
    import advedge.export.gates as gates
    from advedge.export.parity import Tolerance
    from advedge.export.precisions import PRECISIONS

    fp32 = dataclasses.replace(PRECISIONS["fp32"], tolerance=Tolerance(0.0, 0.0, 1.0))
    monkeypatch.setattr(gates, "PRECISIONS", {**PRECISIONS, "fp32": fp32})


def _no_work(*args, **kwargs):
    raise AssertionError("the expensive work started although the command had to be refused")


def _export_refused(monkeypatch, capsys, model: Path, out: Path, data: Path) -> tuple[int, str]:
    """Export with the checkpoints' loading (the first real work) made to fail the test;
    returns the exit code and stderr."""
    import advedge.export.exporter as exporter

    monkeypatch.setattr(exporter, "load_targets", _no_work)
    rc = _export(model, out, data)
    return rc, capsys.readouterr().err


# ------------------------------------------------------------------------------ 2. no mix
def test_export_refuses_an_out_holding_another_models_artifacts(
    runs, tiny_npz_data, tmp_path, capsys
):
    out = tmp_path / "out"
    assert _export(runs["b"], out, tiny_npz_data, "--precision", "fp16") == 0
    before = _listing(out)
    capsys.readouterr()
    rc = _export(runs["a"], out, tiny_npz_data)
    err = capsys.readouterr().err
    assert rc == 1, err
    line = _one_error_line(err)
    assert "another model" in line and "tiny_cnn.fp16.onnx" in line and "--overwrite" in line
    assert _listing(out) == before  # model b's artifacts untouched, nothing of model a


def test_export_refuses_a_file_of_unknown_origin_it_would_replace(
    runs, tiny_npz_data, tmp_path, capsys
):
    out = tmp_path / "out"
    out.mkdir()
    (out / "tiny_cnn.fp32.onnx").write_bytes(b"someone else's model")
    rc = _export(runs["a"], out, tiny_npz_data)
    err = capsys.readouterr().err
    assert rc == 1 and "tiny_cnn.fp32.onnx" in _one_error_line(err)
    assert (out / "tiny_cnn.fp32.onnx").read_bytes() == b"someone else's model"


def test_overwrite_replaces_the_other_models_family_without_leaving_a_mix(
    runs, tiny_npz_data, tmp_path, capsys
):
    out = tmp_path / "out"
    assert _export(runs["b"], out, tiny_npz_data, "--precision", "fp16") == 0
    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    rc = _export(runs["a"], out, tiny_npz_data, "--overwrite", "--json")
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    report = json.loads(captured.out)
    assert sorted(report["removed"]) == ["tiny_cnn.fp16.json", "tiny_cnn.fp16.onnx"]
    assert sorted(p.name for p in out.iterdir()) == [
        "notes.txt",
        "tiny_cnn.fp32.json",
        "tiny_cnn.fp32.onnx",
    ]
    a_sha = sha256_file(runs["a"] / "model.safetensors")
    assert read_sidecar(out / "tiny_cnn.fp32.json")["source_sha256"] == a_sha


def test_overwrite_keeps_the_other_models_artifacts_when_the_export_fails(
    runs, tiny_npz_data, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "out"
    assert _export(runs["b"], out, tiny_npz_data, "--precision", "fp16") == 0
    before = _listing(out)
    _zero_fp32_tolerance(monkeypatch)
    capsys.readouterr()
    rc = _export(runs["a"], out, tiny_npz_data, "--overwrite")
    err = capsys.readouterr().err
    assert rc == 1 and "parity failed" in _one_error_line(err)
    assert _listing(out) == before


def test_same_model_at_another_precision_into_the_same_out_is_not_a_conflict(
    runs, tiny_npz_data, tmp_path, capsys
):
    out = tmp_path / "out"
    assert _export(runs["a"], out, tiny_npz_data) == 0
    assert _export(runs["a"], out, tiny_npz_data, "--precision", "fp16") == 0, capsys.readouterr()
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "tiny_cnn.fp16.json",
        "tiny_cnn.fp16.onnx",
        "tiny_cnn.fp32.json",
        "tiny_cnn.fp32.onnx",
    ]
    sha = sha256_file(runs["a"] / "model.safetensors")
    assert {read_sidecar(out / n)["source_sha256"] for n in names if n.endswith(".json")} == {sha}


def test_export_refuses_an_out_where_another_model_of_another_name_lives(
    runs, tiny_npz_data, tmp_path, capsys, monkeypatch
):
    import advedge.export.exporter as exporter

    out = tmp_path / "out"
    out.mkdir()
    (out / "resnet8.int8.onnx").write_bytes(b"onnx")
    (out / "resnet8.int8.json").write_text(json.dumps({"source_sha256": "deadbeef" * 8}))
    monkeypatch.setattr(exporter, "load_test_images", _no_work)
    rc = _export(runs["a"], out, tiny_npz_data)
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "resnet8.int8.onnx" in _one_error_line(err) and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["resnet8.int8.json", "resnet8.int8.onnx"]


def test_a_purifier_beside_the_same_classifier_is_not_a_conflict(
    runs, tiny_npz_data, tmp_path, capsys
):
    from advedge.purifier import save_purifier
    from advedge.purifier.networks import Generator

    torch.manual_seed(1)
    pur = tmp_path / "purifier"
    pur.mkdir()
    save_purifier(
        Generator(3, 8, eps_r=10 / 255).eval(),
        pur / "purifier.safetensors",
        metadata={"input_shape": [3, 32, 32], "eps": EPS, "eps_r": 10 / 255, "method": "ipcm"},
    )
    out = tmp_path / "out"
    assert _export(runs["a"], out, tiny_npz_data) == 0
    rc = _export(runs["a"], out, tiny_npz_data, "--purifier", str(pur))
    assert rc == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [
        "purifier.fp32.json",
        "purifier.fp32.onnx",
        "tiny_cnn.fp32.json",
        "tiny_cnn.fp32.onnx",
    ]
    # and the classifier alone again beside its purifier
    assert _export(runs["a"], out, tiny_npz_data) == 0, capsys.readouterr().err


# ------------------------------------------------------------------------------ 3. nothing left
@pytest.fixture(scope="module")
def calib_inputs(tmp_path_factory: pytest.TempPathFactory, fp32_onnx: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("calib_inputs")
    bad = root / "bad.onnx"
    inp = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Add", ["x", "missing"], ["y"])], "g", [inp], [out])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(bad))
    garbage = root / "garbage.onnx"
    garbage.write_bytes(b"\x00not a protobuf" * 10)
    corrupt = root / "corrupt.npz"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip")
    return {
        "fp32": fp32_onnx,
        "bad": bad,
        "garbage": garbage,
        "missing_onnx": root / "nope.onnx",
        "data": write_npz_dataset(root / "data"),
        "gray": write_npz_dataset(root / "gray", size=28, channels=1),
        "missing_data": root / "no-such-data",
        "corrupt_npz": corrupt,
    }


@pytest.mark.parametrize(
    ("onnx_key", "data_key", "extra", "code", "needle"),
    [
        ("bad", "data", [], 1, "fails the ONNX checker"),
        ("garbage", "data", [], 1, "not a readable ONNX file"),
        ("missing_onnx", "data", [], 2, "does not exist"),
        ("fp32", "missing_data", [], 1, "no-such-data"),
        ("fp32", "gray", [], 1, "[1, 28, 28]"),
        ("fp32", "data", ["--n", "8"], 1, "smaller than the batch"),
        ("fp32", "data", ["--n", "4096"], 1, "has only 128"),
        ("fp32", "corrupt_npz", [], 1, "corrupt.npz"),
        ("fp32", "data", ["--keep-fp32", "no_such_node"], 2, "no_such_node"),
        ("fp32", "data", ["--method", "kl"], 2, "unknown calibration method"),
        ("fp32", "data", ["--save-set", "set.txt"], 2, "--save-set must name a .npz"),
    ],
)
def test_calibrate_failure_leaves_no_new_folder(
    calib_inputs, tmp_path, capsys, onnx_key, data_key, extra, code, needle
):
    out = tmp_path / "new" / "sub" / "q.int8.onnx"
    rc = _calibrate(calib_inputs[onnx_key], calib_inputs[data_key], out, tmp_path, *extra)
    err = capsys.readouterr().err
    assert rc == code, err
    assert needle in _one_error_line(err)
    assert not (tmp_path / "new").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no lock, no temp


def test_calibrate_creates_the_folder_of_out_with_the_file(calib_inputs, tmp_path, capsys):
    out = tmp_path / "new" / "sub" / "q.int8.onnx"
    rc = _calibrate(
        calib_inputs["fp32"],
        calib_inputs["data"],
        out,
        tmp_path,
        "--save-set",
        str(tmp_path / "sets" / "set.npz"),
    )
    assert rc == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.parent.iterdir()) == ["q.int8.json", "q.int8.onnx"]
    assert sorted(p.name for p in (tmp_path / "sets").iterdir()) == ["set.npz"]
    assert not [p for p in tmp_path.rglob(".*")]  # no lock file, no temporary left


def test_export_out_under_a_file_is_a_usage_error_before_any_work(
    runs, tiny_npz_data, tmp_path, capsys, monkeypatch
):
    (tmp_path / "file.txt").write_text("x")
    out = tmp_path / "file.txt" / "out"
    rc, err = _export_refused(monkeypatch, capsys, runs["a"], out, tiny_npz_data)
    assert rc == 2, err
    assert "is a file" in _one_error_line(err) and "file.txt" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_calibrate_out_under_a_file_is_a_usage_error(calib_inputs, tmp_path, capsys):
    (tmp_path / "file.txt").write_text("x")
    rc = _calibrate(
        calib_inputs["fp32"], calib_inputs["data"], tmp_path / "file.txt" / "q.onnx", tmp_path
    )
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "is a file" in _one_error_line(err)


def test_export_into_a_read_only_folder_fails_before_any_work(
    runs, tiny_npz_data, tmp_path, capsys, monkeypatch, read_only
):
    parent = tmp_path / "ro"
    parent.mkdir()
    read_only(parent)
    out = parent / "out"
    rc, err = _export_refused(monkeypatch, capsys, runs["a"], out, tiny_npz_data)
    assert rc == 1, err
    assert f"cannot write {out}: permission denied" in _one_error_line(err)
    assert not out.exists()


def test_export_into_an_existing_read_only_out_fails_before_any_work(
    runs, tiny_npz_data, tmp_path, capsys, monkeypatch, read_only
):
    out = tmp_path / "out"
    out.mkdir()
    read_only(out)
    rc, err = _export_refused(monkeypatch, capsys, runs["a"], out, tiny_npz_data)
    assert rc == 1, err
    assert f"cannot write {out}: permission denied" in _one_error_line(err)


def test_calibrate_into_a_read_only_folder_fails_before_any_work(
    calib_inputs, tmp_path, capsys, monkeypatch, read_only
):
    import advedge.calibration.calibrate as calibration

    parent = tmp_path / "ro"
    parent.mkdir()
    read_only(parent)
    monkeypatch.setattr(calibration, "quantize_artifact", _no_work)
    monkeypatch.setattr(calibration, "build_calibration_set", _no_work)
    out = parent / "sub" / "q.onnx"
    rc = _calibrate(calib_inputs["fp32"], calib_inputs["data"], out, tmp_path)
    err = capsys.readouterr().err
    assert rc == 1, err
    assert f"cannot write {out}: permission denied" in _one_error_line(err)
    assert list(parent.iterdir()) == []


# ------------------------------------------------------------------------------ 4. killed export
def test_export_removes_staging_folders_left_by_a_killed_export(
    runs, tiny_npz_data, tmp_path, capsys
):
    out = tmp_path / "out"
    leftover = out / ".advedge-export-k1ll3d"
    leftover.mkdir(parents=True)
    (leftover / "tiny_cnn.fp32.onnx").write_bytes(b"half an onnx")
    # the killed export's lock file: its flock died with it
    lock_path(out).write_text(json.dumps({"pid": 999999, "host": "here"}) + "\n")
    rc = _export(runs["a"], out, tiny_npz_data)
    assert rc == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["tiny_cnn.fp32.json", "tiny_cnn.fp32.onnx"]
    assert not lock_path(out).exists()


def test_a_failed_export_removes_an_out_that_held_only_leftovers(
    runs, tiny_npz_data, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "out"
    (out / ".advedge-export-k1ll3d").mkdir(parents=True)
    _zero_fp32_tolerance(monkeypatch)
    rc = _export(runs["a"], out, tiny_npz_data)
    assert rc == 1, capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------ 6. one line
_FAULTY_SCRIPT = """
import sys
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
import advedge.calibration.sets as sets
from advedge.cli import main

# a model that passes the checker but that ONNX Runtime cannot run: a Reshape to [-1, 7]
rng = np.random.default_rng(0)
x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])
y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["A", "B"])
w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
shape = numpy_helper.from_array(np.array([-1, 7], np.int64), "shape")
unused = numpy_helper.from_array(np.zeros(2, np.float32), "unused")  # ORT warns about it
nodes = [
    helper.make_node("Conv", ["input", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
    helper.make_node("Reshape", ["c", "shape"], ["y"], name="reshape"),
]
graph = helper.make_graph(nodes, "g", [x], [y], [w, shape, unused])
onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), sys.argv[1])

as_float = sets.CalibrationSet.as_float
def noisy(self):
    np.float32(1.0) / np.float32(0.0)  # a numpy RuntimeWarning, as a degenerate range gives
    return as_float(self)
sets.CalibrationSet.as_float = noisy
sys.exit(main(sys.argv[2:]))
"""


def test_calibrate_error_stays_one_line_without_onnxruntime_logs_or_numpy_warnings(tmp_path):
    calib = random_calibration_set(32, size=8, classes=4)
    npz = save_calibration_set(calib, tmp_path / "calib.npz")
    model = tmp_path / "faulty.onnx"
    args = [
        str(model),
        "calibrate",
        "--onnx",
        str(model),
        "--data",
        str(npz),
        "--out",
        str(tmp_path / "q" / "q.onnx"),
        "--batch-size",
        "16",
        "--keep-fp32",
        "none",
        "--cache-dir",
        str(tmp_path / "cc"),
    ]
    env = {**os.environ, "ADVEDGE_LOG_LEVEL": "WARNING"}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_FAULTY_SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("error: ONNX Runtime failed to quantise")
    assert "\x1b[" not in proc.stderr and "RuntimeWarning" not in proc.stderr
    assert proc.stdout == ""
    assert not (tmp_path / "q").exists()


def test_export_routes_numpy_warnings_to_the_debug_log(
    runs, tiny_npz_data, tmp_path, capsys, monkeypatch
):
    import advedge.export.gates as gates

    compare = gates.compare_outputs

    def noisy(*args, **kwargs):
        np.float32(1.0) / np.float32(0.0)
        return compare(*args, **kwargs)

    monkeypatch.setattr(gates, "compare_outputs", noisy)
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append  # type: ignore[method-assign]
    log = logging.getLogger("advedge.export._deps")
    level = log.level
    log.setLevel(logging.DEBUG)
    log.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rc = _export(runs["a"], tmp_path / "out", tiny_npz_data)
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    assert rc == 0, capsys.readouterr().err
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert any("divide by zero" in r.getMessage() for r in records)


# ------------------------------------------------------------------------------ 7. full disk
def _full_disk(monkeypatch, module, name, when):
    real = getattr(module, name)

    def fake(*args, **kwargs):
        if when(*args):
            path = next((str(a) for a in args if isinstance(a, (str, os.PathLike))), None)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, fake)


def test_export_on_a_full_disk_names_the_file_and_keeps_earlier_artifacts(
    runs, tiny_npz_data, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "out"
    assert _export(runs["a"], out, tiny_npz_data) == 0
    before = _listing(out)
    _full_disk(monkeypatch, onnx, "save_model", lambda model, path, *a: ".fp16." in str(path))
    capsys.readouterr()
    rc = _export(runs["a"], out, tiny_npz_data, "--precision", "fp16")
    err = capsys.readouterr().err
    assert rc == 1, err
    line = _one_error_line(err)
    assert f"cannot write {out / 'tiny_cnn.fp16.onnx'}: the disk is full" in line
    assert _listing(out) == before  # the earlier fp32 intact, no partial fp16, no staging


def test_export_on_a_full_disk_leaves_no_new_folder(
    runs, tiny_npz_data, tmp_path, capsys, monkeypatch
):
    _full_disk(monkeypatch, onnx, "save_model", lambda model, path, *a: True)
    out = tmp_path / "new" / "out"
    rc = _export(runs["a"], out, tiny_npz_data)
    err = capsys.readouterr().err
    assert rc == 1 and "the disk is full" in _one_error_line(err)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("earlier", [True, False])
def test_calibrate_on_a_full_disk_names_the_file_and_keeps_the_earlier_one(
    calib_inputs, tmp_path, capsys, monkeypatch, earlier
):

    out = tmp_path / "new" / "q.int8.onnx"
    if earlier:
        assert _calibrate(calib_inputs["fp32"], calib_inputs["data"], out, tmp_path) == 0
    before = _listing(tmp_path / "new") if earlier else None
    target = out.parent.resolve()
    _full_disk(
        monkeypatch,
        shutil,
        "copyfile",
        lambda src, dst, *a: Path(dst).resolve().parent == target,
    )
    capsys.readouterr()
    rc = _calibrate(calib_inputs["fp32"], calib_inputs["data"], out, tmp_path)
    err = capsys.readouterr().err
    assert rc == 1, err
    assert f"cannot write {out}: the disk is full" in _one_error_line(err)
    if earlier:
        assert _listing(tmp_path / "new") == before
    else:
        assert not (tmp_path / "new").exists()


# ------------------------------------------------------------------------------ 8. all or nothing
def _fail_renaming_into(monkeypatch, folder: Path, name: str) -> None:
    """An I/O error when the new ``name`` is renamed into ``folder`` (the install step): after
    the renames before it. Atomic writes inside the staging folder are not touched."""
    real = os.replace
    target = folder.resolve()

    def replace(src, dst, *args, **kwargs):
        d = Path(os.fsdecode(dst))
        if d.name == name and d.parent.resolve() == target:
            raise OSError(errno.EIO, os.strerror(errno.EIO), os.fsdecode(src))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("name", ["tiny_cnn.fp32.onnx", "tiny_cnn.fp32.json"])
def test_overwrite_keeps_the_earlier_family_whole_when_the_install_fails(
    runs, tiny_npz_data, tmp_path, capsys, monkeypatch, name
):
    out = tmp_path / "out"
    assert _export(runs["b"], out, tiny_npz_data) == 0
    assert _export(runs["b"], out, tiny_npz_data, "--precision", "fp16") == 0
    before = _listing(out)  # model b: fp32 and fp16
    _fail_renaming_into(monkeypatch, out, name)
    capsys.readouterr()
    rc = _export(runs["a"], out, tiny_npz_data, "--overwrite")
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "input/output error" in _one_error_line(err)
    # nothing of model b was deleted before the renames; a rename done was undone
    assert _listing(out) == before
    monkeypatch.undo()
    rc = _export(runs["a"], out, tiny_npz_data, "--overwrite")
    assert rc == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["tiny_cnn.fp32.json", "tiny_cnn.fp32.onnx"]


def test_calibrate_keeps_the_earlier_model_and_sidecar_when_the_install_fails(
    calib_inputs, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "q" / "q.int8.onnx"
    assert _calibrate(calib_inputs["fp32"], calib_inputs["data"], out, tmp_path) == 0
    (out.parent / "q.int8.json").write_text('{"earlier": true}\n')  # told apart from a new one
    before = _listing(out.parent)
    _fail_renaming_into(monkeypatch, out.parent, "q.int8.json")  # after the .onnx was renamed
    capsys.readouterr()
    rc = _calibrate(calib_inputs["fp32"], calib_inputs["data"], out, tmp_path, "--n", "64")
    err = capsys.readouterr().err
    assert rc == 1, err
    assert f"cannot write {out.parent / 'q.int8.json'}" in _one_error_line(err)
    assert _listing(out.parent) == before  # the earlier .onnx beside its own sidecar

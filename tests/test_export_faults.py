"""Faults of ``advedge export`` and ``advedge calibrate`` found by a red team: one writer per
output, no mix of two models' artifacts, nothing left behind by a failure or a kill, the
external-data guard inside ONNX local functions, one-line errors, and a full disk."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch
from advedge.export.graph import check_external_data, check_onnx
from advedge.export.onnx_export import export_onnx
from onnx import TensorProto, helper

from advedge.checkpoint import save_model
from advedge.cli import main
from advedge.errors import ExportError
from advedge.models import create_model

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
        "--attack-steps",
        "2",
        *extra,
    )


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

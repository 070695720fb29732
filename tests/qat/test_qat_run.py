"""``advedge qat`` end to end on tiny data: the PTQ export, the epochs, the checked INT8 file with
its metadata and label, resuming a run cut short, and the command's one-line refusals."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch
from advedge.calibration.nodes import qdq_edges, verify_qdq
from advedge.export.graph import read_onnx_metadata
from advedge.export.runtime.labels import artifact_label
from advedge.export.runtime.onnxruntime import OrtRunner
from conftest import argv, train_tiny
from onnx import numpy_helper

from advedge.cli import main
from advedge.errors import UsageError
from advedge.qat import QatConfig, run_qat
from advedge.training.engine import TrainCallbacks
from advedge.utils import sha256_file

TINY = {
    "epochs": 2,
    "subset": 64,
    "batch_size": 32,
    "steps": 1,
    "eval_n": 16,
    "eval_steps": 1,
    "parity_n": 64,
    "calib_n": 32,
    "calib_method": "minmax",
    "device": "cpu",
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_npz_data) -> dict[str, Path]:
    """A tiny teacher and student, and INT8 exports of both (TensorRT form) and of the student in
    ONNX Runtime's CPU form."""
    root = tmp_path_factory.mktemp("qat_runs")
    out = {
        "teacher": train_tiny(tiny_npz_data, root / "teacher"),
        "student": train_tiny(tiny_npz_data, root / "student", seed=1),
    }
    for name, extra in (
        ("student", {}),
        ("teacher", {}),
        ("cpu", {"int8_target": "onnxruntime-cpu"}),
    ):
        model = out["teacher" if name == "teacher" else "student"]
        code = main(
            argv(
                "export", model=str(model), out=str(root / f"x_{name}"), precision="int8",
                data=str(tiny_npz_data), calib_n=32, calib_method="minmax", parity_n=16,
                report_n=16, **extra,
            )
        )  # fmt: skip
        assert code == 0
        out[f"ptq_{name}"] = next((root / f"x_{name}").glob("*.int8*.onnx"))
    return out


class _StopInSecondEpoch(TrainCallbacks):
    def on_batch_end(self, *, epoch: int, batch: int, loss: float, acc: float) -> None:
        if epoch == 1:
            raise KeyboardInterrupt


def test_qat_writes_a_checked_int8_file_and_resumes(tmp_path, tiny_npz_data, runs):
    out = tmp_path / "qat"
    cfg = QatConfig(
        student=str(runs["student"]),
        teacher=str(runs["teacher"]),
        data=str(tiny_npz_data),
        out=str(out),
        **TINY,
    )
    with pytest.raises(KeyboardInterrupt):
        run_qat(cfg, callbacks=_StopInSecondEpoch())
    qat_file, ptq = out / "tiny_cnn.int8-qat.onnx", out / "ptq" / "tiny_cnn.int8.onnx"
    assert qat_file.is_file() and ptq.is_file()  # epoch 1's file, checked and installed
    assert read_onnx_metadata(qat_file)["qat"]["epochs"] == 1
    assert not list(out.glob(".*.tmp"))  # no staged file left behind

    result = run_qat(cfg, resume=True)
    assert result.resumed_from == 1 and [r["epoch"] for r in result.metrics] == [1, 2]
    assert result.artifact == qat_file and result.ptq == ptq
    assert set(result.baseline) >= {"test_clean_acc", "artifact_clean_acc", "parity_agreement"}
    meta = read_onnx_metadata(qat_file)
    assert meta["precision"] == "int8" and meta["quantisation"] == "qat"
    assert meta["int8_target"] == "tensorrt"
    assert meta["qat"]["epochs"] == 2 and meta["qat"]["method"] == "add"
    assert meta["qat"]["ptq_sha256"] == sha256_file(ptq)
    assert meta["qat"]["teacher_sha256"] == sha256_file(runs["teacher"] / "model.safetensors")
    assert meta["source_sha256"] == sha256_file(runs["student"] / "model.safetensors")

    written, before = onnx.load(str(qat_file)), onnx.load(str(ptq))
    assert verify_qdq(written) == verify_qdq(before)
    assert qdq_edges(written) == qdq_edges(before)
    old = {i.name: numpy_helper.to_array(i) for i in before.graph.initializer}
    new = {i.name: numpy_helper.to_array(i) for i in written.graph.initializer}
    changed = {k for k in old if not (old[k] == new[k]).all()}
    assert any(k.endswith("weight") for k in changed)  # trained
    assert all(old[k].dtype.kind == "f" for k in changed)  # zero points untouched
    side = json.loads(qat_file.with_suffix(".json").read_text())
    assert side["sha256"] == sha256_file(qat_file) and side["parity"]["n"] == 64
    assert max(side["parity"]["agreement"], side["parity"]["agreement_ort_bias_rounding"]) >= 0.995
    rows = (out / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3 and "artifact_clean_acc" in rows[0]

    # the label bench, the report and the pipeline show, beside the PTQ file's
    assert OrtRunner(qat_file).info.quantisation == "qat"
    assert artifact_label(OrtRunner(qat_file).info, "x") == "tiny_cnn int8-qat onnxruntime"
    assert artifact_label(OrtRunner(ptq).info, "x") == "tiny_cnn int8 onnxruntime"

    with pytest.raises(UsageError, match="already holds a training run"):
        run_qat(cfg)
    changed_cfg = QatConfig(**{**cfg.to_dict(), "lr": 0.01})
    with pytest.raises(UsageError, match=r"options differ .*lr"):
        run_qat(changed_cfg, resume=True)


def test_qat_from_a_given_ptq_file_and_its_state(tmp_path, tiny_npz_data, runs):
    out = tmp_path / "qat"
    cfg = QatConfig(
        student=str(runs["student"]),
        teacher=str(runs["teacher"]),
        data=str(tiny_npz_data),
        out=str(out),
        ptq=str(runs["ptq_student"]),
        **{**TINY, "epochs": 1},
    )
    result = run_qat(cfg)
    assert result.ptq == out / "ptq" / runs["ptq_student"].name
    assert sha256_file(result.ptq) == sha256_file(runs["ptq_student"])
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["epoch"] == 1 and state["ptq"]["sha256"] == sha256_file(result.ptq)
    result.ptq.write_bytes(b"changed")  # a resumed run reads the file it started from, or none
    with pytest.raises(UsageError, match="PTQ file it started from is missing or changed"):
        run_qat(cfg, resume=True)


def test_the_fp32_control_run_writes_an_int8_ft_file(tmp_path, tiny_npz_data, runs, capsys):
    """--no-fake-quant: the same fine-tune in FP32, written back through the same checks, with a
    label of its own."""
    out = tmp_path / "ft"
    code = main(
        argv(
            "qat", student=str(runs["student"]), teacher=str(runs["teacher"]),
            data=str(tiny_npz_data), out=str(out), ptq=str(runs["ptq_student"]),
            no_fake_quant=True, json=True,
            **{k: v for k, v in TINY.items() if k not in ("calib_n", "calib_method", "eval_steps")},
        )
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    doc = json.loads(captured.out)
    assert doc["schema"] == "advedge.qat/1"
    assert doc["artifact"] == str(out / "tiny_cnn.int8-ft.onnx") and len(doc["metrics"]) == 2
    meta = read_onnx_metadata(out / "tiny_cnn.int8-ft.onnx")
    assert meta["quantisation"] == "ft" and meta["qat"]["fake_quant"] is False
    info = OrtRunner(out / "tiny_cnn.int8-ft.onnx").info
    assert artifact_label(info, "x") == "tiny_cnn int8-ft onnxruntime"
    assert verify_qdq(onnx.load(str(out / "tiny_cnn.int8-ft.onnx")))


def test_qat_command_refuses_bad_input_in_one_line(tmp_path, tiny_npz_data, runs, cli_error):
    base = {
        "student": runs["student"],
        "teacher": runs["teacher"],
        "data": tiny_npz_data,
        "out": tmp_path / "o",
    }
    cases = [
        ({"ptq": runs["ptq_teacher"]}, 2, "exported from another checkpoint than --student"),
        ({"ptq": runs["ptq_cpu"]}, 2, "onnxruntime-cpu form"),
        ({"ptq": tmp_path / "none.onnx"}, 2, "does not exist"),
        ({"ptq": runs["ptq_student"], "calib_mix_adv": 0.5}, 2, "pass one of them"),
        ({"schedule": "multistep"}, 2, "choose cosine or constant"),
        ({"lr": 0}, 2, "lr must be > 0"),
        ({"method": "adda"}, 2, "unknown distillation method 'adda'"),
        ({"epochs": 0}, 2, "epochs must lie in"),
        ({"student": tmp_path / "nothing"}, 1, "checkpoint not found"),
    ]
    for extra, code, message in cases:
        got, line = cli_error("qat", **{**base, **extra})
        assert (got, message in line) == (code, True), (extra, line)
        assert not (tmp_path / "o").exists()


def test_qat_help_names_its_options(capsys):
    assert main(["qat", "--help"]) == 0
    text = capsys.readouterr().out
    for option in ("--student", "--teacher", "--ptq", "--calib-mix-adv", "--parity-n", "--resume"):
        assert option in text

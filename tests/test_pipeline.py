"""advedge pipeline: every stage runs once, reruns skip finished stages, a config change reruns
only what depends on it (tiny models and data; the real-data quick preset is in the README)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import argv

from advedge.cli import main
from advedge.errors import UsageError
from advedge.pipeline import STAGES, load_preset

TINY = {
    "teacher_model": "tiny_cnn",
    "teacher_epochs": 1,
    "teacher_steps": 1,
    "student_model": "tiny_cnn",
    "student_epochs": 1,
    "student_steps": 1,
    "subset": 64,
    "batch_size": 32,
    "purifier_epochs": 1,
    "purifier_width": 4,
    "purifier_steps": 1,
    "calib_n": 32,
    "parity_n": 16,
    "report_n": 16,
    "bench_n": 16,
    "bench_batch_sizes": [1, 8],
    "bench_warmup": 1,
    "bench_iters": 2,
    "query_n": 4,
    "n_queries": 4,
    "device": "cpu",
}


def _run(tmp_path: Path, data: Path, cfg: dict, capsys) -> dict:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    rc = main(
        argv("pipeline", data=str(data), out=str(tmp_path / "p"), config=str(path), json=True)
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return json.loads(captured.out)


def test_pipeline_runs_skips_and_reruns_downstream(tmp_path, tiny_npz_data, capsys):
    first = _run(tmp_path, tiny_npz_data, TINY, capsys)
    assert list(first["stages"]) == list(STAGES)
    assert not any(s["skipped"] for s in first["stages"].values())
    out = tmp_path / "p"
    for f in (
        "teacher/model.safetensors",
        "student/model.safetensors",
        "purifier/purifier.safetensors",
        "export/student/tiny_cnn.int8.onnx",
        "export/fused/tiny_cnn-purified.fp16.onnx",
        "bench/bench.json",
        "report/report.md",
        "report/pareto.png",
        "report/training.png",
    ):
        assert (out / f).is_file(), f
    bench = json.loads((out / "bench/bench.json").read_text())
    names = {r["name"] for r in bench["results"]}
    assert {"student", "tiny_cnn.int8.onnx", "tiny_cnn-purified.int8.onnx"} <= names
    assert all("worst_case_acc" in r["robust"] for r in bench["results"])

    again = _run(tmp_path, tiny_npz_data, TINY, capsys)
    assert all(s["skipped"] for s in again["stages"].values())

    changed = _run(tmp_path, tiny_npz_data, {**TINY, "bench_iters": 3}, capsys)
    skipped = {k for k, s in changed["stages"].items() if s["skipped"]}
    assert skipped == {"teacher", "student", "purifier", "export"}

    # a lost stage record (a run killed during the report) redoes only that stage
    (out / ".pipeline" / "report.json").unlink()
    last = _run(tmp_path, tiny_npz_data, {**TINY, "bench_iters": 3}, capsys)
    assert {k for k, s in last["stages"].items() if not s["skipped"]} == {"report"}


def test_pipeline_config_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher_epoch: 3\n")
    with pytest.raises(UsageError, match="did you mean 'teacher_epochs'"):
        load_preset("quick", str(bad))
    with pytest.raises(UsageError, match="unknown preset"):
        load_preset("fastest")
    assert load_preset("full").subset is None

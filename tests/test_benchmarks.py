"""The distillation study script end to end on a tiny dataset: plumbing, tables, reuse."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _study(tmp_path: Path, data: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable,
        str(BENCH / "distill_study.py"),
        "--data",
        str(data),
        "--runs",
        str(tmp_path / "runs"),
        "--results",
        str(tmp_path / "results"),
        "--epochs",
        "1",
        "--teacher-epochs",
        "1",
        "--subset",
        "40",
        "--eval-n",
        "12",
        "--suite-n",
        "6",
        *extra,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=BENCH)


def test_distill_study_runs_reuses_and_tabulates(tmp_path):
    from conftest import write_npz_dataset

    data = write_npz_dataset(tmp_path / "data", n_train=40, n_test=12, size=32)
    proc = _study(tmp_path, data, "--only", "natural,dd,add")
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads((tmp_path / "results" / "distill_mini.json").read_text())
    rows = payload["rows"]
    assert [(r["role"], r["method"]) for r in rows] == [
        ("teacher", "pgd-at"),
        ("student", "natural"),
        ("student", "dd"),
        ("student", "add"),
    ]
    for r in rows:
        # Both on the first suite_n images; the worst case also counts PGD-20 and CW-20.
        assert 0 <= r["worst_case"] <= r["standard"] <= r["clean_suite_n"]
        assert r["params_m"] > 0 and r["mflops"] > 0 and r["train_seconds"] > 0
    table = (tmp_path / "results" / "distill_mini.md").read_text()
    assert "| resnet20 (teacher) | pgd-at |" in table and "worst case" in table
    # The add run is named by its settings, so the sweep and the study share it.
    assert (tmp_path / "runs" / "resnet8_add_t1_a0.833" / "model.safetensors").exists()
    # A rerun reuses every finished run and evaluation: the numbers do not move.
    again = _study(tmp_path, data, "--only", "natural,dd,add")
    assert again.returncode == 0, again.stderr[-3000:]
    rows2 = json.loads((tmp_path / "results" / "distill_mini.json").read_text())["rows"]
    assert [(r["train_seconds"], r["worst_case"]) for r in rows2] == [
        (r["train_seconds"], r["worst_case"]) for r in rows
    ]
    assert "trained" not in again.stderr

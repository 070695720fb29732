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
    assert "| resnet20 (teacher) | pgd-at |" in table and "worst case [95% CI]" in table
    # ADD at its defaults trains bit for bit as RSLAD: the study reuses the RSLAD run.
    assert rows[3]["same_run_as"] == "rslad"
    assert (tmp_path / "runs" / "resnet8_rslad" / "model.safetensors").exists()
    assert not (tmp_path / "runs" / "resnet8_add_t1_a0.833").exists()
    # Every pair has an exact McNemar test on the same images.
    tests = payload["mcnemar"]
    assert len(tests) == 6 and all(0 <= t["p_value"] <= 1 and t["n"] == 6 for t in tests)
    assert "| add | natural |" not in table and "exact McNemar" in table
    # A rerun reuses every finished run and evaluation: the numbers do not move.
    again = _study(tmp_path, data, "--only", "natural,dd,add")
    assert again.returncode == 0, again.stderr[-3000:]
    rows2 = json.loads((tmp_path / "results" / "distill_mini.json").read_text())["rows"]
    assert [(r["train_seconds"], r["worst_case"]) for r in rows2] == [
        (r["train_seconds"], r["worst_case"]) for r in rows
    ]
    assert "trained" not in again.stderr


def test_add_sweep_selects_on_a_validation_split_outside_the_training_subset(tmp_path):
    from conftest import write_npz_dataset

    data = write_npz_dataset(tmp_path / "data", n_train=60, n_test=12, size=32)
    proc = _study(tmp_path, data, "--sweep", "--n-val", "12")
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads((tmp_path / "results" / "distill_sweep_mini.json").read_text())
    assert payload["settings"]["n_val"] == 12
    adds = [r for r in payload["rows"] if r["method"] == "add"]
    assert len(adds) == 6 and sum(bool(r.get("selected")) for r in adds) == 1
    chosen = next(r for r in adds if r.get("selected"))
    sel = payload["selected"]
    assert (sel["temperature"], sel["alpha"]) == (chosen["temperature"], chosen["alpha"])
    # The best on validation replaces the default (tau 1, 5/6) only beyond chance.
    if (chosen["temperature"], chosen["alpha"]) != (1.0, 0.8333):
        assert sel["p_value"] < 0.05
    assert all(len(r["val_worst_flags"]) == 12 for r in adds)
    assert "exact McNemar" in (tmp_path / "results" / "distill_sweep_mini.md").read_text()
    # Scored on validation images only: no test-set evaluation was made for the sweep.
    for r in payload["rows"]:
        assert "clean" not in r and 0 <= r["val_worst"] <= r["val_clean"] <= 1
        assert not (Path(r["run"]) / "study_eval.json").exists()


def test_select_add_replaces_the_default_only_beyond_chance():
    sys.path.insert(0, str(BENCH))
    from distill_study import select_add

    def row(tau: float, alpha: float, flags: str) -> dict:
        return {
            "temperature": tau,
            "alpha": alpha,
            "val_worst": flags.count("1") / len(flags),
            "val_clean": 0.5,
            "val_worst_flags": flags,
        }

    default = "1" * 10 + "0" * 90
    close = row(2.0, 0.9, "1" * 12 + "0" * 88)  # 2 more images: chance
    chosen = select_add([row(1.0, 0.8333, default), close], 1.0, 5 / 6)
    assert (chosen["temperature"], chosen["alpha"]) == (1.0, 0.8333)
    assert chosen["selection"]["p_value"] == 0.5 and not close.get("selected")
    far = row(4.0, 0.9, "1" * 30 + "0" * 70)  # 20 more images, none fewer: p ~ 2e-6
    chosen = select_add([row(1.0, 0.8333, default), far], 1.0, 5 / 6)
    assert chosen is far and chosen["selection"]["p_value"] < 1e-5

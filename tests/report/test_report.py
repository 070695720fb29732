"""advedge report: the table, report.json, the Pareto and training plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import robust_flags, run_bench
from fakes.artifacts import classifier_artifacts

from advedge.cli import main
from advedge.report import md_escape, pareto_front

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def arts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("report")
    out = {}
    out["run_a"], out["onnx_a"] = classifier_artifacts(root, "a", 0)
    return out


def test_pareto_front():
    pts = [(1.0, 0.2), (2.0, 0.5), (3.0, 0.4), (0.5, 0.1), (2.0, 0.3)]
    assert pareto_front(pts) == [3, 0, 1]


def test_report_writes_table_json_and_pngs(arts, tiny_npz_data, tmp_path, capsys):
    bench_dir = tmp_path / "bench"
    assert (
        run_bench(
            [arts["onnx_a"], arts["run_a"]],
            tiny_npz_data,
            batch_sizes="1,8",
            warmup="1",
            iters="3",
            n="16",
            **robust_flags(arts["run_a"], 4, 5, 2),
            out=str(bench_dir),
        )
        == 0
    )
    capsys.readouterr()
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text(
        "epoch,train_loss,test_clean_acc,test_pgd_acc\n1,2.0,0.3,0.1\n2,1.5,0.4,0.2\n"
    )
    out = tmp_path / "report"
    rc = main(["report", str(bench_dir), str(run), "--out", str(out), "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    doc = json.loads(captured.out)
    rows = {r["artifact"]: r for r in doc["rows"]}
    assert rows["a.fp32.onnx"]["worst_case_kinds"] == ["query", "transfer", "white-box-artifact"]
    assert rows["run_a"]["worst_case_kinds"] == ["query", "white-box"]  # crafted on itself
    bench_rows = {
        r["name"]: r for r in json.loads((bench_dir / "bench.json").read_text())["results"]
    }
    for name in ("a.fp32.onnx", "run_a"):  # the sha256 as bench wrote it, not JSON in a string
        assert rows[name]["source_sha256"] == bench_rows[name]["robust"]["source_sha256"]
        assert len(rows[name]["source_sha256"]) == 64
    assert set(doc["pareto_front"]) <= {"a.fp32.onnx", "run_a"} and doc["pareto_front"]
    (ships,) = doc["robustness_of_what_ships"]
    assert ships["artifact"] == "a.fp32.onnx" and ships["parent"] == "run_a"
    assert ships["white_box_parent_acc"] == rows["run_a"]["worst_case_transfer_acc"]
    assert ships["precision_gap"] is False  # the FP32 ONNX is the same model: same figure
    md = (out / "report.md").read_text()
    label = md_escape(bench_rows["a.fp32.onnx"].get("label", "a.fp32.onnx"))  # bench/2 names it
    assert f"| {label} | fp32 | no |" in md and "## Training runs" in md
    assert doc["schema"] == "advedge.report/2" and doc["threat_model"]["summary"]
    assert md.splitlines()[2] == f"Threat model: {md_escape(doc['threat_model']['summary'])}."
    for row in doc["rows"]:  # every accuracy with its 95% interval around it
        lo, hi = row["clean_acc_ci95"]
        assert lo <= row["clean_acc"] <= hi
    assert "## Robustness of what ships" in md
    for png in ("pareto.png", "training.png"):
        assert (out / png).read_bytes()[:8] == PNG and (out / png).stat().st_size > 5000
    rc = main(["report", str(tmp_path / "nothing"), "--out", str(out)])
    assert rc == 2 and "neither a bench directory" in capsys.readouterr().err

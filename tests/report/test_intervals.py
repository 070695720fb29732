"""advedge report's numbers: 95% intervals, the exact McNemar test, the distinguishability
sentence, the threat model and the latency warnings, for bench.json v1 and v2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from report_docs import artifact, bench_doc, many, write_bench

from advedge.cli import main
from advedge.report import build_report, mcnemar_exact
from advedge.report.analysis import discordant
from advedge.stats import wilson_interval


def _report(tmp_path: Path, doc: dict, name: str = "r") -> tuple[dict, str]:
    bench = write_bench(tmp_path / f"bench-{name}", doc)
    out = tmp_path / name
    result = build_report([bench], out)
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(result))
    return result, (out / "report.md").read_text()


@pytest.mark.parametrize(
    ("b01", "b10", "p"),
    [
        (0, 5, 2 * 0.5**5),  # 0.0625: the one-sided tail is 1/32
        (5, 0, 0.0625),  # symmetric
        (0, 0, 1.0),  # no discordant pair: nothing tells them apart
        (1, 4, 2 * (1 + 5) / 2**5),  # 0.375
        (0, 6, 2 / 2**6),  # 0.03125: significant
        (2, 10, 2 * (1 + 12 + 66) / 2**12),  # 0.0386
        (5, 5, 1.0),  # 2 * 638/1024 > 1 is capped
        (1, 1, 1.0),
    ],
)
def test_mcnemar_exact_matches_hand_worked_cases(b01, b10, p):
    assert mcnemar_exact(b01, b10) == pytest.approx(p, rel=1e-12)


def test_mcnemar_refuses_negative_counts_and_discordant_counts_pairs():
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 3)
    assert discordant("1100", "1010") == (1, 1)
    assert discordant("0000", "1111") == (4, 0)  # only b right: b01
    with pytest.raises(ValueError):
        discordant("01", "011")


def test_every_accuracy_carries_its_interval_in_md_and_json(tmp_path):
    clean = "1" * 91 + "0" * 109  # 45.5% of 200: Wilson [38.7, 52.4]
    worst = "1" * 38 + "0" * 162  # 19.0%: [14.2, 25.0]
    doc, md = _report(tmp_path, bench_doc([artifact(0, clean=clean, worst=worst)]))
    (row,) = doc["rows"]
    assert row["clean_acc"] == 0.455 and row["clean_acc_ci95"] == pytest.approx(
        list(wilson_interval(91, 200))
    )
    assert row["worst_case_acc_ci95"] == pytest.approx(list(wilson_interval(38, 200)))
    assert all(a["robust_acc_ci95"] for a in row["attacks"])
    assert "| 45.5 [38.7, 52.4] | 19.0 [14.2, 25.0] \\[query, transfer\\] |" in md
    assert "_clean_flags" not in row and "clean_flags" not in row  # flags stay out of the json
    assert doc["schema"] == "advedge.report/2"


def test_v1_intervals_are_derived_from_the_accuracy_and_its_n(tmp_path):
    clean = "1" * 91 + "0" * 109
    entry = artifact(0, clean=clean, schema=1)
    assert "clean_acc_ci95" not in entry and "label" not in entry
    doc, md = _report(tmp_path, bench_doc([entry], schema=1))
    (row,) = doc["rows"]
    assert row["clean_acc_ci95"] == pytest.approx(list(wilson_interval(91, 200)))
    assert row["label"] == row["artifact"] == "m0.fp32.onnx"
    assert "| 1 | m0.fp32.onnx | fp32 | no |" in md and "45.5 [38.7, 52.4]" in md


def test_without_n_an_accuracy_shows_no_interval(tmp_path):
    entry = artifact(0, schema=1)
    del entry["n"]
    doc = bench_doc([entry], schema=1)
    del doc["settings"], doc["data"]
    result, md = _report(tmp_path, doc)
    assert result["rows"][0]["clean_acc_ci95"] is None
    assert f"| {100 * entry['clean_acc']:.1f} |" in md  # the bare percent, no brackets
    assert result["threat_model"]["summary"].startswith("not recorded")


def _two(worst_a: str, worst_b: str, **kw: object) -> dict:
    """Artifact 1 (int8, faster) and artifact 2 (fp32, slower): 1 dominates 2 when it is at
    least as robust."""
    clean = "1" * 200
    return bench_doc(
        [
            artifact(0, p50=0.1, clean=clean, worst=worst_a, precision="int8", **kw),
            artifact(1, p50=0.2, clean=clean, worst=worst_b, precision="fp32", **kw),
        ],
        schema=kw.get("schema", 2),
    )


def test_a_one_image_lead_on_the_front_is_not_distinguishable(tmp_path):
    # INT8 sits on the front by one image in 200: 1 discordant pair, p = 1
    a = "1" * 39 + "0" * 161
    b = "1" * 38 + "0" * 162
    doc, md = _report(tmp_path, _two(a, b))
    assert doc["pareto_front"] == ["m0.int8.onnx"]
    (pair,) = doc["distinguishability"]
    assert pair["a"] == "m0.int8.onnx" and pair["b"] == "m1.fp32.onnx"
    assert pair["relation"] == "dominates" and pair["method"] == "mcnemar-exact"
    assert pair["discordant"] == [1, 0] and pair["p_value"] == 1.0
    assert pair["distinguishable"] is False
    assert "not distinguishable at n = 200 (p = 1)" in pair["text"]
    assert "| 1 m0 int8 onnxruntime | 2 m1 fp32 onnxruntime | dominates | 19.5 vs 19.0 | " in md
    assert "not distinguishable at n = 200 \\(p = 1\\)" in md
    assert "Exact McNemar test" in md


def test_a_ten_image_lead_is_distinguishable(tmp_path):
    a = "1" * 48 + "0" * 152
    b = "1" * 38 + "0" * 162  # the same 38 survive both: 10 discordant, all for a
    doc, md = _report(tmp_path, _two(a, b))
    (pair,) = doc["distinguishability"]
    assert pair["p_value"] == pytest.approx(2 / 2**10)
    assert (
        pair["distinguishable"] is True and pair["text"] == "distinguishable at n = 200 (p = 0.002)"
    )
    assert "| distinguishable at n = 200 \\(p = 0.002\\) |" in md


def test_consecutive_front_members_are_compared(tmp_path):
    # 1 fast and less robust, 2 slower and more robust: both on the front, 3 dominated by 2
    results = [
        artifact(0, p50=0.1, worst="1" * 30 + "0" * 170),
        artifact(1, p50=0.2, worst="1" * 60 + "0" * 140),
        artifact(2, p50=0.3, worst="1" * 58 + "0" * 142),
    ]
    doc, _ = _report(tmp_path, bench_doc(results))
    pairs = {(p["a"], p["b"], p["relation"]): p for p in doc["distinguishability"]}
    assert set(pairs) == {
        ("m0.fp32.onnx", "m1.fp16.onnx", "next on the front"),
        ("m1.fp16.onnx", "m2.int8.onnx", "dominates"),
    }
    assert pairs[("m0.fp32.onnx", "m1.fp16.onnx", "next on the front")]["distinguishable"]
    assert not pairs[("m1.fp16.onnx", "m2.int8.onnx", "dominates")]["distinguishable"]


def test_without_flags_the_pairs_fall_back_to_overlapping_intervals(tmp_path):
    a = "1" * 39 + "0" * 161
    b = "1" * 38 + "0" * 162
    doc, md = _report(tmp_path, _two(a, b, schema=1))
    (pair,) = doc["distinguishability"]
    assert pair["method"] == "wilson-overlap" and "p_value" not in pair
    assert pair["distinguishable"] is False
    assert pair["text"] == "not distinguishable at n = 200 (95% intervals overlap)"
    assert "compared by its 95% Wilson intervals instead" in md and "Exact McNemar" not in md
    far, _ = _report(tmp_path, _two("1" * 150 + "0" * 50, b, schema=1), name="far")
    assert (
        far["distinguishability"][0]["text"] == "distinguishable at n = 200 (95% intervals apart)"
    )


def test_rows_of_two_benches_are_not_paired_image_by_image(tmp_path):
    a = write_bench(tmp_path / "a", bench_doc([artifact(0, p50=0.1, worst="1" * 39 + "0" * 161)]))
    b = write_bench(tmp_path / "b", bench_doc([artifact(1, p50=0.2, worst="1" * 38 + "0" * 162)]))
    doc = build_report([a, b], tmp_path / "r")
    (pair,) = doc["distinguishability"]
    assert pair["method"] == "wilson-overlap"


def test_the_threat_model_of_a_v2_bench_is_stated_in_md_and_json(tmp_path):
    doc, md = _report(tmp_path, many(3))
    summary = doc["threat_model"]["summary"]
    assert summary.startswith("Linf eps 8/255, n = 200")
    assert doc["threat_model"]["query"] == {"name": "square", "budget": "5000 queries"}
    assert md.splitlines()[2].startswith("Threat model: Linf eps 8/255, n = 200, seed 0")


def test_the_threat_model_of_a_v1_bench_is_derived_from_its_settings(tmp_path):
    entry = artifact(0, schema=1)
    entry["robust"]["attacks"] = [
        {"name": "apgd-ce", "kind": "transfer", "n": 200, "robust_acc": 0.3},
        {"name": "pgd20", "kind": "transfer", "n": 200, "robust_acc": 0.35},
        {"name": "square", "kind": "query", "n": 200, "robust_acc": 0.3},
    ]
    doc, md = _report(tmp_path, bench_doc([entry], schema=1))
    tm = doc["threat_model"]
    assert tm["norm"] == "Linf" and tm["eps_text"] == "8/255" and tm["n"] == 200
    assert tm["seed"] == 0 and tm["derived_from"] == "advedge.bench/1 settings"
    assert [a["name"] for a in tm["transfer"]] == ["APGD-CE", "PGD-20"]
    assert tm["transfer"][1]["budget"] == "20 steps"
    assert tm["query"] == {"name": "Square", "budget": "300 queries"}
    assert tm["summary"] == (
        "Linf, eps = 8/255, n = 200 test images, seed 0; transfer from the FP32 PyTorch parent: "
        "APGD-CE (50 iterations), PGD-20 (20 steps); query on each artifact: Square (300 queries) "
        "on the first 200"
    )
    assert "Threat model: Linf, eps = 8/255, n = 200 test images, seed 0" in md.splitlines()[2]


def test_a_bench_without_robust_states_no_threat_model(tmp_path):
    doc, md = _report(tmp_path, many(2, robust=False))
    assert doc["threat_model"] is None and doc["pareto_metric"] == "clean_acc"
    assert md.splitlines()[2] == (
        "Threat model: none (the bench ran without --robust): clean accuracy only."
    )
    assert "| - |" in md  # no worst-case figure
    assert doc["files"]["pareto"].endswith("pareto.png")  # a plot all the same


def test_a_latency_warning_is_marked_with_a_footnote_and_the_load(tmp_path):
    doc, md = _report(tmp_path, many(3))
    rows = {r["artifact"]: r for r in doc["rows"]}
    assert rows["m2.int8.onnx"]["latency_warnings"] == [
        {"batch": 1, "warning": "high variation (cv 0.40 > 0.15): the machine was busy"}
    ]
    assert rows["m0.fp32.onnx"]["latency_warnings"] == []
    table = [line for line in md.splitlines() if line.startswith("| 3 |")]
    assert len(table) == 1 and "| 276 † |" in table[0]
    assert "| 0.1 |" in next(line for line in md.splitlines() if line.startswith("| 1 |"))
    assert "- 3 m2 int8 onnxruntime: batch 1: high variation \\(cv 0.40 &gt; 0.15\\)" in md
    assert (
        "load average (1, 5, 15 min) before 2.50, 1.25, 0.50; after 3.00, 1.50, 0.75; threads 2"
        in md
    )
    assert "Other warnings of the bench" not in md  # the bench's copy of the same warning
    assert doc["benches"][0]["load_before"] == [2.5, 1.25, 0.5]


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda e: e.update(clean_flags="01x"), "clean_flags is not a string of '0' and '1'"),
        (lambda e: e.update(clean_flags="0101"), "holds 4 flags for n = 200 images"),
        (lambda e: e.update(clean_acc=1.5), "clean_acc 1.5 is not a fraction in [0, 1]"),
        (lambda e: e.update(clean_acc_ci95=[0.9, 0.1]), "is not [lo, hi] within [0, 1]"),
        (lambda e: e.update(clean_acc_ci95=[0.1, 0.2]), "lies outside its 95% interval"),
        (lambda e: e["robust"].update(worst_case_flags=7), "worst_case_flags is not a string"),
    ],
)
def test_a_malformed_v2_field_is_one_line(tmp_path, capsys, change, needle):
    entry = artifact(0)
    change(entry)
    bench = write_bench(tmp_path / "bench", bench_doc([entry]))
    rc = main(["report", str(bench), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1, err
    assert needle in err[0] and "m0.fp32.onnx" in err[0]
    assert not (tmp_path / "r").exists()


def test_an_unknown_bench_schema_is_one_line(tmp_path, capsys):
    doc = bench_doc([artifact(0)])
    doc["schema"] = "advedge.bench/9"
    bench = write_bench(tmp_path / "bench", doc)
    rc = main(["report", str(bench), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "'advedge.bench/9'" in err[0]

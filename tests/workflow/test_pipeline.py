"""advedge pipeline: every stage runs once, reruns skip finished stages, a config change reruns
only what depends on it (tiny models and data; the real-data quick preset is in the README)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import argv, train_tiny

from advedge.cli import main
from advedge.errors import UsageError
from advedge.workflow import STAGES, load_preset

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
    "n_iter": 2,
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
    assert first["schema"] == "advedge.pipeline/1"  # a file format: the name predates workflow/
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


# --- Nothing lost, nothing stale (the reliability issue, section 2). -----------------------------


def _run_rc(tmp_path: Path, data: Path, cfg: dict, capsys) -> tuple[int, str]:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    rc = main(argv("pipeline", data=str(data), out=str(tmp_path / "p"), config=str(path)))
    return rc, capsys.readouterr().err


def _teacher_files(out: Path) -> dict[str, bytes]:
    return {f: (out / "teacher" / f).read_bytes() for f in ("model.safetensors", "state.pt")}


@pytest.fixture(scope="module")
def _finished_once(tmp_path_factory, tiny_npz_data) -> Path:
    root = tmp_path_factory.mktemp("finished")
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump(TINY))
    assert main(argv("pipeline", data=str(tiny_npz_data), out=str(root / "p"), config=path)) == 0
    return root / "p"


@pytest.fixture
def finished_pipeline(tmp_path, _finished_once) -> Path:
    """A finished tiny pipeline in ``tmp_path/p`` (one run per module, copied per test)."""
    import shutil

    out = tmp_path / "p"
    shutil.copytree(_finished_once, out)
    return out


def test_a_copied_out_is_still_up_to_date(tmp_path, tiny_npz_data, capsys, finished_pipeline):
    assert (
        str(finished_pipeline.parent)
        not in (finished_pipeline / ".pipeline/bench.json").read_text()
    )
    again = _run(tmp_path, tiny_npz_data, TINY, capsys)
    assert all(s["skipped"] for s in again["stages"].values())


def test_bad_data_or_option_on_rerun_deletes_nothing(
    tmp_path, tiny_npz_data, capsys, finished_pipeline
):
    before = _teacher_files(finished_pipeline)
    records = sorted((finished_pipeline / ".pipeline").iterdir())
    # a mistyped --data with changed options: refused before any stage is touched
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({**TINY, "teacher_epochs": 2}))
    rc = main(
        argv("pipeline", data=str(tmp_path / "no-such"), out=str(finished_pipeline), config=path)
    )
    err = capsys.readouterr().err
    assert rc == 1 and "redoing" not in err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")  # no progress bar
    # a value of the wrong type: a usage error, nothing touched
    rc, err = _run_rc(tmp_path, tiny_npz_data, {**TINY, "teacher_epochs": "2"}, capsys)
    assert rc == 2 and "teacher_epochs" in err and len(err.strip().splitlines()) == 1
    for bad in ({"teacher_epochs": True}, {"bench_batch_sizes": []}, {"teacher_model": "nope"}):
        rc, err = _run_rc(tmp_path, tiny_npz_data, {**TINY, **bad}, capsys)
        assert rc == 2, (bad, err)
    # a later stage's option that only the data can refute: refused before the first stage too
    rc, err = _run_rc(
        tmp_path, tiny_npz_data, {**TINY, "teacher_epochs": 2, "calib_n": 999}, capsys
    )
    assert rc == 1 and "calib_n" in err and "redoing" not in err
    assert _teacher_files(finished_pipeline) == before
    assert sorted((finished_pipeline / ".pipeline").iterdir()) == records
    assert not (finished_pipeline / ".superseded").exists()


def test_failed_redo_keeps_the_finished_stage_until_its_replacement_exists(
    tmp_path, tiny_npz_data, capsys, monkeypatch, finished_pipeline
):
    import advedge.training.engine

    before = _teacher_files(finished_pipeline)

    def broken(*args, **kwargs):
        raise RuntimeError("killed in the middle of the redo")

    monkeypatch.setattr(advedge.training.engine, "train", broken)
    rc, _ = _run_rc(tmp_path, tiny_npz_data, {**TINY, "teacher_epochs": 2}, capsys)
    assert rc == 1
    kept = finished_pipeline / ".superseded" / "teacher"
    assert {f: (kept / f).read_bytes() for f in before} == before
    # a second failed redo, after the stage records were lost: nothing is overwritten either
    import shutil

    shutil.rmtree(finished_pipeline / ".pipeline")
    (finished_pipeline / "teacher").mkdir(exist_ok=True)
    (finished_pipeline / "teacher" / "note.txt").write_text("a user's file")
    rc, _ = _run_rc(tmp_path, tiny_npz_data, {**TINY, "teacher_epochs": 2}, capsys)
    assert rc == 1
    assert {f: (kept / f).read_bytes() for f in before} == before
    (partial,) = (finished_pipeline / ".superseded").glob("teacher.partial-*")
    assert (partial / "note.txt").read_text() == "a user's file"
    monkeypatch.undo()
    rc, err = _run_rc(tmp_path, tiny_npz_data, {**TINY, "teacher_epochs": 2}, capsys)
    assert rc == 0, err
    assert not kept.exists()  # dropped once the new teacher had finished
    assert _teacher_files(finished_pipeline) != before


def test_retrained_teacher_redoes_everything_downstream(
    tmp_path, tiny_npz_data, capsys, finished_pipeline
):
    from advedge.checkpoint import read_metadata
    from advedge.utils import sha256_file

    again = _run(tmp_path, tiny_npz_data, {**TINY, "teacher_epochs": 2}, capsys)
    assert not any(s["skipped"] for s in again["stages"].values())
    teacher_sha = sha256_file(finished_pipeline / "teacher" / "model.safetensors")
    assert read_metadata(finished_pipeline / "student")["teacher"]["sha256"] == teacher_sha


def test_stage_key_follows_the_files_it_reads(tmp_path, tiny_npz_data, capsys, finished_pipeline):
    # another teacher's weights put in place by hand: the student and all after it are stale
    other = train_tiny(tiny_npz_data, tmp_path / "other", seed=7, device="cpu")
    (finished_pipeline / "teacher" / "model.safetensors").write_bytes(
        (other / "model.safetensors").read_bytes()
    )
    again = _run(tmp_path, tiny_npz_data, TINY, capsys)
    ran = {k for k, s in again["stages"].items() if not s["skipped"]}
    assert ran == {"student", "purifier", "export", "bench", "report"}


def _pipeline_in_a_subprocess(tmp_path: Path, data: Path, out: Path, cfg: dict):
    """``advedge pipeline`` as another process (the test process holds a lock meanwhile)."""
    import subprocess
    import sys

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = ["pipeline", "--data", str(data), "--out", str(out), "--config", str(path)]
    return subprocess.run(
        [sys.executable, "-m", "advedge", *cmd], capture_output=True, text=True, timeout=300
    )


def test_second_pipeline_into_the_same_out_is_refused(tmp_path, tiny_npz_data):
    from advedge.locks import output_lock

    out = tmp_path / "p"
    with output_lock(out):
        proc = _pipeline_in_a_subprocess(tmp_path, tiny_npz_data, out, TINY)
    assert proc.returncode == 1
    assert [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()] == [
        proc.stderr.strip().splitlines()[-1]
    ]
    assert "being written by another advedge process" in proc.stderr
    assert not out.exists()


def test_a_stage_folder_in_use_by_another_command_is_not_moved(
    tmp_path, tiny_npz_data, finished_pipeline
):
    from advedge.locks import output_lock

    before = _teacher_files(finished_pipeline)
    with output_lock(finished_pipeline / "teacher"):  # e.g. an `advedge train --out p/teacher`
        proc = _pipeline_in_a_subprocess(
            tmp_path, tiny_npz_data, finished_pipeline, {**TINY, "teacher_epochs": 2}
        )
    assert proc.returncode == 1 and "being written by another" in proc.stderr
    assert _teacher_files(finished_pipeline) == before
    assert not (finished_pipeline / ".superseded").exists()


def test_the_pipeline_ends_with_the_headline_table_and_its_warnings(
    tmp_path, tiny_npz_data, capsys, finished_pipeline
):
    """Not only stage times: per artifact its clean and worst-case robust accuracy (percent, as
    the report shows them) and its p50 latency, then the bench's warnings (on stderr)."""
    bench = json.loads((finished_pipeline / "bench/bench.json").read_text())
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(TINY))
    rc = main(argv("pipeline", data=str(tiny_npz_data), out=str(finished_pipeline), config=path))
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    out = captured.out
    assert "headline" in out and out.index("headline") > out.index("stage")  # it comes last
    table = out[out.index("headline") :]
    assert "clean %" in table and "robust %" in table and "p50 ms" in table
    for result in bench["results"]:
        # one name per artifact: bench's label (model, precision, backend), as the report shows it
        row = next(line for line in table.splitlines() if f" {result['label']} " in line)
        cells = [c.strip() for c in row.strip("│ ").split("│")]
        assert cells[1] == f"{100 * result['clean_acc']:.1f}", row
        assert cells[2] == f"{100 * result['robust']['worst_case_acc']:.1f}", row
        timed = [lat for lat in result["latency"] if "p50_ms" in lat]
        p50 = min(timed, key=lambda lat: lat["batch"])["p50_ms"]
        assert cells[3] == f"{p50:.3g}", row
    said = "".join(captured.err.split())  # rich wraps long lines, paths anywhere
    for warning in bench["warnings"]:
        assert "warning:" + "".join(warning.split()) in said
    assert said.endswith(f"report:{finished_pipeline}/report/report.md")


def test_the_qat_stage_puts_its_int8_file_beside_the_ptq_ones(
    tmp_path, tiny_npz_data, capsys, finished_pipeline
):
    """``qat: true`` adds the stage after export (the stages before it stay up to date); bench
    measures its file beside the PTQ ones, under a label of its own, and the report shows both;
    switched off again, the pipeline is what it was without it."""
    from advedge.report.text import md_escape
    from advedge.workflow import Preset, pipeline_stages

    cfg = {**TINY, "qat": True, "qat_epochs": 1, "qat_steps": 1}
    with_qat = _run(tmp_path, tiny_npz_data, cfg, capsys)
    assert list(with_qat["stages"]) == [*STAGES[:4], "qat", *STAGES[4:]]
    assert tuple(with_qat["stages"]) == pipeline_stages(Preset(qat=True))
    assert pipeline_stages(Preset()) == STAGES
    ran = {k for k, s in with_qat["stages"].items() if not s["skipped"]}
    assert ran == {"qat", "bench", "report"}
    out = finished_pipeline
    qat = out / "qat" / "tiny_cnn.int8-qat.onnx"
    assert with_qat["stages"]["qat"]["artifact"] == str(qat) and qat.is_file()
    labels = {
        r["name"]: r["label"] for r in json.loads((out / "bench/bench.json").read_text())["results"]
    }
    assert labels["tiny_cnn.int8-qat.onnx"] == "tiny_cnn int8-qat onnxruntime"
    assert labels["tiny_cnn.int8.onnx"] == "tiny_cnn int8 onnxruntime"
    report = (out / "report/report.md").read_text()
    for label in ("tiny_cnn int8-qat onnxruntime", "tiny_cnn int8 onnxruntime"):
        assert f"| {md_escape(label)} | int8 |" in report  # the artifact table, by its label

    again = _run(tmp_path, tiny_npz_data, cfg, capsys)
    assert all(s["skipped"] for s in again["stages"].values())

    without = _run(tmp_path, tiny_npz_data, TINY, capsys)
    assert "qat" not in without["stages"]
    names = {r["name"] for r in json.loads((out / "bench/bench.json").read_text())["results"]}
    assert "tiny_cnn.int8-qat.onnx" not in names and "tiny_cnn.int8.onnx" in names

"""``advedge doctor`` on the command line: the table and the summary line, ``--json`` (one
document on stdout), the exit codes (0: every available backend passed; 1: a check failed; 2: a
bad option), nothing left in the temporary folder. TensorRT only as the TEST DOUBLE (tests/fakes)."""

from __future__ import annotations

import json
import re
import tempfile

import pytest
from advedge.export.runtime import BACKENDS, OrtRunner
from conftest import argv
from fakes import install_fake_tensorrt

from advedge.cli import main
from advedge.workflow.backend_checks import BACKEND_CHECKS

GPU_ONLY = ("torch-cudagraph", "onnxruntime-cuda", "onnxruntime-trt", "tensorrt")


def _json(capsys, *words: str, **options: object) -> tuple[int, dict, str]:
    capsys.readouterr()
    rc = main(argv("doctor", *words, json=True, **options))
    captured = capsys.readouterr()
    return rc, json.loads(captured.out), captured.err  # stdout is one JSON document


def test_every_registered_backend_gets_its_lines_and_missing_ones_do_not_fail(capsys):
    """The default run: every backend of the registry, in well under a minute here."""
    rc, doc, err = _json(capsys)
    assert rc == 0, err
    assert doc["schema"] == "advedge.doctor/1" and doc["ok"] is True
    assert doc["backends"] == list(BACKENDS)
    assert "Traceback" not in err
    by_backend: dict[str, list[dict]] = {}
    for line in doc["checks"]:
        by_backend.setdefault(line["backend"], []).append(line)
    assert list(by_backend) == list(BACKENDS)
    for name, lines in by_backend.items():
        if name in GPU_ONLY:  # no GPU, no TensorRT here
            assert [(c["check"], c["status"]) for c in lines] == [("load", "missing")]
            assert lines[0]["hint"]
        else:  # torch, torch-compile, onnxruntime really run
            assert [c["check"] for c in lines] == ["load", *BACKEND_CHECKS]
            assert {c["status"] for c in lines} == {"ok"}, lines
    assert doc["seconds"] < 60
    assert {"torch", "onnxruntime", "tensorrt", "gpus", "nvidia_driver"} <= set(doc["versions"])


def test_the_table_and_the_summary_line(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    capsys.readouterr()
    rc = main(["doctor", "--backend", "onnxruntime", "--backend", "onnxruntime-cuda"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "advedge doctor: toolchain" in out and "onnxruntime providers" in out
    rows = [line for line in out.splitlines() if re.match(r"│ onnxruntime\S* +│ \w+ +│", line)]
    assert len(rows) == 4, out  # load, parity, timer; and one missing line
    assert sum("│ ok " in r for r in rows) == 3
    missing = next(r for r in rows if "onnxruntime-cuda" in r)
    assert "missing" in missing and "install onnxruntime-gpu" in missing
    assert "backends: 1 passed, 1 missing here, 0 failed: every available backend passed" in out


def test_a_failed_check_exits_1_with_the_reason(capsys, monkeypatch):
    real = OrtRunner.__call__
    monkeypatch.setattr(OrtRunner, "__call__", lambda self, batch: real(self, batch) * 2 + 1)
    rc, doc, _ = _json(capsys, backend=["onnxruntime"])
    assert rc == 1 and doc["ok"] is False
    parity = next(c for c in doc["checks"] if c["check"] == "parity")
    assert parity["status"] == "failed" and "> 1e-03 (fp32)" in parity["detail"]
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["doctor", "--backend", "onnxruntime"]) == 1
    out = capsys.readouterr().out
    assert "failed" in out and "onnxruntime failed a check" in out


def test_the_tensorrt_double_passes_through_the_cli(capsys, monkeypatch):
    install_fake_tensorrt(monkeypatch, version="10.3.0")
    rc, doc, err = _json(capsys, backend=["tensorrt"])
    assert rc == 0, err
    assert [(c["check"], c["status"]) for c in doc["checks"]] == [
        ("load", "ok"),
        *((name, "ok") for name in BACKEND_CHECKS),
    ]
    assert doc["versions"]["tensorrt"] == "10.3.0"


def test_nothing_is_left_in_the_temporary_folder(capsys, monkeypatch, tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    rc, doc, _ = _json(capsys, backend=["torch", "onnxruntime"])
    assert rc == 0 and doc["summary"]["passed"] == ["torch", "onnxruntime"]
    assert list(scratch.iterdir()) == []


def test_quiet_shows_no_progress(capsys):
    capsys.readouterr()
    assert main(["-q", "doctor", "--backend", "onnxruntime-trt"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and "missing" in captured.out


@pytest.mark.parametrize(
    ("words", "message"),
    [
        (["--backend", "onnxruntime-gpu"], "unknown backend 'onnxruntime-gpu'"),
        (["--device", "cuda"], "CUDA is not available"),
        (["--device", "tpu"], "unknown device 'tpu'"),
    ],
)
def test_bad_options_exit_2_in_one_line(cli_error, words, message):
    code, line = cli_error("doctor", *words)
    assert code == 2 and message in line, line

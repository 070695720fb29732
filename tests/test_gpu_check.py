"""The CPU-runnable parts of ``benchmarks/gpu_check.py``: the import bootstrap for a machine
without an install, the per-step record (a failing step is kept, the next still runs, and a
step past the budget is skipped), the payload, and the environment step."""

from __future__ import annotations

import json
import site
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
ROOT = BENCH.parent


@pytest.fixture(scope="module")
def gpu_check():
    sys.path.insert(0, str(BENCH))
    try:
        import gpu_check

        yield gpu_check
    finally:
        sys.path.remove(str(BENCH))


def _bare_python(code: str) -> subprocess.CompletedProcess[str]:
    """Python without site processing: site-packages on the path but no .pth files, so the
    editable install of advedge (a .pth finder) is invisible, as on a machine without pip."""
    packages = site.getsitepackages()[0]
    prelude = f"import sys; sys.path.append({packages!r}); "
    return subprocess.run(
        [sys.executable, "-S", "-c", prelude + code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",
    )


def test_the_bootstrap_maps_export_and_calibration_without_an_install():
    bare = _bare_python("import advedge.export")
    assert bare.returncode != 0 and "No module named 'advedge" in bare.stderr  # no install
    res = _bare_python(
        f"sys.path.insert(0, {str(BENCH)!r}); import _bootstrap; "
        "print(_bootstrap.install()); "
        "import advedge.export.runtime.torch, advedge.calibration.quantize, advedge.export; "
        "from advedge.export.runtime import BACKENDS; print(advedge.export.__file__, len(BACKENDS))"
    )
    assert res.returncode == 0, res.stderr
    mapped, where = res.stdout.split("\n", 1)
    assert mapped == "True" and where.startswith(str(ROOT / "export" / "__init__.py"))


def test_subprocesses_get_the_mapping_from_a_sitecustomize(tmp_path):
    sys.path.insert(0, str(BENCH))
    try:
        import _bootstrap

        folder = _bootstrap.site_dir(folder=tmp_path / "site")
    finally:
        sys.path.remove(str(BENCH))
    res = _bare_python(
        f"sys.path.insert(0, {str(folder)!r}); import sitecustomize; "
        "import advedge.calibration.cache as c; print(c.__file__)"
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(ROOT / "calibration" / "cache.py")


def test_each_step_is_written_as_it_finishes_and_a_failure_does_not_stop_the_rest(
    gpu_check, tmp_path
):
    record = gpu_check.Record(tmp_path)
    deadline = time.monotonic() + 600

    def broken():
        raise RuntimeError("no CUDA here")

    record.step("first", lambda: {"headline": "fine", "value": 1}, deadline)
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert doc["steps"]["first"]["status"] == "ok" and doc["steps"]["first"]["value"] == 1
    record.step("second", broken, deadline)
    record.step("third", lambda: {"headline": "ran after a failure"}, deadline)
    record.step("late", lambda: {"headline": "never"}, time.monotonic() + 5)
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert doc["steps"]["second"]["status"] == "failed"
    assert "RuntimeError: no CUDA here" in doc["steps"]["second"]["error"]
    assert doc["steps"]["third"]["status"] == "ok"
    assert doc["steps"]["late"] == {"status": "skipped", "reason": "out of time"}
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| second | failed |" in md and "ran after a failure" in md


def test_the_environment_step_runs_without_a_gpu(gpu_check):
    env = gpu_check.environment()
    assert env["torch"] and env["cuda_available"] is False
    assert "CPUExecutionProvider" in env["ort_providers"]


def test_the_payload_is_real_cifar10_and_small(gpu_check, tmp_path, monkeypatch):
    if not (gpu_check.SHARED / "test.npz").is_file():
        pytest.skip("no CIFAR-10 in ../shared/data")
    monkeypatch.setattr(gpu_check, "PAYLOAD", tmp_path / "payload")
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.safetensors").write_bytes(b"weights")
    payload = gpu_check.prepare(run)
    with np.load(payload / "data" / "test.npz") as z:
        assert z["x"].shape == (gpu_check.N_TEST, 32, 32, 3) and z["x"].dtype == np.uint8
        with np.load(gpu_check.SHARED / "test.npz") as full:
            assert np.array_equal(z["x"], full["x"][: gpu_check.N_TEST])
    size = sum(f.stat().st_size for f in payload.rglob("*") if f.is_file())
    assert size < 32 * 2**20  # the tree may carry 64 MiB in all
    assert (payload / "student" / "model.safetensors").read_bytes() == b"weights"

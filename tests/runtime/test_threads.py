"""advedge.export.runtime.threads (thread counts, load, busy machine), the latency warnings,
``bench --threads`` and RunnerInfo.model (CPU, no timed assertions)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from advedge.export.onnx_export import export_onnx
from advedge.export.runtime import threads as threads_mod
from advedge.export.runtime.base import model_name, open_runner
from advedge.export.runtime.environment import environment_manifest
from advedge.export.runtime.latency import CV_WARN, TAIL_WARN, latency_stats, latency_warning
from advedge.export.runtime.onnxruntime import OrtRunner
from advedge.export.runtime.threads import (
    BUSY_MARGIN,
    MAX_THREADS,
    apply_threads,
    busy_warning,
    configured_threads,
    cpus_available,
    default_threads,
    load_average,
)
from conftest import argv
from fakes.artifacts import SHAPE, classifier_artifacts, tiny_classifier
from rich.console import Console

from advedge.cli import main
from advedge.cli.bench import _conditions, _latency_table
from advedge.errors import UsageError


@pytest.fixture
def restore_threads():
    """Put torch's intra-op thread count and the stored ONNX Runtime count back after a test."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
    threads_mod.reset_threads()


@pytest.fixture(scope="module")
def arts(tmp_path_factory) -> tuple[Path, Path]:
    return classifier_artifacts(tmp_path_factory.mktemp("threads"), "t", 0)


def test_apply_threads_sets_torch_and_later_onnxruntime_sessions(arts, restore_threads):
    _, onnx = arts
    other = 1 if torch.get_num_threads() != 1 else 2
    applied = apply_threads(other)
    assert torch.get_num_threads() == other
    assert applied["requested"] == applied["threads"] == other
    assert applied["torch"] == applied["onnxruntime_intra_op"] == other
    assert applied["torch_interop"] == torch.get_num_interop_threads() >= 1
    assert applied["cpus_available"] == cpus_available() >= 1
    assert configured_threads() == other

    apply_threads(1)
    runner = open_runner(onnx)
    opts = runner.session.get_session_options()  # what the session was really created with
    assert (opts.intra_op_num_threads, opts.inter_op_num_threads) == (1, 1)
    assert runner.info.threads == 1
    assert OrtRunner(onnx, threads=0).info.threads is None  # 0: ONNX Runtime chooses


def test_without_apply_threads_onnxruntime_chooses(arts, restore_threads):
    threads_mod.reset_threads()
    runner = open_runner(arts[1])
    assert runner.session.get_session_options().intra_op_num_threads == 0
    assert runner.info.threads is None and configured_threads() is None


def _on(root: Path):
    """``_physical_cores`` reading the topology under ``root``."""
    real = threads_mod._physical_cores
    return lambda cpus, _root=None: real(cpus, root)


def test_default_threads_is_one_per_physical_core(tmp_path, monkeypatch, restore_threads):
    # cpu0 and cpu1 are hyperthreads of one core, cpu2 a core of its own
    for cpu, core in ((0, 0), (1, 0), (2, 1)):
        topo = tmp_path / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True)
        (topo / "physical_package_id").write_text("0\n")
        (topo / "core_id").write_text(f"{core}\n")
    assert threads_mod._physical_cores([0, 1, 2], tmp_path) == 2
    assert threads_mod._physical_cores([0, 1, 3], tmp_path) is None  # cpu3 unreadable
    monkeypatch.setattr(threads_mod, "_physical_cores", _on(tmp_path))
    monkeypatch.setattr(threads_mod, "_cpu_ids", lambda: [0, 1, 2])
    monkeypatch.setattr(threads_mod, "cpus_available", lambda: 3)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert default_threads() == 2
    applied = apply_threads(None)
    assert applied["requested"] is None and applied["threads"] == 2 == configured_threads()
    # OMP_NUM_THREADS wins, as for PyTorch's own default; a value that is not a count does not
    for value, want in (("1", 1), ("0", 2), ("x", 2)):
        monkeypatch.setenv("OMP_NUM_THREADS", value)
        assert default_threads() == want


@pytest.mark.parametrize("bad", [0, -1, MAX_THREADS + 1, True, 1.5])
def test_apply_threads_refuses_counts_out_of_range(bad, restore_threads):
    before = torch.get_num_threads()
    with pytest.raises(UsageError, match=rf"--threads must lie in \[1, {MAX_THREADS}\]"):
        apply_threads(bad)
    assert torch.get_num_threads() == before and configured_threads() is None


def test_busy_warning_rule_at_its_boundary():
    # busy when load1 + threads > cpus + BUSY_MARGIN
    edge = 2 + BUSY_MARGIN - 1  # load1 at which 1 thread on 2 CPUs sits exactly on the limit
    assert busy_warning([edge, 0.0, 0.0], threads=1, cpus=2) is None
    msg = busy_warning([edge + 0.01, 0.0, 0.0], threads=1, cpus=2)
    assert msg and "busy machine" in msg and f"{edge + 0.01:.2f}" in msg and "2 CPUs" in msg
    assert "\n" not in msg
    assert busy_warning([0.0, 0.0, 0.0], threads=3, cpus=2) is not None  # more threads than CPUs
    # after the run (its own threads included): busy when load1 > cpus + BUSY_MARGIN
    assert busy_warning([0.0] * 3, 1, 2, after=[2 + BUSY_MARGIN, 0, 0]) is None
    after = busy_warning([0.0] * 3, 1, 2, after=[2 + BUSY_MARGIN + 0.01, 0, 0])
    assert after and "after the run" in after
    assert busy_warning(None, threads=64, cpus=1) is None  # no load figure, no claim


def test_load_average_and_the_environment_record():
    load = load_average()
    assert load is None or (len(load) == 3 and all(v >= 0 for v in load))
    env = environment_manifest()
    assert env["cpus_available"] == cpus_available()
    assert 1 <= env["physical_cores_available"] <= cpus_available()


def test_latency_warning_tail_rule_catches_what_cv_misses():
    ms = 1e-3
    tail = latency_stats([ms] * 989 + [2.1 * ms] * 11, batch=1)  # 1.1% of the calls at 2.1x
    assert tail["cv"] < CV_WARN and tail["p99_ms"] == pytest.approx(2.1)
    msg = latency_warning(tail)
    assert msg and "slow tail" in msg and "2.1x" in msg and "high variation" not in msg
    edge = latency_stats([ms] * 989 + [TAIL_WARN * ms] * 11, batch=1)  # p99 exactly 2x p50
    assert edge["p99_ms"] == pytest.approx(TAIL_WARN) and latency_warning(edge) is None
    spread = latency_stats(list(np.linspace(0.5, 1.5, 100) * ms), batch=1)  # cv 0.29, no tail
    msg = latency_warning(spread)
    assert msg and "high variation" in msg and "slow tail" not in msg
    both = latency_stats([ms] * 90 + [10 * ms] * 10, batch=1)
    assert "high variation" in latency_warning(both) and "slow tail" in latency_warning(both)


@pytest.mark.parametrize("value", ["0", "1025", "-2"])
def test_bench_threads_out_of_range_is_one_usage_line(arts, tiny_npz_data, tmp_path, capsys, value):
    rc = main(
        argv(
            "bench",
            artifact=str(arts[1]),
            data=str(tiny_npz_data),
            threads=value,
            out=str(tmp_path / "o"),
        )
    )
    err = capsys.readouterr().err
    assert rc == 2 and f"--threads must lie in [1, {MAX_THREADS}], got {value}" in err
    assert "Traceback" not in err and not (tmp_path / "o").exists()


def test_bench_table_in_percent_and_the_conditions_line():
    result = {
        "name": "m.onnx",
        "backend": "onnxruntime",
        "clean_acc": 0.8125,
        "robust": {"worst_case_acc": 0.25},
        "latency": [
            {"batch": 1, "p50_ms": 0.5, "p99_ms": 0.9, "cv": 0.1, "images_per_s": 2000},
            {"batch": 512, "skipped": "outside the graph's batch size 1-1"},
        ],
    }
    console = Console(width=200, record=True)
    console.print(_latency_table([result]))
    text = console.export_text()
    assert "clean %" in text and "worst %" in text
    assert "81.2" in text and "25.0" in text and "0.8125" not in text and "512" not in text
    doc = {
        "threads": {"threads": 1, "cpus_available": 2},
        "load_average": {"before": [0.31, 0.2, 0.1], "after": [1.957, 0.5, 0.2]},
    }
    line = _conditions(doc)
    assert line == "threads 1 (of 2 CPUs); 1-minute load average 0.31 before, 1.96 after"
    assert _conditions({"load_average": {"before": None, "after": None}}) is None


def test_runner_info_model_names_the_architecture(arts, tmp_path):
    run, onnx = arts
    assert open_runner(run, device="cpu").info.model == "tiny_cnn"  # the checkpoint's
    assert open_runner(onnx).info.model is None  # the fake's metadata records no architecture
    for kind, arch in (("classifier", "tiny_cnn"), ("fused", "purifier-generator+tiny_cnn")):
        path = export_onnx(  # with the metadata advedge export records (export/targets.py)
            tiny_classifier(),
            tmp_path / f"{kind}.onnx",
            input_shape=tuple(SHAPE),
            metadata={"kind": kind, "precision": "fp32", "architecture": arch},
        )
        info = open_runner(path).info
        assert (info.kind, info.model) == (kind, "tiny_cnn")
    assert model_name({"kind": "fused", "architecture": "purifier-generator+resnet8"}) == "resnet8"
    assert model_name({"kind": "purifier", "architecture": "purifier-generator"}) == (
        "purifier-generator"
    )
    assert model_name({"kind": "classifier"}) is None

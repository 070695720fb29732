"""Failure behaviour of the training commands (the reliability issue, sections 3, 4, 6 and 7).

One writer per run folder, nothing left behind by a failed new run, earlier work never lost, a
full disk or an unwritable path named in one line, an edited evaluation state refused, and an
extended ``--epochs`` on ``--resume`` that trains at the learning rate its schedule says.
"""

from __future__ import annotations

import errno
import json
import subprocess
import sys

import pytest
import torch
import yaml
from test_cli import fast_train_flags, file_bytes, metrics_rows

from advedge.cli import main
from advedge.locks import lock_path, output_lock


def _run(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def _error_lines(err: str) -> list[str]:
    assert "Traceback" not in err, err
    return [ln for ln in err.splitlines() if ln.startswith("error:")]


# --- one writer ------------------------------------------------------------------------------


def test_second_train_into_the_same_out_is_refused(tmp_path, tiny_npz_data):
    run = tmp_path / "run"
    with output_lock(run):
        proc = subprocess.run(
            [sys.executable, "-m", "advedge", *map(str, fast_train_flags(tiny_npz_data, run))],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert "pid" in lock_path(run).read_text()
    assert proc.returncode == 1
    (line,) = _error_lines(proc.stderr)
    assert "being written by another advedge process" in line and str(run) in line
    assert not run.exists()
    assert not lock_path(run).exists()  # released with its holder


def test_lock_of_a_killed_holder_is_taken_over(tmp_path, tiny_npz_data, capsys):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom advedge.locks import output_lock\n"
            f"with output_lock({str(run)!r}):\n    print('held', flush=True)\n    time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    holder.kill()  # kill -9: the lock file stays, its flock dies with the process
    holder.wait()
    assert lock_path(run).exists()
    code, err = _run(capsys, *fast_train_flags(tiny_npz_data, run))
    assert code == 0, err
    assert (run / "model.safetensors").is_file()


def test_nested_locks_in_one_process_are_reentrant(tmp_path):
    with output_lock(tmp_path / "x"), output_lock(tmp_path / "x"):
        assert lock_path(tmp_path / "x").exists()
    assert not lock_path(tmp_path / "x").exists()


# --- nothing left behind, nothing lost ------------------------------------------------------


def _disk_full(monkeypatch, *, after: int = 0) -> None:
    """Every atomic write after the first ``after`` fails as on a full disk."""
    import advedge.utils

    real = advedge.utils.atomic_path
    calls = {"n": 0}

    def failing(path):
        calls["n"] += 1
        if calls["n"] > after:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path)

    monkeypatch.setattr(advedge.utils, "atomic_path", failing)
    import advedge.checkpoint

    monkeypatch.setattr(advedge.checkpoint, "atomic_path", failing)


def test_new_run_on_a_full_disk_leaves_no_folder(tmp_path, tiny_npz_data, capsys, monkeypatch):
    run = tmp_path / "sub" / "run"
    _disk_full(monkeypatch)
    code, err = _run(capsys, *fast_train_flags(tiny_npz_data, run))
    assert code == 1
    (line,) = _error_lines(err)
    assert "the disk is full" in line and str(run) in line
    assert not (tmp_path / "sub").exists()


def test_disk_filling_at_epoch_two_keeps_epoch_one(tmp_path, tiny_npz_data, capsys, monkeypatch):
    run = tmp_path / "run"
    code, err = _run(capsys, *fast_train_flags(tiny_npz_data, run))
    assert code == 0, err
    before = file_bytes(run)
    _disk_full(monkeypatch)
    code, err = _run(capsys, *fast_train_flags(tiny_npz_data, run, epochs=2), "--resume")
    assert code == 1 and "the disk is full" in _error_lines(err)[0]
    assert file_bytes(run) == before  # the finished epoch is intact and resumable
    monkeypatch.undo()
    code, err = _run(capsys, *fast_train_flags(tiny_npz_data, run, epochs=2), "--resume")
    assert code == 0, err
    assert [r["epoch"] for r in metrics_rows(run)] == ["1", "2"]


def test_failed_new_run_leaves_nothing_and_a_bad_option_creates_nothing(
    tmp_path, tiny_npz_data, capsys
):
    run = tmp_path / "a" / "run"
    code, err = _run(capsys, *fast_train_flags(tiny_npz_data, run, lr="inf"))
    assert code == 2 and len(_error_lines(err)) == 1
    code, err = _run(capsys, *fast_train_flags(tmp_path / "missing", run))
    assert code == 1 and len(_error_lines(err)) == 1
    assert list(tmp_path.iterdir()) == []


# --- named errors -------------------------------------------------------------------------


def test_out_under_a_file_is_named(tmp_path, tiny_npz_data, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err = _run(capsys, *fast_train_flags(tiny_npz_data, blocker / "run"))
    assert code == 1
    (line,) = _error_lines(err)
    assert "is a file" in line and "unexpected" not in line


def test_unwritable_out_is_named_not_unexpected(tmp_path, tiny_npz_data, capsys, monkeypatch):
    import advedge.checkpoint

    def denied(path):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(advedge.checkpoint, "atomic_path", denied)
    code, err = _run(capsys, *fast_train_flags(tiny_npz_data, tmp_path / "run"))
    assert code == 1
    (line,) = _error_lines(err)
    assert "permission denied" in line and "unexpected" not in line


def test_os_error_anywhere_in_a_command_is_one_named_line(capsys, monkeypatch, tmp_path):
    import advedge.cli.models

    def boom(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "out.json"))

    monkeypatch.setattr(advedge.cli.models, "Output", boom)
    code, err = _run(capsys, "models")
    assert code == 1
    (line,) = _error_lines(err)
    assert line == f"error: cannot write {tmp_path / 'out.json'}: the file system is read-only " + (
        "(choose a writable --out)"
    )


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d.update(attacks=[1, 2]),
        lambda d: d.update(clean="yes"),
        lambda d: d["attacks"]["pgd"].update(done=[10**9]),
        lambda d: d["attacks"]["pgd"].update(broken=[3]),
        lambda d: d["attacks"]["pgd"].update(seconds="x"),
        lambda d: d.update(schema="other/1"),
    ],
    ids=["attacks-list", "clean-str", "index-out-of-range", "broken-not-done", "seconds", "schema"],
)
def test_edited_eval_state_is_refused(tmp_path, edit):
    from advedge.errors import UsageError
    from advedge.evaluation.state import EvalState

    state = {
        "schema": "advedge.eval-state/1",
        "fingerprint": "fp",
        "settings": {},
        "clean": [1, 0, 1, 1],
        "attacks": {"pgd": {"done": [0, 2], "broken": [2], "queries": [], "seconds": 1.5}},
    }
    path = tmp_path / "eval.json.state.json"
    path.write_text(json.dumps(state))
    assert EvalState.open(path, "fp", {}, True, 4).data == state  # the untouched file resumes
    edit(state)
    path.write_text(json.dumps(state))
    with pytest.raises(UsageError, match="not a valid evaluation state"):
        EvalState.open(path, "fp", {}, True, 4)


# --- resume ---------------------------------------------------------------------------------


def test_extended_epochs_train_at_the_relaid_schedule(tmp_path, tiny_npz_data, capsys, monkeypatch):
    run = tmp_path / "run"
    flags = fast_train_flags(tiny_npz_data, run, method="natural", subset=None)
    assert _run(capsys, *flags)[0] == 0
    lrs: list[float] = []
    real_step = torch.optim.SGD.step

    def step(self, *args, **kwargs):
        lrs.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    flags2 = fast_train_flags(tiny_npz_data, run, method="natural", subset=None, epochs=2)
    code, err = _run(capsys, *flags2, "--resume")
    assert code == 0, err
    # 128 images / 32 = 4 steps an epoch; the re-laid cosine over 8 steps continues at step 4
    import math

    expected = [0.1 * 0.5 * (1 + math.cos(math.pi * t / 8)) for t in range(4, 8)]
    assert lrs == pytest.approx(expected)
    assert "epochs changed from 1 to 2" in err
    change = yaml.safe_load((run / "config.yaml").read_text())["resolved"]["schedule_changes"]
    assert change == [{"at_epoch": 1, "from_epochs": 1, "to_epochs": 2, "lr": 0.05}]
    assert metrics_rows(run)[-1]["schedule_epochs"] == "2"


def test_refused_second_writer_leaves_the_live_runs_temporary_files(tmp_path, tiny_npz_data):
    run = tmp_path / "run"
    assert main([str(a) for a in fast_train_flags(tiny_npz_data, run)]) == 0
    in_progress = run / ".state.pt.abc123.tmp"  # the live run's checkpoint being written
    in_progress.write_bytes(b"partial")
    with output_lock(run):
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "advedge",
                *map(str, fast_train_flags(tiny_npz_data, run, epochs=2)),
                "--resume",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert proc.returncode == 1 and "being written by another" in proc.stderr
    assert in_progress.read_bytes() == b"partial"


def test_eval_out_under_a_file_is_refused_before_any_attack(tmp_path, tiny_npz_data, capsys):
    import advedge.evaluation.core

    run = tmp_path / "run"
    assert _run(capsys, *fast_train_flags(tiny_npz_data, run, method="natural"))[0] == 0
    blocker = tmp_path / "file"
    blocker.write_text("x")
    real = advedge.evaluation.core.EvalSettings.run
    called = []
    advedge.evaluation.core.EvalSettings.run = lambda *a, **k: called.append(1) or real(*a, **k)
    try:
        code, err = _run(
            capsys,
            "eval",
            "--model",
            run,
            "--data",
            tiny_npz_data,
            "--attacks",
            "fgsm",
            "--n",
            8,
            "--out",
            blocker / "results.json",
        )
    finally:
        advedge.evaluation.core.EvalSettings.run = real
    assert code == 2 and not called
    (line,) = _error_lines(err)
    assert "which is a file" in line


def test_resume_with_fewer_epochs_than_trained_is_refused(tmp_path, tiny_npz_data, capsys):
    run = tmp_path / "run"
    assert _run(capsys, *fast_train_flags(tiny_npz_data, run, epochs=2))[0] == 0
    before = file_bytes(run)
    code, err = _run(capsys, *fast_train_flags(tiny_npz_data, run, epochs=1), "--resume")
    assert code == 2
    (line,) = _error_lines(err)
    assert "already trained 2 epochs" in line
    assert file_bytes(run) == before
    # the same count is a finished run: resuming it is a no-op, not an error
    assert _run(capsys, *fast_train_flags(tiny_npz_data, run, epochs=2), "--resume")[0] == 0
    assert file_bytes(run) == before


@pytest.mark.parametrize("suffix", [".onnx", ".engine"])
def test_eval_of_a_deployed_artifact_names_it_before_any_data_is_read(tmp_path, capsys, suffix):
    artifact = tmp_path / f"model{suffix}"
    artifact.write_bytes(b"\x08\x07" + b"\x00" * 64)  # not safetensors, whatever it holds
    missing_data = tmp_path / "no-data-here"
    code, err = _run(capsys, "eval", "--model", artifact, "--data", missing_data)
    assert code == 1
    (line,) = _error_lines(err)
    assert "not a PyTorch checkpoint" in line and "advedge bench" in line
    assert "header too large" not in line and "no-data-here" not in err

"""End-to-end tests of the ``advedge`` command line (issue 2, sections 8 and 9).

The CLI runs in-process through :func:`advedge.cli.main` (which returns the exit code); only the
SIGINT/SIGKILL tests start a real process. Everything uses the ``tiny_cnn`` model on a tiny
synthetic npz dataset so that the file runs in well under two minutes on 2 CPU cores.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from advedge import __version__
from advedge.checkpoint import load_model, load_state
from advedge.cli import main

EPS = 8 / 255
METRIC_HEADER = "epoch train_loss train_acc test_clean_acc test_pgd_acc lr seconds".split()  # noqa: SIM905
RUN_FILES = ("model.safetensors", "config.yaml", "metrics.csv", "state.pt")


def fast_train_flags(data: Path, out: Path, **overrides: Any) -> list[str]:
    """``advedge train`` arguments for a quick tiny_cnn run (overrides: flag name -> value)."""
    opts: dict[str, Any] = {
        "data": data,
        "model": "tiny_cnn",
        "method": "pgd-at",
        "epochs": 1,
        "out": out,
        "eps": "8/255",
        "steps": 1,
        "subset": 64,
        "batch-size": 32,
        "eval-n": 16,
        "device": "cpu",
    }
    opts.update(overrides)
    argv = ["train"]
    for key, value in opts.items():
        if value is not None:
            argv += [f"--{key}", str(value)]
    return argv


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.startswith("error:")]

    @property
    def error(self) -> str:
        """The single ``error:`` line (asserts that there is exactly one and no traceback)."""
        lines = self.error_lines
        assert len(lines) == 1, f"expected one error line, stderr was:\n{self.err}"
        assert "Traceback" not in self.err, self.err
        return lines[0]


def invoke(*argv: Any) -> Result:
    """Run ``advedge ARGV`` in-process and capture what it writes."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return Result(code, out.getvalue(), err.getvalue())


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]):
    """``cli(*argv) -> Result``: run ``advedge`` in-process under capsys."""

    def run(*argv: Any) -> Result:
        capsys.readouterr()
        code = main([str(a) for a in argv])
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


def metrics_lines(run: Path) -> list[str]:
    return (run / "metrics.csv").read_text(encoding="utf-8").splitlines()


def metrics_rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def file_bytes(run: Path) -> dict[str, bytes]:
    return {name: (run / name).read_bytes() for name in RUN_FILES if (run / name).exists()}


def tmp_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.name.endswith(".tmp"))


@dataclass
class TrainedRun:
    data: Path
    run: Path
    result: Result


@pytest.fixture(scope="module")
def trained(tiny_npz_data: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    """One 2-epoch pgd-at run of tiny_cnn on the synthetic data, shared by the module."""
    run = tmp_path_factory.mktemp("cli_trained") / "run"
    result = invoke(*fast_train_flags(tiny_npz_data, run, epochs=2), "--json")
    assert result.code == 0, result.err
    return TrainedRun(tiny_npz_data, run, result)


@pytest.fixture
def run_copy(trained: TrainedRun, tmp_path: Path) -> Path:
    """A private copy of the shared run directory, for tests that write into it."""
    dst = tmp_path / "run_copy"
    shutil.copytree(trained.run, dst)
    return dst


# ------------------------------------------------------------------------------ models, version
def test_models_json_lists_the_registry(cli):
    res = cli("models", "--json")
    assert res.code == 0, res.err
    doc = json.loads(res.out)
    names = {m["name"] for m in doc["models"]}
    assert {"resnet18", "wrn34_10", "mobilenetv2", "tiny_cnn"} <= names


def test_version(cli):
    res = cli("--version")
    assert res.code == 0
    assert res.out.strip() == f"advedge {__version__}"


# ----------------------------------------------------------------------------------- train
def test_train_json_and_run_directory(trained: TrainedRun):
    res, run = trained.result, trained.run
    doc = json.loads(res.out)  # stdout is exactly one JSON document
    assert doc["schema"] == "advedge.train/1"
    assert doc["epochs"] == 2
    assert len(doc["metrics"]) == 2
    assert Path(doc["model_path"]) == run / "model.safetensors"
    for name in RUN_FILES:
        assert (run / name).is_file(), name
    assert not tmp_files(run)

    lines = metrics_lines(run)
    assert lines[0].split(",")[: len(METRIC_HEADER)] == METRIC_HEADER
    rows = metrics_rows(run)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for row in rows:
        for key in ("train_acc", "test_clean_acc", "test_pgd_acc"):
            assert 0.0 <= float(row[key]) <= 1.0

    config = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    assert isinstance(config["eps"], float)
    assert config["eps"] == pytest.approx(EPS, abs=1e-12)
    assert config["model"] == "tiny_cnn"
    assert config["epochs"] == 2

    model = load_model(run)
    assert model.checkpoint_metadata["architecture"] == "tiny_cnn"
    assert model.checkpoint_metadata["eps"] == pytest.approx(EPS)
    assert int(load_state(run / "state.pt")["epoch"]) == 2


# ------------------------------------------------------------------------------------ eval
def eval_argv(trained: TrainedRun) -> list[Any]:
    """``advedge eval`` of the shared run on its data; the tests add their flags."""
    return ["eval", "--model", trained.run, "--data", trained.data]


def test_eval_json_schema_and_out_file(cli, trained: TrainedRun, tmp_path: Path):
    out_file = tmp_path / "results.json"
    res = cli(
        *eval_argv(trained),
        "--attacks",
        "fgsm,pgd,cw,mifgsm",
        "--eps",
        "8/255",
        "--n",
        32,
        "--steps",
        2,
        "--device",
        "cpu",
        "--out",
        out_file,
        "--json",
    )
    assert res.code == 0, res.err
    doc = json.loads(res.out)
    assert doc["schema"] == "advedge.eval/2"
    for key in ("clean_acc", "attacks", "worst_case_acc", "eps", "n_examples"):
        assert key in doc, key
    from advedge.stats import wilson_interval

    for record, key, count in [
        (doc, "clean_acc", None),
        (doc, "worst_case_acc", None),
        *[(a, "robust_acc", a["n_robust"]) for a in doc["attacks"]],
    ]:
        k = round(record[key] * 32) if count is None else count
        assert record[f"{key}_ci95"] == pytest.approx(list(wilson_interval(k, 32)))
        low, high = record[f"{key}_ci95"]
        assert low <= record[key] <= high and high - low > 0.1  # n = 32: wide
    assert doc["n_examples"] == 32
    assert doc["eps"] == pytest.approx(EPS)
    assert [a["name"] for a in doc["attacks"]] == ["fgsm", "pgd", "cw", "mifgsm"]
    accs = [doc["clean_acc"], doc["worst_case_acc"]] + [a["robust_acc"] for a in doc["attacks"]]
    assert all(0.0 <= a <= 1.0 for a in accs)
    for attack in doc["attacks"]:
        assert attack["kind"] in ("white-box", "grey-box", "adaptive", "transfer", "query")
        assert attack["robust_acc"] <= doc["clean_acc"] + 1e-12
    assert doc["worst_case_acc"] <= min(a["robust_acc"] for a in doc["attacks"]) + 1e-12
    assert doc["worst_case_acc"] <= doc["clean_acc"] + 1e-12
    assert json.loads(out_file.read_text(encoding="utf-8")) == doc


def test_eval_unknown_attack_suggests_and_writes_nothing(cli, trained: TrainedRun, tmp_path):
    out_file = tmp_path / "results.json"
    res = cli(
        *eval_argv(trained),
        "--attacks",
        "pgd,fgm",
        "--n",
        8,
        "--device",
        "cpu",
        "--out",
        out_file,
    )
    assert res.code == 2
    assert "fgm" in res.error
    assert "fgsm" in res.error
    assert not out_file.exists()


# ------------------------------------------------------------------------------------- eps
def test_fraction_eps_is_accepted_in_eval(cli, trained: TrainedRun):
    res = cli(
        *eval_argv(trained),
        "--attacks",
        "fgsm",
        "--eps",
        "4/255",
        "--n",
        8,
        "--device",
        "cpu",
        "--json",
    )
    assert res.code == 0, res.err
    assert json.loads(res.out)["eps"] == pytest.approx(4 / 255)


BAD_EPS = ["0", "1.5", "-1/255", "abc", "8/0", "nan"]


@pytest.mark.parametrize("eps", BAD_EPS)
def test_bad_eps_in_train_is_a_usage_error(cli, tiny_npz_data: Path, tmp_path: Path, eps: str):
    run = tmp_path / "run"
    res = cli(*fast_train_flags(tiny_npz_data, run, eps=eps))
    assert res.code == 2
    assert "eps" in res.error
    assert not run.exists()


@pytest.mark.parametrize("eps", BAD_EPS)
def test_bad_eps_in_eval_is_a_usage_error(cli, trained: TrainedRun, tmp_path: Path, eps: str):
    out_file = tmp_path / "results.json"
    res = cli(*eval_argv(trained), "--eps", eps, "--out", out_file)
    assert res.code == 2
    assert "eps" in res.error
    assert not out_file.exists()


def test_bad_alpha_is_a_usage_error(cli, tiny_npz_data: Path, tmp_path: Path):
    run = tmp_path / "run"
    res = cli(*fast_train_flags(tiny_npz_data, run, alpha="0"))
    assert res.code == 2
    assert "alpha" in res.error
    assert not run.exists()


# ------------------------------------------------------------------------------- bad names
@pytest.mark.parametrize(
    ("flag", "value", "suggestion"),
    [("model", "resnet81", "resnet18"), ("method", "trade", "trades")],
)
def test_unknown_name_suggests_close_match(cli, tiny_npz_data, tmp_path, flag, value, suggestion):
    run = tmp_path / "run"
    res = cli(*fast_train_flags(tiny_npz_data, run, **{flag: value}))
    assert res.code == 2
    assert value in res.error
    assert f"'{suggestion}'" in res.error
    assert not run.exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--epochs", "abc"],
        ["train", "--no-such-option"],
        ["eval", "--data", "somewhere"],  # --model is required
        ["no-such-command"],
    ],
    ids=["non-int", "unknown-option", "missing-required", "unknown-command"],
)
def test_option_parsing_errors_exit_2(cli, argv):
    res = cli(*argv)
    assert res.code == 2
    assert "unexpected" not in res.error


# -------------------------------------------------------------------------------- bad data
def _write_npz(path: Path, **arrays: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)


def _images(n: int, size: int = 32) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _labels(n: int, k: int = 10) -> np.ndarray:
    return (np.arange(n) % k).astype(np.int64)


NAMES = np.array([f"c{i}" for i in range(10)])


def _bad_missing(root: Path) -> Path:
    return root / "does_not_exist"


def _bad_empty(root: Path) -> Path:
    (root / "empty").mkdir()
    return root / "empty"


def _bad_unknown_files(root: Path) -> Path:
    d = root / "unknown"
    d.mkdir()
    (d / "readme.txt").write_text("not a dataset\n")
    (d / "labels.csv").write_text("0,1,2\n")
    return d


def _bad_labels(root: Path) -> Path:
    d = root / "labels"
    y = _labels(16)
    y[3] = 99
    _write_npz(d / "train.npz", x=_images(16), y=y, class_names=NAMES)
    _write_npz(d / "test.npz", x=_images(16), y=_labels(16), class_names=NAMES)
    return d


def _bad_shape(root: Path) -> Path:
    d = root / "shape"
    _write_npz(d / "train.npz", x=_images(16, 32), y=_labels(16), class_names=NAMES)
    _write_npz(d / "test.npz", x=_images(16, 28), y=_labels(16), class_names=NAMES)
    return d


def _bad_nan(root: Path) -> Path:
    d = root / "nan"
    x = _images(16).astype(np.float32) / 255.0
    x[2, 5, 5, 1] = np.nan
    _write_npz(d / "train.npz", x=x, y=_labels(16), class_names=NAMES)
    _write_npz(d / "test.npz", x=_images(16), y=_labels(16), class_names=NAMES)
    return d


def _bad_truncated(root: Path) -> Path:
    d = root / "truncated"
    _write_npz(d / "train.npz", x=_images(16), y=_labels(16), class_names=NAMES)
    _write_npz(d / "test.npz", x=_images(16), y=_labels(16), class_names=NAMES)
    raw = (d / "train.npz").read_bytes()
    (d / "train.npz").write_bytes(raw[: len(raw) // 2])
    # the evaluation split too, so that eval (which reads test.npz) meets it as well
    raw = (d / "test.npz").read_bytes()
    (d / "test.npz").write_bytes(raw[: len(raw) // 2])
    return d


BAD_DATA = {
    "missing-dir": _bad_missing,
    "empty-dir": _bad_empty,
    "unknown-files": _bad_unknown_files,
    "label-out-of-range": _bad_labels,
    "wrong-shape": _bad_shape,
    "nan-float-x": _bad_nan,
    "truncated-npz": _bad_truncated,
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_train_fails_cleanly(cli, tmp_path: Path, case: str):
    data = BAD_DATA[case](tmp_path)
    run = tmp_path / "run"
    res = cli(*fast_train_flags(data, run))
    assert res.code in (1, 2), res.err
    assert data.name in res.error  # the message names the offending directory or file
    assert not run.exists()
    assert not tmp_files(tmp_path)


@pytest.mark.parametrize("case", ["missing-dir", "empty-dir", "unknown-files", "truncated-npz"])
def test_bad_data_eval_fails_cleanly(cli, trained: TrainedRun, tmp_path: Path, case: str):
    data = BAD_DATA[case](tmp_path)
    out_file = tmp_path / "results.json"
    res = cli("eval", "--model", trained.run, "--data", data, "--n", 8, "--out", out_file)
    assert res.code in (1, 2), res.err
    assert res.error
    assert not out_file.exists()


def test_bad_data_messages_name_the_problem(cli, tmp_path: Path):
    expected = {
        "missing-dir": "not found",
        "empty-dir": "empty",
        "unknown-files": "known format",
        "label-out-of-range": "labels outside",
        "wrong-shape": "shape",
        "nan-float-x": "NaN",
        "truncated-npz": "truncated",
    }
    for case, words in expected.items():
        data = BAD_DATA[case](tmp_path)
        res = cli(*fast_train_flags(data, tmp_path / f"run-{case}"))
        assert words in res.error, (case, res.error)


# -------------------------------------------------------------------------- bad checkpoints
class _Payload:
    """Unpickling this creates ``marker`` (a harmless stand-in for arbitrary code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _eval_fails(cli, model: Path, data: Path, out_file: Path) -> Result:
    res = cli("eval", "--model", model, "--data", data, "--n", 8, "--out", out_file)
    assert res.code == 1, res.err
    assert not out_file.exists()
    return res


@pytest.mark.parametrize("keep", ["half", "header-only", "4-bytes", "empty"])
def test_truncated_safetensors(cli, trained: TrainedRun, tmp_path: Path, keep: str):
    raw = (trained.run / "model.safetensors").read_bytes()
    n = {"half": len(raw) // 2, "header-only": 100, "4-bytes": 4, "empty": 0}[keep]
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(raw[:n])
    res = _eval_fails(cli, bad, trained.data, tmp_path / "results.json")
    assert "truncated" in res.error or "corrupt" in res.error


def test_random_bytes_checkpoint(cli, trained: TrainedRun, tmp_path: Path):
    bad = tmp_path / "run" / "model.safetensors"
    bad.parent.mkdir()
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    res = _eval_fails(cli, bad.parent, trained.data, tmp_path / "results.json")
    assert "corrupt" in res.error or "not a readable" in res.error


def _write_payload(path: Path, marker: Path, how: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if how == "pickle":
        with open(path, "wb") as fh:
            pickle.dump({"model": _Payload(marker)}, fh, protocol=2)
    else:
        torch.save({"model": _Payload(marker)}, path)


@pytest.mark.parametrize("how", ["pickle", "torch-save"])
def test_payload_files_are_valid_exploits(tmp_path: Path, how: str):
    """Control: loading these files without protection does run the payload."""
    marker = tmp_path / "control_marker"
    path = tmp_path / "payload.pt"
    _write_payload(path, marker, how)
    if how == "pickle":
        with open(path, "rb") as fh:
            pickle.load(fh)
    else:
        torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("how", ["pickle", "torch-save"])
@pytest.mark.parametrize("name", ["evil.pt", "evil.pth", "run/model.safetensors"])
def test_pickle_payload_is_never_executed(cli, trained, tmp_path: Path, how: str, name: str):
    marker = tmp_path / "PWNED"
    path = tmp_path / name
    _write_payload(path, marker, how)
    target = path.parent if name.startswith("run/") else path
    res = _eval_fails(cli, target, trained.data, tmp_path / "results.json")
    assert not marker.exists()
    assert "Traceback" not in res.err


@pytest.mark.parametrize("how", ["pickle", "torch-save"])
def test_resume_never_unpickles_a_payload_state(cli, run_copy: Path, tmp_path, trained, how):
    marker = tmp_path / "PWNED"
    _write_payload(run_copy / "state.pt", marker, how)
    model_before = (run_copy / "model.safetensors").read_bytes()
    res = cli(*fast_train_flags(trained.data, run_copy, epochs=3), "--resume")
    assert res.code == 1, res.err
    assert "state.pt" in res.error
    assert not marker.exists()
    assert (run_copy / "model.safetensors").read_bytes() == model_before


def test_checkpoint_of_other_num_classes(cli, trained: TrainedRun, npz_dataset_factory, tmp_path):
    five = npz_dataset_factory("five", num_classes=5, n_train=20, n_test=20)
    res = _eval_fails(cli, trained.run, five, tmp_path / "results.json")
    assert "10 classes" in res.error
    assert "5" in res.error


def test_checkpoint_of_another_architecture(cli, trained: TrainedRun, tmp_path: Path):
    src = trained.run / "model.safetensors"
    with safe_open(str(src), framework="pt") as fh:
        raw_meta = dict(fh.metadata())
    assert raw_meta["architecture"] == "tiny_cnn"
    raw_meta["architecture"] = "resnet18"
    raw_meta["arch_kwargs"] = json.dumps({"num_classes": 10})
    bad = tmp_path / "other.safetensors"
    save_file(load_file(str(src)), str(bad), metadata=raw_meta)
    res = _eval_fails(cli, bad, trained.data, tmp_path / "results.json")
    assert "resnet18" in res.error


# ---------------------------------------------------------------- overwrite and resume
def test_training_twice_into_one_run_dir_is_refused(cli, run_copy: Path, trained: TrainedRun):
    before = file_bytes(run_copy)
    assert set(before) == set(RUN_FILES)
    res = cli(*fast_train_flags(trained.data, run_copy, epochs=2))
    assert res.code == 2
    assert "--resume" in res.error
    assert file_bytes(run_copy) == before
    assert not tmp_files(run_copy)


def test_resume_with_other_options_names_them(cli, run_copy: Path, trained: TrainedRun):
    before = file_bytes(run_copy)
    res = cli(*fast_train_flags(trained.data, run_copy, epochs=3, lr=0.05), "--resume")
    assert res.code == 2
    assert "lr" in res.error
    assert file_bytes(run_copy) == before


def test_resume_continues_a_finished_run(cli, tiny_npz_data: Path, tmp_path: Path):
    run = tmp_path / "run"
    first = cli(*fast_train_flags(tiny_npz_data, run, epochs=1))
    assert first.code == 0, first.err
    lines_before = metrics_lines(run)
    assert len(lines_before) == 2  # header + epoch 1

    res = cli(*fast_train_flags(tiny_npz_data, run, epochs=2), "--resume", "--json")
    assert res.code == 0, res.err
    doc = json.loads(res.out)
    assert doc["resumed_from_epoch"] == 1
    lines = metrics_lines(run)
    assert len(lines) == 3
    # the extended schedule adds a schedule_epochs column; epoch 1's values are unchanged
    assert lines[0] == lines_before[0] + ",schedule_epochs"
    assert lines[1].startswith(lines_before[1] + ",")
    assert [int(r["epoch"]) for r in metrics_rows(run)] == [1, 2]
    assert metrics_rows(run)[1]["schedule_epochs"] == "2"
    assert int(load_state(run / "state.pt")["epoch"]) == 2
    assert load_model(run).checkpoint_metadata["epochs"] == 2


# ------------------------------------------------------------------------ kill and resume
KILL_EPOCHS = 30


def _start_training(data: Path, run: Path) -> subprocess.Popen[str]:
    argv = fast_train_flags(data, run, epochs=KILL_EPOCHS)
    env = {**os.environ, "ADVEDGE_DEBUG": "0"}
    return subprocess.Popen(
        [sys.executable, "-m", "advedge.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        # Python only turns SIGINT into KeyboardInterrupt if SIGINT is not ignored at start-up
        # (it is, in background jobs of a non-interactive shell).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _wait_for_first_epoch(proc: subprocess.Popen[str], run: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    metrics = run / "metrics.csv"
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text(encoding="utf-8").splitlines()) >= 2:
            return
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"training exited early with {proc.returncode}:\n{err}")
        time.sleep(0.05)
    pytest.fail("training wrote no metrics row in time")


@dataclass
class Interrupted:
    data: Path
    run: Path
    code: int
    err: str
    lines_seen: list[str]


def _interrupt(data: Path, run: Path, sig: int) -> Interrupted:
    """Train in a child process, send ``sig`` once an epoch is on disk, wait for the end."""
    proc = _start_training(data, run)
    try:
        _wait_for_first_epoch(proc, run)
        lines_seen = metrics_lines(run)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return Interrupted(data, run, proc.returncode, err, lines_seen)


@pytest.fixture(scope="module")
def killed(tiny_npz_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Interrupted:
    run = tmp_path_factory.mktemp("cli_sigkill") / "run"
    return _interrupt(tiny_npz_data, run, signal.SIGKILL)


@pytest.fixture(scope="module")
def interrupted(tiny_npz_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Interrupted:
    run = tmp_path_factory.mktemp("cli_sigint") / "run"
    return _interrupt(tiny_npz_data, run, signal.SIGINT)


def _check_checkpoint_and_resume(cli, state: Interrupted) -> None:
    run = state.run
    assert not tmp_files(run), tmp_files(run)
    lines_now = metrics_lines(run)
    assert lines_now[: len(state.lines_seen)] == state.lines_seen  # completed epochs intact
    n_csv = len(lines_now) - 1
    n_state = int(load_state(run / "state.pt")["epoch"])
    model = load_model(run)
    n_model = int(model.checkpoint_metadata["epochs"])
    # state.pt, then model.safetensors, then metrics.csv are written, each atomically
    assert n_state >= n_model >= n_csv >= 1
    assert n_state - n_csv <= 1
    assert n_state < KILL_EPOCHS

    res = cli(*fast_train_flags(state.data, run, epochs=n_state + 1), "--resume", "--json")
    assert res.code == 0, res.err
    assert json.loads(res.out)["resumed_from_epoch"] == n_state
    rows = metrics_rows(run)
    assert [int(r["epoch"]) for r in rows] == list(range(1, n_state + 2))
    # the shortened schedule (30 -> n_state + 1 epochs) is recorded in a schedule_epochs column;
    # the completed epochs' values are unchanged
    after = metrics_lines(run)
    assert after[0] == lines_now[0] + ",schedule_epochs"
    assert all(
        a.startswith(b + ",") for a, b in zip(after[1 : n_csv + 1], lines_now[1:], strict=True)
    )
    assert rows[-1]["schedule_epochs"] == str(n_state + 1)
    assert int(load_state(run / "state.pt")["epoch"]) == n_state + 1
    assert not tmp_files(run)


def test_sigkill_then_resume(cli, killed: Interrupted):
    assert killed.code == -signal.SIGKILL
    _check_checkpoint_and_resume(cli, killed)


def test_sigint_keeps_completed_epochs_then_resume(cli, interrupted: Interrupted):
    assert "Traceback" not in interrupted.err
    _check_checkpoint_and_resume(cli, interrupted)


def test_sigint_exits_130_and_mentions_resume(interrupted: Interrupted):
    assert interrupted.code == 130
    resume_lines = [line for line in interrupted.err.splitlines() if "--resume" in line]
    assert len(resume_lines) == 1


# ---------------------------------------------------------------------------- debug switch
def test_debug_env_shows_traceback(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    argv = fast_train_flags(tmp_path / "missing", tmp_path / "run")
    monkeypatch.delenv("ADVEDGE_DEBUG", raising=False)
    quiet = cli(*argv)
    assert quiet.code == 1
    assert "Traceback" not in quiet.err
    assert quiet.error

    monkeypatch.setenv("ADVEDGE_DEBUG", "1")
    loud = cli(*argv)
    assert loud.code == 1
    assert "Traceback" in loud.err
    assert "DataError" in loud.err
    assert len([line for line in loud.err.splitlines() if line.startswith("error:")]) == 1


# ---------------------------------------------------------------------------- --config YAML
def _write_config(path: Path, options: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(options), encoding="utf-8")
    return path


def test_config_file_options_are_used(cli, tiny_npz_data: Path, tmp_path: Path):
    run = tmp_path / "run"
    options = {
        "data": str(tiny_npz_data),
        "model": "tiny_cnn",
        "out": str(run),
        "method": "natural",
        "epochs": 1,
        "lr": 0.05,
        "subset": 32,
        "batch_size": 32,
        "steps": 1,
        "eval_n": 8,
        "device": "cpu",
    }
    cfg = _write_config(tmp_path / "train.yaml", options)
    res = cli("train", "--config", cfg, "--json")
    assert res.code == 0, res.err
    written = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    for key in ("method", "epochs", "lr", "subset", "batch_size", "eval_n"):
        assert written[key] == options[key], key
    assert len(metrics_rows(run)) == 1


def test_config_file_flags_override(cli, tiny_npz_data: Path, tmp_path: Path):
    run = tmp_path / "run"
    cfg = _write_config(tmp_path / "train.yaml", {"epochs": 3, "method": "trades"})
    res = cli(*fast_train_flags(tiny_npz_data, run, epochs=1, method="natural"), "--config", cfg)
    assert res.code == 0, res.err
    written = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    assert written["epochs"] == 1
    assert written["method"] == "natural"
    assert len(metrics_rows(run)) == 1


def test_config_file_dashed_keys(cli, tiny_npz_data: Path, tmp_path: Path):
    run = tmp_path / "run"
    cfg = _write_config(tmp_path / "train.yaml", {"eval-n": 8, "weight-decay": 0.001})
    argv = fast_train_flags(tiny_npz_data, run, method="natural", **{"eval-n": None})
    res = cli(*argv, "--config", cfg)
    assert res.code == 0, res.err
    written = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    assert written["eval_n"] == 8
    assert written["weight_decay"] == pytest.approx(0.001)


def test_config_file_unknown_key_suggests(cli, tiny_npz_data: Path, tmp_path: Path):
    run = tmp_path / "run"
    cfg = _write_config(tmp_path / "train.yaml", {"epoch": 3})
    res = cli(*fast_train_flags(tiny_npz_data, run), "--config", cfg)
    assert res.code == 2
    assert "epoch" in res.error
    assert "'epochs'" in res.error
    assert not run.exists()


def test_config_file_missing_or_not_a_mapping(cli, tiny_npz_data: Path, tmp_path: Path):
    run = tmp_path / "run"
    res = cli(*fast_train_flags(tiny_npz_data, run), "--config", tmp_path / "nope.yaml")
    assert res.code == 2
    assert "nope.yaml" in res.error
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n", encoding="utf-8")
    res = cli(*fast_train_flags(tiny_npz_data, run), "--config", listed)
    assert res.code == 2
    assert "mapping" in res.error
    assert not run.exists()


# ------------------------------------------------ --config for distill and purifier train
def _distill_options(trained: TrainedRun, out: Path) -> dict[str, Any]:
    return {
        "teacher": str(trained.run),
        "student": "tiny_cnn",
        "method": "kd",
        "data": str(trained.data),
        "epochs": 3,
        "out": str(out),
        "subset": 32,
        "batch-size": 32,
        "steps": 1,
        "eval_n": 8,
        "device": "cpu",
    }


def _purifier_options(trained: TrainedRun, out: Path) -> dict[str, Any]:
    return {
        "classifier": str(trained.run),
        "data": str(trained.data),
        "epochs": 3,
        "out": str(out),
        "subset": 32,
        "batch_size": 16,
        "steps": 1,
        "width": 8,
        "eval-n": 8,
        "device": "cpu",
    }


CONFIGURED = {
    "distill": (("distill",), _distill_options),
    "purifier train": (("purifier", "train"), _purifier_options),
}


@pytest.mark.parametrize("command", sorted(CONFIGURED))
def test_config_file_gives_every_option_and_flags_win(
    command: str, cli, trained: TrainedRun, tmp_path: Path
):
    words, options = CONFIGURED[command]
    run = tmp_path / "run"
    cfg = _write_config(tmp_path / "run.yaml", options(trained, run))
    res = cli(*words, "--config", cfg, "--epochs", 1, "--json")  # required options from the file
    assert res.code == 0, res.err
    doc = json.loads(res.out)
    assert doc["epochs"] == 1  # the flag beat the file's 3
    assert doc["out"] == str(run)
    assert len(metrics_rows(run)) == 1


@pytest.mark.parametrize("command", sorted(CONFIGURED))
@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"epoch": 1}, "unknown config key 'epoch' (did you mean 'epochs'"),
        ({"resume": True}, "unknown config key 'resume'"),
        ({"epochs": True}, "config key 'epochs' must be an integer{null}, got True"),
        ({"lr": "fast"}, "config key 'lr' must be a finite number{null}, got 'fast'"),
    ],
)
def test_config_file_keys_and_values_are_checked(
    command: str, extra: dict[str, Any], expected: str, cli, trained: TrainedRun, tmp_path: Path
):
    # A training run's epochs and lr may be null: the method's published value.
    expected = expected.format(null="" if command == "purifier train" else " or null")
    words, options = CONFIGURED[command]
    run = tmp_path / "run"
    cfg = _write_config(tmp_path / "run.yaml", {**options(trained, run), **extra})
    res = cli(*words, "--config", cfg)
    assert res.code == 2
    assert expected in res.error
    assert not run.exists()


@pytest.mark.parametrize("command", sorted(CONFIGURED))
def test_config_file_without_a_required_option_is_a_usage_error(
    command: str, cli, trained: TrainedRun, tmp_path: Path
):
    words, options = CONFIGURED[command]
    run = tmp_path / "run"
    given = options(trained, run)
    del given["data"]
    res = cli(*words, "--config", _write_config(tmp_path / "run.yaml", given))
    assert res.code == 2
    assert "Missing option '--data'" in res.error
    res = cli(*words, "--config", tmp_path / "nope.yaml")
    assert res.code == 2
    assert "nope.yaml" in res.error
    assert not run.exists()


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        (
            ["train"],
            "Attack step size [default: the method's: eps/4; 1.25*eps for fgsm-rs; 0.007/0.031*eps for trades].",
        ),
        (["eval"], "instead of a suite [default: fgsm,pgd,cw,mifgsm]."),
        (["distill"], "Temperature tau [default: the method's]."),
        (["calibrate"], "Calibration-range cache [default: ~/.cache/advedge]."),
    ],
)
def test_help_keeps_bracketed_defaults(command, shown, capsys, monkeypatch):
    """rich must not read a help text's "[default: ...]" as a markup tag and drop it."""
    monkeypatch.setenv("COLUMNS", "240")
    assert main([*command, "--help"]) == 0
    out = capsys.readouterr().out
    assert shown in out
    assert " .  " not in out and " . " not in out.replace("...", "")

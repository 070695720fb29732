"""What the CLI says and how: ``--quiet``/``--verbose``, a dataset reported once per process,
plain progress lines when stderr is a log file, and accuracies in percent in every human table."""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path

import pytest
from rich.console import Console

from advedge.cli import main
from advedge.cli.output import Output


def _train(data: Path, out: Path, *root_options: str) -> list[str]:
    """``advedge [ROOT_OPTIONS] train`` of a tiny natural run (``--resume`` on a new folder logs
    "nothing to resume" at debug)."""
    words = ["train", "--data", str(data), "--model", "tiny_cnn", "--method", "natural"]
    words += ["--out", str(out), "--epochs", "1", "--batch-size", "32", "--eval-n", "16"]
    return [*root_options, *words, "--resume", "--device", "cpu"]


@pytest.mark.parametrize(
    ("options", "shown", "hidden"),
    [
        ((), ["loaded fresh from"], ["nothing to resume"]),
        (("--verbose",), ["loaded fresh from", "nothing to resume"], []),
        (("-q",), [], ["loaded fresh from", "nothing to resume", "epoch 1"]),
    ],
    ids=["default", "verbose", "quiet"],
)
def test_quiet_and_verbose_set_what_the_log_shows(
    npz_dataset_factory, tmp_path, capsys, options, shown, hidden
):
    data = npz_dataset_factory("fresh", n_train=64)  # a folder this process never loaded
    assert main(_train(data, tmp_path / "run", *options)) == 0
    captured = capsys.readouterr()
    err = " ".join(captured.err.split())
    for text in shown:
        assert text in err, err
    for text in hidden:
        assert text not in err, err
    if "-q" in options:
        assert captured.err == ""  # no progress, no status: warnings and errors only
    assert "advedge train" in captured.out  # the result is never hidden


def test_quiet_and_verbose_together_are_one_usage_error(capsys):
    assert main(["--quiet", "--verbose", "models"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: --quiet and --verbose exclude each other"


def test_a_global_option_after_the_command_says_where_it_goes(capsys):
    assert main(["models", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: --quiet goes before the command: advedge --quiet models ..."


def test_each_run_starts_from_the_default_level(capsys):
    """``main`` is called again in the same process (tests, notebooks): --quiet does not stick."""
    assert main(["--quiet", "models", "--json"]) == 0
    assert logging.getLogger("advedge").getEffectiveLevel() == logging.WARNING
    assert main(["models", "--json"]) == 0
    assert logging.getLogger("advedge").getEffectiveLevel() == logging.INFO
    capsys.readouterr()


def test_a_dataset_loaded_twice_is_reported_once(npz_dataset_factory):
    from advedge.data import load_dataset

    class Records(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.DEBUG)
            self.records: list[logging.LogRecord] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.records.append(record)

    data = npz_dataset_factory("twice")
    logger, handler = logging.getLogger("advedge.data"), Records()
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        load_dataset(str(data))
        load_dataset(str(data.parent / ".." / data.parent.name / data.name))  # the same folder
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
    loaded = [r for r in handler.records if r.getMessage().startswith("loaded twice")]
    assert [r.levelno for r in loaded] == [logging.INFO, logging.DEBUG]


# ------------------------------------------------------------------ progress in a log file
def _file_output() -> tuple[Output, io.StringIO]:
    """An Output whose stderr is a file (not a terminal), as with ``2> log.txt``."""
    output = Output(False)
    sink = io.StringIO()
    output.err = Console(file=sink, force_terminal=False, width=200)
    return output, sink


def test_pipeline_progress_writes_lines_when_stderr_is_a_file(monkeypatch):
    from advedge.cli.progress import PipelineProgress

    output, sink = _file_output()
    clock = iter([0.0, 1.0, 2.0, 40.0, 41.0])
    monkeypatch.setattr("advedge.cli.progress._now", lambda: next(clock))
    bars = PipelineProgress(output, ("teacher", "bench"))
    with bars:
        bars.on_stage("teacher", "training tiny_cnn")  # 0 s: a stage's message, always
        bars.on_train_start(start_epoch=0, epochs=1, batches_per_epoch=9)
        bars.on_batch_end(epoch=0, batch=0)  # 1 s: too soon after the last line
        bars.on_stage("bench", "student: timing batch 1")  # 2 s: always
        bars.on_batch_end(epoch=0, batch=5)  # 40 s: PLAIN_INTERVAL (30 s) later
        bars.on_batch_end(epoch=0, batch=6)  # 41 s: too soon
    lines = sink.getvalue().splitlines()
    assert lines == [
        "pipeline: teacher: training tiny_cnn",
        "pipeline: bench: student: timing batch 1",
        "pipeline: bench: epoch 1/1 batch 6/9",
    ]


def test_no_progress_lines_on_a_terminal_or_when_quiet(monkeypatch):
    from advedge.cli.progress import PipelineProgress

    output, sink = _file_output()
    logging.getLogger("advedge").setLevel(logging.WARNING)  # what --quiet does
    try:
        bars = PipelineProgress(output, ("teacher",))
        with bars:
            bars.on_stage("teacher", "training tiny_cnn")
    finally:
        logging.getLogger("advedge").setLevel(logging.INFO)
    assert sink.getvalue() == ""


# ------------------------------------------------------------------ one unit: percent
def _render(table) -> str:
    console = Console(file=io.StringIO(), width=200, record=True)
    console.print(table)
    return console.export_text()


def test_eval_table_shows_percent_with_one_decimal():
    from advedge.cli.evaluate import _results_table

    result = {
        "suite": "quick",
        "eps": 8 / 255,
        "norm": "Linf",
        "n_examples": 200,
        "clean_acc": 0.455,
        "clean_acc_ci95": [0.3875, 0.5242],
        "attacks": [
            {
                "name": "pgd",
                "kind": "white-box",
                "robust_acc": 0.21,
                "robust_acc_ci95": [0.1608, 0.2697],
                "seconds": 3.0,
            }
        ],
        "worst_case_acc": 0.145,
        "worst_case_acc_ci95": [0.1031, 0.2002],
        "seconds": 9.0,
    }
    text = _render(_results_table(result))
    assert "accuracy %" in text
    assert re.search(r"clean .* 45\.5 .* \[38\.8, 52\.4\]", text), text
    assert re.search(r"pgd .* 21\.0 .* \[16\.1, 27\.0\]", text), text
    assert re.search(r"worst case .* 14\.5 .* \[10\.3, 20\.0\]", text), text
    assert "0.455" not in text and "0.1450" not in text


def test_training_table_shows_accuracies_in_percent():
    from advedge.cli.output import metrics_table

    rows = [{"epoch": 1, "train_loss": 2.3, "train_acc": 0.0885, "test_clean_acc": 0.125}]
    text = _render(metrics_table("advedge train", rows))
    assert "train %" in text and "test clean %" in text and "train_loss" in text
    assert re.search(r"│ 1 +│ 2\.3 +│ 8\.8 +│ 12\.5 +│", text), text


def test_export_table_shows_accuracies_in_percent():
    from advedge.cli.export import _artifacts_table

    artifact = {
        "path": "/x/tiny_cnn.int8.onnx",
        "kind": "classifier",
        "precision": "int8",
        "bytes": 20_000,
        "accuracy_report": {
            "accuracy": {"int8": {"clean_acc": 0.4375, "transfer_robust_acc": 0.09375}}
        },
    }
    text = _render(_artifacts_table([artifact]))
    assert "clean %" in text and "transfer %" in text
    assert re.search(r"int8 .* 43\.8 .* 9\.4 ", text), text


def test_percent_keeps_json_fractions_apart():
    from advedge.cli.output import percent

    assert percent(0.4550) == "45.5"
    assert percent(1.0) == "100.0"
    assert percent(None) == ""


def test_plain_lines_are_rate_limited_per_bar(monkeypatch):
    """A training run written to a log file: one batch line per PLAIN_INTERVAL at most."""
    from advedge.cli.progress import PLAIN_INTERVAL, TrainProgress

    output, sink = _file_output()
    bars = TrainProgress(output)
    now = iter([100.0, 101.0, 101.0 + PLAIN_INTERVAL])
    monkeypatch.setattr("advedge.cli.progress._now", lambda: next(now))
    with bars:
        bars.on_train_start(start_epoch=0, epochs=1, batches_per_epoch=3)
        for batch in range(3):
            bars.on_batch_end(epoch=0, batch=batch, loss=1.0, acc=0.5)
    assert sink.getvalue().splitlines() == ["epoch 1: batch 1/3", "epoch 1: batch 3/3"]

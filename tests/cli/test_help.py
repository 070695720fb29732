"""``--help`` of every command: flags show no ``<bool>`` metavar, options with a fixed set of
values list those values (from the registries where they come from one)."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
import typer

from advedge.cli import app, main


def _commands(group, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], object]]:
    """Every command and group of the app, by its words (``()`` is ``advedge`` itself)."""
    yield path, group
    for name, sub in getattr(group, "commands", {}).items():
        yield from _commands(sub, (*path, name))


COMMANDS = dict(_commands(typer.main.get_command(app)))


def _help(words: tuple[str, ...], capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "200")
    assert main([*words, "--help"]) == 0
    return capsys.readouterr().out


def _option_row(text: str, option: str) -> str:
    """The help's row of ``option`` and the rows under it up to the next option (a metavar of
    many choices spans lines)."""
    match = re.search(
        rf"│\s+(?:\*\s+)?{re.escape(option)}\s.*?(?=│\s+(?:\*\s+)?--[a-z]|╰)", text, re.S
    )
    assert match, f"{option} not in the help"
    return match.group(0)


def test_the_walk_finds_every_command():
    names = {" ".join(words) for words in COMMANDS}
    assert {"", "train", "distill", "eval", "export", "calibrate", "bench", "pipeline"} <= names
    assert {"purifier", "purifier train", "models", "report", "doctor", "qat"} <= names


@pytest.mark.parametrize("words", sorted(COMMANDS), ids=lambda w: " ".join(w) or "advedge")
def test_no_flag_shows_a_bool_metavar(words, capsys, monkeypatch):
    text = _help(words, capsys, monkeypatch)
    assert "<bool>" not in text
    assert "Show this message and exit." in text  # the help itself was shown, with -h/--help
    flags = [
        p for p in COMMANDS[words].params if getattr(p, "is_flag", False) and p.opts[0] != "--help"
    ]
    for flag in flags:
        row = _option_row(text, flag.opts[0])
        assert "<" not in row.split(flag.opts[0], 1)[1].split("  ")[1], row


def _names(module: str, attribute: str) -> list[str]:
    import importlib

    return list(getattr(importlib.import_module(module), attribute))


# (command, option, the values its help must list)
CHOICES = [
    (("train",), "--model", lambda: _names("advedge.models.registry", "MODELS")),
    (("train",), "--method", lambda: _names("advedge.training.objectives", "TRAINING_METHODS")),
    (("train",), "--norm", lambda: ["Linf", "L2"]),
    (("train",), "--schedule", lambda: ["cosine", "multistep", "constant"]),
    (("train",), "--amp", lambda: ["auto", "bf16", "fp16", "off"]),
    (("distill",), "--student", lambda: _names("advedge.models.registry", "MODELS")),
    (("distill",), "--method", lambda: _names("advedge.training.distillation", "DISTILL_METHODS")),
    (
        ("purifier", "train"),
        "--method",
        lambda: _names("advedge.purifier.train", "PURIFIER_METHODS"),
    ),
    (("purifier", "train"), "--gan", lambda: ["lsgan", "nsgan"]),
    (("eval",), "--suite", lambda: _names("advedge.evaluation.suites", "SUITES")),
    (("eval",), "--attacks", lambda: _names("advedge.attacks", "ATTACKS")),
    (("eval",), "--norm", lambda: ["Linf", "L2"]),
    (("export",), "--precision", lambda: _names("advedge.export.precisions", "PRECISIONS")),
    (("export",), "--calib-method", lambda: _names("advedge.calibration", "CALIBRATION_METHODS")),
    (("export",), "--int8-target", lambda: ["tensorrt", "onnxruntime-cpu"]),
    (("export",), "--trt-calibrator", lambda: ["qdq", "legacy-entropy", "legacy-minmax"]),
    (("calibrate",), "--method", lambda: _names("advedge.calibration", "CALIBRATION_METHODS")),
    (("calibrate",), "--target", lambda: ["tensorrt", "onnxruntime-cpu"]),
    (("qat",), "--method", lambda: _names("advedge.training.distillation", "DISTILL_METHODS")),
    (("qat",), "--schedule", lambda: ["cosine", "constant"]),
    (("qat",), "--calib-method", lambda: _names("advedge.calibration", "CALIBRATION_METHODS")),
    (("pipeline",), "--preset", lambda: _names("advedge.workflow", "PRESETS")),
    (("doctor",), "--backend", lambda: _names("advedge.export.runtime", "BACKENDS")),
]


@pytest.mark.parametrize(
    ("words", "option", "values"), CHOICES, ids=[f"{' '.join(w)} {o}" for w, o, _ in CHOICES]
)
def test_an_option_with_a_fixed_set_of_values_lists_them(
    words, option, values, capsys, monkeypatch
):
    row = _option_row(_help(words, capsys, monkeypatch), option)
    assert "<str>" not in row
    # the metavar column: [a|b|c], broken into lines after a "|" when long
    lines = row.splitlines()
    column = lines[0].index("[")
    parts = []
    for line in lines:
        parts.append(line[column:].strip().split("  ")[0])
        if "]" in parts[-1]:
            break
    metavar = "".join(parts)
    # "[a|b|c]", or "[a|b|c],..." for a comma-separated list (--attacks)
    assert metavar.startswith("[") and metavar.endswith(("]", "],...")), row
    assert metavar[1:].split("]")[0].split("|") == values(), row


def test_an_unknown_choice_is_still_refused_with_a_suggestion(tiny_npz_data, tmp_path, capsys):
    """The choices are shown, not enforced by click: the library's check (one line, a close
    match, exit code 2) still answers a typo, before any data is loaded."""
    words = ["train", "--data", str(tiny_npz_data), "--model", "tiny_cnn"]
    rc = main([*words, "--out", str(tmp_path / "run"), "--method", "pgd-att"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "pgd-at" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()

"""`advedge distill`: every method runs in the shared engine; the teacher is checked first."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import argv, train_tiny, write_npz_dataset

from advedge.checkpoint import load_model, read_metadata
from advedge.cli import main
from advedge.models import create_model
from advedge.training.distillation import DISTILL_METHODS, _StudentTeacher


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("distill")
    data = write_npz_dataset(root / "data", n_train=64, n_test=32, size=16)
    return data, train_tiny(data, root / "teacher")


@pytest.mark.parametrize("method", sorted(DISTILL_METHODS))
def test_every_method_distils_and_records_its_teacher(method, teacher_run, tmp_path, capsys):
    data, teacher = teacher_run
    out = tmp_path / method
    code = main(
        argv(
            "distill",
            teacher=teacher,
            student="resnet8",
            method=method,
            data=data,
            epochs=1,
            out=out,
            batch_size=32,
            steps=2,
            eval_n=16,
            json=True,
        )
    )
    assert code == 0, capsys.readouterr().err
    payload = json.loads(capsys.readouterr().out)
    assert payload["method"] == method and payload["final"]["epoch"] == 1
    meta = read_metadata(out)
    assert meta["method"] == method and meta["architecture"] == "resnet8"
    assert meta["teacher"]["architecture"] == "tiny_cnn"
    assert len(meta["teacher"]["sha256"]) == 64
    assert load_model(out).num_classes == 10


def test_teacher_stays_frozen_and_in_eval_mode(teacher_run):
    _, teacher_dir = teacher_run
    teacher = load_model(teacher_dir)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    method = DISTILL_METHODS["adaad"](teacher=teacher, eps=8 / 255, alpha=2 / 255, steps=2)
    student = create_model("tiny_cnn", num_classes=10).train()
    out = method.loss(student, torch.rand(8, 3, 16, 16), torch.zeros(8, dtype=torch.long))
    out.loss.backward()
    assert not teacher.training and student.training
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert all(p.grad is None for p in teacher.parameters())
    pair = _StudentTeacher(student, teacher).train()
    assert pair.student.training and not pair.teacher.training


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--temperature", "0"], "temperature"),
        (["--alpha", "1.5"], "alpha"),
        (["--student", "resnet81"], "resnet18"),
        (["--method", "iadd"], "iad"),
        (["--method", "rslda"], "rslad"),
    ],
)
def test_bad_options_fail_before_training(extra, needle, teacher_run, tmp_path, capsys):
    data, teacher = teacher_run
    args = argv("distill", teacher=teacher, student="tiny_cnn", method="rslad", data=data)
    args += argv(epochs=1, out=tmp_path / "run")
    for i in range(0, len(extra), 2):
        if extra[i] in args:
            args[args.index(extra[i]) + 1] = extra[i + 1]
        else:
            args += extra[i : i + 2]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_missing_corrupt_or_mismatched_teacher(teacher_run, tmp_path, capsys):
    data, teacher = teacher_run
    base = ["distill", "--student", "tiny_cnn", "--method", "add", "--epochs", "1"]
    assert (
        main(
            [
                *base,
                "--teacher",
                str(tmp_path / "nope"),
                "--data",
                str(data),
                "--out",
                str(tmp_path / "a"),
            ]
        )
        == 1
    )
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\\x00" * 40)
    assert (
        main([*base, "--teacher", str(bad), "--data", str(data), "--out", str(tmp_path / "b")]) == 1
    )
    five = write_npz_dataset(tmp_path / "five", num_classes=5, n_train=20, n_test=10, size=16)
    assert (
        main([*base, "--teacher", str(teacher), "--data", str(five), "--out", str(tmp_path / "c")])
        == 2
    )
    err = capsys.readouterr().err
    assert "5" in err and "classes" in err
    assert not any((tmp_path / d).exists() for d in ("a", "b", "c"))


def test_iad_switches_on_its_introspective_term_after_the_warm_up(teacher_run):
    _, teacher_dir = teacher_run
    method = DISTILL_METHODS["iad"](
        teacher=load_model(teacher_dir), eps=8 / 255, alpha=2 / 255, steps=1, warmup=0.5
    )
    assert method.settings()["beta"] == 0.1 and method.settings()["warmup"] == 0.5
    student = create_model("tiny_cnn", num_classes=10).eval()  # fixed BN statistics
    x, y = torch.rand(8, 3, 16, 16), torch.arange(8) % 10
    losses = []
    for epoch in (0, 1, 2):
        method.on_epoch_start(epoch, 4)
        torch.manual_seed(0)
        losses.append(method.loss(student, x, y).loss.item())
    assert method.introspective
    # Epoch 0 and 1 are the warm-up (plain ARD, same loss); epoch 2 adds a positive term.
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    assert losses[2] > losses[1]


@pytest.mark.parametrize("method", ["kd", "dd", "ard", "rslad", "add"])
def test_teacher_runs_once_per_batch(method, teacher_run):
    """The teacher's soft labels are computed once per batch and reused by attack and loss."""
    _, teacher_dir = teacher_run
    teacher = load_model(teacher_dir)
    seen = []
    teacher.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[0]))
    m = DISTILL_METHODS[method](teacher=teacher, eps=8 / 255, alpha=2 / 255, steps=3)
    student = create_model("tiny_cnn", num_classes=10).train()
    m.loss(student, torch.rand(8, 3, 16, 16), torch.arange(8) % 10).loss.backward()
    assert seen == [8]


def test_add_at_its_defaults_trains_bit_for_bit_as_rslad(teacher_run, tmp_path):
    """ADD at (tau 1, mix 5/6) is RSLAD: same attack, same loss, same weights after training.

    The distillation study relies on this to reuse the RSLAD run as ADD's default point.
    """
    from advedge.training.engine import TrainConfig, train

    data, teacher = teacher_run

    def run(method: str, **kw: object) -> dict[str, torch.Tensor]:
        cfg = TrainConfig(
            data=str(data),
            model="tiny_cnn",
            method=method,
            teacher=str(teacher),
            epochs=1,
            out=str(tmp_path / f"{method}{len(kw)}"),
            batch_size=32,
            steps=2,
            eval_n=16,
            channels_last=False,
            **kw,  # type: ignore[arg-type]
        )
        train(cfg)
        return load_model(cfg.out).state_dict()

    rslad, add = run("rslad"), run("add")
    assert all(torch.equal(rslad[k], add[k]) for k in rslad)
    tau2 = run("add", temperature=2.0)
    assert not all(torch.equal(rslad[k], tau2[k]) for k in rslad)

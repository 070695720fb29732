"""`advedge purifier train` and `advedge eval --purifier`: training, resume, protocol, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from advedge.checkpoint import read_metadata
from advedge.cli import main
from advedge.models.purified import Purified
from advedge.purifier import Generator, load_purifier, save_purifier
from advedge.purifier.train import PurifierConfig, PurifierTrainer


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    from conftest import train_tiny, write_npz_dataset

    root = tmp_path_factory.mktemp("purifier")
    data = write_npz_dataset(root / "data", n_train=48, n_test=24, size=16)
    runs = {}
    for name, seed in (("clf", 0), ("other", 1)):
        opts = dict(batch_size=16, eval_n=8, seed=seed, channels_last=False)
        runs[name] = train_tiny(data, root / name, **opts)
    return {"root": root, "data": data, **runs}


def _train_argv(setup, out: Path, *extra: str) -> list[str]:
    from conftest import argv

    args = argv("purifier", "train", classifier=setup["clf"], data=setup["data"], epochs=1, out=out)
    return [*args, *argv(batch_size=16, steps=1, width=8, eval_n=8), *extra]


@pytest.mark.parametrize("method", ["ipcm", "ape-gan", "hgd"])
def test_every_method_trains_resumes_and_records(method, setup, tmp_path, capsys):
    out = tmp_path / method
    assert main([*_train_argv(setup, out, "--method", method), "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["method"] == method and payload["final"]["epoch"] == 1
    meta = read_metadata(out / "purifier.safetensors")
    assert meta["kind"] == "purifier" and meta["method"] == method
    assert meta["classifier"]["architecture"] == "tiny_cnn"
    assert len(meta["classifier"]["sha256"]) == 64
    assert meta["eps_r"] == pytest.approx(1.25 * 8 / 255)
    gen = load_purifier(out)
    assert gen.width == 8 and not gen.training
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    for col in ("g_loss", "inv_loss", "test_clean_acc", "test_greybox_pgd_acc"):
        assert col in header
    assert ("d_loss" in (out / "metrics.csv").read_text().splitlines()[1].split(",")[2]) is False
    # The discriminator lives only in the resume state; resuming adds an epoch.
    argv = _train_argv(setup, out, "--method", method)
    argv[argv.index("--epochs") + 1] = "2"
    assert main([*argv, "--resume", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["resumed_from_epoch"] == 1 and len(payload["metrics"]) == 2
    # Training into the finished run without --resume is refused, and nothing is lost.
    before = (out / "purifier.safetensors").read_bytes()
    assert main(_train_argv(setup, out, "--method", method)) == 2
    assert (out / "purifier.safetensors").read_bytes() == before


def test_generator_only_in_the_purifier_file(setup, tmp_path):
    out = tmp_path / "p"
    assert main(_train_argv(setup, out)) == 0
    from safetensors import safe_open

    with safe_open(str(out / "purifier.safetensors"), framework="pt") as fh:
        keys = list(fh.keys())
    assert keys and not any(k.startswith("disc") for k in keys)
    gen = load_purifier(out)
    assert set(keys) == set(gen.state_dict())


def test_training_steps_reduce_the_inverse_perturbation_loss(setup):
    cfg = PurifierConfig(
        classifier=str(setup["clf"]),
        data=str(setup["data"]),
        method="ipcm",
        out=str(setup["root"] / "unused"),
        width=8,
        steps=2,
        lr=3e-3,
    )
    trainer = PurifierTrainer(cfg)
    torch.manual_seed(0)
    gen = Generator(3, 8, eps_r=cfg.resolved_eps_r)
    from advedge.purifier import Discriminator

    disc = Discriminator(3, 8)
    opt_g = torch.optim.Adam(gen.parameters(), lr=cfg.lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.lr_d, betas=(0.5, 0.999))
    from advedge.data import to_tensor

    train_split = trainer.dataset.train
    x = to_tensor(train_split.x[:24])
    y = torch.as_tensor(train_split.y[:24])
    losses = []
    for _ in range(25):
        torch.manual_seed(1)  # the same attacked batch every step
        losses.append(trainer.step(gen, disc, opt_g, opt_d, x, y)["inv_loss"])
    assert losses[-1] < 0.8 * losses[0], losses


def test_eval_with_purifier_lists_every_setting(setup, tmp_path, capsys):
    pur = tmp_path / "p"
    assert main(_train_argv(setup, pur)) == 0
    capsys.readouterr()
    out = tmp_path / "eval.json"
    argv = ["eval", "--model", str(setup["clf"]), "--data", str(setup["data"])]
    argv += ["--purifier", str(pur), "--attacks", "pgd,cw", "--steps", "2", "--n", "16"]
    argv += ["--flags-n", "8", "--out", str(out), "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result == json.loads(out.read_text())
    kinds = {(e["name"], e["setting"], e["kind"]) for e in result["attacks"]}
    assert kinds == {
        ("pgd-greybox", "grey-box", "grey-box"),
        ("cw-greybox", "grey-box", "grey-box"),
        ("pgd-adaptive", "adaptive", "adaptive"),
        ("cw-adaptive", "adaptive", "adaptive"),
        ("pgd-bpda", "adaptive", "adaptive"),
    }
    assert result["purifier"]["same_classifier"] is True
    assert result["purifier"]["eot"].startswith("not run")
    assert 0 <= result["worst_case_acc"] <= min(result["worst_case_by_setting"].values())
    from advedge.stats import wilson_interval

    # the interval is the merged worst case's, over every setting, not one setting's
    merged = round(result["worst_case_acc"] * 16)
    assert result["worst_case_acc_ci95"] == pytest.approx(list(wilson_interval(merged, 16)))
    assert 0 <= result["clean_acc_no_purifier"] <= 1
    # A purifier trained against one classifier may guard another: allowed and recorded.
    argv[argv.index("--model") + 1] = str(setup["other"])
    argv[argv.index("--out") + 1] = str(tmp_path / "other.json")
    assert main(argv) == 0
    other = json.loads(capsys.readouterr().out)
    assert other["purifier"]["same_classifier"] is False
    assert other["purifier"]["trained_against"]["path"].endswith("model.safetensors")


def test_white_box_gradient_goes_through_the_generator(setup):
    from advedge.checkpoint import load_model

    f = load_model(setup["clf"])
    torch.manual_seed(0)
    gen = Generator(3, 8, eps_r=0.1).eval()
    torch.nn.init.normal_(gen.out.weight, std=0.5)  # a generator that is not the identity
    composed = Purified(gen, f).eval()
    x = torch.rand(4, 3, 16, 16, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3])
    loss = torch.nn.functional.cross_entropy(composed(x), y)
    (g_composed,) = torch.autograd.grad(loss, x)
    x2 = x.detach().requires_grad_(True)
    (g_f,) = torch.autograd.grad(torch.nn.functional.cross_entropy(f(x2), y), x2)
    assert g_composed.abs().sum() > 0
    assert not torch.allclose(g_composed, g_f, atol=1e-6)
    # The generator's parameters receive gradients too: the graph really includes G.
    loss = torch.nn.functional.cross_entropy(composed(x.detach()), y)
    loss.backward()
    assert gen.out.weight.grad is not None and gen.out.weight.grad.abs().sum() > 0


def test_bad_purifier_inputs(setup, tmp_path, capsys):
    base = ["eval", "--model", str(setup["clf"]), "--data", str(setup["data"]), "--n", "4"]
    base += ["--attacks", "pgd", "--steps", "1"]
    # A corrupt purifier file: one line, exit 1.
    bad = tmp_path / "bad" / "purifier.safetensors"
    bad.parent.mkdir()
    bad.write_bytes(b"\x00" * 64)
    assert main([*base, "--purifier", str(bad.parent)]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "purifier" in err
    # A classifier given as the purifier.
    assert main([*base, "--purifier", str(setup["clf"] / "model.safetensors")]) == 1
    assert "not a purifier" in capsys.readouterr().err
    # A 1-channel purifier in front of an RGB classifier.
    gray = tmp_path / "gray"
    gray.mkdir()
    save_purifier(
        Generator(1, 8, eps_r=0.05),
        gray / "purifier.safetensors",
        metadata={"input_shape": [1, 16, 16], "kind": "purifier"},
    )
    assert main([*base, "--purifier", str(gray)]) == 2
    err = capsys.readouterr().err
    assert "channel" in err and len(err.strip().splitlines()) == 1
    # eps_r <= 0 and an unknown method fail before training; nothing is written.
    assert main(_train_argv(setup, tmp_path / "x", "--eps-r", "0")) == 2
    assert main(_train_argv(setup, tmp_path / "y", "--method", "ape_gan")) == 2
    assert "ape-gan" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_purifier_needs_a_matching_classifier(setup, tmp_path, capsys):
    from conftest import write_npz_dataset

    five = write_npz_dataset(tmp_path / "five", num_classes=5, n_train=20, n_test=10, size=16)
    argv = _train_argv(setup, tmp_path / "p")
    argv[argv.index("--data") + 1] = str(five)
    assert main(argv) == 2
    assert "classes" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_training_batches_mix_attacks_and_clean_images_within_eps(setup, n):
    cfg = PurifierConfig(
        classifier=str(setup["clf"]), data=str(setup["data"]), out="unused", steps=1
    )
    trainer = PurifierTrainer(cfg)
    x = torch.rand(n, 3, 16, 16)
    y = torch.arange(n) % 10
    x_in = trainer._attacked_batch(x, y)
    assert x_in.shape == x.shape
    delta = (x_in - x).abs().flatten(1).amax(1)
    assert bool((delta <= cfg.eps + 1e-6).all())
    clean = n - 2 * n // 3
    assert bool((delta[n - clean :] == 0).all())  # the last third stays clean
    if n >= 3:
        assert bool((delta[: n - clean] > 0).all())


def test_resume_with_fewer_epochs_than_trained_is_refused(setup, tmp_path, capsys):
    out = tmp_path / "p"
    assert main(_train_argv(setup, out, "--epochs", "2")) == 0
    before = {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()}
    capsys.readouterr()
    assert main([*_train_argv(setup, out), "--resume"]) == 2  # --epochs 1 after 2 trained
    err = capsys.readouterr().err
    assert "trained 2 epochs" in err and err.count("error:") == 1
    assert {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()} == before

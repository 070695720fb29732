"""``advedge methods`` and the published defaults reaching a run's config.yaml."""

from __future__ import annotations

import json

import yaml

from advedge.cli.app import main
from advedge.training.distillation import DISTILL_METHODS
from advedge.training.objectives import TRAINING_METHODS
from advedge.training.official import OFFICIAL


def test_methods_lists_every_method_with_its_recipe(capsys):
    assert main(["methods", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["schema"] == "advedge.methods/1"
    rows = {r["method"]: r for r in doc["methods"]}
    assert set(rows) == set(TRAINING_METHODS) | set(DISTILL_METHODS)
    assert "wd 0.0002" in rows["rslad"]["optimiser"]
    assert "after epochs 215, 260, 285" in rows["rslad"]["epochs, schedule"]
    assert "BN train" in rows["ard"]["inner attack"]
    assert rows["ard"]["loss"] == "tau 30, mix 1, KL sum/(NK)"


def test_unset_options_take_the_methods_published_values(tiny_npz_data, tmp_path, capsys):
    run = tmp_path / "run"
    code = main(
        [
            "train",
            "--data",
            str(tiny_npz_data),
            "--model",
            "resnet8",
            "--method",
            "trades",
            "--epochs",
            "1",
            "--out",
            str(run),
            "--eval-n",
            "8",
            "--steps",
            "1",
            "--batch-size",
            "32",
        ]
    )
    assert code == 0, capsys.readouterr().err
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    recipe = OFFICIAL["trades"]
    assert cfg["weight_decay"] == recipe.weight_decay == 2e-4
    assert cfg["schedule"] == "multistep"
    assert cfg["milestones"] == [recipe.milestones[0]]
    assert cfg["attack_bn"] == "eval"
    assert cfg["alpha"] == 0.007 / 0.031 * cfg["eps"]  # the resolved step is written out
    assert cfg["lr"] == recipe.lr and cfg["steps"] == 1  # a given flag wins

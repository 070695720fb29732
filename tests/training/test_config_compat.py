"""Resume compatibility of run fingerprints across the per-method defaults (issue 15)."""

from __future__ import annotations

import pytest

from advedge.training.config import TrainConfig

# Fingerprints that advedge 0.1 (before per-method defaults) gave these configs: a run it
# started must still resume when the settings it actually used are given.
_LEGACY = {"lr": 0.1, "batch_size": 128, "weight_decay": 5e-4, "schedule": "cosine"}


@pytest.mark.parametrize(
    ("method", "given", "digest"),
    [
        ("pgd-at", {**_LEGACY, "attack_bn": "eval"}, "86bd57ce6767d043"),
        (
            "fgsm-rs",
            {"steps": 5, "weight_decay": 5e-4, "attack_bn": "eval", "lr": 0.1},
            "e624dbd434b7db84",
        ),
        ("natural", {}, "6e6cc6aff4bfcb78"),
    ],
)
def test_runs_started_before_per_method_defaults_still_resume(method, given, digest):
    cfg = TrainConfig(
        data="cifar10", model="resnet8", method=method, epochs=3, out="runs/x", **given
    )
    assert cfg.fingerprint() == digest


def test_new_defaults_do_not_resume_an_old_run_silently():
    # Madry's recipe (wd 2e-4, train-mode attack) is not the run advedge 0.1 made.
    assert TrainConfig(data="cifar10", model="resnet8", epochs=3, out="runs/x").fingerprint() != (
        "86bd57ce6767d043"
    )
    # TRADES' step changed (0.007/0.031 eps, was eps/4) though alpha is still unset.
    old = TrainConfig(
        data="cifar10", model="resnet8", method="trades", epochs=3, out="runs/x", **_LEGACY
    )
    assert old.fingerprint() != "29621e0cdcd03255"
    assert old.resolved_alpha == pytest.approx(0.007 / 0.031 * 8 / 255)

"""Training objectives: each loss against its formula, each method's attack and outputs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from advedge.errors import UsageError
from advedge.models import create_model
from advedge.training.objectives import (
    TRAINING_METHODS,
    build_method,
    natural_loss,
    pgd_at_loss,
    trades_loss,
)


def test_natural_and_pgd_at_are_cross_entropy():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 0])
    expected = (-math.log(math.e**2 / (math.e**2 + 1)) - math.log(1 / (1 + math.e))) / 2
    assert natural_loss(logits, y).item() == pytest.approx(expected, rel=1e-6)
    assert pgd_at_loss(logits, y).item() == pytest.approx(expected, rel=1e-6)


def test_trades_loss_matches_formula():
    torch.manual_seed(0)
    clean, adv = torch.randn(5, 3), torch.randn(5, 3)
    y = torch.randint(0, 3, (5,))
    p = F.softmax(clean, 1)
    q = F.softmax(adv, 1)
    kl = (p * (p.log() - q.log())).sum(1).mean()
    expected = F.cross_entropy(clean, y) + 6.0 * kl
    assert trades_loss(clean, adv, y, 6.0).item() == pytest.approx(expected.item(), rel=1e-5)
    # beta = 0 is natural training on the clean logits
    assert trades_loss(clean, adv, y, 0.0).item() == pytest.approx(
        F.cross_entropy(clean, y).item(), rel=1e-6
    )
    # identical clean and adversarial logits: the robust term vanishes
    assert trades_loss(clean, clean, y, 6.0).item() == pytest.approx(
        F.cross_entropy(clean, y).item(), rel=1e-5
    )


@pytest.mark.parametrize("name", sorted(TRAINING_METHODS))
def test_method_loss_is_finite_and_trains(name):
    torch.manual_seed(0)
    model = create_model("tiny_cnn", num_classes=4)
    model.train()
    x = torch.rand(16, 3, 16, 16)
    y = torch.randint(0, 4, (16,))
    method = build_method(name, eps=8 / 255, alpha=2 / 255, steps=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    first = method.loss(model, x, y)
    assert first.loss.dim() == 0 and torch.isfinite(first.loss)
    assert first.logits.shape == (16, 4)
    assert model.training  # the attack restored train mode
    losses = []
    for _ in range(15):
        out = method.loss(model, x, y)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert min(losses[-3:]) < losses[0]  # it can fit a fixed batch


def test_adversarial_methods_train_on_perturbed_inputs():
    """pgd-at's loss is the loss at x', which is at least the clean loss for a fixed model."""
    torch.manual_seed(1)
    model = create_model("tiny_cnn", num_classes=4).eval()
    x = torch.rand(32, 3, 16, 16)
    y = torch.randint(0, 4, (32,))
    clean = build_method("natural", eps=8 / 255, alpha=2 / 255, steps=5).loss(model, x, y).loss
    adv = build_method("pgd-at", eps=8 / 255, alpha=2 / 255, steps=5).loss(model, x, y).loss
    assert adv.item() > clean.item()


def test_unknown_method_suggests():
    with pytest.raises(UsageError, match="trades"):
        build_method("trade", eps=0.03, alpha=0.01, steps=1)
    with pytest.raises(UsageError):
        build_method("pgd-at", eps=0.03, alpha=0.01, steps=1, beta=3.0)
    with pytest.raises(UsageError):
        build_method("trades", eps=0.03, alpha=0.01, steps=1, beta=-1.0)

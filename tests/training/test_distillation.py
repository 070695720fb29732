"""Distillation losses against their formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from advedge.errors import UsageError
from advedge.training.distillation import (
    adaad_loss,
    add_loss,
    ard_loss,
    dd_loss,
    iad_loss,
    kd_loss,
    rslad_loss,
    soft_kl,
)


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(6, 5, generator=g) * 3 for _ in range(4)]


def _kl(t, s, tau=1.0):
    p = F.softmax(t / tau, 1)
    q = F.softmax(s / tau, 1)
    return (p * (p.log() - q.log())).sum(1).mean()


def test_soft_kl_matches_definition_and_vanishes_on_equal_inputs(logits):
    t, s, _, _ = logits
    assert soft_kl(t, s, 2.0).item() == pytest.approx(_kl(t, s, 2.0).item(), rel=1e-5)
    assert soft_kl(t, t).item() == pytest.approx(0.0, abs=1e-6)
    s = s.clone().requires_grad_(True)
    t = t.clone().requires_grad_(True)
    soft_kl(t, s).backward()
    assert t.grad is None and s.grad is not None  # the target is detached


def test_add_with_tau_1_and_alpha_5_6_is_rslad(logits):
    s_adv, s_clean, t_clean, _ = logits
    assert add_loss(s_adv, s_clean, t_clean, tau=1.0, mix=5 / 6).item() == pytest.approx(
        rslad_loss(s_adv, s_clean, t_clean).item(), rel=1e-6
    )


def test_formulas(logits):
    s_adv, s_clean, t_clean, t_adv = logits
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    ce = F.cross_entropy(s_clean, y)
    assert kd_loss(s_clean, t_clean, y, tau=4.0, mix=0.9).item() == pytest.approx(
        (0.9 * 16 * _kl(t_clean, s_clean, 4.0) + 0.1 * ce).item(), rel=1e-5
    )
    assert dd_loss(s_clean, t_clean, tau=20.0).item() == pytest.approx(
        _kl(t_clean, s_clean, 20.0).item(), rel=1e-4
    )
    # The official reductions (K = 5 classes here): ARD's nn.KLDivLoss() mean over N*K
    # elements (1/K of the batch mean), AdaAD's CIFAR-10 branch likewise, RSLAD's (and ADD's)
    # 1/10 of the batch mean; reduction="batchmean" drops the factor.
    k = s_adv.shape[1]
    ard_kl = 0.5 * 4 * _kl(t_clean, s_adv, 2.0)
    assert ard_loss(s_adv, s_clean, t_clean, y, tau=2.0, mix=0.5).item() == pytest.approx(
        (ard_kl / k + 0.5 * ce).item(), rel=1e-5
    )
    assert ard_loss(
        s_adv, s_clean, t_clean, y, tau=2.0, mix=0.5, reduction="batchmean"
    ).item() == pytest.approx((ard_kl + 0.5 * ce).item(), rel=1e-5)
    adaad = 0.7 * _kl(t_adv, s_adv) + 0.3 * _kl(t_clean, s_clean)
    assert adaad_loss(s_adv, s_clean, t_adv, t_clean, mix=0.7).item() == pytest.approx(
        (adaad / k).item(), rel=1e-5
    )
    assert adaad_loss(
        s_adv, s_clean, t_adv, t_clean, mix=0.7, reduction="batchmean"
    ).item() == pytest.approx(adaad.item(), rel=1e-5)
    add = 16 * (0.9 * _kl(t_clean, s_adv, 4.0) + 0.1 * _kl(t_clean, s_clean, 4.0))
    assert add_loss(s_adv, s_clean, t_clean, tau=4.0, mix=0.9).item() == pytest.approx(
        (add / 10).item(), rel=1e-5
    )
    assert add_loss(
        s_adv, s_clean, t_clean, tau=4.0, mix=0.9, reduction="batchmean"
    ).item() == pytest.approx(add.item(), rel=1e-5)
    rslad = 5 / 6 * _kl(t_clean, s_adv) + 1 / 6 * _kl(t_clean, s_clean)
    assert rslad_loss(s_adv, s_clean, t_clean).item() == pytest.approx(
        (rslad / 10).item(), rel=1e-5
    )
    assert rslad_loss(s_adv, s_clean, t_clean, reduction="batchmean").item() == pytest.approx(
        rslad.item(), rel=1e-5
    )


def test_bad_temperature_and_alpha(logits):
    s_adv, s_clean, t_clean, _ = logits
    with pytest.raises(UsageError, match="temperature"):
        add_loss(s_adv, s_clean, t_clean, tau=0.0)
    with pytest.raises(UsageError, match="alpha"):
        add_loss(s_adv, s_clean, t_clean, mix=1.5)


def test_iad_formula_weights_the_introspective_term_by_teacher_distrust(logits):
    s_adv, s_clean, t_clean, t_adv = logits
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    w = F.softmax(t_adv, 1)[torch.arange(6), y] ** 0.1
    p_s, q_s = F.softmax(s_clean, 1), F.softmax(s_adv, 1)
    intro = ((1 - w) * (p_s * (p_s.log() - q_s.log())).sum(1)).mean()
    want = 0.8 * 4 * _kl(t_clean, s_adv, 2.0) + 0.8 * intro + 0.2 * F.cross_entropy(s_clean, y)
    got = iad_loss(s_adv, s_clean, t_clean, t_adv, y, tau=2.0, mix=0.8, beta=0.1)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    # A teacher fully confident on x' (w = 1) removes the introspective term: ARD is left, with
    # IAD-I's batch-mean KL (ARD's own code averages over all N K elements).
    sure = torch.full_like(t_adv, -50.0)
    sure[torch.arange(6), y] = 50.0
    left = iad_loss(s_adv, s_clean, t_clean, sure, y, tau=2.0, mix=0.8).item()
    ard_batchmean = ard_loss(s_adv, s_clean, t_clean, y, tau=2.0, mix=0.8, reduction="batchmean")
    assert left == pytest.approx(ard_batchmean.item())
    assert left != pytest.approx(ard_loss(s_adv, s_clean, t_clean, y, tau=2.0, mix=0.8).item())

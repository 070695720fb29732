"""Attack core: invariants (hypothesis), correctness on models with known answers, wrappers."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_attack_invariants, attack_cases, random_images, small_net
from hypothesis import HealthCheck, given, settings
from torch import nn

from advedge.attacks import (
    BPDA,
    CW,
    EOT,
    FGSM,
    MIFGSM,
    PGD,
    build_attack,
    margin_loss,
    project,
)
from advedge.errors import AdvedgeError, UsageError

ATTACK_FACTORIES = {
    "fgsm": lambda m, eps, norm: FGSM(m, eps=eps, norm=norm),
    "pgd": lambda m, eps, norm: PGD(m, eps=eps, steps=3, norm=norm),
    "pgd-restarts": lambda m, eps, norm: PGD(m, eps=eps, steps=2, restarts=2, norm=norm),
    "pgd-margin": lambda m, eps, norm: PGD(m, eps=eps, steps=2, loss="margin", norm=norm),
    "cw": lambda m, eps, norm: CW(m, eps=eps, steps=3, norm=norm),
    "mifgsm": lambda m, eps, norm: MIFGSM(m, eps=eps, steps=3, norm=norm),
}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**attack_cases(ATTACK_FACTORIES, sizes=[4, 8]))
def test_attack_invariants(name, seed, eps, norm, batch, channels, size, train_mode, saturate):
    """x_adv in the eps-ball and [0, 1], same shape, detached, model mode restored, no param grads."""
    model = small_net(seed, channels=channels)
    model.train(train_mode)
    x, y = random_images(seed, batch, channels, size, saturate=saturate)
    x_adv = ATTACK_FACTORIES[name](model, eps, norm)(x, y)
    assert_attack_invariants(model, x, x_adv, eps=eps, norm=norm, train_mode=train_mode)


def test_model_mode_restored_on_error():
    model = small_net(0)
    model.train()

    class Boom(PGD):
        def perturb(self, x, y):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        Boom(model, eps=0.1)(torch.rand(2, 3, 4, 4), torch.zeros(2, dtype=torch.long))
    assert model.training


def test_bn_statistics_untouched_by_attack():
    model = small_net(1)
    model.train()
    before = model[1].running_mean.clone()
    PGD(model, eps=8 / 255, steps=2)(torch.rand(4, 3, 8, 8), torch.zeros(4, dtype=torch.long))
    assert torch.equal(before, model[1].running_mean)


class LinearBinary(nn.Module):
    """Two-class linear model z = (0, w.x + b): robust accuracy has a closed form under L-inf."""

    def __init__(self, w: torch.Tensor, b: float) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())
        self.b = nn.Parameter(torch.tensor(float(b)))

    def forward(self, x):
        s = x.flatten(1) @ self.w.flatten() + self.b
        return torch.stack([torch.zeros_like(s), s], dim=1)


def _closed_form_linf(model: LinearBinary, x, y, eps):
    """The worst case of a linear score over the L-inf ball intersected with [0, 1]."""
    w = model.w.detach().flatten()
    xf = x.flatten(1)
    # The adversary pushes each pixel against the label, as far as eps and the box allow.
    sign = torch.where(y == 1, -1.0, 1.0)[:, None] * torch.sign(w)[None]
    x_worst = (xf + eps * sign).clamp(0, 1)
    s = x_worst @ w + model.b.detach()
    return torch.where(y == 1, s > 0, s <= 0)


@pytest.mark.parametrize("attack_name", ["fgsm", "pgd", "cw", "mifgsm"])
def test_attacks_reach_closed_form_on_linear_model(attack_name):
    torch.manual_seed(0)
    d = 3 * 4 * 4
    w = torch.randn(1, 3, 4, 4)
    model = LinearBinary(w, 0.0)
    x = torch.rand(200, 3, 4, 4)
    with torch.no_grad():
        y = (model(x).argmax(1)).long()  # labels the model gets right
    eps = 0.02
    robust_truth = _closed_form_linf(model, x, y, eps)
    attack = build_attack(attack_name, model, eps=eps, steps=20)
    with torch.no_grad():
        robust_attack = model(attack(x, y)).argmax(1) == y
    # No attack can beat the exact worst case; the optimal ones must reach it.
    assert not (robust_truth & ~robust_attack).any() or attack_name == "fgsm"
    assert (robust_attack == robust_truth).float().mean() >= 0.98, (
        f"{attack_name}: {robust_attack.float().mean():.3f} vs exact {robust_truth.float().mean():.3f}"
    )
    assert d > 0


def test_pgd_breaks_more_than_fgsm_on_nonlinear_model():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 64), nn.Tanh(), nn.Linear(64, 5))
    x = torch.rand(256, 3, 4, 4)
    with torch.no_grad():
        y = model(x).argmax(1)
    eps = 0.03
    fgsm = (model(FGSM(model, eps=eps)(x, y)).argmax(1) == y).float().mean()
    pgd = (model(PGD(model, eps=eps, steps=20)(x, y)).argmax(1) == y).float().mean()
    assert pgd <= fgsm
    assert pgd < 0.9


def test_margin_loss_correct_for_negative_logits():
    logits = torch.tensor([[-5.0, -1.0, -3.0], [-2.0, -7.0, -4.0]])
    y = torch.tensor([0, 1])
    # max over other classes: row 0 -> -1, row 1 -> -2
    assert torch.allclose(margin_loss(logits, y), torch.tensor([4.0, 5.0]))
    assert torch.allclose(margin_loss(logits, y, kappa=4.5), torch.tensor([4.0, 4.5]))


def test_project_l2_and_linf():
    x = torch.full((2, 1, 2, 2), 0.5)
    far = x + torch.tensor([1.0, -1.0, 1.0, -1.0]).view(1, 1, 2, 2)
    p = project(far, x, 0.1, "Linf")
    assert torch.allclose((p - x).abs(), torch.full_like(x, 0.1))
    p2 = project(x + 0.2, x, 0.1, "L2")
    assert math.isclose(float((p2 - x)[0].norm()), 0.1, rel_tol=1e-5)


def test_restarts_keep_first_success():
    model = small_net(5, classes=3)
    x = torch.rand(16, 3, 8, 8)
    y = torch.randint(0, 3, (16,))
    one = PGD(model, eps=0.05, steps=5, generator=torch.Generator().manual_seed(0))
    many = PGD(model, eps=0.05, steps=5, restarts=4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        acc_one = (model(one(x, y)).argmax(1) == y).float().mean()
        acc_many = (model(many(x, y)).argmax(1) == y).float().mean()
    assert acc_many <= acc_one


def test_bad_inputs_rejected():
    model = small_net(0)
    with pytest.raises(AdvedgeError, match="NaN"):
        PGD(model, eps=0.1)(
            torch.full((1, 3, 4, 4), float("nan")), torch.zeros(1, dtype=torch.long)
        )
    with pytest.raises(AdvedgeError, match=r"\[0, 1\]"):
        PGD(model, eps=0.1)(torch.full((1, 3, 4, 4), 2.0), torch.zeros(1, dtype=torch.long))
    with pytest.raises(AdvedgeError, match="targets"):
        PGD(model, eps=0.1)(torch.rand(2, 3, 4, 4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(UsageError):
        PGD(model, eps=0.0)
    with pytest.raises(UsageError):
        PGD(model, eps=1.5)
    with pytest.raises(UsageError):
        PGD(model, eps=0.1, norm="L1")
    with pytest.raises(UsageError, match="pgd"):
        build_attack("pdg", model, eps=0.1)


def test_eot_averages_random_logits():
    class Noisy(nn.Module):
        def forward(self, x):
            return x.flatten(1)[:, :2] + torch.randn(x.shape[0], 2)

    torch.manual_seed(0)
    x = torch.full((1, 1, 2, 2), 0.5)
    single = torch.stack([Noisy()(x) for _ in range(200)]).std(0).mean()
    averaged = torch.stack([EOT(Noisy(), 50)(x) for _ in range(200)]).std(0).mean()
    assert averaged < single / 4  # std shrinks as 1/sqrt(50)


def test_bpda_value_is_real_gradient_is_approx():
    quantise = BPDA(lambda t: torch.round(t * 4) / 4)
    x = torch.tensor([[0.3, 0.6]], requires_grad=True)
    y = quantise(x)
    assert torch.allclose(y, torch.tensor([[0.25, 0.5]]))
    y.sum().backward()
    assert torch.allclose(x.grad, torch.ones_like(x))  # identity gradient, not zero

    # Without BPDA, rounding kills the gradient: that is what BPDA works around.
    x2 = torch.tensor([[0.3, 0.6]], requires_grad=True)
    (torch.round(x2 * 4) / 4).sum().backward()
    assert torch.count_nonzero(x2.grad) == 0


def test_bpda_lets_pgd_break_a_rounding_defense():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    rounding = lambda t: torch.round(t * 8) / 8  # noqa: E731

    class Defended(nn.Module):
        def __init__(self, pre):
            super().__init__()
            self.pre, self.base = pre, base

        def forward(self, x):
            return self.base(self.pre(x))

    x = torch.rand(128, 3, 2, 2)
    real = Defended(rounding)
    with torch.no_grad():
        y = real(x).argmax(1)
    naive = PGD(real, eps=0.25, steps=10)(x, y)  # zero gradients: random start only
    adaptive = PGD(Defended(BPDA(rounding)), eps=0.25, steps=10)(x, y)
    with torch.no_grad():
        acc_naive = (real(naive).argmax(1) == y).float().mean()
        acc_adaptive = (real(adaptive).argmax(1) == y).float().mean()
    assert acc_adaptive < acc_naive - 0.3, (acc_adaptive, acc_naive)


def test_options_follow_kwargs_to_the_base_class_but_not_fixed_ones():
    from advedge.attacks import APGD, ATTACKS, build_attack
    from advedge.errors import UsageError

    model = small_net(0)
    assert ATTACKS["cw"].options() == ATTACKS["pgd"].options() - {"loss"} | {"kappa"}
    assert ATTACKS["apgd-t"].options() == APGD.options() - {"loss"} | {"n_target_classes"}
    cw = build_attack("cw", model, eps=0.1, steps=4, restarts=2, kappa=5.0)
    assert (cw.steps, cw.restarts, cw.kappa, cw.loss) == (4, 2, 5.0, "margin")
    apgd_t = build_attack("apgd-t", model, eps=0.1, n_iter=7, n_target_classes=2)
    assert (apgd_t.n_iter, apgd_t.n_target_classes, apgd_t.loss) == (7, 2, "dlr-targeted")
    for name in ("cw", "apgd-t"):
        with pytest.raises(UsageError, match="does not take 'loss'"):
            build_attack(name, model, eps=0.1, loss="ce")

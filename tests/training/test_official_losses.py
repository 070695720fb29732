"""Each training method's loss and first SGD step against its official code, written out by hand.

The reference formulas below copy the official repositories' lines (named in each helper), in
their own style: ``nn.KLDivLoss()``'s mean over all ``N K`` elements, ``(1/len) * sum``,
``torch.mean`` over elements, the ``tau^2`` factor, RSLAD's ``kl_loss`` with its ``1e-5``. The
legacy ``size_average=False`` / ``reduce=False`` arguments are written as the ``reduction`` they
mean (``"sum"`` / ``"none"``), which torch accepts without a deprecation warning.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advedge.training.config import TrainConfig
from advedge.training.distillation import (
    DISTILL_METHODS,
    adaad_loss,
    add_loss,
    ard_loss,
    build_distill_method,
    dd_loss,
    iad_loss,
    kd_loss,
    rslad_loss,
)
from advedge.training.objectives import (
    TRAINING_METHODS,
    Method,
    build_method,
    natural_loss,
    pgd_at_loss,
    trades_loss,
)
from advedge.training.official import OFFICIAL

# Hand-made logits, N = 3, K = 10: the student on x' and x, the teacher on x and x'.
S_ADV = [
    [2.1, -0.3, 0.7, -1.8, 0.0, 3.2, -2.4, 1.1, -0.6, 0.4],
    [-1.2, 0.9, 2.6, 0.3, -3.1, -0.5, 1.7, -2.2, 0.8, 1.5],
    [0.5, -2.7, -0.4, 1.9, 2.3, -1.1, 0.2, 3.0, -1.6, -0.9],
]
S_NAT = [
    [1.4, 0.2, -0.9, 0.6, -1.5, 2.8, -0.7, 0.3, 1.0, -2.0],
    [0.1, -1.3, 3.3, -0.2, 0.9, -2.6, 1.2, 0.4, -0.8, 2.2],
    [-0.6, 1.8, -2.1, 0.7, 1.1, 0.0, -1.4, 2.5, 0.3, -0.2],
]
T_NAT = [
    [0.3, -1.0, 0.2, -0.5, -2.2, 6.1, -1.7, 0.9, 0.0, -0.8],
    [-2.0, 0.4, 5.4, 1.3, -1.9, -0.6, 2.0, -3.0, 0.5, 0.7],
    [0.8, -1.6, -1.2, 0.9, 0.4, -0.3, -2.5, 4.7, -0.1, 1.0],
]
T_ADV = [
    [1.2, -0.4, 0.5, -1.1, -0.9, 2.0, -0.6, 1.4, 0.2, -1.3],
    [-0.7, 1.6, 1.9, 0.8, -1.2, 0.3, 0.6, -1.8, 1.1, 0.0],
    [0.0, -0.8, 0.9, 2.4, 1.7, -1.5, -0.2, 1.8, -0.9, 0.6],
]
Y = [5, 2, 7]
EPS32 = torch.finfo(torch.float32).eps


def _wide(phase: float) -> Tensor:
    """Deterministic ``[4, 100]`` logits for the CIFAR-100 branches (no RNG)."""
    i = torch.arange(400, dtype=torch.float64).reshape(4, 100)
    return (3 * torch.sin(0.37 * i + phase) + torch.cos(1.3 * i * phase)).float()


def _logits(k: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(s_adv, s_nat, t_nat, t_adv, y)``, float32, with K = 10 or 100 classes."""
    if k == 10:
        rows = (torch.tensor(v) for v in (S_ADV, S_NAT, T_NAT, T_ADV))
        return (*rows, torch.tensor(Y))
    return (_wide(0.1), _wide(0.7), 2 * _wide(1.3), _wide(2.9), torch.tensor([3, 41, 77, 99]))


def _f64(*args):
    """``args`` with each float tensor in float64."""
    return [a.double() if isinstance(a, Tensor) and a.is_floating_point() else a for a in args]


def _close(got: Tensor, want: Tensor, rel: float = 1e-6) -> None:
    """``got`` (advedge, float32) equals the hand value to float32 precision."""
    assert got.item() == pytest.approx(want.item(), rel=rel, abs=1e-9)


def _check(got: Tensor, official, *args, scale: float = 1.0, same32: bool = True, **kw) -> None:
    """advedge's float32 ``got`` equals ``official(*args)`` to float precision.

    On the same float32 tensors the elementwise KL terms are the same and only the reduction's
    rounding differs: rel 1e-6. Against the float64 value, advedge's float32 log-probabilities
    (``soft_kl`` computes in float32) are each off by ~EPS32 * |log p|, so a row's KL is off by
    at most ~4 * EPS32 * log K, times the loss's factor ``scale`` (tau^2 * s): this matters only
    at high tau (ARD's 30, DD's 100), where near-uniform distributions make the KL a small
    difference of large log-probabilities. ``same32=False`` skips the float32 comparison, for
    an official formula whose float32 rounding differs (DD's cross-entropy less an entropy).
    """
    if same32:
        _close(got, official(*args, **kw))
    want = official(*_f64(*args), **kw).item()
    k = args[0].shape[1]
    assert got.item() == pytest.approx(want, rel=1e-6, abs=scale * 4 * EPS32 * math.log(k))


# ------------------------------------------------------------- the official formulas, by hand
def kldiv_mean(log_q: Tensor, p: Tensor) -> Tensor:
    """``nn.KLDivLoss()(log_q, p)``: the default reduction ``'mean'`` (ARD, AdaAD CIFAR-10)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: "'mean' divides by N and K"
        return nn.KLDivLoss()(log_q, p)


def official_trades(nat: Tensor, adv: Tensor, y: Tensor, beta: float) -> Tensor:
    """yaodongyu/TRADES trades.py, the last five lines of ``trades_loss``."""
    criterion_kl = nn.KLDivLoss(reduction="sum")  # size_average=False
    batch_size = len(nat)
    loss_natural = F.cross_entropy(nat, y)
    loss_robust = (1.0 / batch_size) * criterion_kl(
        F.log_softmax(adv, dim=1), F.softmax(nat, dim=1)
    )
    return loss_natural + beta * loss_robust


def hinton_kd(s: Tensor, t: Tensor, y: Tensor, tau: float, mix: float) -> Tensor:
    """Hinton et al. 2015 (no official code): tau^2-scaled batch-mean KL plus CE."""
    kl = nn.KLDivLoss(reduction="batchmean")(F.log_softmax(s / tau, 1), F.softmax(t / tau, 1))
    return mix * tau * tau * kl + (1 - mix) * F.cross_entropy(s, y)


def official_ard(outputs: Tensor, basic: Tensor, t: Tensor, y: Tensor, temp: float, alpha: float):
    """goldblum/AdversariallyRobustDistillation main.py, ``train``'s loss line."""
    return alpha * temp * temp * kldiv_mean(
        F.log_softmax(outputs / temp, dim=1), F.softmax(t / temp, dim=1)
    ) + (1.0 - alpha) * nn.CrossEntropyLoss()(basic, y)


def official_iad(outputs, nat, teacher_outputs, guide, targets, temp, alpha, beta, begun=True):
    """ZFancy/IAD IAD-I.py, ``train``: the ``epoch >= args.begin`` branch, or the warm-up one."""
    kl_loss = nn.KLDivLoss(reduction="none")  # reduce=False
    n = len(outputs)
    soft = kl_loss(F.log_softmax(outputs / temp, dim=1), F.softmax(teacher_outputs / temp, dim=1))
    kd = alpha * temp * temp * (1 / n) * torch.sum(soft.sum(dim=1))
    ce = (1.0 - alpha) * nn.CrossEntropyLoss()(nat, targets)
    if not begun:
        return kd + ce
    weights = torch.ones(n, dtype=outputs.dtype)  # the official ``Alpha``
    for pp in range(n):
        weights[pp] = F.softmax(guide, dim=1)[pp][targets[pp].item()].pow(beta).item()
    own = kl_loss(F.log_softmax(outputs, dim=1), F.softmax(nat, dim=1))  # S(x) not detached
    intro = alpha * (1 / n) * torch.sum(own.sum(dim=1).mul(1 - weights))
    return kd + intro + ce


def rslad_reduce(elements: Tensor) -> Tensor:
    """RSLAD's reduction: ``torch.mean`` (cifar10 script) or ``10*torch.mean`` (cifar100)."""
    return torch.mean(elements) if elements.shape[1] == 10 else 10 * torch.mean(elements)


def official_rslad(adv: Tensor, nat: Tensor, t: Tensor, eps: float = 1e-5) -> Tensor:
    """zibojia/RSLAD resnet18_rslad_cifar10.py / _cifar100.py (``eps=0``: the exact KL)."""

    def kl_loss(a, b):
        return -a * b + torch.log(b + eps) * b

    def log_p(z):  # the CIFAR-100 script writes torch.log(F.softmax(...))
        return F.log_softmax(z, dim=1) if z.shape[1] == 10 else torch.log(F.softmax(z, dim=1))

    p = F.softmax(t.detach(), dim=1)
    kl1, kl2 = rslad_reduce(kl_loss(log_p(adv), p)), rslad_reduce(kl_loss(log_p(nat), p))
    return 5 / 6.0 * kl1 + 1 / 6.0 * kl2


def official_adaad(adv: Tensor, ori: Tensor, t_adv: Tensor, t_ori: Tensor, alpha: float):
    """boyellow/AdaAD main.py, ``method == 'AdaAD'``: the CIFAR10 or the CIFAR100 branch."""
    if adv.shape[1] == 10:
        kl1 = kldiv_mean(F.log_softmax(adv, dim=1), F.softmax(t_adv.detach(), dim=1))
        kl2 = kldiv_mean(F.log_softmax(ori, dim=1), F.softmax(t_ori.detach(), dim=1))
    else:
        kl_none = nn.KLDivLoss(reduction="none")  # reduce=False
        kl1 = (1 / len(adv)) * torch.sum(
            kl_none(F.log_softmax(adv, dim=1), F.softmax(t_adv.detach(), dim=1))
        )
        kl2 = (1 / len(adv)) * torch.sum(
            kl_none(F.log_softmax(ori, dim=1), F.softmax(t_ori.detach(), dim=1))
        )
    return alpha * kl1 + (1 - alpha) * kl2


def thesis_add(adv: Tensor, nat: Tensor, t: Tensor, tau: float, mix: float) -> Tensor:
    """ADD (no official code): RSLAD's reduction of the tau-softened KLs, times tau^2."""
    p = F.softmax(t / tau, dim=1)

    def kl(z):
        return rslad_reduce(p * (torch.log(p) - F.log_softmax(z / tau, dim=1)))

    return tau * tau * (mix * kl(adv) + (1 - mix) * kl(nat))


# ------------------------------------------------------------------------- loss fidelity
def test_kldivloss_default_is_the_mean_over_all_elements():
    s, _, t, _, _ = _logits(10)
    elements = F.softmax(t, 1) * (F.log_softmax(t, 1) - F.log_softmax(s, 1))
    _close(kldiv_mean(F.log_softmax(s, 1), F.softmax(t, 1)), elements.sum() / 30)


def test_natural_and_pgd_at_are_the_batch_mean_cross_entropy():
    s, _, _, _, y = _f64(*_logits(10))
    y = y.long()
    # MadryLab model.py: tf.reduce_mean(sparse_softmax_cross_entropy); Wong: F.cross_entropy.
    want = -F.log_softmax(s, 1)[torch.arange(3), y].mean()
    assert natural_loss(s, y).item() == pytest.approx(want.item(), rel=1e-12)
    assert pgd_at_loss(s, y).item() == pytest.approx(want.item(), rel=1e-12)


@pytest.mark.parametrize("k", [10, 100])
def test_trades_equals_official_value_and_gradients(k):
    s_adv, s_nat, _, _, y = _logits(k)
    got = [z.double().requires_grad_(True) for z in (s_adv, s_nat)]
    ref = [z.double().requires_grad_(True) for z in (s_adv, s_nat)]
    loss = trades_loss(got[1], got[0], y, beta=6.0)
    want = official_trades(ref[1], ref[0], y, beta=6.0)
    assert loss.item() == pytest.approx(want.item(), rel=1e-12)
    loss.backward()
    want.backward()  # the official KL target softmax(model(x)) is not detached: both get grads
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize(("tau", "mix"), [(4.0, 0.9), (1.0, 0.5)])
def test_kd_equals_hinton(tau, mix):
    _, s, t, _, y = _logits(10)
    got = kd_loss(s, t, y, tau=tau, mix=mix)
    _check(got, hinton_kd, s, t, y, tau, mix, scale=tau * tau)


def test_dd_equals_carlini_soft_label_cross_entropy_less_the_teacher_entropy():
    _, s, t, _, _ = _logits(10)
    tau = 100.0

    def carlini(s, t):  # train_models.py: labels softmax(teacher / train_temp), then
        p = F.softmax(t / tau, 1)  # tf.nn.softmax_cross_entropy_with_logits(p, student / t)
        ce = -(p * F.log_softmax(s / tau, 1)).sum(1).mean()
        return ce - (-(p * p.log()).sum(1).mean())  # less the teacher's entropy (a constant)

    s32 = s.clone().requires_grad_(True)
    got = dd_loss(s32, t, tau=tau)
    _check(got, carlini, s, t, same32=False)
    s64 = s.double().requires_grad_(True)
    got.backward()
    carlini(s64, t.double()).backward()
    # grad = (q - p) / (tau N): a difference of near-uniform float32 probabilities (~1e-3
    # of ~0.1), so ~4 digits survive.
    torch.testing.assert_close(s32.grad.double(), s64.grad, rtol=1e-3, atol=1e-9)


@pytest.mark.parametrize("k", [10, 100])
@pytest.mark.parametrize(("tau", "mix"), [(30.0, 1.0), (2.0, 0.5)])
def test_ard_equals_official_and_batchmean_is_k_times(k, tau, mix):
    s_adv, s_nat, t, _, y = _logits(k)
    got = ard_loss(s_adv, s_nat, t, y, tau=tau, mix=mix)
    _check(got, official_ard, s_adv, s_nat, t, y, tau, mix, scale=tau * tau / k)
    if mix == 1.0:  # the opt-in old behaviour: a batch mean, K times the official KL
        wide = ard_loss(s_adv, s_nat, t, y, tau=tau, mix=mix, reduction="batchmean")
        _close(wide, k * official_ard(s_adv, s_nat, t, y, tau, mix))


@pytest.mark.parametrize("k", [10, 100])
@pytest.mark.parametrize(("tau", "mix", "beta"), [(1.0, 1.0, 0.1), (2.0, 0.8, 0.5)])
def test_iad_equals_iad_i(k, tau, mix, beta):
    s_adv, s_nat, t, t_adv, y = _logits(k)
    got = iad_loss(s_adv, s_nat, t, t_adv, y, tau=tau, mix=mix, beta=beta)
    _check(got, official_iad, s_adv, s_nat, t, t_adv, y, tau, mix, beta, scale=tau * tau)


@pytest.mark.parametrize("k", [10, 100])
def test_rslad_equals_official(k):
    s_adv, s_nat, t, _, _ = _logits(k)
    a32, n32 = (z.clone().requires_grad_(True) for z in (s_adv, s_nat))
    got = rslad_loss(a32, n32, t)
    _check(got, official_rslad, s_adv, s_nat, t, eps=0.0, scale=0.1)  # the 1e-5 removed
    # The official 1e-5 adds b*log(1 + 1e-5/b) < 1e-5 to each of the N*K elements before the
    # mean: less than 1e-5 on CIFAR-10, and 10x that (1e-4) under CIFAR-100's 10*torch.mean.
    exact = official_rslad(*_f64(s_adv, s_nat, t), eps=0.0).item()
    gap = official_rslad(*_f64(s_adv, s_nat, t)).item() - exact
    assert 0 < gap < (1e-5 if k == 10 else 1e-4)
    assert got.item() == pytest.approx(official_rslad(s_adv, s_nat, t).item(), abs=gap + 1e-7)
    # The 1e-5 is a constant of the teacher: the official gradients equal advedge's.
    a64, n64 = (z.double().requires_grad_(True) for z in (s_adv, s_nat))
    got.backward()
    official_rslad(a64, n64, t.double()).backward()
    torch.testing.assert_close(a32.grad.double(), a64.grad, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(n32.grad.double(), n64.grad, rtol=1e-5, atol=1e-9)
    _close(
        rslad_loss(s_adv, s_nat, t, reduction="batchmean"),
        10 * official_rslad(s_adv, s_nat, t, eps=0.0),
    )


def test_rslad_official_epsilon_gap_exceeds_1e5_on_cifar100():
    """Documents the size of the 1e-5 term: OFFICIAL['rslad'] says '< 1e-5', true on K=10 only."""
    s_adv, s_nat, t, _, _ = _f64(*_logits(100))
    gap = official_rslad(s_adv, s_nat, t) - official_rslad(s_adv, s_nat, t, eps=0.0)
    assert gap.item() > 1e-5


@pytest.mark.parametrize("k", [10, 100])
@pytest.mark.parametrize("mix", [1.0, 0.7])
def test_adaad_equals_official_branch(k, mix):
    s_adv, s_nat, t, t_adv, _ = _logits(k)
    got = adaad_loss(s_adv, s_nat, t_adv, t, mix=mix)
    _check(got, official_adaad, s_adv, s_nat, t_adv, t, mix)
    want = official_adaad(s_adv, s_nat, t_adv, t, mix)
    wide = adaad_loss(s_adv, s_nat, t_adv, t, mix=mix, reduction="batchmean")
    _close(wide, want * (k if k == 10 else 1))  # CIFAR-100's branch is the batch mean already


@pytest.mark.parametrize("k", [10, 100])
@pytest.mark.parametrize(("tau", "mix"), [(4.0, 0.9), (2.0, 0.5)])
def test_add_equals_its_formula(k, tau, mix):
    s_adv, s_nat, t, _, _ = _logits(k)
    _check(add_loss(s_adv, s_nat, t, tau=tau, mix=mix), thesis_add, s_adv, s_nat, t, tau, mix)
    want = thesis_add(s_adv, s_nat, t, tau, mix)
    _close(add_loss(s_adv, s_nat, t, tau=tau, mix=mix, reduction="batchmean"), 10 * want)


@pytest.mark.parametrize("k", [10, 100])
def test_add_at_tau_1_mix_5_6_is_rslad_bit_for_bit(k):
    s_adv, s_nat, t, _, _ = _logits(k)
    add = add_loss(s_adv, s_nat, t, tau=1.0, mix=5 / 6)
    assert torch.equal(add, rslad_loss(s_adv, s_nat, t))
    _check(add, official_rslad, s_adv, s_nat, t, eps=0.0, scale=0.1)


# ----------------------------------------------------------------- one optimiser step
EPS = 8 / 255
LR = 0.1
# Weight decay of each official code (SGD, momentum 0.9), read from the repositories:
# MadryLab/cifar10_challenge config.json 0.0002 (tf.nn.l2_loss: the gradient is wd * w);
# TRADES train_trades_cifar10.py --weight-decay 2e-4; fast_adversarial train_fgsm.py 5e-4;
# ARD main.py 2e-4; IAD IAD-I.py 2e-4; RSLAD resnet18_rslad_cifar10.py 2e-4; AdaAD main.py
# --weight_decay 5e-4. natural and kd: advedge's own 5e-4; add: RSLAD's.
STEP_METHODS = (*TRAINING_METHODS, "kd", "ard", "iad", "rslad", "adaad", "add")  # not dd
OFFICIAL_WD = {
    m: 5e-4 if m in ("natural", "fgsm-rs", "kd", "adaad") else 2e-4 for m in STEP_METHODS
}


def _linear(seed: int, scale: float) -> nn.Module:
    """A batch-norm-free ``3x8x8 -> 10`` linear model with fixed weights."""
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return net


def _batch() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.rand(4, 3, 8, 8, generator=g), torch.tensor([0, 3, 5, 9])


def _build(name: str, teacher: nn.Module, reduction: str = "official", **kw) -> Method:
    """``name`` with the official attack step (eps/4 or 1.25 eps), 3 steps, official BN mode."""
    common = {
        "eps": EPS,
        "alpha": OFFICIAL[name].step * EPS or EPS / 4,
        "steps": 3,
        "norm": "Linf",
        "attack_bn": OFFICIAL[name].attack_bn,
        **kw,
    }
    if name in TRAINING_METHODS:
        return build_method(name, **common)
    if name == "iad":
        common.setdefault("warmup", 0.0)  # the introspective term from the first step
    return build_distill_method(name, teacher=teacher, reduction=reduction, **common)


@pytest.fixture
def adversarial(monkeypatch) -> list[Tensor]:
    """Records every ``x'`` a method's inner attack returns."""
    seen: list[Tensor] = []
    original = Method.pgd

    def pgd(self, model, **kw):
        attack = original(self, model, **kw)

        def run(x, y):
            seen.append(attack(x, y))
            return seen[-1]

        return run

    monkeypatch.setattr(Method, "pgd", pgd)
    return seen


def official_loss(name: str, s: nn.Module, t: nn.Module, x: Tensor, y: Tensor, xa: Tensor):
    """The method's official loss (its defaults) on ``x`` and the same ``x' = xa``."""
    if name == "natural":
        return F.cross_entropy(s(x), y)
    if name in ("pgd-at", "fgsm-rs"):
        return F.cross_entropy(s(xa), y)
    if name == "trades":
        return official_trades(s(x), s(xa), y, beta=6.0)
    with torch.no_grad():
        t_nat, t_adv = t(x), t(xa)
    if name == "kd":
        return hinton_kd(s(x), t_nat, y, tau=4.0, mix=0.9)
    if name == "ard":
        return official_ard(s(xa), s(x), t_nat, y, temp=30.0, alpha=1.0)
    if name == "iad":
        return official_iad(s(xa), s(x), t_nat, t_adv, y, temp=1.0, alpha=1.0, beta=0.1)
    if name == "adaad":
        return official_adaad(s(xa), s(x), t_adv, t_nat, alpha=1.0)
    return official_rslad(s(xa), s(x), t_nat)  # rslad, and add at its defaults (tau 1, 5/6)


def _method_step(name: str, x_seen: list[Tensor], reduction: str = "official", **kw):
    """One SGD step of advedge's method from the fixed weights: ``(w0, w1, x', teacher)``."""
    student, teacher = _linear(0, 0.05), _linear(1, 0.3)
    w0 = copy.deepcopy(student)
    cfg = TrainConfig(
        data="cifar10",
        model="resnet8",
        method=name,
        teacher=None if name in TRAINING_METHODS else "teacher",
        kl_reduction=reduction,
    )
    opt = torch.optim.SGD(
        student.parameters(), lr=LR, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    method = _build(name, teacher, reduction, **kw)
    x, y = _batch()
    student.train()
    opt.zero_grad()
    method.loss(student, x, y).loss.backward()
    opt.step()
    xa = x_seen[-1] if x_seen else x
    return w0, student, xa, teacher


def _hand_step(name: str, w0: nn.Module, teacher: nn.Module, xa: Tensor, wd: float):
    """``w0 - lr * (grad of the official loss + wd * w0)``: SGD's first step (momentum buffer
    = the first gradient)."""
    model = copy.deepcopy(w0)
    x, y = _batch()
    official_loss(name, model, teacher, x, y, xa).backward()
    with torch.no_grad():
        return [w - LR * (w.grad + wd * w) for w in model.parameters()]


@pytest.mark.parametrize("name", STEP_METHODS)
def test_first_sgd_step_equals_the_official_step(name, adversarial):
    w0, w1, xa, teacher = _method_step(name, adversarial)
    assert len(adversarial) == (1 if OFFICIAL[name].steps else 0)  # one attack, if any
    want = _hand_step(name, w0, teacher, xa, OFFICIAL_WD[name])
    for got, w in zip(w1.parameters(), want, strict=True):
        torch.testing.assert_close(got.detach(), w, rtol=1e-6, atol=1e-8)
    # The tolerance resolves the weight decay: the other published value is a different step.
    other = 5e-4 if OFFICIAL_WD[name] == 2e-4 else 2e-4
    wrong = _hand_step(name, w0, teacher, xa, other)
    assert not all(
        torch.allclose(g.detach(), w, rtol=1e-6, atol=1e-8)
        for g, w in zip(w1.parameters(), wrong, strict=True)
    )


@pytest.mark.parametrize("name", ["ard", "rslad", "adaad", "add"])
def test_batchmean_reduction_is_a_different_step(name, adversarial):
    w0, w1, xa, teacher = _method_step(name, adversarial, reduction="batchmean")
    want = _hand_step(name, w0, teacher, xa, OFFICIAL_WD[name])
    assert not all(
        torch.allclose(g.detach(), w, rtol=1e-6, atol=1e-8)
        for g, w in zip(w1.parameters(), want, strict=True)
    )


def test_iad_warmup_loss_is_iad_i_warmup_branch(adversarial):
    student, teacher = _linear(0, 0.05), _linear(1, 0.3)
    method = _build("iad", teacher, warmup=0.3)
    method.on_epoch_start(0, 200)  # epoch 0 < args.begin = 60
    assert not method.introspective
    x, y = _batch()
    got = method.loss(student, x, y).loss
    with torch.no_grad():
        s_adv, s_nat, t = student(adversarial[-1]), student(x), teacher(x)
    _close(got, official_iad(s_adv, s_nat, t, t, y, 1.0, 1.0, 0.1, begun=False))


# ---------------------------------------------------------------- the attack's BN mode
ATTACKED = [m for m in STEP_METHODS if OFFICIAL[m].steps]


def _bn_model() -> nn.Sequential:
    g = torch.Generator().manual_seed(3)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 64, 10)
    )
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return net


def _attack_probe(monkeypatch, model: nn.Sequential) -> list[tuple]:
    """Records, around each inner attack: BN's update count and running mean, and the mode."""
    seen: list[tuple] = []
    original = Method.pgd
    bn = model[1]

    def state():
        return bn.num_batches_tracked.item(), bn.running_mean.clone(), model.training

    def pgd(self, m, **kw):
        attack = original(self, m, **kw)

        def run(x, y):
            before = state()
            x_adv = attack(x, y)
            seen.append((before, state()))
            return x_adv

        return run

    monkeypatch.setattr(Method, "pgd", pgd)
    return seen


@pytest.mark.parametrize("name", ATTACKED)
@pytest.mark.parametrize("mode", ["official", "eval", "train"])
def test_attack_bn_mode_updates_running_statistics_only_in_train(name, mode, monkeypatch):
    bn_mode = OFFICIAL[name].attack_bn if mode == "official" else mode
    model = _bn_model()
    seen = _attack_probe(monkeypatch, model)
    method = _build(name, _linear(1, 0.3), attack_bn=bn_mode)
    x, y = _batch()
    model.train()
    method.loss(model, x, y)
    (((n0, mean0, train0), (n1, mean1, train1)),) = seen  # exactly one attack
    assert train0 and train1 and model.training  # train mode restored after the attack
    if bn_mode == "train":  # one batch-statistics forward per attack step
        assert n1 - n0 == method.steps and not torch.equal(mean0, mean1)
    else:
        assert n1 == n0 and torch.equal(mean0, mean1)


@pytest.mark.parametrize("name", ATTACKED)
def test_attack_restores_eval_mode(name, monkeypatch):
    model = _bn_model().eval()
    seen = _attack_probe(monkeypatch, model)
    _build(name, _linear(1, 0.3), attack_bn="train").loss(model, *_batch())
    (((_, _, train0), (_, _, train1)),) = seen
    assert not train0 and not train1


# ------------------------------------------------------------------------- the registry
def test_every_method_has_an_official_recipe_and_the_published_weight_decay():
    assert set(TRAINING_METHODS) | set(DISTILL_METHODS) <= set(OFFICIAL)
    published = {"ard": 2e-4, "iad": 2e-4, "rslad": 2e-4, "adaad": 5e-4}
    assert {m: OFFICIAL[m].weight_decay for m in published} == published
    assert {m: OFFICIAL[m].weight_decay for m in OFFICIAL_WD} == OFFICIAL_WD
    train_bn = {m for m in OFFICIAL if OFFICIAL[m].attack_bn == "train"}
    assert train_bn == {"pgd-at", "fgsm-rs", "ard", "iad"}
    for m in OFFICIAL_WD:  # an unset TrainConfig field takes the official value
        cfg = TrainConfig(
            data="cifar10",
            model="resnet8",
            method=m,
            teacher=None if m in TRAINING_METHODS else "teacher",
        )
        assert (cfg.weight_decay, cfg.attack_bn) == (OFFICIAL_WD[m], OFFICIAL[m].attack_bn)

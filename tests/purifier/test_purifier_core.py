"""Tests of advedge.purifier's core: the generator's bound, the networks' shapes, the losses."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from advedge.errors import UsageError
from advedge.models.complexity import count_parameters, mflops
from advedge.purifier import Discriminator, Generator, losses

LOG3 = math.log(3.0)


def randomise(g: Generator, scale: float = 1.0, seed: int = 0) -> Generator:
    """Give the zero-initialised output layer random weights (times ``scale``)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        g.out.weight.copy_(torch.randn(g.out.weight.shape, generator=gen) * scale)
        g.out.bias.copy_(torch.randn(g.out.bias.shape, generator=gen) * scale)
    return g


# -- losses against hand-computed values --------------------------------------------------------


def test_inverse_perturbation_loss_value_and_gradient() -> None:
    r = torch.tensor([[0.1, -0.2], [0.0, 0.3]], requires_grad=True)
    delta = torch.tensor([[0.1, 0.2], [-0.1, -0.3]], requires_grad=True)
    # example 0: r + delta = [0.2, 0.0] -> 0.04; example 1: [-0.1, 0.0] -> 0.01; mean 0.025
    loss = losses.inverse_perturbation_loss(r, delta)
    assert loss.item() == pytest.approx(0.025)
    loss.backward()
    assert r.grad is not None
    # d/dr mean_i ||r_i + delta_i||^2 = 2 (r + delta) / N
    expected = torch.tensor([[0.2, 0.0], [-0.1, 0.0]])
    assert torch.allclose(r.grad, expected, atol=1e-6)
    assert delta.grad is None  # the perturbation is the target


def test_inverse_perturbation_loss_sums_over_pixels_of_images() -> None:
    r = torch.zeros(2, 3, 4, 4)
    delta = torch.full((2, 3, 4, 4), 0.5)
    assert losses.inverse_perturbation_loss(r, delta).item() == pytest.approx(48 * 0.25)
    assert losses.inverse_perturbation_loss(-delta, delta).item() == 0.0


def test_pixel_loss_values() -> None:
    x_hat = torch.tensor([[[[0.5, 0.25]]]], requires_grad=True)
    x = torch.tensor([[[[0.0, 1.0]]]], requires_grad=True)
    assert losses.pixel_loss(x_hat, x).item() == pytest.approx((0.5 + 0.75) / 2)
    assert losses.pixel_loss(x_hat, x, "l1").item() == pytest.approx(0.625)
    loss = losses.pixel_loss(x_hat, x, kind="l2")
    assert loss.item() == pytest.approx((0.25 + 0.5625) / 2)
    loss.backward()
    assert x.grad is None and x_hat.grad is not None


def test_guidance_loss_value() -> None:
    logits_hat = torch.tensor([[0.0, 0.0]], requires_grad=True)
    logits_clean = torch.tensor([[LOG3, 0.0]], requires_grad=True)  # softmax = [0.75, 0.25]
    y = torch.tensor([0])
    ce = math.log(2.0)
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert losses.guidance_loss(logits_hat, logits_clean, y).item() == pytest.approx(ce + kl)
    loss = losses.guidance_loss(logits_hat, logits_clean, y, ce_weight=2.0, kl_weight=0.5)
    assert loss.item() == pytest.approx(2 * ce + 0.5 * kl)
    loss.backward()
    assert logits_clean.grad is None and logits_hat.grad is not None
    assert losses.guidance_loss(logits_hat, logits_clean, y, ce_weight=0.0).item() == pytest.approx(
        kl
    )
    assert losses.guidance_loss(logits_hat, logits_clean, y, kl_weight=0.0).item() == pytest.approx(
        ce
    )


def test_guidance_loss_averages_over_the_batch() -> None:
    logits = torch.tensor([[0.0, 0.0], [LOG3, 0.0]])
    y = torch.tensor([0, 1])
    # KL of identical predictions is 0; CE = mean(log 2, -log 0.25)
    expected = (math.log(2.0) - math.log(0.25)) / 2
    assert losses.guidance_loss(logits, logits, y).item() == pytest.approx(expected, abs=1e-6)


def test_feature_guidance_loss_value() -> None:
    feat_hat = torch.tensor([[1.0, -2.0, 3.0]], requires_grad=True)
    feat_clean = torch.tensor([[0.0, 0.0, 0.0]], requires_grad=True)
    loss = losses.feature_guidance_loss(feat_hat, feat_clean)
    assert loss.item() == pytest.approx(2.0)
    loss.backward()
    assert feat_clean.grad is None


def test_lsgan_losses() -> None:
    real = torch.tensor([1.0, 0.0])
    fake = torch.tensor([0.0, 1.0])
    # 0.5 * mean([0, 1]) + 0.5 * mean([0, 1])
    assert losses.d_loss(real, fake).item() == pytest.approx(0.5)
    assert losses.d_loss(real, fake, kind="lsgan").item() == pytest.approx(0.5)
    assert losses.d_loss(torch.ones(3), torch.zeros(3), "lsgan").item() == 0.0
    # 0.5 * mean([(0 - 1)^2, (3 - 1)^2])
    assert losses.g_adv_loss(torch.tensor([0.0, 3.0])).item() == pytest.approx(1.25)
    assert losses.g_adv_loss(torch.ones(1, 1, 2, 2), "lsgan").item() == 0.0


def test_nsgan_losses() -> None:
    zero = torch.zeros(1, 1, 2, 2)
    assert losses.d_loss(zero, zero, "nsgan").item() == pytest.approx(2 * math.log(2.0))
    t = torch.tensor([LOG3])  # sigmoid(log 3) = 0.75
    assert losses.d_loss(t, t, "nsgan").item() == pytest.approx(-math.log(0.75) - math.log(0.25))
    assert losses.g_adv_loss(t, "nsgan").item() == pytest.approx(-math.log(0.75))
    assert losses.g_adv_loss(zero, kind="nsgan").item() == pytest.approx(math.log(2.0))


def test_ape_gan_generator_loss_value() -> None:
    x_hat = torch.tensor([[[[0.5, 0.25]]]])
    x = torch.tensor([[[[0.0, 1.0]]]])
    fake = torch.zeros(1, 1, 1, 1)
    expected = 0.7 * (0.25 + 0.5625) / 2 + 0.3 * math.log(2.0)
    assert losses.ape_gan_generator_loss(x_hat, x, fake).item() == pytest.approx(expected)


def test_gan_losses_give_d_and_g_opposite_pulls() -> None:
    for kind in ("lsgan", "nsgan"):
        fake = torch.full((4,), 0.5, requires_grad=True)
        losses.d_loss(torch.ones(4), fake, kind).backward()
        assert fake.grad is not None and bool((fake.grad > 0).all())  # D pushes fake down
        fake.grad = None
        losses.g_adv_loss(fake, kind).backward()
        assert bool((fake.grad < 0).all())  # G pushes fake up


def test_losses_reject_bad_kinds_with_a_hint() -> None:
    t = torch.zeros(2)
    with pytest.raises(UsageError, match="did you mean 'lsgan'"):
        losses.d_loss(t, t, "lsgn")
    with pytest.raises(UsageError, match="did you mean 'nsgan'"):
        losses.g_adv_loss(t, "nsgn")
    with pytest.raises(UsageError, match="l1"):
        losses.pixel_loss(t, t, "l3")
    with pytest.raises(UsageError):
        losses.pixel_loss(t, t, "wasserstein")


def test_losses_reject_bad_shapes_and_weights() -> None:
    with pytest.raises(UsageError, match="same shape"):
        losses.inverse_perturbation_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(UsageError, match="same shape"):
        losses.pixel_loss(torch.zeros(1, 3, 2, 2), torch.zeros(1, 1, 2, 2))
    with pytest.raises(UsageError, match="same shape"):
        losses.feature_guidance_loss(torch.zeros(2, 3), torch.zeros(3, 2))
    logits, y = torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)
    with pytest.raises(UsageError, match="same shape"):
        losses.guidance_loss(logits, torch.zeros(2, 4), y)
    for kw in ({"ce_weight": -1.0}, {"kl_weight": float("nan")}, {"ce_weight": float("inf")}):
        with pytest.raises(UsageError):
            losses.guidance_loss(logits, logits, y, **kw)


# -- generator ----------------------------------------------------------------------------------


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**16),
    eps_r=st.floats(1e-3, 1.0),
    scale=st.sampled_from([1.0, 10.0, 1e4]),
    size=st.sampled_from([4, 7, 8, 10]),
    channels=st.sampled_from([1, 3]),
    mode=st.sampled_from(["nearest", "bilinear"]),
)
def test_generator_output_is_bounded(
    seed: int, eps_r: float, scale: float, size: int, channels: int, mode: str
) -> None:
    torch.manual_seed(seed)
    g = randomise(Generator(channels, 8, eps_r=eps_r, upsample=mode), scale, seed)
    x = torch.rand(2, channels, size, size)
    for train in (True, False):
        g.train(train)
        with torch.no_grad():
            x_hat, r = g.purify_with_residual(x)
        assert r.abs().max().item() <= eps_r + 1e-6
        assert float(x_hat.min()) >= 0.0 and float(x_hat.max()) <= 1.0
        assert (x_hat - x).abs().max().item() <= eps_r + 1e-6
        assert torch.isfinite(x_hat).all()


@pytest.mark.parametrize("value", [0.0, 1.0])
def test_generator_bound_at_extreme_inputs_and_huge_activations(value: float) -> None:
    eps_r = 16 / 255
    g = randomise(Generator(3, 8, eps_r=eps_r), scale=1e6).eval()
    # huge activations everywhere: blow up every batch norm's scale too
    with torch.no_grad():
        for m in g.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.mul_(1e3)
    x = torch.full((2, 3, 8, 8), value)
    x[1, :, ::2] = 1.0 - value  # a pattern, so the activations are not constant
    with torch.no_grad():
        h = g.raw(x)
        x_hat, r = g.purify_with_residual(x)
    assert h.abs().max().item() > 1e6
    assert r.abs().max().item() <= eps_r + 1e-6
    assert float(x_hat.min()) >= 0.0 and float(x_hat.max()) <= 1.0
    assert torch.equal(g(x), x_hat)


def test_untrained_generator_is_the_identity() -> None:
    g = Generator(eps_r=8 / 255).eval()
    x = torch.rand(2, 3, 16, 16)
    x_hat, r = g.purify_with_residual(x)
    assert torch.equal(r, torch.zeros_like(x))
    assert torch.equal(x_hat, x)


def test_forward_residual_and_purify_agree() -> None:
    g = randomise(Generator(3, 8, eps_r=0.1)).eval()
    x = torch.rand(2, 3, 12, 12)
    x_hat, r = g.purify_with_residual(x)
    assert torch.equal(g.residual(x), r)
    assert torch.equal(g(x), x_hat)
    assert torch.allclose(x_hat, (x + r).clamp(0, 1))
    assert torch.allclose(r, 0.1 * torch.tanh(g.raw(x)))


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_generator_has_no_transposed_convolution(depth: int, mode: str) -> None:
    g = Generator(eps_r=0.1, depth=depth, upsample=mode)
    transposed = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    assert not any(isinstance(m, transposed) for m in g.modules())
    assert any(isinstance(m, nn.Conv2d) for m in g.modules())


@pytest.mark.parametrize(
    ("channels", "height", "width"),
    [(1, 28, 28), (3, 32, 32), (3, 13, 17), (1, 4, 4)],
)
def test_generator_keeps_the_input_shape(channels: int, height: int, width: int) -> None:
    g = randomise(Generator(channels, 8, eps_r=0.05)).eval()
    x = torch.rand(2, channels, height, width)
    with torch.no_grad():
        assert g(x).shape == x.shape
        assert g.residual(x).shape == x.shape


def test_generator_default_size_at_28x28_and_32x32() -> None:
    for channels, size in ((1, 28), (3, 32)):
        g = Generator(channels, eps_r=0.3).eval()
        with torch.no_grad():
            assert g(torch.rand(1, channels, size, size)).shape == (1, channels, size, size)


def test_generator_is_small_and_has_a_cost() -> None:
    g = Generator(eps_r=8 / 255)
    params = count_parameters(g)
    assert 100_000 < params < 1_000_000
    cost = mflops(g, (3, 32, 32))
    assert cost > 0
    assert mflops(g) == cost  # defaults to (in_channels, 32, 32)


def test_generator_is_differentiable_end_to_end() -> None:
    g = randomise(Generator(3, 8, eps_r=0.1))
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    g(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert g.stem[0][0].weight.grad is not None


def test_generator_config_rebuilds_it() -> None:
    g = Generator(1, 16, eps_r="16/255", depth=3, upsample="bilinear")
    cfg = g.config()
    assert cfg == {
        "in_channels": 1,
        "width": 16,
        "eps_r": pytest.approx(16 / 255),
        "depth": 3,
        "upsample": "bilinear",
    }
    assert isinstance(cfg["eps_r"], float)
    twin = Generator(**cfg)
    twin.load_state_dict(g.state_dict())  # strict: same architecture
    assert (twin.eps_r, twin.in_channels, twin.width) == (g.eps_r, 1, 16)
    assert Generator(eps_r=0.1).config()["depth"] == 2


@pytest.mark.parametrize("eps_r", [0, 0.0, -0.1, float("nan"), float("inf"), 1.5, "x", True])
def test_generator_rejects_bad_eps_r(eps_r: object) -> None:
    with pytest.raises(UsageError, match="eps_r"):
        Generator(eps_r=eps_r)  # type: ignore[arg-type]


def test_generator_requires_eps_r() -> None:
    with pytest.raises(TypeError):
        Generator()  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"width": 0}, "width"),
        ({"width": 2}, "width"),
        ({"width": 16.0}, "width"),
        ({"width": 1024}, "width"),
        ({"in_channels": 0}, "in_channels"),
        ({"depth": 0}, "depth"),
        ({"depth": 5}, "depth"),
        ({"upsample": "bilinaer"}, "did you mean 'bilinear'"),
    ],
)
def test_generator_rejects_bad_arguments(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(UsageError, match=match):
        Generator(eps_r=0.1, **kwargs)  # type: ignore[arg-type]


def test_adam_on_inverse_perturbation_loss_reduces_it() -> None:
    torch.manual_seed(0)
    eps = 8 / 255
    # smooth images, so that the sign noise of the perturbation can be told apart from them
    ramp = torch.linspace(0.2, 0.8, 16)
    x = (ramp[None, None, :, None] * torch.rand(4, 3, 1, 1) + 0.1 * ramp).clamp(0, 1)
    x_adv = (x + eps * torch.randint(0, 2, x.shape).float().mul(2).sub(1)).clamp(0, 1)
    delta = x_adv - x
    assert delta.abs().max().item() <= eps + 1e-6
    g = Generator(3, 16, eps_r=2 * eps)
    opt = torch.optim.Adam(g.parameters(), lr=3e-3)
    history: list[float] = []
    for _ in range(40):
        loss = losses.inverse_perturbation_loss(g.residual(x_adv), delta)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    assert history[0] == pytest.approx(
        losses.inverse_perturbation_loss(torch.zeros_like(delta), delta).item()
    )
    assert history[-1] < 0.8 * history[0]


# -- discriminator ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("channels", "size", "n_down", "out"),
    [(3, 32, 2, 8), (1, 28, 2, 7), (3, 32, 3, 4), (3, 32, 1, 16)],
)
def test_discriminator_outputs_a_patch_map(channels: int, size: int, n_down: int, out: int) -> None:
    d = Discriminator(channels, 8, n_down=n_down).eval()
    with torch.no_grad():
        logits: Tensor = d(torch.rand(2, channels, size, size))
    assert logits.shape == (2, 1, out, out)
    assert torch.isfinite(logits).all()


def test_discriminator_default_and_config() -> None:
    d = Discriminator()
    assert d.config() == {"in_channels": 3, "width": 32, "n_down": 2}
    Discriminator(**d.config()).load_state_dict(d.state_dict())
    assert count_parameters(d) < 1_000_000
    x = torch.rand(2, 3, 32, 32)
    assert d(x).shape == (2, 1, 8, 8)
    # trains: the loss has gradients for every parameter
    losses.d_loss(d(x), d(x.flip(-1))).backward()
    assert all(p.grad is not None for p in d.parameters())


@pytest.mark.parametrize(
    "kwargs", [{"width": 0}, {"width": 3}, {"in_channels": 0}, {"n_down": 0}, {"n_down": 9}]
)
def test_discriminator_rejects_bad_arguments(kwargs: dict[str, int]) -> None:
    with pytest.raises(UsageError):
        Discriminator(**kwargs)

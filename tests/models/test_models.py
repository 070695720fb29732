"""Tests of advedge.models: registry, normalisation layer, architectures, size and cost."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator, Sequence

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from advedge.errors import UsageError
from advedge.models import (
    ImageClassifier,
    Normalize,
    count_parameters,
    create_model,
    estimate_flops,
    list_models,
    mflops,
    model_info,
    register_model,
)
from advedge.models import registry as registry_module
from advedge.models.mobilenetv2 import make_divisible
from advedge.models.tiny import TinyCNN

ALL_MODELS = [
    "mobilenetv2",
    "preact_resnet18",
    "resnet18",
    "resnet20",
    "resnet8",
    "tiny_cnn",
    "wide_resnet",
    "wrn28_10",
    "wrn34_10",
]
WIDE = {"wide_resnet", "wrn28_10", "wrn34_10"}
SMALL_MODELS = [n for n in ALL_MODELS if n not in WIDE]

# Parameter counts at 10 classes of the reference CIFAR implementations. resnet8/resnet20 use
# 1x1-conv + BN projection shortcuts (option B): 2,752 more parameters than option A
# (resnet20 with option A has the paper's 269,722).
REFERENCE_PARAMS = {
    "resnet18": 11_173_962,
    "preact_resnet18": 11_171_146 + 2 * 512,  # plus the final batch norm before pooling
    "wrn34_10": 46_160_474,
    "wide_resnet": 46_160_474,  # defaults: depth 34, widen_factor 10
    "wrn28_10": 36_479_194,
    "mobilenetv2": 2_236_682,
    "resnet20": 269_722 + 2_752,
    "resnet8": 78_042,
}
# The approximate figures quoted in the model docs; the counts must stay within 3% of them.
NOMINAL_PARAMS = {
    "resnet18": 11.2e6,
    "preact_resnet18": 11.2e6,
    "wrn34_10": 46.2e6,
    "wrn28_10": 36.5e6,
    "mobilenetv2": 2.2e6,
    "resnet20": 0.27e6,
    "resnet8": 0.078e6,
}


@functools.cache
def _built(name: str) -> ImageClassifier:
    """One default instance per architecture, in eval mode; tests must not modify it."""
    torch.manual_seed(0)
    return create_model(name).eval()


@pytest.fixture(autouse=True, scope="module")
def _release_built_models() -> Iterator[None]:
    """Free the cached models (about 0.6 GB with the wide networks) after this module."""
    yield
    _built.cache_clear()


def _batch(n: int = 2, channels: int = 3, size: int = 32, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, channels, size, size), generator=g)


# --- registry ---------------------------------------------------------------------------------


def test_list_models_is_sorted_and_complete() -> None:
    names = list_models()
    assert names == sorted(names)
    assert set(ALL_MODELS) <= set(names)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_model_info_describes_without_building(name: str) -> None:
    info = model_info(name)
    assert info["name"] == name
    assert info["description"] and "\n" not in info["description"]
    json.dumps(info)  # the CLI prints it as JSON


def test_model_info_lists_architecture_defaults() -> None:
    assert model_info("mobilenetv2")["default_kwargs"] == {"width_mult": 1.0}
    assert model_info("wide_resnet")["default_kwargs"] == {
        "depth": 34,
        "widen_factor": 10,
        "dropout": 0.0,
    }
    assert model_info("resnet18")["default_kwargs"] == {}


def test_unknown_model_suggests_close_name() -> None:
    with pytest.raises(UsageError, match="unknown model 'resnet81'") as info:
        create_model("resnet81")
    assert info.value.hint is not None and "'resnet18'" in info.value.hint
    with pytest.raises(UsageError, match="unknown model"):
        model_info("mobilenet_v3")


def test_unknown_kwarg_names_accepted_ones() -> None:
    with pytest.raises(UsageError, match="'width'") as info:
        create_model("mobilenetv2", width=0.5)
    hint = info.value.hint or ""
    assert "did you mean 'width_mult'" in hint
    assert "num_classes" in hint and "width_mult" in hint
    with pytest.raises(UsageError, match="'width_mult'") as info:
        create_model("resnet18", width_mult=0.5)
    assert "resnet18 accepts: num_classes, in_channels, mean, std" in (info.value.hint or "")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_classes": 1}, "num_classes must be at least 2"),
        ({"num_classes": 2.5}, "num_classes must be an integer"),
        ({"num_classes": True}, "num_classes must be an integer"),
        ({"in_channels": 2}, "in_channels must be 1 or 3"),
        ({"in_channels": 4}, "in_channels must be 1 or 3"),
        ({"mean": (0.5, 0.5)}, "mean has 2 values but the model has 3"),
        ({"in_channels": 1, "mean": (0.1, 0.2, 0.3)}, "mean has 3 values but the model has 1"),
        ({"std": (0.2, 0.2, 0.2, 0.2)}, "std has 4 values"),
        ({"std": (0.2, 0.0, 0.2)}, "std must be positive"),
        ({"std": (0.2, -1.0, 0.2)}, "std must be positive"),
        ({"mean": "0.5"}, "mean must be a sequence"),
        ({"mean": 0.5}, "mean must be a sequence"),
        ({"mean": (0.5, float("nan"), 0.5)}, "mean must be finite"),
    ],
)
def test_invalid_common_arguments_raise_usage_error(kwargs: dict, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        create_model("tiny_cnn", **kwargs)


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("mobilenetv2", {"width_mult": 0.0}, "width_mult must lie in"),
        ("mobilenetv2", {"width_mult": "wide"}, "width_mult must be a number"),
        ("wide_resnet", {"depth": 30}, "depth must be 6n \\+ 4"),
        ("wide_resnet", {"depth": 4}, "depth must be 6n \\+ 4"),
        ("wide_resnet", {"widen_factor": 0}, "widen_factor must be at least 1"),
        ("wide_resnet", {"widen_factor": 2.5}, "widen_factor must be an integer"),
        ("wrn34_10", {"dropout": 1.0}, "dropout must lie in"),
        ("wrn34_10", {"dropout": (0.1,)}, "dropout must be a number"),
    ],
)
def test_invalid_architecture_arguments_raise_usage_error(
    name: str, kwargs: dict, match: str
) -> None:
    with pytest.raises(UsageError, match=match):
        create_model(name, **kwargs)


def test_default_stats_are_cifar10_and_mnist() -> None:
    rgb = create_model("tiny_cnn")
    assert rgb.arch_kwargs["mean"] == [0.4914, 0.4822, 0.4465]
    assert rgb.arch_kwargs["std"] == [0.2471, 0.2435, 0.2616]
    torch.testing.assert_close(rgb.normalize.mean.flatten(), torch.tensor([0.4914, 0.4822, 0.4465]))
    grey = create_model("tiny_cnn", in_channels=1)
    assert grey.arch_kwargs["mean"] == [0.1307] and grey.arch_kwargs["std"] == [0.3081]
    torch.testing.assert_close(grey.normalize.std.flatten(), torch.tensor([0.3081]))


def test_register_model_rejects_duplicates_and_bad_factories(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(registry_module, "MODELS", registry_module.MODELS.copy())

    with pytest.raises(ValueError, match="'resnet18' is already registered"):

        @register_model
        def resnet18(
            *, num_classes: int, in_channels: int, mean: Sequence[float], std: Sequence[float]
        ) -> ImageClassifier:
            """Duplicate."""
            raise AssertionError

    with pytest.raises(TypeError, match="needs a default"):

        @register_model("needs_default")
        def factory(
            *,
            num_classes: int,
            in_channels: int,
            mean: Sequence[float],
            std: Sequence[float],
            width: int,
        ) -> ImageClassifier:
            raise AssertionError

    with pytest.raises(TypeError, match="must accept the keyword arguments"):

        @register_model(name="no_common")
        def other(*, num_classes: int) -> ImageClassifier:
            raise AssertionError

    assert "needs_default" not in list_models() and "no_common" not in list_models()


def test_register_model_under_explicit_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_module, "MODELS", registry_module.MODELS.copy())

    @register_model("my_tiny")
    def build(
        *,
        num_classes: int,
        in_channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        scale: int = 1,
    ) -> ImageClassifier:
        """My tiny model.

        More text that is not part of the description.
        """
        return TinyCNN(num_classes=num_classes * scale, in_channels=in_channels, mean=mean, std=std)

    assert "my_tiny" in list_models() and "build" not in list_models()
    assert model_info("my_tiny") == {
        "name": "my_tiny",
        "description": "My tiny model.",
        "default_kwargs": {"scale": 1},
    }
    model = create_model("my_tiny", num_classes=3, scale=2)
    assert model.num_classes == 6
    assert model.arch == "my_tiny" and model.arch_kwargs["scale"] == 2
    with pytest.raises(UsageError, match="arguments of model 'my_tiny' must be plain"):
        create_model("my_tiny", scale=object())


# --- rebuilding from arch / arch_kwargs -------------------------------------------------------


@pytest.mark.parametrize("name", ALL_MODELS)
def test_rebuild_from_arch_kwargs_gives_same_architecture(name: str) -> None:
    model = _built(name)
    assert model.arch == name
    kwargs = json.loads(json.dumps(model.arch_kwargs))  # as stored in checkpoint metadata
    assert kwargs == model.arch_kwargs
    assert {"num_classes", "in_channels", "mean", "std"} <= set(kwargs)
    assert set(kwargs) - {"num_classes", "in_channels", "mean", "std"} == set(
        model_info(name)["default_kwargs"]
    )
    with torch.device("meta"):  # shapes only: no memory or init cost for the wide networks
        rebuilt = create_model(model.arch, **kwargs)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} == expected
    assert rebuilt.arch == model.arch and rebuilt.arch_kwargs == model.arch_kwargs


def test_rebuild_keeps_non_default_arguments() -> None:
    model = create_model(
        "mobilenetv2", num_classes=7, in_channels=1, mean=[0.5], std=[0.25], width_mult=0.5
    )
    assert model.arch_kwargs == {
        "num_classes": 7,
        "in_channels": 1,
        "mean": [0.5],
        "std": [0.25],
        "width_mult": 0.5,
    }
    rebuilt = create_model(model.arch, **model.arch_kwargs)
    rebuilt.load_state_dict(model.state_dict())  # strict: same keys and shapes
    model.eval()
    rebuilt.eval()
    x = _batch(2, 1, 28)
    torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=0)


# --- forward passes -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_MODELS)
def test_every_model_maps_images_to_finite_logits(name: str) -> None:
    model = _built(name)
    x = _batch(1 if name in WIDE else 2)
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (x.shape[0], 10)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    assert model.num_classes == 10 and model.in_channels == 3


@pytest.mark.parametrize("name", SMALL_MODELS)
def test_forward_is_head_of_features(name: str) -> None:
    model = _built(name)
    x = _batch()
    with torch.no_grad():
        feats = model.forward_features(x)
        logits = model(x)
    assert feats.shape == (2, model.feature_dim)
    assert model.fc.in_features == model.feature_dim
    torch.testing.assert_close(model.forward_head(feats), logits, rtol=0, atol=0)


@pytest.mark.parametrize("name", SMALL_MODELS)
def test_eval_mode_is_deterministic(name: str) -> None:
    model = _built(name)
    x = _batch(2, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["resnet18", "tiny_cnn", "resnet20", "mobilenetv2"])
def test_grey_28x28_inputs_work(name: str) -> None:
    model = create_model(name, in_channels=1).eval()
    x = _batch(2, channels=1, size=28)
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    assert model.in_channels == 1


@pytest.mark.parametrize("name", SMALL_MODELS)
def test_small_inputs_down_to_16_pixels_work(name: str) -> None:
    model = _built(name)
    with torch.no_grad():
        logits = model(_batch(2, size=16))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()


def test_num_classes_sets_head_width() -> None:
    model = create_model("resnet20", num_classes=100).eval()
    assert model.num_classes == 100
    with torch.no_grad():
        assert model(_batch()).shape == (2, 100)


def test_training_step_reaches_every_parameter_and_the_input() -> None:
    torch.manual_seed(0)
    model = create_model("tiny_cnn")
    model.train()
    x = _batch(4).requires_grad_(True)
    loss = nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # attacks need input gradients
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert torch.equal(x.detach(), _batch(4))  # the input was not modified in place


@pytest.mark.parametrize(
    ("name", "layer"),
    [("resnet18", "layers"), ("mobilenetv2", "layers"), ("resnet20", "layers")],
)
def test_cifar_variants_end_at_4x4_or_8x8(name: str, layer: str) -> None:
    model = _built(name)
    seen: list[tuple[int, ...]] = []
    handle = getattr(model, layer).register_forward_hook(
        lambda module, inputs, output: seen.append(tuple(output.shape))
    )
    try:
        with torch.no_grad():
            model(_batch(1))
    finally:
        handle.remove()
    expected_hw = (8, 8) if name == "resnet20" else (4, 4)
    assert seen[0][2:] == expected_hw


# --- normalisation ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_MODELS)
def test_normalize_is_the_first_layer(name: str) -> None:
    model = _built(name)
    first_name, first = next(iter(model.named_children()))
    assert first_name == "normalize" and isinstance(first, Normalize)
    assert first.channels == model.in_channels
    # Buffers, not parameters: saved with the weights, never trained.
    assert "normalize.mean" in model.state_dict() and "normalize.std" in model.state_dict()
    assert not any(n.startswith("normalize.") for n, _ in model.named_parameters())
    assert first.mean.shape == (1, model.in_channels, 1, 1)


def test_image_equal_to_mean_reaches_the_stem_as_zeros() -> None:
    mean = (0.2, 0.5, 0.7)
    std = (0.1, 0.2, 0.3)
    model = create_model("resnet20", mean=mean, std=std).eval()
    x = torch.tensor(mean).view(1, 3, 1, 1).expand(2, 3, 32, 32).clone()
    seen: list[Tensor] = []
    handle = model.conv1.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    assert seen[0].shape == (2, 3, 32, 32)
    torch.testing.assert_close(seen[0], torch.zeros_like(x), rtol=0, atol=1e-6)
    # and a pixel one std above the mean becomes 1
    torch.testing.assert_close(
        model.normalize(x + torch.tensor(std).view(1, 3, 1, 1)), torch.ones_like(x)
    )


@settings(max_examples=25, deadline=None)
@given(
    st.integers(1, 3).flatmap(
        lambda c: st.tuples(
            st.lists(st.floats(-2, 2), min_size=c, max_size=c),
            st.lists(st.floats(0.01, 4), min_size=c, max_size=c),
        )
    )
)
def test_normalize_computes_x_minus_mean_over_std(stats: tuple[list[float], list[float]]) -> None:
    mean, std = stats
    layer = Normalize(mean, std)
    x = torch.rand(2, len(mean), 5, 5)
    expected = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    torch.testing.assert_close(layer(x), expected)


def test_normalize_rejects_bad_statistics() -> None:
    with pytest.raises(UsageError, match="mean has 2 values but std has 3"):
        Normalize([0.1, 0.2], [0.1, 0.2, 0.3])
    with pytest.raises(UsageError, match="std must be positive"):
        Normalize([0.1], [0.0])
    with pytest.raises(UsageError, match="must not be empty"):
        Normalize([], [])


# --- size and cost ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMS))
def test_parameter_counts_match_reference_implementations(name: str) -> None:
    count = count_parameters(_built(name))
    assert count == REFERENCE_PARAMS[name]
    if name in NOMINAL_PARAMS:
        assert abs(count - NOMINAL_PARAMS[name]) / NOMINAL_PARAMS[name] < 0.03


def test_tiny_cnn_is_tiny_and_fast() -> None:
    model = _built("tiny_cnn")
    # conv 3->8 (216) + BN (16) + conv 8->16 (1152) + BN (32) + linear 16->10 (170)
    assert count_parameters(model) == 1586 < 10_000
    # MACs: 32*32*8*27 + 16*16*16*72 + 16*10
    assert estimate_flops(model) == 221_184 + 294_912 + 160


def test_count_parameters_trainable_only() -> None:
    model = create_model("tiny_cnn")
    model.fc.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == 1586 - 170
    assert count_parameters(model) == 1586


def test_mobilenetv2_width_multiplier() -> None:
    half = create_model("mobilenetv2", width_mult=0.5)
    assert count_parameters(half) < count_parameters(_built("mobilenetv2"))
    assert half.feature_dim == 1280  # the last layer is not narrowed below 1.0
    widths = [m.out_channels for m in half.modules() if isinstance(m, nn.Conv2d)]
    assert all(w % 8 == 0 for w in widths)
    assert create_model("mobilenetv2", width_mult=1.5).feature_dim == 1920


@pytest.mark.parametrize(
    ("value", "expected"), [(32, 32), (16, 16), (12, 16), (4, 8), (1.0, 8), (27.9, 32), (76, 80)]
)
def test_make_divisible(value: float, expected: int) -> None:
    assert make_divisible(value) == expected


def test_resnet18_costs_about_0_56_gmacs() -> None:
    model = _built("resnet18")
    macs = estimate_flops(model)
    assert abs(macs - 0.556e9) / 0.556e9 < 0.05
    assert mflops(model) == pytest.approx(2 * macs / 1e6)


def test_estimate_flops_scales_with_resolution_and_restores_mode() -> None:
    model = create_model("resnet20")
    model.train()
    at_32 = estimate_flops(model, (3, 32, 32))
    at_64 = estimate_flops(model, (3, 64, 64))
    assert model.training
    linear = 64 * 10
    assert at_64 - linear == 4 * (at_32 - linear)  # convolutions scale with the pixel count
    grey = create_model("resnet20", in_channels=1)
    assert estimate_flops(grey) == estimate_flops(grey, (1, 32, 32)) < at_32


@pytest.mark.parametrize("name", ["tiny_cnn", "resnet8", "mobilenetv2"])
def test_model_cost_on_meta_equals_a_real_build(name):
    from advedge.models import count_parameters, estimate_flops, model_cost

    torch.manual_seed(0)
    real = create_model(name)
    cost = model_cost(name)
    assert cost == {"parameters": count_parameters(real), "macs": estimate_flops(real)}
    assert next(real.parameters()).device.type == "cpu"  # the real build was not touched


def test_models_command_lists_parameters_and_macs(capsys):
    from advedge.cli import main

    assert main(["models", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    by_name = {m["name"]: m for m in doc["models"]}
    assert set(by_name) == set(list_models())
    # ResNet-18 (CIFAR stem): 11.17M parameters, 0.56 GMACs on a 32x32 image
    assert by_name["resnet18"]["parameters"] == 11_173_962
    assert 550e6 < by_name["resnet18"]["macs"] < 560e6
    assert all(m["parameters"] > 0 and m["macs"] > 0 for m in doc["models"])

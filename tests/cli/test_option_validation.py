"""Inputs that are checked, not trusted: option values, ``--model-arg`` and YAML configs.

Every bad input here must be refused with one named ``error:`` line and the documented exit
code (2 for a usage problem) before anything is written; none may be read some other way,
accepted silently, or surface as ``error: unexpected X``.
"""

from __future__ import annotations

import dataclasses
import math
import random
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from advedge.cli.options import parse_model_args
from advedge.config import (
    MAX_CONFIG_BYTES,
    SEED_MAX,
    ConfigLoader,
    config_from_dict,
    load_yaml,
    parse_yaml,
)
from advedge.errors import UsageError
from advedge.purifier.train import PurifierConfig
from advedge.training.engine import TrainConfig
from advedge.utils import parse_eps, parse_fraction

# 9 levels of 9 aliases: 9**9 (387 million) strings from 300 bytes.
ALIAS_BOMB = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
    f"{name}: &{name} [{','.join(['*' + prev] * 9)}]\n"
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True)
)


def refused(
    cli_error: Callable[..., tuple[int, str]], run: Path, *words: Any, **options: Any
) -> str:
    """``cli_error(*words, **options)``, which must exit 2 (a usage problem) without writing
    ``run``; returns its ``error:`` line."""
    code, error = cli_error(*words, **options)
    assert code == 2, error
    assert not run.exists()
    return error


def train_options(data: Path, out: Path, **overrides: Any) -> dict[str, Any]:
    """Options of a fast ``advedge train`` (were a bad value ever accepted, it ends quickly)."""
    opts: dict[str, Any] = {
        "data": data,
        "model": "tiny_cnn",
        "method": "natural",
        "out": out,
        "epochs": 1,
        "steps": 1,
        "subset": 32,
        "batch_size": 32,
        "eval_n": 8,
        "device": "cpu",
        "no_channels_last": True,
    }
    opts.update(overrides)
    return opts


@pytest.fixture
def refused_train(cli_error, tiny_npz_data: Path, tmp_path: Path) -> Callable[..., str]:
    """``refused_train(**overrides) -> error line``: a fast ``advedge train`` of
    :func:`train_options` into ``tmp_path/run`` (``config=`` adds ``--config``), which must be
    :func:`refused`."""
    run = tmp_path / "run"

    def go(**overrides: Any) -> str:
        return refused(cli_error, run, "train", **train_options(tiny_npz_data, run, **overrides))

    return go


def write_config(path: Path, data: Path, out: Path, extra: str) -> Path:
    """A train config (fast settings) followed by the YAML text ``extra``."""
    base = (
        f"data: {data}\nmodel: tiny_cnn\nmethod: natural\nout: {out}\nepochs: 1\nsteps: 1\n"
        "subset: 32\nbatch_size: 32\neval_n: 8\ndevice: cpu\nchannels_last: false\n"
    )
    keys = {line.split(":", 1)[0] for line in extra.splitlines()}
    kept = "".join(line + "\n" for line in base.splitlines() if line.split(":")[0] not in keys)
    path.write_text(kept + extra + "\n", encoding="utf-8")
    return path


# ------------------------------------------------------------------------- 1. eps fractions
def test_eps_fraction_with_two_slashes_is_refused(refused_train):
    error = refused_train(eps="8/255/2")
    assert "--eps" in error and "8/255/2" in error


@pytest.mark.parametrize("text", ["8/255/2", "1/2/3", "1_0/255", "1_000"])
def test_parse_fraction_accepts_only_number_or_a_over_b(text: str):
    with pytest.raises(UsageError, match="--alpha"):
        parse_fraction(text, name="--alpha")
    # the plain forms still parse, exactly
    assert parse_fraction("8/255") == 8 / 255
    assert parse_fraction(" 8 / 255 ") == 8 / 255
    assert parse_eps("0.03") == 0.03
    assert parse_fraction("1e-2/2") == 0.005


# ------------------------------------------------------------------- 2. config value types
@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("epochs: true", "config key 'epochs' must be an integer or null, got True"),
        ("epochs: 1.7", "config key 'epochs' must be an integer or null, got 1.7"),
        ("batch_size: lots", "config key 'batch_size' must be an integer or null, got 'lots'"),
        (
            "batch_size: [32, 64]",
            "config key 'batch_size' must be an integer or null, got [32, 64]",
        ),
        ("lr: '0.1'", "config key 'lr' must be a finite number or null, got '0.1'"),
        ("subset: 1e400", "config key 'subset' must be an integer or null, got '1e400'"),
        ("subset: 1.0e+400", "config key 'subset' must be an integer or null, got inf"),
        ("seed: x", "config key 'seed' must be an integer, got 'x'"),
        ("model_kwargs: abc", "config key 'model_kwargs' must be a mapping"),
        ("nesterov: 1", "config key 'nesterov' must be true or false, got 1"),
        ("milestones: [0.5, x]", "config key 'milestones' must be a list of finite numbers"),
        ("lr: .inf", "config key 'lr' must be a finite number or null, got inf"),
    ],
)
def test_config_value_types_are_checked(
    cli_error, tiny_npz_data: Path, tmp_path: Path, extra: str, expected: str
):
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "train.yaml", tiny_npz_data, run, extra)
    assert expected in refused(cli_error, run, "train", config=cfg)


def test_config_int_for_float_field_is_accepted_as_float():
    cfg = config_from_dict(TrainConfig, {"data": "d", "model": "tiny_cnn", "lr": 1})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    cfg = config_from_dict(TrainConfig, {"data": "d", "model": "tiny_cnn", "milestones": [0.5]})
    assert cfg.milestones == (0.5,)


@dataclass(frozen=True)
class _Every:
    """One field of each annotation the checker handles."""

    n: int = 1
    x: float = 0.5
    flag: bool = False
    name: str = "a"
    maybe: int | None = None
    fractions: tuple[float, ...] = (0.5,)
    kwargs: dict[str, Any] = field(default_factory=dict)
    sizes: list[int] = field(default_factory=lambda: [1])


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("n", True, "must be an integer, got True"),
        ("n", 2.0, "must be an integer, got 2.0"),
        ("x", "0.5", "must be a finite number, got '0.5'"),
        ("x", float("nan"), "must be a finite number, got nan"),
        pytest.param("x", 10**400, "must be a finite number", id="x-huge-int"),
        ("flag", "yes", "must be true or false, got 'yes'"),
        ("name", 3, "must be a string, got 3"),
        ("maybe", "x", "must be an integer or null, got 'x'"),
        ("fractions", 0.5, "must be a list of finite numbers, got 0.5"),
        ("fractions", [0.5, None], "must be a list of finite numbers"),
        ("kwargs", [1], "must be a mapping"),
        ("kwargs", {1: 2}, "must be a mapping"),
        ("kwargs", {"a": b"bytes"}, "must be a mapping"),
        ("sizes", [1, True], "must be a list of integers, got [1, True]"),
        ("sizes", {"a": 1}, "must be a list of integers"),
    ],
)
def test_config_from_dict_checks_every_annotation_kind(key: str, value: Any, expected: str):
    with pytest.raises(UsageError) as info:
        config_from_dict(_Every, {key: value})
    assert str(info.value).startswith(f"config key {key!r} {expected}")
    assert "\n" not in str(info.value)


def test_config_from_dict_normalises_accepted_values():
    cfg = config_from_dict(
        _Every,
        {
            "n": 3,
            "x": 2,
            "flag": True,
            "maybe": 4,
            "fractions": [0.25, 1],
            "kwargs": {"w": [1, {"k": 0.5}]},
            "sizes": (1, 8),
        },
    )
    assert cfg.x == 2.0 and isinstance(cfg.x, float)
    assert cfg.fractions == (0.25, 1.0) and isinstance(cfg.fractions, tuple)
    assert cfg.sizes == [1, 8] and isinstance(cfg.sizes, list)
    assert cfg.kwargs == {"w": [1, {"k": 0.5}]}
    assert config_from_dict(_Every, {"maybe": None}).maybe is None


# ------------------------------------------------------------------ 3. YAML that is hostile
def test_yaml_alias_bomb_is_refused(refused_train, tmp_path: Path):
    assert len(ALIAS_BOMB) < 700
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text(ALIAS_BOMB, encoding="utf-8")
    error = refused_train(config=cfg)
    assert "alias" in error and "bomb.yaml" in error
    with pytest.raises(UsageError, match="alias"):
        load_yaml(cfg)


def test_config_loader_refuses_anchors_and_aliases():
    import yaml

    assert issubclass(ConfigLoader, yaml.SafeLoader)
    for text in ("x: &a 1", "x: &a 1\ny: *a", "x: *undefined", ALIAS_BOMB):
        with pytest.raises(yaml.YAMLError, match="alias"):
            parse_yaml(text)
    with pytest.raises(yaml.YAMLError):
        parse_yaml("x: !!python/object:os.system ls")
    assert parse_yaml("x: 1\ny: [a, b]\n") == {"x": 1, "y": ["a", "b"]}


def test_binary_config_is_a_usage_error(refused_train, tmp_path: Path):
    rng = random.Random(0)
    contents = {
        "random.yaml": bytes(rng.randrange(256) for _ in range(700)),
        "latin1.yaml": "epochs: 1\nname: caf\xe9\n".encode("latin-1"),
        "nul.yaml": b"epochs: 1\x00\n",
    }
    for name, raw in contents.items():
        cfg = tmp_path / name
        cfg.write_bytes(raw)
        error = refused_train(config=cfg)
        assert name in error, error
        assert "unexpected" not in error


def test_config_that_is_a_folder_or_unreadable_is_a_usage_error(
    refused_train, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    folder = tmp_path / "conf.d"
    folder.mkdir()
    error = refused_train(config=folder)
    assert "conf.d" in error and "folder" in error

    locked = tmp_path / "locked.yaml"
    locked.write_text("epochs: 1\n", encoding="utf-8")
    real_open = Path.open

    def deny(self: Path, *args: Any, **kwargs: Any):  # root ignores chmod 000: simulate it
        if self.name == "locked.yaml":
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", deny)
    error = refused_train(config=locked)
    assert "locked.yaml" in error and "permission denied" in error


def test_config_too_large_or_too_deep_is_a_usage_error(refused_train, tmp_path: Path):
    big = tmp_path / "big.yaml"
    big.write_text("".join(f"k{i}: {i}\n" for i in range(MAX_CONFIG_BYTES // 8)), "utf-8")
    assert big.stat().st_size > MAX_CONFIG_BYTES
    error = refused_train(config=big)
    assert "big.yaml" in error and "larger than" in error

    deep = tmp_path / "deep.yaml"
    deep.write_text("model_kwargs: " + "[" * 50_000 + "]" * 50_000 + "\n", "utf-8")
    error = refused_train(config=deep)
    assert "deep.yaml" in error and "nested too deeply" in error


# ---------------------------------------------------------------- 4. floats must be finite
@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("lr", "inf"),
        ("lr", "nan"),
        ("momentum", "nan"),
        ("weight_decay", "inf"),
        ("beta", "nan"),
        ("beta", "-inf"),
    ],
)
def test_train_refuses_non_finite_float_options(refused_train, flag: str, value: str):
    error = refused_train(**{flag: value})
    assert f"'{flag}'" in error and "finite" in error


def _float_fields(cls: type) -> list[str]:
    hints = typing.get_type_hints(cls)
    return [
        f.name
        for f in dataclasses.fields(cls)
        if hints[f.name] in (float, float | None, tuple[float, ...])
    ]


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_train_config_float_fields_must_be_finite(bad: float):
    names = _float_fields(TrainConfig)
    assert {"lr", "momentum", "weight_decay", "beta", "gamma", "eps", "alpha"} <= set(names)
    for name in names:
        value = (bad,) if name == "milestones" else bad
        with pytest.raises(UsageError, match=f"^{name} must be .*finite"):
            TrainConfig(data="d", model="tiny_cnn", **{name: value})


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_purifier_config_float_fields_must_be_finite(bad: float):
    names = _float_fields(PurifierConfig)
    assert {"lr", "lr_d", "w_inv", "w_adv", "eps", "eps_r"} <= set(names)
    for name in names:
        with pytest.raises(UsageError, match=f"^{name} must be .*finite"):
            PurifierConfig(classifier="c", data="d", **{name: bad})


def test_distill_and_purifier_refuse_non_finite_lr(cli_error, tiny_npz_data: Path, tmp_path: Path):
    run = tmp_path / "run"
    common = {"data": tiny_npz_data, "epochs": 1, "out": run, "device": "cpu", "lr": "inf"}
    teacher = tmp_path / "teacher"
    error = refused(
        cli_error, run, "distill", teacher=teacher, student="tiny_cnn", method="kd", **common
    )
    assert "finite" in error
    assert "finite" in refused(
        cli_error, run, "purifier", "train", classifier=tmp_path / "clf", **common
    )


# --------------------------------------------------------- 5. seeds and bounded integers
@pytest.mark.parametrize("seed", ["-1", str(SEED_MAX + 1)])
def test_train_refuses_seed_out_of_range(refused_train, seed: str):
    error = refused_train(seed=seed)
    assert "seed" in error and "4294967295" in error


def test_config_file_seed_out_of_range_is_refused(cli_error, tiny_npz_data: Path, tmp_path: Path):
    run = tmp_path / "run"
    for extra in ("seed: 100000000000000000000", "seed: -1"):
        cfg = write_config(tmp_path / "train.yaml", tiny_npz_data, run, extra)
        assert "seed must lie in [0, 4294967295]" in refused(cli_error, run, "train", config=cfg)


def test_distill_refuses_negative_seed(cli_error, tiny_npz_data: Path, tmp_path: Path):
    run = tmp_path / "run"
    error = refused(
        cli_error,
        run,
        "distill",
        teacher=tmp_path / "teacher",
        student="tiny_cnn",
        method="kd",
        data=tiny_npz_data,
        epochs=1,
        out=run,
        seed=-1,
    )
    assert "seed must lie in" in error


# (option, value out of bounds) for both TrainConfig and PurifierConfig
OUT_OF_BOUNDS = [
    ("seed", -1),
    ("seed", 2**32),
    ("epochs", 10**9),
    ("steps", 10**6),
    ("batch_size", 10**6),
    ("subset", 10**12),
    ("eval_n", 10**12),
]


@pytest.mark.parametrize(
    ("name", "value"), [*OUT_OF_BOUNDS, ("seed", 10**20), ("eval_steps", 10**6)]
)
def test_train_config_integers_are_bounded(name: str, value: int):
    with pytest.raises(UsageError, match=f"^{name} must lie in"):
        TrainConfig(data="d", model="tiny_cnn", **{name: value})


@pytest.mark.parametrize(("name", "value"), [*OUT_OF_BOUNDS, ("width", 10**6), ("depth", 50)])
def test_purifier_config_integers_are_bounded(name: str, value: int):
    with pytest.raises(UsageError, match=f"^{name} must lie in"):
        PurifierConfig(classifier="c", data="d", **{name: value})


def test_python_api_refuses_bool_for_int():
    with pytest.raises(UsageError, match=r"^epochs must be an integer or null, got True"):
        TrainConfig(data="d", model="tiny_cnn", epochs=True)
    with pytest.raises(UsageError, match=r"^seed must be an integer, got 1\.5"):
        PurifierConfig(classifier="c", data="d", seed=1.5)


# ------------------------------------------------------------------------ 6. --model-arg
def test_model_arg_python_tag_is_a_usage_error(refused_train):
    error = refused_train(model_arg="width=!!python/object:os.system")
    assert "--model-arg" in error and "width=!!python/object:os.system" in error
    assert "unexpected" not in error


@pytest.mark.parametrize(
    "item",
    [
        "width=!!python/name:os.system",
        "width=[1, 2]",
        "width={a: 1}",
        "width=",
        "width=~",
        "width=.inf",
        "width=&a 1",
        "width=[1,",
        "day=2024-01-01",
        "=3",
        "two words=3",
    ],
)
def test_model_arg_accepts_only_scalars(item: str):
    with pytest.raises(UsageError, match=r"^--model-arg ") as info:
        parse_model_args([item])
    assert repr(item) in str(info.value)
    # scalars still parse
    assert parse_model_args(["w=0.5", "n=3", "ok=true", "s=abc", "q='1'"]) == {
        "w": 0.5,
        "n": 3,
        "ok": True,
        "s": "abc",
        "q": "1",
    }

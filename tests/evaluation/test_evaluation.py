"""Evaluation: exact per-example worst case, cascades, resume, sanity flags, suites."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advedge.attacks import PGD, Attack
from advedge.data import ImageArrays
from advedge.errors import UsageError
from advedge.evaluation import build_suite, evaluate
from advedge.evaluation.sanity import black_box_flag, determinism_flag, eps_flag, gradient_flag

K, N = 4, 40


class Lookup(nn.Module):
    """Class = (255 * first pixel) mod K, as confident logits. Not differentiable (on purpose)."""

    num_classes = K

    def forward(self, x):
        idx = torch.round(x[:, 0, 0, 0] * 255).long() % K
        return F.one_hot(idx, K).float() * 10


def lookup_data() -> ImageArrays:
    x = np.zeros((N, 4, 4, 3), dtype=np.uint8)
    x[:, 0, 0, 0] = np.arange(N)
    return ImageArrays(x, (np.arange(N) % K).astype(np.int64), tuple(str(i) for i in range(K)))


class BreakSet(Attack):
    """Breaks exactly the examples whose id (first pixel * 255) is in ``ids``."""

    def __init__(self, model, ids, name, kind="white-box", stop_after=None):
        super().__init__(model, eps=2 / 255)
        self.ids = set(ids)
        self.name = name
        self.kind = kind
        self.calls = 0
        self.stop_after = stop_after

    def perturb(self, x, y):
        self.calls += 1
        if self.stop_after is not None and self.calls > self.stop_after:
            raise KeyboardInterrupt
        ids = torch.round(x[:, 0, 0, 0] * 255).long()
        hit = torch.tensor([int(i) in self.ids for i in ids])
        x = x.clone()
        x[hit, 0, 0, 0] += 1 / 255
        return x


def _run(attacks, **kw):
    return evaluate(Lookup(), lookup_data(), attacks, eps=2 / 255, flags_n=0, batch_size=8, **kw)


def test_worst_case_is_per_example_not_min_of_attacks():
    model = Lookup()
    a = BreakSet(model, range(0, 10), "a")
    b = BreakSet(model, range(10, 20), "b")
    res = _run([a, b])
    assert res["clean_acc"] == 1.0
    assert [e["robust_acc"] for e in res["attacks"]] == [0.75, 0.75]
    # min over attacks would claim 0.75; the per-example worst case is 0.5
    assert res["worst_case_acc"] == 0.5
    assert res["worst_case_attacks"] == ["a", "b"]
    assert res.per_example["a"].sum() == 30


def test_cascade_attacks_only_survivors_and_reports_cumulative():
    model = Lookup()
    a = BreakSet(model, range(0, 10), "a")
    b = BreakSet(model, range(5, 20), "b")
    res = _run([a, b], cascade=True)
    first, second = res["attacks"]
    assert first["n_attacked"] == 40 and first["n_broken"] == 10
    assert second["n_attacked"] == 30 and second["n_broken"] == 10  # 5..9 were already broken
    assert first["robust_acc"] == 0.75 and second["robust_acc"] == 0.5
    assert res["worst_case_acc"] == 0.5


def test_resume_continues_and_matches_uninterrupted(tmp_path):
    model = Lookup()
    state = tmp_path / "res.json.state.json"
    full = _run([BreakSet(model, range(0, 13), "a"), BreakSet(model, range(30, 33), "b")])
    with pytest.raises(KeyboardInterrupt):
        _run(
            [BreakSet(model, range(0, 13), "a", stop_after=2), BreakSet(model, range(30, 33), "b")],
            state_path=state,
        )
    saved = json.loads(state.read_text())
    assert len(saved["attacks"]["a"]["done"]) == 16  # two batches of 8 finished
    resumed_attack = BreakSet(model, range(0, 13), "a")
    res = _run([resumed_attack, BreakSet(model, range(30, 33), "b")], state_path=state, resume=True)
    assert resumed_attack.calls == 3  # only the 24 remaining examples, in batches of 8
    assert res["worst_case_acc"] == full["worst_case_acc"] == 24 / 40
    assert [e["n_broken"] for e in res["attacks"]] == [13, 3]


def test_resume_with_other_settings_is_refused(tmp_path):
    model = Lookup()
    state = tmp_path / "s.json"
    _run([BreakSet(model, [1], "a")], state_path=state)
    with pytest.raises(UsageError, match="settings differ"):
        evaluate(
            Lookup(),
            lookup_data(),
            [BreakSet(model, [1], "a")],
            eps=4 / 255,
            flags_n=0,
            state_path=state,
            resume=True,
        )


def test_black_box_flag():
    clean = np.ones(100, dtype=bool)
    white = np.ones(100, dtype=bool)
    white[:10] = False
    square = np.ones(100, dtype=bool)
    square[50:55] = False  # five examples only the query attack broke
    flag = black_box_flag(
        {"clean": clean, "pgd": white, "square": square},
        {"pgd": "white-box", "square": "query"},
        100,
    )
    assert flag["triggered"] and flag["values"]["n_black_box_only"] == 5
    square[52:55] = True
    flag = black_box_flag(
        {"clean": clean, "pgd": white, "square": square},
        {"pgd": "white-box", "square": "query"},
        100,
    )
    assert not flag["triggered"]


class Noisy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(12, 3)

    def forward(self, x):
        return self.lin(x.flatten(1)) + 0.1 * torch.randn(x.shape[0], 3)


class Rounding(nn.Module):
    """A gradient-masking 'defense': rounding the input kills every gradient."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(12, 3)

    def forward(self, x):
        return self.lin(torch.round(x * 4).flatten(1) / 4)


def test_flags_catch_randomness_and_masked_gradients():
    x = torch.rand(64, 3, 2, 2)
    assert determinism_flag(Noisy(), x)["triggered"]
    honest = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    assert not determinism_flag(honest, x)["triggered"]
    y = Rounding()(x).argmax(1)
    assert gradient_flag(Rounding(), x, y)["triggered"]
    assert not gradient_flag(honest, x, honest(x).argmax(1))["triggered"]


def test_eps_flag_on_masked_and_honest_models():
    torch.manual_seed(0)
    x = torch.rand(128, 3, 2, 2)
    masked = Rounding()
    flag = eps_flag(masked, x, masked(x).argmax(1), eps=8 / 255, norm="Linf", steps=5)
    assert flag["triggered"]  # PGD cannot move a model with zero gradients, even at a large eps
    honest = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    flag = eps_flag(honest, x, honest(x).argmax(1), eps=8 / 255, norm="Linf", steps=5)
    assert not flag["triggered"], flag
    assert flag["values"]["acc_at_large_eps"] <= 0.05


def test_suites_build_the_documented_attacks():
    from advedge.models import create_model

    model = create_model("tiny_cnn", num_classes=10)
    assert [a.name for a in build_suite("quick", model, eps=8 / 255)] == ["pgd", "cw"]
    standard = build_suite("standard", model, eps=8 / 255, n_queries=100)
    assert [a.name for a in standard] == ["apgd-ce", "apgd-t", "square"]
    assert [a.kind for a in standard] == ["white-box", "white-box", "query"]
    rand = build_suite("rand", model, eps=8 / 255)
    assert [a.name for a in rand] == ["apgd-ce-eot", "apgd-dlr-eot"]
    with pytest.raises(UsageError, match="standard"):
        build_suite("standrad", model, eps=8 / 255)


def linear_model_and_data(n: int, seed: int):
    """A linear 4-class model (torch seed 0) and ``n`` random 4x4 images it labels itself."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 4))
    model.num_classes = 4
    x = np.random.default_rng(seed).integers(0, 256, size=(n, 4, 4, 3), dtype=np.uint8)
    with torch.no_grad():
        y = model(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255).argmax(1).numpy()
    return model, x, y, ImageArrays(x, y.astype(np.int64), ("a", "b", "c", "d"))


def test_standard_suite_end_to_end_with_flags():
    """A small linear model: the suite runs, cascades, and all flags are computed."""
    model, x, y, data = linear_model_and_data(48, seed=0)
    attacks = build_suite("standard", model, eps=4 / 255, n_queries=200, n_iter=20)
    res = evaluate(model, data, attacks, eps=4 / 255, cascade=True, suite="standard", flags_n=32)
    accs = [e["robust_acc"] for e in res["attacks"]]
    assert accs == sorted(accs, reverse=True)  # cumulative: never rises along the cascade
    assert res["worst_case_acc"] == accs[-1]
    assert {f["name"] for f in res["flags"]} == {
        "deterministic",
        "gradients",
        "eps_monotonic",
        "more_steps",
        "black_box_beats_white_box",
    }
    assert not any(f["triggered"] for f in res["flags"] if f["name"] != "eps_monotonic")
    pgd = PGD(model, eps=4 / 255, steps=20)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        pgd_acc = float(
            (model(pgd(xt, torch.from_numpy(y))).argmax(1) == torch.from_numpy(y)).float().mean()
        )
    assert res["worst_case_acc"] <= pgd_acc + 1 / 48


def test_resume_with_another_seed_is_refused(tmp_path):
    model = Lookup()
    state = tmp_path / "s.json"
    _run([BreakSet(model, [1], "a")], state_path=state, seed=0)
    with pytest.raises(UsageError, match="seed"):
        _run([BreakSet(model, [1], "a")], state_path=state, seed=1, resume=True)


def test_square_query_statistics_cover_every_batch():
    """The queries of broken examples are gathered over all batches, not the last one."""
    from advedge.attacks import Square

    model, _, _, data = linear_model_and_data(24, seed=1)
    square = Square(model, eps=32 / 255, n_queries=300, seed=0)
    res = evaluate(model, data, [square], eps=32 / 255, batch_size=4, flags_n=0)
    entry = res["attacks"][0]
    assert entry["n_broken"] > 4  # more than one batch's worth
    assert entry["queries"]["n_broken"] == entry["n_broken"]
    assert 1 <= entry["queries"]["median"] <= 300


def test_eval_rejects_dlr_attacks_for_too_few_classes_before_writing(tmp_path):
    from conftest import write_npz_dataset

    from advedge.checkpoint import save_model
    from advedge.evaluation import evaluate_checkpoint
    from advedge.models import create_model

    data = write_npz_dataset(tmp_path / "d", num_classes=3, n_train=12, n_test=12, size=8)
    save_model(
        create_model("tiny_cnn", num_classes=3),
        tmp_path / "m.safetensors",
        metadata={"input_shape": [3, 8, 8]},
    )
    out = tmp_path / "res.json"
    with pytest.raises(UsageError, match="at least 4 classes"):
        evaluate_checkpoint(tmp_path / "m.safetensors", str(data), attacks=["apgd-t"], out=out)
    assert not out.exists() and not (tmp_path / "res.json.state.json").exists()

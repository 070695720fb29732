"""Sanity flags that expose gradient masking and broken evaluations.

Each check follows Carlini et al. 2019, "On Evaluating Adversarial Robustness" (section 5,
"basic sanity tests"): robust accuracy must fall as eps grows and reach about 0 at a large eps;
a black-box attack must not beat white-box ones; more attack steps must not raise accuracy; the
model must be deterministic; input gradients must be finite and mostly non-zero. A triggered
flag does not prove masking, but a robustness number with a triggered flag needs a stronger or
adaptive attack before anyone should believe it.

Every flag is a dict ``{"name", "triggered", "message", "values"}`` stored under ``flags`` in the
results JSON.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advedge.attacks import PGD

logger = logging.getLogger(__name__)

__all__ = [
    "black_box_flag",
    "determinism_flag",
    "eps_flag",
    "gradient_flag",
    "run_sanity_checks",
    "steps_flag",
]


def _flag(name: str, triggered: bool, message: str, **values: Any) -> dict[str, Any]:
    return {"name": name, "triggered": bool(triggered), "message": message, "values": values}


@torch.no_grad()
def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    return float((model(x).argmax(1) == y).float().mean())


def _pgd_accuracy(
    model: nn.Module, x: Tensor, y: Tensor, *, eps: float, norm: str, steps: int, seed: int
) -> float:
    gen = torch.Generator(device=x.device).manual_seed(seed)
    attack = PGD(model, eps=eps, alpha=2.5 * eps / steps, steps=steps, norm=norm, generator=gen)
    return _accuracy(model, attack(x, y), y)


def eps_flag(
    model: nn.Module, x: Tensor, y: Tensor, *, eps: float, norm: str, steps: int = 10, seed: int = 0
) -> dict[str, Any]:
    """PGD accuracy at eps, 2·eps and 8·eps (capped at 1 for L-inf).

    Triggered when the accuracy at 2·eps is not clearly below the one at eps (more than 90% of
    it, while that is above 5%), or when the accuracy at 8·eps is above 5%.
    """
    large = min(1.0, 8 * eps) if norm == "Linf" else 8 * eps
    acc = {
        "eps": _pgd_accuracy(model, x, y, eps=eps, norm=norm, steps=steps, seed=seed),
        "2eps": _pgd_accuracy(
            model,
            x,
            y,
            eps=min(1.0, 2 * eps) if norm == "Linf" else 2 * eps,
            norm=norm,
            steps=steps,
            seed=seed,
        ),
        "large": _pgd_accuracy(model, x, y, eps=large, norm=norm, steps=steps, seed=seed),
    }
    flat = acc["eps"] > 0.05 and acc["2eps"] > 0.9 * acc["eps"]
    not_zero = acc["large"] > 0.05
    parts = []
    if flat:
        parts.append(
            f"accuracy at 2·eps ({acc['2eps']:.3f}) is not clearly below eps ({acc['eps']:.3f})"
        )
    if not_zero:
        parts.append(f"accuracy at eps={large:.3g} is {acc['large']:.3f}, not near 0")
    return _flag(
        "eps_monotonic",
        flat or not_zero,
        "; ".join(parts) or "robust accuracy falls with eps and reaches ~0 at a large eps",
        pgd_steps=steps,
        acc_at_eps=acc["eps"],
        acc_at_2eps=acc["2eps"],
        large_eps=large,
        acc_at_large_eps=acc["large"],
    )


def steps_flag(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    norm: str,
    seed: int = 0,
    acc_pgd10: float | None = None,
) -> dict[str, Any]:
    """PGD-10 against PGD-50 at the same eps: more steps must not raise accuracy.

    Triggered when PGD-50 leaves more than one example (and more than 1%) more robust.
    ``acc_pgd10`` reuses an accuracy already measured with the same PGD-10 and seed.
    """
    few = acc_pgd10
    if few is None:
        few = _pgd_accuracy(model, x, y, eps=eps, norm=norm, steps=10, seed=seed)
    many = _pgd_accuracy(model, x, y, eps=eps, norm=norm, steps=50, seed=seed)
    tol = max(1.0 / x.shape[0], 0.01)
    raised = many > few + tol
    return _flag(
        "more_steps",
        raised,
        f"PGD-50 accuracy {many:.3f} is above PGD-10's {few:.3f}"
        if raised
        else f"PGD-50 {many:.3f} <= PGD-10 {few:.3f} (+tolerance)",
        acc_pgd10=few,
        acc_pgd50=many,
    )


@torch.no_grad()
def determinism_flag(model: nn.Module, x: Tensor) -> dict[str, Any]:
    """Logits of two passes over the same batch must agree (max abs difference <= 1e-4)."""
    a = model(x).float()
    b = model(x).float()
    diff = float((a - b).abs().max()) if a.numel() else 0.0
    bad = not np.isfinite(diff) or diff > 1e-4
    return _flag(
        "deterministic",
        bad,
        f"logits differ by up to {diff:.3g} for identical inputs (randomised defense? use the "
        "rand suite with EOT)"
        if bad
        else "identical inputs give identical logits",
        max_abs_logit_diff=diff,
    )


def gradient_flag(model: nn.Module, x: Tensor, y: Tensor, threshold: float = 0.1) -> dict[str, Any]:
    """Share of examples whose input gradient of CE is zero or non-finite; flagged above 10%."""
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(model(x).float(), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    per = grad.flatten(1)
    non_finite = ~torch.isfinite(per).all(1)
    zero = per.abs().amax(1) == 0
    frac_zero = float(zero.float().mean())
    frac_nonfinite = float(non_finite.float().mean())
    bad = frac_zero + frac_nonfinite > threshold
    return _flag(
        "gradients",
        bad,
        f"{frac_zero:.1%} of examples have zero and {frac_nonfinite:.1%} non-finite input "
        "gradients (gradient masking: try BPDA or a query attack)"
        if bad
        else "input gradients are finite and non-zero",
        frac_zero=frac_zero,
        frac_nonfinite=frac_nonfinite,
    )


def black_box_flag(
    per_example: Mapping[str, np.ndarray], kinds: Mapping[str, str], n: int
) -> dict[str, Any]:
    """Examples broken by a query/black-box attack but by no white-box attack.

    Triggered when that count is above ``max(2, 1% of n)``: the white-box attacks then do not
    find adversarial examples that exist, which is what masked gradients look like.
    """
    white = [k for k, v in kinds.items() if v in ("white-box", "adaptive")]
    black = [k for k, v in kinds.items() if v in ("query", "transfer", "black-box")]
    if not white or not black:
        return _flag(
            "black_box_beats_white_box",
            False,
            "not applicable: needs both white-box and black-box attacks",
            applicable=False,
        )
    white_robust = np.logical_and.reduce([per_example[k] for k in white])
    black_broken = np.logical_or.reduce([~per_example[k] for k in black])
    extra = int((white_robust & black_broken & per_example["clean"]).sum())
    limit = max(2, int(0.01 * n))
    return _flag(
        "black_box_beats_white_box",
        extra > limit,
        f"black-box attacks broke {extra} examples that survived every white-box attack"
        + (f" (more than {limit})" if extra > limit else ""),
        applicable=True,
        n_black_box_only=extra,
        limit=limit,
    )


def run_sanity_checks(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    norm: str,
    per_example: Mapping[str, np.ndarray] | None = None,
    kinds: Mapping[str, str] | None = None,
    n: int = 0,
    autocast: Callable[[], Any] | None = None,
    checks: Sequence[str] = ("deterministic", "gradients", "eps_monotonic", "more_steps"),
) -> list[dict[str, Any]]:
    """Run the sanity checks on the batch ``(x, y)`` and return their flags.

    Args:
        model: The differentiable model that was evaluated.
        x, y: A subset of the evaluation examples (a few hundred is enough).
        eps, norm: The threat model.
        per_example: The evaluation's per-example flags (``clean`` and one per attack).
        kinds: Attack name -> kind, for the black-box check.
        n: Number of evaluated examples.
        autocast: Optional autocast context factory.
        checks: Which model-based checks to run.

    Shape:
        x ``[B, C, H, W]`` in [0, 1], y ``[B]``.
    """
    ctx = autocast or contextlib.nullcontext
    was_training = model.training
    model.eval()
    flags: list[dict[str, Any]] = []
    try:
        with ctx():
            if "deterministic" in checks:
                flags.append(determinism_flag(model, x))
            if "gradients" in checks:
                flags.append(gradient_flag(model, x, y))
            pgd10 = None
            if "eps_monotonic" in checks:
                flags.append(eps_flag(model, x, y, eps=eps, norm=norm, steps=10))
                pgd10 = flags[-1]["values"]["acc_at_eps"]
            if "more_steps" in checks:
                flags.append(steps_flag(model, x, y, eps=eps, norm=norm, acc_pgd10=pgd10))
    finally:
        model.train(was_training)
    if per_example is not None and kinds is not None:
        flags.append(black_box_flag(per_example, kinds, n))
    for f in flags:
        if f["triggered"]:
            logger.warning("sanity flag %s: %s", f["name"], f["message"])
    return flags

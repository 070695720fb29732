"""Evaluating a classifier behind a purifier, ``f(G(x))``, under the purifier protocol.

A purifier that only ever sees attacks on the classifier alone looks far stronger than it is
(Athalye et al., ICML 2018). Every run therefore has these settings, each labelled in the JSON:

* ``grey-box``: the attacks are crafted on ``f`` alone (the attacker ignores ``G``), then the
  adversarial images are purified and scored by ``f(G(x'))``;
* ``adaptive`` (white-box): the same attacks, or the same suite, crafted on the composed model
  ``f . G`` end to end, back-propagating through the generator;
* ``bpda``: PGD-``steps`` with ``G`` run forward but treated as the identity backward (Athalye et al.'s
  Backward Pass Differentiable Approximation), in case ``G``'s own gradients are masked;
* ``eot``: PGD on the average of ``f(G(x))`` over 20 draws, run only when ``G`` is random
  (it is checked: two passes on the same batch must agree bit for bit, else EOT runs).

Each setting is evaluated with :func:`advedge.evaluation.evaluate` (cascading within a suite)
and the headline ``worst_case_acc`` is the per-example worst case over all of them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from advedge.attacks import BPDA, EOT, PGD, Attack
from advedge.data import Dataset, to_tensor
from advedge.evaluation.core import EvalResult, EvalSettings, predict
from advedge.evaluation.suites import AttackSettings
from advedge.models.purified import Purified
from advedge.purifier.checkpoint import check_purifier_fits, load_purifier, resolve_purifier
from advedge.stats import wilson_interval
from advedge.utils import sha256_file

logger = logging.getLogger(__name__)

__all__ = ["evaluate_purified", "is_deterministic"]

SETTINGS = ("grey-box", "adaptive")


@torch.no_grad()
def is_deterministic(module: nn.Module, x: Tensor) -> bool:
    """Whether two forward passes of ``module`` (eval mode) on ``x`` agree exactly."""
    module.eval()
    return bool(torch.equal(module(x), module(x)))


def evaluate_purified(
    classifier: nn.Module,
    purifier: str | os.PathLike[str],
    dataset: Dataset,
    attacks: AttackSettings,
    settings: EvalSettings,
    *,
    out: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Grey-box, adaptive, BPDA (and EOT) evaluation of ``classifier`` behind ``purifier``.

    Args:
        classifier: The classifier ``f`` (eval mode, on ``settings.device``).
        purifier: A purifier run directory or ``purifier.safetensors``.
        dataset: The data (its test split is used).
        attacks: The chosen attacks (or suite), built against each setting's target.
        settings: How to evaluate (as for :func:`advedge.evaluation.evaluate`); the sanity
            checks run in the adaptive setting only.
        out: The results file; each setting keeps its resumable state beside it as
            ``<out>.<setting>.state.json``.

    Returns:
        An ``advedge.eval/2`` result whose ``attacks`` carry a ``setting`` and a ``kind``,
        ``worst_case_acc`` over every setting, ``worst_case_by_setting``, ``clean_acc`` (through
        ``G``), ``clean_acc_no_purifier`` and a ``purifier`` record.
    """
    device = torch.device(settings.device)
    path = resolve_purifier(purifier)
    gen = load_purifier(path, device=device)
    check_purifier_fits(gen, getattr(classifier, "checkpoint_metadata", {}), str(path))
    composed = Purified(gen, classifier).eval()
    trained_against = gen.checkpoint_metadata.get("classifier") or {}
    same = trained_against.get("sha256") == (settings.model_info or {}).get("sha256")
    if not same:
        logger.warning(
            "the purifier was trained against another classifier (%s); evaluating the transfer",
            trained_against.get("path"),
        )
    test = dataset.test
    total = len(test) if settings.n is None else min(settings.n, len(test))
    random_g = not is_deterministic(gen, to_tensor(test.x[: min(total, 16)]).to(device))
    by_setting = _setting_attacks(classifier, composed, gen, attacks, settings, random_g)
    runs: dict[str, EvalResult] = {}
    for setting in SETTINGS:
        flags_n = settings.flags_n if setting == "adaptive" else 0
        state_path = None if out is None else Path(f"{out}.{setting}.state.json")
        here = dataclasses.replace(settings, flags_n=flags_n)
        runs[setting] = here.run(composed, test, by_setting[setting], state_path=state_path)
    x_all = to_tensor(test.x[:total]).to(device)
    y_all = torch.as_tensor(test.y[:total]).to(device)
    with torch.no_grad():
        clean_no_g = float(
            (predict(classifier, x_all, settings.batch_size) == y_all).float().mean()
        )
    result = _merge(runs, total)
    result.update(
        clean_acc_no_purifier=clean_no_g,
        seconds=round(sum(r["seconds"] for r in runs.values()), 3),
        purifier=_purifier_record(path, gen, trained_against, same, random_g),
        protocol="purifier: grey-box, adaptive white-box, BPDA" + (", EOT" if random_g else ""),
    )
    return result


def _setting_attacks(
    classifier: nn.Module,
    composed: Purified,
    gen: nn.Module,
    attacks: AttackSettings,
    settings: EvalSettings,
    random_g: bool,
) -> dict[str, list[Attack]]:
    """The attacks of each setting: grey-box on ``f``; adaptive on ``f . G``, BPDA (and EOT)."""
    device = torch.device(settings.device)
    grey = attacks.build(classifier, device)
    for a in grey:
        a.name, a.kind = f"{a.name}-greybox", "grey-box"
    adaptive = attacks.build(composed, device)
    for a in adaptive:
        a.name = f"{a.name}-adaptive"
        if a.kind == "white-box":
            a.kind = "adaptive"
    eps, norm, steps = settings.eps, settings.norm, attacks.steps
    step = eps / 4
    gen_seed = torch.Generator(device=device)
    bpda = PGD(
        nn.Sequential(BPDA(gen), classifier),
        eps=eps,
        alpha=step,
        steps=steps,
        norm=norm,
        generator=gen_seed.manual_seed(settings.seed),
    )
    bpda.name, bpda.kind = "pgd-bpda", "adaptive"
    adaptive.append(bpda)
    if random_g:
        eot = PGD(EOT(composed, 20), eps=eps, alpha=step, steps=steps, norm=norm)
        eot.name, eot.kind = "pgd-eot", "adaptive"
        adaptive.append(eot)
    return {"grey-box": grey, "adaptive": adaptive}


def _merge(runs: dict[str, EvalResult], total: int) -> dict[str, Any]:
    """The adaptive run's results with every setting's attacks and the worst case over all."""
    result = runs["adaptive"].to_json()
    entries = [{**e, "setting": s} for s, run in runs.items() for e in run["attacks"]]
    worst = None
    for run in runs.values():
        flags = run.worst_case()
        worst = flags if worst is None else worst & flags
    assert worst is not None
    result.update(
        attacks=entries,
        worst_case_acc=float(worst.mean()) if total else 0.0,
        worst_case_acc_ci95=list(wilson_interval(int(worst.sum()), total)),
        worst_case_by_setting={s: r["worst_case_acc"] for s, r in runs.items()},
        worst_case_attacks=[e["name"] for e in entries if e["n_broken"] > 0],
    )
    return result


def _purifier_record(
    path: Path, gen: Any, trained_against: dict[str, Any], same: bool, random_g: bool
) -> dict[str, Any]:
    """The results' ``purifier`` entry."""
    return {
        "path": str(path),
        "sha256": sha256_file(path),
        "method": gen.checkpoint_metadata.get("method"),
        "eps_r": gen.eps_r,
        "generator": gen.config(),
        "trained_against": trained_against,
        "same_classifier": same,
        "random": random_g,
        "eot": "run (the purifier is random)"
        if random_g
        else "not run: the purifier is deterministic (two passes agree exactly)",
    }

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

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from advedge.attacks import BPDA, EOT, PGD, Attack
from advedge.data import Dataset, to_tensor
from advedge.models.purified import Purified
from advedge.purifier.checkpoint import check_purifier_fits, load_purifier, resolve_purifier
from advedge.utils import sha256_file

logger = logging.getLogger(__name__)

__all__ = ["evaluate_purified", "is_deterministic"]


@torch.no_grad()
def is_deterministic(module: nn.Module, x: Tensor) -> bool:
    """Whether two forward passes of ``module`` (eval mode) on ``x`` agree exactly."""
    module.eval()
    return bool(torch.equal(module(x), module(x)))


def evaluate_purified(
    classifier: nn.Module,
    purifier: str | os.PathLike[str],
    dataset: Dataset,
    build: Callable[[nn.Module], list[Attack]],
    *,
    eps: float,
    norm: str,
    steps: int = 20,
    n: int | None,
    batch_size: int,
    device: torch.device,
    model_info: dict[str, Any],
    dataset_info: dict[str, Any],
    progress: Any,
    amp: str,
    seed: int,
    suite: str | None,
    out: str | os.PathLike[str] | None,
    resume: bool,
    flags_n: int,
) -> dict[str, Any]:
    """Grey-box, adaptive, BPDA (and EOT) evaluation of ``classifier`` behind ``purifier``.

    Args:
        classifier: The classifier ``f`` (eval mode, on ``device``).
        purifier: A purifier run directory or ``purifier.safetensors``.
        dataset: The data (its test split is used).
        build: Builds the chosen attacks (or suite) against a given model.
        Other args: as for :func:`advedge.evaluation.evaluate`.

    Returns:
        An ``advedge.eval/1`` result whose ``attacks`` carry a ``setting`` and a ``kind``,
        ``worst_case_acc`` over every setting, ``worst_case_by_setting``, ``clean_acc`` (through
        ``G``), ``clean_acc_no_purifier`` and a ``purifier`` record.
    """
    from advedge.evaluation import evaluate, predict

    path = resolve_purifier(purifier)
    gen = load_purifier(path, device=device)
    meta = getattr(classifier, "checkpoint_metadata", {})
    check_purifier_fits(gen, meta, str(path))
    composed = Purified(gen, classifier).eval()
    pmeta = gen.checkpoint_metadata
    trained_against = pmeta.get("classifier") or {}
    same = trained_against.get("sha256") == model_info.get("sha256")
    if not same:
        logger.warning(
            "the purifier was trained against another classifier (%s); evaluating the transfer",
            trained_against.get("path"),
        )
    test = dataset.test
    total = len(test) if n is None else min(n, len(test))
    x_probe = to_tensor(test.x[: min(total, 16)]).to(device)
    random_g = not is_deterministic(gen, x_probe)

    grey = build(classifier)
    for a in grey:
        a.name, a.kind = f"{a.name}-greybox", "grey-box"
    adaptive = build(composed)
    for a in adaptive:
        a.name = f"{a.name}-adaptive"
        if a.kind == "white-box":
            a.kind = "adaptive"
    step = eps / 4
    gen_seed = torch.Generator(device=device)
    bpda = PGD(
        nn.Sequential(BPDA(gen), classifier),
        eps=eps,
        alpha=step,
        steps=steps,
        norm=norm,
        generator=gen_seed.manual_seed(seed),
    )
    bpda.name, bpda.kind = "pgd-bpda", "adaptive"
    adaptive.append(bpda)
    if random_g:
        eot = PGD(EOT(composed, 20), eps=eps, alpha=step, steps=steps, norm=norm)
        eot.name, eot.kind = "pgd-eot", "adaptive"
        adaptive.append(eot)

    runs: dict[str, dict[str, Any]] = {}
    for setting, attacks in (("grey-box", grey), ("adaptive", adaptive)):
        runs[setting] = evaluate(
            composed,
            test,
            attacks,
            eps=eps,
            norm=norm,
            n=n,
            batch_size=batch_size,
            device=device,
            model_info=model_info,
            dataset_info=dataset_info,
            progress=progress,
            amp=amp,
            cascade=suite is not None,
            suite=suite,
            state_path=None if out is None else Path(f"{out}.{setting}.state.json"),
            resume=resume,
            flags_n=flags_n if setting == "adaptive" else 0,
            seed=seed,
        )
    result = dict(runs["adaptive"])
    entries = []
    worst = None
    for setting, run in runs.items():
        for entry in run["attacks"]:
            entries.append({**entry, "setting": setting})
        per = run.pop("_per_example")
        flags = np.asarray(per["clean"], dtype=bool).copy()
        for name, f in per.items():
            if name != "clean":
                flags &= np.asarray(f, dtype=bool)
        worst = flags if worst is None else worst & flags
    result.pop("_per_example", None)
    x_all = to_tensor(test.x[:total]).to(device)
    y_all = torch.as_tensor(test.y[:total]).to(device)
    with torch.no_grad():
        clean_no_g = float((predict(classifier, x_all, batch_size) == y_all).float().mean())
    assert worst is not None
    result.update(
        attacks=entries,
        worst_case_acc=float(worst.mean()) if total else 0.0,
        worst_case_by_setting={s: r["worst_case_acc"] for s, r in runs.items()},
        worst_case_attacks=[e["name"] for e in entries if e["n_broken"] > 0],
        clean_acc_no_purifier=clean_no_g,
        seconds=round(sum(r["seconds"] for r in runs.values()), 3),
        purifier={
            "path": str(path),
            "sha256": sha256_file(path),
            "method": pmeta.get("method"),
            "eps_r": gen.eps_r,
            "generator": gen.config(),
            "trained_against": trained_against,
            "same_classifier": same,
            "random": random_g,
            "eot": "run (the purifier is random)"
            if random_g
            else "not run: the purifier is deterministic (two passes agree exactly)",
        },
        protocol="purifier: grey-box, adaptive white-box, BPDA" + (", EOT" if random_g else ""),
    )
    return result

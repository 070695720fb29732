"""Crafting the transfer set of ``advedge bench --robust`` on the FP32 PyTorch parent.

The set holds the attacks of ``advedge eval --suite standard``, run on the parent exactly as
eval runs them, with every attack's examples kept (:class:`Recipe`):

1. **The standard suite, as eval runs it**: APGD-CE (``n_iter`` iterations), APGD-T (targeted
   DLR over the top 9 other classes, ``n_iter`` iterations each), then Square (``n_queries``
   queries), as a cascade (each attack only on the examples every earlier one left robust), in
   batches of ``EVAL_BATCH`` with the same seeds, on the first ``n`` test images in their
   official order: the very calls ``advedge eval --suite standard --n n --seed s`` makes.
   Array ``adv_<attack>`` holds, per image, the last example crafted for it up to and including
   that attack (AutoAttack's ``x_adv``, keeping the examples that failed too): the attack's own
   example where it ran, an earlier attack's elsewhere, the clean image where none ran (the
   parent gets it wrong clean).
2. **CW-20** (PGD on the Carlini-Wagner margin loss, step eps/4, eval's ``quick`` setting) on
   every image the parent classifies correctly: margin attacks are what break distilled
   students, and every image gets an example of it to transfer.

On the parent itself the per-example worst case over these arrays is eval's worst case on the
same images; the set also records that worst case as it was scored when crafted
(``source_survived``), and bench counts it for the parent, so bench's headline for the FP32
parent is never above ``eval --suite standard``'s (its own Square on the artifact can only
lower it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["EVAL_BATCH", "RECIPE_VERSION", "Recipe", "craft_examples"]

#: The batch size of ``advedge eval`` (its default), so that the cascade makes the same calls.
EVAL_BATCH = 256
RECIPE_VERSION = 2


@dataclass(frozen=True)
class Recipe:
    """The attacks of a transfer set and their budgets (the whole threat model but the images).

    Attributes:
        eps: The L-inf budget.
        seed: The attacks' seed (eval's ``--seed``).
        n_iter: APGD-CE's iterations, and APGD-T's per target class (eval's default 100).
        n_queries: Square's query budget (eval's default 5000).
        cw_steps: CW's steps (step size eps / 4).
    """

    eps: float
    seed: int = 0
    n_iter: int = 100
    n_queries: int = 5000
    cw_steps: int = 20

    def key(self) -> dict[str, Any]:
        """What names a cached set: the recipe's version and every field."""
        return {"recipe": RECIPE_VERSION, **asdict(self)}

    def attacks(self, num_classes: int) -> list[dict[str, str]]:
        """The attacks in the order they run, each with its budget in words."""
        out = [{"name": "apgd-ce", "budget": f"{self.n_iter} iterations"}]
        if num_classes >= 4:
            k = min(9, num_classes - 1)
            out.append(
                {"name": "apgd-t", "budget": f"{k} target classes x {self.n_iter} iterations"}
            )
        out.append({"name": "square", "budget": f"{self.n_queries} queries"})
        out.append({"name": "cw", "budget": f"{self.cw_steps} steps of eps/4"})
        return out


def _recorder(n: int, x: np.ndarray, say: Callable[[str], None]) -> Any:
    """An :class:`~advedge.evaluation.core.EvalProgress` that keeps every adversarial batch."""
    from advedge.evaluation.core import EvalProgress

    class Keep(EvalProgress):
        def __init__(self) -> None:
            self.current = x.copy()  # per image, the last example crafted for it so far
            self.cumulative: dict[str, np.ndarray] = {}

        def on_attack_start(self, name: str, n_todo: int) -> None:
            say(f"crafting the transfer set: {name} on the FP32 PyTorch model ({n_todo} images)")

        def on_examples(self, name: str, idx: np.ndarray, x_adv: Any) -> None:
            self.current[idx] = x_adv.detach().cpu().numpy().astype(np.float32)

        def on_attack_end(self, name: str, result: dict[str, Any]) -> None:
            self.cumulative[name] = self.current.copy()
            say(
                f"  {name}: {100 * result['robust_acc']:.1f}% robust on the FP32 model "
                f"({result['n_attacked']} attacked, {n} images)"
            )

    return Keep()


def _device_of(model: Any) -> Any:
    """The device of a model's parameters (the CPU for a model without any)."""
    import torch

    return next((p.device for p in model.parameters()), torch.device("cpu"))


def craft_examples(
    model: Any,
    test: Any,
    recipe: Recipe,
    say: Callable[[str], None],
) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, Any]]:
    """Run :class:`Recipe`'s attacks on ``model`` (the FP32 parent, on its own device: a GPU
    where bench runs on one).

    Args:
        model: The FP32 PyTorch classifier (or purifier + classifier), in eval mode.
        test: The images, an :class:`~advedge.data.ImageArrays` (uint8, as eval reads them).
        recipe: The attacks and budgets.
        say: Where progress goes.

    Returns:
        ``(advs, source_survived, summary)``: per attack the ``[n, C, H, W]`` float32 examples
        (see the module docstring), ``[n]`` bool "correct clean and unbroken by every attack as
        scored on the parent when crafted", and the eval summary of the cascade.
    """
    import torch

    from advedge.attacks import CW
    from advedge.data import to_tensor
    from advedge.evaluation.core import EvalSettings
    from advedge.evaluation.suites import build_suite

    x = to_tensor(test.x).numpy()
    n = len(test)
    keep = _recorder(n, x, say)
    suite = build_suite(
        "standard",
        model,
        eps=recipe.eps,
        n_queries=recipe.n_queries,
        n_iter=recipe.n_iter,
        seed=recipe.seed,
    )
    device = _device_of(model)
    settings = EvalSettings(
        eps=recipe.eps,
        device=device,
        batch_size=EVAL_BATCH,
        cascade=True,
        suite="standard",
        flags_n=0,
        seed=recipe.seed,
        progress=keep,
    )
    result = settings.run(model, test, suite)
    advs = dict(keep.cumulative)
    survived = result.worst_case()
    # CW on every clean-correct image: its own examples for all of them
    keep.current = x.copy()
    cw = CW(
        model,
        eps=recipe.eps,
        alpha=recipe.eps / 4,
        steps=recipe.cw_steps,
        generator=torch.Generator(device=device).manual_seed(recipe.seed),
    )
    cw_result = EvalSettings(
        eps=recipe.eps,
        device=device,
        batch_size=EVAL_BATCH,
        flags_n=0,
        seed=recipe.seed,
        progress=keep,
    ).run(model, test, [cw])
    advs["cw"] = keep.cumulative[cw.name]
    survived &= cw_result.worst_case()
    return advs, survived, result.summary

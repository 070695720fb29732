"""Each training method's published settings: the defaults ``advedge train`` and ``distill`` use.

One :class:`Official` per method name, taken from the authors' official code (file named in
:attr:`Official.source`) for CIFAR-10. A method without official code (``natural``, ``kd``,
``dd``) or the thesis method (``add``) says so and states where its values come from. Every
value here is the default of the matching :class:`~advedge.training.config.TrainConfig` field
when that field is left unset, so ``advedge distill --method rslad`` *is* RSLAD's recipe; a
flag overrides any of them. :attr:`Official.deviations` lists what advedge does differently by
default and why; the README's method table is generated from this module and checked against
it by the tests.

The KL reduction is the one difference that changes the method rather than its schedule, so it
is spelled out: with ``KL_i = sum_k p_ik (log p_ik - log q_ik)`` for example ``i`` of ``N`` with
``K`` classes,

* ``batchmean``: ``(1/N) sum_i KL_i`` (``nn.KLDivLoss(reduction="batchmean")``, TRADES, IAD);
* ``mean``: ``(1/(N K)) sum_i KL_i`` (``nn.KLDivLoss()``'s default: ARD; AdaAD on CIFAR-10);
* ``rslad``: ``(1/(10 N)) sum_i KL_i``: RSLAD's code averages over all ``N K`` elements on
  CIFAR-10 and multiplies that by 10 on CIFAR-100, which is this on both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from advedge.errors import UsageError, did_you_mean

__all__ = [
    "ATTACK_BN",
    "KL_REDUCTIONS",
    "OFFICIAL",
    "Official",
    "describe",
    "kl_scale",
    "markdown_table",
    "official",
]

ATTACK_BN = ("eval", "train")
"""Batch-norm mode of the model under the inner attack: running statistics, or batch ones."""

KL_REDUCTIONS = ("official", "batchmean")
"""``--kl-reduction``: the method's own reduction, or a plain mean over the batch for all."""


@dataclass(frozen=True)
class Official:
    """A method's published recipe (CIFAR-10, L-inf eps 8/255).

    Attributes:
        paper: Short citation.
        source: ``owner/repo path`` of the official code, or why there is none.
        weight_decay, lr, batch_size, epochs: SGD (momentum 0.9) settings of the full run.
        schedule, milestones: ``multistep`` with the fractions of training at which the
            learning rate is multiplied by 0.1, or ``cosine``.
        steps: Inner-attack iterations (0: no attack).
        step: Inner-attack step size as a multiple of eps (2/255 at 8/255 is 0.25).
        random_start: ``uniform`` (in the eps-ball), ``normal`` (``0.001 N(0, I)``) or None.
        attack_bn: ``eval`` or ``train``: the student's batch-norm mode inside the attack.
        kl: The KL reduction (see the module docstring), or None for a method without a KL.
        tau, mix: Distillation temperature and loss mix (None: not used).
        deviations: What advedge does differently by default, and why.
    """

    paper: str
    source: str
    weight_decay: float
    lr: float
    batch_size: int
    epochs: int
    schedule: str
    milestones: tuple[float, ...]
    steps: int
    step: float
    random_start: str | None
    attack_bn: str
    kl: str | None
    tau: float | None = None
    mix: float | None = None
    deviations: tuple[str, ...] = field(default_factory=tuple)


_PIECEWISE = (0.5, 0.75)

OFFICIAL: dict[str, Official] = {
    "natural": Official(
        paper="standard training",
        source="none (advedge's own recipe)",
        weight_decay=5e-4,
        lr=0.1,
        batch_size=128,
        epochs=200,
        schedule="cosine",
        milestones=_PIECEWISE,
        steps=0,
        step=0.0,
        random_start=None,
        attack_bn="eval",
        kl=None,
    ),
    "pgd-at": Official(
        paper="Madry et al., ICLR 2018",
        source="MadryLab/cifar10_challenge config.json, train.py",
        weight_decay=2e-4,
        lr=0.1,
        batch_size=128,
        epochs=205,  # 80,000 iterations of 128 images
        schedule="multistep",
        milestones=_PIECEWISE,  # 40k and 60k of 80k iterations
        steps=10,  # config.json; the paper says 7
        step=0.25,
        random_start="uniform",
        attack_bn="train",
        kl=None,
        deviations=(
            "weight decay on every parameter; the official code decays conv and linear "
            "weights only",
        ),
    ),
    "trades": Official(
        paper="Zhang et al., ICML 2019",
        source="yaodongyu/TRADES train_trades_cifar10.py, trades.py",
        weight_decay=2e-4,
        lr=0.1,
        batch_size=128,
        epochs=76,
        schedule="multistep",
        milestones=(74 / 76,),  # lr x0.1 from epoch 75 (1-based) of 76
        steps=10,
        step=0.007 / 0.031,
        random_start="normal",
        attack_bn="eval",
        kl="batchmean",
        deviations=(
            "two train-mode forward passes per step where the official code makes three "
            "(S(x) twice): the loss and its gradient are equal, only BN running statistics "
            "differ",
        ),
    ),
    "fgsm-rs": Official(
        paper="Wong et al., ICLR 2020",
        source="locuslab/fast_adversarial CIFAR10/train_fgsm.py",
        weight_decay=5e-4,
        lr=0.2,
        batch_size=128,
        epochs=15,
        schedule="cosine",
        milestones=_PIECEWISE,
        steps=1,
        step=1.25,
        random_start="uniform",
        attack_bn="train",
        kl=None,
        deviations=(
            "cosine learning rate where the official code uses a cyclic (triangular) one, "
            "which advedge's scheduler does not offer",
        ),
    ),
    "kd": Official(
        paper="Hinton et al., 2015",
        source="none (no official code; tau 4, mix 0.9 as in common re-implementations)",
        weight_decay=5e-4,
        lr=0.1,
        batch_size=128,
        epochs=200,
        schedule="cosine",
        milestones=_PIECEWISE,
        steps=0,
        step=0.0,
        random_start=None,
        attack_bn="eval",
        kl="batchmean",
        tau=4.0,
        mix=0.9,
    ),
    "dd": Official(
        paper="Papernot et al., S&P 2016",
        source="none (no official code; T = 100 as in the paper's results and "
        "carlini/nn_robust_attacks train_models.py)",
        weight_decay=5e-4,
        lr=0.1,
        batch_size=128,
        epochs=200,
        schedule="cosine",
        milestones=_PIECEWISE,
        steps=0,
        step=0.0,
        random_start=None,
        attack_bn="eval",
        kl="batchmean",
        tau=100.0,
    ),
    "ard": Official(
        paper="Goldblum et al., AAAI 2020",
        source="goldblum/AdversariallyRobustDistillation main.py",
        weight_decay=2e-4,
        lr=0.1,
        batch_size=128,
        epochs=200,
        schedule="multistep",
        milestones=_PIECEWISE,
        steps=10,
        step=0.25,
        random_start="uniform",
        attack_bn="train",
        kl="mean",
        tau=30.0,
        mix=1.0,
        deviations=(
            "with mix 1 the unused S(x) forward pass is skipped (BN running statistics see one "
            "clean batch fewer); the random start is clipped to [0, 1] before the first step",
        ),
    ),
    "iad": Official(
        paper="Zhu et al., ICLR 2022",
        source="ZFancy/IAD IAD-I.py",
        weight_decay=2e-4,
        lr=0.1,
        batch_size=128,
        epochs=200,
        schedule="multistep",
        milestones=_PIECEWISE,
        steps=10,
        step=0.25,
        random_start="uniform",
        attack_bn="train",
        kl="batchmean",
        tau=1.0,
        mix=1.0,
        deviations=(
            "fewer train-mode forward passes than IAD-I (BN running statistics only); the "
            "random start is clipped to [0, 1] before the first step",
        ),
    ),
    "rslad": Official(
        paper="Zi et al., ICCV 2021",
        source="zibojia/RSLAD rslad_loss.py, resnet18_rslad_cifar10.py",
        weight_decay=2e-4,
        lr=0.1,
        batch_size=128,
        epochs=300,
        schedule="multistep",
        milestones=(215 / 300, 260 / 300, 285 / 300),
        steps=10,
        step=0.25,
        random_start="normal",
        attack_bn="eval",
        kl="rslad",
        deviations=(
            "the KL is exact; the official kl_loss adds 1e-5 inside the log of the teacher's "
            "probabilities (a constant: the gradient is equal, the value differs by < 1e-5 on "
            "CIFAR-10 and < 1e-4 on CIFAR-100)",
        ),
    ),
    "adaad": Official(
        paper="Huang et al., CVPR 2023",
        source="boyellow/AdaAD main.py, AT_helper.py (README command)",
        weight_decay=5e-4,
        lr=0.1,
        batch_size=128,
        epochs=200,
        schedule="multistep",
        milestones=_PIECEWISE,
        steps=10,
        step=0.25,
        random_start="normal",
        attack_bn="eval",
        kl="mean (CIFAR-10 branch); batchmean for 100 classes (CIFAR-100 branch)",
        mix=1.0,
        deviations=(
            "with mix 1 the unused S(x) and T(x) forward passes are skipped (BN running "
            "statistics see one clean batch fewer)",
        ),
    ),
    "add": Official(
        paper="this thesis",
        source="none (advedge is its reference; optimiser settings as RSLAD's)",
        weight_decay=2e-4,
        lr=0.1,
        batch_size=128,
        epochs=300,
        schedule="multistep",
        milestones=(215 / 300, 260 / 300, 285 / 300),
        steps=10,
        step=0.25,
        random_start="normal",
        attack_bn="eval",
        kl="rslad",
        tau=1.0,
        mix=5 / 6,
    ),
}


def official(method: str) -> Official:
    """The published recipe of ``method``.

    Raises:
        UsageError: for a method with no entry (with a close-match suggestion).
    """
    try:
        return OFFICIAL[method]
    except KeyError:
        raise UsageError(
            f"unknown method {method!r}", did_you_mean(method, list(OFFICIAL))
        ) from None


def kl_scale(method: str, num_classes: int, reduction: str = "official") -> float:
    """The factor that turns a batch-mean KL into ``method``'s own reduction.

    ``batchmean`` -> 1; ``mean`` -> 1/K; ``rslad`` -> 1/10; AdaAD -> 1/K, or 1 for K = 100
    (its code's CIFAR-100 branch). ``reduction="batchmean"`` returns 1 for every method.

    Raises:
        UsageError: for an unknown ``reduction``.
    """
    if reduction not in KL_REDUCTIONS:
        raise UsageError(f"unknown KL reduction {reduction!r}", f"use {' or '.join(KL_REDUCTIONS)}")
    if reduction == "batchmean":
        return 1.0
    if num_classes < 1:
        raise UsageError(f"num_classes must be >= 1, got {num_classes}")
    kind = official(method).kl
    if method == "adaad":
        return 1.0 if num_classes == 100 else 1.0 / num_classes
    if kind == "mean":
        return 1.0 / num_classes
    if kind == "rslad":
        return 0.1
    return 1.0


_KL_SHOWN = {"batchmean": "sum/N", "mean": "sum/(NK)", "rslad": "sum/(10N)"}


def describe(method: str) -> dict[str, str]:
    """The recipe of ``method`` as short strings, one per README table column."""
    r = official(method)
    if r.steps:
        start = {"uniform": "uniform start", "normal": "0.001 N(0, I) start"}.get(
            r.random_start or "", "no start"
        )
        attack = f"{r.steps} x {r.step:.4g} eps, {start}, BN {r.attack_bn}"
    else:
        attack = "none"
    schedule = "cosine"
    if r.schedule == "multistep":
        schedule = "x0.1 after epochs " + ", ".join(f"{m * r.epochs:g}" for m in r.milestones)
    loss = []
    if r.tau is not None:
        loss.append(f"tau {r.tau:g}")
    if r.mix is not None:
        loss.append(f"mix {r.mix:.4g}")
    if r.kl is not None:
        shown = _KL_SHOWN.get(r.kl, "sum/(NK), sum/N at K = 100")
        loss.append(f"KL {shown}")
    return {
        "method": method,
        "paper": r.paper,
        "official code": r.source,
        "optimiser": f"SGD 0.9, lr {r.lr:g}, wd {r.weight_decay:g}, batch {r.batch_size}",
        "epochs, schedule": f"{r.epochs}, {schedule}",
        "inner attack": attack,
        "loss": ", ".join(loss) or "CE",
        "deviations": "; ".join(r.deviations) or "none",
    }


def markdown_table() -> str:
    """The README's method table: one row per :data:`OFFICIAL` entry."""
    rows = [describe(m) for m in OFFICIAL]
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row[k] for k in head) + " |" for row in rows]
    return "\n".join(lines)

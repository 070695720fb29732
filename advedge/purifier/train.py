"""Training the purifier: IPCM and its baselines APE-GAN and HGD in one trainer.

Each batch is made online against the frozen classifier ``f`` (eval mode, no parameter
gradients):

* ``ipcm`` and ``hgd``: a third of the batch gets FGSM, a third PGD-``steps``, each with an eps
  drawn uniformly in ``(0, eps]`` for that batch, and the last third stays clean (so that ``G``
  learns to leave clean inputs almost untouched);
* ``ape-gan`` (Shen et al. 2017): FGSM at ``eps`` on the whole batch, as in the paper.

Then, with ``x_in`` the batch fed to ``G``, ``x`` its clean originals, ``delta = x_in - x``
(zero for clean rows) and ``(x_hat, r) = G(x_in)``:

* ``ipcm``: ``L_G = w_inv * ||r + delta||^2 + w_pix * |x_hat - x| + w_ce * CE(f(x_hat), y)
  + w_kl * KL(f(x) || f(x_hat)) + w_adv * L_adv(D(x_hat))`` (with ``--guidance features``, the
  CE and KL terms become ``w_feat * |phi(x_hat) - phi(x)|`` on penultimate features, as HGD);
  ``D`` is trained to tell clean ``x`` from ``x_hat`` with the LSGAN or non-saturating loss.
* ``ape-gan``: ``L_G = 0.7 * MSE(x_hat, x) + 0.3 * BCE(D(x_hat), 1)`` and the standard ``D``.
* ``hgd`` (Liao et al. 2018): ``L_G = |f(x_hat) - f(x)|_1`` on logits (the logit-guided
  denoiser; ``features`` guidance gives the feature-guided one), no discriminator.

The run directory follows the engine's conventions: ``config.yaml``, ``metrics.csv`` (G and D
losses, clean accuracy through ``G``, grey-box PGD accuracy through ``G``), ``state.pt`` (``G``,
``D``, both optimisers; resumable exactly), and ``purifier.safetensors`` (the generator only).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from advedge import __version__
from advedge.attacks import FGSM, PGD
from advedge.checkpoint import cpu_state_dict
from advedge.config import SEED_MAX, check_fields, config_to_dict
from advedge.data import BatchLoader, Dataset
from advedge.errors import AdvedgeError, UsageError, did_you_mean
from advedge.purifier.checkpoint import PURIFIER_FILE, save_purifier
from advedge.purifier.losses import (
    GAN_KINDS,
    ape_gan_generator_loss,
    d_loss,
    feature_guidance_loss,
    g_adv_loss,
    guidance_loss,
    inverse_perturbation_loss,
    pixel_loss,
)
from advedge.purifier.networks import Discriminator, Generator
from advedge.registry import Registry
from advedge.training.config import check_ranges
from advedge.training.engine import TrainCallbacks
from advedge.training.inputs import (
    held_out_batch,
    load_frozen_model,
    load_training_data,
    training_split,
)
from advedge.training.rundir import (
    RunDir,
    config_fingerprint,
    epoch_seed,
    resumed_progress,
)
from advedge.utils import resolve_device, seed_everything

logger = logging.getLogger(__name__)

__all__ = [
    "PURIFIER_METHODS",
    "PurifierConfig",
    "PurifierMethod",
    "PurifierResult",
    "PurifierTrainer",
    "train_purifier",
]

PURIFIER_COLUMNS = (
    "epoch",
    "g_loss",
    "d_loss",
    "inv_loss",
    "test_clean_acc",
    "test_clean_acc_no_g",
    "test_greybox_pgd_acc",
    "test_pgd_acc_no_g",
    "seconds",
)


@dataclass(frozen=True)
class PurifierConfig:
    """Resolved options of one purifier run (written to ``RUN_DIR/config.yaml``).

    Attributes:
        classifier: The frozen classifier's run directory or ``model.safetensors``.
        data: Dataset directory or name.
        method: ``ipcm``, ``ape-gan`` or ``hgd``.
        epochs: Number of epochs.
        out: Run directory.
        eps: The attacks' largest budget (pixel units); training eps are drawn in (0, eps].
        eps_r: Bound of the inverse perturbation; None means ``1.25 * eps``.
        steps: PGD iterations of the training attacks (step ``2.5 * eps / steps``).
        width, depth: Generator size (see :class:`Generator`).
        w_inv, w_pix, w_ce, w_kl, w_adv, w_feat: Loss weights (IPCM).
        gan: ``lsgan`` or ``nsgan`` (the adversarial loss of IPCM).
        guidance: ``logits`` (CE + KL on the classifier's outputs) or ``features`` (L1 on its
            penultimate features, as HGD).
        batch_size, lr, lr_d: Batch size and the Adam learning rates of G and D.
        subset, seed, device: As for training.
        eval_n: Held-out test images scored every epoch.
    """

    RESUMABLE: ClassVar[frozenset[str]] = frozenset({"epochs", "device", "out", "eval_n"})
    """Options that may differ between a run and its resumption."""

    classifier: str
    data: str
    method: str = "ipcm"
    epochs: int = 10
    out: str = "runs/purifier"
    eps: float = 8 / 255
    eps_r: float | None = None
    steps: int = 10
    width: int = 16
    depth: int = 2
    w_inv: float = 1.0
    w_pix: float = 1.0
    w_ce: float = 1.0
    w_kl: float = 1.0
    w_adv: float = 0.01
    w_feat: float = 1.0
    gan: str = "lsgan"
    guidance: str = "logits"
    batch_size: int = 128
    lr: float = 1e-3
    lr_d: float = 2e-4
    subset: int | None = None
    seed: int = 0
    device: str = "auto"
    eval_n: int = 256

    def __post_init__(self) -> None:
        check_fields(self)  # types first: a bool is not an int, every float is finite
        PURIFIER_METHODS.get(self.method)  # an unknown method: one line with a suggestion
        if self.gan not in GAN_KINDS:
            raise UsageError(f"unknown GAN loss {self.gan!r}", did_you_mean(self.gan, GAN_KINDS))
        if self.guidance not in ("logits", "features"):
            raise UsageError(f"guidance must be logits or features, got {self.guidance!r}")
        if self.eps_r is not None and not (math.isfinite(self.eps_r) and 0 < self.eps_r <= 1):
            raise UsageError(f"eps_r must lie in (0, 1], got {self.eps_r}")
        # Width and depth are bounded as the Generator accepts them.
        bounded = [
            ("epochs", self.epochs, 1, 100_000),
            ("steps", self.steps, 1, 10_000),
            ("width", self.width, 4, 256),
            ("depth", self.depth, 1, 4),
            ("batch_size", self.batch_size, 3, 65_536),
            ("subset", self.subset, 1, 10**9),
            ("seed", self.seed, 0, SEED_MAX),
            ("eval_n", self.eval_n, 1, 10**9),
        ]
        checks = [
            (0 < self.eps <= 1, f"eps must lie in (0, 1], got {self.eps}"),
            (self.lr > 0 and self.lr_d > 0, "learning rates must be > 0"),
        ]
        for name in ("w_inv", "w_pix", "w_ce", "w_kl", "w_adv", "w_feat"):
            value = getattr(self, name)
            checks.append(
                (math.isfinite(value) and value >= 0, f"{name} must be >= 0, got {value}")
            )
        check_ranges(bounded, checks)

    @property
    def resolved_eps_r(self) -> float:
        """The generator's bound: ``eps_r``, or ``1.25 * eps`` (a little above the attack's)."""
        return self.eps_r if self.eps_r is not None else min(1.0, 1.25 * self.eps)

    def fingerprint(self) -> str:
        """Hash of the options that must not change across a resume (all but RESUMABLE)."""
        return config_fingerprint(self, self.RESUMABLE)


# ------------------------------------------------------------------------------- methods
class PurifierMethod:
    """A purifier training method: the generator's input batch and loss, and its discriminator.

    Args:
        config: The run's options (eps, steps, loss weights, GAN loss, guidance).
        classifier: The frozen classifier ``f``.
    """

    discriminator: ClassVar[bool] = True
    """Whether a discriminator ``D`` trains alongside the generator."""

    def __init__(self, config: PurifierConfig, classifier: nn.Module) -> None:
        self.config = config
        self.classifier = classifier

    @property
    def gan_kind(self) -> str:
        """The discriminator's loss (``lsgan`` or ``nsgan``)."""
        return self.config.gan

    def attacked_batch(self, x: Tensor, y: Tensor) -> Tensor:
        """The generator's input: FGSM, PGD and clean thirds, each attack at an eps drawn
        uniformly in ``(0, eps]`` for the batch (one or two images stay clean)."""
        cfg, f = self.config, self.classifier
        n = x.shape[0]
        a, b = n // 3, 2 * n // 3
        eps_fgsm, eps_pgd = (float(e) * cfg.eps for e in 1 - torch.rand(2))  # in (0, eps]
        parts = [x[b:]]
        if b > a:  # a batch of one or two images stays clean
            pgd = PGD(f, eps=eps_pgd, alpha=2.5 * eps_pgd / cfg.steps, steps=cfg.steps)
            parts.insert(0, pgd(x[a:b], y[a:b]))
        if a > 0:
            parts.insert(0, FGSM(f, eps=eps_fgsm)(x[:a], y[:a]))
        return torch.cat(parts)

    def generator_loss(
        self, x_hat: Tensor, x: Tensor, y: Tensor, inv: Tensor, disc: Discriminator | None
    ) -> Tensor:
        """``L_G`` of the purified batch ``x_hat`` (``inv`` is its inverse-perturbation loss)."""
        raise NotImplementedError

    def guidance(self, x_hat: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """The classifier's guidance: ``w_feat * |phi(x_hat) - phi(x)|`` on penultimate
        features, or on logits :meth:`logit_guidance`."""
        cfg, f = self.config, self.classifier
        if cfg.guidance == "features":
            with torch.no_grad():
                target = f.forward_features(x)
            return cfg.w_feat * feature_guidance_loss(f.forward_features(x_hat), target)
        with torch.no_grad():
            clean_logits = f(x)
        return self.logit_guidance(f(x_hat), clean_logits, y)

    def logit_guidance(self, logits: Tensor, clean_logits: Tensor, y: Tensor) -> Tensor:
        """``w_ce * CE(f(x_hat), y) + w_kl * KL(f(x) || f(x_hat))`` (:func:`guidance_loss`)."""
        cfg = self.config
        return guidance_loss(logits, clean_logits, y, ce_weight=cfg.w_ce, kl_weight=cfg.w_kl)


PURIFIER_METHODS: Registry[type[PurifierMethod]] = Registry("purifier method")
"""The purifier training methods by name (``advedge purifier train --method``)."""


@PURIFIER_METHODS.register("ipcm")
class IPCM(PurifierMethod):
    """IPCM, the thesis method: inverse-perturbation, pixel, guidance and adversarial losses.

    ``L_G = w_inv * ||r + delta||^2 + w_pix * |x_hat - x| + guidance + w_adv * L_adv(D(x_hat))``.
    """

    def generator_loss(
        self, x_hat: Tensor, x: Tensor, y: Tensor, inv: Tensor, disc: Discriminator | None
    ) -> Tensor:
        cfg = self.config
        assert disc is not None
        return (
            cfg.w_inv * inv
            + cfg.w_pix * pixel_loss(x_hat, x, "l1")
            + self.guidance(x_hat, x, y)
            + cfg.w_adv * g_adv_loss(disc(x_hat), cfg.gan)
        )


@PURIFIER_METHODS.register("ape-gan")
class APEGAN(PurifierMethod):
    """APE-GAN (Shen et al. 2017): FGSM inputs, MSE plus a GAN loss.

    ``L_G = 0.7 * MSE(x_hat, x) + 0.3 * BCE(D(x_hat), 1)``. The whole batch gets FGSM at ``eps`` and the discriminator the non-saturating loss, as in
    the paper (:func:`ape_gan_generator_loss`).
    """

    @property
    def gan_kind(self) -> str:
        return "nsgan"

    def attacked_batch(self, x: Tensor, y: Tensor) -> Tensor:
        return FGSM(self.classifier, eps=self.config.eps)(x, y)

    def generator_loss(
        self, x_hat: Tensor, x: Tensor, y: Tensor, inv: Tensor, disc: Discriminator | None
    ) -> Tensor:
        assert disc is not None
        return ape_gan_generator_loss(x_hat, x, disc(x_hat))


@PURIFIER_METHODS.register("hgd")
class HGD(PurifierMethod):
    """HGD (Liao et al. 2018): the classifier-guided denoiser, no discriminator.

    ``L_G = |f(x_hat) - f(x)|_1``. Logit guidance gives the logit-guided denoiser, ``--guidance features`` the feature-guided
    one (:func:`feature_guidance_loss`).
    """

    discriminator = False

    def logit_guidance(self, logits: Tensor, clean_logits: Tensor, y: Tensor) -> Tensor:
        return feature_guidance_loss(logits, clean_logits)

    def generator_loss(
        self, x_hat: Tensor, x: Tensor, y: Tensor, inv: Tensor, disc: Discriminator | None
    ) -> Tensor:
        return self.guidance(x_hat, x, y)


@dataclass
class PurifierResult:
    """Outcome of :func:`train_purifier`."""

    out: Path
    purifier_path: Path
    metrics: list[dict[str, float]]
    epochs_run: int
    resumed_from: int
    generator: Generator | None = None


@dataclass
class _Nets:
    """The generator, the discriminator (None for HGD) and their Adam optimisers."""

    gen: Generator
    disc: Discriminator | None
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer | None


class PurifierTrainer:
    """Runs one :class:`PurifierConfig` (the engine behind ``advedge purifier train``)."""

    def __init__(self, config: PurifierConfig, *, dataset: Dataset | None = None) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.dataset = load_training_data(config.data, dataset)
        self.classifier, self.classifier_info = load_frozen_model(
            config.classifier, self.dataset, self.device, role="classifier"
        )
        self.method = PURIFIER_METHODS.get(config.method)(config, self.classifier)
        self.run_dir = RunDir(config, kind="purifier")
        self.out = self.run_dir.out
        self._config_doc: dict[str, Any] = {}

    def _attacked_batch(self, x: Tensor, y: Tensor) -> Tensor:
        return self.method.attacked_batch(x, y)

    def step(
        self,
        gen: Generator,
        disc: Discriminator | None,
        opt_g: torch.optim.Optimizer,
        opt_d: torch.optim.Optimizer | None,
        x: Tensor,
        y: Tensor,
    ) -> dict[str, float]:
        """One discriminator step and one generator step on the batch ``(x, y)``."""
        x_in = self._attacked_batch(x, y)
        delta = x_in - x
        x_hat, r = gen.purify_with_residual(x_in)
        out: dict[str, float] = {}
        if disc is not None and opt_d is not None:
            loss_d = d_loss(disc(x), disc(x_hat.detach()), self.method.gan_kind)
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
            out["d_loss"] = float(loss_d.detach())
        inv = inverse_perturbation_loss(r, delta)
        loss_g = self.method.generator_loss(x_hat, x, y, inv, disc)
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        out["g_loss"] = float(loss_g.detach())
        out["inv_loss"] = float(inv.detach())
        return out

    # ---------------------------------------------------------------------------- run
    def run(
        self, *, resume: bool = False, callbacks: TrainCallbacks | None = None
    ) -> PurifierResult:
        """Train to ``config.epochs`` (resuming when asked) under the output lock of
        ``config.out``; the run folder appears with the first checkpoint, and a new run that
        fails before it leaves nothing behind."""
        with self.run_dir.locked():
            return self._run(resume, callbacks or TrainCallbacks())

    def _run(self, resume: bool, callbacks: TrainCallbacks) -> PurifierResult:
        cfg = self.config
        state = self._resume_state(resume)
        seed_everything(cfg.seed)
        nets = self._networks(state)
        start, metrics = resumed_progress(state)
        train = training_split(self.dataset, cfg.subset, cfg.seed)
        loader = BatchLoader(
            train,
            cfg.batch_size,
            shuffle=True,
            augment=True,
            seed=cfg.seed,
            drop_last=len(train) >= 2 * cfg.batch_size,
            device=self.device,
        )
        hx, hy = held_out_batch(self.dataset, cfg.eval_n, self.device)
        self._config_doc = self._resolved_config(
            nets.gen, len(train)
        )  # written with the checkpoint
        callbacks.on_train_start(
            start_epoch=start, epochs=cfg.epochs, batches_per_epoch=len(loader)
        )
        for epoch in range(start, cfg.epochs):
            t0 = time.perf_counter()
            torch.manual_seed(epoch_seed(cfg.seed, epoch, 0))
            loader.set_epoch(epoch)
            means = self._train_batches(nets, loader, epoch, callbacks)
            callbacks.on_eval_start(epoch=epoch)
            scores = self.held_out_scores(nets.gen, hx, hy)
            row = {
                "epoch": epoch + 1,
                **{k: round(means[k], 6) for k in ("g_loss", "d_loss", "inv_loss") if k in means},
                **{k: round(v, 6) for k, v in scores.items()},
                "seconds": round(time.perf_counter() - t0, 3),
            }
            metrics.append(row)
            self._write_checkpoint(nets, epoch + 1, metrics)
            logger.info(
                "epoch %d/%d: G %.4f, clean through G %.3f, grey-box PGD %.3f",
                epoch + 1,
                cfg.epochs,
                row["g_loss"],
                row["test_clean_acc"],
                row["test_greybox_pgd_acc"],
            )
            callbacks.on_epoch_end(row)
        return PurifierResult(
            out=self.out,
            purifier_path=self.out / PURIFIER_FILE,
            metrics=metrics,
            epochs_run=cfg.epochs - start,
            resumed_from=start,
            generator=nets.gen.eval(),
        )

    def _networks(self, state: dict[str, Any] | None) -> _Nets:
        """A new generator and discriminator with their optimisers, restored from ``state``."""
        cfg = self.config
        c = self.dataset.channels
        gen = Generator(c, cfg.width, eps_r=cfg.resolved_eps_r, depth=cfg.depth).to(self.device)
        disc = Discriminator(c).to(self.device) if self.method.discriminator else None
        opt_g = torch.optim.Adam(gen.parameters(), lr=cfg.lr, betas=(0.5, 0.999))
        opt_d = (
            torch.optim.Adam(disc.parameters(), lr=cfg.lr_d, betas=(0.5, 0.999))
            if disc is not None
            else None
        )
        if state is not None:
            gen.load_state_dict(state["generator"])
            opt_g.load_state_dict(state["opt_g"])
            if disc is not None and opt_d is not None:
                disc.load_state_dict(state["discriminator"])
                opt_d.load_state_dict(state["opt_d"])
        return _Nets(gen, disc, opt_g, opt_d)

    def _train_batches(
        self, nets: _Nets, loader: BatchLoader, epoch: int, callbacks: TrainCallbacks
    ) -> dict[str, float]:
        """One pass over the loader; returns the epoch's mean losses."""
        nets.gen.train()
        if nets.disc is not None:
            nets.disc.train()
        sums: dict[str, float] = {}
        n = 0
        for i, (x, y) in enumerate(loader):
            losses = self.step(nets.gen, nets.disc, nets.opt_g, nets.opt_d, x, y)
            n += 1
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v
            if i % 10 == 0 or i == len(loader) - 1:
                callbacks.on_batch_end(
                    epoch=epoch, batch=i, loss=sums["g_loss"] / n, acc=sums["inv_loss"] / n
                )
        if not math.isfinite(sums.get("g_loss", 0.0)):
            raise AdvedgeError(
                f"purifier training diverged at epoch {epoch + 1}",
                "lower --lr; the last good checkpoint is kept",
            )
        return {k: v / n for k, v in sums.items()}

    @torch.no_grad()
    def held_out_scores(self, gen: Generator, x: Tensor, y: Tensor) -> dict[str, float]:
        """Clean accuracy with and without G; grey-box PGD-10 accuracy (attack f, purify)."""
        cfg, f = self.config, self.classifier
        gen.eval()
        attack = PGD(
            f,
            eps=cfg.eps,
            alpha=cfg.eps / 4,
            steps=10,
            generator=torch.Generator(device=self.device).manual_seed(0),
        )
        counts = torch.zeros(4)
        for i in range(0, x.shape[0], 256):
            xb, yb = x[i : i + 256], y[i : i + 256]
            xa = attack(xb, yb)
            counts += torch.tensor(
                [
                    float((f(gen(xb)).argmax(1) == yb).sum()),
                    float((f(xb).argmax(1) == yb).sum()),
                    float((f(gen(xa)).argmax(1) == yb).sum()),
                    float((f(xa).argmax(1) == yb).sum()),
                ]
            )
        acc = (counts / x.shape[0]).tolist()
        return dict(zip(PURIFIER_COLUMNS[4:8], acc, strict=True))

    # ------------------------------------------------------------------------ helpers
    def _resume_state(self, resume: bool) -> dict[str, Any] | None:
        if (self.out / PURIFIER_FILE).exists() and not (self.out / "state.pt").exists():
            raise UsageError(f"{self.out} has a purifier but no state.pt", "choose another --out")
        return self.run_dir.resume_state(resume)

    def _metadata(self, gen: Generator, epochs: int) -> dict[str, Any]:
        cfg = self.config
        return {
            "kind": "purifier",
            "method": cfg.method,
            "eps": cfg.eps,
            "eps_r": gen.eps_r,
            "input_shape": list(self.dataset.input_shape),
            "dataset": self.dataset.name,
            "classifier": self.classifier_info,
            "epochs": epochs,
            "losses": {
                k: getattr(cfg, k)
                for k in ("w_inv", "w_pix", "w_ce", "w_kl", "w_adv", "w_feat", "gan", "guidance")
            },
        }

    def _resolved_config(self, gen: Generator, n_train: int) -> dict[str, Any]:
        d = config_to_dict(self.config)
        d["eps_r"] = gen.eps_r
        d["resolved"] = {
            "device": str(self.device),
            "classifier": self.classifier_info,
            "generator": gen.config(),
            "n_train": n_train,
            "advedge_version": __version__,
        }
        return d

    def _write_checkpoint(self, nets: _Nets, epochs: int, metrics: list[dict[str, float]]) -> None:
        state: dict[str, Any] = {
            "kind": "purifier",
            "epoch": epochs,
            "generator": cpu_state_dict(nets.gen),
            "opt_g": nets.opt_g.state_dict(),
            **self.run_dir.state_record(metrics),
        }
        if nets.disc is not None and nets.opt_d is not None:
            state["discriminator"] = cpu_state_dict(nets.disc)
            state["opt_d"] = nets.opt_d.state_dict()
        meta = self._metadata(nets.gen, epochs)
        self.run_dir.write_checkpoint(
            state,
            config_doc=self._config_doc,
            save_artifact=lambda: save_purifier(nets.gen, self.out / PURIFIER_FILE, metadata=meta),
            metrics=metrics,
            columns=PURIFIER_COLUMNS,
        )


def train_purifier(
    config: PurifierConfig,
    *,
    resume: bool = False,
    callbacks: TrainCallbacks | None = None,
    dataset: Dataset | None = None,
) -> PurifierResult:
    """Train a purifier as ``config`` says; see :class:`PurifierTrainer`."""
    return PurifierTrainer(config, dataset=dataset).run(resume=resume, callbacks=callbacks)

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
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from advedge import __version__
from advedge.attacks import FGSM, PGD
from advedge.checkpoint import (
    STATE_FILE,
    load_state,
    save_state,
)
from advedge.config import config_to_dict, write_yaml
from advedge.data import BatchLoader, Dataset, load_dataset, stratified_subset, to_tensor
from advedge.errors import AdvedgeError, UsageError, did_you_mean, os_error
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
from advedge.training.engine import (
    TrainCallbacks,
    _epoch_seed,
    check_run_dir,
    load_frozen_model,
    write_metrics_csv,
)
from advedge.utils import resolve_device, seed_everything

logger = logging.getLogger(__name__)

__all__ = ["PURIFIER_METHODS", "PurifierConfig", "PurifierResult", "train_purifier"]

PURIFIER_METHODS = ("ipcm", "ape-gan", "hgd")
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
_RESUMABLE_CHANGES = frozenset({"epochs", "device", "out", "eval_n"})


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
        from advedge.config import SEED_MAX, check_fields

        check_fields(self)  # types first: a bool is not an int, every float is finite
        if self.method not in PURIFIER_METHODS:
            raise UsageError(
                f"unknown purifier method {self.method!r}",
                did_you_mean(self.method, PURIFIER_METHODS),
            )
        if self.gan not in GAN_KINDS:
            raise UsageError(f"unknown GAN loss {self.gan!r}", did_you_mean(self.gan, GAN_KINDS))
        if self.guidance not in ("logits", "features"):
            raise UsageError(f"guidance must be logits or features, got {self.guidance!r}")
        if self.eps_r is not None and not (math.isfinite(self.eps_r) and 0 < self.eps_r <= 1):
            raise UsageError(f"eps_r must lie in (0, 1], got {self.eps_r}")
        # Integers are bounded so that an untrusted config can never drive a huge allocation;
        # width and depth as the Generator accepts them.
        bounded = (
            ("epochs", self.epochs, 1, 100_000),
            ("steps", self.steps, 1, 10_000),
            ("width", self.width, 4, 256),
            ("depth", self.depth, 1, 4),
            ("batch_size", self.batch_size, 3, 65_536),
            ("subset", self.subset, 1, 10**9),
            ("seed", self.seed, 0, SEED_MAX),
            ("eval_n", self.eval_n, 1, 10**9),
        )
        checks = [
            (v is None or lo <= v <= hi, f"{name} must lie in [{lo}, {hi}], got {v}")
            for name, v, lo, hi in bounded
        ]
        checks += [
            (0 < self.eps <= 1, f"eps must lie in (0, 1], got {self.eps}"),
            (self.lr > 0 and self.lr_d > 0, "learning rates must be > 0"),
        ]
        for name in ("w_inv", "w_pix", "w_ce", "w_kl", "w_adv", "w_feat"):
            value = getattr(self, name)
            checks.append(
                (math.isfinite(value) and value >= 0, f"{name} must be >= 0, got {value}")
            )
        for ok, message in checks:
            if not ok:
                raise UsageError(message)

    @property
    def resolved_eps_r(self) -> float:
        """The generator's bound: ``eps_r``, or ``1.25 * eps`` (a little above the attack's)."""
        return self.eps_r if self.eps_r is not None else min(1.0, 1.25 * self.eps)

    def fingerprint(self) -> str:
        import hashlib
        import json

        d = {k: v for k, v in config_to_dict(self).items() if k not in _RESUMABLE_CHANGES}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class PurifierResult:
    """Outcome of :func:`train_purifier`."""

    out: Path
    purifier_path: Path
    metrics: list[dict[str, float]]
    epochs_run: int
    resumed_from: int
    generator: Generator | None = None


class PurifierTrainer:
    """Runs one :class:`PurifierConfig` (the engine behind ``advedge purifier train``)."""

    def __init__(self, config: PurifierConfig, *, dataset: Dataset | None = None) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.dataset = dataset if dataset is not None else load_dataset(config.data)
        if self.dataset.train is None:
            raise AdvedgeError(f"dataset {self.dataset.root} has no training split")
        self.classifier, self.classifier_info = load_frozen_model(
            config.classifier, self.dataset, self.device, role="classifier"
        )
        self.out = Path(config.out)
        self._config_doc: dict[str, Any] = {}

    # ------------------------------------------------------------------------- batches
    def _attacked_batch(self, x: Tensor, y: Tensor) -> Tensor:
        """The generator's input: FGSM / PGD / clean thirds (ipcm, hgd) or all FGSM (ape-gan)."""
        cfg, f = self.config, self.classifier
        if cfg.method == "ape-gan":
            return FGSM(f, eps=cfg.eps)(x, y)
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

    def _guidance(self, x_hat: Tensor, x: Tensor, y: Tensor) -> Tensor:
        cfg, f = self.config, self.classifier
        if cfg.guidance == "features":
            with torch.no_grad():
                target = f.forward_features(x)
            return cfg.w_feat * feature_guidance_loss(f.forward_features(x_hat), target)
        with torch.no_grad():
            clean_logits = f(x)
        logits = f(x_hat)
        if cfg.method == "hgd":
            return feature_guidance_loss(logits, clean_logits)
        return guidance_loss(logits, clean_logits, y, ce_weight=cfg.w_ce, kl_weight=cfg.w_kl)

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
        cfg = self.config
        x_in = self._attacked_batch(x, y)
        delta = x_in - x
        x_hat, r = gen.purify_with_residual(x_in)
        out: dict[str, float] = {}
        if disc is not None and opt_d is not None:
            kind = "nsgan" if cfg.method == "ape-gan" else cfg.gan
            loss_d = d_loss(disc(x), disc(x_hat.detach()), kind)
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
            out["d_loss"] = float(loss_d.detach())
        inv = inverse_perturbation_loss(r, delta)
        if cfg.method == "ape-gan":
            assert disc is not None
            loss_g = ape_gan_generator_loss(x_hat, x, disc(x_hat))
        elif cfg.method == "hgd":
            loss_g = self._guidance(x_hat, x, y)
        else:
            assert disc is not None
            loss_g = (
                cfg.w_inv * inv
                + cfg.w_pix * pixel_loss(x_hat, x, "l1")
                + self._guidance(x_hat, x, y)
                + cfg.w_adv * g_adv_loss(disc(x_hat), cfg.gan)
            )
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
        from advedge.locks import output_lock

        with output_lock(self.out):
            fresh = not self.out.exists()
            try:
                return self._run(resume, callbacks)
            except BaseException:
                if fresh and not (self.out / STATE_FILE).exists():
                    shutil.rmtree(self.out, ignore_errors=True)
                raise

    def _run(self, resume: bool, callbacks: TrainCallbacks | None) -> PurifierResult:
        cfg = self.config
        callbacks = callbacks or TrainCallbacks()
        state = self._check_out_dir(resume)
        seed_everything(cfg.seed)
        c = self.dataset.channels
        gen = Generator(c, cfg.width, eps_r=cfg.resolved_eps_r, depth=cfg.depth).to(self.device)
        disc = Discriminator(c).to(self.device) if cfg.method != "hgd" else None
        opt_g = torch.optim.Adam(gen.parameters(), lr=cfg.lr, betas=(0.5, 0.999))
        opt_d = (
            torch.optim.Adam(disc.parameters(), lr=cfg.lr_d, betas=(0.5, 0.999))
            if disc is not None
            else None
        )
        metrics: list[dict[str, float]] = []
        start = 0
        if state is not None:
            gen.load_state_dict(state["generator"])
            opt_g.load_state_dict(state["opt_g"])
            if disc is not None and opt_d is not None:
                disc.load_state_dict(state["discriminator"])
                opt_d.load_state_dict(state["opt_d"])
            start = int(state["epoch"])
            metrics = [dict(r) for r in state.get("metrics", [])][:start]
        train = self.dataset.train
        assert train is not None
        if cfg.subset is not None and cfg.subset < len(train):
            train = stratified_subset(train, cfg.subset, seed=cfg.seed)
        loader = BatchLoader(
            train,
            cfg.batch_size,
            shuffle=True,
            augment=True,
            seed=cfg.seed,
            drop_last=len(train) >= 2 * cfg.batch_size,
            device=self.device,
        )
        held = stratified_subset(self.dataset.test, min(cfg.eval_n, len(self.dataset.test)), seed=0)
        hx, hy = to_tensor(held.x).to(self.device), torch.as_tensor(held.y).to(self.device)
        self._config_doc = self._resolved_config(gen, len(train))  # written with the checkpoint
        callbacks.on_train_start(
            start_epoch=start, epochs=cfg.epochs, batches_per_epoch=len(loader)
        )
        for epoch in range(start, cfg.epochs):
            t0 = time.perf_counter()
            torch.manual_seed(_epoch_seed(cfg.seed, epoch, 0))
            loader.set_epoch(epoch)
            gen.train()
            if disc is not None:
                disc.train()
            sums: dict[str, float] = {}
            n = 0
            for i, (x, y) in enumerate(loader):
                losses = self.step(gen, disc, opt_g, opt_d, x, y)
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
            callbacks.on_eval_start(epoch=epoch)
            scores = self.held_out_scores(gen, hx, hy)
            row = {
                "epoch": epoch + 1,
                "g_loss": round(sums["g_loss"] / n, 6),
                **({"d_loss": round(sums["d_loss"] / n, 6)} if "d_loss" in sums else {}),
                "inv_loss": round(sums["inv_loss"] / n, 6),
                **{k: round(v, 6) for k, v in scores.items()},
                "seconds": round(time.perf_counter() - t0, 3),
            }
            metrics.append(row)
            self._write_checkpoint(gen, disc, opt_g, opt_d, epoch + 1, metrics)
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
            generator=gen.eval(),
        )

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
    def _check_out_dir(self, resume: bool) -> dict[str, Any] | None:
        if (self.out / PURIFIER_FILE).exists() and not (self.out / STATE_FILE).exists():
            raise UsageError(
                f"{self.out} has a purifier but no {STATE_FILE}", "choose another --out"
            )
        if not check_run_dir(self.out, resume, clean=True):
            if (self.out / PURIFIER_FILE).exists():
                raise UsageError(
                    f"{self.out} already holds a purifier run",
                    "pass --resume to continue it, or choose another --out",
                )
            return None
        state = load_state(self.out / STATE_FILE)
        if state.get("kind") != "purifier":
            raise UsageError(f"{self.out} holds a classifier run, not a purifier run")
        if state.get("fingerprint") != self.config.fingerprint():
            raise UsageError(
                f"cannot resume {self.out}: options differ from the original run",
                "resume with the same options, or choose another --out",
            )
        return state

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

    def _write_checkpoint(
        self,
        gen: Generator,
        disc: Discriminator | None,
        opt_g: torch.optim.Optimizer,
        opt_d: torch.optim.Optimizer | None,
        epochs: int,
        metrics: list[dict[str, float]],
    ) -> None:
        state: dict[str, Any] = {
            "kind": "purifier",
            "epoch": epochs,
            "generator": {k: v.detach().cpu() for k, v in gen.state_dict().items()},
            "opt_g": opt_g.state_dict(),
            "metrics": metrics,
            "fingerprint": self.config.fingerprint(),
            "config": config_to_dict(self.config),
        }
        if disc is not None and opt_d is not None:
            state["discriminator"] = {k: v.detach().cpu() for k, v in disc.state_dict().items()}
            state["opt_d"] = opt_d.state_dict()
        try:
            write_yaml(self.out / "config.yaml", self._config_doc)
            save_state(state, self.out / STATE_FILE)
            save_purifier(gen, self.out / PURIFIER_FILE, metadata=self._metadata(gen, epochs))
            write_metrics_csv(self.out / "metrics.csv", metrics, columns=PURIFIER_COLUMNS)
        except OSError as exc:
            raise os_error(exc, self.out) from None


def train_purifier(
    config: PurifierConfig,
    *,
    resume: bool = False,
    callbacks: TrainCallbacks | None = None,
    dataset: Dataset | None = None,
) -> PurifierResult:
    """Train a purifier as ``config`` says; see :class:`PurifierTrainer`."""
    return PurifierTrainer(config, dataset=dataset).run(resume=resume, callbacks=callbacks)

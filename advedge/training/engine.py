"""The training engine: one loop for every training method.

``train(TrainConfig(...))`` loads the data, builds the model and the method
(:mod:`advedge.training.objectives`), and runs SGD with a cosine, multistep or constant learning-rate
schedule. Every epoch it scores a fixed held-out batch (clean and PGD accuracy), appends a row to
``metrics.csv`` and writes ``state.pt`` (resumable state) and ``model.safetensors``, each
atomically, so a run killed at any point resumes from its last complete epoch with
``resume=True`` and loses at most the epoch in progress.

On CUDA it uses bf16 (or fp16 with a grad scaler) autocast, channels_last (on CPU too, where a
timing probe finds it faster) and optionally
``torch.compile``; it also runs on CPU. Under ``torchrun`` it wraps the model in DDP, shards the
data with a distributed sampler and lets rank 0 alone write files.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from advedge import __version__
from advedge.attacks import NORMS, PGD
from advedge.checkpoint import MODEL_FILE, STATE_FILE, load_state, save_model, save_state, unwrap
from advedge.config import config_to_dict, write_yaml
from advedge.data import BatchLoader, Dataset, ImageArrays, load_dataset, stratified_subset
from advedge.distributed import (
    all_reduce,
    barrier,
    broadcast,
    broadcast_buffers,
    init_distributed,
    parameters_agree,
    rank_and_world,
)
from advedge.errors import AdvedgeError, UsageError, did_you_mean, os_error
from advedge.models import create_model, list_models
from advedge.training.objectives import METHODS, Method, MethodOutput, build_method
from advedge.utils import (
    atomic_write_text,
    autocast_context,
    resolve_device,
    seed_everything,
)

logger = logging.getLogger(__name__)

__all__ = [
    "METRIC_COLUMNS",
    "TrainCallbacks",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "check_run_dir",
    "prepare_model",
    "train",
    "training_step",
]

METRIC_COLUMNS = (
    "epoch",
    "train_loss",
    "train_acc",
    "test_clean_acc",
    "test_pgd_acc",
    "lr",
    "seconds",
)

# Options that may differ between a run and its resumption.
_RESUMABLE_CHANGES = frozenset({"epochs", "device", "compile", "out", "eval_n"})


@dataclass(frozen=True)
class TrainConfig:
    """Resolved options of one training run (written to ``RUN_DIR/config.yaml``).

    Attributes:
        data: Dataset directory or name (``cifar10``, ``cifar100``, ``mnist``).
        model: Registry name of the architecture.
        method: ``natural``, ``pgd-at``, ``trades`` or ``fgsm-rs``.
        epochs: Total number of epochs.
        out: Run directory.
        eps: Training perturbation budget (pixel units).
        alpha: Attack step size; None means 2/255-per-8/255 (eps/4) for PGD-based methods and
            1.25 * eps for ``fgsm-rs``.
        steps: Attack iterations of the inner maximisation.
        norm: ``Linf`` or ``L2``.
        beta: TRADES' robust-term weight.
        batch_size: Global batch size (split across ranks under torchrun).
        lr, momentum, nesterov, weight_decay: SGD settings.
        schedule: ``cosine``, ``multistep`` or ``constant``, stepped per iteration.
        milestones: Fractions of training at which ``multistep`` multiplies the LR by ``gamma``.
        gamma: The multistep factor.
        subset: Train on a stratified sample of this many training images.
        seed: Seed for weights, data order, subset and attacks.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        amp: ``auto`` (bf16 on CUDA, off on CPU), ``bf16``, ``fp16`` or ``off``.
        channels_last: None means on CUDA, and on CPU when a short timing probe of one
            forward-backward pass finds it faster (oneDNN's NHWC kernels win for small and
            depthwise convolutions); the choice is kept in ``state.pt`` so a resumed run uses
            the same layout. Pass True or False for bit-reproducible runs across machines.
        compile: Wrap the model in ``torch.compile``.
        augment: Random crop (4-pixel padding) and horizontal flip.
        eval_n: Size of the fixed held-out batch scored every epoch.
        eval_steps: PGD steps for the held-out robust accuracy.
        model_kwargs: Extra architecture arguments (e.g. ``width_mult``).
    """

    data: str
    model: str
    method: str = "pgd-at"
    epochs: int = 10
    out: str = "runs/train"
    eps: float = 8 / 255
    alpha: float | None = None
    steps: int = 10
    norm: str = "Linf"
    beta: float = 6.0
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    milestones: tuple[float, ...] = (0.5, 0.75)
    gamma: float = 0.1
    subset: int | None = None
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    channels_last: bool | None = None
    compile: bool = False
    augment: bool = True
    eval_n: int = 256
    eval_steps: int = 10
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    teacher: str | None = None
    temperature: float | None = None
    mix_alpha: float | None = None

    def __post_init__(self) -> None:
        from advedge.config import SEED_MAX, check_fields
        from advedge.training.distillation import DISTILL_METHODS

        # Types first (a bool is not an int, floats are finite), then ranges: every later
        # check may compare and hash the values.
        check_fields(self)
        known = {**METHODS, **DISTILL_METHODS}
        if self.method not in known:
            raise UsageError(f"unknown method {self.method!r}", did_you_mean(self.method, known))
        if self.method in DISTILL_METHODS and not self.teacher:
            raise UsageError(f"method {self.method!r} needs a teacher", "pass --teacher RUN_DIR")
        if self.method in METHODS and self.teacher:
            raise UsageError(f"method {self.method!r} takes no teacher", "use advedge distill")
        if self.temperature is not None and not self.temperature > 0:
            raise UsageError(f"temperature must be > 0, got {self.temperature}")
        if self.mix_alpha is not None and not 0 <= self.mix_alpha <= 1:
            raise UsageError(f"alpha must lie in [0, 1], got {self.mix_alpha}")
        if self.model not in list_models():
            raise UsageError(
                f"unknown model {self.model!r}", did_you_mean(self.model, list_models())
            )
        # Integers are bounded so that an untrusted config can never drive a huge allocation.
        bounded = (
            ("epochs", self.epochs, 1, 100_000),
            ("steps", self.steps, 1, 10_000),
            ("batch_size", self.batch_size, 1, 65_536),
            ("subset", self.subset, 1, 10**9),
            ("seed", self.seed, 0, SEED_MAX),
            ("eval_n", self.eval_n, 1, 10**9),
            ("eval_steps", self.eval_steps, 1, 10_000),
        )
        checks = [
            (v is None or lo <= v <= hi, f"{name} must lie in [{lo}, {hi}], got {v}")
            for name, v, lo, hi in bounded
        ]
        checks += [
            (0 < self.eps <= 1, f"eps must lie in (0, 1], got {self.eps}"),
            (
                self.alpha is None or 0 < self.alpha <= 1,
                f"alpha must lie in (0, 1], got {self.alpha}",
            ),
            (self.norm in NORMS, f"norm must be Linf or L2, got {self.norm!r}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.weight_decay >= 0, f"weight decay must be >= 0, got {self.weight_decay}"),
            (0 <= self.momentum < 1, f"momentum must lie in [0, 1), got {self.momentum}"),
            (0 < self.gamma <= 1, f"gamma must lie in (0, 1], got {self.gamma}"),
            (self.beta >= 0, f"beta must be >= 0, got {self.beta}"),
            (
                self.schedule in ("cosine", "multistep", "constant"),
                f"schedule must be cosine, multistep or constant, got {self.schedule!r}",
            ),
            (
                self.amp in ("auto", "bf16", "fp16", "off"),
                f"amp must be auto, bf16, fp16 or off, got {self.amp!r}",
            ),
            (all(0 < m < 1 for m in self.milestones), "milestones are fractions in (0, 1)"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)
        object.__setattr__(self, "milestones", tuple(float(m) for m in self.milestones))

    @property
    def resolved_alpha(self) -> float:
        """The attack step size actually used."""
        if self.alpha is not None:
            return self.alpha
        return 1.25 * self.eps if self.method == "fgsm-rs" else self.eps / 4

    def fingerprint(self) -> str:
        """Hash of the options that must not change across a resume."""
        d = {k: v for k, v in config_to_dict(self).items() if k not in _RESUMABLE_CHANGES}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class TrainResult:
    """Outcome of :func:`train`: the run directory, its model file, the metrics rows and the
    trained model itself (this rank's copy, unwrapped, on the training device)."""

    out: Path
    model_path: Path
    metrics: list[dict[str, float]]
    epochs_run: int
    resumed_from: int
    model: nn.Module | None = None


class TrainCallbacks:
    """Progress hooks; the CLI implements them with a rich progress bar. All are no-ops here."""

    def on_train_start(self, *, start_epoch: int, epochs: int, batches_per_epoch: int) -> None:
        """Called once before the first epoch (``start_epoch`` > 0 after a resume)."""

    def on_batch_end(self, *, epoch: int, batch: int, loss: float, acc: float) -> None:
        """Called after every optimiser step with the running epoch means."""

    def on_eval_start(self, *, epoch: int) -> None:
        """Called before the held-out evaluation of an epoch."""

    def on_epoch_end(self, row: dict[str, float]) -> None:
        """Called with the metrics row once the epoch's checkpoint is on disk."""


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 10_007 + rank) % (2**63)


def lr_lambda(
    schedule: str, total_steps: int, milestones: tuple[float, ...], gamma: float
) -> Callable[[int], float]:
    """Multiplicative LR factor at iteration ``t`` of ``total_steps``.

    cosine: ``0.5 * (1 + cos(pi * t / T))``; multistep: ``gamma ** #{m : t >= m * T}``;
    constant: 1.
    """
    total = max(1, total_steps)
    if schedule == "cosine":
        return lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, total) / total))
    if schedule == "multistep":
        marks = [m * total for m in milestones]
        return lambda t: gamma ** sum(t >= m for m in marks)
    return lambda t: 1.0


class Trainer:
    """Runs one :class:`TrainConfig`: the engine behind ``advedge train``.

    Args:
        config: The run's options.
        method: A prebuilt method (e.g. a distillation method carrying a teacher); built from
            ``config`` when None.
        extra_metadata: Fields added to the model checkpoint (e.g. the teacher's sha256).
        dataset: A preloaded dataset (else ``config.data`` is loaded).
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        method: Method | None = None,
        extra_metadata: dict[str, Any] | None = None,
        dataset: Dataset | None = None,
    ) -> None:
        self.config = config
        init_distributed(config.device)  # a no-op unless launched by torchrun
        self.rank, self.world_size = rank_and_world()
        self.is_main = self.rank == 0
        self.device = resolve_device(config.device)
        if self.world_size > 1 and self.device.type == "cuda":
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dataset = dataset if dataset is not None else load_dataset(config.data)
        if self.dataset.train is None:
            raise AdvedgeError(
                f"dataset {self.dataset.root} has no training split",
                "training needs train-*.npz/train.npz, CIFAR batches or a train/ folder",
            )
        self.extra_metadata = dict(extra_metadata or {})
        if method is None and config.teacher:
            method = self._distill_method()
        self.method = method or build_method(
            config.method,
            eps=config.eps,
            alpha=config.resolved_alpha,
            steps=config.steps,
            norm=config.norm,
            **({"beta": config.beta} if config.method == "trades" else {}),
        )
        self.out = Path(config.out)
        self.schedule_changes: list[dict[str, Any]] = []
        self._config_doc: dict[str, Any] = {}

    # ----------------------------------------------------------------------------- setup
    def _distill_method(self) -> Method:
        """Load the teacher, check it fits the data, and build the distillation method."""
        from advedge.training.distillation import build_distill_method

        cfg = self.config
        assert cfg.teacher is not None
        teacher, self.extra_metadata["teacher"] = load_frozen_model(
            cfg.teacher, self.dataset, self.device, role="teacher"
        )
        return build_distill_method(
            cfg.method,
            teacher=teacher,
            eps=cfg.eps,
            alpha=cfg.resolved_alpha,
            steps=cfg.steps,
            norm=cfg.norm,
            tau=cfg.temperature,
            mix=cfg.mix_alpha,
        )

    def _train_arrays(self) -> ImageArrays:
        train = self.dataset.train
        assert train is not None
        if self.config.subset is not None and self.config.subset < len(train):
            train = stratified_subset(train, self.config.subset, seed=self.config.seed)
        return train

    def _build_model(self) -> nn.Module:
        kwargs = dict(self.config.model_kwargs)
        kwargs.setdefault("num_classes", self.dataset.num_classes)
        kwargs.setdefault("in_channels", self.dataset.channels)
        if kwargs["in_channels"] != self.dataset.channels:
            raise UsageError(
                f"model in_channels={kwargs['in_channels']} but the data has "
                f"{self.dataset.channels} channel(s)"
            )
        if kwargs["num_classes"] != self.dataset.num_classes:
            raise UsageError(
                f"model num_classes={kwargs['num_classes']} but the data has "
                f"{self.dataset.num_classes} classes"
            )
        from advedge.models.registry import check_input_size

        model = create_model(self.config.model, **kwargs)
        check_input_size(model, *self.dataset.input_shape[1:], training=True)
        return model

    def _check_out_dir(self, resume: bool) -> dict[str, Any] | None:
        """Return the state to resume from, or None; refuse to overwrite a run."""
        if not check_run_dir(self.out, resume, clean=True):
            return None
        state = load_state(self.out / STATE_FILE)
        if state.get("fingerprint") != self.config.fingerprint():
            old = state.get("config", {})
            new = config_to_dict(self.config)
            diff = sorted(
                k for k in new if k not in _RESUMABLE_CHANGES and old.get(k) != new.get(k)
            )
            raise UsageError(
                f"cannot resume {self.out}: options differ from the original run "
                f"({', '.join(diff) or 'unknown'})",
                "resume with the same options, or choose another --out",
            )
        done = int(state.get("epoch", 0))
        if done > self.config.epochs:
            raise UsageError(
                f"cannot resume {self.out} with --epochs {self.config.epochs}: it has already "
                f"trained {done} epochs",
                f"pass --epochs {done} or more (training does not go back in time)",
            )
        return state

    # ----------------------------------------------------------------------------- run
    def run(self, *, resume: bool = False, callbacks: TrainCallbacks | None = None) -> TrainResult:
        """Train to ``config.epochs``, resuming from ``state.pt`` when ``resume`` is true.

        Holds the output lock of ``config.out`` (one writer). The run folder is created with the
        first checkpoint (``config.yaml`` is written with it), and a new run that fails before
        its first checkpoint leaves no folder behind. A full disk or a read-only folder is
        reported as one named error.
        """
        from advedge.locks import output_lock

        with output_lock(self.out):
            fresh = not self.out.exists()
            try:
                return self._run(resume, callbacks)
            except BaseException:
                if fresh and self.is_main and not (self.out / STATE_FILE).exists():
                    shutil.rmtree(self.out, ignore_errors=True)
                raise

    def _run(self, resume: bool, callbacks: TrainCallbacks | None) -> TrainResult:
        cfg = self.config
        callbacks = callbacks or TrainCallbacks()
        state = self._check_out_dir(resume)
        seed_everything(cfg.seed + self.rank)

        train_arrays = self._train_arrays()
        layout = cfg.channels_last
        if layout is None and state is not None:
            layout = state.get("channels_last")
        c, h, w = self.dataset.input_shape
        model, channels_last = prepare_model(
            self._build_model(),
            self.device,
            channels_last=layout,
            probe_input=torch.rand(min(cfg.batch_size, 64), c, h, w),
        )
        if self.world_size > 1 and layout is None:
            # Every rank must use the same layout: rank 0's probe decides.
            flag = broadcast(torch.tensor([int(channels_last)], device=self.device), 0)
            if bool(flag.item()) != channels_last:
                channels_last = bool(flag.item())
                fmt = torch.channels_last if channels_last else torch.contiguous_format
                model = model.to(memory_format=fmt)
        self.channels_last = channels_last
        per_rank_batch = max(1, cfg.batch_size // self.world_size)
        loader = BatchLoader(
            train_arrays,
            per_rank_batch,
            shuffle=True,
            augment=cfg.augment,
            seed=cfg.seed,
            drop_last=len(train_arrays) >= 2 * cfg.batch_size,
            device=self.device,
            rank=self.rank,
            world_size=self.world_size,
        )
        optimizer = torch.optim.SGD(
            model.parameters(),
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov and cfg.momentum > 0,
            weight_decay=cfg.weight_decay,
        )
        total_steps = cfg.epochs * len(loader)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(cfg.schedule, total_steps, cfg.milestones, cfg.gamma)
        )
        metrics: list[dict[str, float]] = []
        start_epoch = 0
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            start_epoch = int(state["epoch"])
            metrics = [dict(r) for r in state.get("metrics", [])][:start_epoch]
            self.schedule_changes = list(state.get("schedule_changes", []))
            self._relay_schedule(optimizer, scheduler, total_steps, state, start_epoch)
            logger.info("resuming %s from epoch %d", self.out, start_epoch)

        train_model: nn.Module = model
        if self.world_size > 1:
            train_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        if cfg.compile:
            train_model = torch.compile(train_model)  # type: ignore[assignment]
        autocast = autocast_context(self.device, cfg.amp)
        scaler = torch.amp.GradScaler(self.device.type, enabled=self._uses_fp16())
        if state is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])

        held_x, held_y = self._held_out()
        self._config_doc = self._resolved_config(len(train_arrays))  # written with the checkpoint
        callbacks.on_train_start(
            start_epoch=start_epoch, epochs=cfg.epochs, batches_per_epoch=len(loader)
        )

        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            # Attack random starts draw from a stream fixed by (seed, epoch, rank): every rank
            # differs, and a resumed run repeats exactly what an uninterrupted one would do.
            torch.manual_seed(_epoch_seed(cfg.seed, epoch, self.rank))
            loader.set_epoch(epoch)
            self.method.on_epoch_start(epoch, cfg.epochs)
            model.train()
            loss_sum = torch.zeros((), device=self.device)
            correct = torch.zeros((), device=self.device)
            seen = 0
            for i, (x, y) in enumerate(loader):
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                out = training_step(self.method, train_model, x, y, optimizer, scaler, autocast)
                scheduler.step()
                loss_sum += out.loss.detach().float() * y.shape[0]
                correct += (out.logits.detach().argmax(1) == y).sum()
                seen += y.shape[0]
                if i % 10 == 0 or i == len(loader) - 1:
                    # .item() synchronises; do it only every few batches.
                    callbacks.on_batch_end(
                        epoch=epoch, batch=i, loss=float(loss_sum) / seen, acc=float(correct) / seen
                    )
            loss_mean, acc_mean = self._reduce(loss_sum, correct, seen)
            if not math.isfinite(loss_mean):
                raise AdvedgeError(
                    f"training diverged at epoch {epoch + 1} (loss is {loss_mean})",
                    "lower --lr; the last good checkpoint is kept",
                )
            broadcast_buffers(model)  # every rank scores and saves rank 0's BN statistics
            callbacks.on_eval_start(epoch=epoch)
            clean_acc, pgd_acc = self._held_out_accuracy(model, held_x, held_y)
            row = {
                "epoch": epoch + 1,
                "train_loss": round(loss_mean, 6),
                "train_acc": round(acc_mean, 6),
                "test_clean_acc": round(clean_acc, 6),
                "test_pgd_acc": round(pgd_acc, 6),
                "lr": round(optimizer.param_groups[0]["lr"], 8),
                "seconds": round(time.perf_counter() - t0, 3),
            }
            if self.schedule_changes:
                row["schedule_epochs"] = cfg.epochs
            metrics.append(row)
            if self.is_main:
                self._write_checkpoint(model, optimizer, scheduler, scaler, epoch + 1, metrics)
            barrier()  # no rank runs ahead of the checkpoint it would resume from
            logger.info(
                "epoch %d/%d: loss %.4f, train acc %.3f, held-out clean %.3f, PGD-%d %.3f (%.1f s)",
                epoch + 1,
                cfg.epochs,
                loss_mean,
                acc_mean,
                clean_acc,
                cfg.eval_steps,
                pgd_acc,
                row["seconds"],
            )
            callbacks.on_epoch_end(row)
        if not parameters_agree(model):
            raise AdvedgeError(
                f"rank {self.rank}: the ranks ended with different weights",
                "this is a bug in the DDP set-up; the rank-0 checkpoint is kept",
            )
        return TrainResult(
            out=self.out,
            model_path=self.out / MODEL_FILE,
            metrics=metrics,
            epochs_run=cfg.epochs - start_epoch,
            resumed_from=start_epoch,
            model=model,
        )

    # ----------------------------------------------------------------------------- helpers
    def _uses_fp16(self) -> bool:
        return self.device.type == "cuda" and self.config.amp == "fp16"

    def _reduce(self, loss_sum: Tensor, correct: Tensor, seen: int) -> tuple[float, float]:
        totals = torch.stack(
            [loss_sum.float(), correct.float(), torch.tensor(float(seen), device=loss_sum.device)]
        )
        if self.world_size > 1:
            all_reduce(totals)
        loss, corr, n = totals.tolist()
        return loss / max(n, 1), corr / max(n, 1)

    def _held_out(self) -> tuple[Tensor, Tensor]:
        from advedge.data import to_tensor

        test = self.dataset.test
        held = stratified_subset(test, min(self.config.eval_n, len(test)), seed=0)
        return to_tensor(held.x).to(self.device), torch.as_tensor(held.y).to(self.device)

    def _held_out_accuracy(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
        """Clean and PGD accuracy on the fixed held-out batch, in fp32 (honest gradients).

        Under DDP each rank scores every ``world_size``-th image and the counts are summed.
        """
        cfg = self.config
        n_total = x.shape[0]
        x, y = x[self.rank :: self.world_size], y[self.rank :: self.world_size]
        model.eval()
        attack = PGD(
            model,
            eps=cfg.eps,
            alpha=2.5 * cfg.eps / cfg.eval_steps,
            steps=cfg.eval_steps,
            norm=cfg.norm,
            generator=torch.Generator(device=self.device).manual_seed(0),
        )
        clean = pgd = 0
        for i in range(0, x.shape[0], 256):
            xb, yb = x[i : i + 256], y[i : i + 256]
            with torch.no_grad():
                clean += int((model(xb).argmax(1) == yb).sum())
            xa = attack(xb, yb)
            with torch.no_grad():
                pgd += int((model(xa).argmax(1) == yb).sum())
        if self.world_size > 1:
            counts = all_reduce(torch.tensor([clean, pgd], dtype=torch.float64, device=self.device))
            clean, pgd = (int(c) for c in counts.tolist())
        return clean / n_total, pgd / n_total

    def _resolved_config(self, n_train: int) -> dict[str, Any]:
        d = config_to_dict(self.config)
        d["alpha"] = self.config.resolved_alpha
        d["resolved"] = {
            "device": str(self.device),
            "world_size": self.world_size,
            "channels_last": self.channels_last,
            **({"schedule_changes": self.schedule_changes} if self.schedule_changes else {}),
            "dataset": {
                "name": self.dataset.name,
                "root": str(self.dataset.root),
                "format": self.dataset.format,
                "num_classes": self.dataset.num_classes,
                "input_shape": list(self.dataset.input_shape),
                "n_train": n_train,
                "n_test": len(self.dataset.test),
            },
            "method_settings": self.method.settings(),
            "advedge_version": __version__,
        }
        return d

    def _checkpoint_metadata(self, epochs_done: int) -> dict[str, Any]:
        cfg = self.config
        meta: dict[str, Any] = {
            "input_shape": list(self.dataset.input_shape),
            "dataset": self.dataset.name,
            "method": cfg.method,
            "eps": self.method.eps if self.method.adversarial else 0.0,
            "norm": cfg.norm,
            "method_settings": self.method.settings(),
            "epochs": epochs_done,
            "class_names": list(self.dataset.class_names),
        }
        meta.update(self.extra_metadata)
        return meta

    def _write_checkpoint(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        scaler: torch.amp.GradScaler,
        epochs_done: int,
        metrics: list[dict[str, float]],
    ) -> None:
        raw = unwrap(model)
        state: dict[str, Any] = {
            "epoch": epochs_done,
            "model": {k: v.detach().cpu() for k, v in raw.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "metrics": metrics,
            "fingerprint": self.config.fingerprint(),
            "config": config_to_dict(self.config),
            "channels_last": self.channels_last,
        }
        if self.schedule_changes:
            state["schedule_changes"] = self.schedule_changes
        # Order matters for crash safety: the state first, then the model, then metrics.
        try:
            write_yaml(self.out / "config.yaml", self._config_doc)
            save_state(state, self.out / STATE_FILE)
            save_model(raw, self.out / MODEL_FILE, metadata=self._checkpoint_metadata(epochs_done))
            write_metrics_csv(self.out / "metrics.csv", metrics)
        except OSError as exc:
            raise os_error(exc, self.out) from None

    def _relay_schedule(
        self,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        total_steps: int,
        state: dict[str, Any],
        start_epoch: int,
    ) -> None:
        """Lay the LR schedule over the resumed run's epoch count, and restart the LR from it.

        The optimiser's saved LR is the old schedule's last value (0 at the end of a cosine), so
        without this a run extended with ``--resume --epochs N`` would start its extra epochs
        from the wrong LR. When the epoch count changed, the change is logged, kept in
        ``state.pt`` and written to ``config.yaml`` (``resolved.schedule_changes``), and every
        later metrics row records ``schedule_epochs``: the extended run is not the run a fresh
        ``--epochs N`` would give (its first epochs followed the shorter schedule).
        """
        cfg = self.config
        lam = lr_lambda(cfg.schedule, total_steps, cfg.milestones, cfg.gamma)
        scheduler.lr_lambdas[0] = lam
        step = scheduler.last_epoch
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
            group["lr"] = base * lam(step)
        scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
        old_epochs = int(state.get("config", {}).get("epochs", cfg.epochs))
        if old_epochs != cfg.epochs and start_epoch < cfg.epochs:
            change = {
                "at_epoch": start_epoch,
                "from_epochs": old_epochs,
                "to_epochs": cfg.epochs,
                "lr": round(optimizer.param_groups[0]["lr"], 8),
            }
            self.schedule_changes.append(change)
            logger.warning(
                "epochs changed from %d to %d on resume: the %s schedule is laid over %d epochs "
                "and continues at lr %.4g from epoch %d (not the same as a fresh %d-epoch run)",
                old_epochs,
                cfg.epochs,
                cfg.schedule,
                cfg.epochs,
                change["lr"],
                start_epoch + 1,
                cfg.epochs,
            )


def load_frozen_model(
    path: str, dataset: Dataset, device: torch.device, *, role: str
) -> tuple[nn.Module, dict[str, Any]]:
    """Load a frozen model (a distillation teacher, a purifier's classifier) for ``dataset``.

    Its parameters stop taking gradients and it stays in eval mode.

    Returns:
        ``(model, record)``; the record (path, sha256, architecture, method) goes into the
        checkpoint trained against it.

    Raises:
        CheckpointError: missing or corrupt file.
        UsageError: its classes or input shape differ from the data's (``role`` names it).
    """
    from advedge.checkpoint import load_model, resolve_checkpoint
    from advedge.utils import sha256_file

    ckpt = resolve_checkpoint(path)
    model = load_model(ckpt, device=device)
    for p in model.parameters():
        p.requires_grad_(False)
    meta = getattr(model, "checkpoint_metadata", {})
    k = int(meta.get("num_classes") or 0)
    if k != dataset.num_classes:
        raise UsageError(
            f"the {role} predicts {k} classes but the data has {dataset.num_classes}",
            f"use the dataset the {role} was trained on",
        )
    shape = meta.get("input_shape")
    if shape and list(shape) != list(dataset.input_shape):
        raise UsageError(
            f"the {role} takes inputs of shape {list(shape)} but the data has "
            f"{list(dataset.input_shape)}"
        )
    record = {
        "path": str(ckpt),
        "sha256": sha256_file(ckpt),
        "architecture": meta.get("architecture"),
        "method": meta.get("method"),
    }
    return model, record


def check_run_dir(out: Path, resume: bool, *, clean: bool = False) -> bool:
    """Check that ``out`` may be trained into; return True when there is a run to resume.

    With ``clean`` (only under the run's output lock: another process's temporary files are
    its writes in progress), leftover temporary files of writes cut short by SIGKILL are
    removed.

    Raises:
        UsageError: ``out`` is a file; it holds a run and ``resume`` is false; or it holds a
            model but no state to resume from.
    """
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file", "give a run directory")
    for stale in out.glob(".*.tmp") if clean and out.is_dir() else ():
        stale.unlink(missing_ok=True)
    has_state = (out / STATE_FILE).exists()
    has_model = (out / MODEL_FILE).exists()
    if not resume:
        if has_state or has_model:
            raise UsageError(
                f"{out} already holds a training run",
                "pass --resume to continue it, or choose another --out",
            )
        return False
    if not has_state:
        if has_model:
            raise UsageError(
                f"{out} has a model but no {STATE_FILE} to resume from",
                "choose another --out to train anew",
            )
        logger.info("nothing to resume in %s; starting a new run", out)
        return False
    return True


def training_step(
    method: Method,
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    autocast: Callable[[], Any],
) -> MethodOutput:
    """One optimiser step of ``method`` on the batch ``(x, y)``: craft, forward, backward, step.

    This is the whole per-batch work of the engine, shared by :class:`Trainer` and the
    throughput benchmarks.
    """
    with autocast():
        out = method.loss(model, x, y)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(out.loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return out


def prepare_model(
    model: nn.Module,
    device: torch.device,
    *,
    channels_last: bool | None = None,
    probe_input: Tensor | None = None,
) -> tuple[nn.Module, bool]:
    """Move ``model`` to ``device``, in the channels_last memory format where that pays.

    ``channels_last=None`` means: on CUDA always; on CPU when ``probe_input`` is given and
    :func:`channels_last_is_faster` says so; otherwise not.

    Returns:
        ``(model, channels_last)``.
    """
    model = model.to(device)
    use_cl = channels_last
    if use_cl is None:
        if device.type == "cuda":
            use_cl = True
        elif probe_input is not None:
            use_cl = channels_last_is_faster(model, probe_input.to(device))
        else:
            use_cl = False
    if use_cl:
        model = model.to(memory_format=torch.channels_last)
    return model, bool(use_cl)


def channels_last_is_faster(model: nn.Module, x: Tensor, *, repeats: int = 2) -> bool:
    """Time a forward-backward pass of a copy of ``model`` in both memory formats.

    The copy (in train mode) takes the input gradient and the parameter gradients, as one
    step of adversarial training does; each format gets one warm-up pass, then the best of
    ``repeats`` timed passes decides. The model itself is not touched.
    """
    import copy

    def best(m: nn.Module, inp: Tensor) -> float:
        times = []
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            xi = inp.detach().requires_grad_(True)
            m(xi).float().logsumexp(1).sum().backward()
            if inp.device.type == "cuda":
                torch.cuda.synchronize(inp.device)
            if i:
                times.append(time.perf_counter() - t0)
        return min(times)

    nchw = copy.deepcopy(model).train()
    nhwc = copy.deepcopy(model).train().to(memory_format=torch.channels_last)
    t_nchw = best(nchw, x)
    t_nhwc = best(nhwc, x.contiguous(memory_format=torch.channels_last))
    logger.info("layout probe: NCHW %.4f s, channels_last %.4f s", t_nchw, t_nhwc)
    return t_nhwc < 0.95 * t_nchw


def write_metrics_csv(
    path: Path, rows: list[dict[str, float]], columns: tuple[str, ...] = METRIC_COLUMNS
) -> None:
    """Write ``metrics.csv`` (one row per epoch, ``columns`` first), atomically."""
    columns = list(columns) + sorted({k for r in rows for k in r} - set(columns))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    atomic_write_text(path, buf.getvalue())


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    callbacks: TrainCallbacks | None = None,
    dataset: Dataset | None = None,
) -> TrainResult:
    """Train a model as ``config`` says; see :class:`Trainer`. The API behind ``advedge train``.

    Args:
        config: The run's options.
        resume: Continue the run in ``config.out`` from its last complete epoch.
        callbacks: Progress hooks.
        dataset: ``config.data`` already loaded (else it is loaded here).
    """
    return Trainer(config, dataset=dataset).run(resume=resume, callbacks=callbacks)

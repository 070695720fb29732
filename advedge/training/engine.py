"""The training engine: one loop for every training method.

``train(TrainConfig(...))`` loads the data, builds the model and the method
(:mod:`advedge.training.objectives`), and runs SGD with a cosine, multistep or constant learning-rate
schedule. Every epoch it scores a fixed held-out batch (clean and PGD accuracy), appends a row to
``metrics.csv`` and writes ``state.pt`` (resumable state) and ``model.safetensors``, each
atomically, so a run killed at any point resumes from its last complete epoch with
``resume=True`` and loses at most the epoch in progress.

On CUDA it uses bf16 (or fp16 with a grad scaler) autocast, channels_last (on CPU too, where a
timing probe finds it faster, :mod:`~advedge.training.device`) and optionally
``torch.compile``; it also runs on CPU. Under ``torchrun`` it wraps the model in DDP, shards the
data with a distributed sampler and lets rank 0 alone write files.

The run directory (lock, resume checks, checkpoint files) is :mod:`~advedge.training.rundir`'s,
shared with the purifier's trainer; the options are :class:`~advedge.training.config.TrainConfig`
(re-exported here with :func:`~advedge.training.rundir.check_run_dir`, the engine's API).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from advedge import __version__
from advedge.attacks import PGD
from advedge.checkpoint import MODEL_FILE, cpu_state_dict, save_model, unwrap
from advedge.config import config_to_dict
from advedge.data import BatchLoader, Dataset, ImageArrays
from advedge.distributed import (
    all_reduce,
    barrier,
    broadcast,
    broadcast_buffers,
    init_distributed,
    parameters_agree,
    rank_and_world,
)
from advedge.errors import AdvedgeError, UsageError
from advedge.models import create_model
from advedge.training.config import TrainConfig
from advedge.training.device import prepare_model
from advedge.training.distillation import build_distill_method
from advedge.training.inputs import (
    held_out_batch,
    load_frozen_model,
    load_training_data,
    training_split,
)
from advedge.training.objectives import (
    Method,
    MethodOutput,
    build_method,
    register_attack_view,
)
from advedge.training.rundir import RunDir, check_run_dir, epoch_seed, resumed_progress
from advedge.training.schedule import lr_lambda, relay_schedule
from advedge.utils import autocast_context, resolve_device, seed_everything

logger = logging.getLogger(__name__)

__all__ = [
    "METRIC_COLUMNS",
    "TrainCallbacks",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "check_run_dir",
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


@dataclass
class _Loop:
    """The moving parts of one run's training loop, built by :meth:`Trainer._make_loop`."""

    model: nn.Module  # the model itself: scored on the held-out batch and saved
    train_model: nn.Module  # what takes the steps: the model, maybe in DDP and compiled
    loader: BatchLoader
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    autocast: Callable[[], Any]
    start_epoch: int
    metrics: list[dict[str, float]]


class Trainer:
    """Runs one :class:`TrainConfig`: the engine behind ``advedge train`` and ``advedge distill``.

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
        self.dataset = load_training_data(config.data, dataset)
        self.extra_metadata = dict(extra_metadata or {})
        if method is None and config.teacher:
            method = self._distill_method()
        self.method = method or build_method(
            config.method,
            eps=config.eps,
            alpha=config.resolved_alpha,
            steps=config.steps,
            norm=config.norm,
            attack_bn=config.attack_bn,
            **({"beta": config.beta} if config.method == "trades" else {}),
        )
        self.run_dir = RunDir(config, is_main=self.is_main)
        self.out = self.run_dir.out
        self.channels_last = False
        self.schedule_changes: list[dict[str, Any]] = []
        self._config_doc: dict[str, Any] = {}

    # ----------------------------------------------------------------------------- setup
    def _distill_method(self) -> Method:
        """Load the teacher, check it fits the data, and build the distillation method."""
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
            reduction=cfg.kl_reduction,
            attack_bn=cfg.attack_bn,
        )

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

    # ----------------------------------------------------------------------------- run
    def run(self, *, resume: bool = False, callbacks: TrainCallbacks | None = None) -> TrainResult:
        """Train to ``config.epochs``, resuming from ``state.pt`` when ``resume`` is true.

        Holds the output lock of ``config.out`` (one writer). The run folder is created with the
        first checkpoint (``config.yaml`` is written with it), and a new run that fails before
        its first checkpoint leaves no folder behind. A full disk or a read-only folder is
        reported as one named error.
        """
        with self.run_dir.locked():
            return self._run(resume, callbacks or TrainCallbacks())

    def _run(self, resume: bool, callbacks: TrainCallbacks) -> TrainResult:
        cfg = self.config
        state = self.run_dir.resume_state(resume)
        seed_everything(cfg.seed + self.rank)
        train_arrays = training_split(self.dataset, cfg.subset, cfg.seed)
        model = self._place_model(state)
        loop = self._make_loop(model, train_arrays, state)
        held_x, held_y = held_out_batch(self.dataset, cfg.eval_n, self.device)
        self._config_doc = self._resolved_config(len(train_arrays))  # written with the checkpoint
        callbacks.on_train_start(
            start_epoch=loop.start_epoch, epochs=cfg.epochs, batches_per_epoch=len(loop.loader)
        )
        for epoch in range(loop.start_epoch, cfg.epochs):
            self._run_epoch(loop, epoch, held_x, held_y, callbacks)
        if not parameters_agree(model):
            raise AdvedgeError(
                f"rank {self.rank}: the ranks ended with different weights",
                "this is a bug in the DDP set-up; the rank-0 checkpoint is kept",
            )
        return TrainResult(
            out=self.out,
            model_path=self.out / MODEL_FILE,
            metrics=loop.metrics,
            epochs_run=cfg.epochs - loop.start_epoch,
            resumed_from=loop.start_epoch,
            model=model,
        )

    def _place_model(self, state: dict[str, Any] | None) -> nn.Module:
        """Build the model on the device, in the memory layout the config, the resumed state or
        (rank 0's) timing probe chooses; sets ``self.channels_last``."""
        cfg = self.config
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
        return model

    def _make_loop(
        self, model: nn.Module, train_arrays: ImageArrays, state: dict[str, Any] | None
    ) -> _Loop:
        """The loader, SGD, the LR schedule and the grad scaler, restored from ``state``."""
        cfg = self.config
        loader = BatchLoader(
            train_arrays,
            max(1, cfg.batch_size // self.world_size),
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
        start_epoch, metrics = resumed_progress(state)
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            self.schedule_changes = list(state.get("schedule_changes", []))
            change = relay_schedule(optimizer, scheduler, cfg, total_steps, state, start_epoch)
            if change is not None:
                self.schedule_changes.append(change)
            logger.info("resuming %s from epoch %d", self.out, start_epoch)
        train_model = self._wrap(model)
        autocast = autocast_context(self.device, cfg.amp)
        scaler = torch.amp.GradScaler(self.device.type, enabled=self._uses_fp16())
        if state is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        return _Loop(
            model, train_model, loader, optimizer, scheduler, scaler, autocast, start_epoch, metrics
        )

    def _wrap(self, model: nn.Module) -> nn.Module:
        """The model the steps run on: in DDP under torchrun, compiled with ``compile``."""
        train_model: nn.Module = model
        if self.world_size > 1:
            train_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        if self.config.compile:
            train_model = torch.compile(train_model)  # type: ignore[assignment]
            if self.world_size > 1:  # the inner attack runs on the local module: compile it too
                register_attack_view(train_model, torch.compile(model))
        return train_model

    def _run_epoch(
        self, loop: _Loop, epoch: int, held_x: Tensor, held_y: Tensor, callbacks: TrainCallbacks
    ) -> None:
        """Train one epoch, score the held-out batch, and checkpoint (rank 0)."""
        cfg = self.config
        t0 = time.perf_counter()
        # Attack random starts draw from a stream fixed by (seed, epoch, rank): every rank
        # differs, and a resumed run repeats exactly what an uninterrupted one would do.
        torch.manual_seed(epoch_seed(cfg.seed, epoch, self.rank))
        loop.loader.set_epoch(epoch)
        self.method.on_epoch_start(epoch, cfg.epochs)
        loss_mean, acc_mean = self._train_batches(loop, epoch, callbacks)
        if not math.isfinite(loss_mean):
            raise AdvedgeError(
                f"training diverged at epoch {epoch + 1} (loss is {loss_mean})",
                "lower --lr; the last good checkpoint is kept",
            )
        broadcast_buffers(loop.model)  # every rank scores and saves rank 0's BN statistics
        callbacks.on_eval_start(epoch=epoch)
        clean_acc, pgd_acc = self._held_out_accuracy(loop.model, held_x, held_y)
        row = {
            "epoch": epoch + 1,
            "train_loss": round(loss_mean, 6),
            "train_acc": round(acc_mean, 6),
            "test_clean_acc": round(clean_acc, 6),
            "test_pgd_acc": round(pgd_acc, 6),
            "lr": round(loop.optimizer.param_groups[0]["lr"], 8),
            "seconds": round(time.perf_counter() - t0, 3),
        }
        if self.schedule_changes:
            row["schedule_epochs"] = cfg.epochs
        loop.metrics.append(row)
        if self.is_main:
            self._write_checkpoint(loop, epoch + 1)
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

    def _train_batches(
        self, loop: _Loop, epoch: int, callbacks: TrainCallbacks
    ) -> tuple[float, float]:
        """One pass over the loader; returns the epoch's mean loss and accuracy (all ranks)."""
        loop.model.train()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device)
        seen = 0
        n_batches = len(loop.loader)
        for i, (x, y) in enumerate(loop.loader):
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            out = training_step(
                self.method, loop.train_model, x, y, loop.optimizer, loop.scaler, loop.autocast
            )
            loop.scheduler.step()
            loss_sum += out.loss.detach().float() * y.shape[0]
            correct += (out.logits.detach().argmax(1) == y).sum()
            seen += y.shape[0]
            if i % 10 == 0 or i == n_batches - 1:
                # .item() synchronises; do it only every few batches.
                callbacks.on_batch_end(
                    epoch=epoch, batch=i, loss=float(loss_sum) / seen, acc=float(correct) / seen
                )
        return self._reduce(loss_sum, correct, seen)

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

    def _write_checkpoint(self, loop: _Loop, epochs_done: int) -> None:
        raw = unwrap(loop.model)
        state: dict[str, Any] = {
            "epoch": epochs_done,
            "model": cpu_state_dict(raw),
            "optimizer": loop.optimizer.state_dict(),
            "scheduler": loop.scheduler.state_dict(),
            "scaler": loop.scaler.state_dict(),
            **self.run_dir.state_record(loop.metrics),
            "channels_last": self.channels_last,
        }
        if self.schedule_changes:
            state["schedule_changes"] = self.schedule_changes
        self.run_dir.write_checkpoint(
            state,
            config_doc=self._config_doc,
            save_artifact=lambda: save_model(
                raw, self.out / MODEL_FILE, metadata=self._checkpoint_metadata(epochs_done)
            ),
            metrics=loop.metrics,
            columns=METRIC_COLUMNS,
        )


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

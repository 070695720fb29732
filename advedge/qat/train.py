"""The QAT run: adversarial distillation of the trainable Q/DQ graph, one checked INT8 file per
epoch.

:func:`run_qat` (``advedge qat``) holds the output lock of ``out`` and:

1. checks the student, the teacher and a given PTQ file before anything expensive;
2. takes the PTQ file (:func:`~advedge.qat.sources.prepare_ptq`) and builds its trainable graph
   (:func:`~advedge.qat.graph.build_qat_graph`);
3. scores the PTQ starting point once (the baseline in ``config.yaml``): clean and PGD accuracy
   of the graph on the held-out batch, and the file's clean accuracy under ONNX Runtime on the
   parity images;
4. trains each epoch with the distillation method (ADD by default, the robust teacher's soft
   labels in its inner attack and its loss) through the engine's own step
   (:func:`~advedge.training.engine.training_step`), in FP32: every forward of the step and of
   the inner attack goes through the fake-quantised graph, whose rounding passes gradients
   straight through; SGD, the schedule stepped per batch, each epoch's random stream fixed
   (:func:`~advedge.training.rundir.epoch_seed`), as the engine does;
5. after each epoch scores the held-out batch (clean, PGD), writes the graph back into the INT8
   file and checks it (:func:`~advedge.qat.artifact.write_qat_onnx`: placement unchanged,
   ``verify_qdq``, parity with ONNX Runtime), then checkpoints like every trainer
   (:class:`~advedge.training.rundir.RunDir`: ``config.yaml``, ``state.pt``, the artifact and
   its sidecar, ``metrics.csv``, each atomic), so a run killed at any point resumes
   (``resume=True``) from its last complete epoch. A file that fails its checks stops the run
   and is not written; the last good epoch's files stay.

The run directory: ``ptq/`` (the PTQ file and, when exported here, its FP32 parent and
calibration set), ``<arch>.int8-qat.onnx`` with its ``.json`` sidecar, ``config.yaml``,
``metrics.csv``, ``state.pt``.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from advedge import __version__
from advedge.attacks import PGD
from advedge.data import BatchLoader, Dataset, stratified_subset
from advedge.errors import AdvedgeError
from advedge.export.graph import read_onnx_metadata, sidecar_path, write_sidecar
from advedge.qat.artifact import parity, write_qat_onnx
from advedge.qat.config import QatConfig
from advedge.qat.graph import build_qat_graph
from advedge.qat.sources import check_ptq, prepare_ptq, student_record
from advedge.training.distillation import DistillMethod, build_distill_method
from advedge.training.engine import TrainCallbacks, training_step
from advedge.training.inputs import held_out_batch, load_frozen_model, training_split
from advedge.training.rundir import RunDir, epoch_seed, resumed_progress
from advedge.training.schedule import lr_lambda
from advedge.utils import autocast_context, resolve_device, seed_everything, sha256_file

logger = logging.getLogger(__name__)

__all__ = ["METRIC_COLUMNS", "QatResult", "artifact_name", "check_inputs", "run_qat"]

METRIC_COLUMNS = (
    "epoch",
    "train_loss",
    "train_acc",
    "test_clean_acc",
    "test_pgd_acc",
    "artifact_clean_acc",
    "parity_agreement",
    "lr",
    "seconds",
)


def artifact_name(architecture: str, quantisation: str = "qat") -> str:
    """The INT8 file of a run: ``<arch>.int8-qat.onnx`` (``<arch>.int8-ft.onnx`` for the
    control run without fake quantisation)."""
    return f"{architecture}.int8-{quantisation}.onnx"


@dataclass
class QatResult:
    """What :func:`run_qat` did: the run directory, the QAT file, the PTQ file it started from,
    every epoch's metrics row, the PTQ baseline and the last parity record."""

    out: Path
    artifact: Path
    ptq: Path
    metrics: list[dict[str, float]]
    epochs_run: int
    resumed_from: int
    baseline: dict[str, float] = field(default_factory=dict)
    parity: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Job:
    """One run's moving parts."""

    config: QatConfig
    run_dir: RunDir
    dataset: Dataset
    device: torch.device
    graph: torch.nn.Module
    method: DistillMethod
    settings: dict[str, Any]
    ptq: Path
    records: dict[str, Any]
    loader: BatchLoader
    optimizer: torch.optim.Optimizer
    scheduler: Any
    held: tuple[torch.Tensor, torch.Tensor]
    parity_x: np.ndarray
    parity_y: np.ndarray
    say: Callable[[str], None]
    metrics: list[dict[str, float]] = field(default_factory=list)
    baseline: dict[str, float] = field(default_factory=dict)
    parity: dict[str, Any] = field(default_factory=dict)

    @property
    def artifact(self) -> Path:
        arch = self.records["student"]["architecture"]
        return self.run_dir.out / artifact_name(arch, self.config.quantisation)


def check_inputs(config: QatConfig) -> dict[str, Any]:
    """The cheap checks of a run's inputs, before any data is read: the student and the
    teacher are readable checkpoints, and a given PTQ file is the student's symmetric INT8 one.
    Returns the student's record.

    Raises:
        CheckpointError: an unreadable student or teacher.
        UsageError: a bad ``--ptq``.
    """
    from advedge.checkpoint import read_metadata

    student = student_record(config.student)
    read_metadata(config.teacher)
    if config.ptq is not None:
        check_ptq(Path(config.ptq), student)
    return student


def run_qat(
    config: QatConfig,
    *,
    resume: bool = False,
    callbacks: TrainCallbacks | None = None,
    dataset: Dataset | None = None,
    status: Callable[[str], None] | None = None,
) -> QatResult:
    """Run (or resume) the QAT of ``config``; see the module docstring.

    Raises:
        UsageError: ``out`` holds another run (without ``resume``) or one with other options; a
            bad ``--ptq``; a teacher for other data.
        CheckpointError: an unreadable student or teacher.
        ExportError: the PTQ export failed, or a written file failed its checks.
        AdvedgeError: training diverged.
    """
    say = status or logger.info
    run_dir = RunDir(config)
    callbacks = callbacks or TrainCallbacks()
    with run_dir.locked():
        state = run_dir.resume_state(resume)
        student = check_inputs(config)  # the cheap checks first
        job = _setup(config, run_dir, student, state, dataset, say)
        start, job.metrics = resumed_progress(state)
        if state is not None:
            job.graph.load_state_dict(state["graph"])
            job.optimizer.load_state_dict(state["optimizer"])
            job.scheduler.load_state_dict(state["scheduler"])
            job.baseline = dict(state.get("baseline", {}))
            say(f"resuming {run_dir.out} from epoch {start}")
        else:
            job.baseline = _baseline(job)
        callbacks.on_train_start(
            start_epoch=start, epochs=config.epochs, batches_per_epoch=len(job.loader)
        )
        for epoch in range(start, config.epochs):
            _run_epoch(job, epoch, callbacks)
        return QatResult(
            out=run_dir.out,
            artifact=job.artifact,
            ptq=job.ptq,
            metrics=job.metrics,
            epochs_run=config.epochs - start,
            resumed_from=start,
            baseline=job.baseline,
            parity=job.parity,
        )


def _setup(
    config: QatConfig,
    run_dir: RunDir,
    student: dict[str, Any],
    state: dict[str, Any] | None,
    dataset: Dataset | None,
    say: Callable[[str], None],
) -> _Job:
    """Data, PTQ file, graph, teacher, method, loader, optimiser: everything but the epochs."""
    from advedge.training.inputs import load_training_data

    dataset = load_training_data(config.data, dataset)
    device = resolve_device(config.device)
    settings = config.resolved(student.get("eps"))
    seed_everything(config.seed)
    teacher, teacher_record = load_frozen_model(config.teacher, dataset, device, role="teacher")
    ptq = prepare_ptq(config, run_dir.out, student, state, say)
    graph = build_qat_graph(ptq).to(device)
    method = build_distill_method(
        config.method,
        teacher=teacher,
        eps=settings["eps"],
        alpha=settings["alpha"],
        steps=settings["steps"],
        tau=config.temperature,
        mix=config.mix_alpha,
        reduction=config.kl_reduction,
        attack_bn=settings["attack_bn"],
    )
    train = training_split(dataset, config.subset, config.seed)
    batch = settings["batch_size"]
    loader = BatchLoader(
        train,
        batch,
        shuffle=True,
        augment=config.augment,
        seed=config.seed,
        drop_last=len(train) >= 2 * batch,
        device=device,
    )
    optimizer = torch.optim.SGD(
        graph.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=settings["weight_decay"],
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(config.schedule, config.epochs * len(loader), (), 1.0)
    )
    held = stratified_subset(dataset.test, min(config.parity_n, len(dataset.test)), seed=0)
    records = {
        "student": student,
        "teacher": teacher_record,
        "ptq": {"file": str(ptq.relative_to(run_dir.out)), "sha256": sha256_file(ptq)},
        "n_train": len(train),
    }
    return _Job(
        config,
        run_dir,
        dataset,
        device,
        graph,
        method,
        settings,
        ptq,
        records,
        loader,
        optimizer,
        scheduler,
        held_out_batch(dataset, config.eval_n, device),
        (held.x.transpose(0, 3, 1, 2).astype(np.float32) / 255.0),
        held.y,
        say,
    )


def _held_out(job: _Job) -> tuple[float, float]:
    """Clean and PGD-``eval_steps`` accuracy of the graph on the held-out batch (the engine's
    score: step 2.5 eps / steps, seeded)."""
    graph, (x, y) = job.graph, job.held
    eps, steps = job.settings["eps"], job.config.eval_steps
    graph.eval()
    attack = PGD(
        graph,
        eps=eps,
        alpha=2.5 * eps / steps,
        steps=steps,
        generator=torch.Generator(device=job.device).manual_seed(0),
    )
    clean = pgd = 0
    with graph.quantising():  # what ships, also for the FP32 control
        for i in range(0, len(y), 256):
            xb, yb = x[i : i + 256], y[i : i + 256]
            with torch.no_grad():
                clean += int((graph(xb).argmax(1) == yb).sum())
            xa = attack(xb, yb)
            with torch.no_grad():
                pgd += int((graph(xa).argmax(1) == yb).sum())
    return clean / len(y), pgd / len(y)


def _baseline(job: _Job) -> dict[str, float]:
    """The PTQ file's scores before any QAT step."""
    job.say("scoring the PTQ starting point")
    clean, pgd = _held_out(job)
    record = parity(job.graph, job.ptq, job.parity_x)
    return {
        "test_clean_acc": round(clean, 6),
        "test_pgd_acc": round(pgd, 6),
        **_artifact_scores(record, job.parity_y),
    }


def _artifact_scores(record: dict[str, Any], y: np.ndarray) -> dict[str, float]:
    """The file's clean accuracy under ONNX Runtime and the parity the gate counts."""
    top = record["artifact_predictions"]
    gated = max(record["agreement"], record["agreement_ort_bias_rounding"])
    return {
        "artifact_clean_acc": round(float((top == y).mean()), 6),
        "parity_agreement": round(gated, 6),
    }


def _train_epoch(job: _Job, epoch: int, callbacks: TrainCallbacks) -> tuple[float, float]:
    """One pass over the loader with the engine's step; the mean loss and accuracy."""
    autocast = autocast_context(job.device, "off")  # FP32: quantisation is simulated exactly
    scaler = torch.amp.GradScaler(job.device.type, enabled=False)
    job.graph.train()
    job.graph.fake_quant = job.config.fake_quant  # off: the FP32 control
    loss_sum, correct, seen = 0.0, 0, 0
    n = len(job.loader)
    for i, (x, y) in enumerate(job.loader):
        out = training_step(job.method, job.graph, x, y, job.optimizer, scaler, autocast)
        job.scheduler.step()
        loss_sum += float(out.loss.detach()) * len(y)
        correct += int((out.logits.detach().argmax(1) == y).sum())
        seen += len(y)
        if i % 10 == 0 or i == n - 1:
            callbacks.on_batch_end(epoch=epoch, batch=i, loss=loss_sum / seen, acc=correct / seen)
    return loss_sum / max(seen, 1), correct / max(seen, 1)


def _run_epoch(job: _Job, epoch: int, callbacks: TrainCallbacks) -> None:
    """Train, score, write and check the file, checkpoint."""
    cfg = job.config
    t0 = time.perf_counter()
    torch.manual_seed(epoch_seed(cfg.seed, epoch, 0))
    job.loader.set_epoch(epoch)
    job.method.on_epoch_start(epoch, cfg.epochs)
    loss, acc = _train_epoch(job, epoch, callbacks)
    if not math.isfinite(loss):
        raise AdvedgeError(
            f"QAT diverged at epoch {epoch + 1} (loss is {loss})",
            "lower --lr; the last good epoch's files are kept",
        )
    callbacks.on_eval_start(epoch=epoch)
    clean, pgd = _held_out(job)
    staged = job.run_dir.out / f".{job.artifact.name}.staged.tmp"
    job.parity = write_qat_onnx(job.graph, job.ptq, staged, _metadata(job, epoch + 1), job.parity_x)
    scores = _artifact_scores(job.parity, job.parity_y)
    del job.parity["artifact_predictions"]
    row = {
        "epoch": epoch + 1,
        "train_loss": round(loss, 6),
        "train_acc": round(acc, 6),
        "test_clean_acc": round(clean, 6),
        "test_pgd_acc": round(pgd, 6),
        **scores,
        "lr": round(job.optimizer.param_groups[0]["lr"], 8),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    job.metrics.append(row)
    _checkpoint(job, epoch + 1, staged)
    logger.info(
        "QAT epoch %d/%d: loss %.4f, held-out clean %.3f, PGD-%d %.3f, INT8 file clean %.3f",
        epoch + 1,
        cfg.epochs,
        loss,
        clean,
        cfg.eval_steps,
        pgd,
        row["artifact_clean_acc"],
    )
    callbacks.on_epoch_end(row)


def _metadata(job: _Job, epochs_done: int) -> dict[str, Any]:
    """The file's metadata beyond the PTQ file's: precision int8, ``quantisation`` (``qat``, or
    ``ft`` for the FP32 control) and what trained it."""
    cfg, rec = job.config, job.records
    return {
        "precision": "int8",
        "int8_target": "tensorrt",
        "quantisation": cfg.quantisation,
        "qat": {
            "fake_quant": cfg.fake_quant,
            "method": cfg.method,
            "method_settings": job.method.settings(),
            "epochs": epochs_done,
            "lr": cfg.lr,
            "schedule": cfg.schedule,
            "n_train": rec["n_train"],
            "teacher_sha256": rec["teacher"]["sha256"],
            "student_sha256": rec["student"]["sha256"],
            "ptq_sha256": rec["ptq"]["sha256"],
        },
    }


def _checkpoint(job: _Job, epochs_done: int, staged: Path) -> None:
    """``config.yaml``, ``state.pt``, the QAT file (the checked, staged one) and its sidecar,
    ``metrics.csv``: the run directory's crash-safe order."""
    state = {
        "epoch": epochs_done,
        "graph": {k: v.detach().cpu() for k, v in job.graph.state_dict().items()},
        "optimizer": job.optimizer.state_dict(),
        "scheduler": job.scheduler.state_dict(),
        "baseline": job.baseline,
        "ptq": job.records["ptq"],
        **job.run_dir.state_record(job.metrics),
    }
    parity = dict(job.parity)

    def install() -> None:
        os.replace(staged, job.artifact)
        write_sidecar(
            sidecar_path(job.artifact),
            {
                **read_onnx_metadata(job.artifact),
                "file": job.artifact.name,
                "sha256": sha256_file(job.artifact),
                "parity": parity,
            },
        )

    job.run_dir.write_checkpoint(
        state,
        config_doc=_config_doc(job),
        save_artifact=install,
        metrics=job.metrics,
        columns=METRIC_COLUMNS,
    )


def _config_doc(job: _Job) -> dict[str, Any]:
    d = job.config.to_dict()
    d["resolved"] = {
        **job.settings,
        "device": str(job.device),
        "dataset": {
            "name": job.dataset.name,
            "root": str(job.dataset.root),
            "num_classes": job.dataset.num_classes,
            "input_shape": list(job.dataset.input_shape),
            "n_train": job.records["n_train"],
            "n_test": len(job.dataset.test),
        },
        "method_settings": job.method.settings(),
        "student": job.records["student"],
        "teacher": job.records["teacher"],
        "ptq": job.records["ptq"],
        "baseline": job.baseline,
        "advedge_version": __version__,
    }
    return d

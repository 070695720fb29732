"""What a trainer reads: the dataset's training split, the fixed held-out batch, frozen models.

Every trainer (the engine, the purifier's) trains on the training split or a stratified subset
of it (:func:`training_split`), scores a fixed stratified batch of the test split after every
epoch (:func:`held_out_batch`), and may learn from a frozen model, a distillation teacher or a
purifier's classifier (:func:`load_frozen_model`): loaded from its checkpoint, checked against
the data, never trained (no parameter gradients, eval mode), and recorded in the checkpoint
trained against it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from advedge.checkpoint import load_model, resolve_checkpoint
from advedge.data import Dataset, ImageArrays, load_dataset, stratified_subset, to_tensor
from advedge.errors import AdvedgeError, UsageError
from advedge.utils import sha256_file

__all__ = ["held_out_batch", "load_frozen_model", "load_training_data", "training_split"]


def load_training_data(data: str, dataset: Dataset | None = None) -> Dataset:
    """``dataset``, or else ``data`` loaded; either must have a training split.

    Raises:
        AdvedgeError: the dataset has no training split.
    """
    dataset = dataset if dataset is not None else load_dataset(data)
    if dataset.train is None:
        raise AdvedgeError(
            f"dataset {dataset.root} has no training split",
            "training needs train-*.npz/train.npz, CIFAR batches or a train/ folder",
        )
    return dataset


def training_split(dataset: Dataset, subset: int | None, seed: int) -> ImageArrays:
    """The training split, or a stratified sample of ``subset`` images of it (drawn by ``seed``)."""
    train = dataset.train
    assert train is not None
    if subset is not None and subset < len(train):
        train = stratified_subset(train, subset, seed=seed)
    return train


def held_out_batch(dataset: Dataset, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """The fixed held-out batch scored every epoch: a stratified sample of ``n`` test images
    (always the same: seed 0), as ``(x, y)`` tensors on ``device``."""
    test = dataset.test
    held = stratified_subset(test, min(n, len(test)), seed=0)
    return to_tensor(held.x).to(device), torch.as_tensor(held.y).to(device)


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

"""Robust-accuracy evaluation with per-example bookkeeping (results schema ``advedge.eval/1``).

Every attack runs on the examples the model classifies correctly when clean; an example counts
as robust to an attack when its adversarial version is still classified correctly. The headline
``worst_case_acc`` is the per-example worst case: the fraction of examples that are correct
clean *and* survive every attack that was run. It is never the minimum of the per-attack
accuracies, which would overstate robustness.

Results JSON (``schema: advedge.eval/1``)::

    {
      "schema": "advedge.eval/1",
      "model": {"path", "sha256", "architecture", "dataset", "method", "train_eps", ...},
      "dataset": {"name", "root", "split", "n_examples"},
      "threat_model": "Linf", "norm": "Linf", "eps": 0.0314, "n_examples": 1000,
      "clean_acc": 0.83,
      "attacks": [{"name", "kind", "settings", "robust_acc", "n_robust", "seconds"}, ...],
      "worst_case_acc": 0.41, "worst_case_attacks": ["pgd", ...],
      "environment": {...}, "seconds": 12.3, "created": "2026-11-23T22:29:00+00:00"
    }

Accuracies are fractions in [0, 1].
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from advedge.attacks import Attack
from advedge.data import Dataset, ImageArrays, to_tensor
from advedge.utils import environment

logger = logging.getLogger(__name__)

__all__ = ["SCHEMA", "EvalProgress", "evaluate", "predict"]

SCHEMA = "advedge.eval/1"


class EvalProgress:
    """Progress hooks for :func:`evaluate`; the CLI implements them. All are no-ops here."""

    def on_attack_start(self, name: str, n_todo: int) -> None:
        """Called before an attack with the number of examples it will attack."""

    def on_batch_end(self, name: str, n_done: int, running_acc: float) -> None:
        """Called after each batch with the running robust accuracy over all examples."""

    def on_attack_end(self, name: str, result: dict[str, Any]) -> None:
        """Called with the attack's entry of the results JSON."""


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_size: int = 256) -> Tensor:
    """Arg-max predictions of ``model`` on ``x``, in batches.

    Shape:
        x ``[N, C, H, W]`` -> ``[N]`` int64 on x's device.
    """
    out = [model(x[i : i + batch_size]).argmax(1) for i in range(0, x.shape[0], batch_size)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=x.device)


@dataclass
class _AttackRecord:
    robust: np.ndarray  # bool [N], True where the example survived this attack
    seconds: float


def evaluate(
    model: nn.Module,
    data: ImageArrays,
    attacks: Sequence[Attack],
    *,
    eps: float,
    norm: str = "Linf",
    n: int | None = None,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    model_info: dict[str, Any] | None = None,
    dataset_info: dict[str, Any] | None = None,
    progress: EvalProgress | None = None,
    autocast: Callable[[], Any] | None = None,
) -> dict[str, Any]:
    """Clean and robust accuracy of ``model`` on the first ``n`` examples of ``data``.

    Args:
        model: Classifier taking images in [0, 1]; it is put in eval mode.
        data: Evaluation split (the test set, in its official order).
        attacks: Attacks to run; each is built around ``model``.
        eps: Threat-model budget (recorded; the attacks carry their own).
        norm: ``Linf`` or ``L2`` (recorded).
        n: Number of examples (all when None).
        batch_size: Attack batch size.
        device: Where ``model`` lives.
        model_info: Recorded under ``"model"``.
        dataset_info: Recorded under ``"dataset"``.
        progress: Progress hooks.
        autocast: Optional autocast context factory (CUDA).

    Returns:
        The results dict (schema ``advedge.eval/1``), plus the private key ``"_per_example"``
        with the boolean flags per example (``clean`` and one per attack), which callers may
        drop before writing JSON.
    """
    progress = progress or EvalProgress()
    started = time.perf_counter()
    total = len(data) if n is None else min(int(n), len(data))
    subset = data.subset(np.arange(total))
    device = torch.device(device)
    x_all = to_tensor(subset.x).to(device)
    y_all = torch.as_tensor(subset.y, dtype=torch.long, device=device)
    ctx = autocast or _null
    model.eval()
    with ctx():
        clean = (predict(model, x_all, batch_size) == y_all).cpu().numpy()
    records: dict[str, _AttackRecord] = {}
    entries: list[dict[str, Any]] = []
    for attack in attacks:
        todo = np.flatnonzero(clean)
        robust = clean.copy()
        progress.on_attack_start(attack.name, len(todo))
        t0 = time.perf_counter()
        done = 0
        for start in range(0, len(todo), batch_size):
            idx = todo[start : start + batch_size]
            idx_t = torch.as_tensor(idx, device=device)
            xb, yb = x_all[idx_t], y_all[idx_t]
            with ctx():
                x_adv = attack(xb, yb)
                ok = (predict(model, x_adv, batch_size) == yb).cpu().numpy()
            robust[idx] = ok
            done += len(idx)
            progress.on_batch_end(attack.name, done, float(robust.mean()) if total else 0.0)
        seconds = time.perf_counter() - t0
        records[attack.name] = _AttackRecord(robust, seconds)
        entry = {
            **attack.describe(),
            "robust_acc": float(robust.mean()) if total else 0.0,
            "n_robust": int(robust.sum()),
            "n_examples": total,
            "seconds": round(seconds, 3),
        }
        entries.append(entry)
        progress.on_attack_end(attack.name, entry)
        logger.info("%s: robust accuracy %.4f", attack.name, entry["robust_acc"])

    worst = clean.copy()
    for rec in records.values():
        worst &= rec.robust
    # Which attacks the headline depends on: those that broke some example no other attack broke
    # is too fine a notion for users; record every attack that broke at least one example.
    breaking = [e["name"] for e in entries if e["n_robust"] < int(clean.sum())]
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "model": model_info or {},
        "dataset": {**(dataset_info or {}), "split": "test", "n_examples": total},
        "threat_model": norm,
        "norm": norm,
        "eps": eps,
        "n_examples": total,
        "clean_acc": float(clean.mean()) if total else 0.0,
        "attacks": entries,
        "worst_case_acc": float(worst.mean()) if total else 0.0,
        "worst_case_attacks": breaking,
        "environment": environment(),
        "seconds": round(time.perf_counter() - started, 3),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "_per_example": {"clean": clean, **{k: r.robust for k, r in records.items()}},
    }
    return result


def _null() -> Any:
    import contextlib

    return contextlib.nullcontext()


def evaluate_checkpoint(
    model_path: str | os.PathLike[str],
    data: str | os.PathLike[str] | Dataset,
    *,
    attacks: Sequence[str] = ("fgsm", "pgd", "cw"),
    eps: str | float = 8 / 255,
    norm: str = "Linf",
    steps: int = 20,
    alpha: str | float | None = None,
    restarts: int = 1,
    n: int | None = None,
    batch_size: int = 256,
    seed: int = 0,
    device: str = "auto",
    out: str | os.PathLike[str] | None = None,
    progress: EvalProgress | None = None,
) -> dict[str, Any]:
    """Load a checkpoint and a dataset, check they fit together, and :func:`evaluate`.

    The API behind ``advedge eval``. ``alpha`` defaults to ``eps / 4`` (2/255 at 8/255, the
    robust-distillation literature's PGD-20 setting). With ``out`` the results JSON is written
    atomically (without the per-example flags).

    Raises:
        UsageError: bad eps/alpha/steps/n/attack names.
        CheckpointError: missing or corrupt checkpoint.
        DataError: missing data, or data that does not fit the model (classes, shape).
    """
    from advedge.attacks import NORMS, build_attack
    from advedge.checkpoint import load_model, resolve_checkpoint
    from advedge.data import load_dataset
    from advedge.errors import DataError, UsageError
    from advedge.utils import parse_eps, resolve_device, seed_everything, sha256_file

    eps_v = parse_eps(eps, name="--eps")
    alpha_v = parse_eps(alpha, name="--alpha") if alpha is not None else eps_v / 4
    if norm not in NORMS:
        raise UsageError(f"unknown norm {norm!r}", "use Linf or L2")
    if steps < 1:
        raise UsageError(f"--steps must be >= 1, got {steps}")
    if n is not None and n < 1:
        raise UsageError(f"--n must be >= 1, got {n}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    if not attacks:
        raise UsageError("no attacks given", "e.g. --attacks fgsm,pgd,cw")
    if len(set(attacks)) != len(attacks):
        raise UsageError("an attack is named twice in --attacks")
    dev = resolve_device(device)
    path = resolve_checkpoint(model_path)
    model = load_model(path, device=dev)
    meta: dict[str, Any] = getattr(model, "checkpoint_metadata", {})
    dataset = data if isinstance(data, Dataset) else load_dataset(data)
    k_model = int(meta.get("num_classes", getattr(model, "num_classes", 0)))
    if dataset.num_classes != k_model:
        raise DataError(
            f"the model predicts {k_model} classes but {dataset.root} has {dataset.num_classes}",
            "evaluate on the dataset the model was trained on",
        )
    shape = meta.get("input_shape")
    if shape and list(shape) != list(dataset.input_shape):
        raise DataError(
            f"the model takes inputs of shape {list(shape)} but {dataset.root} has "
            f"{list(dataset.input_shape)}",
            "evaluate on the dataset the model was trained on",
        )
    seed_everything(seed)
    built = []
    for name in attacks:
        kw: dict[str, Any] = {}
        if name.strip().lower() in ("pgd", "cw"):
            kw["restarts"] = restarts
            kw["generator"] = torch.Generator(device=dev).manual_seed(seed)
        built.append(
            build_attack(name, model, eps=eps_v, norm=norm, steps=steps, alpha=alpha_v, **kw)
        )
    model_info = {
        "path": str(path),
        "sha256": sha256_file(path),
        "architecture": meta.get("architecture"),
        "num_classes": k_model,
        "dataset": meta.get("dataset"),
        "method": meta.get("method"),
        "train_eps": meta.get("eps"),
    }
    dataset_info = {"name": dataset.name, "root": str(dataset.root), "format": dataset.format}
    result = evaluate(
        model,
        dataset.test,
        built,
        eps=eps_v,
        norm=norm,
        n=n,
        batch_size=batch_size,
        device=dev,
        model_info=model_info,
        dataset_info=dataset_info,
        progress=progress,
    )
    result.pop("_per_example", None)
    if out is not None:
        write_results(out, result)
    return result


def write_results(path: str | os.PathLike[str], result: dict[str, Any]) -> None:
    """Write a results dict as JSON, atomically (no partial file on failure)."""
    import json

    from advedge.utils import atomic_write_text, to_jsonable

    clean = {k: v for k, v in result.items() if not k.startswith("_")}
    atomic_write_text(path, json.dumps(to_jsonable(clean), indent=2) + "\n")

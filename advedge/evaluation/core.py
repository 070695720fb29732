"""The attack loop: clean and robust accuracy with per-example bookkeeping.

Every attack runs on the examples the model classifies correctly when clean; an example counts
as robust to an attack when its adversarial version is still classified correctly. The headline
``worst_case_acc`` is the per-example worst case: the fraction of examples that are correct
clean *and* survive every attack that was run, never the minimum of the per-attack accuracies.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from advedge.attacks import Attack
from advedge.data import ImageArrays, to_tensor
from advedge.errors import AdvedgeError, DataError, UsageError
from advedge.evaluation.sanity import run_sanity_checks
from advedge.evaluation.state import EvalState, fingerprint
from advedge.stats import wilson_interval
from advedge.utils import autocast_context, environment

logger = logging.getLogger(__name__)

__all__ = [
    "SCHEMA",
    "EvalProgress",
    "EvalResult",
    "EvalSettings",
    "check_model_outputs",
    "evaluate",
    "non_finite_logits_error",
    "predict",
]

SCHEMA = "advedge.eval/2"

_SANITY_CHECKS = ("deterministic", "gradients", "eps_monotonic", "more_steps")


class EvalProgress:
    """Progress hooks for :func:`evaluate`; the CLI implements them. All are no-ops here."""

    def on_attack_start(self, name: str, n_todo: int) -> None:
        """Called before an attack with the number of examples it will attack."""

    def on_batch_end(self, name: str, n_done: int, running_acc: float) -> None:
        """Called after each batch with the running robust accuracy over all examples."""

    def on_attack_end(self, name: str, result: dict[str, Any]) -> None:
        """Called with the attack's entry of the results JSON."""

    def on_examples(self, name: str, idx: np.ndarray, x_adv: Tensor) -> None:
        """Called after each batch with the indices of the examples attacked (into the ``n``
        evaluated) and the adversarial images the attack returned for them, broken or not
        (``advedge bench`` keeps them as its transfer set)."""


def non_finite_logits_error(n_bad: int, n_total: int, what: str = "images") -> AdvedgeError:
    """The one-line error for a model whose logits hold NaN or infinity."""
    return AdvedgeError(
        f"the model produces non-finite logits (NaN/inf) on {n_bad} of {n_total} {what}",
        "its weights are probably NaN or inf (a diverged training run); no accuracy is "
        "reported for it",
    )


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_size: int = 256, *, what: str = "images") -> Tensor:
    """Arg-max predictions of ``model`` on ``x``, in batches.

    The arg-max of NaN logits is meaningless, so a model whose logits are not all finite is
    refused rather than scored.

    Shape:
        x ``[N, C, H, W]`` -> ``[N]`` int64 on x's device.

    Raises:
        AdvedgeError: if any image gets a NaN or infinite logit (the message counts them).
    """
    out = []
    n_bad = 0
    for i in range(0, x.shape[0], batch_size):
        logits = model(x[i : i + batch_size])
        n_bad += int((~torch.isfinite(logits)).flatten(1).any(1).sum())
        out.append(logits.argmax(1))
    if n_bad:
        raise non_finite_logits_error(n_bad, int(x.shape[0]), what)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=x.device)


@torch.no_grad()
def check_model_outputs(
    model: nn.Module, x: Tensor, num_classes: int, *, exact: bool = True, autocast: Any = None
) -> None:
    """Refuse a model whose logits on ``x`` are not ``[N, num_classes]`` or not all finite.

    Run on a first batch before any attack, so that a model with NaN weights or of another
    number of classes never gets an accuracy. With ``exact=False`` (data without class names,
    whose class count is only its largest label + 1) the model may output more classes.

    Raises:
        DataError: the model outputs another number of classes than the data has.
        AdvedgeError: some logits are NaN or infinite.
    """
    ctx = autocast or contextlib.nullcontext
    with ctx():
        logits = model(x)
    k_out = int(logits.shape[1]) if logits.ndim == 2 else -1
    if k_out < 0 or (k_out != num_classes if exact else k_out < num_classes):
        shape = tuple(logits.shape)
        raise DataError(
            f"the model outputs {k_out if k_out >= 0 else shape} classes but the data has "
            f"{num_classes}",
            "evaluate on the dataset the model was trained on",
        )
    n_bad = int((~torch.isfinite(logits)).any(1).sum())
    if n_bad:
        raise non_finite_logits_error(n_bad, int(x.shape[0]))


def _worst_case(clean: np.ndarray, not_broken: Mapping[str, np.ndarray]) -> np.ndarray:
    worst = clean.copy()
    for flags in not_broken.values():
        worst &= flags
    return worst


@dataclass(frozen=True, eq=False)
class EvalResult(Mapping[str, Any]):
    """The outcome of :func:`evaluate`: the results JSON and the per-example flags behind it.

    Reads as a mapping over :attr:`summary` (``result["worst_case_acc"]``).

    Attributes:
        summary: The results dict (schema ``advedge.eval/2``), as written to JSON.
        clean: ``[n]`` bool: each example is classified correctly when clean.
        not_broken: Per attack name, ``[n]`` bool: the attack did not break the example.
    """

    summary: dict[str, Any]
    clean: np.ndarray
    not_broken: dict[str, np.ndarray] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A copy of the results dict, ready for :func:`advedge.evaluation.write_results`."""
        return dict(self.summary)

    @property
    def per_example(self) -> dict[str, np.ndarray]:
        """``clean`` and, per attack, its "not broken" flags, in one dict."""
        return {"clean": self.clean, **self.not_broken}

    def worst_case(self) -> np.ndarray:
        """``[n]`` bool: correct when clean and unbroken by every attack."""
        return _worst_case(self.clean, self.not_broken)

    def __getitem__(self, key: str) -> Any:
        return self.summary[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.summary)

    def __len__(self) -> int:
        return len(self.summary)


@dataclass(frozen=True)
class EvalSettings:
    """How to evaluate: everything :func:`evaluate` takes besides the model, data and attacks.

    One evaluation that runs :func:`evaluate` several times (the purifier protocol) shares one of
    these. The fields are :func:`evaluate`'s keyword arguments of the same names.
    """

    eps: float
    norm: str = "Linf"
    n: int | None = None
    batch_size: int = 256
    device: str | torch.device = "cpu"
    model_info: dict[str, Any] | None = None
    dataset_info: dict[str, Any] | None = None
    progress: EvalProgress | None = None
    amp: str = "off"
    cascade: bool = False
    suite: str | None = None
    resume: bool = False
    flags_n: int = 100
    seed: int | None = None

    def run(
        self,
        model: nn.Module,
        data: ImageArrays,
        attacks: Sequence[Attack],
        *,
        state_path: str | os.PathLike[str] | None = None,
    ) -> EvalResult:
        """:func:`evaluate` ``model`` on ``data`` under ``attacks`` with these settings.

        Args:
            model: The classifier (see :func:`evaluate`).
            data: The evaluation split.
            attacks: The attacks, in order.
            state_path: Where to keep the per-example state for resuming (None: nowhere).

        Returns:
            The results and the per-example flags behind them.
        """
        started = time.perf_counter()
        run = _Evaluation(self, model, data, attacks)
        state = run.open_state(state_path)
        clean = run.clean_flags(state)
        survived = clean.copy()  # correct and unbroken by every attack so far
        not_broken: dict[str, np.ndarray] = {}
        entries: list[dict[str, Any]] = []
        for attack in attacks:
            base = survived if self.cascade else clean
            flags, entry = run.attack(attack, state, base)
            not_broken[attack.name] = flags
            if self.cascade:
                survived &= flags
            entries.append(entry)
        return EvalResult(run.summary(clean, not_broken, entries, started), clean, not_broken)


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
    amp: str = "off",
    cascade: bool = False,
    suite: str | None = None,
    state_path: str | os.PathLike[str] | None = None,
    resume: bool = False,
    flags_n: int = 100,
    seed: int | None = None,
) -> EvalResult:
    """Clean and robust accuracy of ``model`` on the first ``n`` examples of ``data``.

    Args:
        model: Classifier taking images in [0, 1]; it is put in eval mode. Adversarial examples
            are always scored on it (an attack may attack a wrapper of it, e.g. EOT).
        data: Evaluation split (the test set, in its official order).
        attacks: Attacks to run, in order.
        eps: Threat-model budget (recorded; the attacks carry their own).
        norm: ``Linf`` or ``L2`` (recorded).
        n: Number of examples (all when None).
        batch_size: Attack batch size.
        device: Where ``model`` lives.
        model_info: Recorded under ``"model"`` (its ``sha256`` enters the resume fingerprint).
        dataset_info: Recorded under ``"dataset"``.
        progress: Progress hooks.
        amp: ``off`` (fp32, the default: honest gradients), ``bf16``, ``fp16`` or ``auto``
            (autocast on CUDA; see :func:`advedge.utils.autocast_context`).
        cascade: Run each attack only on the examples every earlier attack left robust (the
            suites do); each attack's ``robust_acc`` is then the accuracy after it and all
            earlier ones. Without cascade each attack runs on every clean-correct example and
            its ``robust_acc`` is its own.
        suite: Suite name, recorded.
        state_path: Where to keep the per-example state for resuming (None: nowhere).
        resume: Continue from ``state_path``; it must have been written with the same settings.
        flags_n: Examples used by the sanity checks (0 skips the model-based checks).
        seed: The attacks' seed, recorded (and part of the resume fingerprint).

    Returns:
        The results (schema ``advedge.eval/2``, read as a mapping) with the boolean flags per
        example (``clean`` and, per attack, "not broken by it") as typed fields.

    Raises:
        UsageError: when resuming a state written with other settings.
        DataError: the model outputs another number of classes than ``data`` has.
        AdvedgeError: the model's logits are NaN or infinite on some image, clean or
            adversarial (no accuracy is computed from them).
    """
    settings = EvalSettings(
        eps=eps,
        norm=norm,
        n=n,
        batch_size=batch_size,
        device=device,
        model_info=model_info,
        dataset_info=dataset_info,
        progress=progress,
        amp=amp,
        cascade=cascade,
        suite=suite,
        resume=resume,
        flags_n=flags_n,
        seed=seed,
    )
    return settings.run(model, data, attacks, state_path=state_path)


class _Evaluation:
    """One :meth:`EvalSettings.run`: the examples as tensors and the steps of the attack loop."""

    def __init__(
        self,
        settings: EvalSettings,
        model: nn.Module,
        data: ImageArrays,
        attacks: Sequence[Attack],
    ) -> None:
        self.settings = settings
        self.progress = settings.progress or EvalProgress()
        self.total = len(data) if settings.n is None else min(int(settings.n), len(data))
        subset = data.subset(np.arange(self.total))
        self.device = torch.device(settings.device)
        self.x = to_tensor(subset.x).to(self.device)
        self.y = torch.as_tensor(subset.y, dtype=torch.long, device=self.device)
        amp = settings.amp
        self.autocast = autocast_context(self.device, amp) if amp != "off" else None
        self.ctx = self.autocast or contextlib.nullcontext
        self.model = model
        self.attacks = attacks
        model.eval()
        names = [a.name for a in attacks]
        if len(set(names)) != len(names):
            raise UsageError(f"attack names must be unique, got {names}")
        self.state_settings = self._state_settings()
        if self.total:  # before any attack, and also when resuming: a first clean batch
            check_model_outputs(
                model,
                self.x[: settings.batch_size],
                data.num_classes,
                exact=bool(data.class_names),
                autocast=self.autocast,
            )

    def _state_settings(self) -> dict[str, Any]:
        """The settings a resumed state must match (their fingerprint is saved with it)."""
        s = self.settings
        return {
            "model_sha256": (s.model_info or {}).get("sha256"),
            "dataset": (s.dataset_info or {}).get("root"),
            "n_examples": self.total,
            "eps": s.eps,
            "norm": s.norm,
            "suite": s.suite,
            "cascade": s.cascade,
            "seed": s.seed,
            "amp": s.amp,
            "attacks": [a.describe() for a in self.attacks],
        }

    def open_state(self, state_path: str | os.PathLike[str] | None) -> EvalState:
        """The per-example state, fresh or (with ``resume``) continued."""
        return EvalState.open(
            Path(state_path) if state_path is not None else None,
            fingerprint(self.state_settings),
            self.state_settings,
            self.settings.resume,
            self.total,
        )

    def clean_flags(self, state: EvalState) -> np.ndarray:
        """``[n]`` bool: correct when clean (computed once, then kept in the state)."""
        if state.data["clean"] is None:
            with self.ctx():
                clean = (predict(self.model, self.x, self.settings.batch_size) == self.y).cpu()
            state.data["clean"] = clean.numpy().astype(int).tolist()
            state.save(force=True)
        return np.asarray(state.data["clean"], dtype=bool)

    def _running_acc(self, running: np.ndarray) -> float:
        return float(running.mean()) if self.total else 0.0

    def _interval(self, mask: np.ndarray) -> list[float]:
        """The 95% Wilson interval of ``mask``'s accuracy over all ``total`` examples."""
        return list(wilson_interval(int(mask.sum()), self.total))

    def attack(
        self, attack: Attack, state: EvalState, base: np.ndarray
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Run ``attack`` on the examples of ``base`` it has not done yet.

        Args:
            attack: The attack.
            state: The per-example state (its record of ``attack`` grows batch by batch).
            base: ``[n]`` bool, the examples eligible: clean-correct, or (in a cascade) also
                unbroken by every earlier attack.

        Returns:
            ``[n]`` bool "not broken by this attack", and the attack's entry of the results.
        """
        rec = state.attack(attack.name)
        not_broken = np.ones(self.total, dtype=bool)
        not_broken[np.asarray(rec["broken"], dtype=int)] = False
        attacked = np.zeros(self.total, dtype=bool)
        attacked[np.asarray(rec["done"], dtype=int)] = True
        todo = np.flatnonzero(base & ~attacked)
        running = base & not_broken
        self.progress.on_attack_start(attack.name, int(base.sum()))
        done_count = int((base & attacked).sum())
        if done_count:
            self.progress.on_batch_end(attack.name, done_count, self._running_acc(running))
        try:
            self._attack_batches(attack, state, todo, not_broken, running, done_count)
        finally:
            # Keep every finished batch, also when interrupted (Ctrl-C) or failing.
            state.save(force=True)
        entry = self._entry(attack, rec, base, not_broken, running)
        self.progress.on_attack_end(attack.name, entry)
        # the CLI shows it in its progress line, bench in its own: not again at INFO
        logger.debug("%s: robust accuracy %.1f%%", attack.name, 100 * entry["robust_acc"])
        return not_broken, entry

    def _attack_batches(
        self,
        attack: Attack,
        state: EvalState,
        todo: np.ndarray,
        not_broken: np.ndarray,
        running: np.ndarray,
        done_count: int,
    ) -> None:
        """Attack ``todo`` in batches, marking broken examples and saving the state as it goes."""
        rec = state.attack(attack.name)
        batch_size = self.settings.batch_size
        t0 = time.perf_counter()
        for start in range(0, len(todo), batch_size):
            idx = todo[start : start + batch_size]
            idx_t = torch.as_tensor(idx, device=self.device)
            xb, yb = self.x[idx_t], self.y[idx_t]
            with self.ctx():
                x_adv = attack(xb, yb)
                preds = predict(self.model, x_adv, batch_size, what=f"{attack.name} examples")
                ok = (preds == yb).cpu().numpy()
            self.progress.on_examples(attack.name, idx, x_adv)
            not_broken[idx[~ok]] = False
            running[idx[~ok]] = False
            rec["done"].extend(int(i) for i in idx)
            rec["broken"].extend(int(i) for i in idx[~ok])
            counts = getattr(attack, "last_query_counts", None)
            if counts is not None:  # query attacks: the queries each broken example took
                rec["queries"].extend(int(q) for q in np.asarray(counts)[~ok])
            rec["seconds"] = float(rec["seconds"]) + (time.perf_counter() - t0)
            t0 = time.perf_counter()
            state.save()
            done_count += len(idx)
            self.progress.on_batch_end(attack.name, done_count, self._running_acc(running))

    def _entry(
        self,
        attack: Attack,
        rec: dict[str, Any],
        base: np.ndarray,
        not_broken: np.ndarray,
        running: np.ndarray,
    ) -> dict[str, Any]:
        """The attack's entry of the results JSON."""
        entry = {
            **attack.describe(),
            "robust_acc": self._running_acc(running),
            "robust_acc_ci95": self._interval(running),
            "n_robust": int(running.sum()),
            "n_attacked": int(base.sum()),
            "n_broken": int((~not_broken).sum()),
            "cumulative": self.settings.cascade,
            "n_examples": self.total,
            "seconds": round(float(rec["seconds"]), 3),
        }
        if rec["queries"]:
            q = np.asarray(rec["queries"], dtype=float)
            entry["queries"] = {
                "mean": float(q.mean()),
                "median": float(np.median(q)),
                "n_broken": len(q),
            }
        return entry

    def _flags(self, per_example: dict[str, np.ndarray], m: int) -> list[dict[str, Any]]:
        """The sanity flags, the model-based ones on the first ``m`` examples."""
        return run_sanity_checks(
            self.model,
            self.x[:m],
            self.y[:m],
            eps=self.settings.eps,
            norm=self.settings.norm,
            per_example=per_example,
            kinds={a.name: a.kind for a in self.attacks},
            n=self.total,
            autocast=self.autocast,
            checks=_SANITY_CHECKS if m else (),
        )

    def summary(
        self,
        clean: np.ndarray,
        not_broken: dict[str, np.ndarray],
        entries: list[dict[str, Any]],
        started: float,
    ) -> dict[str, Any]:
        """The results dict (schema ``advedge.eval/2``); runs the sanity checks first."""
        s, total = self.settings, self.total
        m = min(s.flags_n, total)
        flags = self._flags({"clean": clean, **not_broken}, m)
        elapsed = time.perf_counter() - started  # the sanity checks count too
        attack_seconds = sum(e["seconds"] for e in entries)
        return {
            "schema": SCHEMA,
            "model": s.model_info or {},
            "dataset": {**(s.dataset_info or {}), "split": "test", "n_examples": total},
            "threat_model": s.norm,
            "norm": s.norm,
            "eps": s.eps,
            "n_examples": total,
            "suite": s.suite,
            "cascade": s.cascade,
            "seed": s.seed,
            "clean_acc": self._running_acc(clean),
            "clean_acc_ci95": self._interval(clean),
            "attacks": entries,
            "worst_case_acc": self._running_acc(_worst_case(clean, not_broken)),
            "worst_case_acc_ci95": self._interval(_worst_case(clean, not_broken)),
            "worst_case_attacks": [e["name"] for e in entries if e["n_broken"] > 0],
            "flags": flags,
            "flags_triggered": [f["name"] for f in flags if f["triggered"]],
            "flags_n_examples": m,
            "environment": environment(),
            "seconds": round(elapsed, 3),
            "attack_seconds_per_100": round(100 * attack_seconds / total, 3) if total else None,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }

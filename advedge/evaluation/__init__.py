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

import contextlib
import datetime as _dt
import functools
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from advedge.attacks import Attack
from advedge.data import Dataset, ImageArrays, to_tensor
from advedge.errors import AdvedgeError, DataError, UsageError, did_you_mean
from advedge.training.engine import autocast_context
from advedge.utils import atomic_write_text, environment, to_jsonable

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


SUITES = ("standard", "rand", "quick")


def build_suite(
    suite: str,
    model: nn.Module,
    *,
    eps: float,
    norm: str = "Linf",
    steps: int = 20,
    alpha: float | None = None,
    n_queries: int = 5000,
    n_iter: int = 100,
    eot_samples: int = 20,
    seed: int = 0,
) -> list[Attack]:
    """The attacks of an evaluation suite, in the order they run.

    * ``standard`` (AutoAttack-style, Croce & Hein 2020): APGD-CE, APGD-T (targeted DLR over the
      top-9 classes), then the Square query attack, each on the examples still robust.
    * ``rand`` (for randomised defenses): APGD-CE and APGD-DLR on the model wrapped in EOT over
      ``eot_samples`` draws.
    * ``quick``: PGD-``steps`` and CW-inf (PGD on the margin loss).

    Targeted/DLR attacks need at least 4/3 classes; with fewer they are left out (logged).

    Raises:
        UsageError: for an unknown suite name.
    """
    from advedge.attacks import APGD, APGDT, CW, EOT, PGD, Square

    if suite not in SUITES:
        raise UsageError(f"unknown suite {suite!r}", did_you_mean(suite, SUITES))
    k = int(getattr(model, "num_classes", 10))
    step = alpha if alpha is not None else eps / 4

    def gen() -> torch.Generator:
        dev = next((p.device for p in model.parameters()), torch.device("cpu"))
        return torch.Generator(device=dev).manual_seed(seed)

    if suite == "quick":
        return [
            PGD(model, eps=eps, alpha=step, steps=steps, norm=norm, generator=gen()),
            CW(model, eps=eps, alpha=step, steps=steps, norm=norm, generator=gen()),
        ]
    if suite == "standard":
        attacks: list[Attack] = [
            APGD(model, eps=eps, norm=norm, loss="ce", n_iter=n_iter, seed=seed)
        ]
        if k >= 4:
            attacks.append(
                APGDT(
                    model,
                    eps=eps,
                    norm=norm,
                    n_iter=n_iter,
                    n_target_classes=min(9, k - 1),
                    seed=seed,
                )
            )
        else:
            logger.warning("APGD-T left out: it needs at least 4 classes, the model has %d", k)
        attacks.append(Square(model, eps=eps, norm=norm, n_queries=n_queries, seed=seed))
        return attacks
    noisy = EOT(model, eot_samples)
    attacks = [APGD(noisy, eps=eps, norm=norm, loss="ce", n_iter=n_iter, seed=seed)]
    if k >= 3:
        attacks.append(APGD(noisy, eps=eps, norm=norm, loss="dlr", n_iter=n_iter, seed=seed))
    for a in attacks:
        a.name = f"{a.name}-eot"
    return attacks


def _fingerprint(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(to_jsonable(payload), sort_keys=True).encode()).hexdigest()


def _state_problem(data: Any, total: int) -> str | None:
    """What is wrong with a resumed evaluation state (an edited or foreign file), or None.

    Checks the schema, the per-example clean flags (``total`` of them, 0 or 1) and, for every
    attack, its index lists (``done`` and ``broken``, within ``[0, total)``, ``broken`` a subset
    of ``done``), query counts (non-negative integers) and seconds (a finite number >= 0).
    """

    def indices(v: Any) -> bool:
        return isinstance(v, list) and all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < total for i in v
        )

    if not isinstance(data, dict) or data.get("schema") != "advedge.eval-state/1":
        return "not an advedge.eval-state/1 document"
    clean = data.get("clean")
    if clean is not None and not (
        isinstance(clean, list) and len(clean) == total and all(c in (0, 1) for c in clean)
    ):
        return f"'clean' must hold {total} flags of 0 or 1"
    attacks = data.get("attacks")
    if not isinstance(attacks, dict):
        return "'attacks' must be a mapping"
    for name, rec in attacks.items():
        if not isinstance(rec, dict):
            return f"attack {name!r} is not a mapping"
        if not indices(rec.get("done")) or not indices(rec.get("broken")):
            return f"attack {name!r}: 'done' and 'broken' must list example indices below {total}"
        if not set(rec["broken"]) <= set(rec["done"]):
            return f"attack {name!r}: an example is broken but not done"
        queries = rec.get("queries")
        if not isinstance(queries, list) or not all(
            isinstance(q, int) and not isinstance(q, bool) and q >= 0 for q in queries
        ):
            return f"attack {name!r}: 'queries' must list non-negative integers"
        seconds = rec.get("seconds")
        if (
            isinstance(seconds, bool)
            or not isinstance(seconds, (int, float))
            or not math.isfinite(seconds)
            or seconds < 0
        ):
            return f"attack {name!r}: 'seconds' must be a finite number >= 0"
    return None


class _State:
    """Per-example evaluation state on disk, so a long evaluation can resume.

    JSON with the settings' fingerprint, the clean flags and, per attack, the indices it has
    processed and those it broke. Saved atomically after each batch (at most every few seconds).
    """

    def __init__(self, path: Path | None, fingerprint: str, settings: dict[str, Any]) -> None:
        self.path = path
        self.data: dict[str, Any] = {
            "schema": "advedge.eval-state/1",
            "fingerprint": fingerprint,
            "settings": settings,
            "clean": None,
            "attacks": {},
        }
        self._last_save = 0.0

    @classmethod
    def open(
        cls,
        path: Path | None,
        fingerprint: str,
        settings: dict[str, Any],
        resume: bool,
        total: int,
    ) -> _State:
        state = cls(path, fingerprint, settings)
        if path is None or not path.exists():
            if resume:
                logger.info("no evaluation state at %s; starting from the beginning", path)
            return state
        if not resume:
            logger.warning(
                "overwriting the evaluation state in %s (pass --resume to continue it)", path
            )
            return state
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise UsageError(
                f"cannot resume: {path} is unreadable ({exc})", "delete it to start over"
            ) from None
        if old.get("fingerprint") != fingerprint:
            prev = old.get("settings", {})
            diff = sorted(
                k for k in set(prev) | set(settings) if prev.get(k) != to_jsonable(settings.get(k))
            )
            raise UsageError(
                f"cannot resume the evaluation in {path}: settings differ ({', '.join(diff) or 'unknown'})",
                "use the same settings, or drop --resume to start over",
            )
        problem = _state_problem(old, total)
        if problem:
            raise UsageError(
                f"cannot resume: {path} is not a valid evaluation state ({problem})",
                "delete it to start over",
            )
        state.data = old
        logger.info("resuming the evaluation state in %s", path)
        return state

    def attack(self, name: str) -> dict[str, Any]:
        return self.data["attacks"].setdefault(
            name, {"done": [], "broken": [], "queries": [], "seconds": 0.0}
        )

    def save(self, *, force: bool = False) -> None:
        if self.path is None:
            return
        now = time.perf_counter()
        if force or now - self._last_save > 5.0:
            atomic_write_text(self.path, json.dumps(to_jsonable(self.data)) + "\n")
            self._last_save = now


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
) -> dict[str, Any]:
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
            (autocast on CUDA; see :func:`advedge.training.engine.autocast_context`).
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
        The results dict (schema ``advedge.eval/1``), plus the private key ``"_per_example"``
        with the boolean flags per example (``clean`` and, per attack, "not broken by it").

    Raises:
        UsageError: when resuming a state written with other settings.
        DataError: the model outputs another number of classes than ``data`` has.
        AdvedgeError: the model's logits are NaN or infinite on some image, clean or
            adversarial (no accuracy is computed from them).
    """
    from advedge.evaluation.sanity import run_sanity_checks

    progress = progress or EvalProgress()
    started = time.perf_counter()
    total = len(data) if n is None else min(int(n), len(data))
    subset = data.subset(np.arange(total))
    device = torch.device(device)
    x_all = to_tensor(subset.x).to(device)
    y_all = torch.as_tensor(subset.y, dtype=torch.long, device=device)
    autocast = autocast_context(device, amp) if amp != "off" else None
    ctx = autocast or contextlib.nullcontext
    model.eval()
    names = [a.name for a in attacks]
    if len(set(names)) != len(names):
        raise UsageError(f"attack names must be unique, got {names}")
    settings = {
        "model_sha256": (model_info or {}).get("sha256"),
        "dataset": (dataset_info or {}).get("root"),
        "n_examples": total,
        "eps": eps,
        "norm": norm,
        "suite": suite,
        "cascade": cascade,
        "seed": seed,
        "amp": amp,
        "attacks": [a.describe() for a in attacks],
    }
    if total:  # before any attack, and also when resuming: a first clean batch
        check_model_outputs(
            model,
            x_all[:batch_size],
            data.num_classes,
            exact=bool(data.class_names),
            autocast=autocast,
        )
    state = _State.open(
        Path(state_path) if state_path is not None else None,
        _fingerprint(settings),
        settings,
        resume,
        total,
    )
    if state.data["clean"] is None:
        with ctx():
            clean = (predict(model, x_all, batch_size) == y_all).cpu().numpy()
        state.data["clean"] = clean.astype(int).tolist()
        state.save(force=True)
    clean = np.asarray(state.data["clean"], dtype=bool)

    survived = clean.copy()  # correct and unbroken by every attack so far
    per_attack: dict[str, np.ndarray] = {}
    entries: list[dict[str, Any]] = []
    for attack in attacks:
        rec = state.attack(attack.name)
        not_broken = np.ones(total, dtype=bool)
        not_broken[np.asarray(rec["broken"], dtype=int)] = False
        eligible = (survived if cascade else clean).copy()
        attacked = np.zeros(total, dtype=bool)
        attacked[np.asarray(rec["done"], dtype=int)] = True
        todo = np.flatnonzero(eligible & ~attacked)
        running = (survived if cascade else clean) & not_broken
        progress.on_attack_start(attack.name, int((eligible).sum()))
        done_count = int((eligible & attacked).sum())
        if done_count:
            progress.on_batch_end(attack.name, done_count, float(running.mean()) if total else 0.0)
        t0 = time.perf_counter()
        try:
            for start in range(0, len(todo), batch_size):
                idx = todo[start : start + batch_size]
                idx_t = torch.as_tensor(idx, device=device)
                xb, yb = x_all[idx_t], y_all[idx_t]
                with ctx():
                    x_adv = attack(xb, yb)
                    preds = predict(model, x_adv, batch_size, what=f"{attack.name} examples")
                    ok = (preds == yb).cpu().numpy()
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
                progress.on_batch_end(
                    attack.name, done_count, float(running.mean()) if total else 0.0
                )
        finally:
            # Keep every finished batch, also when interrupted (Ctrl-C) or failing.
            state.save(force=True)
        per_attack[attack.name] = not_broken
        if cascade:
            survived &= not_broken
        entry = {
            **attack.describe(),
            "robust_acc": float(running.mean()) if total else 0.0,
            "n_robust": int(running.sum()),
            "n_attacked": int(eligible.sum()),
            "n_broken": int((~not_broken).sum()),
            "cumulative": cascade,
            "n_examples": total,
            "seconds": round(float(rec["seconds"]), 3),
        }
        if rec["queries"]:
            q = np.asarray(rec["queries"], dtype=float)
            entry["queries"] = {
                "mean": float(q.mean()),
                "median": float(np.median(q)),
                "n_broken": len(q),
            }
        entries.append(entry)
        progress.on_attack_end(attack.name, entry)
        logger.info("%s: robust accuracy %.4f", attack.name, entry["robust_acc"])

    worst = clean.copy()
    for flags_ in per_attack.values():
        worst &= flags_
    breaking = [e["name"] for e in entries if e["n_broken"] > 0]
    per_example = {"clean": clean, **per_attack}
    kinds = {a.name: a.kind for a in attacks}
    m = min(flags_n, total)
    flags = run_sanity_checks(
        model,
        x_all[:m],
        y_all[:m],
        eps=eps,
        norm=norm,
        per_example=per_example,
        kinds=kinds,
        n=total,
        autocast=autocast,
        checks=("deterministic", "gradients", "eps_monotonic", "more_steps") if m else (),
    )
    seconds = time.perf_counter() - started
    attack_seconds = sum(e["seconds"] for e in entries)
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "model": model_info or {},
        "dataset": {**(dataset_info or {}), "split": "test", "n_examples": total},
        "threat_model": norm,
        "norm": norm,
        "eps": eps,
        "n_examples": total,
        "suite": suite,
        "cascade": cascade,
        "seed": seed,
        "clean_acc": float(clean.mean()) if total else 0.0,
        "attacks": entries,
        "worst_case_acc": float(worst.mean()) if total else 0.0,
        "worst_case_attacks": breaking,
        "flags": flags,
        "flags_triggered": [f["name"] for f in flags if f["triggered"]],
        "flags_n_examples": m,
        "environment": environment(),
        "seconds": round(seconds, 3),
        "attack_seconds_per_100": round(100 * attack_seconds / total, 3) if total else None,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "_per_example": per_example,
    }
    return result


DEFAULT_ATTACKS = ("fgsm", "pgd", "cw", "mifgsm")


def check_eval_options(
    *,
    attacks: Sequence[str] | None,
    suite: str | None,
    eps: str | float,
    alpha: str | float | None,
    norm: str,
    steps: int,
    n: int | None,
    batch_size: int,
    n_queries: int,
    flags_n: int,
    resume: bool,
    out: str | os.PathLike[str] | None,
    amp: str,
) -> tuple[float, float]:
    """Validate ``advedge eval``'s options before any data or model is loaded.

    Returns:
        ``(eps, alpha)`` parsed; alpha defaults to ``eps / 4``.

    Raises:
        UsageError: for the first bad option, with a hint.
    """
    from advedge.attacks import ATTACKS, NORMS
    from advedge.utils import parse_eps

    eps_v = parse_eps(eps, name="--eps")
    alpha_v = parse_eps(alpha, name="--alpha") if alpha is not None else eps_v / 4
    if norm not in NORMS:
        raise UsageError(f"unknown norm {norm!r}", "use Linf or L2")
    checks = [
        (steps >= 1, f"--steps must be >= 1, got {steps}"),
        (n is None or n >= 1, f"--n must be >= 1, got {n}"),
        (batch_size >= 1, f"--batch-size must be >= 1, got {batch_size}"),
        (n_queries >= 1, f"--n-queries must be >= 1, got {n_queries}"),
        (flags_n >= 0, f"--flags-n must be >= 0, got {flags_n}"),
        (not (attacks and suite), "give either --attacks or --suite, not both"),
        (attacks is None or len(attacks) > 0, "no attacks given (e.g. --attacks fgsm,pgd,cw)"),
        (attacks is None or len(set(attacks)) == len(attacks), "an attack is named twice"),
        (not resume or out is not None, "--resume needs --out (the state is kept beside it)"),
        (
            amp in ("off", "bf16", "fp16", "auto"),
            f"--amp must be off, bf16, fp16 or auto, got {amp!r}",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    if suite is not None and suite not in SUITES:
        raise UsageError(f"unknown suite {suite!r}", did_you_mean(suite, SUITES))
    for name in attacks or ():
        key = name.strip().lower()
        if key not in ATTACKS:
            raise UsageError(f"unknown attack {name!r}", did_you_mean(key, ATTACKS))
    if out is not None and Path(out).is_dir():
        raise UsageError(f"--out {out} is a directory", "give a file name such as results.json")
    if out is not None:
        from advedge.outputs import check_out_file

        check_out_file(out)  # under a file, or unwritable: refused before any attack runs
    return eps_v, alpha_v


def _holds_out_lock(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``fn`` under the output lock of its keyword argument ``out`` (when given)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from advedge.locks import output_lock

        out = kwargs.get("out")
        with output_lock(out) if out is not None else contextlib.nullcontext():
            return fn(*args, **kwargs)

    return wrapper


@_holds_out_lock
def evaluate_checkpoint(
    model_path: str | os.PathLike[str],
    data: str | os.PathLike[str] | Dataset,
    *,
    attacks: Sequence[str] | None = None,
    suite: str | None = None,
    eps: str | float = 8 / 255,
    norm: str = "Linf",
    steps: int = 20,
    alpha: str | float | None = None,
    restarts: int = 1,
    n_queries: int = 5000,
    n: int | None = None,
    batch_size: int = 256,
    seed: int = 0,
    device: str = "auto",
    amp: str = "off",
    out: str | os.PathLike[str] | None = None,
    resume: bool = False,
    flags_n: int = 100,
    progress: EvalProgress | None = None,
    purifier: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Load a checkpoint and a dataset, check they fit together, and :func:`evaluate`.

    The API behind ``advedge eval``. Give either ``attacks`` (names from
    :data:`advedge.attacks.ATTACKS`, each run on every clean-correct example) or ``suite``
    (``standard``, ``rand``, ``quick``: see :func:`build_suite`; attacks cascade). With neither,
    FGSM, PGD, CW and MI-FGSM run. ``alpha`` defaults to ``eps / 4`` (2/255 at 8/255, the
    robust-distillation literature's PGD-20 setting).

    With ``out``, the results JSON is written there atomically, and the per-example state that
    ``resume`` continues from is kept beside it as ``<out>.state.json``.

    With ``purifier`` (a purifier run directory or ``purifier.safetensors``), the defended model
    ``f(G(x))`` is evaluated under the purifier protocol: grey-box, adaptive white-box, BPDA and
    (for a random purifier) EOT; see :func:`advedge.purifier.evaluate.evaluate_purified`.

    With ``out``, the evaluation holds the output lock of ``out`` (one writer of the results and
    of the resumable state beside them).

    Raises:
        OutputLockedError: another process is writing ``out``.
        UsageError: bad eps/alpha/steps/n/attack or suite names, ``resume`` without ``out``,
            resuming with other settings.
        CheckpointError: missing or corrupt checkpoint.
        DataError: missing data, or data that does not fit the model (classes, shape, images
            smaller than the architecture accepts).
        AdvedgeError: the model's logits are NaN or infinite (see :func:`evaluate`).
    """
    from advedge.checkpoint import load_model, resolve_checkpoint
    from advedge.data import load_dataset
    from advedge.models.registry import min_input_size
    from advedge.utils import resolve_device, seed_everything, sha256_file

    eps_v, alpha_v = check_eval_options(
        attacks=attacks,
        suite=suite,
        eps=eps,
        alpha=alpha,
        norm=norm,
        steps=steps,
        n=n,
        batch_size=batch_size,
        n_queries=n_queries,
        flags_n=flags_n,
        resume=resume,
        out=out,
        amp=amp,
    )
    dev = resolve_device(device)
    path = resolve_checkpoint(model_path)
    model = load_model(path, device=dev)
    meta: dict[str, Any] = getattr(model, "checkpoint_metadata", {})
    k_model = int(meta.get("num_classes", getattr(model, "num_classes", 0)))
    names = [a.strip().lower() for a in (attacks or DEFAULT_ATTACKS)] if suite is None else []
    for name, needed in (("apgd-t", 4), ("apgd-dlr", 3)):
        if name in names and k_model < needed:
            raise UsageError(
                f"{name} needs at least {needed} classes; the model has {k_model}",
                "use apgd-ce, pgd or square",
            )
    dataset = data if isinstance(data, Dataset) else load_dataset(data)
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
    height, width = dataset.test.image_size
    side = min_input_size(model)
    if side is not None and (height < side or width < side):
        raise DataError(
            f"the images of {dataset.root} are {height}x{width} but "
            f"{meta.get('architecture')} needs at least {side}x{side}",
            "evaluate on the dataset the model was trained on",
        )
    # Before any attack, for the purifier protocol as well: NaN weights, another head.
    first = to_tensor(dataset.test.x[:batch_size]).to(dev)
    check_model_outputs(model, first, dataset.num_classes)
    seed_everything(seed)

    def build(target: nn.Module) -> list[Attack]:
        return _build_attacks(
            target,
            suite=suite,
            names=names,
            eps=eps_v,
            norm=norm,
            steps=steps,
            alpha=alpha_v,
            restarts=restarts,
            n_queries=n_queries,
            seed=seed,
            device=dev,
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
    if purifier is not None:
        from advedge.purifier.evaluate import evaluate_purified

        result = evaluate_purified(
            model,
            purifier,
            dataset,
            build,
            eps=eps_v,
            norm=norm,
            steps=steps,
            n=n,
            batch_size=batch_size,
            device=dev,
            model_info=model_info,
            dataset_info=dataset_info,
            progress=progress,
            amp=amp,
            seed=seed,
            suite=suite,
            out=out,
            resume=resume,
            flags_n=flags_n,
        )
        if out is not None:
            write_results(out, result)
        return result
    result = evaluate(
        model,
        dataset.test,
        build(model),
        eps=eps_v,
        norm=norm,
        n=n,
        batch_size=batch_size,
        device=dev,
        model_info=model_info,
        dataset_info=dataset_info,
        progress=progress,
        amp=amp,
        seed=seed,
        cascade=suite is not None,
        suite=suite,
        state_path=None if out is None else Path(f"{out}.state.json"),
        resume=resume,
        flags_n=flags_n,
    )
    result["amp"] = amp
    result.pop("_per_example", None)
    if out is not None:
        write_results(out, result)
    return result


def _build_attacks(
    target: nn.Module,
    *,
    suite: str | None,
    names: Sequence[str],
    eps: float,
    norm: str,
    steps: int,
    alpha: float | None,
    restarts: int,
    n_queries: int,
    seed: int,
    device: torch.device,
) -> list[Attack]:
    """The attacks of ``suite``, or the named ones, against ``target``."""
    from advedge.attacks import build_attack

    if suite is not None:
        return build_suite(
            suite,
            target,
            eps=eps,
            norm=norm,
            steps=steps,
            alpha=alpha,
            n_queries=n_queries,
            seed=seed,
        )
    built = []
    for name in names:
        # PGD/CW take the eps/4 step and restarts; MI-FGSM keeps its own eps/steps rule.
        pgd_like = name in ("pgd", "cw")
        built.append(
            build_attack(
                name,
                target,
                eps=eps,
                norm=norm,
                steps=steps,
                alpha=alpha if pgd_like else None,
                restarts=restarts if pgd_like else None,
                seed=seed,
                n_queries=n_queries,
                generator=torch.Generator(device=device).manual_seed(seed) if pgd_like else None,
            )
        )
    return built


def write_results(path: str | os.PathLike[str], result: dict[str, Any]) -> None:
    """Write a results dict as JSON, atomically (no partial file on failure)."""
    clean = {k: v for k, v in result.items() if not k.startswith("_")}
    atomic_write_text(path, json.dumps(to_jsonable(clean), indent=2) + "\n")

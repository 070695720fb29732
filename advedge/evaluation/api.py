"""The loader-level API behind ``advedge eval``: a checkpoint and a dataset in, results JSON out."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from advedge.data import Dataset, to_tensor
from advedge.errors import DataError, UsageError, did_you_mean
from advedge.evaluation.core import EvalProgress, EvalSettings, check_model_outputs
from advedge.evaluation.suites import DEFAULT_ATTACKS, SUITES, AttackSettings
from advedge.utils import atomic_write_text, to_jsonable

__all__ = ["EvalOptions", "check_eval_options", "evaluate_checkpoint", "write_results"]

AMP_MODES = ("off", "bf16", "fp16", "auto")


@dataclass(frozen=True)
class EvalOptions:
    """``advedge eval``'s options as given: what :func:`evaluate_checkpoint` takes by keyword.

    Attributes:
        attacks: Attack names from :data:`advedge.attacks.ATTACKS` (None: the default four).
        suite: A suite name (``standard``, ``rand``, ``quick``) instead of ``attacks``.
        eps: The budget, a number or a fraction string such as ``"8/255"``.
        norm: ``Linf`` or ``L2``.
        steps: PGD/CW steps.
        alpha: PGD/CW step size (``eps / 4`` when None).
        restarts: PGD/CW random restarts.
        n_queries: The query budget of query attacks.
        n: Number of test examples (all when None).
        batch_size: Attack batch size.
        seed: The attacks' seed.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        amp: ``off``, ``bf16``, ``fp16`` or ``auto``.
        out: The results JSON file (None: not written).
        resume: Continue the per-example state kept beside ``out``.
        flags_n: Examples used by the sanity checks (0 skips the model-based checks).
    """

    attacks: Sequence[str] | None = None
    suite: str | None = None
    eps: str | float = 8 / 255
    norm: str = "Linf"
    steps: int = 20
    alpha: str | float | None = None
    restarts: int = 1
    n_queries: int = 5000
    n: int | None = None
    batch_size: int = 256
    seed: int = 0
    device: str = "auto"
    amp: str = "off"
    out: str | os.PathLike[str] | None = None
    resume: bool = False
    flags_n: int = 100

    def validate(self) -> tuple[float, float]:
        """Check the options before any data or model is loaded.

        Returns:
            ``(eps, alpha)`` parsed; alpha defaults to ``eps / 4``.

        Raises:
            UsageError: for the first bad option, with a hint.
        """
        from advedge.attacks import NORMS
        from advedge.utils import parse_eps

        eps = parse_eps(self.eps, name="--eps")
        alpha = parse_eps(self.alpha, name="--alpha") if self.alpha is not None else eps / 4
        if self.norm not in NORMS:
            raise UsageError(f"unknown norm {self.norm!r}", "use Linf or L2")
        for ok, message in self._checks():
            if not ok:
                raise UsageError(message)
        if self.suite is not None and self.suite not in SUITES:
            raise UsageError(f"unknown suite {self.suite!r}", did_you_mean(self.suite, SUITES))
        self._check_attack_names()
        self._check_out()
        return eps, alpha

    def _checks(self) -> list[tuple[bool, str]]:
        """(holds, message when it does not) for each simple rule, in the order they are told."""
        attacks, n = self.attacks, self.n
        return [
            (self.steps >= 1, f"--steps must be >= 1, got {self.steps}"),
            (n is None or n >= 1, f"--n must be >= 1, got {n}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.n_queries >= 1, f"--n-queries must be >= 1, got {self.n_queries}"),
            (self.flags_n >= 0, f"--flags-n must be >= 0, got {self.flags_n}"),
            (not (attacks and self.suite), "give either --attacks or --suite, not both"),
            (attacks is None or len(attacks) > 0, "no attacks given (e.g. --attacks fgsm,pgd,cw)"),
            (attacks is None or len(set(attacks)) == len(attacks), "an attack is named twice"),
            (
                not self.resume or self.out is not None,
                "--resume needs --out (the state is kept beside it)",
            ),
            (self.amp in AMP_MODES, f"--amp must be off, bf16, fp16 or auto, got {self.amp!r}"),
        ]

    def _check_attack_names(self) -> None:
        from advedge.attacks import ATTACKS

        for name in self.attacks or ():
            key = name.strip().lower()
            if key not in ATTACKS:
                raise UsageError(f"unknown attack {name!r}", did_you_mean(key, ATTACKS))

    def _check_out(self) -> None:
        out = self.out
        if out is not None and Path(out).is_dir():
            raise UsageError(f"--out {out} is a directory", "give a file name such as results.json")
        if out is not None:
            from advedge.outputs import check_out_file

            check_out_file(out)  # under a file, or unwritable: refused before any attack runs

    def attack_settings(self, eps: float, alpha: float) -> AttackSettings:
        """The attacks these options ask for, with ``eps`` and ``alpha`` parsed."""
        names = self.attacks or DEFAULT_ATTACKS
        return AttackSettings(
            eps=eps,
            norm=self.norm,
            steps=self.steps,
            alpha=alpha,
            restarts=self.restarts,
            n_queries=self.n_queries,
            seed=self.seed,
            suite=self.suite,
            names=tuple(a.strip().lower() for a in names) if self.suite is None else (),
        )

    def eval_settings(
        self,
        eps: float,
        device: Any,
        model_info: dict[str, Any],
        dataset: Dataset,
        progress: EvalProgress | None,
    ) -> EvalSettings:
        """How to evaluate on ``dataset`` (a suite cascades), with ``eps`` parsed.

        Args:
            eps: The parsed budget.
            device: The ``torch.device`` the model lives on.
            model_info: The model's record for the results.
            dataset: The dataset (recorded).
            progress: Progress hooks.
        """
        return EvalSettings(
            eps=eps,
            norm=self.norm,
            n=self.n,
            batch_size=self.batch_size,
            device=device,
            model_info=model_info,
            dataset_info={
                "name": dataset.name,
                "root": str(dataset.root),
                "format": dataset.format,
            },
            progress=progress,
            amp=self.amp,
            cascade=self.suite is not None,
            suite=self.suite,
            resume=self.resume,
            flags_n=self.flags_n,
            seed=self.seed,
        )


def _takes_eval_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Show the fields of :class:`EvalOptions` as keyword parameters in ``fn``'s signature.

    ``fn`` takes them as ``**options``; the signature names them for ``help()`` and for callers
    that pick their keywords from it (as the CLI does).
    """
    sig = inspect.signature(fn)
    keep = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    fields = [
        inspect.Parameter(
            f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type
        )
        for f in dataclasses.fields(EvalOptions)
    ]
    fn.__signature__ = sig.replace(parameters=[*keep, *fields])  # type: ignore[attr-defined]
    return fn


@_takes_eval_options
def check_eval_options(**options: Any) -> tuple[float, float]:
    """Validate ``advedge eval``'s options before any data or model is loaded.

    Args:
        **options: Fields of :class:`EvalOptions` (``attacks``, ``suite``, ``eps``, ``alpha``,
            ``norm``, ``steps``, ``n``, ``batch_size``, ``n_queries``, ``flags_n``, ``resume``,
            ``out``, ``amp``, ...).

    Returns:
        ``(eps, alpha)`` parsed; alpha defaults to ``eps / 4``.

    Raises:
        UsageError: for the first bad option, with a hint.
    """
    return EvalOptions(**options).validate()


def _holds_out_lock(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``fn`` under the output lock of the ``out`` it is given (when given).

    ``out`` is read from the keyword arguments, or from an :class:`EvalOptions` among them.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from advedge.locks import output_lock

        options = kwargs.get("options")
        out = kwargs.get("out", None if options is None else options.out)
        with output_lock(out) if out is not None else contextlib.nullcontext():
            return fn(*args, **kwargs)

    return wrapper


@_holds_out_lock
@_takes_eval_options
def evaluate_checkpoint(
    model_path: str | os.PathLike[str],
    data: str | os.PathLike[str] | Dataset,
    *,
    options: EvalOptions | None = None,
    progress: EvalProgress | None = None,
    purifier: str | os.PathLike[str] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Load a checkpoint and a dataset, check they fit together, and evaluate.

    The API behind ``advedge eval``. The options are an :class:`EvalOptions`, or its fields as
    keyword arguments (``evaluate_checkpoint(path, data, attacks=["pgd"], eps="8/255")``), which
    override those of ``options``. Give either ``attacks`` (names from
    :data:`advedge.attacks.ATTACKS`, each run on every clean-correct example) or ``suite``
    (``standard``, ``rand``, ``quick``: see :func:`advedge.evaluation.build_suite`; attacks
    cascade). With neither, FGSM, PGD, CW and MI-FGSM run. ``alpha`` defaults to ``eps / 4``
    (2/255 at 8/255, the robust-distillation literature's PGD-20 setting).

    With ``out``, the results JSON is written there atomically, and the per-example state that
    ``resume`` continues from is kept beside it as ``<out>.state.json``. The evaluation then
    holds the output lock of ``out`` (one writer of the results and of the state beside them).

    With ``purifier`` (a purifier run directory or ``purifier.safetensors``), the defended model
    ``f(G(x))`` is evaluated under the purifier protocol: grey-box, adaptive white-box, BPDA and
    (for a random purifier) EOT; see :func:`advedge.purifier.evaluate.evaluate_purified`.

    Args:
        model_path: A run directory or ``model.safetensors``.
        data: A dataset directory or name, or a loaded :class:`~advedge.data.Dataset`.
        options: The options (defaults when None).
        progress: Progress hooks.
        purifier: A purifier in front of the model.
        **overrides: Fields of :class:`EvalOptions`.

    Returns:
        The results dict (schema ``advedge.eval/2``), as written to ``out``.

    Raises:
        TypeError: an unknown option name.
        OutputLockedError: another process is writing ``out``.
        UsageError: bad eps/alpha/steps/n/attack or suite names, ``resume`` without ``out``,
            resuming with other settings.
        CheckpointError: missing or corrupt checkpoint.
        DataError: missing data, or data that does not fit the model (classes, shape, images
            smaller than the architecture accepts).
        AdvedgeError: the model's logits are NaN or infinite (see
            :func:`advedge.evaluation.evaluate`).
    """
    from advedge.utils import resolve_device, seed_everything

    opts = dataclasses.replace(options or EvalOptions(), **overrides)
    eps, alpha = opts.validate()
    device = resolve_device(opts.device)
    model, model_info = _load_model(model_path, device)
    attacks = opts.attack_settings(eps, alpha)
    _check_attacks_fit(attacks, model_info["num_classes"])
    dataset = _load_fitting_data(data, model, model_info["num_classes"], opts.batch_size, device)
    seed_everything(opts.seed)
    settings = opts.eval_settings(eps, device, model_info, dataset, progress)
    if purifier is not None:
        # Imported here: purifier.evaluate imports evaluation.core, so a module-level import
        # would run this package's __init__ in the middle of importing purifier.evaluate.
        from advedge.purifier.evaluate import evaluate_purified

        result = evaluate_purified(model, purifier, dataset, attacks, settings, out=opts.out)
    else:
        state_path = None if opts.out is None else Path(f"{opts.out}.state.json")
        run = settings.run(model, dataset.test, attacks.build(model, device), state_path=state_path)
        result = {**run.to_json(), "amp": opts.amp}
    if opts.out is not None:
        write_results(opts.out, result)
    return result


def _load_model(path: str | os.PathLike[str], device: Any) -> tuple[nn.Module, dict[str, Any]]:
    """The classifier at ``path`` on ``device``, and its record for the results' ``model``."""
    from advedge.checkpoint import load_model, resolve_checkpoint
    from advedge.utils import sha256_file

    resolved = resolve_checkpoint(path)
    model = load_model(resolved, device=device)
    meta: dict[str, Any] = getattr(model, "checkpoint_metadata", {})
    info = {
        "path": str(resolved),
        "sha256": sha256_file(resolved),
        "architecture": meta.get("architecture"),
        "num_classes": int(meta.get("num_classes", getattr(model, "num_classes", 0))),
        "dataset": meta.get("dataset"),
        "method": meta.get("method"),
        "train_eps": meta.get("eps"),
    }
    return model, info


def _check_attacks_fit(attacks: AttackSettings, num_classes: int) -> None:
    """Refuse a named targeted/DLR attack that needs more classes than the model has."""
    for name, needed in (("apgd-t", 4), ("apgd-dlr", 3)):
        if name in attacks.names and num_classes < needed:
            raise UsageError(
                f"{name} needs at least {needed} classes; the model has {num_classes}",
                "use apgd-ce, pgd or square",
            )


def _load_fitting_data(
    data: str | os.PathLike[str] | Dataset,
    model: nn.Module,
    num_classes: int,
    batch_size: int,
    device: Any,
) -> Dataset:
    """The dataset, refused unless the model fits it (classes, input shape, image size, logits)."""
    from advedge.data import load_dataset
    from advedge.models.registry import min_input_size

    dataset = data if isinstance(data, Dataset) else load_dataset(data)
    meta: dict[str, Any] = getattr(model, "checkpoint_metadata", {})
    hint = "evaluate on the dataset the model was trained on"
    if dataset.num_classes != num_classes:
        raise DataError(
            f"the model predicts {num_classes} classes but {dataset.root} has "
            f"{dataset.num_classes}",
            hint,
        )
    shape = meta.get("input_shape")
    if shape and list(shape) != list(dataset.input_shape):
        raise DataError(
            f"the model takes inputs of shape {list(shape)} but {dataset.root} has "
            f"{list(dataset.input_shape)}",
            hint,
        )
    height, width = dataset.test.image_size
    side = min_input_size(model)
    if side is not None and (height < side or width < side):
        raise DataError(
            f"the images of {dataset.root} are {height}x{width} but "
            f"{meta.get('architecture')} needs at least {side}x{side}",
            hint,
        )
    # Before any attack, for the purifier protocol as well: NaN weights, another head.
    first = to_tensor(dataset.test.x[:batch_size]).to(device)
    check_model_outputs(model, first, dataset.num_classes)
    return dataset


def write_results(path: str | os.PathLike[str], result: Mapping[str, Any]) -> None:
    """Write a results dict as JSON, atomically (no partial file on failure).

    Args:
        path: The file.
        result: The results (keys starting with ``_`` are left out).
    """
    clean = {k: v for k, v in result.items() if not k.startswith("_")}
    atomic_write_text(path, json.dumps(to_jsonable(clean), indent=2) + "\n")

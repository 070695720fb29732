"""The run directory every trainer writes: lock, resume checks, checkpoints, metrics, seeds.

A run directory holds ``config.yaml`` (the resolved options), ``state.pt`` (everything needed to
resume exactly), the trained artifact (``model.safetensors`` or ``purifier.safetensors``) and
``metrics.csv`` (one row per epoch). :class:`RunDir` is the one implementation behind
``advedge train``, ``advedge distill`` and ``advedge purifier train``:

* :meth:`RunDir.locked` holds the output lock, and a new run that fails before its first
  checkpoint leaves no folder behind;
* :meth:`RunDir.resume_state` refuses to overwrite a run, and to resume one whose options (its
  :func:`config_fingerprint`) differ or that has trained more epochs than asked;
* :meth:`RunDir.write_checkpoint` writes the four files, each atomically, in crash-safe order;
* :func:`epoch_seed` fixes each epoch's random stream, so a resumed run repeats exactly what an
  uninterrupted one would do.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol

from advedge.checkpoint import MODEL_FILE, STATE_FILE, load_state, save_state
from advedge.config import config_to_dict, write_yaml
from advedge.errors import UsageError, os_error
from advedge.utils import atomic_write_text

logger = logging.getLogger(__name__)

__all__ = [
    "CONFIG_FILE",
    "METRICS_FILE",
    "RunConfig",
    "RunDir",
    "check_run_dir",
    "config_fingerprint",
    "epoch_seed",
    "resumed_progress",
    "write_metrics_csv",
]

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.csv"


class RunConfig(Protocol):
    """What :class:`RunDir` needs of a run's options (a frozen dataclass such as TrainConfig).

    Attributes:
        out: The run directory.
        epochs: Total number of epochs.
        RESUMABLE: Options that may differ between a run and its resumption.
    """

    RESUMABLE: ClassVar[frozenset[str]]
    out: str
    epochs: int

    def fingerprint(self) -> str:
        """Hash of the options that must not change across a resume."""
        ...


def config_fingerprint(
    config: Any,
    resumable: frozenset[str],
    *,
    view: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> str:
    """Hash of the options of ``config`` (a dataclass) other than ``resumable``: 16 hex digits.

    ``view``, if given, maps the options to the form that is hashed (to keep old runs'
    fingerprints when an option is added).
    """
    d = {k: v for k, v in config_to_dict(config).items() if k not in resumable}
    if view is not None:
        d = view(d)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The torch seed of ``epoch`` on ``rank``: every rank differs, every resume repeats."""
    return (seed * 1_000_003 + epoch * 10_007 + rank) % (2**63)


def resumed_progress(state: dict[str, Any] | None) -> tuple[int, list[dict[str, float]]]:
    """``(epochs done, their metrics rows)`` from a resume state; ``(0, [])`` for a new run."""
    if state is None:
        return 0, []
    done = int(state["epoch"])
    return done, [dict(r) for r in state.get("metrics", [])][:done]


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
        logger.debug("nothing to resume in %s; starting a new run", out)
        return False
    return True


def write_metrics_csv(path: Path, rows: list[dict[str, float]], columns: Sequence[str]) -> None:
    """Write ``metrics.csv`` (one row per epoch, ``columns`` first), atomically."""
    names = list(columns) + sorted({k for r in rows for k in r} - set(columns))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=names, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    atomic_write_text(path, buf.getvalue())


class RunDir:
    """The run directory of one training run (see the module docstring).

    Args:
        config: The run's options; ``config.out`` is the directory.
        kind: The ``kind`` a resume state must carry (``"purifier"``); None for classifier runs,
            whose states carry none.
        is_main: Whether this process writes (rank 0 under torchrun).
    """

    def __init__(self, config: RunConfig, *, kind: str | None = None, is_main: bool = True):
        self.config = config
        self.out = Path(config.out)
        self.kind = kind
        self.is_main = is_main

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the output lock of the directory while training into it.

        The folder is created with the first checkpoint; a new run that fails (or is
        interrupted) before it leaves no folder behind.
        """
        from advedge.locks import output_lock

        with output_lock(self.out):
            fresh = not self.out.exists()
            try:
                yield
            except BaseException:
                if fresh and self.is_main and not (self.out / STATE_FILE).exists():
                    shutil.rmtree(self.out, ignore_errors=True)
                raise

    def resume_state(self, resume: bool) -> dict[str, Any] | None:
        """The state to resume from, or None for a new run; refuse to overwrite a run.

        Call it under :meth:`locked` (it removes stale temporary files).

        Raises:
            UsageError: the directory holds a run and ``resume`` is false; it holds another
                kind of run; its options differ from the original run's; or it has trained
                more epochs than ``config.epochs``.
            CheckpointError: ``state.pt`` is corrupt.
        """
        if not check_run_dir(self.out, resume, clean=True):
            return None
        state = load_state(self.out / STATE_FILE)
        if self.kind is not None and state.get("kind") != self.kind:
            raise UsageError(f"{self.out} holds a classifier run, not a {self.kind} run")
        if state.get("fingerprint") != self.config.fingerprint():
            old = state.get("config", {})
            new = config_to_dict(self.config)
            resumable = self.config.RESUMABLE
            diff = sorted(k for k in new if k not in resumable and old.get(k) != new.get(k))
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

    def state_record(self, metrics: list[dict[str, float]]) -> dict[str, Any]:
        """The entries every ``state.pt`` carries: the metrics rows, the fingerprint checked on
        resume and the options (``config``), in that order."""
        return {
            "metrics": metrics,
            "fingerprint": self.config.fingerprint(),
            "config": config_to_dict(self.config),
        }

    def write_checkpoint(
        self,
        state: dict[str, Any],
        *,
        config_doc: dict[str, Any],
        save_artifact: Callable[[], object],
        metrics: list[dict[str, float]],
        columns: Sequence[str],
    ) -> None:
        """Write ``config.yaml``, ``state.pt``, the artifact and ``metrics.csv``, in that order.

        The order makes a crash at any point safe: a resume reads ``state.pt``, and every file
        written after it is rewritten by the next epoch.

        Args:
            state: The resumable state (tensors, numbers, strings, lists and dicts only), with
                :meth:`state_record` in it.
            config_doc: The resolved options, written to ``config.yaml``.
            save_artifact: Writes the trained artifact (the model or purifier file).
            metrics: Every epoch's row so far.
            columns: The leading columns of ``metrics.csv``.

        Raises:
            AdvedgeError: a full disk or a read-only folder, as one named error.
        """
        try:
            write_yaml(self.out / CONFIG_FILE, config_doc)
            save_state(state, self.out / STATE_FILE)
            save_artifact()
            write_metrics_csv(self.out / METRICS_FILE, metrics, columns)
        except OSError as exc:
            raise os_error(exc, self.out) from None

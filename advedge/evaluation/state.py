"""The resumable per-example evaluation state (schema ``advedge.eval-state/1``).

A long evaluation keeps, beside its results, a JSON file with the fingerprint of its settings,
the per-example clean flags and, per attack, the indices it has processed and those it broke::

    {
      "schema": "advedge.eval-state/1", "fingerprint": "<sha256>", "settings": {...},
      "clean": [1, 0, ...],
      "attacks": {"pgd": {"done": [0, 2], "broken": [2], "queries": [], "seconds": 1.5}}
    }

Resuming continues from it only with the same settings, and only when it is well formed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from advedge.errors import UsageError
from advedge.utils import atomic_write_text, to_jsonable

logger = logging.getLogger(__name__)

__all__ = ["STATE_SCHEMA", "EvalState", "fingerprint", "state_problem"]

STATE_SCHEMA = "advedge.eval-state/1"


def fingerprint(payload: dict[str, Any]) -> str:
    """The sha256 of ``payload`` as canonical JSON (sorted keys): the settings' identity."""
    return hashlib.sha256(json.dumps(to_jsonable(payload), sort_keys=True).encode()).hexdigest()


def _is_index_list(value: Any, total: int) -> bool:
    return isinstance(value, list) and all(
        isinstance(i, int) and not isinstance(i, bool) and 0 <= i < total for i in value
    )


def _attack_problem(name: str, rec: Any, total: int) -> str | None:
    """What is wrong with one attack's record of a resumed state, or None."""
    if not isinstance(rec, dict):
        return f"attack {name!r} is not a mapping"
    if not _is_index_list(rec.get("done"), total) or not _is_index_list(rec.get("broken"), total):
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


def state_problem(data: Any, total: int) -> str | None:
    """What is wrong with a resumed evaluation state (an edited or foreign file), or None.

    Checks the schema, the per-example clean flags (``total`` of them, 0 or 1) and, for every
    attack, its index lists (``done`` and ``broken``, within ``[0, total)``, ``broken`` a subset
    of ``done``), query counts (non-negative integers) and seconds (a finite number >= 0).

    Args:
        data: The parsed JSON of the state file.
        total: The number of examples of the evaluation.

    Returns:
        A short description of the first problem found, or None for a valid state.
    """
    if not isinstance(data, dict) or data.get("schema") != STATE_SCHEMA:
        return f"not an {STATE_SCHEMA} document"
    clean = data.get("clean")
    if clean is not None and not (
        isinstance(clean, list) and len(clean) == total and all(c in (0, 1) for c in clean)
    ):
        return f"'clean' must hold {total} flags of 0 or 1"
    attacks = data.get("attacks")
    if not isinstance(attacks, dict):
        return "'attacks' must be a mapping"
    for name, rec in attacks.items():
        problem = _attack_problem(name, rec, total)
        if problem:
            return problem
    return None


class EvalState:
    """Per-example evaluation state on disk, so a long evaluation can resume.

    JSON with the settings' fingerprint, the clean flags and, per attack, the indices it has
    processed and those it broke. Saved atomically after each batch (at most every few seconds).

    Args:
        path: The state file (None: kept in memory only).
        fingerprint: The settings' fingerprint (see :func:`fingerprint`).
        settings: The settings themselves, recorded to name what differs on a refused resume.
    """

    def __init__(self, path: Path | None, fingerprint: str, settings: dict[str, Any]) -> None:
        self.path = path
        self.data: dict[str, Any] = {
            "schema": STATE_SCHEMA,
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
    ) -> EvalState:
        """A fresh state, or with ``resume`` the one saved at ``path``.

        Args:
            path: The state file (None: nothing to resume, nothing saved).
            fingerprint: The settings' fingerprint.
            settings: The settings (recorded).
            resume: Continue from ``path`` when it exists; else it is overwritten.
            total: The number of examples (to check the saved indices).

        Raises:
            UsageError: the saved state is unreadable, was written with other settings, or is
                not a valid state.
        """
        state = cls(path, fingerprint, settings)
        if path is None or not path.exists():
            if resume:
                logger.debug("no evaluation state at %s; starting from the beginning", path)
            return state
        if not resume:
            logger.warning(
                "overwriting the evaluation state in %s (pass --resume to continue it)", path
            )
            return state
        state.data = _load_for_resume(path, fingerprint, settings, total)
        logger.info("resuming the evaluation state in %s", path)
        return state

    def attack(self, name: str) -> dict[str, Any]:
        """The record of attack ``name`` (created empty on first use)."""
        return self.data["attacks"].setdefault(
            name, {"done": [], "broken": [], "queries": [], "seconds": 0.0}
        )

    def save(self, *, force: bool = False) -> None:
        """Write the state atomically, at most every 5 seconds unless ``force``."""
        if self.path is None:
            return
        now = time.perf_counter()
        if force or now - self._last_save > 5.0:
            atomic_write_text(self.path, json.dumps(to_jsonable(self.data)) + "\n")
            self._last_save = now


def _load_for_resume(
    path: Path, fingerprint: str, settings: dict[str, Any], total: int
) -> dict[str, Any]:
    """The saved state at ``path``, checked against the settings and for validity."""
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
    problem = state_problem(old, total)
    if problem:
        raise UsageError(
            f"cannot resume: {path} is not a valid evaluation state ({problem})",
            "delete it to start over",
        )
    return old

"""Robust-accuracy evaluation with per-example bookkeeping (results schema ``advedge.eval/2``).

Every attack runs on the examples the model classifies correctly when clean; an example counts
as robust to an attack when its adversarial version is still classified correctly. The headline
``worst_case_acc`` is the per-example worst case: the fraction of examples that are correct
clean *and* survive every attack that was run. It is never the minimum of the per-attack
accuracies, which would overstate robustness.

Results JSON (``schema: advedge.eval/2``)::

    {
      "schema": "advedge.eval/2",
      "model": {"path", "sha256", "architecture", "dataset", "method", "train_eps", ...},
      "dataset": {"name", "root", "split", "n_examples"},
      "threat_model": "Linf", "norm": "Linf", "eps": 0.0314, "n_examples": 1000,
      "clean_acc": 0.83, "clean_acc_ci95": [0.80, 0.85],
      "attacks": [{"name", "kind", "settings", "robust_acc", "robust_acc_ci95", "n_robust",
                   "seconds"}, ...],
      "worst_case_acc": 0.41, "worst_case_acc_ci95": [0.38, 0.44],
      "worst_case_attacks": ["pgd", ...],
      "environment": {...}, "seconds": 12.3, "created": "2026-11-23T22:29:00+00:00"
    }

Accuracies are fractions in [0, 1]; each ``*_ci95`` is its 95% Wilson interval over the
``n_examples`` (:func:`advedge.stats.wilson_interval`). Schema 2 added the intervals; nothing
else changed from ``advedge.eval/1``.

The package, lowest module first: :mod:`~advedge.evaluation.sanity` (gradient-masking flags),
:mod:`~advedge.evaluation.state` (the resumable per-example state),
:mod:`~advedge.evaluation.core` (the attack loop: :func:`evaluate`, :class:`EvalResult`),
:mod:`~advedge.evaluation.suites` (the AutoAttack-style suites, :class:`AttackSettings`) and
:mod:`~advedge.evaluation.api` (:func:`evaluate_checkpoint`, the API behind ``advedge eval``).
"""

from __future__ import annotations

from advedge.evaluation.api import (
    EvalOptions,
    check_eval_options,
    evaluate_checkpoint,
    write_results,
)
from advedge.evaluation.core import (
    SCHEMA,
    EvalProgress,
    EvalResult,
    EvalSettings,
    check_model_outputs,
    evaluate,
    non_finite_logits_error,
    predict,
)
from advedge.evaluation.suites import DEFAULT_ATTACKS, SUITES, AttackSettings, build_suite

__all__ = [
    "DEFAULT_ATTACKS",
    "SCHEMA",
    "SUITES",
    "AttackSettings",
    "EvalOptions",
    "EvalProgress",
    "EvalResult",
    "EvalSettings",
    "build_suite",
    "check_eval_options",
    "check_model_outputs",
    "evaluate",
    "evaluate_checkpoint",
    "non_finite_logits_error",
    "predict",
    "write_results",
]

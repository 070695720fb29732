"""Uncertainty of the accuracies advedge reports."""

from __future__ import annotations

import math
from statistics import NormalDist

__all__ = ["wilson_interval"]


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion ``successes / n``.

    With ``p = successes / n`` and ``z`` the two-sided normal quantile of ``confidence``
    (1.96 for 95%)::

        centre = (p + z^2 / 2n) / (1 + z^2 / n)
        half   = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / 4n^2)

    The interval is ``[centre - half, centre + half]``, clipped to [0, 1]. Unlike ``p ± z·se``
    it stays inside [0, 1] and keeps a sensible width at ``p = 0`` or 1 (Wilson, JASA 1927;
    Brown, Cai & DasGupta, Statistical Science 2001).

    Args:
        successes: Examples counted (correct, or robust), ``0 <= successes <= n``.
        n: Examples evaluated; ``n = 0`` gives ``(0.0, 1.0)``: nothing is known.
        confidence: Two-sided confidence level in (0, 1).

    Returns:
        ``(low, high)`` as fractions.

    Raises:
        ValueError: ``successes`` outside ``[0, n]`` or ``confidence`` outside (0, 1).
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if n < 0 or not 0 <= successes <= max(n, 0):
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)

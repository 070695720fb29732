"""The Wilson interval, checked against an independent formulation."""

from __future__ import annotations

import numpy as np
import pytest

from advedge.stats import wilson_interval


def _quadratic_roots(k: int, n: int, z: float) -> tuple[float, float]:
    """The Wilson bounds as the roots in p of (p_hat - p)^2 = z^2 p (1 - p) / n."""
    p_hat = k / n
    a, b, c = 1 + z * z / n, -(2 * p_hat + z * z / n), p_hat * p_hat
    lo, hi = sorted(np.roots([a, b, c]).real)
    return max(0.0, lo), min(1.0, hi)


@pytest.mark.parametrize(
    ("k", "n"), [(38, 200), (0, 200), (200, 200), (5, 10), (1, 3), (977, 1000)]
)
def test_wilson_equals_the_roots_of_its_defining_quadratic(k, n):
    lo, hi = wilson_interval(k, n)
    ref_lo, ref_hi = _quadratic_roots(k, n, 1.959963984540054)
    assert lo == pytest.approx(ref_lo, abs=1e-9) and hi == pytest.approx(ref_hi, abs=1e-9)
    assert lo <= k / n <= hi


def test_wilson_at_n_200_near_19_percent_spans_about_eleven_points():
    lo, hi = wilson_interval(38, 200)  # the quick run's headline: about +-5.5 points
    assert 0.050 < (hi - lo) / 2 < 0.058 and lo < 0.19 < hi


def test_wilson_is_wider_at_higher_confidence_and_narrower_with_more_examples():
    assert wilson_interval(50, 100, 0.99)[0] < wilson_interval(50, 100)[0]
    narrow, wide = wilson_interval(500, 1000), wilson_interval(50, 100)
    assert narrow[1] - narrow[0] < wide[1] - wide[0]
    assert wilson_interval(0, 0) == (0.0, 1.0)
    for bad in [(3, 2), (-1, 5)]:
        with pytest.raises(ValueError):
            wilson_interval(*bad)
    with pytest.raises(ValueError):
        wilson_interval(1, 2, confidence=1.0)

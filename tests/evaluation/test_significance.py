"""Intervals and paired tests against hand computations on constructed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from upcycle.evaluation.results import accuracy_entry, add_paired_tests, render_markdown
from upcycle.evaluation.significance import (
    compare,
    holm,
    marks,
    mcnemar_exact,
    paired_bootstrap_interval,
    wilson_interval,
)


def binomial_two_sided(b: int, c: int) -> float:
    """Exact McNemar by hand: 2·P(X ≤ min(b, c)) for X ~ Binomial(b + c, 1/2), capped at 1."""
    n, k = b + c, min(b, c)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def pair(both: int, only_a: int, only_b: int, neither: int) -> tuple[np.ndarray, np.ndarray]:
    a = [1] * both + [1] * only_a + [0] * only_b + [0] * neither
    b = [1] * both + [0] * only_a + [1] * only_b + [0] * neither
    return np.array(a, bool), np.array(b, bool)


def test_identical_predictions_are_not_significant():
    a, b = pair(40, 0, 0, 60)
    assert mcnemar_exact(a, b) == (0, 0, 1.0)
    assert paired_bootstrap_interval(a, b) == (0.0, 0.0)


@pytest.mark.parametrize("b,c", [(0, 10), (3, 12), (7, 9), (20, 5), (1, 1), (40, 62)])
def test_mcnemar_equals_the_binomial_by_hand(b, c):
    a_flags, b_flags = pair(30, b, c, 17)
    only_a, only_b, p = mcnemar_exact(a_flags, b_flags)
    assert (only_a, only_b) == (b, c)
    assert p == pytest.approx(binomial_two_sided(b, c), rel=1e-12)


def test_one_model_right_on_every_disagreement_is_significant_with_enough_of_them():
    # 10 disagreements all going one way: p = 2 / 2^10 ≈ 0.002; 4 of them: p = 0.125 (not enough).
    assert mcnemar_exact(*pair(50, 0, 10, 40))[2] == pytest.approx(2 / 2**10)
    assert mcnemar_exact(*pair(50, 0, 4, 40))[2] == pytest.approx(0.125)
    # The same accuracies (60 % vs 70 %) unpaired-looking but with many disagreements both ways: not real.
    assert mcnemar_exact(*pair(20, 40, 50, 0))[2] > 0.3


def test_wilson_interval_matches_its_formula_and_stays_in_range():
    z = 1.959963984540054
    for k, n in [(0, 10), (3, 10), (10, 10), (3251, 5010), (1, 1)]:
        p = k / n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        low, high = wilson_interval(k, n)
        assert low == pytest.approx(max(0.0, centre - half), abs=1e-9)
        assert high == pytest.approx(min(1.0, centre + half), abs=1e-9)
        assert 0.0 <= low <= p <= high <= 1.0
    # The report's 63.79 % of 5,010: about ±1.3 points.
    low, high = wilson_interval(3196, 5010)
    assert 0.012 < (high - low) / 2 < 0.014
    assert all(math.isnan(x) for x in wilson_interval(0, 0))


def test_holm_adjustment():
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert holm([]) == []


def test_paired_bootstrap_interval_covers_the_difference_and_is_seeded():
    a, b = pair(50, 5, 25, 20)  # B is right on 20 more of 100 examples
    low, high = paired_bootstrap_interval(a, b, resamples=2000, seed=1)
    assert low < 0.20 < high and low > 0.05
    assert paired_bootstrap_interval(a, b, resamples=2000, seed=1) == (low, high)
    # Pairing matters: the interval of the paired difference is narrower than if B's flags were shuffled.
    rng = np.random.default_rng(0)
    lo2, hi2 = paired_bootstrap_interval(a, rng.permutation(b), resamples=2000, seed=1)
    assert (high - low) < (hi2 - lo2)


def test_compare_and_the_markdown_marks():
    base = {"en": pair(50, 0, 0, 50)[0], "fr": pair(50, 0, 30, 20)[0], "de": pair(60, 2, 4, 34)[0]}
    other = {"en": pair(50, 0, 0, 50)[1], "fr": pair(50, 0, 30, 20)[1], "de": pair(60, 2, 4, 34)[1]}
    out = compare(base, other, resamples=200)
    assert out["en"].p_value == 1.0 and out["en"].difference == 0.0
    assert out["fr"].p_value == pytest.approx(binomial_two_sided(0, 30))
    assert out["fr"].difference == pytest.approx(0.3)
    assert out["fr"].p_holm == pytest.approx(3 * out["fr"].p_value)  # the smallest of three p-values
    assert out["de"].p_holm == 1.0
    results = {
        "dense": accuracy_entry("runs/dense", "xnli", base),
        "moe": accuracy_entry("runs/moe", "xnli", other),
    }
    add_paired_tests(results, {"dense": base, "moe": other}, "dense", resamples=200, seed=0)
    assert "paired" not in results["dense"] and results["moe"]["paired"]["baseline"] == "dense"
    md = render_markdown(results)
    moe_row = next(line for line in md.splitlines() if line.startswith("| moe |"))
    assert moe_row.split(" | ")[1:4] == ["50.00", "80.00**", "64.00"]  # only fr is marked
    assert marks(0.04) == "*" and marks(0.009) == "**" and marks(0.05) == ""

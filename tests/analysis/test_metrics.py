"""Load balance and specialisation numbers, and the normalisations the figures draw."""

from __future__ import annotations

import math

import numpy as np
import pytest

from upcycle.analysis.metrics import (
    expert_shares,
    group_fractions,
    layer_metrics,
    max_over_mean,
    normalised_entropy,
    specialisation,
)


def mutual_information_by_definition(counts):
    """Σ_g,e p(g,e) log p(g,e) / (p(g) p(e)) / H(G), written out independently of the module."""
    total = sum(sum(row) for row in counts)
    p_g = [sum(row) / total for row in counts]
    p_e = [sum(counts[g][e] for g in range(len(counts))) / total for e in range(len(counts[0]))]
    mi = 0.0
    for g, row in enumerate(counts):
        for e, c in enumerate(row):
            if c:
                p = c / total
                mi += p * math.log(p / (p_g[g] * p_e[e]))
    h_g = -sum(p * math.log(p) for p in p_g if p)
    return mi / h_g


def test_specialisation_zero_for_identical_distributions_and_one_for_one_to_one():
    # Every group spreads over the experts in the same proportions (group sizes may differ).
    assert specialisation([[2, 4, 6, 0], [1, 2, 3, 0], [10, 20, 30, 0]]) == pytest.approx(0.0, abs=1e-12)
    # Each group to its own expert(s): the expert tells the group.
    assert specialisation([[5, 0, 0, 0], [0, 7, 0, 0], [0, 0, 3, 1]]) == pytest.approx(1.0)
    # In between, it is I(G;E)/H(G) exactly.
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 50, size=(4, 8)).tolist()
    assert specialisation(counts) == pytest.approx(mutual_information_by_definition(counts), rel=1e-12)
    assert 0 < specialisation(counts) < 1
    # One group: H(G) = 0, nothing to explain.
    assert specialisation([[3, 4, 5]]) is None
    assert specialisation([[0, 0], [0, 0]]) is None


def test_load_balance():
    assert normalised_entropy([5, 5, 5, 5]) == pytest.approx(1.0)
    assert normalised_entropy([0, 9, 0, 0]) == pytest.approx(0.0)
    p = np.array([1, 2, 3, 4]) / 10
    assert normalised_entropy([1, 2, 3, 4]) == pytest.approx(-(p * np.log(p)).sum() / math.log(4))
    assert max_over_mean([5, 5, 5, 5]) == pytest.approx(1.0)
    assert max_over_mean([0, 9, 0, 0]) == pytest.approx(4.0)
    assert max_over_mean([1, 2, 3, 4]) == pytest.approx(4 / 2.5)
    m = layer_metrics([[1, 0, 3, 4], [0, 2, 0, 0]])
    assert m["balance"] == pytest.approx(normalised_entropy([1, 2, 3, 4]), abs=1e-6)
    assert m["max_over_mean"] == pytest.approx(1.6)


def test_normalisations_sum_to_one_or_k():
    tokens = np.array([10, 4, 7])
    top1 = np.array([[5, 2, 3, 0], [1, 1, 1, 1], [0, 0, 7, 0]])
    top2 = np.array([[5, 7, 3, 5], [2, 2, 2, 2], [7, 0, 7, 0]])  # rows sum to 2 × tokens
    np.testing.assert_allclose(group_fractions(top1, tokens).sum(1), 1.0)
    np.testing.assert_allclose(group_fractions(top2, tokens).sum(1), 2.0)
    shares = expert_shares(top2, tokens)
    np.testing.assert_allclose(shares.sum(0), 1.0)
    # Groups weighted equally: a group with more tokens but the same p(e|g) gets the same share.
    np.testing.assert_allclose(expert_shares(np.array([[10, 30], [1, 3]]), np.array([40, 4])), 0.5)
    # With equal token totals the shares are the raw counts' shares.
    counts = np.array([[6, 2, 2], [1, 4, 5]])
    np.testing.assert_allclose(expert_shares(counts, np.array([10, 10])), counts / counts.sum(0))
    # An expert nobody used has no shares (zeros, not NaN).
    assert expert_shares(np.array([[1, 0], [2, 0]]), np.array([1, 2]))[:, 1].tolist() == [0.0, 0.0]

"""Numbers that summarise a groups × experts routing count matrix, comparable across models.

Shape legend: G groups (languages, labels, domains), E experts.

- **Load balance** of a layer: the normalised entropy H(load)/log E of the experts' share of all
  assignments (1 = every expert equally busy, 0 = one expert takes everything), and max/mean, the
  busiest expert's load over the average load (1 = even, E = one expert takes everything at top-1).
- **Specialisation** between group and expert: the mutual information I(G; E) of the joint distribution
  of (group, expert) over the counted assignments, divided by the group entropy H(G). It is 0 when every
  group spreads over the experts in the same proportions (routing says nothing about the group) and 1
  when the expert determines the group (a one-to-one routing of groups to experts). Natural logarithms;
  the normalisation makes the base irrelevant. Undefined (None) with a single group (H(G) = 0).
- **Per-group fractions** p(e | g) (Drop-Upcycling Fig. 5: "the fraction of the group's tokens routed to
  each expert"; with all top-k choices counted they sum to k, and an even router gives k/E each).
- **Per-expert shares** (the founding report's Figures 1–4: "the share of the expert's tokens that came
  from each group"), with every group weighted equally: share(g | e) = p(e|g) / Σ_g' p(e|g'). This equals
  the share of raw counts when the groups have equal token totals (which ``--max-tokens`` arranges) and
  stays fair when they do not.
"""

from __future__ import annotations

import math

import numpy as np


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def normalised_entropy(load_E: np.ndarray) -> float:
    """H(load / Σ load) / log E; 1.0 for a single expert or no load (nothing to be unbalanced)."""
    load_E = np.asarray(load_E, dtype=np.float64)
    total = load_E.sum()
    if load_E.size < 2 or total <= 0:
        return 1.0
    return _entropy(load_E / total) / math.log(load_E.size)


def max_over_mean(load_E: np.ndarray) -> float:
    """The busiest expert's load over the mean load (1.0 = even); 1.0 with no load."""
    load_E = np.asarray(load_E, dtype=np.float64)
    mean = load_E.mean() if load_E.size else 0.0
    return float(load_E.max() / mean) if mean > 0 else 1.0


def specialisation(counts_GE: np.ndarray) -> float | None:
    """I(G; E) / H(G) of the joint distribution counts_GE / Σ counts_GE; None if H(G) = 0."""
    joint = np.asarray(counts_GE, dtype=np.float64)
    total = joint.sum()
    if total <= 0:
        return None
    joint = joint / total
    p_g, p_e = joint.sum(1), joint.sum(0)
    h_g = _entropy(p_g)
    if h_g <= 0:
        return None
    # I(G; E) = H(G) + H(E) − H(G, E): exact for any joint, no division by zero marginals.
    mutual = h_g + _entropy(p_e) - _entropy(joint.ravel())
    return float(min(max(mutual / h_g, 0.0), 1.0))


def group_fractions(counts_GE: np.ndarray, tokens_G: np.ndarray) -> np.ndarray:
    """p(e | g) = counts[g, e] / tokens[g]: sums to 1 per group for top-1 counts, to k for all top-k
    choices. Rows of groups without tokens are 0."""
    counts = np.asarray(counts_GE, dtype=np.float64)
    tokens = np.asarray(tokens_G, dtype=np.float64)[:, None]
    return np.divide(counts, tokens, out=np.zeros_like(counts), where=tokens > 0)


def expert_shares(counts_GE: np.ndarray, tokens_G: np.ndarray) -> np.ndarray:
    """share(g | e) with groups weighted equally (see the module docstring); each expert's column sums to
    1 (0 for an expert no group used)."""
    frac = group_fractions(counts_GE, tokens_G)
    total_E = frac.sum(0, keepdims=True)
    return np.divide(frac, total_E, out=np.zeros_like(frac), where=total_E > 0)


def layer_metrics(counts_GE: np.ndarray) -> dict:
    """{'balance', 'max_over_mean', 'specialisation'} of one layer's count matrix."""
    counts = np.asarray(counts_GE, dtype=np.float64)
    load = counts.sum(0)
    return {
        "balance": round(normalised_entropy(load), 6),
        "max_over_mean": round(max_over_mean(load), 6),
        "specialisation": None if (s := specialisation(counts)) is None else round(s, 6),
    }


__all__ = [
    "expert_shares",
    "group_fractions",
    "layer_metrics",
    "max_over_mean",
    "normalised_entropy",
    "specialisation",
]

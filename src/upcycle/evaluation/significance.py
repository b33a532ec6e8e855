"""Confidence intervals and paired tests for accuracies measured on the same examples.

Why these (issue 12: "the report's 64.91 vs 63.79 on 5,010 examples may not be [real]"):

- **Per-language 95 % interval: Wilson score interval** of the binomial proportion. Unlike the normal
  approximation p ± 1.96·√(p(1−p)/n) it stays inside [0, 1] and keeps its coverage near 0 % and 100 %
  and for small n (Brown, Cai & DasGupta 2001, "Interval estimation for a binomial proportion").
- **Significance marks: exact McNemar test.** Two models evaluated on the *same* examples are paired:
  only the examples where exactly one of them is right carry information. With b = "A right, B wrong"
  and c = "A wrong, B right", under H0 (equal accuracy) b ~ Binomial(b + c, 1/2); the two-sided exact
  p-value is min(1, 2·P(X ≤ min(b, c))). It is exact (no asymptotic χ² approximation, so valid when the
  models disagree on few examples), deterministic, and the test Dietterich (1998, "Approximate
  statistical tests for comparing supervised classification learning algorithms") recommends for two
  classifiers on one test set. An unpaired test on the two accuracies would ignore that both models get
  the easy examples right and be far too conservative.
- **Several languages: Holm's step-down adjustment** of the 15 p-values of one comparison (Holm 1979),
  so "a mark anywhere in the row" keeps a 5 % family-wise error rate; both p-values are reported.
- **Size of the difference: paired bootstrap** interval of accuracy(B) − accuracy(A), resampling
  examples with replacement and keeping each example's pair together (Koehn 2004; Berg-Kirkpatrick et
  al. 2012). It says how large the difference may be; the test says whether it is there at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np


def wilson_interval(correct: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of the proportion correct / n (``(nan, nan)`` for n = 0)."""
    from scipy.stats import binomtest

    if n == 0:
        return (float("nan"), float("nan"))
    ci = binomtest(int(correct), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return (float(ci.low), float(ci.high))


def mcnemar_exact(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> tuple[int, int, float]:
    """(b, c, two-sided exact p-value): b = examples only A gets right, c = only B; p = 1 when b = c = 0."""
    from scipy.stats import binomtest

    a, b_ = np.asarray(a_correct, dtype=bool), np.asarray(b_correct, dtype=bool)
    if a.shape != b_.shape:
        raise ValueError(f"paired test needs the same examples: {a.shape} vs {b_.shape}")
    only_a, only_b = int((a & ~b_).sum()), int((~a & b_).sum())
    if only_a + only_b == 0:
        return 0, 0, 1.0
    # scipy's two-sided test at p = 1/2 is symmetric, so this is min(1, 2·P(X ≤ min(b, c))).
    return only_a, only_b, float(binomtest(min(only_a, only_b), only_a + only_b, 0.5).pvalue)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (same order as given)."""
    p = np.asarray(p_values, dtype=float)
    m = len(p)
    order = np.argsort(p, kind="stable")
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()


def paired_bootstrap_interval(
    a_correct: Sequence[bool],
    b_correct: Sequence[bool],
    resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float]:
    """Percentile interval of accuracy(B) − accuracy(A) over paired resamples of the examples."""
    diff = np.asarray(b_correct, dtype=np.float64) - np.asarray(a_correct, dtype=np.float64)
    n = diff.shape[0]
    if n == 0 or resamples <= 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    chunk = max(1, 2_000_000 // n)  # bounded memory: at most ~2M indices at a time
    for start in range(0, resamples, chunk):
        stop = min(resamples, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = diff[idx].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return (float(low), float(high))


@dataclass
class PairedResult:
    """One language of one comparison: model B (a row of the table) against the baseline A."""

    difference: float
    """accuracy(B) − accuracy(A), as a fraction."""
    only_baseline: int
    """Examples only the baseline gets right (McNemar's b)."""
    only_model: int
    """Examples only this model gets right (McNemar's c)."""
    p_value: float
    """Two-sided exact McNemar p-value."""
    p_holm: float
    """p_value after Holm's adjustment over the languages of this comparison."""
    ci95: tuple[float, float]
    """Paired-bootstrap 95 % interval of the difference."""

    def to_dict(self) -> dict:
        out = asdict(self)
        out["ci95"] = list(self.ci95)
        return out


def compare(
    baseline: dict[str, np.ndarray], model: dict[str, np.ndarray], resamples: int = 1000, seed: int = 0
) -> dict[str, PairedResult]:
    """Per-language paired results of ``model`` against ``baseline`` ({language: correct flags})."""
    languages = [lang for lang in baseline if lang in model]
    raw = {}
    for lang in languages:
        a, b = np.asarray(baseline[lang], dtype=bool), np.asarray(model[lang], dtype=bool)
        only_a, only_b, p = mcnemar_exact(a, b)
        raw[lang] = (float(b.mean() - a.mean()) if a.size else float("nan"), only_a, only_b, p, a, b)
    adjusted = holm([raw[lang][3] for lang in languages]) if languages else []
    return {
        lang: PairedResult(
            difference=raw[lang][0],
            only_baseline=raw[lang][1],
            only_model=raw[lang][2],
            p_value=raw[lang][3],
            p_holm=adjusted[i],
            ci95=paired_bootstrap_interval(raw[lang][4], raw[lang][5], resamples, seed),
        )
        for i, lang in enumerate(languages)
    }


def marks(p: float) -> str:
    """'**' for p < 0.01, '*' for p < 0.05, '' otherwise."""
    return "**" if p < 0.01 else "*" if p < 0.05 else ""


__all__ = [
    "PairedResult",
    "compare",
    "holm",
    "marks",
    "mcnemar_exact",
    "paired_bootstrap_interval",
    "wilson_interval",
]

"""Goodness-of-fit test shared by the statistical tests and the demo."""

from __future__ import annotations

import numpy as np

MIN_EXPECTED = 5.0


def chi_square_p(counts, probs, min_expected: float = MIN_EXPECTED) -> float:
    """p-value of Pearson's chi-square test of observed counts against probabilities.

    counts, probs: one value per category (tensors or arrays). A category of probability 0
    must be empty: a sample there is a sample outside the distribution's support, and
    raises ValueError naming the categories. Categories expected fewer than `min_expected`
    times are pooled into one; if the pool is still below it, it joins the smallest other
    category. Returns 1.0 when fewer than two categories remain.
    """
    from scipy import stats

    counts = np.asarray(counts, dtype=np.float64)
    probs = np.asarray(probs, dtype=np.float64)
    zero = probs <= 0
    if counts[zero].sum() > 0:
        raise ValueError(f"samples in categories of probability 0: {np.nonzero(zero & (counts > 0))[0].tolist()}")
    n = counts.sum()
    obs, exp = counts[~zero], probs[~zero] * n
    small = exp < min_expected
    if small.any():
        obs = np.append(obs[~small], obs[small].sum())
        exp = np.append(exp[~small], exp[small].sum())
        if exp[-1] < min_expected and len(exp) > 2:  # still too small: merge into the smallest other bin
            i = int(np.argmin(exp[:-1]))
            obs[i] += obs[-1]
            exp[i] += exp[-1]
            obs, exp = obs[:-1], exp[:-1]
    if len(exp) < 2:
        return 1.0
    stat = float(((obs - exp) ** 2 / exp).sum())
    return float(stats.chi2.sf(stat, len(exp) - 1))

"""Across-seed statistics for report tables: mean with a 95 % t confidence interval, Welch's
t-test between two rows, Holm's step-down adjustment.

Why these: seeds are few (2-5), so the interval uses Student's t (a normal interval would be far
too narrow), and two methods' seed spreads differ, so the test is Welch's (no equal-variance
assumption). A table compares every row with the best one, several tests at once: Holm keeps the
family-wise error at alpha without Bonferroni's loss of power.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
from scipy import stats as _st

ALPHA = 0.05


@dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    std: float  # sample standard deviation (ddof=1); nan when n < 2
    ci95: float  # half-width of the 95 % t interval; nan when n < 2


def summarize(values: Sequence[float]) -> Summary:
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    n = int(x.size)
    if n == 0:
        return Summary(0, math.nan, math.nan, math.nan)
    mean = float(x.mean())
    if n < 2:
        return Summary(1, mean, math.nan, math.nan)
    std = float(x.std(ddof=1))
    half = float(_st.t.ppf(0.975, n - 1) * std / math.sqrt(n))
    return Summary(n, mean, std, half)


@dataclass(frozen=True)
class TestResult:
    t: float
    df: float
    p: float  # two-sided


def welch(a: Sequence[float], b: Sequence[float]) -> Optional[TestResult]:
    """Two-sided Welch's t-test; None when either side has fewer than 2 values (no variance).

    Both sides constant: the difference is exact, so p = 0 when the means differ and 1 when they
    are equal (scipy would return nan: 0/0).
    """
    x = np.asarray(a, dtype=float)
    y = np.asarray(b, dtype=float)
    if x.size < 2 or y.size < 2:
        return None
    vx, vy = x.var(ddof=1) / x.size, y.var(ddof=1) / y.size
    diff = float(x.mean() - y.mean())
    if vx + vy == 0:
        return TestResult(math.copysign(math.inf, diff) if diff else 0.0, math.nan, 0.0 if diff else 1.0)
    t = diff / math.sqrt(vx + vy)
    df = (vx + vy) ** 2 / (vx ** 2 / (x.size - 1) + vy ** 2 / (y.size - 1))
    p = float(2 * _st.t.sf(abs(t), df))
    return TestResult(float(t), float(df), p)


def holm(pvalues: Sequence[Optional[float]]) -> List[Optional[float]]:
    """Holm-adjusted p-values (None entries are untested and left out of the family)."""
    idx = [i for i, p in enumerate(pvalues) if p is not None]
    order = sorted(idx, key=lambda i: pvalues[i])
    m = len(order)
    out: List[Optional[float]] = [None] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out

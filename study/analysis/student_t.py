"""Student's t for integer degrees of freedom in the standard library alone: the paired t test
and its interval, for processes that cannot import scipy (the GPU check on a lent machine).

    python -c "from study.student_t import paired; print(paired([.85, .86, .84], [.84, .86, .83]))"

`study.stats` is the reference (scipy's `stdtrit`); tests/test_gpu_check.py holds this module to
scipy.stats.t and to scipy.stats.ttest_rel. The CDF is the closed form for integer df
(Abramowitz & Stegun 26.7.3-4): exact up to rounding, no series to truncate; the quantile is
found by bisection on it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

LEVEL = 0.95


def central(t: float, df: int) -> float:
    """P(|T| <= t) for T ~ t(df), df a positive integer, t >= 0 (A & S 26.7.3-4)."""
    if not (isinstance(df, int) and df >= 1):
        raise ValueError(f"df must be a positive integer, got {df!r}")
    if t < 0:
        raise ValueError(f"t must be >= 0, got {t}")
    if math.isinf(t):
        return 1.0
    theta = math.atan(t / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2 == 0:
        term = total = 1.0
        for k in range(2, df, 2):  # 1, 1/2 c^2, (1*3)/(2*4) c^4, ... up to c^(df-2)
            term *= c2 * (k - 1) / k
            total += term
        return s * total
    if df == 1:
        return 2 * theta / math.pi
    term = total = math.cos(theta)
    for k in range(3, df - 1, 2):  # c, (2/3) c^3, (2*4)/(3*5) c^5, ... up to c^(df-2)
        term *= c2 * (k - 1) / k
        total += term
    return 2 / math.pi * (theta + s * total)


def two_sided_p(t: float, df: int) -> float:
    """P(|T| >= |t|)."""
    return max(0.0, 1.0 - central(abs(t), df))


def quantile(level: float, df: int) -> float:
    """The t with P(|T| <= t) = level, i.e. the (1 + level) / 2 quantile of t(df)."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    lo, hi = 0.0, 1.0
    while central(hi, df) < level:
        lo, hi = hi, 2 * hi
    for _ in range(200):  # halves the bracket down to the spacing of doubles
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if central(mid, df) < level else (lo, mid)
    return (lo + hi) / 2


def interval(mean: float, se: float, df: int, level: float = LEVEL) -> tuple[float, float]:
    """mean +- t * se; se = 0 gives the degenerate [mean, mean], as `study.stats.t_interval`."""
    if se == 0:
        return (mean, mean)
    half = quantile(level, df) * se
    return (mean - half, mean + half)


@dataclass(frozen=True)
class PairedT:
    """Paired t on d = x - y: n pairs, mean and SD of d, its interval, t and two-sided p.
    t and p are None when every pair differs by the same amount (no spread: t undefined)."""

    n: int
    mean_diff: float
    sd: float
    ci: tuple[float, float]
    level: float
    t: float | None
    p: float | None


def paired(x: Sequence[float], y: Sequence[float], level: float = LEVEL) -> PairedT:
    """x, y: [n] finite, aligned pairs, n >= 2 -> paired t of x - y (scipy.stats.ttest_rel)."""
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"need two aligned samples of n >= 2 pairs, got {len(x)} and {len(y)}")
    d = [a - b for a, b in zip(x, y)]
    n = len(d)
    mean = math.fsum(d) / n
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in d) / (n - 1))
    se = sd / math.sqrt(n)
    if se == 0:
        return PairedT(n, mean, sd, (mean, mean), level, None, None)
    t = mean / se
    return PairedT(n, mean, sd, interval(mean, se, n - 1, level), level, t, two_sided_p(t, n - 1))

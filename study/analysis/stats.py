"""Statistics for the dropout study: pure functions, NumPy arrays in, small frozen dataclasses out.

    python -c "import numpy as np; from study.analysis import stats; \
        print(stats.describe(np.array([.84, .85, .86]), np.random.default_rng(0)))"

Conventions every function here follows:

- Inputs are 1-D float arrays of accuracies (fractions in [0, 1]); shapes are in each docstring.
- "Not computable" is `None` plus a `reason` string, never NaN: results are written to JSON.
- NaN inputs (diverged runs) are dropped and counted, with the count in the result.
- Resampling takes an explicit `numpy.random.Generator`; nothing touches global random state.
- Every bootstrap interval comes from `bootstrap_ci` (scipy.stats.bootstrap): BCa, resampled by
  seed where runs pair; where BCa is undefined (a constant group, such as the (1, 1) setting at
  0.1, or a degenerate jackknife) it falls back to the percentile interval or the point and says
  so. Measured coverage is in `COVERAGE`; those below 90% at n = 10 (`APPROXIMATE`) are
  labelled approximate.
- Rank statistics (Wilcoxon, Mann-Whitney, Hodges-Lehmann, Fligner) take the accuracy `grid` and
  round to it before ranking (`on_grid`): differences equal on the grid differ by ~1e-16 in floats.
- A location analysis (`location`) has three families (t, rank, trimmed) of one shape; when every
  seed gives the same gap, the verdict is settled by construction against the margin
  (`settle_gap`), and `verdict` maps adjusted p-values to different / negligible / equivalent /
  inconclusive.
- A group or a set of paired differences whose range is below `TOLERANCE` counts as constant:
  accuracies are multiples of 1e-4 (10k test images), so anything smaller is float round-off,
  and a t statistic built on round-off would be a huge, meaningless number.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import integrate, optimize, special
from scipy import stats as sps
from statsmodels.stats.oneway import anova_oneway

TOLERANCE = 1e-9
# Fewer runs than this per group and no test is run: with 2 seeds a t test has 1 degree of
# freedom and the exact rank tests cannot reach p < 0.05 at all.
MIN_N = 3
LEVEL = 0.95


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Description:
    """One group of runs. `ci95` is t-based, `ci95_boot` a bootstrap of the mean (`bootstrap_ci`);
    `iqr` is (q1, q3) by linear interpolation (NumPy's default)."""

    n: int
    n_dropped: int
    mean: float | None
    sd: float | None
    ci95: tuple[float, float] | None
    ci95_boot: tuple[float, float] | None
    median: float | None
    iqr: tuple[float, float] | None
    reason: str | None = None


@dataclass(frozen=True)
class TestResult:
    test: str
    statistic: float | None
    p: float | None
    reason: str | None = None
    forced: str | None = None  # a verdict that holds by construction when p is undefined


@dataclass(frozen=True)
class Omnibus:
    test: str
    statistic: float | None
    p: float | None
    reason: str | None = None
    secondary: TestResult | None = None


@dataclass(frozen=True)
class Shift:
    """Mean difference (setting - baseline) with its t test. `forced` is a verdict that holds by
    construction when the t statistic is undefined (every difference identical)."""

    test: str
    mean_diff: float
    ci95: tuple[float, float]
    statistic: float | None
    p: float | None
    forced: str | None = None
    reason: str | None = None


@dataclass(frozen=True)
class Spread:
    ratio: float | None  # SD(setting) / SD(baseline)
    ratio_ci95: tuple[float | None, float | None] | None
    brown_forsythe: TestResult
    fligner: TestResult
    reason: str | None = None


@dataclass(frozen=True)
class Power:
    mde: float | None  # smallest |difference| detectable at `power` with the n used, accuracy units
    seeds_needed: int | None  # seeds (per group when unpaired) to detect the observed difference
    seeds_needed_margin: int | None = None  # ... to detect a difference equal to the margin
    seeds_needed_equivalence: int | None = None  # ... for the TOST to pass when the gap is 0
    reason: str | None = None


@dataclass(frozen=True)
class Comparison:
    """One setting against the baseline, before multiplicity correction (see `holm`, `verdict`).

    `n` is the number of pairs when paired, the runs of both groups together when unpaired."""

    paired: bool
    n: int
    n_setting: int
    n_baseline: int
    n_dropped: int
    mean_diff: float | None
    mean_diff_ci95: tuple[float, float] | None
    test: str
    p: float | None
    rank_test: str
    rank_p: float | None
    hedges_g: float | None
    prob_superiority: float | None
    tost_p: float | None
    variance_ratio: float | None
    variance_ratio_ci95: tuple[float | None, float | None] | None
    brown_forsythe_p: float | None
    fligner_p: float | None
    mde: float | None
    seeds_needed: int | None
    forced: str | None = None
    reason: str | None = None
    power: Power | None = None  # the whole power analysis, margin counts included


# ----------------------------------------------------------------------------- helpers


def join_reasons(*reasons: str | None) -> str | None:
    """Join the non-empty reasons with "; ", dropping repeats (also inside reasons that are
    themselves joined, as when a comparison's and its power analysis' reasons meet); None when
    there are none."""
    kept = [part for r in reasons if r for part in r.split("; ")]
    return "; ".join(dict.fromkeys(kept)) if kept else None


def _finite(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def is_constant(x: np.ndarray) -> bool:
    """x: [n]. True when every value is the same up to float round-off (see TOLERANCE)."""
    return x.size > 0 and float(np.ptp(x)) <= TOLERANCE


def drop_nan(x: np.ndarray) -> tuple[np.ndarray, int]:
    """x: [n] -> (finite values [n - k], k dropped)."""
    x = np.asarray(x, dtype=float)
    keep = np.isfinite(x)
    return x[keep], int((~keep).sum())


def drop_nan_pairs(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """x, y: [n] aligned by seed -> the pairs where both are finite, and how many were dropped."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"paired arrays differ in shape: {x.shape} vs {y.shape}")
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep], y[keep], int((~keep).sum())


def quiet(fn, *args, **kwargs):
    # scipy warns (and returns NaN) on degenerate input; callers turn NaN into a reason.
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


# ----------------------------------------------------------------------------- description


def t_interval(mean: float, se: float, df: float, level: float = LEVEL) -> tuple[float, float]:
    """Two-sided t interval mean +- t_{df} * se. se = 0 gives the degenerate [mean, mean]."""
    if se == 0:
        return (float(mean), float(mean))
    half = float(special.stdtrit(df, 0.5 + level / 2)) * se
    return (float(mean - half), float(mean + half))


def mean_ci(x: np.ndarray, level: float = LEVEL) -> tuple[float, float] | None:
    """x: [n] finite values -> t-based interval for the mean, None when n < 2."""
    if x.size < 2:
        return None
    return t_interval(float(x.mean()), float(x.std(ddof=1)) / math.sqrt(x.size), x.size - 1, level)


# One bootstrap for every interval: scipy.stats.bootstrap, BCa, with fallbacks (see bootstrap_ci).


def sample_sd(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """SD with ddof 1 along `axis` (vectorised, for scipy.stats.bootstrap); exactly 0.0 for
    identical values, which the float mean alone does not give (0.1 six times has SD 1.5e-17)."""
    return np.std(x - np.take(x, [0], axis=axis), ddof=1, axis=axis)


def sd_ratio(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """SD(x) / SD(y) along `axis`; inf or NaN where SD(y) is 0 (bootstrap_ci handles those)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return sample_sd(x, axis) / sample_sd(y, axis)


def mean(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(x, axis=axis)


def bootstrap_ci(statistic, samples: tuple[np.ndarray, ...], *, paired: bool,
                 rng: np.random.Generator, n_resamples: int = 10_000, level: float = LEVEL
                 ) -> tuple[tuple[float | None, float | None] | None, str, str | None]:
    """samples: k arrays [n_i] (equal n when paired), finite -> (interval, method, reason).

    statistic(*samples, axis=-1) must be vectorised. BCa from scipy.stats.bootstrap, seeded from
    `rng`; paired=True resamples the k arrays together (by seed). method "bca"; "percentile"
    where BCa is undefined (a degenerate jackknife, or resamples where the statistic has no
    value, e.g. an SD ratio over a baseline resample with SD 0: those resamples are dropped and
    counted); "point" when every resample gives the point (constant groups). An infinite bound
    is None, with a reason."""
    samples = tuple(np.asarray(v, dtype=float) for v in samples)
    if min(v.size for v in samples) < 2:
        return None, "point", "fewer than 2 values: no bootstrap interval"
    with np.errstate(all="ignore"):
        point = _finite(statistic(*samples, axis=-1))
    if point is None:
        return None, "point", "statistic undefined on the data"
    if all(is_constant(v) for v in samples):
        return (point, point), "point", "every value is the same: each resample gives the point"
    res = quiet(sps.bootstrap, samples, statistic, n_resamples=n_resamples, paired=paired,
                 vectorized=True, axis=-1, confidence_level=level, method="BCa", rng=rng)
    lo, hi = _finite(res.confidence_interval.low), _finite(res.confidence_interval.high)
    if lo is not None and hi is not None:
        return (lo, hi), "bca", None
    return _percentile_fallback(np.asarray(res.bootstrap_distribution, dtype=float), point, level)


def _percentile_fallback(dist: np.ndarray, point: float, level: float
                         ) -> tuple[tuple[float | None, float | None] | None, str, str | None]:
    undefined = int(np.isnan(dist).sum())
    dist = dist[~np.isnan(dist)]
    dropped = (f"{undefined} of {undefined + dist.size} resamples had no value and were dropped"
               if undefined else None)
    if dist.size == 0:
        return None, "point", join_reasons(dropped, "no resample has a value")
    if float(np.ptp(dist)) <= TOLERANCE:
        # "remaining": with some dropped, the ones left (not all) agree with the point.
        agree = "every remaining resample gives the point" if dropped else "every resample gives the point"
        return (point, point), "point", join_reasons(dropped, agree)
    with np.errstate(invalid="ignore"):
        lo, hi = (_finite(v) for v in np.percentile(dist, [50 * (1 - level), 50 * (1 + level)]))
    infinite = "a bound is infinite (resamples with a zero denominator)" if None in (lo, hi) else None
    why = "BCa undefined here (degenerate jackknife or resamples without a value): percentile interval"
    return (lo, hi), "percentile", join_reasons(why, dropped, infinite)


# Coverage of the 95% BCa intervals from bootstrap_ci on normal data (true mean 0, SD 1, SD ratio
# 1 for two independent groups of n), `COVERAGE_REPLICATES` samples each, 999 resamples, measured by
#   PYTHONPATH=. python -c "from study.analysis import stats; print(stats.measure_coverage_table())"
# (tests/test_stats.py re-measures it). Monte Carlo SE: sqrt(c (1 - c) / replicates) <= 0.01.
COVERAGE_REPLICATES = {5: 1000, 10: 2000, 20: 1000}
# scipy 1.17.1, numpy 2.4.6. The old percentile intervals, same command with method="percentile":
# mean .834/.900/.926, SD .626/.782/.857, SD ratio .953/.920/.922 at n = 5/10/20.
COVERAGE: dict[tuple[str, int], float] = {
    ("mean", 5): 0.830, ("mean", 10): 0.8965, ("mean", 20): 0.925,
    ("sd", 5): 0.629, ("sd", 10): 0.8095, ("sd", 20): 0.896,
    ("sd_ratio", 5): 0.958, ("sd_ratio", 10): 0.9315, ("sd_ratio", 20): 0.934,
}
# Intervals whose coverage at n = 10 is below 90%: label them "approximate" wherever shown.
APPROXIMATE: frozenset[str] = frozenset(
    stat for (stat, n), c in COVERAGE.items() if n == 10 and c < 0.90)
COVERAGE_STATISTICS = {"mean": (mean, 1), "sd": (sample_sd, 1), "sd_ratio": (sd_ratio, 2)}
_TRUTH = {"mean": 0.0, "sd": 1.0, "sd_ratio": 1.0}


def measure_coverage(statistic: str, n: int, replicates: int, rng: np.random.Generator,
                     n_resamples: int = 999, level: float = LEVEL, method: str = "BCa") -> float:
    """Share of `replicates` normal samples of size n whose interval covers the true value.

    One batched scipy.stats.bootstrap call over [replicates, n] arrays: the same interval
    bootstrap_ci returns for such data (continuous, so BCa is always defined; asserted)."""
    fn, k = COVERAGE_STATISTICS[statistic]
    data = tuple(rng.standard_normal((replicates, n)) for _ in range(k))
    # batch: resamples per vectorised call; small batches keep the arrays in cache (4x faster).
    res = quiet(sps.bootstrap, data, fn, n_resamples=n_resamples, vectorized=True, axis=-1,
                 confidence_level=level, method=method, rng=rng, batch=50)
    lo, hi = np.asarray(res.confidence_interval.low), np.asarray(res.confidence_interval.high)
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
        raise RuntimeError(f"{method} undefined for some {statistic} samples at n = {n}")
    truth = _TRUTH[statistic]
    return float(((lo <= truth) & (truth <= hi)).mean())


def measure_coverage_table(seed: int = 20261203, method: str = "BCa") -> dict[tuple[str, int], float]:
    """{(statistic, n): coverage} for every statistic and n in COVERAGE_REPLICATES, one seed."""
    rng = np.random.default_rng(seed)
    return {(stat, n): round(measure_coverage(stat, n, reps, rng, method=method), 4)
            for stat in COVERAGE_STATISTICS for n, reps in COVERAGE_REPLICATES.items()}


def bootstrap_mean_ci(x: np.ndarray, rng: np.random.Generator, n_boot: int = 10_000,
                      level: float = LEVEL) -> tuple[float, float] | None:
    """x: [n] finite values -> bootstrap interval of the mean (see `bootstrap_ci`)."""
    return bootstrap_ci(mean, (x,), paired=False, rng=rng, n_resamples=n_boot, level=level)[0]


def sd_ci(x: np.ndarray, rng: np.random.Generator, n_boot: int = 10_000,
          level: float = LEVEL) -> tuple[float, float] | None:
    """x: [n] finite values -> bootstrap interval of the SD (ddof 1); None when n < 2."""
    return bootstrap_ci(sample_sd, (x,), paired=False, rng=rng, n_resamples=n_boot, level=level)[0]


def describe(x: np.ndarray, rng: np.random.Generator, n_boot: int = 10_000) -> Description:
    """x: [n] accuracies, NaN allowed (dropped and counted) -> Description."""
    x, dropped = drop_nan(x)
    note = f"{dropped} non-finite value(s) dropped" if dropped else None
    if x.size == 0:
        return Description(0, dropped, None, None, None, None, None, None,
                           join_reasons(note, "no finite values"))
    q1, med, q3 = (float(v) for v in np.percentile(x, [25, 50, 75]))
    few = "fewer than 2 values: no SD or interval" if x.size < 2 else None
    flat = ("zero variance: every run gives the same value, so each interval is that point"
            if x.size >= 2 and is_constant(x) else None)
    return Description(
        n=int(x.size), n_dropped=dropped, mean=float(x.mean()),
        sd=float(x.std(ddof=1)) if x.size >= 2 else None,
        ci95=mean_ci(x), ci95_boot=bootstrap_mean_ci(x, rng, n_boot),
        median=med, iqr=(q1, q3), reason=join_reasons(note, few, flat))


# ----------------------------------------------------------------------------- omnibus


def friedman(matrix: np.ndarray) -> Omnibus:
    """matrix: [n_seeds, k] (row = seed, column = setting). Rows with any NaN are dropped."""
    matrix = np.asarray(matrix, dtype=float)
    complete = np.isfinite(matrix).all(axis=1)
    m = matrix[complete]
    note = f"{int((~complete).sum())} seed(s) without every setting dropped" if (~complete).any() else None
    n, k = m.shape
    if k < 3:
        why = f"Friedman needs at least 3 settings, got {k}"
        return Omnibus("friedman", None, None, join_reasons(note, why))
    if n < MIN_N:
        why = f"only {n} complete seed(s), need {MIN_N}"
        return Omnibus("friedman", None, None, join_reasons(note, why))
    if all(is_constant(row) for row in m):
        return Omnibus("friedman", None, None,
                       join_reasons(note, "every seed gives the same value for every setting: no ranks"))
    res = quiet(sps.friedmanchisquare, *m.T)
    return _omnibus_from("friedman", res, note)


def _omnibus_from(test: str, res, note: str | None, secondary: TestResult | None = None) -> Omnibus:
    stat, p = _finite(res.statistic), _finite(res.pvalue)
    reason = None if p is not None else f"{test} not computable on these values"
    return Omnibus(test, stat if p is not None else None, p, join_reasons(note, reason), secondary)


def welch_anova(groups: Sequence[np.ndarray]) -> Omnibus:
    """groups: k arrays [n_i]; NaN dropped. Welch's ANOVA, with Kruskal-Wallis as secondary."""
    cleaned = [drop_nan(g) for g in groups]
    dropped = sum(d for _, d in cleaned)
    gs = [g for g, _ in cleaned if g.size > 0]
    note = f"{dropped} non-finite value(s) dropped" if dropped else None
    secondary = kruskal(gs)
    if len(gs) < 2:
        why = "fewer than 2 settings with data"
        return Omnibus("welch_anova", None, None, join_reasons(note, why), secondary)
    if min(g.size for g in gs) < MIN_N:
        return Omnibus("welch_anova", None, None,
                       join_reasons(note, f"a setting has fewer than {MIN_N} runs"), secondary)
    if any(is_constant(g) for g in gs):
        # Welch weights are n / variance: a zero-variance group has infinite weight.
        why = "a setting has zero variance: Welch weights undefined"
        return Omnibus("welch_anova", None, None, join_reasons(note, why), secondary)
    res = quiet(anova_oneway, gs, use_var="unequal")
    return _omnibus_from("welch_anova", res, note, secondary)


def kruskal(groups: Sequence[np.ndarray]) -> TestResult:
    """groups: k arrays [n_i] of finite values -> Kruskal-Wallis H test."""
    gs = [g for g in groups if g.size > 0]
    if len(gs) < 2:
        return TestResult("kruskal", None, None, "fewer than 2 settings with data")
    if is_constant(np.concatenate(gs)):
        return TestResult("kruskal", None, None, "every run gives the same value: no ranks")
    res = quiet(sps.kruskal, *gs)
    return _test_from("kruskal", res)


def _test_from(test: str, res) -> TestResult:
    stat, p = _finite(res.statistic), _finite(res.pvalue)
    if p is None:
        return TestResult(test, None, None, f"{test} not computable on these values")
    return TestResult(test, stat, p)


# ----------------------------------------------------------------------------- location


def _location(test: str, diff: float, se: float, df: float, constant: bool,
              why_different: str) -> Shift:
    """Shared t machinery. `constant`: the data have no spread, so t = diff / 0 is undefined and
    the interval collapses to the point [diff, diff]."""
    if constant:
        if abs(diff) > TOLERANCE:
            return Shift(test, diff, (diff, diff), None, None, "different",
                         f"{why_different}: t undefined, different by construction")
        return Shift(test, diff, (diff, diff), None, None, None,
                     "no spread and a difference of exactly 0: t undefined")
    t = diff / se
    # special.stdtr is the CDF behind scipy.stats.t, without the distribution-object overhead
    # (20x faster, which the calibration tests' thousands of studies need).
    p = float(2 * special.stdtr(df, -abs(t)))
    return Shift(test, diff, t_interval(diff, se, df), float(t), p)


def paired_t(x: np.ndarray, y: np.ndarray) -> Shift:
    """x, y: [n] finite, aligned by seed -> paired t on d = x - y."""
    d = x - y
    se = float(d.std(ddof=1)) / math.sqrt(d.size)
    return _location("paired_t", float(d.mean()), se, d.size - 1, is_constant(d),
                     "every seed differs by the same amount")


def welch_df(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """x: [n1], y: [n2] -> (standard error of mean(x) - mean(y), Welch-Satterthwaite df)."""
    a, b = x.var(ddof=1) / x.size, y.var(ddof=1) / y.size
    se2 = a + b
    if se2 == 0:
        return 0.0, float("nan")
    df = se2**2 / (a**2 / (x.size - 1) + b**2 / (y.size - 1))
    return float(math.sqrt(se2)), float(df)


def welch_t(x: np.ndarray, y: np.ndarray) -> Shift:
    """x: [n1], y: [n2] finite -> Welch t on mean(x) - mean(y)."""
    se, df = welch_df(x, y)
    constant = is_constant(x) and is_constant(y)
    return _location("welch_t", float(x.mean() - y.mean()), se, df, constant,
                     "both settings are constant across runs and differ")


# ----------------------------------------------------------------------------- ranks, effect sizes


def wilcoxon(x: np.ndarray, y: np.ndarray, grid: float | None = None) -> TestResult:
    """x, y: [n] finite, aligned by seed -> Wilcoxon signed-rank on x - y (scipy's defaults:
    zero differences dropped, exact null distribution for small n without ties, a permutation
    test with ties). grid: differences are rounded to it first (see `on_grid`)."""
    d = on_grid(x - y, grid)
    if np.all(np.abs(d) <= (0 if grid is not None else TOLERANCE)):
        return TestResult("wilcoxon", None, None, "every difference is 0: no signed ranks")
    p = signed_rank_p(d)
    return TestResult("wilcoxon", None, p, None if p is not None else "wilcoxon not computable")


def mann_whitney(x: np.ndarray, y: np.ndarray, grid: float | None = None) -> TestResult:
    """x: [n1], y: [n2] finite -> two-sided Mann-Whitney U (statistic is U of x); values are
    rounded to `grid` first (see `on_grid`)."""
    x, y = on_grid(x, grid), on_grid(y, grid)
    if is_constant(np.concatenate([x, y])):
        return TestResult("mann_whitney", None, None, "every run gives the same value: no ranks")
    return _test_from("mann_whitney", quiet(sps.mannwhitneyu, x, y, alternative="two-sided"))


def hedges_correction(df: float) -> float:
    """Exact small-sample factor J(df) = Gamma(df/2) / (sqrt(df/2) Gamma((df-1)/2)) ~ 1 - 3/(4df-1)."""
    return float(math.exp(special.gammaln(df / 2) - special.gammaln((df - 1) / 2)) / math.sqrt(df / 2))


def hedges_g(x: np.ndarray, y: np.ndarray) -> float | None:
    """x: [n1], y: [n2] -> (mean(x) - mean(y)) / pooled SD * J(n1 + n2 - 2).

    Standardised by the pooled SD of the two groups (for paired data that is the root mean of
    the two variances, Cumming's d_av), not by the SD of the differences: that keeps g on the
    same scale in paired and unpaired strata and stops it growing with the seed correlation."""
    df = x.size + y.size - 2
    pooled = ((x.size - 1) * x.var(ddof=1) + (y.size - 1) * y.var(ddof=1)) / df
    if pooled <= TOLERANCE**2:
        return None
    return float((x.mean() - y.mean()) / math.sqrt(pooled) * hedges_correction(df))


def prob_superiority(x: np.ndarray, y: np.ndarray, paired: bool) -> float:
    """Paired (x, y: [n]): share of seeds with x > y; unpaired: P(X > Y) = U / (n1 n2). Ties count half."""
    diff = (x - y) if paired else (x[:, None] - y[None, :]).ravel()
    wins = (diff > TOLERANCE).sum() + 0.5 * (np.abs(diff) <= TOLERANCE).sum()
    return float(wins / diff.size)


# ----------------------------------------------------------------------------- equivalence


def _tost(diff: float, se: float, df: float, margin: float, constant: bool, name: str) -> TestResult:
    if constant:
        if abs(diff) <= TOLERANCE and margin > 0:
            return TestResult(name, None, None, "every difference is exactly 0 and the margin is "
                              "positive: equivalent by construction", forced="equivalent")
        return TestResult(name, None, None, "no spread: TOST undefined")
    p_low = special.stdtr(df, -(diff + margin) / se)  # H0: diff <= -margin
    p_high = special.stdtr(df, (diff - margin) / se)  # H0: diff >= +margin
    return TestResult(name, None, float(max(p_low, p_high)))


def tost_paired(x: np.ndarray, y: np.ndarray, margin: float) -> TestResult:
    """x, y: [n] aligned by seed -> TOST on d = x - y against (-margin, +margin); p = max of both."""
    d = x - y
    se = float(d.std(ddof=1)) / math.sqrt(d.size)
    return _tost(float(d.mean()), se, d.size - 1, margin, is_constant(d), "tost_paired")


def tost_welch(x: np.ndarray, y: np.ndarray, margin: float) -> TestResult:
    """x: [n1], y: [n2] -> Welch TOST on mean(x) - mean(y) against (-margin, +margin)."""
    se, df = welch_df(x, y)
    constant = is_constant(x) and is_constant(y)
    return _tost(float(x.mean() - y.mean()), se, df, margin, constant, "tost_welch")


# ----------------------------------------------------------------------------- three location analyses

FAMILIES = ("t", "rank", "trimmed")
TRIM = 0.2


@dataclass(frozen=True)
class Location:
    """One location analysis of setting (x) against baseline (y), every estimate x - y.

    family "t": mean difference, paired t / Welch t, t TOST. "rank": Hodges-Lehmann shift,
    Wilcoxon signed-rank / Mann-Whitney, rank TOST. "trimmed": difference of 20%-trimmed means,
    Yuen's paired / unpaired test, Yuen TOST. ci90 is the interval dual to the unadjusted TOST at
    alpha = 0.05 (inside +-margin iff the TOST passes; for ranks up to discreteness and ties).
    p is two-sided against no shift; tost_p the larger of the two one-sided p at +-margin.
    `forced` is a verdict settled by construction when every difference is the same number."""

    family: str
    test: str
    estimate: float | None
    ci95: tuple[float, float] | None
    ci90: tuple[float, float] | None
    p: float | None
    tost_p: float | None
    forced: str | None = None
    reason: str | None = None


def _test_name(family: str, paired: bool) -> str:
    names = {"t": ("paired_t", "welch_t"), "rank": ("wilcoxon", "mann_whitney"),
             "trimmed": ("yuen_paired", "yuen")}
    if family not in names:
        raise ValueError(f"unknown family {family!r}: expected one of {FAMILIES}")
    return names[family][0 if paired else 1]


def on_grid(v: np.ndarray, grid: float | None) -> np.ndarray:
    """v: [n] -> v in grid units, rounded to whole units (floats holding integers); unchanged
    when grid is None. Accuracies are counts / 10k (or means of K such): two differences that
    are equal on that grid differ by ~1e-16 in floats and would otherwise rank as distinct."""
    return np.asarray(v, dtype=float) if grid is None else np.rint(np.asarray(v, dtype=float) / grid)


def _clean(x: np.ndarray, y: np.ndarray, paired: bool) -> tuple[np.ndarray, np.ndarray, str | None]:
    if paired:
        x, y, dropped = drop_nan_pairs(x, y)
        return x, y, f"{dropped} pair(s) with non-finite values dropped" if dropped else None
    (x, dx), (y, dy) = drop_nan(x), drop_nan(y)
    return x, y, f"{dx + dy} run(s) with non-finite values dropped" if dx + dy else None


def constant_gap(x: np.ndarray, y: np.ndarray, paired: bool, grid: float | None = None) -> float | None:
    """The gap x - y when it is the same for every seed (paired: every difference equal; unpaired:
    both groups constant), rounded to the grid when one is given; None when it varies."""
    tol = grid / 2 if grid is not None else TOLERANCE
    if paired:
        d = x - y
        flat, gap = float(np.ptp(d)) <= tol, float(d.mean())
    else:
        flat = float(np.ptp(x)) <= tol and float(np.ptp(y)) <= tol
        gap = float(x.mean() - y.mean())
    if not flat:
        return None
    return float(np.rint(gap / grid) * grid) if grid is not None else gap


def settle_gap(gap: float, margin: float, grid: float | None = None) -> str:
    """Verdict for a gap that holds for every seed: no test is needed (or defined)."""
    tol = grid / 2 if grid is not None else TOLERANCE
    if abs(gap) <= tol:
        return "equivalent"
    return "negligible" if abs(gap) <= margin + tol else "different"


def settled_reason(gap: float, margin: float, verdict_: str) -> str:
    return (f"every seed differs by the same amount ({gap:+.6g}; margin {margin:g}): no spread, so "
            f"the test statistic is undefined and the verdict is settled by construction: {verdict_}")


def _forced_location(family: str, test: str, gap: float, margin: float, grid: float | None,
                     note: str | None) -> Location:
    verdict_ = settle_gap(gap, margin, grid)
    why = settled_reason(gap, margin, verdict_)
    return Location(family, test, gap, (gap, gap), (gap, gap), None, None, verdict_,
                    join_reasons(note, why))


def location(family: str, x: np.ndarray, y: np.ndarray, *, paired: bool, margin: float,
             grid: float | None = None) -> Location:
    """x: [n] setting, y: [n] baseline aligned by seed when paired, else [n1], [n2]; NaN dropped.

    grid: resolution of the accuracies (1e-4 for 10k test images, 1/(K 10000) for a mean of K
    epochs); rank tests round to it before ranking. Unadjusted; see `holm`, `verdict`."""
    test = _test_name(family, paired)
    x, y, note = _clean(x, y, paired)
    if min(x.size, y.size) < MIN_N:
        why = f"fewer than {MIN_N} runs per group"
        return Location(family, test, None, None, None, None, None, None, join_reasons(note, why))
    gap = constant_gap(x, y, paired, grid)
    if gap is not None:
        return _forced_location(family, test, gap, margin, grid, note)
    if family == "rank":
        return _rank_location(test, x, y, paired, margin, grid, note)
    est, se, df = _t_parts(x, y, paired) if family == "t" else yuen_parts(x, y, paired)
    return _studentised(family, test, est, se, df, margin, note)


def location_ci(family: str, x: np.ndarray, y: np.ndarray, *, paired: bool, level: float,
                grid: float | None = None) -> tuple[float, float] | None:
    """Interval for the family's shift estimate at `level` (x, y, grid as in `location`); the
    point when the gap is constant; None when not computable."""
    _test_name(family, paired)
    x, y, _ = _clean(x, y, paired)
    if min(x.size, y.size) < MIN_N:
        return None
    gap = constant_gap(x, y, paired, grid)
    if gap is not None:
        return (gap, gap)
    if family == "rank":
        return hodges_lehmann(x, y, paired, level, grid)[1]
    est, se, df = _t_parts(x, y, paired) if family == "t" else yuen_parts(x, y, paired)
    return t_interval(est, se, df, level) if se > 0 else None


# t and Yuen: a shift, its standard error and degrees of freedom, then the same machinery.


def _t_parts(x: np.ndarray, y: np.ndarray, paired: bool) -> tuple[float, float, float]:
    if paired:
        d = x - y
        return float(d.mean()), float(d.std(ddof=1)) / math.sqrt(d.size), d.size - 1
    se, df = welch_df(x, y)
    return float(x.mean() - y.mean()), se, df


def _studentised(family: str, test: str, est: float, se: float, df: float, margin: float,
                 note: str | None) -> Location:
    if not se > 0:
        why = "standard error 0 although the gap varies (winsorised variances 0): test undefined"
        return Location(family, test, est, None, None, None, None, None, join_reasons(note, why))
    p = float(2 * special.stdtr(df, -abs(est / se)))
    p_low = special.stdtr(df, -(est + margin) / se)  # H0: shift <= -margin
    p_high = special.stdtr(df, (est - margin) / se)  # H0: shift >= +margin
    return Location(family, test, est, t_interval(est, se, df, 0.95), t_interval(est, se, df, 0.90),
                    p, float(max(p_low, p_high)), None, note)


def trimmed_mean(x: np.ndarray, trim: float = TRIM) -> float:
    """x: [n] -> mean after cutting floor(trim n) values from each end (scipy's trim_mean)."""
    g = int(math.floor(trim * x.size))
    return float(np.sort(x)[g:x.size - g].mean())


def winsorise(x: np.ndarray, trim: float = TRIM) -> np.ndarray:
    """x: [n] -> [n] in the same order, the floor(trim n) lowest raised to the next value up and
    the same number of highest lowered to the next value down."""
    g = int(math.floor(trim * x.size))
    s = np.sort(x)
    return np.clip(x, s[g], s[x.size - 1 - g])


def yuen_parts(x: np.ndarray, y: np.ndarray, paired: bool, trim: float = TRIM
               ) -> tuple[float, float, float]:
    """x, y: [n] (paired) or [n1], [n2] -> (trimmed-mean difference, its SE, df) of Yuen's test.

    Unpaired (Yuen 1974): d_i = (n_i - 1) s2_w,i / (h_i (h_i - 1)), h_i = n_i - 2 floor(trim n_i),
    se = sqrt(d_1 + d_2), Welch-type df. Paired (Wilcox 2012, `yuend`): both samples winsorised
    separately, se^2 = (n - 1)(s2_wx + s2_wy - 2 cov_w) / (h (h - 1)), df = h - 1."""
    est = trimmed_mean(x, trim) - trimmed_mean(y, trim)
    wx, wy = winsorise(x, trim), winsorise(y, trim)
    h = lambda v: v.size - 2 * int(math.floor(trim * v.size))  # noqa: E731
    if paired:
        n, hx = x.size, h(x)
        q = (n - 1) * (wx.var(ddof=1) + wy.var(ddof=1) - 2 * np.cov(wx, wy, ddof=1)[0, 1])
        return est, float(math.sqrt(max(q, 0.0) / (hx * (hx - 1)))), float(hx - 1)
    dx = (x.size - 1) * wx.var(ddof=1) / (h(x) * (h(x) - 1))
    dy = (y.size - 1) * wy.var(ddof=1) / (h(y) * (h(y) - 1))
    if dx + dy == 0:
        return est, 0.0, float("nan")
    df = (dx + dy) ** 2 / (dx**2 / (h(x) - 1) + dy**2 / (h(y) - 1))
    return est, float(math.sqrt(dx + dy)), float(df)


# ranks: Hodges-Lehmann shift and its distribution-free interval, scipy's tests for p.


def signed_rank_null(n: int) -> np.ndarray:
    """[n(n+1)/2 + 1] exact null pmf of the signed-rank sum T+ over n untied, nonzero values:
    the coefficients of prod_i (1 + q^i) / 2^n."""
    pmf = np.ones(1)
    for i in range(1, n + 1):
        pmf = np.concatenate([pmf, np.zeros(i)]) + np.concatenate([np.zeros(i), pmf])
    return pmf / pmf.sum()


def mann_whitney_null(n1: int, n2: int) -> np.ndarray:
    """[n1 n2 + 1] exact null pmf of U over untied samples: the coefficients of the Gaussian
    binomial [n1 + n2 choose n1]_q = prod_{i=1..n1} (1 - q^(n2+i)) / (1 - q^i)."""
    m, n = sorted((n1, n2))
    poly = np.zeros(m * n + 1)
    poly[0] = 1.0
    for i in range(1, m + 1):
        poly[n + i:] -= poly[:m * n + 1 - (n + i)].copy()  # times (1 - q^(n+i))
        for k in range(i, poly.size):  # divided by (1 - q^i): a running sum with stride i
            poly[k] += poly[k - i]
    return poly / poly.sum()


def _rank_null_cdf(paired: bool, n1: int, n2: int) -> np.ndarray:
    """[N + 1] P(S <= c), c = 0..N, for the statistic whose order statistics bound the interval
    (N = n(n+1)/2 Walsh averages, or n1 n2 differences). Exact where scipy's tests use the exact
    law (signed rank: n <= 50; Mann-Whitney: a group of <= 8), normal otherwise (Mann-Whitney
    with scipy's 0.5 continuity correction, signed rank without, as scipy's defaults)."""
    if paired and n1 <= 50:
        return np.cumsum(signed_rank_null(n1))
    if not paired and min(n1, n2) <= 8:
        return np.cumsum(mann_whitney_null(n1, n2))
    if paired:
        big, mu, cc = n1 * (n1 + 1) // 2, n1 * (n1 + 1) / 4, 0.0
        sd = math.sqrt(n1 * (n1 + 1) * (2 * n1 + 1) / 24)
    else:
        big, mu, cc = n1 * n2, n1 * n2 / 2, 0.5
        sd = math.sqrt(n1 * n2 * (n1 + n2 + 1) / 12)
    return special.ndtr((np.arange(big + 1) + cc - mu) / sd)


def hodges_lehmann(x: np.ndarray, y: np.ndarray, paired: bool, level: float = LEVEL,
                   grid: float | None = None) -> tuple[float, tuple[float, float] | None, str | None]:
    """x, y: [n] paired or [n1], [n2] -> (HL shift, interval at `level`, reason).

    Paired: median of the Walsh averages (d_i + d_j)/2, i <= j; unpaired: median of all x_i - y_j.
    Interval [W_(k), W_(N-k+1)] with k the smallest c where P(S <= c) > (1 - level)/2: exactly
    the shifts the two-sided rank test at 1 - level does not reject (untied data). Ties (after
    rounding to the grid) make the interval conservative; the order statistics stay defined.
    Zero differences stay among the Walsh averages here, while scipy's test (the p) drops them."""
    scale = 1.0 if grid is None else grid
    if paired:
        d = on_grid(x - y, grid)
        i, j = np.triu_indices(d.size)
        w = np.sort((d[i] + d[j]) / 2)
    else:
        w = np.sort((on_grid(x, grid)[:, None] - on_grid(y, grid)[None, :]).ravel())
    cdf = _rank_null_cdf(paired, x.size, y.size)
    k = int(np.argmax(cdf > (1 - level) / 2))  # first c with P(S <= c) > alpha / 2
    est = float(np.median(w)) * scale
    if k == 0:
        return est, None, f"too few runs for a {level:.0%} rank interval (even the widest is shorter)"
    return est, (float(w[k - 1]) * scale, float(w[w.size - k]) * scale), None


# Up to this many nonzero differences, tied signed ranks get their exact permutation p-value by
# enumerating all 2^n sign patterns at once (65,536 x 16 here); scipy reaches the same number
# through `permutation_test`, one pattern at a time, ~1 s a call at n = 10.
EXACT_SIGNED_RANK_MAX = 16


def signed_rank_p(d: np.ndarray, alternative: str = "two-sided") -> float | None:
    """d: [n] paired differences -> Wilcoxon signed-rank p, as scipy's `wilcoxon` defaults give it
    (zeros dropped, midranks for ties, exact when untied and n <= 50, the exact permutation law
    when tied), the tied case enumerated here for speed; None when every difference is 0."""
    d = np.asarray(d, dtype=float)
    d = d[d != 0]
    if d.size == 0:
        return None
    ranks = sps.rankdata(np.abs(d))
    if np.unique(ranks).size == ranks.size or d.size > EXACT_SIGNED_RANK_MAX:
        return _finite(quiet(sps.wilcoxon, d, alternative=alternative).pvalue)
    patterns = (np.arange(2 ** d.size)[:, None] >> np.arange(d.size)) & 1
    null = patterns @ ranks  # T+ under every assignment of signs
    observed = ranks[d > 0].sum()
    eps = 1e-9 * max(1.0, observed)  # midranks are multiples of 0.5: a safe float tolerance
    greater, less = float(np.mean(null >= observed - eps)), float(np.mean(null <= observed + eps))
    return {"greater": greater, "less": less,
            "two-sided": min(1.0, 2 * min(greater, less))}[alternative]


def _rank_p(ux: np.ndarray, uy: np.ndarray, paired: bool, alternative: str) -> float | None:
    if paired:
        return signed_rank_p(ux - uy, alternative)
    return _finite(quiet(sps.mannwhitneyu, ux, uy, alternative=alternative).pvalue)


def _rank_location(test: str, x: np.ndarray, y: np.ndarray, paired: bool, margin: float,
                   grid: float | None, note: str | None) -> Location:
    """Rank tests on grid units. TOST: one-sided rank tests of (shift + margin > 0) and
    (shift - margin < 0), the larger p; dual to the 90% HL interval lying inside +-margin up to
    discreteness and ties (the interval's critical value is the untied one)."""
    ux, uy = on_grid(x, grid), on_grid(y, grid)
    mu = margin if grid is None else float(np.rint(margin / grid))
    est, ci95, why95 = hodges_lehmann(x, y, paired, 0.95, grid)
    _, ci90, why90 = hodges_lehmann(x, y, paired, 0.90, grid)
    p = _rank_p(ux, uy, paired, "two-sided")
    p_low = _rank_p(ux + mu, uy, paired, "greater")
    p_high = _rank_p(ux - mu, uy, paired, "less")
    tost = None if p_low is None or p_high is None else max(p_low, p_high)
    why = join_reasons(note, why95 if ci90 is not None else why90,
                       None if p is not None else "rank test not computable on these values",
                       None if tost is not None else "rank TOST not computable on these values")
    return Location("rank", test, est, ci95, ci90, p, tost, None, why)


# ----------------------------------------------------------------------------- spread


def sd_ratio_ci(x: np.ndarray, y: np.ndarray, paired: bool, rng: np.random.Generator,
                n_boot: int = 10_000, level: float = LEVEL
                ) -> tuple[tuple[float | None, float | None], str | None]:
    """x: [n1], y: [n2] -> bootstrap interval of SD(x)/SD(y) (see `bootstrap_ci`) and a reason.

    Paired data are resampled by seed (x and y together) so the interval keeps their correlation.
    Resamples where both SDs are 0 (0/0) are dropped; an infinite bound (baseline resample SD 0)
    is reported as None."""
    ci, method, why = bootstrap_ci(sd_ratio, (x, y), paired=paired, rng=rng, n_resamples=n_boot,
                                   level=level)
    return (ci if ci is not None else (None, None)), why


def spread(x: np.ndarray, y: np.ndarray, paired: bool, rng: np.random.Generator,
           n_boot: int = 10_000, grid: float | None = None) -> Spread:
    """x: [n1] setting, y: [n2] baseline -> SD ratio with CI, Brown-Forsythe and Fligner-Killeen.

    grid: accuracy resolution (see `on_grid`); Fligner ranks |value - median|, so it runs on grid
    units, where deviations that are equal on the grid are equal floats too."""
    if is_constant(x) and is_constant(y):
        why = "both settings have zero variance: equal spread by construction, nothing to test"
        none = TestResult("brown_forsythe", None, None, why)
        return Spread(None, None, none, TestResult("fligner", None, None, why), why)
    bf = _test_from("brown_forsythe", quiet(sps.levene, x, y, center="median"))
    fk = _test_from("fligner", quiet(sps.fligner, on_grid(x, grid), on_grid(y, grid)))
    sx, sy = float(x.std(ddof=1)), float(y.std(ddof=1))
    if sy <= TOLERANCE:
        return Spread(None, None, bf, fk, "baseline SD is 0: ratio undefined")
    ci, note = sd_ratio_ci(x, y, paired, rng, n_boot)
    return Spread(sx / sy, ci, bf, fk, note)


# ----------------------------------------------------------------------------- power


def _chi2_pdf(v: float, df: float) -> float:
    return math.exp((df / 2 - 1) * math.log(v) - v / 2 - df / 2 * math.log(2) - special.gammaln(df / 2))


def _chi2_range(df: float) -> tuple[float, float]:
    """Where all but 2e-15 of a chi-square(df) lies: quadrature over it loses nothing visible."""
    return float(special.chdtri(df, 1 - 1e-15)), float(special.chdtri(df, 1e-15))


def _nct_cdf_quad(t: float, df: float, nc: float) -> float:
    """P(T <= t) for T ~ noncentral t(df, nc), as E_V[Phi(t sqrt(V/df) - nc)], V ~ chi2(df):
    T = (Z + nc) / sqrt(V/df). A bounded integrand over a finite range, so never NaN."""
    lo, hi = _chi2_range(df)
    f = lambda v: special.ndtr(t * math.sqrt(v / df) - nc) * _chi2_pdf(v, df)  # noqa: E731
    return min(1.0, max(0.0, integrate.quad(f, lo, hi, points=[df], epsabs=1e-13, limit=200)[0]))


def nct_cdf(t: float, df: float, nc: float) -> float:
    """CDF of the noncentral t. scipy's nctdtr is exact where it answers, but returns NaN in
    the far tails (t = -t_crit once nc > ~8, t = +t_crit once nc > ~35, measured on scipy
    1.17); reading that NaN as "power not reached" gave wrong seed counts. There the
    quadrature above takes over."""
    with np.errstate(all="ignore"):
        value = float(special.nctdtr(df, nc, t))
    return value if 0.0 <= value <= 1.0 else _nct_cdf_quad(t, df, nc)


def _t_design(n1: int, n2: int, paired: bool) -> tuple[float, float]:
    """(df, sqrt of the effective n): the t statistic's noncentrality is effect * that root."""
    if paired:
        return n1 - 1, math.sqrt(n1)
    return n1 + n2 - 2, math.sqrt(n1 * n2 / (n1 + n2))


def _power(effect: float, n1: int, n2: int, alpha: float, paired: bool) -> float:
    """Power of the two-sided t test (Student's, pooled SD when unpaired) for a standardised
    effect; n2 is ignored when paired."""
    df, root = _t_design(n1, n2, paired)
    nc, crit = abs(effect) * root, float(special.stdtrit(df, 1 - alpha / 2))
    return (1.0 - nct_cdf(crit, df, nc)) + nct_cdf(-crit, df, nc)


def _tost_power(margin_effect: float, n1: int, n2: int, alpha: float, paired: bool,
                gap_effect: float = 0.0) -> float:
    """Probability that the TOST at `alpha` shows equivalence within +-margin when the true gap
    is `gap_effect` (0 by default; both in SD units). It passes when |mean diff| < margin -
    t_{1-alpha} * se, so power = E_V[max(0, Phi(delta - g - w) - Phi(-delta - g + w))] with
    delta = margin / (sd / root), g = gap / (sd / root), w = t sqrt(V/df)."""
    df, root = _t_design(n1, n2, paired)
    delta, crit, g = margin_effect * root, float(special.stdtrit(df, 1 - alpha)), gap_effect * root
    v_max = df * (delta / crit) ** 2  # beyond it the margin minus the critical width is < 0
    lo, hi = _chi2_range(df)
    if v_max <= lo:
        return 0.0
    def f(v: float) -> float:
        w = crit * math.sqrt(v / df)
        return (special.ndtr(delta - g - w) - special.ndtr(-delta - g + w)) * _chi2_pdf(v, df)
    points = [df] if lo < df < min(hi, v_max) else None
    return float(integrate.quad(f, lo, min(hi, v_max), points=points, epsabs=1e-13, limit=200)[0])


def power_at(diff: float, sd: float, n: int, alpha: float, paired: bool) -> float:
    """Predicted power of the two-sided t test for a true difference `diff` (accuracy units).

    sd: SD of the paired differences (paired) or the common SD of both groups (unpaired);
    n: pairs (paired) or runs per group (unpaired, equal groups)."""
    return _power(abs(diff) / sd, n, n, alpha, paired)


def tost_power_at(margin: float, sd: float, n: int, alpha: float, paired: bool,
                  gap: float = 0.0) -> float:
    """Predicted probability that the TOST within +-margin passes when the true gap is `gap`
    (0 by default); sd and n as in `power_at`."""
    return _tost_power(margin / sd, n, n, alpha, paired, gap / sd)


def _min_effect(n1: int, n2: int, alpha: float, power: float, paired: bool) -> float | None:
    """Smallest standardised effect reaching `power`. Root-found here rather than with
    statsmodels' solve_power, which warns and returns NaN outside its search bounds."""
    gap = lambda e: _power(e, n1, n2, alpha, paired) - power  # noqa: E731
    hi = 1.0
    while not gap(hi) >= 0:  # power rises to 1 with the effect; double until bracketed
        hi *= 2
        if hi > 1e4:
            return None
    return float(optimize.brentq(gap, 0.0, hi, xtol=1e-12))


def _min_n(reaches, cap: int = 1_000_000) -> int | None:
    """Smallest n >= 2 with reaches(n) true, for reaches monotone in n; None past `cap`."""
    lo, hi = 1, 2
    while not reaches(hi):
        lo, hi = hi, hi * 2
        if hi > cap:
            return None
    while hi - lo > 1:  # invariant: reaches(hi), not reaches(lo) (lo = 1 stands for "below 2")
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if reaches(mid) else (mid, hi)
    return hi


def _min_seeds(effect: float, alpha: float, power: float, paired: bool,
               cap: int = 1_000_000) -> int | None:
    """Seeds per setting (pairs, or runs per group) for the t test to reach `power`."""
    return _min_n(lambda n: _power(effect, n, n, alpha, paired) >= power, cap)


def _min_seeds_equivalence(margin_effect: float, alpha: float, power: float, paired: bool,
                           cap: int = 1_000_000) -> int | None:
    """Seeds per setting for the TOST to show equivalence with probability `power` at gap 0."""
    return _min_n(lambda n: _tost_power(margin_effect, n, n, alpha, paired) >= power, cap)


def power_analysis(diff: float, sd: float, n_setting: int, n_baseline: int, paired: bool,
                   alpha: float = 0.05, power: float = 0.8, margin: float | None = None) -> Power:
    """Minimum detectable |difference| with the n used, and seeds needed per setting.

    sd: SD of the paired differences (paired) or pooled SD (unpaired); n_setting = pairs when
    paired. seeds_needed: to detect the observed difference; seeds_needed_margin: a difference
    equal to `margin`; seeds_needed_equivalence: for the TOST to show equivalence within
    +-margin when the true gap is 0. All at the nominal alpha (no multiplicity correction, so
    with several settings they are optimistic), two-sided t / TOST, equal n per group, the
    observed SD taken as the truth; power from the noncentral t (`nct_cdf`)."""
    if n_setting < 2 or n_baseline < 2:
        return Power(None, None, reason="fewer than 2 runs per group: power undefined")
    if not sd > TOLERANCE:
        return Power(None, None, reason="SD is 0: power undefined")
    effect = _min_effect(n_setting, n_baseline, alpha, power, paired)
    mde = effect * sd if effect is not None else None
    reasons = [None if mde is not None else "power equation has no root for the n used"]
    needed = None
    if abs(diff) <= TOLERANCE:
        reasons.append("observed difference is 0: no seed count detects it")
    else:
        needed = _min_seeds(abs(diff) / sd, alpha, power, paired)
        if needed is None:
            reasons.append("observed difference too small: over a million seeds needed")
    by_margin = by_equivalence = None
    if margin is not None and not margin > 0:
        reasons.append("margin is not positive: no seed count for it")
    elif margin is not None:
        by_margin = _min_seeds(margin / sd, alpha, power, paired)
        by_equivalence = _min_seeds_equivalence(margin / sd, alpha, power, paired)
        if by_margin is None or by_equivalence is None:
            reasons.append("margin too small against the SD: over a million seeds needed")
    return Power(mde, needed, by_margin, by_equivalence, join_reasons(*reasons))


def pooled_sd(x: np.ndarray, y: np.ndarray) -> float:
    """x: [n1], y: [n2] -> sqrt of the df-weighted mean of the two variances."""
    df = x.size + y.size - 2
    return float(math.sqrt(((x.size - 1) * x.var(ddof=1) + (y.size - 1) * y.var(ddof=1)) / df))


# ----------------------------------------------------------------------------- one comparison


def compare(setting: np.ndarray, baseline: np.ndarray, *, paired: bool, rng: np.random.Generator,
            margin: float, alpha: float = 0.05, power: float = 0.8, n_boot: int = 10_000) -> Comparison:
    """setting, baseline: [n] aligned by seed when paired, else [n1], [n2]; NaN dropped (pairs
    where either side is NaN when paired). Returns unadjusted p-values; see `holm`, `verdict`."""
    if paired:
        x, y, dropped = drop_nan_pairs(setting, baseline)
    else:
        (x, dx), (y, dy) = drop_nan(setting), drop_nan(baseline)
        dropped = dx + dy
    unit = "pair(s)" if paired else "run(s)"
    note = f"{dropped} {unit} with non-finite values dropped" if dropped else None
    n = x.size if paired else x.size + y.size
    if min(x.size, y.size) < MIN_N:
        why = join_reasons(note, f"fewer than {MIN_N} runs per group")
        return _too_few(paired, n, x.size, y.size, dropped, why)
    shift = paired_t(x, y) if paired else welch_t(x, y)
    rank = wilcoxon(x, y) if paired else mann_whitney(x, y)
    tost = tost_paired(x, y, margin) if paired else tost_welch(x, y, margin)
    spr = spread(x, y, paired, rng, n_boot)
    sd = float((x - y).std(ddof=1)) if paired else pooled_sd(x, y)
    pw = power_analysis(shift.mean_diff, sd, x.size, y.size, paired, alpha, power, margin)
    forced, shift_why, tost_why = shift.forced or tost.forced, shift.reason, tost.reason
    gap = constant_gap(x, y, paired)
    if gap is not None:  # t's own "forced" knows no margin: a one-image gap is not "different"
        forced = settle_gap(gap, margin)
        shift_why = tost_why = settled_reason(gap, margin, forced)
    return Comparison(
        paired=paired, n=n, n_setting=int(x.size), n_baseline=int(y.size), n_dropped=dropped,
        mean_diff=shift.mean_diff, mean_diff_ci95=shift.ci95, test=shift.test, p=shift.p,
        rank_test=rank.test, rank_p=rank.p, hedges_g=hedges_g(x, y),
        prob_superiority=prob_superiority(x, y, paired), tost_p=tost.p,
        variance_ratio=spr.ratio, variance_ratio_ci95=spr.ratio_ci95,
        brown_forsythe_p=spr.brown_forsythe.p, fligner_p=spr.fligner.p,
        mde=pw.mde, seeds_needed=pw.seeds_needed, forced=forced,
        reason=join_reasons(note, shift_why, rank.reason, tost_why, spr.reason,
                     spr.brown_forsythe.reason, spr.fligner.reason, pw.reason), power=pw)


def _too_few(paired: bool, n: int, n1: int, n2: int, dropped: int, reason: str | None) -> Comparison:
    return Comparison(paired, n, n1, n2, dropped, None, None, "paired_t" if paired else "welch_t",
                      None, "wilcoxon" if paired else "mann_whitney", None, None, None, None,
                      None, None, None, None, None, None, None, reason)


# ----------------------------------------------------------------------------- family and verdicts


def holm(p: Sequence[float | None]) -> list[float | None]:
    """Holm step-down adjusted p-values; None (not computed) stays None and is not in the family.

    Leaving a None out is the same as counting it with p = 0 when it stands for a difference
    that holds by construction: Holm rejects p = 0 first and the others keep their multipliers."""
    idx = [i for i, v in enumerate(p) if v is not None]
    out: list[float | None] = [None] * len(p)
    if not idx:
        return out
    vals = np.array([p[i] for i in idx], dtype=float)
    order = np.argsort(vals, kind="stable")
    m = vals.size
    scaled = np.minimum(1.0, (m - np.arange(m)) * vals[order])
    adjusted = np.maximum.accumulate(scaled)
    for rank, j in enumerate(order):
        out[idx[j]] = float(adjusted[rank])
    return out


def verdict(p_adjusted: float | None, tost_p_adjusted: float | None, alpha: float,
            forced: str | None = None) -> str:
    """One of four, from Holm-adjusted p-values (never "no difference"):

    different    the test rejects and the TOST does not pass
    negligible   the test rejects and the TOST passes: a real gap, shown to lie inside the margin
    equivalent   the TOST passes and the test does not reject
    inconclusive neither
    `forced` (a verdict settled by construction, see `settle_gap`) wins."""
    if forced:
        return forced
    rejects = p_adjusted is not None and p_adjusted < alpha
    passes = tost_p_adjusted is not None and tost_p_adjusted < alpha
    if rejects:
        return "negligible" if passes else "different"
    return "equivalent" if passes else "inconclusive"


def tost_level(alpha: float, holm_multiplier: int) -> float:
    """Confidence level of the interval whose lying inside +-margin is the same decision as the
    TOST at Holm's adjusted level: 1 - 2 alpha / k for multiplier k (0.90 for k = 1, alpha 0.05).

    The TOST passes at level a iff both one-sided tests have p < a iff the 1 - 2a interval
    excludes both margins; Holm compares the k-th smallest-but-(m - k) p with alpha / k. Holm
    also steps down: once one hypothesis is kept all later ones are, whatever their interval."""
    if holm_multiplier < 1:
        raise ValueError(f"Holm multiplier must be >= 1, got {holm_multiplier}")
    return 1 - 2 * alpha / holm_multiplier


def divergence(n_div_setting: int, n_setting: int, n_div_baseline: int, n_baseline: int) -> TestResult:
    """Runs that diverged (NaN loss) in setting vs baseline: Fisher's exact test, two-sided.
    statistic: the sample odds ratio (None when infinite or undefined)."""
    if min(n_setting, n_baseline) < 1:
        return TestResult("fisher_exact", None, None, "a group has no runs")
    if not (0 <= n_div_setting <= n_setting and 0 <= n_div_baseline <= n_baseline):
        raise ValueError("diverged counts must lie between 0 and the number of runs")
    table = [[n_div_setting, n_setting - n_div_setting], [n_div_baseline, n_baseline - n_div_baseline]]
    res = quiet(sps.fisher_exact, table, alternative="two-sided")
    odds = _finite(res.statistic)
    why = None if odds is not None else "odds ratio infinite or undefined (a zero cell)"
    return TestResult("fisher_exact", odds, float(res.pvalue), why)


def variance_verdict(p_adjusted: float | None, alpha: float) -> str:
    """'different' when the adjusted Brown-Forsythe p < alpha, else 'not_shown_different'."""
    return "different" if p_adjusted is not None and p_adjusted < alpha else "not_shown_different"


# ----------------------------------------------------------------------------- trend across strata


@dataclass(frozen=True)
class Slope:
    """A regression slope with its t interval (`df` degrees of freedom) and two-sided p."""

    method: str
    estimate: float | None
    ci95: tuple[float, float] | None
    p: float | None
    df: float | None
    n: int  # points (or per-cluster slopes) behind the estimate
    reason: str | None = None
    intercept: float | None = None  # of the pooled fit (None for the per-cluster slope)


def cluster_slope(x: np.ndarray, y: np.ndarray, groups: np.ndarray, level: float = LEVEL) -> Slope:
    """OLS slope of y on x (x, y, groups: [N]) with cluster-robust (CR1) standard errors by
    `groups` and t inference on G - 1 degrees of freedom: points sharing a group (a seed, whose
    init and data order every stratum reuses) are not counted as independent.

    statsmodels' OLS with cov_type="cluster" (its small-sample correction G/(G-1)*(N-1)/(N-K)).
    """
    import statsmodels.api as sm  # statsmodels.api imports most of statsmodels: only here

    keep = np.isfinite(x) & np.isfinite(y)
    x, y, groups = x[keep], y[keep], np.asarray(groups)[keep]
    _, codes = np.unique(groups, return_inverse=True)
    n_groups = int(codes.max()) + 1 if codes.size else 0
    if x.size == 0:
        return Slope("OLS, standard errors clustered by seed", None, None, None, None, 0,
                     "no finite points")
    method = f"OLS, standard errors clustered by seed (CR1, t on G - 1 = {n_groups - 1} df)"
    if n_groups < MIN_N or is_constant(x):
        return Slope(method, None, None, None, None, int(x.size),
                     f"needs x that varies and at least {MIN_N} clusters (got {n_groups})")
    fit = sm.OLS(y, sm.add_constant(x)).fit(cov_type="cluster", cov_kwds={"groups": codes},
                                            use_t=True)
    lo, hi = fit.conf_int(alpha=1 - level)[1]
    return Slope(method, float(fit.params[1]), (float(lo), float(hi)), float(fit.pvalues[1]),
                 float(fit.df_resid_inference), int(x.size), intercept=float(fit.params[0]))


def per_cluster_slope(x: np.ndarray, y: np.ndarray, groups: np.ndarray,
                      level: float = LEVEL) -> Slope:
    """The slope fitted within each group (x, y, groups: [N]), then a one-sample t interval over
    the groups' slopes: the summary-statistics route, which needs no model of how points within
    a group correlate. Groups whose x does not vary are left out."""
    slopes = []
    for g in np.unique(groups):
        sel = (groups == g) & np.isfinite(x) & np.isfinite(y)
        if sel.sum() >= 2 and not is_constant(x[sel]):
            slopes.append(sps.linregress(x[sel], y[sel]).slope)
    s = np.asarray(slopes)
    method = f"slope within each seed, then a t interval over the {s.size} seeds' slopes"
    if s.size < MIN_N:
        return Slope(method, None, None, None, None, int(s.size),
                     f"fewer than {MIN_N} seeds with a slope")
    res = sps.ttest_1samp(s, 0.0)
    ci = res.confidence_interval(level)
    if not np.isfinite(res.pvalue):  # identical slopes: no spread to test against
        return Slope(method, float(s.mean()), None, None, float(s.size - 1), int(s.size),
                     "every seed has the same slope: no t interval")
    return Slope(method, float(s.mean()), (float(ci.low), float(ci.high)), float(res.pvalue),
                 float(s.size - 1), int(s.size))

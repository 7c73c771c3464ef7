"""Anytime-valid inference for a paired mean gap with unknown variance: the t-mixture.

    python -c "import numpy as np; from study.analysis import sequential as sq; \
        print(sq.decide(np.array([.004, .006, .001, .009, .005] * 4), sq.Design(start=10)))"

The test (Lai 1976; Howard et al. 2021, "Time-uniform, nonparametric, nonasymptotic confidence
sequences", sec. on the normal mixture; Lindon et al., anytime-valid linear models) is the
Bayes factor of "mean = mu0" against a mixture of alternatives, both with the right-Haar prior
1/sigma on the unknown SD and the standardised effect delta = (mean - mu0) / sigma mixed over
N(0, 1 / precision). With n paired gaps, their mean m and sum of squares about it SS:

    u  = n (m - mu0)^2 / SS          (= t^2 / (n - 1), t the paired t statistic)
    c  = 1 + n / precision
    BF = c^(-1/2) * ((1 + u) / (1 + u / c))^(n / 2)

(Rouder et al. 2009, eq. 1, with its g fixed at 1 / precision). The right-Haar prior makes BF a
nonnegative martingale with mean 1 under "mean = mu0" in the filtration of the scale-invariant
statistics (Perez-Ortiz et al. 2022, "E-statistics, group invariance and anytime valid
testing"), so by Ville's inequality P(BF_n >= 1/alpha for some n) <= alpha whatever the
stopping rule, for Gaussian gaps with any SD. `tests/test_sequential.py` checks the closed form
against a numerical integration of the two priors and the interval below against root finding.

- `p_anytime` = min(1, 1 / running max of BF at mu0 = 0): valid at any stopping time, so plain
  Holm across comparisons that stop at different times stays valid.
- The confidence sequence at n is {mu : BF_n(mu) < 1/alpha}; BF rises with |m - mu|, so it is the
  interval m +- sqrt(u* SS / n) with u* from BF = 1/alpha in closed form (unbounded while
  c^((n-1)/2) < 1/alpha: with few seeds no gap is large enough). Intersected over every prefix,
  it never widens, and still covers with probability >= 1 - alpha.
- Verdicts come from the intersected interval [lo, hi] and the margin m (`verdict_codes`):
  different (excludes 0, not inside +-m), negligible (excludes 0, inside +-m), equivalent
  (inside +-m, contains 0), inconclusive. Each error is a non-coverage of the CS: false
  "different" at gap 0 and false "equivalent"/"negligible" at gap +-m each have probability
  <= alpha at any stopping time.

Stopping rules (`Design.stop`):

- `settled`: stop once no later seed can change what the report says. The interval only
  shrinks, so that is when it lies inside +-m (equivalent or negligible: "within the margin"
  stays true; equivalent can only sharpen to negligible) or wholly beyond one margin
  (lo >= m or hi <= -m: "different", and it can never come inside the margin). A gap that
  excludes 0 but still straddles a margin keeps running: stopping there would call "different"
  many gaps that a large study would call negligible.
- `first`: stop at the first verdict other than inconclusive. Fewer seeds for clear gaps (the
  calibration table in docs/statistics.md gives the cost of each), but a gap inside the margin
  that excludes 0 early is reported "different".
- Either way a comparison stops at `max_seeds` (stop reason `max_seeds`); the study-wide
  `max_runs` stop is the caller's (`study.analysis.rounds`).

Looks are at `start`, `start + round`, ... seeds, capped at `max_seeds`; the interval and
p-value use every prefix of the seeds up to the look (valid: the guarantee is time-uniform).

The mixture precision (`precision_for`): the normal mixture's boundary is tightest near the
sample size `target` when precision = target / (2 log(1/alpha) + log(1 + 2 log(1/alpha)))
(Howard et al. 2021, eq. (3.4), for the two-sided mixture). The default target is the number
of seeds a fixed TOST needs to show equivalence at power 0.8 when the SD of the gaps equals the
margin (`EQUIVALENCE_TARGET`): equivalence at gap 0 is the slowest verdict this design must
reach, and the SD of paired gaps in the d2l study (~0.6 pp) is close to its 0.5 pp margin.
Any fixed precision keeps the guarantee; it only moves where the interval is tightest.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from study.analysis import stats

# Verdict codes of the vectorised functions: indexes into VERDICTS (results.VERDICTS' order).
VERDICTS = ("different", "negligible", "equivalent", "inconclusive")
DIFFERENT, NEGLIGIBLE, EQUIVALENT, INCONCLUSIVE = range(4)
# Stop reasons, same idea; OPEN: no stop yet.
REASONS = ("open", "settled", "max_seeds", "max_runs")
OPEN, SETTLED, MAX_SEEDS, MAX_RUNS = range(4)
Stop = Literal["settled", "first"]
# Seeds a fixed paired TOST (alpha 0.05, power 0.8) needs at gap 0 when the SD of the gaps
# equals the margin: the sample size the mixture is tuned to (module docstring).
EQUIVALENCE_TARGET = 11


def precision_for(target: float, alpha: float) -> float:
    """Mixture precision whose boundary is tightest near `target` gaps (Howard et al. eq. 3.4)."""
    two_log = 2 * math.log(1 / alpha)
    return target / (two_log + math.log(1 + two_log))


@dataclass(frozen=True)
class Design:
    """An adaptive comparison: looks at start, start + round, ... <= max_seeds seeds."""

    alpha: float = 0.05
    margin: float = 0.005
    start: int = 10
    round: int = 5
    max_seeds: int = 60
    stop: Stop = "settled"
    precision: float | None = None  # None: precision_for(EQUIVALENCE_TARGET, alpha)

    def __post_init__(self) -> None:
        # start 1 is allowed: a look at one seed has no SD, so it only ever asks for more.
        if not 1 <= self.start <= self.max_seeds or self.round < 1:
            raise ValueError(f"adaptive design needs 1 <= start <= max_seeds and round >= 1, "
                             f"got start={self.start}, round={self.round}, "
                             f"max_seeds={self.max_seeds}")
        if self.stop not in ("settled", "first"):
            raise ValueError(f"stop must be 'settled' or 'first', got {self.stop!r}")

    @property
    def mixture_precision(self) -> float:
        return self.precision if self.precision is not None else \
            precision_for(EQUIVALENCE_TARGET, self.alpha)

    def looks(self) -> tuple[int, ...]:
        """Seed counts at which a decision is taken: start, start + round, ..., max_seeds."""
        out = list(range(self.start, self.max_seeds, self.round))
        return (*out, self.max_seeds)


# ----------------------------------------------------------------------------- closed forms


def log_e_value(n: np.ndarray, mean: np.ndarray, ss: np.ndarray, precision: float,
                mu0: float | np.ndarray = 0.0) -> np.ndarray:
    """log BF of the t-mixture (module docstring), elementwise over broadcast arrays.

    n: gaps so far (>= 2, else NaN); mean: their mean; ss: sum of squared deviations about the
    mean (SD^2 (n - 1)); mu0: the null gap. ss = 0 with mean != mu0 is the limit u -> inf."""
    n, mean, ss = (np.asarray(v, dtype=float) for v in (n, mean, ss))
    c = 1 + n / precision
    with np.errstate(divide="ignore", invalid="ignore"):
        u = n * (mean - mu0) ** 2 / ss
        ratio = np.where(np.isinf(u), np.log(c), np.log1p(u) - np.log1p(u / c))
        ratio = np.where(np.isnan(u), 0.0, ratio)  # ss = 0 and mean = mu0: no evidence
        out = -0.5 * np.log(c) + n / 2 * ratio
    return np.where(n >= 2, out, np.nan)


def e_value(n, mean, sd, precision: float, mu0: float = 0.0) -> np.ndarray:
    """BF from (n, mean, SD with ddof 1): the form the docstring of the module gives."""
    n = np.asarray(n, dtype=float)
    return np.exp(log_e_value(n, mean, np.asarray(sd, dtype=float) ** 2 * (n - 1), precision, mu0))


def cs_half_width(n: np.ndarray, ss: np.ndarray, precision: float, alpha: float) -> np.ndarray:
    """Half-width of {mu : BF_n(mu) < 1/alpha} around the mean; inf where BF cannot reach
    1/alpha (sup over mu of BF_n is c^((n-1)/2)); NaN for n < 2."""
    n, ss = np.asarray(n, dtype=float), np.asarray(ss, dtype=float)
    c = 1 + n / precision
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        a = np.exp((2 / n) * (0.5 * np.log(c) - math.log(alpha)))  # (1+u)/(1+u/c) at the boundary
        u = (a - 1) / (1 - a / c)
        half = np.where(a < c, np.sqrt(u * ss / n), np.inf)
    return np.where(n >= 2, half, np.nan)


# ----------------------------------------------------------------------------- sequences


@dataclass(frozen=True)
class Path:
    """Every prefix of gap sequences [..., N] (NaN = a diverged pair, skipped): the count of
    finite gaps, the running-intersection CS [lo, hi] and p_anytime, each [..., N]."""

    n: np.ndarray
    mean: np.ndarray
    sd: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    p_anytime: np.ndarray


def path(gaps: np.ndarray, precision: float, alpha: float) -> Path:
    """gaps: [..., N] paired gaps in seed order -> `Path` over the N prefixes."""
    x = np.asarray(gaps, dtype=float)
    finite = np.isfinite(x)
    n = np.cumsum(finite, axis=-1).astype(float)
    # Deviations from the first finite gap keep the sums of squares accurate (gaps ~1e-2, SD
    # ~1e-3: raw sums of squares would lose digits to cancellation).
    first = np.take_along_axis(np.where(finite, x, 0.0), np.argmax(finite, axis=-1)[..., None], -1)
    d = np.where(finite, x - first, 0.0)
    s1, s2 = np.cumsum(d, axis=-1), np.cumsum(d * d, axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_d = s1 / n
        ss = np.maximum(s2 - n * mean_d ** 2, 0.0)
        sd = np.sqrt(ss / (n - 1))
    mean = mean_d + first
    # Float round-off on a constant sequence must not count as spread (stats.TOLERANCE).
    ss = np.where(sd <= stats.TOLERANCE, 0.0, ss)
    half = cs_half_width(n, ss, precision, alpha)
    lo = np.fmax.accumulate(np.where(n >= 2, mean - half, -np.inf), axis=-1)
    hi = np.fmin.accumulate(np.where(n >= 2, mean + half, np.inf), axis=-1)
    log_bf = np.where(n >= 2, log_e_value(n, mean, ss, precision, 0.0), -np.inf)
    p = np.minimum(1.0, np.exp(-np.maximum.accumulate(log_bf, axis=-1)))
    return Path(n, mean, np.where(n >= 2, sd, np.nan), lo, hi, p)


def verdict_codes(lo: np.ndarray, hi: np.ndarray, margin: float) -> np.ndarray:
    """The verdict of the intervals [lo, hi] (codes into VERDICTS), elementwise."""
    excludes_zero = (lo > 0) | (hi < 0)
    inside = (lo > -margin) & (hi < margin)
    return np.select([excludes_zero & ~inside, excludes_zero & inside, inside],
                     [DIFFERENT, NEGLIGIBLE, EQUIVALENT], INCONCLUSIVE)


def stops(lo: np.ndarray, hi: np.ndarray, margin: float, rule: Stop) -> np.ndarray:
    """Whether a comparison with interval [lo, hi] stops under `rule` (module docstring)."""
    if rule == "first":
        return verdict_codes(lo, hi, margin) != INCONCLUSIVE
    inside = (lo > -margin) & (hi < margin)
    return inside | (lo >= margin) | (hi <= -margin)


@dataclass(frozen=True)
class Outcomes:
    """Decisions for gap sequences [..., N], each field [...]: the look reached (seeds), the
    stop reason (codes into REASONS; OPEN while running), the verdict and CS there, p_anytime."""

    seeds: np.ndarray
    reason: np.ndarray
    verdict: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    p_anytime: np.ndarray
    mean: np.ndarray
    sd: np.ndarray


def run_design(gaps: np.ndarray, design: Design) -> Outcomes:
    """gaps: [..., N] paired gaps in seed order (NaN: a diverged pair) -> the decision at the
    first look that stops, or at the last look within the N seeds given (then OPEN unless it
    is max_seeds). Seeds beyond the stopping look are never read: a stopped comparison stays
    stopped whatever runs are added later. seeds = 0 where the first look is not reached.

    The one decision rule: the runner's rounds, `analyze` and the calibration all call it."""
    x = np.asarray(gaps, dtype=float)
    looks = [k for k in design.looks() if k <= x.shape[-1]]
    batch = x.shape[:-1]
    seeds, reason = np.zeros(batch, dtype=int), np.full(batch, OPEN)
    idx = np.zeros(batch, dtype=int)
    if not looks:
        nan = np.full(batch, np.nan)
        return Outcomes(seeds, reason, np.full(batch, INCONCLUSIVE), nan, nan, np.ones(batch),
                        nan, nan)
    p = path(x[..., :looks[-1]], design.mixture_precision, design.alpha)
    for k in looks:  # a few looks; every operation inside is vectorised over the batch
        running = reason == OPEN
        at = k - 1
        stop = stops(p.lo[..., at], p.hi[..., at], design.margin, design.stop)
        cap = k >= design.max_seeds
        seeds = np.where(running, k, seeds)
        idx = np.where(running, at, idx)
        reason = np.where(running & stop, SETTLED, np.where(running & cap, MAX_SEEDS, reason))
    pick = lambda a: np.take_along_axis(a, idx[..., None], -1)[..., 0]  # noqa: E731
    lo, hi = pick(p.lo), pick(p.hi)
    return Outcomes(seeds, reason, verdict_codes(lo, hi, design.margin), lo, hi,
                    pick(p.p_anytime), pick(p.mean), pick(p.sd))


# ----------------------------------------------------------------------------- one comparison


@dataclass(frozen=True)
class Decision:
    """One comparison's sequential result (the results.json fields of an adaptive comparison).

    stopped_at: seeds per setting at the stop, or at the latest look while open; cs95: the
    running-intersection confidence sequence there (None while unbounded); stop_reason:
    settled / max_seeds / max_runs, None while open; seeds_fixed_equivalent: seeds a
    fixed-n paired design needs for the protocol's power at the observed gap and SD."""

    verdict: str
    stopped_at: int
    stop_reason: str | None
    cs95: tuple[float, float] | None
    p_anytime: float
    mean_diff: float | None
    sd: float | None
    seeds_fixed_equivalent: int | None = None
    reason: str | None = None
    # The CS at every look up to the stop, (seeds, lo, hi): how it narrowed as seeds came in.
    looks: tuple[tuple[int, float, float], ...] = ()

    @property
    def open(self) -> bool:
        return self.stop_reason is None


def cs_at_looks(gaps: np.ndarray, design: Design, upto: int) -> tuple[tuple[int, float, float], ...]:
    """The running-intersection CS at each look of `design` up to `upto` seeds, from the same
    `path` that `run_design` decides on; a bound not yet finite is ±inf."""
    x = np.asarray(gaps, dtype=float)[:upto]
    if upto < 1 or x.size < upto:
        return ()
    p = path(x, design.mixture_precision, design.alpha)
    return tuple((k, float(p.lo[k - 1]), float(p.hi[k - 1])) for k in design.looks() if k <= upto)


def decide(gaps: np.ndarray, design: Design, power: float | None = None) -> Decision:
    """gaps: [N] paired gaps (setting - reference) by ascending seed, NaN for a diverged pair ->
    `Decision`, through `run_design` (the same rule as the calibration). With `power`, also the
    fixed-design seed count (`fixed_seeds`)."""
    out = run_design(np.asarray(gaps, dtype=float)[None, :], design)
    seeds, code = int(out.seeds[0]), int(out.reason[0])
    if seeds == 0:
        return Decision("inconclusive", 0, None, None, 1.0, None, None,
                        reason=f"first look ({design.start} seeds) not reached")
    lo, hi = float(out.lo[0]), float(out.hi[0])
    mean, sd = float(out.mean[0]), float(out.sd[0])
    verdict = VERDICTS[int(out.verdict[0])]
    notes = []
    if lo > hi:  # possible (probability <= alpha): every gap was ruled out at some look
        notes.append("the confidence sequence became empty: the gaps are not consistent with "
                     "one mean (a shift over seeds, or outliers)")
    cs = (lo, hi) if math.isfinite(lo) and math.isfinite(hi) else None
    fixed = fixed_seeds(verdict, mean, sd, design, power) if power is not None else None
    return Decision(verdict, seeds, None if code == OPEN else REASONS[code], cs,
                    float(out.p_anytime[0]), mean if math.isfinite(mean) else None,
                    sd if math.isfinite(sd) else None, fixed, stats.join_reasons(*notes),
                    cs_at_looks(gaps, design, seeds))


def stop_for_budget(decision: Decision) -> Decision:
    """An open decision closed because the study's run budget (max_runs) is spent."""
    if not decision.open:
        return decision
    return dataclasses.replace(decision, stop_reason=REASONS[MAX_RUNS])


def fixed_seeds(verdict: str, gap: float, sd: float, design: Design, power: float) -> int | None:
    """Seeds per setting a fixed-n paired design needs to reach `power` at this gap and SD:
    the two-sided t test for a gap outside the margin, the TOST inside it (equivalent or
    negligible), both at the design's alpha (stats.power_analysis: noncentral t)."""
    if not (math.isfinite(gap) and math.isfinite(sd)) or sd <= stats.TOLERANCE:
        return None
    within = verdict in ("equivalent", "negligible")
    if within:
        return fixed_seeds_tost(gap, sd, design.margin, design.alpha, power)
    pw = stats.power_analysis(gap, sd, 2, 2, True, design.alpha, power, design.margin)
    return pw.seeds_needed


def fixed_seeds_tost(gap: float, sd: float, margin: float, alpha: float, power: float,
                     cap: int = 100_000) -> int | None:
    """Smallest n for which the paired TOST within +-margin passes with probability `power`
    at true gap `gap` (stats.tost_power_at), None when |gap| >= margin or past `cap`."""
    if abs(gap) >= margin:
        return None
    lo, hi = 1, 2
    while stats.tost_power_at(margin, sd, hi, alpha, True, gap) < power:
        lo, hi = hi, hi * 2
        if hi > cap:
            return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if stats.tost_power_at(margin, sd, mid, alpha, True, gap) >= power \
            else (mid, hi)
    return hi

"""study.analysis.sequential against independent computations: the mixture integrated
numerically (scipy.integrate), the confidence sequence found by root finding (scipy.optimize),
hand-worked verdicts, and the stopping rule's invariants.

    .venv/bin/python -m pytest tests/test_sequential.py -q
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate, optimize
from scipy import stats as sps

from study.analysis import sequential as sq
from study.analysis import stats

ALPHA = 0.05


def mixture_bf(x: np.ndarray, precision: float, mu0: float = 0.0) -> float:
    """The t-mixture Bayes factor by numerical integration of its definition: N(mu0 + delta
    sigma, sigma^2) gaps, delta ~ N(0, 1/precision) against delta = 0, prior 1/sigma on sigma
    in both. Independent of the closed form: no algebra, only the two integrals."""
    d = np.asarray(x, dtype=float) - mu0
    scale = float(np.sqrt(np.mean(d ** 2)))  # sigma in units of the data: a well-scaled integrand
    d = d / scale

    def likelihood(delta: float, log_sigma: float) -> float:
        # Over log sigma (d sigma / sigma = d log sigma): the prior 1/sigma and the Jacobian
        # cancel, and [-12, 12] holds all but ~e^(-12 n) of the heavy sigma^-n tail.
        sigma = math.exp(log_sigma)
        return float(np.prod(sps.norm.pdf(d, loc=delta * sigma, scale=sigma)))

    prior = sps.norm(0, 1 / math.sqrt(precision))
    wide = 12 / math.sqrt(precision)
    alt = integrate.dblquad(lambda delta, s: likelihood(delta, s) * prior.pdf(delta),
                            -12, 12, -wide, wide, epsabs=1e-13, epsrel=1e-9)[0]
    null = integrate.quad(lambda s: likelihood(0.0, s), -12, 12, epsabs=1e-13, epsrel=1e-9,
                          limit=200)[0]
    return alt / null


@pytest.mark.parametrize("x, precision", [
    ([0.3, 1.1, -0.4], 1.0),
    ([0.3, 1.1, -0.4, 0.9, 1.5], 0.25),
    ([2.0, 2.5, 1.7, 2.2], 4.0),
    ([-0.2, 0.1, 0.05, -0.1, 0.3, -0.25], 1.44),
])
def test_the_closed_form_is_the_integrated_mixture(x, precision):
    x = np.array(x)
    closed = sq.e_value(x.size, x.mean(), x.std(ddof=1), precision)
    assert closed == pytest.approx(mixture_bf(x, precision), rel=1e-6)


def test_the_e_value_is_scale_invariant_and_depends_on_t_only():
    x = np.array([0.004, 0.009, -0.001, 0.006])
    a = sq.e_value(4, x.mean(), x.std(ddof=1), 2.0)
    b = sq.e_value(4, 1000 * x.mean(), 1000 * x.std(ddof=1), 2.0)
    assert a == pytest.approx(b, rel=1e-12)


def test_a_constant_sequence_has_the_limit_e_value():
    # SD 0 and mean != 0 is u -> inf: BF = c^((n - 1) / 2)
    c = 1 + 5 / 2.0
    assert float(sq.e_value(5, 0.01, 0.0, 2.0)) == pytest.approx(c ** 2, rel=1e-12)
    assert float(sq.e_value(5, 0.0, 0.0, 2.0)) == pytest.approx(c ** -0.5, rel=1e-12)


@pytest.mark.parametrize("seed, n", [(0, 3), (1, 6), (2, 15), (3, 40)])
def test_the_confidence_sequence_is_the_inverted_test(seed, n):
    x = np.random.default_rng(seed).normal(0.004, 0.006, n)
    m, ss, rho = x.mean(), float(((x - x.mean()) ** 2).sum()), 1.3
    half = float(sq.cs_half_width(n, ss, rho, ALPHA))
    excess = lambda mu: float(sq.log_e_value(n, m, ss, rho, mu)) - math.log(1 / ALPHA)  # noqa: E731
    if not math.isfinite(half):
        assert excess(m + 1e6) < 0  # unbounded: even a far mean is not rejected
        return
    width = 100 * half
    hi = optimize.brentq(excess, m, m + width, xtol=1e-15)
    lo = optimize.brentq(excess, m - width, m, xtol=1e-15)
    assert (lo, hi) == pytest.approx((m - half, m + half), abs=1e-12)


def test_the_running_interval_never_widens_and_p_never_rises():
    x = np.random.default_rng(5).normal(0.002, 0.006, (200, 60))
    p = sq.path(x, 1.4, ALPHA)
    assert (p.lo[:, 1:] >= p.lo[:, :-1]).all() and (p.hi[:, 1:] <= p.hi[:, :-1]).all()
    assert np.isfinite(p.lo[:, -1]).all()  # bounded long before 60 gaps
    assert (np.diff(p.p_anytime, axis=1) <= 0).all()
    # p_anytime <= alpha exactly when some look's interval excluded 0 (the test's dual).
    excludes = (p.lo > 0) | (p.hi < 0)
    assert np.array_equal(excludes, p.p_anytime <= ALPHA + 1e-12)


def test_prefix_statistics_match_numpy_and_skip_diverged_pairs():
    x = np.array([0.01, np.nan, 0.02, 0.005, 0.0])
    p = sq.path(x, 1.0, ALPHA)
    assert p.n.tolist() == [1, 1, 2, 3, 4]
    kept = x[np.isfinite(x)]
    assert p.mean[-1] == pytest.approx(kept.mean()) and p.sd[-1] == pytest.approx(kept.std(ddof=1))


@pytest.mark.parametrize("lo, hi, verdict, settled", [
    (0.001, 0.004, "negligible", True),     # excludes 0, inside +-0.005
    (-0.002, 0.003, "equivalent", True),    # contains 0, inside
    (0.002, 0.008, "different", False),     # excludes 0, straddles the margin: may still shrink in
    (0.006, 0.010, "different", True),      # beyond the margin: can never come inside
    (-0.010, -0.005, "different", True),    # at the margin counts as beyond
    (-0.003, 0.007, "inconclusive", False),
])
def test_verdicts_and_settling_from_the_interval(lo, hi, verdict, settled):
    code = sq.verdict_codes(np.array(lo), np.array(hi), 0.005)
    assert sq.VERDICTS[int(code)] == verdict
    assert bool(sq.stops(np.array(lo), np.array(hi), 0.005, "settled")) == settled
    assert bool(sq.stops(np.array(lo), np.array(hi), 0.005, "first")) == (verdict != "inconclusive")


def test_looks_follow_the_design():
    assert sq.Design(start=10, round=5, max_seeds=27).looks() == (10, 15, 20, 25, 27)
    assert sq.Design(start=10, round=5, max_seeds=10).looks() == (10,)
    with pytest.raises(ValueError, match="start"):
        sq.Design(start=12, max_seeds=10)
    # one seed at the first look: no SD, so it never stops there and asks for a round
    one = sq.decide(np.array([0.01]), sq.Design(start=1, max_seeds=10))
    assert one.open and one.stopped_at == 1 and one.cs95 is None


def test_a_stopped_comparison_never_reopens():
    rng = np.random.default_rng(7)
    design = sq.Design(margin=0.005)
    for _ in range(50):
        x = rng.normal(rng.choice([0.0, 0.003, 0.01]), 0.006, 60)
        first = sq.decide(x[:sq.Design().start + 5 * rng.integers(0, 8)], design)
        if first.open:
            continue
        later = sq.decide(np.concatenate([x[:first.stopped_at],
                                          rng.normal(0.05, 0.02, 60 - first.stopped_at)]), design)
        assert later == first


def test_open_until_the_cap_then_max_seeds():
    # A true gap right at the margin rarely settles: open at each look, max_seeds at the cap.
    x = np.random.default_rng(3).normal(0.005, 0.006, 60)
    design = sq.Design(margin=0.005, max_seeds=20)
    assert sq.decide(x[:9], design).stopped_at == 0
    at_cap = sq.decide(x[:20], design)
    assert at_cap.stopped_at == 20 and at_cap.stop_reason in ("settled", "max_seeds")
    early = sq.decide(x[:15], design)
    assert early.stop_reason is None or early.stop_reason == "settled"


def test_one_comparison_is_the_vectorised_rule_on_one_row():
    x = np.random.default_rng(11).normal(0.006, 0.006, (5, 40))
    design = sq.Design(margin=0.005, stop="first")
    out = sq.run_design(x, design)
    for i in range(5):
        d = sq.decide(x[i], design)
        assert d.stopped_at == out.seeds[i] and d.verdict == sq.VERDICTS[out.verdict[i]]
        assert d.p_anytime == out.p_anytime[i]


def test_the_default_precision_is_tuned_to_the_equivalence_sample_size():
    # Seeds a paired TOST (alpha 0.05, power 0.8) needs at gap 0 when SD = margin.
    pw = stats.power_analysis(0.5, 1.0, 10, 10, True, 0.05, 0.8, margin=1.0)
    assert sq.EQUIVALENCE_TARGET == pw.seeds_needed_equivalence
    two_log = 2 * math.log(20)
    assert sq.Design().mixture_precision == pytest.approx(11 / (two_log + math.log(1 + two_log)))


def test_tost_power_at_a_gap_matches_monte_carlo():
    rng = np.random.default_rng(2)
    n, gap, margin = 12, 0.3, 1.0
    d = rng.normal(gap, 1.0, (100_000, n))
    se = d.std(axis=1, ddof=1) / math.sqrt(n)
    crit = sps.t.ppf(1 - ALPHA, n - 1)
    passed = ((d.mean(1) - crit * se > -margin) & (d.mean(1) + crit * se < margin)).mean()
    assert stats.tost_power_at(margin, 1.0, n, ALPHA, True, gap) == pytest.approx(passed, abs=0.005)
    n_fixed = sq.fixed_seeds_tost(gap, 1.0, margin, ALPHA, 0.8)
    assert stats.tost_power_at(margin, 1.0, n_fixed, ALPHA, True, gap) >= 0.8
    assert stats.tost_power_at(margin, 1.0, n_fixed - 1, ALPHA, True, gap) < 0.8


def test_fixed_seeds_use_the_t_test_outside_the_margin():
    design = sq.Design(margin=0.005)
    got = sq.fixed_seeds("different", 0.01, 0.006, design, 0.8)
    assert got == stats.power_analysis(0.01, 0.006, 2, 2, True, 0.05, 0.8).seeds_needed
    assert sq.fixed_seeds("equivalent", 0.0, 0.006, design, 0.8) == \
        sq.fixed_seeds_tost(0.0, 0.006, 0.005, 0.05, 0.8)


def test_ville_holds_on_a_quick_null_simulation():
    # Quick check (the calibration module runs the full one): peeking at every n from 2 to 60.
    x = np.random.default_rng(13).normal(0.0, 1.0, (4000, 60))
    p = sq.path(x, sq.Design().mixture_precision, ALPHA)
    rejected = (p.p_anytime[:, -1] <= ALPHA).mean()
    assert rejected <= ALPHA + 2 * math.sqrt(ALPHA * (1 - ALPHA) / 4000)

"""C6 as an interaction: the seed-level trend statistics against statsmodels, scipy and a hand
sandwich, the per-size choice of the best rate, and the analysis and report on synthetic runs
with a planted trend and with none."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from study.analysis import comparisons as analysis, interaction, stats
from study.analysis.settings import with_settings
from study.report import figures
from study.protocol.schema import Analysis
from study.report import claims
from study.report.context import Inputs
from study.report.render_markdown import render_markdown
from study.analysis.table import CURVE_COLUMNS, RUN_COLUMNS, RunTable

OPTIONS = Analysis(bootstrap=200)
SIZES = (1000, 3000, 10_000, 60_000)
RATES = (0.0, 0.1, 0.3, 0.5)
SEEDS = range(8)
# Planted per size: (0, 0)'s final test accuracy and its train - test gap.
TEST = {1000: 0.80, 3000: 0.83, 10_000: 0.85, 60_000: 0.86}
GAP = {1000: 0.19, 3000: 0.12, 10_000: 0.05, 60_000: 0.01}


# ----------------------------------------------------------------------------- statistics


def _clustered(seed: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """32 points, 8 clusters of 4, a shared shift per cluster: y = 0.4 x + u_g + e."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(8), 4)
    x = np.tile([0.19, 0.12, 0.05, 0.01], 8) + rng.normal(0, 0.01, 32)
    y = 0.4 * x + rng.normal(0, 0.01, 8)[groups] + rng.normal(0, 0.005, 32)
    return x, y, groups


def test_cluster_slope_is_ols_with_a_cr1_sandwich_on_g_minus_1_df():
    x, y, g = _clustered()
    got = stats.cluster_slope(x, y, g)
    ref = sps.linregress(x, y)
    assert got.estimate == pytest.approx(ref.slope, rel=1e-10)
    assert got.intercept == pytest.approx(ref.intercept, rel=1e-10)
    # The sandwich by hand: (X'X)^-1 sum_g X_g' u_g u_g' X_g (X'X)^-1, times
    # G/(G-1) * (N-1)/(N-K), t quantile on G - 1 df.
    X = np.column_stack([np.ones_like(x), x])
    u = y - X @ np.array([ref.intercept, ref.slope])
    bread = np.linalg.inv(X.T @ X)
    meat = sum(np.outer(X[g == k].T @ u[g == k], X[g == k].T @ u[g == k]) for k in range(8))
    n, k, groups = len(x), 2, 8
    cov = bread @ meat @ bread * groups / (groups - 1) * (n - 1) / (n - k)
    se = np.sqrt(cov[1, 1])
    q = sps.t.ppf(0.975, groups - 1)
    assert got.ci95 == pytest.approx((ref.slope - q * se, ref.slope + q * se), rel=1e-8)
    assert got.p == pytest.approx(2 * sps.t.sf(abs(ref.slope / se), groups - 1), rel=1e-8)
    assert got.df == groups - 1 and got.n == 32


def test_per_cluster_slope_is_a_t_interval_over_within_seed_slopes():
    x, y, g = _clustered()
    slopes = [sps.linregress(x[g == k], y[g == k]).slope for k in range(8)]
    got = stats.per_cluster_slope(x, y, g)
    assert got.estimate == pytest.approx(np.mean(slopes))
    half = sps.t.ppf(0.975, 7) * np.std(slopes, ddof=1) / np.sqrt(8)
    assert got.ci95 == pytest.approx((np.mean(slopes) - half, np.mean(slopes) + half))
    assert got.n == 8 and got.df == 7


def test_cluster_slope_covers_the_true_slope_at_its_level():
    """Monte Carlo: 400 data sets with cluster-correlated errors, the slope's 95% interval
    covers the true 0.4 in about 95% of them (CR1 with 8 clusters runs a little low)."""
    intervals = [stats.cluster_slope(*_clustered(seed)).ci95 for seed in range(400)]
    hits = sum(lo <= 0.4 <= hi for lo, hi in intervals)
    assert 0.88 <= hits / 400 <= 0.99


def test_a_slope_needs_varying_x_and_enough_clusters():
    x, y, g = _clustered()
    flat = stats.cluster_slope(np.full_like(x, 0.1), y, g)
    assert flat.estimate is None and "varies" in flat.reason
    two = stats.cluster_slope(x, y, g % 2)
    assert two.estimate is None and "clusters" in two.reason


# ----------------------------------------------------------------------------- synthetic runs


def _table(gain_of_gap, noise: float = 0.002, seed: int = 0) -> RunTable:
    """Runs at every (size, rate, seed): rate 0.3 gains `gain_of_gap(gap)` over (0, 0), the
    others gain half of it (0.1) or lose 1 pp (0.5); every seed shares a shift across rates."""
    rng = np.random.default_rng(seed)
    rows = []
    for n in SIZES:
        seed_shift = rng.normal(0, 0.004, len(SEEDS))
        for s in SEEDS:
            gap = GAP[n] + rng.normal(0, 0.01)  # this seed's (0, 0) gap
            for r in RATES:
                gain = {0.0: 0.0, 0.1: gain_of_gap(gap) / 2, 0.3: gain_of_gap(gap),
                        0.5: -0.01}[r]
                test = TEST[n] + seed_shift[s] + gain + (rng.normal(0, noise) if r else 0.0)
                train = test + (gap if r == 0 else gap - 0.2 * r)
                rows.append({
                    "run_id": f"{n}-{r}-{s}", "run_name": f"p{r} seed{s} n{n}", "dropout1": r,
                    "dropout2": r, "seed": s, "device": "cpu", "determinism": "default",
                    "implementation": "torch", "execution": "batched", "randomness": "portable",
                    "mask_rng": "sfc64", "kernels": "torch", "vary": "all", "replicate": 0, "threads": "2",
                    "train_images": n, "status": "ok", "textbook_check": True,
                    "weights_sha256": "0" * 64, "epochs_done": 10, "test_acc": round(test, 4),
                    "train_acc": train, "train_loss": 0.1, "keep_rate1": 1 - r,
                    "keep_rate2": 1 - r})
    curves = pd.DataFrame({c: pd.Series(dtype=t) for c, t in CURVE_COLUMNS.items()})
    return RunTable("1", "overfitting", pd.DataFrame(rows, columns=list(RUN_COLUMNS)), curves)


def _interaction(table: RunTable):
    results = analysis.analyze(table, (0.0, 0.0), OPTIONS)
    (found,) = results.interactions
    return results, found


def test_a_planted_trend_is_found_with_its_slope_inside_the_interval():
    results, i = _interaction(_table(lambda gap: 0.15 * gap))
    assert [e.train_images for e in i.sizes] == list(SIZES)
    assert [e.regime.overfits for e in i.sizes] == [True, False, False, False]  # 3k: 95% train
    assert i.sizes[0].regime.gap == pytest.approx(GAP[1000], abs=0.01)
    assert i.sizes[0].best == [0.3, 0.3] and i.sizes[0].verdict == "different"
    assert i.sizes[0].gain == pytest.approx(0.15 * GAP[1000], abs=0.004)
    lo, hi = i.trend.ci95
    assert lo > 0 and lo <= 0.15 <= hi
    assert i.trend_per_seed.ci95[0] <= 0.15 <= i.trend_per_seed.ci95[1]
    assert i.holds == "supported" and i.n_points == 32
    # Each size is a stratum of its own: the comparisons are a Holm family per size.
    assert len(results.strata) == 4 and {s.stratum["train_images"] for s in results.strata} == \
        set(SIZES)


def test_no_trend_is_not_shown_and_the_claim_is_not_supported():
    _, i = _interaction(_table(lambda gap: 0.0, noise=0.004))
    lo, hi = i.trend.ci95
    assert lo <= 0 <= hi
    assert i.holds in ("contradicted", "not shown")
    assert all(e.smallest_rate in ("nothing", "unclear") for e in i.sizes)


def test_the_trend_matches_statsmodels_on_the_seed_level_points():
    import statsmodels.api as sm
    table = _table(lambda gap: 0.15 * gap)
    _, i = _interaction(table)
    runs = table.runs
    x, y, g = [], [], []
    for e in i.sizes:
        at = runs[runs.train_images == e.train_images].set_index("seed")
        base = at[at.dropout1 == 0.0]
        best = at[at.dropout1 == e.best[0]]
        x += list(base.train_acc - base.test_acc)
        y += list(best.test_acc - base.test_acc)
        g += list(base.index)
    fit = sm.OLS(np.array(y), sm.add_constant(np.array(x))).fit(
        cov_type="cluster", cov_kwds={"groups": np.array(g)}, use_t=True)
    assert i.trend.estimate == pytest.approx(fit.params[1])
    assert i.trend.ci95 == pytest.approx(tuple(fit.conf_int()[1]))


def test_best_rate_is_the_largest_gain_shown_different_else_the_largest_mean():
    from study.analysis.interaction import choose_best
    results, _ = _interaction(_table(lambda gap: 0.15 * gap))
    at_1k = [c for c in results.comparisons if c.stratum["train_images"] == 1000]
    best, why = choose_best(at_1k)
    assert (best.dropout1, best.verdict) == (0.3, "different") and "shown better" in why
    none_shown = [c for c in at_1k if c.dropout1 == 0.5]
    best, why = choose_best(none_shown)
    assert best.dropout1 == 0.5 and "no setting is shown better" in why


def test_one_size_gives_no_interaction():
    table = _table(lambda gap: 0.15 * gap)
    one = RunTable("1", "x", table.runs[table.runs.train_images == 1000], table.curves)
    assert analysis.analyze(one, (0.0, 0.0), OPTIONS).interactions == []


def test_c6_section_and_figure_render(tmp_path):
    table = _table(lambda gap: 0.15 * gap)
    results = analysis.analyze(table, (0.0, 0.0), OPTIONS)
    figs = [figures.interaction_figure(results, tmp_path)]
    assert figs[0].png.stat().st_size > 0 and figs[0].svg.stat().st_size > 0
    md = render_markdown(claims.claim_overfitting(Inputs.of(results, table, figs)), "x")
    c6 = next(c for c in claims.CLAIMS if c.key == "C6")
    assert c6.bottom_line(Inputs.of(results, table)) == f"C6 supported: {results.interactions[0].holds_reason}."
    assert "| 1,000 | 8 |" in md and "| yes |" in md  # the regime table, overfitting at 1k
    assert "(0.3, 0.3)" in md and "Trend: regressing each seed's gain" in md
    assert "interaction.png" in md
    i = results.interactions[0]
    assert f"{i.trend.estimate:.3f}" in md
    empty = analysis.analyze(RunTable("1", "x", table.runs[table.runs.train_images == 1000],
                                      table.curves), (0.0, 0.0), OPTIONS)
    (note,) = claims.claim_overfitting(Inputs.of(empty, table))
    assert "one training-set size" in render_markdown([note], "x")


def test_one_seeds_late_spike_does_not_move_the_regime():
    # 8 seeds of (0, 0) at a small size: 7 fit the training set (99.5%), one spiked in its last
    # epoch to 80%. The mean (97.1%) would read "does not overfit"; the median and the count
    # per seed say it does, as 7 of the 8 runs do.
    train = [0.995] * 7 + [0.80]
    test = [0.80] * 7 + [0.70]
    frame = with_settings(pd.DataFrame({"dropout1": 0.0, "dropout2": 0.0, "seed": range(8),
                                        "train_acc": train, "test_acc": test}),
                          ("dropout1", "dropout2"))
    r = interaction.regime(frame, (0.0, 0.0))
    assert r.train_acc == pytest.approx(np.mean(train)) and r.train_acc < 0.98
    assert r.median_train_acc == pytest.approx(0.995)
    assert r.seeds_overfitting == 7 and r.overfits
    # Half the seeds short of the threshold: the median no longer passes.
    frame["train_acc"] = [0.995] * 4 + [0.95] * 4
    assert not interaction.regime(frame, (0.0, 0.0)).overfits

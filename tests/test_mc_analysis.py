"""C7 analysis of a small synthetic store: shares with CIs, MC against eval paired within runs,
NLL and ECE without an equivalence claim, and the flip-rate trend, checked against scipy and
statsmodels."""

import json
import math

import numpy as np
import pytest
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests

from study.analysis import comparisons as analysis
from study.protocol.schema import Analysis
from tests.results_factory import BASELINE, make_table, with_passes

OPTIONS = Analysis(bootstrap=200)


@pytest.fixture(scope="module")
def analysed():
    table = with_passes(make_table())
    return table, analysis.analyze(table, BASELINE, OPTIONS)


def _rows(table, setting):
    runs = table.runs
    rows = runs[(runs["dropout1"] == setting[0]) & (runs["dropout2"] == setting[1])]
    return rows.sort_values("seed")


def test_shares_are_seed_means_with_t_intervals(analysed):
    table, results = analysed
    found = {(s.dropout1, s.dropout2): s for s in results.inference.settings}
    assert set(found) == {(0.0, 0.0), (0.2, 0.5), (0.6, 0.8), (0.9, 0.9), (1.0, 1.0)}
    rows = _rows(table, (0.6, 0.8))
    x = rows["mc_flip_rate"].to_numpy()
    s = found[(0.6, 0.8)]
    assert s.passes == 8 and s.n == 5
    assert s.flip_rate.mean == pytest.approx(x.mean())
    lo, hi = sps.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=sps.sem(x))
    assert s.flip_rate.ci95 == pytest.approx((lo, hi))
    assert s.unstable_share.mean == pytest.approx(2.5 * x.mean())
    assert (s.example_seed, s.example_image) == (0, 1000)
    assert (found[(0.0, 0.0)].example_seed, found[(0.0, 0.0)].example_image) == (None, None)
    # The diverged seed of (0.9, 0.9) made no passes: left out and counted out of n.
    assert found[(0.9, 0.9)].n == 4


def test_mc_against_eval_is_a_paired_t_test_holm_adjusted_over_settings(analysed):
    table, results = analysed
    settings = results.inference.settings
    raw = []
    for s in settings:
        rows = _rows(table, (s.dropout1, s.dropout2)).dropna(subset=["mc_test_acc"])
        d = rows["mc_test_acc"].to_numpy() - rows["test_acc"].to_numpy()
        assert s.accuracy.mean_diff == pytest.approx(d.mean(), abs=1e-12)
        if s.accuracy.p is not None:
            ref = sps.ttest_rel(rows["mc_test_acc"], rows["test_acc"])
            assert s.accuracy.p == pytest.approx(ref.pvalue, rel=1e-9)
            raw.append((s, ref.pvalue))
    adjusted = multipletests([p for _, p in raw], method="holm")[1]
    for (s, _), ref in zip(raw, adjusted):
        assert s.accuracy.p_adjusted == pytest.approx(ref, rel=1e-9)
    by = {(s.dropout1, s.dropout2): s for s in settings}
    # +0.3 pp with 0.1 pp noise over 5 seeds: a gap shown, inside the 0.5 pp margin or not.
    assert by[(0.2, 0.5)].accuracy.verdict in ("different", "negligible")
    # No dropout: every pass is the eval pass, the gap 0 in every seed, settled by construction.
    assert by[(0.0, 0.0)].accuracy.verdict == "equivalent" and by[(0.0, 0.0)].accuracy.p is None


def test_nll_and_ece_get_intervals_and_tests_but_never_equivalence(analysed):
    _, results = analysed
    by = {(s.dropout1, s.dropout2): s for s in results.inference.settings}
    for s in by.values():
        assert s.nll.verdict in ("different", "not_shown_different", "identical")
        assert s.ece.verdict in ("different", "not_shown_different", "identical")
        assert s.nll.tost_p_adjusted is None and s.ece.tost_p_adjusted is None
    assert by[(0.2, 0.5)].nll.verdict == "different" and by[(0.2, 0.5)].nll.mean_diff < 0
    assert by[(0.2, 0.5)].nll.ci95[1] < 0
    assert by[(0.0, 0.0)].nll.verdict == "identical"
    # ECE moved by noise only: not shown different (not "the same").
    assert by[(0.2, 0.5)].ece.verdict == "not_shown_different"


def test_flip_rate_trend_is_spearman_over_runs_below_rate_one(analysed):
    table, results = analysed
    (trend,) = results.inference.trends
    assert trend.left_out == [[1.0, 1.0]]
    runs = table.runs.dropna(subset=["mc_flip_rate"])
    runs = runs[runs["dropout1"] < 1]
    rate = (runs["dropout1"] + runs["dropout2"]) / 2
    ref = sps.spearmanr(rate, runs["mc_flip_rate"])
    # Spearman's rho is Pearson's r of the mid-ranks: an independent route to the same number.
    by_ranks = np.corrcoef(sps.rankdata(rate), sps.rankdata(runs["mc_flip_rate"]))[0, 1]
    assert trend.rho == pytest.approx(ref.statistic) == pytest.approx(by_ranks)
    assert trend.p == pytest.approx(ref.pvalue)
    assert trend.n_runs == len(runs) and trend.rho > 0.8


def test_results_json_carries_the_section(analysed, tmp_path):
    table, results = analysed
    analysis.write(results, table, tmp_path)
    data = json.loads((tmp_path / "results.json").read_text())
    section = data["inference"]
    assert section["ece_bins"] == 15 and section["equivalence_margin"] == OPTIONS.equivalence_margin
    assert {tuple(s["stratum"].items()) for s in section["settings"]}
    first = section["settings"][0]
    assert set(first["accuracy"]) >= {"mean_diff", "ci95", "p_adjusted", "tost_p_adjusted", "verdict"}


def test_a_store_without_passes_has_no_section():
    results = analysis.analyze(make_table(), BASELINE, OPTIONS)
    assert results.inference is None
    assert results.to_json()["inference"] is None


def test_runs_without_passes_beside_runs_with_them_are_left_out_of_the_section():
    table = with_passes(make_table())
    runs = table.runs.copy()
    runs.loc[runs["seed"] == 0, ["mc_passes"]] = 0
    runs.loc[runs["seed"] == 0, ["mc_flip_rate"]] = math.nan
    table = type(table)(table.experiment_id, table.experiment_name, runs, table.curves)
    results = analysis.analyze(table, BASELINE, OPTIONS)
    by = {(s.dropout1, s.dropout2): s for s in results.inference.settings}
    assert by[(0.2, 0.5)].n == 4 and by[(0.2, 0.5)].example_seed == 1

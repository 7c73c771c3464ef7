"""Issue 10's verdicts through `analysis.analyze` on generated run tables: per-comparison
pairing, divergence counted, declared endpoints, the robustness set, four verdicts and the
interval dual to each TOST.

    .venv/bin/python -m pytest tests/test_verdicts.py -q
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests

from study.analysis import comparisons as analysis
from study.protocol.schema import Analysis
from study.results import Endpoint
from study.analysis.table import CURVE_COLUMNS, RUN_COLUMNS, RunTable

BASE = (0.2, 0.5)
OPTIONS = Analysis(alpha=0.05, equivalence_margin=0.005, bootstrap=200, power=0.8)


def _run(setting, seed: int, curve: np.ndarray, diverged: bool = False) -> tuple[dict, list[dict]]:
    """One run row and its per-epoch test accuracy; `curve[-1]` is the final accuracy."""
    run_id = f"{setting}-{seed}"
    final = math.nan if diverged else float(curve[-1])
    row = {
        "run_id": run_id, "run_name": run_id, "dropout1": setting[0], "dropout2": setting[1],
        "seed": seed, "device": "cpu", "determinism": "default", "implementation": "torch",
        "execution": "sequential", "randomness": "native", "mask_rng": "torch", "kernels": "torch", "vary": "all", "threads": "2",
        "replicate": 0, "status": "diverged" if diverged else "ok", "textbook_check": not diverged,
        "weights_sha256": "0" * 64, "epochs_done": len(curve), "test_acc": final,
        "train_acc": final + 0.01, "train_loss": 0.4, "keep_rate1": math.nan,
        "keep_rate2": math.nan}
    points = [{"run_id": run_id, "epoch": e, "metric": "test_acc", "value": float(v)}
              for e, v in enumerate(curve, start=1)]
    return row, points


def _table(curves: dict, seeds: dict | None = None, diverged: dict | None = None) -> RunTable:
    """curves: setting -> [n_seeds, epochs] array of test accuracies (seeds 0..n-1 unless
    `seeds` names them); diverged: setting -> seeds whose run diverged."""
    rows, points = [], []
    for setting, matrix in curves.items():
        for seed, curve in zip((seeds or {}).get(setting, range(len(matrix))), matrix):
            row, pts = _run(setting, seed, np.asarray(curve), seed in (diverged or {}).get(setting, ()))
            rows.append(row)
            points.extend(pts)
    return RunTable("1", "synthetic", pd.DataFrame(rows, columns=list(RUN_COLUMNS)),
                    pd.DataFrame(points, columns=list(CURVE_COLUMNS)))


def _flat(values: np.ndarray, epochs: int = 6) -> np.ndarray:
    """[n] final accuracies -> [n, epochs] curves that sit at that value every epoch."""
    return np.repeat(np.asarray(values)[:, None], epochs, axis=1)


def _comparison(results, setting):
    (c,) = [c for c in results.comparisons if (c.dropout1, c.dropout2) == setting]
    return c


def _grid(x: np.ndarray) -> np.ndarray:
    return np.round(x, 4)  # accuracies of a 10k test set


# ----------------------------------------------------------------------------- pairing (defect 1)


def test_one_missing_run_unpairs_only_its_own_comparison():
    rng = np.random.default_rng(0)
    base = _grid(0.85 + rng.normal(0, 0.01, 10))
    curves = {BASE: _flat(base), (0.0, 0.0): _flat(_grid(base + 0.004)),
              (0.5, 0.5): _flat(_grid(base[:9] - 0.002 + rng.normal(0, 0.001, 9)))}
    results = analysis.analyze(_table(curves), BASE, OPTIONS)
    full, short = _comparison(results, (0.0, 0.0)), _comparison(results, (0.5, 0.5))
    assert full.paired and full.n_pairs == 10
    assert short.paired and short.n_pairs == 9 and short.test == "paired_t"
    x = curves[(0.5, 0.5)][:, -1]
    assert short.p == pytest.approx(sps.ttest_rel(x, base[:9]).pvalue)


def test_welch_only_when_fewer_than_three_seeds_are_shared():
    rng = np.random.default_rng(1)
    base, other = _grid(0.85 + rng.normal(0, 0.003, 8)), _grid(0.86 + rng.normal(0, 0.003, 8))
    table = _table({BASE: _flat(base), (0.0, 0.0): _flat(other)},
                   seeds={BASE: range(8), (0.0, 0.0): [0, 1, *range(100, 106)]})
    c = _comparison(analysis.analyze(table, BASE, OPTIONS), (0.0, 0.0))
    assert not c.paired and c.n_pairs == 0 and c.test == "welch_t"
    assert c.p == pytest.approx(sps.ttest_ind(other, base, equal_var=False).pvalue)


# ----------------------------------------------------------------------------- divergence (defect 2)


def test_diverged_runs_are_counted_and_their_rate_tested():
    rng = np.random.default_rng(2)
    base = _grid(0.85 + rng.normal(0, 0.003, 10))
    curves = {BASE: _flat(base), (0.9, 0.9): _flat(_grid(base + 0.001)),
              (0.0, 0.0): _flat(_grid(base - 0.001))}
    diverged = {(0.9, 0.9): {0, 2, 4, 6, 8, 9, 7}, (0.0, 0.0): {1}}
    results = analysis.analyze(_table(curves, diverged=diverged), BASE, OPTIONS)
    bad, ok = _comparison(results, (0.9, 0.9)), _comparison(results, (0.0, 0.0))
    raw = [sps.fisher_exact([[7, 3], [0, 10]]).pvalue, sps.fisher_exact([[1, 9], [0, 10]]).pvalue]
    holm = multipletests(raw, method="holm")[1]
    assert bad.divergence_p_adjusted == pytest.approx(holm[0])
    assert ok.divergence_p_adjusted == pytest.approx(holm[1])
    assert bad.divergence_verdict == "different" and ok.divergence_verdict == "not_shown_different"
    assert bad.n_diverged_setting == 7 and bad.n_pairs == 3 and "7 diverged" in bad.reason
    (g,) = [g for g in results.groups if (g.dropout1, g.dropout2) == (0.9, 0.9)]
    assert g.n_diverged == 7 and g.n_excluded == 7 and g.n == 3


# ----------------------------------------------------------------------------- endpoints


def test_last_k_endpoint_is_the_mean_of_the_last_k_epochs_and_long_ones_are_left_out():
    rng = np.random.default_rng(3)
    base = 0.85 + rng.normal(0, 0.004, (10, 4))
    other = base + 0.003 + rng.normal(0, 0.002, (10, 4))
    table = _table({BASE: _grid(base), (0.0, 0.0): _grid(other)})
    results = analysis.analyze(table, BASE, Analysis(bootstrap=200, endpoint="last:3"))
    assert results.endpoint == "last:3"
    assert results.robustness_endpoints == ["final", "last:3"]
    assert results.endpoints_left_out == ["last:5 (only 4 evaluated epoch(s) in the shortest run)"]
    (g,) = [g for g in results.groups if (g.dropout1, g.dropout2) == BASE]
    assert g.mean == pytest.approx(_grid(base)[:, -3:].mean())
    c = _comparison(results, (0.0, 0.0))
    d = _grid(other)[:, -3:].mean(axis=1) - _grid(base)[:, -3:].mean(axis=1)
    assert c.endpoint == "last:3" and c.mean_diff == pytest.approx(d.mean())
    assert {(m.endpoint, m.test) for m in c.multiverse} == {
        (e, t) for e in ("final", "last:3") for t in ("t", "rank", "trimmed")}


def test_an_endpoint_longer_than_the_runs_cannot_be_primary():
    table = _table({BASE: _flat(np.full(5, 0.85), epochs=2), (0.0, 0.0): _flat(np.full(5, 0.8), 2)})
    with pytest.raises(ValueError, match="last:3"):
        analysis.analyze(table, BASE, Analysis(bootstrap=200, endpoint="last:3"))


def test_endpoint_grid_is_one_test_image_over_k():
    assert Endpoint.parse("final").grid == pytest.approx(1e-4)
    assert Endpoint.parse("last:5").grid == pytest.approx(2e-5)
    with pytest.raises(ValueError):
        Endpoint.parse("last:0")


# ----------------------------------------------------------------------------- robustness


def test_a_chaotic_final_epoch_is_not_robust_and_names_the_analyses_that_disagree():
    """The lesson's C1 situation: (0, 0) loses a few points on the final epoch in a few seeds
    (lr 0.5 swings), while the mean of the last epochs shows a small, steady gap."""
    rng = np.random.default_rng(4)
    base = 0.86 + rng.normal(0, 0.002, (10, 6))
    nodrop = base - 0.001 + rng.normal(0, 0.001, (10, 6))
    nodrop[[1, 4, 7], -1] -= 0.06  # three seeds fall on the last step only
    results = analysis.analyze(_table({BASE: _grid(base), (0.0, 0.0): _grid(nodrop)}), BASE, OPTIONS)
    c = _comparison(results, (0.0, 0.0))
    assert c.verdict == "inconclusive" and c.endpoint == "final"
    assert c.robust is False
    assert any(d.startswith("last:3/") for d in c.disagreeing)
    assert all("/" in d and ": " in d for d in c.disagreeing)
    final_rank = [m for m in c.multiverse if (m.endpoint, m.test) == ("final", "rank")][0]
    assert final_rank.verdict == "different"  # 7 of 10 seeds lose: the rank test sees it


def test_a_large_clean_gap_is_robust_under_every_analysis():
    rng = np.random.default_rng(5)
    base = 0.85 + rng.normal(0, 0.003, (10, 6))
    worse = base - 0.03 + rng.normal(0, 0.002, (10, 6))
    c = _comparison(analysis.analyze(_table({BASE: _grid(base), (0.9, 0.9): _grid(worse)}),
                                     BASE, OPTIONS), (0.9, 0.9))
    assert c.verdict == "different" and c.robust is True and c.disagreeing == []
    assert len(c.multiverse) == 9 and all(m.verdict == "different" for m in c.multiverse)
    assert all(m.mean_diff < 0 for m in c.multiverse)


# ----------------------------------------------------------------------------- four verdicts


def test_a_real_gap_inside_the_margin_is_negligible_not_different():
    rng = np.random.default_rng(6)
    base = _grid(0.85 + rng.normal(0, 0.004, 12))
    near = _grid(base + 0.002 + rng.normal(0, 0.0003, 12))
    c = _comparison(analysis.analyze(_table({BASE: _flat(base), (0.0, 0.0): _flat(near)}),
                                     BASE, OPTIONS), (0.0, 0.0))
    assert c.p_adjusted < 0.05 and c.tost_p_adjusted < 0.05
    assert c.verdict == "negligible"
    lo, hi = c.tost_ci
    assert -0.005 < lo < hi < 0.005 and c.tost_ci_level == pytest.approx(0.90)


def test_tost_interval_level_follows_the_holm_multiplier():
    rng = np.random.default_rng(7)
    base = _grid(0.85 + rng.normal(0, 0.004, 10))
    curves = {BASE: _flat(base)}
    for i, s in enumerate([(0.0, 0.0), (0.5, 0.5), (0.6, 0.8)]):
        curves[s] = _flat(_grid(base + 0.0005 * i + rng.normal(0, 0.0008 * (i + 1), 10)))
    results = analysis.analyze(_table(curves), BASE, OPTIONS)
    comps = results.comparisons
    order = np.argsort([c.tost_p for c in comps])
    for rank, i in enumerate(order):
        k = len(comps) - rank
        assert comps[i].tost_ci_level == pytest.approx(1 - 2 * 0.05 / k)
        # The interval at that level lies inside the margin exactly when the raw TOST p < alpha/k.
        lo, hi = comps[i].tost_ci
        assert (-0.005 < lo and hi < 0.005) == (comps[i].tost_p < 0.05 / k)


def test_a_constant_one_image_gap_is_settled_by_construction():
    rng = np.random.default_rng(8)
    base = _grid(0.85 + rng.normal(0, 0.004, 10))
    one_image = _grid(base + 1e-4)  # every seed gains exactly one test image
    c = _comparison(analysis.analyze(_table({BASE: _flat(base), (0.0, 0.0): _flat(one_image)}),
                                     BASE, OPTIONS), (0.0, 0.0))
    assert c.verdict == "negligible" and c.settled_by_construction
    assert "by construction" in c.reason
    far = _grid(base + 0.01)
    c = _comparison(analysis.analyze(_table({BASE: _flat(base), (0.0, 0.0): _flat(far)}),
                                     BASE, OPTIONS), (0.0, 0.0))
    assert c.verdict == "different" and c.settled_by_construction


def test_results_json_keeps_the_old_variance_ratio_name_as_an_alias():
    rng = np.random.default_rng(9)
    base = _grid(0.85 + rng.normal(0, 0.004, 10))
    other = _grid(base + rng.normal(0, 0.006, 10))
    data = analysis.analyze(_table({BASE: _flat(base), (0.0, 0.0): _flat(other)}),
                            BASE, OPTIONS).to_json()
    (c,) = data["comparisons"]
    assert c["variance_ratio"] == c["sd_ratio"] == pytest.approx(other.std(ddof=1) / base.std(ddof=1))
    for key in ("verdict", "paired", "n_pairs", "tost_ci90", "seeds_needed", "seeds_needed_margin",
                "seeds_needed_equivalence", "divergence_p_adjusted", "divergence_verdict",
                "endpoint", "robust", "multiverse"):
        assert key in c
    assert set(c["multiverse"][0]) >= {"endpoint", "test", "verdict", "mean_diff", "p_adjusted"}
    assert "n_diverged" in data["groups"][0]


# ----------------------------------------------------------------------------- declared contrasts


def test_a_declared_contrast_is_its_own_family_and_leaves_baseline_comparisons_alone():
    rng = np.random.default_rng(10)
    base = _grid(0.85 + rng.normal(0, 0.004, 10))
    first, second = _grid(base - 0.02 + rng.normal(0, 0.003, 10)), _grid(base - 0.01 + rng.normal(0, 0.003, 10))
    table = _table({BASE: _flat(base), (0.8, 0.6): _flat(first), (0.6, 0.8): _flat(second)})
    plain = analysis.analyze(table, BASE, OPTIONS)
    declared = Analysis(bootstrap=200, contrasts=(((0.8, 0.6), (0.6, 0.8)),))
    with_contrast = analysis.analyze(table, BASE, declared)
    assert [c.p_adjusted for c in with_contrast.comparisons] == [c.p_adjusted for c in plain.comparisons]
    assert plain.contrasts == []
    (k,) = with_contrast.contrasts
    assert (k.dropout1, k.dropout2, k.baseline) == (0.8, 0.6, [0.6, 0.8])
    assert k.paired and k.n_pairs == 10
    assert k.p == pytest.approx(sps.ttest_rel(first, second).pvalue)
    assert k.p_adjusted == k.p  # a family of one
    assert k.verdict == "different" and k.mean_diff < 0

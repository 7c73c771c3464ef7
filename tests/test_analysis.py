"""study.analysis on synthetic RunTables with planted effects.

    .venv/bin/python -m pytest tests/test_analysis.py -q
"""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps
from scipy.stats import mstats
from statsmodels.stats.multitest import multipletests

from study.analysis import comparisons as analysis, stats, table
from study.protocol.schema import Analysis
from study.analysis.table import CURVE_COLUMNS, RUN_COLUMNS, RunTable

BASE = (0.0, 0.0)
OPTIONS = Analysis(alpha=0.05, equivalence_margin=0.005, bootstrap=500, power=0.8)


def _runs(accs: dict[tuple[float, float], np.ndarray], seeds=None, **stratum) -> list[dict]:
    """One row per (setting, seed); `accs[setting][i]` is the test accuracy of seed i.
    `seeds` maps a setting to its seed list (default 0..n-1)."""
    rows = []
    for setting, values in accs.items():
        setting_seeds = (seeds or {}).get(setting, range(len(values)))
        for seed, acc in zip(setting_seeds, values):
            rows.append(_row(setting, seed, float(acc), **stratum))
    return rows


def _row(setting, seed, acc, device="cpu", replicate=0, **extra) -> dict:
    diverged = not math.isfinite(acc)
    return {
        "run_id": f"{device}-{setting}-{seed}-{replicate}", "run_name": f"p{setting}-seed{seed}",
        "dropout1": setting[0], "dropout2": setting[1], "seed": seed, "device": device,
        "determinism": "default", "implementation": "torch", "execution": "sequential",
        "randomness": "native", "mask_rng": "torch", "vary": "all", "replicate": replicate,
        "threads": "2", "train_images": 60_000,
        "status": "diverged" if diverged else ("degenerate" if acc <= 0.11 else "ok"),
        "textbook_check": (not diverged) and acc > 0.7, "weights_sha256": "0" * 64,
        "epochs_done": 10, "test_acc": acc, "train_acc": acc + 0.01 if not diverged else math.nan,
        "train_loss": 0.4 if not diverged else math.nan, **extra,
    }


def _table(rows: list[dict]) -> RunTable:
    curves = pd.DataFrame({c: pd.Series(dtype=t) for c, t in CURVE_COLUMNS.items()})
    return RunTable("1", "synthetic", pd.DataFrame(rows, columns=list(RUN_COLUMNS)), curves)


def _analyze(table: RunTable, base=BASE, options=OPTIONS, seed: int = 0) -> dict:
    """The results.json form, as a reader of the file sees it."""
    return analysis.analyze(table, base, options, seed).to_json()


def _seeded(n: int, seed: int = 0, seed_sd: float = 0.003) -> tuple[np.random.Generator, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng, 0.85 + rng.normal(0, seed_sd, n)  # baseline accuracies with a per-seed effect


def _comparison(results: dict, setting, device="cpu") -> dict:
    (c,) = [c for c in results["comparisons"]
            if (c["dropout1"], c["dropout2"]) == setting and c["stratum"]["device"] == device]
    return c


def _walk(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _walk(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _walk(v)
    else:
        yield obj


# ----------------------------------------------------------------------------- verdicts


def test_planted_verdicts_different_equivalent_inconclusive():
    rng, base = _seeded(10)
    gap = base + 0.01 + rng.normal(0, 0.001, 10)  # a real 1-point gain
    same = base + rng.normal(0, 0.0005, 10)  # equal means, tight spread
    table = _table(_runs({BASE: base, (0.2, 0.5): gap, (0.5, 0.5): same}))
    results = _analyze(table, BASE, OPTIONS)
    assert _comparison(results, (0.2, 0.5))["verdict"] == "different"
    assert _comparison(results, (0.5, 0.5))["verdict"] == "equivalent"
    assert results["strata"][0]["paired"] and results["strata"][0]["omnibus"]["test"] == "friedman"


def test_small_gap_with_few_noisy_seeds_is_inconclusive():
    rng = np.random.default_rng(3)
    base = 0.85 + rng.normal(0, 0.01, 4)
    noisy = base + 0.003 + rng.normal(0, 0.01, 4)
    results = _analyze(_table(_runs({BASE: base, (0.2, 0.5): noisy})), BASE, OPTIONS)
    c = _comparison(results, (0.2, 0.5))
    assert c["verdict"] == "inconclusive"
    assert c["seeds_needed"] > 4 and c["mde"] > abs(c["mean_diff"])


def test_comparison_numbers_match_scipy_and_holm_is_per_stratum_family():
    rng, base = _seeded(10, seed=5)
    accs = {BASE: base, (0.2, 0.5): base + 0.002 + rng.normal(0, 0.002, 10),
            (0.5, 0.5): base - 0.001 + rng.normal(0, 0.002, 10),
            (0.6, 0.8): base + rng.normal(0, 0.004, 10)}
    # On the 10k-image grid, as real accuracies are: rank tests round to it before ranking.
    accs = {s: np.round(v, 4) for s, v in accs.items()}
    base = accs[BASE]
    results = _analyze(_table(_runs(accs)), BASE, OPTIONS)
    comps = sorted(results["comparisons"], key=lambda c: (c["dropout1"], c["dropout2"]))
    settings = sorted(s for s in accs if s != BASE)
    raw = [sps.ttest_rel(accs[s], base).pvalue for s in settings]
    assert [c["p"] for c in comps] == pytest.approx(raw)
    assert [c["p_adjusted"] for c in comps] == pytest.approx(list(multipletests(raw, method="holm")[1]))
    bf = [sps.levene(accs[s], base, center="median").pvalue for s in settings]
    holm = lambda p: list(multipletests(p, method="holm")[1])  # noqa: E731
    assert [c["variance_p_adjusted"] for c in comps] == pytest.approx(holm(bf))
    ranks = [sps.wilcoxon(accs[s] - base).pvalue for s in settings]
    assert [c["rank_p_adjusted"] for c in comps] == pytest.approx(holm(ranks))
    matrix = np.column_stack([accs[s] for s in sorted(accs)])
    assert results["strata"][0]["omnibus"]["p"] == pytest.approx(sps.friedmanchisquare(*matrix.T).pvalue)


def test_constant_chance_group_has_reasons_and_no_nan():
    rng, base = _seeded(10)
    accs = {BASE: base, (0.2, 0.5): base + rng.normal(0, 0.002, 10),
            (0.9, 0.9): np.full(10, 0.1), (1.0, 1.0): np.full(10, 0.1)}
    table = _table(_runs(accs))
    results = _analyze(table, BASE, OPTIONS)
    text = json.dumps(results, allow_nan=False)  # raises on NaN or infinity
    assert "NaN" not in text
    assert not any(isinstance(v, float) and not math.isfinite(v) for v in _walk(results))
    (chance,) = [g for g in results["groups"] if (g["dropout1"], g["dropout2"]) == (1.0, 1.0)]
    assert chance["sd"] == 0.0 and "zero variance" in chance["reason"]
    assert chance["status_counts"] == {"degenerate": 10} and chance["textbook_check_passed"] == 0
    c = _comparison(results, (1.0, 1.0))
    assert c["verdict"] == "different" and c["variance_ratio"] == 0.0
    # Unpaired, the constant groups make Welch's ANOVA undefined: a reason, Kruskal still runs.
    shifted = _table(_runs(accs, seeds={s: range(10 * i, 10 * i + 10) for i, s in enumerate(accs)}))
    unpaired = _analyze(shifted, BASE, OPTIONS)
    omnibus = unpaired["strata"][0]["omnibus"]
    assert omnibus["p"] is None and "zero variance" in omnibus["reason"]
    assert omnibus["secondary"]["p"] is not None
    json.dumps(unpaired, allow_nan=False)


def test_every_none_in_a_comparison_comes_with_a_reason():
    rng, base = _seeded(10)
    results = _analyze(_table(_runs({BASE: base, (0.5, 0.5): base.copy(),
                                             (1.0, 1.0): np.full(10, 0.1)})), BASE, OPTIONS)
    for c in results["comparisons"]:
        if any(c[k] is None for k in ("p", "rank_p", "tost_p", "brown_forsythe_p", "mde", "seeds_needed")):
            assert c["reason"], c
    same = _comparison(results, (0.5, 0.5))
    assert same["verdict"] == "equivalent" and "by construction" in same["reason"]


# ----------------------------------------------------------------------------- structure


def test_two_devices_make_two_strata():
    rng, base = _seeded(6)
    rows = (_runs({BASE: base, (0.2, 0.5): base + 0.01}, device="cpu")
            + _runs({BASE: base - 0.002, (0.2, 0.5): base + rng.normal(0, 0.003, 6)}, device="cuda"))
    results = _analyze(_table(rows), BASE, OPTIONS)
    assert [s["stratum"]["device"] for s in results["strata"]] == ["cpu", "cuda"]
    # Named by the one column that varies, in words; the constant ones are said once elsewhere.
    assert [s["label"] for s in results["strata"]] == ["CPU", "GPU (CUDA)"]
    assert results["stratified_by"] == ["device"]
    assert len(results["groups"]) == 4 and len(results["comparisons"]) == 2
    assert {c["stratum"]["device"] for c in results["comparisons"]} == {"cpu", "cuda"}
    # Each stratum is its own Holm family of one: adjusted p equals raw p.
    assert all(c["p_adjusted"] == c["p"] for c in results["comparisons"] if c["p"] is not None)
    assert results["strata"][0]["omnibus"]["reason"]  # 2 settings: Friedman needs 3


def test_unpaired_path_when_seeds_differ():
    rng = np.random.default_rng(1)
    base, other = 0.85 + rng.normal(0, 0.003, 8), 0.86 + rng.normal(0, 0.003, 8)
    rows = _runs({BASE: base, (0.2, 0.5): other}, seeds={BASE: range(8), (0.2, 0.5): range(100, 108)})
    results = _analyze(_table(rows), BASE, OPTIONS)
    c = _comparison(results, (0.2, 0.5))
    assert not c["paired"] and c["test"] == "welch_t" and c["rank_test"] == "mann_whitney"
    assert c["p"] == pytest.approx(sps.ttest_ind(other, base, equal_var=False).pvalue)
    assert results["strata"][0]["omnibus"]["test"] == "welch_anova"
    assert results["strata"][0]["n_seeds"] == 16


def test_diverged_runs_and_replicates_are_excluded_and_counted():
    rng, base = _seeded(10)
    setting = base + 0.005 + rng.normal(0, 0.001, 10)
    setting[3] = math.nan
    rows = _runs({BASE: base, (0.2, 0.5): setting})
    rows.append(_row((0.2, 0.5), 0, 0.99, replicate=1))  # a replicate must not enter the stats
    results = _analyze(_table(rows), BASE, OPTIONS)
    (g,) = [g for g in results["groups"] if g["dropout1"] == 0.2]
    assert g["n"] == 9 and g["n_excluded"] == 1 and "diverged" in g["reason"]
    assert g["status_counts"] == {"diverged": 1, "ok": 9}
    c = _comparison(results, (0.2, 0.5))
    assert c["paired"] and c["n"] == c["n_pairs"] == 9 and c["n_dropped"] == 1
    assert "1 diverged run(s) of the setting" in c["reason"]
    assert c["n_diverged_setting"] == 1 and c["divergence_verdict"] == "not_shown_different"
    keep = np.isfinite(setting)
    assert c["p"] == pytest.approx(sps.ttest_rel(setting[keep], base[keep]).pvalue)
    assert results["n_replicate_runs_ignored"] == 1


def test_missing_baseline_and_empty_table_are_stated_not_crashed(tmp_path):
    rng, base = _seeded(5)
    results = _analyze(_table(_runs({(0.2, 0.5): base, (0.5, 0.5): base + 0.01})), BASE, OPTIONS)
    assert results["comparisons"] == [] and "no runs" in results["strata"][0]["notes"][0]
    empty = _table([])
    nothing = analysis.analyze(empty, BASE, OPTIONS)
    assert nothing.strata == [] and nothing.n_runs == 0
    assert len(analysis.write(nothing, empty, tmp_path)) == 6


def test_group_summary_fields():
    rng, base = _seeded(5)
    results = _analyze(_table(_runs({BASE: base, (0.2, 0.5): base + 0.01})), BASE, OPTIONS)
    (g,) = [g for g in results["groups"] if g["dropout1"] == 0.0]
    assert g["mean"] == pytest.approx(base.mean()) and g["sd"] == pytest.approx(base.std(ddof=1))
    assert g["gap_mean"] == pytest.approx(0.01) and g["train_loss_mean"] == pytest.approx(0.4)
    assert g["textbook_check_passed"] == 5 and g["iqr"][0] <= g["median"] <= g["iqr"][1]


# ----------------------------------------------------------------------------- determinism and output


def test_seed_controls_bootstrap():
    rng, base = _seeded(10)
    table = _table(_runs({BASE: base, (0.2, 0.5): base + rng.normal(0.002, 0.002, 10)}))
    a, b = _analyze(table, BASE, OPTIONS, seed=1), _analyze(table, BASE, OPTIONS, seed=1)
    c = _analyze(table, BASE, OPTIONS, seed=2)
    assert a == b
    assert a["groups"][0]["ci95_boot"] != c["groups"][0]["ci95_boot"]


def test_write_is_byte_identical_and_flattens(tmp_path):
    rng, base = _seeded(10)
    accs = {BASE: base, (0.2, 0.5): base + rng.normal(0.002, 0.002, 10), (1.0, 1.0): np.full(10, 0.1)}
    table = _table(_runs(accs) + _runs({BASE: base}, device="cuda"))
    first = analysis.write(analysis.analyze(table, BASE, OPTIONS), table, tmp_path / "a")
    second = analysis.write(analysis.analyze(table, BASE, OPTIONS), table, tmp_path / "b")
    # The same cells on cpu and cuda make the devices section applicable: its CSV is returned too.
    assert [p.name for p in first] == ["results.json", "groups.csv", "comparisons.csv",
                                       "contrasts.csv", "multiverse.csv", "runs.csv",
                                       "diagnostics_devices.csv"]
    for p, q in zip(first, second):
        assert p.read_bytes() == q.read_bytes(), p.name
    comps = pd.read_csv(first[2])
    for col in ("device", "mean_diff_ci95_lo", "mean_diff_ci95_hi", "variance_ratio_ci95_hi",
                "baseline_dropout1", "p_adjusted", "verdict"):
        assert col in comps.columns
    groups = pd.read_csv(first[1])
    assert {"ci95_lo", "ci95_hi", "iqr_lo", "iqr_hi", "status_counts_ok"} <= set(groups.columns)
    assert len(pd.read_csv(first[5])) == len(table.runs)
    loaded = json.loads(first[0].read_text())
    assert loaded["metric"] == "test_acc" and loaded["baseline"] == [0.0, 0.0]


# ----------------------------------------------------------------------------- each analysis's interval


def _cells(results, setting, endpoint: str = "final") -> dict:
    (c,) = [c for c in results.comparisons if (c.dropout1, c.dropout2) == setting]
    return {a.test: a for a in c.multiverse if a.endpoint == endpoint}


def _rank_k(null_sums: list[float], level: float) -> int:
    """Brute force: k = the smallest c with P(S <= c) > (1 - level) / 2 under the enumerated null,
    so [W_(k), W_(N-k+1)] holds the shifts the two-sided rank test does not reject."""
    s = np.array(null_sums)
    return next(c for c in range(int(s.max()) + 1) if np.mean(s <= c) > (1 - level) / 2)


def test_rank_cells_carry_the_paired_hodges_lehmann_interval():
    rng, base = _seeded(10, seed=7)
    base = np.round(base, 4)
    x = np.round(base + 0.004 + rng.normal(0, 0.003, 10), 4)
    results = analysis.analyze(_table(_runs({BASE: base, (0.2, 0.5): x})), BASE, OPTIONS)
    cell = _cells(results, (0.2, 0.5))["rank"]
    assert cell.paired and cell.n_pairs == 10
    d = np.rint((x - base) / 1e-4)  # whole test images
    walsh = sorted((d[i] + d[j]) / 2 for i in range(10) for j in range(i, 10))  # 55 of them
    # The exact signed-rank law at n = 10 from all 2^10 sign patterns. Printed tables give the
    # two-sided critical values 8 (alpha 0.05) and 10 (alpha 0.10): k is one more.
    t_plus = [sum(r for r, s in zip(range(1, 11), signs) if s)
              for signs in itertools.product((0, 1), repeat=10)]
    k95, k90 = _rank_k(t_plus, 0.95), _rank_k(t_plus, 0.90)
    assert (k95 - 1, k90 - 1) == (8, 10)
    assert cell.mean_diff == pytest.approx(np.median(walsh) * 1e-4)
    assert cell.ci95 == pytest.approx((walsh[k95 - 1] * 1e-4, walsh[55 - k95] * 1e-4))
    assert cell.tost_ci90 == pytest.approx((walsh[k90 - 1] * 1e-4, walsh[55 - k90] * 1e-4))


def _unpaired_accs() -> tuple[np.ndarray, np.ndarray, dict]:
    """5 seeds of the setting and 6 of the baseline, none shared: the unpaired tests."""
    rng = np.random.default_rng(12)
    x = np.round(0.855 + rng.normal(0, 0.004, 5), 4)
    y = np.round(0.850 + rng.normal(0, 0.004, 6), 4)
    return x, y, {(0.2, 0.5): range(100, 105), BASE: range(6)}


def test_rank_cells_carry_the_unpaired_hodges_lehmann_interval():
    x, y, seeds = _unpaired_accs()
    table = _table(_runs({BASE: y, (0.2, 0.5): x}, seeds=seeds))
    cell = _cells(analysis.analyze(table, BASE, OPTIONS), (0.2, 0.5))["rank"]
    assert not cell.paired
    diffs = sorted(np.rint(a / 1e-4) - np.rint(b / 1e-4) for a in x for b in y)  # 30
    # The exact Mann-Whitney law of n1 = 5, n2 = 6 from all C(11, 5) = 462 rank subsets.
    # Printed tables give the two-sided critical U 3 (alpha 0.05) and 5 (alpha 0.10).
    u = [sum(ranks) - 15 for ranks in itertools.combinations(range(1, 12), 5)]
    k95, k90 = _rank_k(u, 0.95), _rank_k(u, 0.90)
    assert (k95 - 1, k90 - 1) == (3, 5)
    assert cell.mean_diff == pytest.approx(np.median(diffs) * 1e-4)
    assert cell.ci95 == pytest.approx((diffs[k95 - 1] * 1e-4, diffs[30 - k95] * 1e-4))
    assert cell.tost_ci90 == pytest.approx((diffs[k90 - 1] * 1e-4, diffs[30 - k90] * 1e-4))


def test_trimmed_cells_carry_yuens_interval_as_scipy_computes_it():
    x, y, seeds = _unpaired_accs()
    table = _table(_runs({BASE: y, (0.2, 0.5): x}, seeds=seeds))
    cell = _cells(analysis.analyze(table, BASE, OPTIONS), (0.2, 0.5))["trimmed"]
    ref = sps.ttest_ind(x, y, equal_var=False, trim=0.2)
    assert cell.mean_diff == pytest.approx(sps.trim_mean(x, 0.2) - sps.trim_mean(y, 0.2))
    assert cell.ci95 == pytest.approx(tuple(ref.confidence_interval(0.95)))
    assert cell.tost_ci90 == pytest.approx(tuple(ref.confidence_interval(0.90)))


def test_paired_trimmed_cells_carry_wilcoxs_yuend_interval():
    """scipy has no paired Yuen test: the reference is Wilcox's (2012) `yuend` formula from
    scipy's winsorize and trim_mean; its coverage is checked by simulation in the next test."""
    rng, base = _seeded(10, seed=9)
    x = base + 0.003 + rng.normal(0, 0.003, 10)
    cell = _cells(analysis.analyze(_table(_runs({BASE: base, (0.2, 0.5): x})), BASE, OPTIONS),
                  (0.2, 0.5))["trimmed"]
    wx = np.asarray(mstats.winsorize(x, limits=(0.2, 0.2)))
    wy = np.asarray(mstats.winsorize(base, limits=(0.2, 0.2)))
    h = 10 - 2 * 2
    se = math.sqrt(9 * (wx.var(ddof=1) + wy.var(ddof=1) - 2 * np.cov(wx, wy)[0, 1]) / (h * (h - 1)))
    est = sps.trim_mean(x, 0.2) - sps.trim_mean(base, 0.2)
    assert cell.paired and cell.mean_diff == pytest.approx(est)
    for got, level in ((cell.ci95, 0.95), (cell.tost_ci90, 0.90)):
        half = sps.t.ppf(0.5 + level / 2, h - 1) * se
        assert got == pytest.approx((est - half, est + half))


def test_paired_rank_and_trimmed_intervals_cover_at_their_level():
    """Monte Carlo, 1000 correlated normal pairs at n = 10 with a true shift 0.3 (symmetric, so
    the HL and trimmed-mean shifts are 0.3 too): HL's exact level is 1 - 2 * 25/1024 = 0.951;
    Yuen's is approximately 0.95. 3 SE of a share near 0.95 over 1000 is 0.02."""
    rng = np.random.default_rng(0)
    hits = {"rank": 0, "trimmed": 0}
    for _ in range(1000):
        z = rng.multivariate_normal([0.3, 0.0], [[1, 0.6], [0.6, 1]], size=10)
        for family in hits:
            lo, hi = stats.location_ci(family, z[:, 0], z[:, 1], paired=True, level=0.95)
            hits[family] += lo <= 0.3 <= hi
    assert hits["rank"] / 1000 == pytest.approx(1 - 2 * 25 / 1024, abs=0.02)
    assert hits["trimmed"] / 1000 == pytest.approx(0.95, abs=0.02)


def test_multiverse_csv_has_each_analysis_interval_and_the_stratum(tmp_path):
    rng, base = _seeded(10)
    table = _table(_runs({BASE: base, (0.2, 0.5): base + rng.normal(0.002, 0.002, 10)}))
    results = analysis.analyze(table, BASE, OPTIONS)
    verse = pd.read_csv(analysis.write(results, table, tmp_path)[4])
    assert {"device", "ci95_lo", "ci95_hi", "tost_ci90_lo", "tost_ci90_hi"} <= set(verse.columns)
    c = results.comparisons[0]
    (primary,) = [a for a in c.multiverse if (a.endpoint, a.test) == ("final", "t")]
    assert (primary.ci95, primary.tost_ci90) == (c.mean_diff_ci95, c.tost_ci90)
    for a, row in zip(c.multiverse, verse.itertuples()):
        assert (row.endpoint, row.test) == (a.endpoint, a.test)
        assert (row.ci95_lo, row.ci95_hi) == pytest.approx(a.ci95)
        assert (row.tost_ci90_lo, row.tost_ci90_hi) == pytest.approx(a.tost_ci90)


def test_learning_curves_are_per_epoch_means_with_scipys_t_interval():
    rng, base = _seeded(4)
    rows = _runs({BASE: base, (0.2, 0.5): base + 0.01}) + [_row((1.0, 1.0), 0, 0.1)]
    rows[1]["test_acc"] = math.nan  # seed 1 of the baseline diverged in its last epoch
    epochs = {r["run_id"]: 0.80 + 0.01 * np.arange(3) + rng.normal(0, 0.004, 3) for r in rows}
    epochs[rows[1]["run_id"]][2] = math.nan
    curves = pd.DataFrame([{"run_id": run, "epoch": e + 1, "metric": m, "value": v[e] * f}
                           for run, v in epochs.items() for e in range(3)
                           for m, f in (("test_acc", 1.0), ("train_loss", 0.5), ("train_acc", 1.0))])
    table = RunTable("1", "synthetic", pd.DataFrame(rows, columns=list(RUN_COLUMNS)), curves)
    results = analysis.analyze(table, BASE, OPTIONS)
    assert {c.metric for c in results.curves} == set(analysis.CURVE_METRICS)  # not train_acc
    base_acc = next(c for c in results.curves
                    if (c.dropout1, c.dropout2) == BASE and c.metric == "test_acc")
    runs = [epochs[r["run_id"]] for r in rows[:4]]
    for p in base_acc.points:
        x = np.array([v[p.epoch - 1] for v in runs])
        x = x[np.isfinite(x)]  # the diverged run counts where it was finite
        ref = sps.t.interval(0.95, x.size - 1, loc=x.mean(), scale=sps.sem(x))
        assert (p.n, p.mean) == (x.size, pytest.approx(x.mean()))
        assert p.ci95 == pytest.approx(ref)
    assert [p.n for p in base_acc.points] == [4, 4, 3]
    lone = next(c for c in results.curves if (c.dropout1, c.dropout2) == (1.0, 1.0))
    assert all(p.n == 1 and p.ci95 is None for p in lone.points)
    json.dumps(results.to_json(), allow_nan=False)


def test_strata_are_named_in_words_by_the_columns_that_vary():
    assert table.stratum_label({"device": "cpu", "train_images": 1000, "threads": 2},
                               ["train_images", "threads"]) == "1,000 training images, 2 threads"
    assert table.stratum_label({"device": "cpu"}, []) == "all runs"
    assert table.stratum_words("implementation", "scratch-randn").startswith("hand-written dropout (randn")
    assert table.stratum_words("determinism", "portable") == "portable mode"
    assert table.stratum_words("threads", 1) == "1 thread"
    assert table.stratum_words("train_images", float("nan")) == "train_images not recorded"
    assert table.stratum_words("execution", "unheard-of") == "execution unheard-of"


"""study.diagnostics on synthetic RunTables with planted effects, against scipy/statsmodels.

    .venv/bin/python -m pytest tests/test_diagnostics.py -q
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pandas as pd
import pytest
import statsmodels.formula.api as smf
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.weightstats import ttost_paired

from study.analysis import comparisons as analysis, diagnostics
from study.report.diagnostics import keep_finding, summers_finding
from study.results.diagnostics import Diagnostics, MaxAbsDiff
from study.protocol.schema import Analysis
from study.analysis.table import CURVE_COLUMNS, RUN_COLUMNS, RunTable

OPTIONS = Analysis(alpha=0.05, equivalence_margin=0.005, bootstrap=500, power=0.8)


def _row(setting=(0.2, 0.5), seed=0, acc=0.85, *, device="cpu", determinism="default",
         implementation="torch", vary="all", replicate=0, sha=None, loss=0.4,
         keep=(math.nan, math.nan)) -> dict:
    name = f"{setting}-{seed}-{device}-{determinism}-{implementation}-{vary}-{replicate}"
    return {
        "run_id": name, "run_name": name, "dropout1": setting[0], "dropout2": setting[1],
        "seed": seed, "device": device, "determinism": determinism,
        "implementation": implementation, "execution": "sequential", "randomness": "native",
        "mask_rng": "torch", "kernels": "torch", "threads": "2",
        "vary": vary, "replicate": replicate, "status": "ok", "textbook_check": True,
        "weights_sha256": sha if sha is not None else f"h{setting}{seed}{implementation}{vary}",
        "epochs_done": 10, "test_acc": acc, "train_acc": acc + 0.01, "train_loss": loss,
        "keep_rate1": keep[0], "keep_rate2": keep[1],
    }


def _table(rows: list[dict]) -> RunTable:
    curves = pd.DataFrame({c: pd.Series(dtype=t) for c, t in CURVE_COLUMNS.items()})
    return RunTable("1", "synthetic", pd.DataFrame(rows, columns=list(RUN_COLUMNS)), curves)


def _diag(rows: list[dict], seed: int = 0) -> Diagnostics:
    out = diagnostics.analyze(_table(rows), OPTIONS, seed)
    # No NaN or infinity anywhere, plain JSON types only, and the JSON form reads back into
    # the same objects (a NaN would not compare equal; a NumPy integer would not serialise).
    text = json.dumps(dataclasses.asdict(out), allow_nan=False)
    assert Diagnostics.from_json(json.loads(text)) == out
    return out


def _field(record, key):
    return getattr(record, key) if hasattr(record, key) else record.stratum.get(key)


def _one(records: list, **match):
    (r,) = [r for r in records if all(_field(r, k) == v for k, v in match.items())]
    return r


# ----------------------------------------------------------------------------- small pieces


def test_pooled_variance_matches_anova_residual_mean_square():
    rng = np.random.default_rng(0)
    groups = [rng.normal(0.85, 0.01, n) for n in (2, 3, 5)]
    frame = pd.DataFrame({"y": np.concatenate(groups),
                          "g": np.repeat(np.arange(3), [g.size for g in groups])})
    var, df = diagnostics.pooled_variance(groups + [np.array([0.9])])  # a lone value adds no df
    assert df == 7
    assert var == pytest.approx(smf.ols("y ~ C(g)", frame).fit().mse_resid)
    # Identical values (0.1 is not exactly representable: a plain mean would leave round-off).
    assert diagnostics.pooled_variance([np.full(3, 0.1), np.full(2, 0.7)]) == (0.0, 3)
    assert diagnostics.pooled_variance([np.array([0.8])]) == (None, 0)
    assert diagnostics.sd(np.array([0.1, 0.1, 0.1])) == 0.0


def test_share_ci_is_clopper_pearson():
    lo, hi = diagnostics.share_ci(3, 10)
    assert lo == pytest.approx(sps.beta.ppf(0.025, 3, 8))
    assert hi == pytest.approx(sps.beta.ppf(0.975, 4, 7))
    lo, hi = diagnostics.share_ci(4, 4)
    assert hi == 1.0 and lo == pytest.approx(0.025 ** (1 / 4))  # solved by hand: lo^4 = alpha/2
    assert diagnostics.share_ci(0, 0) is None


def test_bootstrap_sd_ci_agrees_with_scipy_bootstrap():
    x = np.random.default_rng(1).normal(0, 1, 30)
    ours = diagnostics.bootstrap_sd_ci(x, np.random.default_rng(2), 20_000)
    # BCa (stats.bootstrap_ci); a different random stream agrees to Monte Carlo error.
    ref = sps.bootstrap((x,), lambda a, axis: a.std(axis=axis, ddof=1), n_resamples=20_000,
                        method="BCa", rng=np.random.default_rng(3))
    assert ours[0] == pytest.approx(ref.confidence_interval.low, abs=0.03)
    assert ours[1] == pytest.approx(ref.confidence_interval.high, abs=0.03)
    assert diagnostics.bootstrap_sd_ci(x[:1], np.random.default_rng(0)) is None


def test_expected_keep_rates():
    assert diagnostics.expected_keep_rate("torch", 0.2) == pytest.approx(0.8)
    assert diagnostics.expected_keep_rate("scratch", 0.5) == pytest.approx(0.5)
    # P(N(0,1) > 0.5) = 1 - Phi(0.5) = 0.3085 (standard normal table)
    assert diagnostics.expected_keep_rate("scratch-randn", 0.5) == pytest.approx(0.3085, abs=1e-4)
    for impl in ("torch", "scratch", "scratch-randn"):
        assert diagnostics.expected_keep_rate(impl, 0.0) == 1.0
        assert diagnostics.expected_keep_rate(impl, 1.0) == 0.0


@pytest.mark.parametrize("ci, label", [
    ((0.7, 1.4), "consistent"), ((0.4, 1.3), "inconclusive"), ((0.6, 0.9), "smaller"),
    ((0.1, 0.45), "much_smaller"), ((1.1, 2.0), "larger"), ((0.6, None), "consistent"),
    (None, "not_computable"), ((None, None), "not_computable")])
def test_summers_verdict(ci, label):
    assert diagnostics.summers_verdict(ci) == label


# ----------------------------------------------------------------------------- replicates and modes


def _replicated(modes=("default",), seeds=range(4), accs=None, sha_of=None) -> list[dict]:
    """Two replicates per cell; by default replicate 1 repeats replicate 0 bitwise."""
    rows = []
    rng = np.random.default_rng(7)
    accs = accs if accs is not None else {s: 0.85 + rng.normal(0, 0.004) for s in seeds}
    for mode in modes:
        for setting in ((0.0, 0.0), (0.2, 0.5)):
            for seed in seeds:
                for rep in (0, 1):
                    acc, sha = accs[seed] + setting[0] / 100, f"w{setting}{seed}"
                    if sha_of is not None:
                        acc, sha = sha_of(mode, setting, seed, rep, acc, sha)
                    rows.append(_row(setting, seed, acc, determinism=mode, replicate=rep, sha=sha))
    return rows


def test_identical_replicates_share_one_and_zero_nondeterminism_variance():
    out = _diag(_replicated(modes=("default", "benchmark", "strict")))
    rec = out.replicates
    assert rec.applicable and len(rec.records) == 3
    r = _one(rec.records, determinism="default")
    assert r.share_identical == 1.0 and r.n_replicates == 8 and r.n_cells == 8
    assert r.nondeterminism_var == 0.0 and r.nondeterminism_sd == 0.0
    assert r.variance_ratio == 0.0 and r.max_abs_diff == MaxAbsDiff(test_acc=0.0, train_loss=0.0)
    assert "exactly 0" in r.reason and r.n_identical == r.n_hash_compared == 8
    assert r.seed_var > 0 and r.share_identical_ci95[1] == 1.0
    # Modes: the same weights under every mode is a null result, stated as "no change observed".
    modes = out.modes
    assert modes.reference == "default" and len(modes.records) == 2
    for m in modes.records:
        assert m.no_change_observed and m.share_identical == 1.0 and m.n_pairs == 8
        assert m.verdict == "equivalent" and "by construction" in m.reason
    assert not out.devices.applicable and not out.implementations.applicable
    assert not out.variance_sources.applicable and not out.keep_rates.applicable


def test_planted_replicate_differences_are_detected_and_match_anova():
    noise = np.random.default_rng(11).normal(0, 0.001, 64)

    def perturb(mode, setting, seed, rep, acc, sha):
        # Seeds 0 and 1 of the "benchmark" mode are not repeatable.
        if mode == "benchmark" and rep == 1 and seed in (0, 1):
            return acc + 0.002 + noise[seed], sha + "x"
        return acc, sha

    rows = _replicated(modes=("default", "benchmark"), sha_of=perturb)
    out = _diag(rows)
    r = _one(out.replicates.records, determinism="benchmark")
    assert r.n_hash_compared == 8 and r.n_identical == 4 and r.share_identical == 0.5
    assert r.max_abs_diff.test_acc == pytest.approx(0.002 + max(noise[0], noise[1]))
    frame = pd.DataFrame([x for x in rows if x["determinism"] == "benchmark"])
    frame["cell"] = frame["dropout1"].astype(str) + frame["seed"].astype(str)
    assert r.nondeterminism_var == pytest.approx(smf.ols("test_acc ~ C(cell)", frame).fit().mse_resid)
    first = frame[frame["replicate"] == 0]
    assert r.seed_var == pytest.approx(smf.ols("test_acc ~ C(dropout1)", first).fit().mse_resid)
    assert r.variance_ratio == pytest.approx(r.nondeterminism_var / r.seed_var)
    assert _one(out.replicates.records, determinism="default").share_identical == 1.0


def test_mode_that_changes_results_is_measured():
    rng = np.random.default_rng(5)
    shift = {s: 0.004 + rng.normal(0, 0.001) for s in range(6)}

    def strict(mode, setting, seed, rep, acc, sha):
        return (acc + shift[seed], sha + "s") if mode == "strict" else (acc, sha)

    rows = [r for r in _replicated(modes=("default", "strict"), seeds=range(6), sha_of=strict)
            if r["replicate"] == 0]
    (m,) = _diag(rows).modes.records
    assert not m.no_change_observed and m.share_identical == 0.0 and m.n_pairs == 12
    d = np.array([shift[s] for s in range(6)] * 2)
    assert m.mean_diff == pytest.approx(d.mean())
    ref = [r for r in rows if r["determinism"] == "default"]
    x = np.array([r["test_acc"] for r in rows if r["determinism"] == "strict"])
    y = np.array([r["test_acc"] for r in ref])
    assert m.p == pytest.approx(sps.ttest_rel(x, y).pvalue)
    # A real gap of ~0.004, shown to lie inside the 0.005 margin: "negligible" (stats.verdict).
    assert m.p_adjusted == m.p and m.verdict == "negligible"


# ----------------------------------------------------------------------------- devices


def test_paired_cpu_gpu_comparison():
    rng = np.random.default_rng(3)
    rows, gaps = [], {}
    for setting in ((0.0, 0.0), (0.2, 0.5)):
        base = 0.85 + rng.normal(0, 0.004, 8)
        gap = rng.normal(0.001, 0.002, 8)
        gaps[setting] = (base + gap, base)
        for seed in range(8):
            rows.append(_row(setting, seed, base[seed], device="cpu", sha=f"c{setting}{seed}"))
            rows.append(_row(setting, seed, base[seed] + gap[seed], device="cuda",
                             sha=f"g{setting}{seed}"))
    rows.append(_row((0.2, 0.5), 99, 0.86, device="cpu"))  # no cuda twin: not paired
    out = _diag(rows).devices
    assert out.applicable and len(out.records) == 2
    raw = [sps.ttest_rel(*gaps[s]).pvalue for s in sorted(gaps)]
    adj = multipletests(raw, method="holm")[1]
    for (setting, (x, y)), p, pa in zip(sorted(gaps.items()), raw, adj):
        r = _one(out.records, dropout1=setting[0], dropout2=setting[1])
        assert r.n_pairs == 8 and r.share_identical == 0.0 and r.n_identical == 0
        assert r.mean_diff == pytest.approx((x - y).mean())
        assert r.max_abs_diff.test_acc == pytest.approx(np.abs(x - y).max())
        assert r.p == pytest.approx(p) and r.p_adjusted == pytest.approx(pa)
        assert "device" not in r.stratum and r.stratum["determinism"] == "default"
    only_cpu = _diag([_row(seed=s) for s in range(3)]).devices
    assert not only_cpu.applicable and "cuda" in only_cpu.reason


# ----------------------------------------------------------------------------- sources of variance


def _sources(sds: dict[str, float], n: int = 10, settings=((0.2, 0.5),), seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for setting in settings:
        for vary, spread in sds.items():
            values = 0.85 + rng.normal(0, 1, n) * spread
            if setting == (0.0, 0.0) and vary == "dropout":
                values = np.full(n, 0.84)  # no masks are drawn: every seed trains the same
            rows += [_row(setting, s, values[s], vary=vary) for s in range(n)]
    return rows


def test_variance_sources_numbers_match_scipy():
    rows = _sources({"all": 0.004, "init": 0.004, "data": 0.0035, "dropout": 0.0005,
                     "bitflip": 0.0038}, n=10)
    out = _diag(rows).variance_sources
    assert out.applicable and out.low_ratio == 0.5
    acc = {v: np.array([r["test_acc"] for r in rows if r["vary"] == v]) for v in diagnostics.SOURCES}
    recs = {r.source: r for r in out.records}
    assert list(recs) == ["all", "init", "data", "dropout", "bitflip"]
    for v in diagnostics.SOURCES:
        assert recs[v].sd == pytest.approx(acc[v].std(ddof=1)) and recs[v].n == 10
        lo, hi = recs[v].sd_ci95
        assert lo < recs[v].sd < hi
    singles = ["init", "data", "dropout", "bitflip"]
    bf = [sps.levene(acc[v], acc["all"], center="median").pvalue for v in singles]
    for v, p, pa in zip(singles, bf, multipletests(bf, method="holm")[1]):
        assert recs[v].ratio == pytest.approx(acc[v].std(ddof=1) / acc["all"].std(ddof=1))
        assert recs[v].brown_forsythe_p == pytest.approx(p)
        assert recs[v].brown_forsythe_p_adjusted == pytest.approx(pa)
        assert recs[v].paired is True
    assert recs["all"].summers == "reference" and recs["all"].ratio is None
    assert recs["dropout"].summers == "much_smaller"  # planted: 1/8 of the full spread
    (summary,) = out.summaries
    assert summary.agreement == "disagree" and summary.sources == list(diagnostics.SOURCES)
    # The report names the source that breaks the claim.
    text = summers_finding(summary, out.records, out.low_ratio)
    assert "disagree with Summers" in text and "dropout: much smaller" in text
    assert summary.omnibus.p == pytest.approx(
        sps.levene(*[acc[v] for v in diagnostics.SOURCES], center="median").pvalue)


def test_single_sources_with_the_full_spread_are_consistent_with_summers():
    # Every source gets the same values in shuffled seed order: identical SDs, ratio exactly 1.
    rng = np.random.default_rng(4)
    values = 0.85 + rng.normal(0, 0.004, 40)
    rows = []
    for i, vary in enumerate(diagnostics.SOURCES):
        shuffled = np.random.default_rng(i).permutation(values)
        rows += [_row((0.2, 0.5), s, shuffled[s], vary=vary) for s in range(40)]
    out = _diag(rows).variance_sources
    for r in out.records[1:]:
        assert r.ratio == pytest.approx(1.0)
        assert r.summers == "consistent", r.ratio_ci95
        assert r.ratio_ci95[0] > 0.5 and r.ratio_ci95[0] <= 1 <= r.ratio_ci95[1]
    assert out.summaries[0].agreement == "agree"
    assert "agree with Summers" in summers_finding(out.summaries[0], out.records, out.low_ratio)


def test_dropout_source_at_p0_has_zero_spread_with_a_reason():
    rows = _sources({"all": 0.004, "dropout": 0.004}, n=6, settings=((0.0, 0.0),))
    (all_, drop) = _diag(rows).variance_sources.records
    assert drop.sd == 0.0 and drop.ratio == 0.0 and "exactly 0" in drop.reason
    assert drop.sd_ci95 == (0.0, 0.0) and drop.summers == "much_smaller"


# ----------------------------------------------------------------------------- implementations


def test_keep_rates_report_the_randn_implementation_as_it_is():
    rows = []
    for s in range(4):
        rows.append(_row((0.5, 0.5), s, 0.84, implementation="scratch-randn",
                         keep=(0.3100 + s * 1e-4, 0.3090)))
        rows.append(_row((0.5, 0.5), s, 0.85, implementation="torch", keep=(0.5001, 0.4999)))
        rows.append(_row((0.0, 0.0), s, 0.85, implementation="torch", keep=(1.0, 1.0)))
    out = _diag(rows).keep_rates
    assert out.applicable
    randn = _one(out.records, implementation="scratch-randn", layer=1)
    assert randn.observed == pytest.approx(0.31015) and randn.nominal == 0.5
    assert randn.n == 4 and randn.observed_sd == pytest.approx(np.std([0.31, 0.3101, 0.3102, 0.3103], ddof=1))
    assert randn.expected == pytest.approx(sps.norm.sf(0.5))
    assert randn.matches_expected and not randn.matches_nominal
    assert randn.deviation == pytest.approx(0.31015 - 0.5)
    assert randn.rescale == 2.0 and randn.activation_scale == pytest.approx(0.6203)
    text = keep_finding(randn)  # the report's sentence for it
    assert "31.0%" in text and "50.0%" in text and "0.62" in text
    torch_ = _one(out.records, implementation="torch", dropout1=0.5, layer=2)
    assert torch_.matches_nominal and torch_.activation_scale == pytest.approx(0.9998)
    p0 = _one(out.records, implementation="torch", dropout1=0.0, layer=1)
    assert p0.observed == 1.0 and p0.matches_nominal


def _impl_rows(n: int = 10) -> tuple[list[dict], dict]:
    rng = np.random.default_rng(8)
    rows, accs = [], {}
    for setting in ((0.2, 0.5), (0.5, 0.5)):
        base = 0.85 + rng.normal(0, 0.004, n)
        accs[(setting, "torch")] = base
        accs[(setting, "scratch")] = base + rng.normal(0, 0.0008, n)  # equal means, tight SD
        accs[(setting, "scratch-randn")] = base - 0.02 + rng.normal(0, 0.002, n)  # planted loss
        for (st, impl), values in accs.items():
            if st == setting:
                rows += [_row(setting, s, values[s], implementation=impl) for s in range(n)]
    return rows, accs


def test_implementations_equivalent_different_and_matching_references():
    rows, accs = _impl_rows()
    out = _diag(rows).implementations
    assert out.applicable and out.reference == "torch" and out.margin == 0.005
    assert len(out.records) == 4 and "perform about the same" in out.claim
    order = [(r.implementation, (r.dropout1, r.dropout2)) for r in out.records]
    raw = [sps.ttest_rel(accs[(s, i)], accs[(s, "torch")]).pvalue for i, s in order]
    tost = [ttost_paired(accs[(s, i)], accs[(s, "torch")], -0.005, 0.005)[0] for i, s in order]
    for r, p, pa, t, ta in zip(out.records, raw, multipletests(raw, method="holm")[1],
                               tost, multipletests(tost, method="holm")[1]):
        assert r.p == pytest.approx(p) and r.p_adjusted == pytest.approx(pa)
        assert r.tost_p == pytest.approx(t) and r.tost_p_adjusted == pytest.approx(ta)
        assert r.n_pairs == 10 and "implementation" not in r.stratum
        want = "equivalent" if r.implementation == "scratch" else "different"
        assert r.verdict == want, r


def test_implementations_with_few_noisy_seeds_are_inconclusive():
    rng = np.random.default_rng(2)
    base = 0.85 + rng.normal(0, 0.01, 4)
    rows = [_row((0.2, 0.5), s, base[s], implementation="torch") for s in range(4)]
    rows += [_row((0.2, 0.5), s, base[s] + 0.002 + rng.normal(0, 0.01), implementation="scratch")
             for s in range(4)]
    (r,) = _diag(rows).implementations.records
    assert r.verdict == "inconclusive" and r.seeds_needed > 4


def test_threads_pairs_cells_at_two_counts_per_mode():
    rows = []
    for mode in ("default", "strict"):
        for t in ("1", "2"):
            for s in range(3):
                # default: seeds 1 and 2 get other bits (and seed 2 another accuracy) at 2 threads
                other = mode == "default" and t == "2" and s > 0
                rows.append({**_row(seed=s, determinism=mode, sha=f"h{s}{'x' if other else ''}",
                                    acc=0.85 + (0.004 if other and s == 2 else 0.0)),
                             "threads": t})
    section = _diag(rows).threads
    assert section.applicable
    default, strict = (_one(section.records, determinism=m) for m in ("default", "strict"))
    assert (default.threads_a, default.threads_b) == ("1", "2")
    assert (default.n_pairs, default.n_identical) == (3, 1)
    assert default.max_abs_diff.test_acc == pytest.approx(0.004)
    assert (strict.n_identical, strict.n_hash_compared) == (3, 3)
    one_count = _diag([r for r in rows if r["threads"] == "1"]).threads
    assert not one_count.applicable and "two thread counts" in one_count.reason


# ----------------------------------------------------------------------------- through analysis


def test_analysis_carries_diagnostics_and_writes_their_csvs(tmp_path):
    rows = _replicated(modes=("default", "strict"), seeds=range(20, 24)) + _impl_rows()[0]
    table = _table(rows)
    results = analysis.analyze(table, (0.2, 0.5), OPTIONS)
    assert set(results.diagnostics.sections()) == {"replicates", "modes", "devices", "variance_sources",
                                        "keep_rates", "implementations", "threads"}
    paths = analysis.write(results, table, tmp_path)
    assert [p.name for p in paths] == [
        "results.json", "groups.csv", "comparisons.csv", "contrasts.csv", "multiverse.csv",
        "runs.csv", "diagnostics_implementations.csv", "diagnostics_modes.csv", "diagnostics_replicates.csv"]
    loaded = json.loads(paths[0].read_text())
    assert loaded["diagnostics"]["replicates"]["records"][0]["share_identical"] == 1.0
    assert Diagnostics.from_json(loaded["diagnostics"]) == results.diagnostics
    reps = pd.read_csv(tmp_path / "diagnostics_replicates.csv")
    assert {"device", "determinism", "share_identical", "share_identical_ci95_lo",
            "max_abs_diff_test_acc", "nondeterminism_var"} <= set(reps.columns)
    impl = pd.read_csv(tmp_path / "diagnostics_implementations.csv")
    assert len(impl) == 4 and {"mean_diff_ci95_lo", "verdict"} <= set(impl.columns)
    assert not (tmp_path / "diagnostics_devices.csv").exists()
    # Byte-identical on a second write; a section that lost its records loses its stale CSV.
    again = analysis.analyze(table, (0.2, 0.5), OPTIONS)
    first_bytes = (tmp_path / "diagnostics_modes.csv").read_bytes()
    analysis.write(again, table, tmp_path)
    assert (tmp_path / "diagnostics_modes.csv").read_bytes() == first_bytes
    only = _table(_impl_rows()[0])
    analysis.write(analysis.analyze(only, (0.2, 0.5), OPTIONS), only, tmp_path)
    assert not (tmp_path / "diagnostics_modes.csv").exists()


def test_empty_and_plain_tables_give_reasons_not_nan():
    for rows in ([], [_row(seed=s, acc=math.nan if s == 0 else 0.85) for s in range(3)]):
        out = _diag(rows)
        for section, body in out.sections().items():
            assert body.applicable is False and body.reason and body.records == [], section


def test_diverged_runs_do_not_make_nan():
    rows = _sources({"all": 0.004, "init": 0.004}, n=5)
    rows[0]["test_acc"] = math.nan  # a diverged run in "all"
    rows += [_row((0.2, 0.5), 0, math.nan, vary="all", replicate=1, sha="")]
    out = _diag(rows)
    rep = out.replicates.records[0]
    assert rep.max_abs_diff.test_acc is None and rep.n_hash_compared == 1 - 1
    assert rep.share_identical is None and "weight hash" in rep.reason
    (all_, init) = out.variance_sources.records
    assert all_.n == 4 and init.paired is False

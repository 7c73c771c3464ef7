"""Synthetic runs and a hand-built `Results` with planted verdicts, for the report and figures.

The results are built field by field (not through `analysis.analyze`), so the report's tests
check its wording against numbers chosen here, whatever the statistics branch computes.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from study.protocol import schema as protocol_module
from study.analysis.comparisons import learning_curves
from study.results import Analysed, Comparison, Group, Omnibus, Results, Stratum
from study.analysis.table import RunTable, stratum_label

SETTINGS = [(0.0, 0.0), (0.2, 0.5), (0.6, 0.8), (0.9, 0.9), (1.0, 1.0)]
BASELINE = (0.2, 0.5)
SEEDS = range(5)
EPOCHS = 4  # too few for last:5: the factory lists it as left out
# Planted truth per setting: mean final test accuracy and its seed-to-seed SD.
TRUTH = {(0.0, 0.0): (0.881, 0.003), (0.2, 0.5): (0.876, 0.004), (0.6, 0.8): (0.8755, 0.004),
         (0.9, 0.9): (0.70, 0.02), (1.0, 1.0): (0.10, 0.0)}
# Seed 4 of (0.9, 0.9) diverges (non-finite loss): counted, left out of the accuracy test.
DIVERGED = ((0.9, 0.9), 4)
# Planted verdicts vs the baseline (primary analysis: final, t test).
VERDICTS = {(0.0, 0.0): "different", (0.6, 0.8): "equivalent", (0.9, 0.9): "inconclusive",
            (1.0, 1.0): "different"}
ENDPOINTS = ("final", "last:3")
TESTS = ("t", "rank", "trimmed")
LEFT_OUT = ["last:5 (only 4 evaluated epoch(s) in the shortest run)"]
# Analyses whose verdict differs from the primary's: (0, 0) and (0.9, 0.9) are not robust.
OFF_PRIMARY = {(0.0, 0.0): {("last:3", "t"): "inconclusive", ("last:3", "trimmed"): "inconclusive"},
               (0.9, 0.9): {("final", "rank"): "different"}}
STRATUM_BASE = {"device": "cpu", "determinism": "default", "execution": "sequential",
                "randomness": "native", "mask_rng": "torch", "vary": "all", "threads": "2",
                "train_images": 60_000}
PROTOCOLS = Path(__file__).resolve().parents[1] / "protocols"


def _run_rows(implementation: str, rng: np.random.Generator) -> list[dict[str, Any]]:
    rows = []
    for d1, d2 in SETTINGS:
        mean, sd = TRUTH[(d1, d2)]
        for seed in SEEDS:
            test = mean + sd * rng.standard_normal()
            degenerate = d1 == 1.0
            diverged = ((d1, d2), seed) == DIVERGED
            status = "diverged" if diverged else "degenerate" if degenerate else "ok"
            rows.append({
                "run_id": f"{implementation}-{d1}-{d2}-{seed}", "run_name": f"p{d1}-{d2} seed{seed}",
                "dropout1": d1, "dropout2": d2, "seed": seed, **STRATUM_BASE,
                "implementation": implementation, "replicate": 0, "status": status,
                "textbook_check": bool(test > 0.7 and status == "ok"),
                "weights_sha256": f"{implementation}{d1}{d2}{seed}", "epochs_done": EPOCHS,
                "test_acc": math.nan if diverged else test,
                "train_acc": math.nan if diverged else test + 0.01 - 0.05 * d1,
                "train_loss": math.nan if diverged else 2.3026 if degenerate else 0.35 + 0.3 * d1,
                "keep_rate1": 1 - d1, "keep_rate2": 1 - d2})
    return rows


def _curve_rows(runs: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for run in runs.itertuples():
        for epoch in range(1, EPOCHS + 1):
            frac = epoch / EPOCHS
            rows += [{"run_id": run.run_id, "epoch": epoch, "metric": "test_acc",
                      "value": run.test_acc - 0.05 * (1 - frac)},
                     {"run_id": run.run_id, "epoch": epoch, "metric": "train_acc",
                      "value": run.train_acc - 0.05 * (1 - frac)},
                     {"run_id": run.run_id, "epoch": epoch, "metric": "train_loss",
                      "value": run.train_loss * (1 + (1 - frac))}]
    return pd.DataFrame(rows)


def make_table(implementations: tuple[str, ...] = ("torch",), name: str = "d2l-dropout",
               replicate: bool = False) -> RunTable:
    rng = np.random.default_rng(7)
    rows = [r for impl in implementations for r in _run_rows(impl, rng)]
    if replicate:  # exact repeats of seed 0: identical weights, as a deterministic run gives
        rows += [{**r, "run_id": r["run_id"] + "-rep1", "replicate": 1}
                 for r in rows if r["seed"] == 0]
    runs = pd.DataFrame(rows)
    protocol = {"name": name, "description": "Synthetic test #1 with $pecial *chars*",
                "dropout": [list(s) for s in SETTINGS], "baseline": list(BASELINE),
                "seeds": {"count": 5, "start": 0, "list": None, "fixed": 0},
                "model": {"arch": "mlp", "hidden": [256, 256], "init_std": 0.01, "init": "normal"},
                "training": {"epochs": EPOCHS, "batch_size": 256, "lr": 0.5, "optimizer": "sgd"},
                "data": {"dataset": "fashion-mnist", "train_subset": None},
                "devices": ["cpu"], "required_devices": [], "determinism": ["default"],
                "implementations": list(implementations), "vary": ["all"],
                "execution": "sequential", "randomness": "native", "replicates": 1,
                "threads": 2, "analysis": {"alpha": 0.05, "equivalence_margin": 0.005,
                                           "bootstrap": 10000, "power": 0.8, "endpoint": "final"}}
    env = {"torch_version": "2.14.1", "cuda_version": "none", "cudnn_version": "none",
           "device_name": "cpu", "cpu": "Test CPU @ 2 cores", "threads": "2",
           "python_version": "3.11.2", "mlflow_version": "3.17.2", "git_commit": "296de8c",
           "use_deterministic_algorithms": "False", "cudnn_deterministic": "False"}
    return RunTable("1", name, runs, _curve_rows(runs), protocol, env)


def with_protocol(table: RunTable, file: str | None) -> RunTable:
    """The same runs under the resolved form of a shipped protocol (None: no protocol logged)."""
    resolved = protocol_module.load(PROTOCOLS / file).to_dict() if file else None
    return dataclasses.replace(table, protocol=resolved)


def _interval(values: np.ndarray) -> tuple[float, float]:
    half = 2.776 * values.std(ddof=1) / math.sqrt(len(values))  # t(0.975, 4): planted, not tested
    return float(values.mean() - half), float(values.mean() + half)


def make_group(stratum: dict[str, Any], runs: pd.DataFrame, d1: float, d2: float) -> Group:
    sel = runs[(runs.dropout1 == d1) & (runs.dropout2 == d2)]
    ok = sel[np.isfinite(sel.test_acc)]
    acc = ok.test_acc.to_numpy()
    gap = (ok.train_acc - ok.test_acc).to_numpy()
    sd = float(acc.std(ddof=1))
    q1, q3 = np.percentile(acc, [25, 75])
    n_diverged = int((sel.status == "diverged").sum())
    return Group(stratum=stratum, dropout1=d1, dropout2=d2, n=len(acc), n_diverged=n_diverged,
                 mean=float(acc.mean()), sd=sd, sd_ci95=(0.6 * sd, 1.8 * sd),
                 ci95=_interval(acc), ci95_boot=_interval(acc), median=float(np.median(acc)),
                 iqr=(float(q1), float(q3)), train_loss_mean=float(ok.train_loss.mean()),
                 train_acc_mean=float(ok.train_acc.mean()), gap_mean=float(gap.mean()),
                 gap_ci95=_interval(gap), status_counts=sel.status.value_counts().to_dict(),
                 textbook_check_passed=int(sel.textbook_check.sum()), n_excluded=n_diverged,
                 reason=None)


def _multiverse(setting: tuple[float, float], verdict: str, diff: float) -> list[Analysed]:
    off = OFF_PRIMARY.get(setting, {})
    # Each test its own interval, 1 pp wider per test, so a table cell shows where it came from.
    return [Analysed(endpoint=e, test=t, verdict=off.get((e, t), verdict), mean_diff=diff,
                     p_adjusted=0.01, tost_p_adjusted=0.3, paired=True, n_pairs=5,
                     ci95=(diff - 0.01 * (k + 1), diff + 0.01 * (k + 1)),
                     tost_ci90=(diff - 0.008 * (k + 1), diff + 0.008 * (k + 1)))
            for e in ENDPOINTS for k, t in enumerate(TESTS)]


def make_comparison(stratum: dict[str, Any], groups: dict[tuple, Group], d1: float,
                    d2: float) -> Comparison:
    g, b = groups[(d1, d2)], groups[BASELINE]
    diff = g.mean - b.mean
    verdict = VERDICTS[(d1, d2)]
    p = {"different": 0.0041, "equivalent": 0.61, "inconclusive": 0.2}[verdict]
    verse = _multiverse((d1, d2), verdict, diff)
    off = [f"{a.endpoint}/{a.test}: {a.verdict}" for a in verse[1:] if a.verdict != verdict]
    inconclusive = verdict == "inconclusive"
    return Comparison(
        stratum=stratum, dropout1=d1, dropout2=d2, baseline=list(BASELINE), endpoint="final",
        n=g.n, n_setting=g.n, n_baseline=b.n, n_dropped=g.n_diverged, paired=True,
        n_pairs=min(g.n, b.n), mean_diff=diff, mean_diff_ci95=(diff - 0.003, diff + 0.003),
        test="paired_t", p=p / 2, p_adjusted=p, rank_test="wilcoxon", rank_p=0.06,
        rank_p_adjusted=0.12, hedges_g=1.2, prob_superiority=0.8, tost_p=0.01,
        tost_p_adjusted=0.02 if verdict == "equivalent" else 0.4,
        tost_ci90=(diff - 0.002, diff + 0.002), tost_ci=(diff - 0.0025, diff + 0.0025),
        tost_ci_level=0.975, verdict=verdict, settled_by_construction=False, robust=not off,
        disagreeing=off, multiverse=verse, sd_ratio=1.7, sd_ratio_ci95=(0.4, 7.1),
        brown_forsythe_p=0.5, fligner_p=0.6, variance_p_adjusted=0.9,
        variance_verdict="not_shown_different", mde=0.0062,
        seeds_needed=23 if inconclusive else None, seeds_needed_margin=9 if inconclusive else None,
        seeds_needed_equivalence=12 if inconclusive else None,
        n_diverged_setting=g.n_diverged, n_diverged_baseline=b.n_diverged,
        divergence_p=0.5 if g.n_diverged else None,
        divergence_p_adjusted=1.0 if g.n_diverged else None,
        divergence_verdict="not_shown_different", reason=None)


def make_results(table: RunTable) -> Results:
    strata, groups, comparisons, curves = [], [], [], []
    first = table.runs[table.runs.replicate == 0]
    for impl, runs in first.groupby("implementation", sort=False):
        stratum = {**STRATUM_BASE, "implementation": impl}
        strata.append(Stratum(stratum=stratum, label=stratum_label(stratum, ["implementation"]), paired=True,
                              n_seeds=5, settings=[list(s) for s in SETTINGS],
                              omnibus=Omnibus("friedman", 17.4, 0.0016, None), notes=[]))
        by_setting = {s: make_group(stratum, runs, *s) for s in SETTINGS}
        groups += by_setting.values()
        comparisons += [make_comparison(stratum, by_setting, *s) for s in SETTINGS if s != BASELINE]
        curves += learning_curves(stratum, runs, table.curves)  # the analysis's own bands
    return Results(
        experiment=table.experiment_name, baseline=list(BASELINE), alpha=0.05,
        equivalence_margin=0.005, power=0.8, bootstrap=10000, seed=0, metric="test_acc",
        endpoint="final", robustness_endpoints=list(ENDPOINTS), robustness_tests=list(TESTS),
        endpoints_left_out=list(LEFT_OUT), stratified_by=["implementation"],
        n_runs=int(len(first)), n_replicate_runs_ignored=int(len(table.runs) - len(first)),
        strata=strata, groups=groups, comparisons=comparisons, curves=curves)


def comparison_at(results: Results, setting: tuple[float, float], stratum: int = 0) -> Comparison:
    key = results.strata[stratum].stratum
    return next(c for c in results.comparisons
                if c.stratum == key and (c.dropout1, c.dropout2) == setting)


def with_passes(table, passes: int = 8, seed: int = 1):
    """The factory's runs with C7 columns: the flip rate grows with the mean rate (0 at (0, 0)
    and (1, 1)); MC-averaged accuracy beats eval mode by ~0.3 pp where dropout is on."""
    rng = np.random.default_rng(seed)
    runs = table.runs.copy()
    rate = (runs["dropout1"] + runs["dropout2"]) / 2
    live = (rate > 0) & (runs["dropout1"] < 1)
    n = len(runs)
    runs["mc_passes"] = passes
    runs["mc_flip_rate"] = np.where(live, 0.1 * rate + 0.005 * rng.random(n), 0.0)
    runs["mc_unstable_share"] = np.where(live, runs["mc_flip_rate"] * 2.5, 0.0)
    runs["mc_test_acc"] = runs["test_acc"] + np.where(live, 0.003 + 0.001 * rng.standard_normal(n), 0)
    runs["test_nll"] = 0.4 + 0.01 * rng.standard_normal(n)
    runs["mc_test_nll"] = runs["test_nll"] - np.where(live, 0.02 + 0.002 * rng.standard_normal(n), 0)
    runs["test_ece"] = 0.02 + 0.002 * rng.random(n)
    runs["mc_test_ece"] = runs["test_ece"] + np.where(live, 0.0005 * rng.standard_normal(n), 0)
    runs["mc_flip_example"] = np.where(live, 1000 + runs["seed"], np.nan)
    diverged = runs["status"] == "diverged"
    cols = ["mc_flip_rate", "mc_unstable_share", "mc_test_acc", "mc_test_nll", "mc_test_ece",
            "test_nll", "test_ece", "mc_flip_example"]
    runs.loc[diverged, cols] = np.nan
    return type(table)(table.experiment_id, table.experiment_name, runs, table.curves,
                       table.protocol, table.environment)

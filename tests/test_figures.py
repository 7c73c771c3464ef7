"""Figures: each plot draws what it should, and saving is byte-deterministic.

    .venv/bin/python -m pytest tests/test_figures.py -q
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from study import figures
from study.table import RunTable

SETTINGS = [(0.0, 0.0), (0.2, 0.5), (0.6, 0.8), (0.9, 0.9), (1.0, 1.0)]
BASELINE = (0.2, 0.5)
SEEDS = range(5)
EPOCHS = 4
# Planted truth per setting: mean final test accuracy and its seed-to-seed SD.
TRUTH = {(0.0, 0.0): (0.881, 0.003), (0.2, 0.5): (0.876, 0.004), (0.6, 0.8): (0.8755, 0.004),
         (0.9, 0.9): (0.70, 0.02), (1.0, 1.0): (0.10, 0.0)}
# Planted verdicts vs the baseline, so the report's wording can be checked against them.
VERDICTS = {(0.0, 0.0): "different", (0.6, 0.8): "equivalent", (0.9, 0.9): "inconclusive",
            (1.0, 1.0): "different"}
STRATUM_BASE = {"device": "cpu", "determinism": "default", "execution": "sequential",
                "randomness": "native", "mask_rng": "torch", "vary": "all", "threads": "2"}


def _run_rows(implementation: str, rng: np.random.Generator) -> list[dict[str, Any]]:
    rows = []
    for d1, d2 in SETTINGS:
        mean, sd = TRUTH[(d1, d2)]
        for seed in SEEDS:
            test = mean + sd * rng.standard_normal()
            degenerate = d1 == 1.0
            rows.append({
                "run_id": f"{implementation}-{d1}-{d2}-{seed}", "run_name": f"p{d1}-{d2} seed{seed}",
                "dropout1": d1, "dropout2": d2, "seed": seed, **STRATUM_BASE,
                "implementation": implementation, "replicate": 0,
                "status": "degenerate" if degenerate else "ok",
                "textbook_check": bool(test > 0.7 and not degenerate),
                "weights_sha256": f"{implementation}{d1}{d2}{seed}", "epochs_done": EPOCHS,
                "test_acc": test, "train_acc": test + 0.01 - 0.05 * d1,
                "train_loss": 2.3026 if degenerate else 0.35 + 0.3 * d1,
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
                "model": {"arch": "mlp", "hidden": [256, 256], "init_std": 0.01},
                "training": {"epochs": EPOCHS, "batch_size": 256, "lr": 0.5, "optimizer": "sgd"},
                "data": {"dataset": "fashion-mnist", "train_subset": None},
                "devices": ["cpu"], "required_devices": [], "determinism": ["default"],
                "implementations": list(implementations), "vary": ["all"],
                "execution": "sequential", "randomness": "native", "replicates": 1,
                "threads": 2, "analysis": {"alpha": 0.05, "equivalence_margin": 0.005,
                                           "bootstrap": 10000, "power": 0.8}}
    env = {"torch_version": "2.14.1", "cuda_version": "none", "cudnn_version": "none",
           "device_name": "cpu", "cpu": "Test CPU @ 2 cores", "threads": "2",
           "python_version": "3.11.2", "mlflow_version": "3.17.2", "git_commit": "296de8c",
           "use_deterministic_algorithms": "False", "cudnn_deterministic": "False"}
    return RunTable("1", name, runs, _curve_rows(runs), protocol, env)


def _group(stratum: dict[str, Any], runs: pd.DataFrame, d1: float, d2: float) -> dict[str, Any]:
    sel = runs[(runs.dropout1 == d1) & (runs.dropout2 == d2)]
    acc = sel.test_acc.to_numpy()
    gap = (sel.train_acc - sel.test_acc).to_numpy()
    lo, hi = figures.t_interval(acc)
    glo, ghi = figures.t_interval(gap)
    q1, q3 = np.percentile(acc, [25, 75])
    return {"stratum": stratum, "dropout1": d1, "dropout2": d2, "n": len(acc),
            "mean": float(acc.mean()), "sd": float(acc.std(ddof=1)), "ci95": [lo, hi],
            "ci95_boot": [lo, hi], "median": float(np.median(acc)), "iqr": [float(q1), float(q3)],
            "train_loss_mean": float(sel.train_loss.mean()),
            "train_acc_mean": float(sel.train_acc.mean()), "gap_mean": float(gap.mean()),
            "gap_ci95": [glo, ghi], "status_counts": sel.status.value_counts().to_dict(),
            "textbook_check_passed": int(sel.textbook_check.sum()), "n_excluded": 0,
            "reason": None}


def _comparison(stratum: dict[str, Any], groups: dict[tuple, dict], d1: float, d2: float
                ) -> dict[str, Any]:
    g, b = groups[(d1, d2)], groups[BASELINE]
    diff = g["mean"] - b["mean"]
    verdict = VERDICTS[(d1, d2)]
    p = {"different": 0.0041, "equivalent": 0.61, "inconclusive": 0.2}[verdict]
    return {"stratum": stratum, "dropout1": d1, "dropout2": d2, "baseline": list(BASELINE),
            "n": 5, "paired": True, "mean_diff": diff, "mean_diff_ci95": [diff - 0.003, diff + 0.003],
            "test": "paired_t", "p": p / 2, "p_adjusted": p, "rank_test": "wilcoxon",
            "rank_p": 0.06, "rank_p_adjusted": 0.12, "hedges_g": 1.2, "prob_superiority": 0.8,
            "tost_p": 0.01, "tost_p_adjusted": 0.02 if verdict == "equivalent" else 0.4,
            "verdict": verdict, "variance_ratio": 1.7, "variance_ratio_ci95": [0.4, 7.1],
            "brown_forsythe_p": 0.5, "fligner_p": 0.6, "variance_p_adjusted": 0.9,
            "variance_verdict": "not_shown_different", "mde": 0.0062,
            "seeds_needed": 23 if verdict == "inconclusive" else None, "reason": None}


def make_results(table: RunTable) -> dict[str, Any]:
    strata, groups, comparisons = [], [], []
    for impl, runs in table.runs[table.runs.replicate == 0].groupby("implementation", sort=False):
        stratum = {**STRATUM_BASE, "implementation": impl}
        strata.append({"stratum": stratum, "label": f"cpu / default / {impl}", "paired": True,
                       "n_seeds": 5, "omnibus": {"test": "friedman", "statistic": 17.4, "p": 0.0016,
                                                 "reason": None, "secondary": None}})
        by_setting = {s: _group(stratum, runs, *s) for s in SETTINGS}
        groups += by_setting.values()
        comparisons += [_comparison(stratum, by_setting, *s) for s in SETTINGS if s != BASELINE]
    return {"experiment": table.experiment_name, "baseline": list(BASELINE), "alpha": 0.05,
            "equivalence_margin": 0.005, "power": 0.8, "metric": "test_acc", "strata": strata,
            "groups": groups, "comparisons": comparisons}


# --- tests -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def table() -> RunTable:
    return make_table()


@pytest.fixture(scope="module")
def results(table: RunTable) -> dict[str, Any]:
    return make_results(table)


def _n_boxes(ax: Axes) -> int:
    return len(ax.patches)


def test_final_accuracy_draws_a_box_and_every_seed_per_setting(table: RunTable) -> None:
    ax = figures.plot_final_accuracy(table.runs)
    assert isinstance(ax, Axes)
    assert [t.get_text() for t in ax.get_xticklabels()] == \
        [figures.setting_label(*s) for s in SETTINGS]
    # (1, 1) sits at chance, far below the rest: it is drawn off-scale, so 4 boxes remain
    # plus one off-scale marker; the healthy 4 x 5 seeds are all plotted as dots.
    assert _n_boxes(ax) == 4
    dots = sum(len(c.get_offsets()) for c in ax.collections)
    assert dots == 20
    assert any("mean 10.0%" in t.get_text() for t in ax.texts)


def test_final_accuracy_uses_full_range_without_outliers(table: RunTable) -> None:
    healthy = table.runs[table.runs.dropout1 < 0.9]
    ax = figures.plot_final_accuracy(healthy)
    assert _n_boxes(ax) == 3 and not ax.texts


@pytest.mark.parametrize("metric", ["test_acc", "train_loss"])
def test_learning_curves_one_line_and_band_per_setting(table: RunTable, metric: str) -> None:
    ax = figures.plot_learning_curves(table.curves, table.runs, metric)
    lines = [ln for ln in ax.get_lines() if len(ln.get_xdata()) == EPOCHS]
    assert len(lines) == len(SETTINGS)
    assert list(lines[0].get_xdata()) == list(range(1, EPOCHS + 1))
    bands = [c for c in ax.collections if c.get_paths()]
    assert len(bands) >= len(SETTINGS) - 1  # (1, 1) has zero spread: its band is degenerate


def test_t_interval_matches_hand_computation() -> None:
    lo, hi = figures.t_interval([1.0, 2.0, 3.0])
    half = 4.302652729911275 * 1.0 / math.sqrt(3)  # t(0.975, 2) * sd / sqrt(n)
    assert lo == pytest.approx(2 - half) and hi == pytest.approx(2 + half)


def test_forest_one_row_per_comparison_coloured_by_verdict(results: dict[str, Any]) -> None:
    comps = [c for c in results["comparisons"] if c["stratum"]["implementation"] == "torch"]
    ax = figures.plot_forest(comps, results["equivalence_margin"])
    assert len(ax.get_yticks()) == len(comps)
    # The margin band spans exactly ±0.5 pp.
    band = ax.patches[0]
    assert (band.get_x(), band.get_x() + band.get_width()) == pytest.approx((-0.5, 0.5))
    colours = {ln.get_color() for ln in ax.get_lines() if ln.get_label() in figures.VERDICT_COLOURS}
    assert colours == {figures.VERDICT_COLOURS[v] for v in ("different", "equivalent", "inconclusive")}
    # (1, 1) is -78 pp away: off the axis but still labelled with its number.
    worst = min(comps, key=lambda c: c["mean_diff"])
    assert any(t.get_text().startswith(f"{worst['mean_diff'] * 100:+.2f}") for t in ax.texts)


def test_sd_plot_one_errorbar_per_setting_and_bootstrap_is_seeded(table: RunTable) -> None:
    ax = figures.plot_sd(table.runs)
    assert len(ax.containers) == len(SETTINGS)
    x = np.random.default_rng(3).normal(size=12)
    assert figures.bootstrap_sd_ci(x) == figures.bootstrap_sd_ci(x)
    assert figures.bootstrap_sd_ci(x, seed=1) != figures.bootstrap_sd_ci(x, seed=2)
    lo, hi = figures.bootstrap_sd_ci(x)
    assert lo <= np.std(x, ddof=1) <= hi


def test_gap_plot_has_a_dot_per_run_and_a_bar_per_group(table: RunTable,
                                                         results: dict[str, Any]) -> None:
    groups = [g for g in results["groups"] if g["stratum"]["implementation"] == "torch"]
    ax = figures.plot_gap(table.runs, groups)
    assert sum(len(c.get_offsets()) for c in ax.collections if hasattr(c, "get_offsets")) >= 25
    assert len(ax.containers) == len(SETTINGS)


def test_plot_draws_into_given_axes(table: RunTable) -> None:
    ax = Figure().add_subplot()
    assert figures.plot_sd(table.runs, ax=ax) is ax


def test_saved_svg_and_png_are_byte_identical(tmp_path: Path, table: RunTable) -> None:
    def draw(where: Path) -> tuple[bytes, bytes]:
        with figures.style():
            fig, (ax,) = figures.facet(1)
            figures.plot_final_accuracy(table.runs, ax=ax)
        png, svg = figures.save(fig, where, "acc")
        return png.read_bytes(), svg.read_bytes()

    first, second = draw(tmp_path / "a"), draw(tmp_path / "b")
    assert first == second
    assert first[0].startswith(b"\x89PNG") and b"<svg" in first[1]
    assert b"<dc:date>" not in first[1]


def _keep_record(impl: str, p: float, observed: float) -> dict[str, Any]:
    return {"implementation": impl, "dropout1": p, "dropout2": p, "layer": 1, "p": p,
            "observed": observed}


def test_keep_rates_plot_marks_each_implementation_against_its_law() -> None:
    records = [_keep_record("torch", 0.5, 0.5), _keep_record("scratch", 0.5, 0.5),
               _keep_record("scratch-randn", 0.5, 0.309), _keep_record("scratch-randn", 0.2, 0.421)]
    ax = figures.plot_keep_rates(records)
    assert isinstance(ax, Axes)
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert list(lines) == ["nominal 1 \u2212 p", "P(N(0,1) > p)", "torch", "scratch", "scratch-randn"]
    # The randn curve is the normal tail, strictly inside (0, 1): at p = 0.5 it reads 0.3085.
    curve = lines["P(N(0,1) > p)"]
    assert np.interp(0.5, curve.get_xdata(), curve.get_ydata()) == pytest.approx(0.3085, abs=1e-4)
    assert list(lines["scratch-randn"].get_ydata()) == [0.309, 0.421]
    # torch and scratch keep the same share: dodged sideways so neither hides the other.
    assert lines["torch"].get_xdata()[0] < lines["scratch"].get_xdata()[0] < 0.5 + 0.05
    only_torch = figures.plot_keep_rates([_keep_record("torch", 0.2, 0.8)])
    assert "P(N(0,1) > p)" not in [ln.get_label() for ln in only_torch.get_lines()]


def test_source_sd_plot_one_errorbar_per_source_and_setting() -> None:
    records = [{"dropout1": d, "dropout2": 0.5, "source": s, "sd": sd, "sd_ci95": [sd / 2, sd * 2]}
               for d in (0.2, 0.5) for s, sd in (("all", 0.004), ("init", 0.003), ("dropout", 0.0))]
    ax = Figure().add_subplot()
    assert figures.plot_source_sds(records, ax=ax) is ax
    assert len(ax.containers) == 6
    assert [t.get_text() for t in ax.get_xticklabels()] == ["all", "init", "dropout"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["(0.2, 0.5)", "(0.5, 0.5)"]
    y = sorted(c.lines[0].get_ydata()[0] for c in ax.containers)
    assert y == pytest.approx([0, 0, 0.3, 0.3, 0.4, 0.4])  # percentage points


def test_diagnostic_figures_only_for_applicable_sections(tmp_path: Path) -> None:
    diag = {"keep_rates": {"applicable": True, "records": [_keep_record("torch", 0.5, 0.5)]},
            "variance_sources": {"applicable": False, "records": []}}
    first = figures.diagnostic_figures({"diagnostics": diag}, tmp_path / "a")
    second = figures.diagnostic_figures({"diagnostics": diag}, tmp_path / "b")
    assert [f.name for f in first] == ["keep_rates"]
    assert first[0].svg.read_bytes() == second[0].svg.read_bytes()
    assert first[0].png.read_bytes() == second[0].png.read_bytes()
    assert figures.diagnostic_figures({}, tmp_path / "c") == []

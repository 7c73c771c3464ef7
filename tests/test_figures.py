"""Figures: each plot draws what it should, and saving is byte-deterministic.

    .venv/bin/python -m pytest tests/test_figures.py -q
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from study.analysis import diagnostics
from study.report import figures
from study.protocol.schema import Analysis
from study.results import Results
from study.results.diagnostics import KeepRatesSection, KeepRecord, SourceRecord
from study.analysis.table import CURVE_COLUMNS, RUN_COLUMNS, RunTable
from tests.results_factory import (EPOCHS, SETTINGS, comparison_at, make_results, make_table)

# --- tests -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def table() -> RunTable:
    return make_table()


@pytest.fixture(scope="module")
def results(table: RunTable) -> Results:
    return make_results(table)


def _n_boxes(ax: Axes) -> int:
    return len(ax.patches)


def test_final_accuracy_draws_a_box_and_every_seed_per_setting(table: RunTable) -> None:
    ax = figures.plot_final_accuracy(table.runs)
    assert isinstance(ax, Axes)
    assert [t.get_text() for t in ax.get_xticklabels()] == \
        [figures.setting_label(*s) for s in SETTINGS]
    # (1, 1) sits at chance, far below the rest: it is drawn off-scale, so 4 boxes remain
    # plus one off-scale marker; the healthy 4 x 5 seeds are dots, but for the diverged one.
    assert _n_boxes(ax) == 4
    dots = sum(len(c.get_offsets()) for c in ax.collections)
    assert dots == 19
    # The off-scale runs are shown as they are (count and value), not summarised.
    assert [t.get_text() for t in ax.texts] == ["5 run(s)\nat 10.0%"]


def test_final_accuracy_zooms_on_the_settings_above_chance(tmp_path: Path, table: RunTable,
                                                          results: Results) -> None:
    """(1, 1) has no run above chance: a second panel leaves it out, and the caption says so."""
    assert [(g.dropout1, g.dropout2) for g in figures.at_chance(results.groups)] == [(1.0, 1.0)]
    order = figures.setting_order(table.runs)
    fig = figures.final_accuracy_figure(results, table, tmp_path, order,
                                        figures._palette(order))
    assert "leaving out (1, 1) (runs by status: degenerate 5)" in fig.caption
    assert "above chance (10%)" in fig.caption or "beyond chance (10%)" in fig.caption
    svg = fig.svg.read_text()
    assert svg.count('<g id="axes_') == 2 and fig.width_in == pytest.approx(2 * 3.3)
    # Drawn the same way on its own: the zoomed panel is the final-accuracy plot without (1, 1).
    zoom = figures.plot_final_accuracy(table.runs[table.runs.dropout1 < 1.0])
    assert [t.get_text() for t in zoom.get_xticklabels()] == \
        [figures.setting_label(*s) for s in SETTINGS if s != (1.0, 1.0)]
    assert zoom.get_ylim()[0] > 50  # the healthy settings' scale, not chance's
    healthy = dataclasses.replace(results, groups=[g for g in results.groups if g.dropout1 < 1])
    plain = figures.final_accuracy_figure(healthy, table, tmp_path / "plain", order,
                                          figures._palette(order))
    assert plain.svg.read_text().count('<g id="axes_') == 1 and "leaving out" not in plain.caption


def test_final_accuracy_uses_full_range_without_outliers(table: RunTable) -> None:
    healthy = table.runs[table.runs.dropout1 < 0.9]
    ax = figures.plot_final_accuracy(healthy)
    assert _n_boxes(ax) == 3 and not ax.texts


@pytest.mark.parametrize("metric", ["test_acc", "train_loss"])
def test_learning_curves_one_line_and_band_per_setting(results: Results, metric: str) -> None:
    stratum = results.strata[0].stratum
    ax = figures.plot_learning_curves([c for c in results.curves if c.stratum == stratum], metric)
    lines = [ln for ln in ax.get_lines() if len(ln.get_xdata()) == EPOCHS]
    assert len(lines) == len(SETTINGS)
    assert list(lines[0].get_xdata()) == list(range(1, EPOCHS + 1))
    bands = [c for c in ax.collections if c.get_paths()]
    assert len(bands) == len(SETTINGS)


def test_learning_curve_bands_are_the_analysis_numbers(results: Results) -> None:
    """The figure draws `Results.curves` as they are: the line at the means, the band edges
    at the interval bounds (in % for accuracy)."""
    stratum = results.strata[0].stratum
    curve = next(c for c in results.curves if c.stratum == stratum and c.metric == "test_acc"
                 and (c.dropout1, c.dropout2) == SETTINGS[0])
    ax = figures.plot_learning_curves([curve], "test_acc")
    (line,) = ax.get_lines()
    assert list(line.get_ydata()) == pytest.approx([100 * p.mean for p in curve.points])
    (band,) = ax.collections
    edge = band.get_paths()[0].vertices[:, 1]
    for p in curve.points:
        assert min(abs(edge - 100 * p.ci95[0])) < 1e-9 and min(abs(edge - 100 * p.ci95[1])) < 1e-9


def _torch(items: list[Any]) -> list[Any]:
    return [i for i in items if i.stratum["implementation"] == "torch"]


def test_forest_one_row_per_comparison_coloured_by_verdict(results: Results) -> None:
    comps = _torch(results.comparisons)
    ax = figures.plot_forest(comps, results.equivalence_margin)
    assert len(ax.get_yticks()) == len(comps)
    # The margin band spans exactly ±0.5 pp.
    band = ax.patches[0]
    assert (band.get_x(), band.get_x() + band.get_width()) == pytest.approx((-0.5, 0.5))
    colours = {ln.get_color() for ln in ax.get_lines() if ln.get_label() in figures.VERDICT_COLOURS}
    assert colours == {figures.VERDICT_COLOURS[v] for v in ("different", "equivalent", "inconclusive")}
    # (1, 1) is -78 pp away: off the axis but still labelled with its number.
    worst = min(comps, key=lambda c: c.mean_diff)
    assert any(t.get_text().startswith(f"{worst.mean_diff * 100:+.2f}") for t in ax.texts)


def _tost_bars(ax: Axes) -> list[tuple[float, float]]:
    return [tuple(ln.get_xdata()) for ln in ax.get_lines() if ln.get_label() == "TOST interval"]


def test_forest_draws_the_tost_interval_of_tost_verdicts_only(results: Results) -> None:
    equivalent = comparison_at(results, (0.6, 0.8))
    assert _tost_bars(figures.plot_forest([equivalent], 0.005)) == \
        [pytest.approx(tuple(v * 100 for v in equivalent.tost_ci))]
    assert _tost_bars(figures.plot_forest([comparison_at(results, (0.0, 0.0))], 0.005)) == []
    # A negligible gap: its own colour and marker, and the TOST bar that shows it inside ±margin.
    negligible = dataclasses.replace(comparison_at(results, (0.0, 0.0)), verdict="negligible")
    ax = figures.plot_forest([negligible], 0.005)
    assert _tost_bars(ax) == [pytest.approx(tuple(v * 100 for v in negligible.tost_ci))]
    marks = [ln for ln in ax.get_lines() if ln.get_label() == "negligible"]
    assert marks[0].get_color() == figures.VERDICT_COLOURS["negligible"]
    assert marks[0].get_marker() == figures.VERDICT_MARKERS["negligible"]
    assert any(t.get_text().endswith("negligible") for t in ax.texts)


def test_sd_plot_draws_the_analysis_intervals_not_its_own(results: Results) -> None:
    groups = _torch(results.groups)
    # A BCa interval need not contain the sample SD at small n: it is drawn all the same.
    groups[0] = dataclasses.replace(groups[0], sd_ci95=(groups[0].sd * 1.2, groups[0].sd * 1.6))
    ax = figures.plot_sd(groups)
    lines = ax.get_lines()
    assert len(lines) == 2 * len(SETTINGS)  # an interval and a point per setting
    for g, interval, point in zip(groups, lines[0::2], lines[1::2]):
        assert list(interval.get_ydata()) == pytest.approx([g.sd_ci95[0] * 100, g.sd_ci95[1] * 100])
        assert point.get_ydata()[0] == pytest.approx(g.sd * 100)
    # No figure computes a statistic that Results holds: no bootstrap, no random numbers.
    source = inspect.getsource(figures)
    assert not hasattr(figures, "bootstrap_sd_ci") and "default_rng" not in source


def test_gap_plot_has_a_dot_per_run_and_a_bar_per_group(table: RunTable,
                                                         results: Results) -> None:
    groups = _torch(results.groups)
    ax = figures.plot_gap(table.runs, groups)
    assert sum(len(c.get_offsets()) for c in ax.collections if hasattr(c, "get_offsets")) >= 24
    assert len(ax.containers) == len(SETTINGS)
    base = next(g for g in groups if (g.dropout1, g.dropout2) == (0.2, 0.5))
    bar = ax.containers[1]
    assert bar.lines[0].get_ydata()[0] == pytest.approx(base.gap_mean * 100)


def test_plot_draws_into_given_axes(results: Results) -> None:
    ax = Figure().add_subplot()
    assert figures.plot_sd(_torch(results.groups), ax=ax) is ax


def test_baseline_alone_draws_no_forest(tmp_path: Path, table: RunTable,
                                        results: Results) -> None:
    ax = figures.plot_forest([], 0.005)
    assert [t.get_text() for t in ax.texts] == ["no comparison with the baseline"]
    alone = dataclasses.replace(results, comparisons=[])
    names = [f.name for f in figures.make_figures(alone, table, tmp_path)]
    assert "forest" not in names and "sd" in names


def test_legend_rows_are_even_and_fit() -> None:
    assert figures.legend_columns(6, 5.0) == 3  # the forest's 4 verdicts + TOST bar + margin
    assert figures.legend_columns(5, 6.6) == 5 and figures.legend_columns(5, 3.3) == 3
    assert figures.legend_columns(2, 5.0) == 2


def test_captions_name_the_endpoint_analysed(results: Results) -> None:
    assert "final-epoch test accuracy" in figures.caption("forest", results)
    last3 = dataclasses.replace(results, endpoint="last:3")
    assert "averaged over the last 3 evaluated epochs" in figures.caption("sd", last3)


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


def _keep_record(impl: str, p: float, observed: float) -> KeepRecord:
    return KeepRecord(implementation=impl, dropout1=p, dropout2=p, layer=1, p=p, n=4,
                      observed=observed, observed_sd=0.0, nominal=1 - p, expected=None,
                      deviation=observed - (1 - p), matches_nominal=None, matches_expected=None,
                      rescale=1 / (1 - p), activation_scale=observed / (1 - p), reason=None)


def _source_record(d1: float, source: str, sd: float) -> SourceRecord:
    return SourceRecord(stratum={}, dropout1=d1, dropout2=0.5, source=source, n=10, mean=0.85,
                        sd=sd, sd_ci95=(sd / 2, sd * 2), ratio=None, ratio_ci95=None,
                        paired=None, brown_forsythe_p=None, brown_forsythe_p_adjusted=None,
                        summers="reference", reason=None)


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
    records = [_source_record(d, s, sd)
               for d in (0.2, 0.5) for s, sd in (("all", 0.004), ("init", 0.003), ("dropout", 0.0))]
    ax = Figure().add_subplot()
    assert figures.plot_source_sds(records, ax=ax) is ax
    points = [ln for ln in ax.get_lines() if ln.get_marker() == "o"]
    assert len(points) == 6 and len(ax.get_lines()) == 12  # a point and an interval each
    assert [t.get_text() for t in ax.get_xticklabels()] == ["all", "init", "dropout"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["(0.2, 0.5)", "(0.5, 0.5)"]
    y = sorted(ln.get_ydata()[0] for ln in points)
    assert y == pytest.approx([0, 0, 0.3, 0.3, 0.4, 0.4])  # percentage points


def test_diagnostic_figures_only_for_applicable_sections(tmp_path: Path) -> None:
    curves = pd.DataFrame({c: pd.Series(dtype=t) for c, t in CURVE_COLUMNS.items()})
    empty = diagnostics.analyze(RunTable("1", "x", pd.DataFrame(columns=list(RUN_COLUMNS)),
                                         curves), Analysis())
    assert not empty.variance_sources.applicable
    diag = dataclasses.replace(empty, keep_rates=KeepRatesSection(
        applicable=True, reason=None, records=[_keep_record("torch", 0.5, 0.5)]))
    first = figures.diagnostic_figures(diag, tmp_path / "a")
    second = figures.diagnostic_figures(diag, tmp_path / "b")
    assert [f.name for f in first] == ["keep_rates"]
    assert first[0].svg.read_bytes() == second[0].svg.read_bytes()
    assert first[0].png.read_bytes() == second[0].png.read_bytes()
    assert figures.diagnostic_figures(empty, tmp_path / "c") == []
    assert figures.diagnostic_figures(None, tmp_path / "d") == []

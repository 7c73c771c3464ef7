"""Seaborn figures of a dropout study: one module decides what is drawn, how it looks and where it goes.

    python -m study report protocols/d2l-dropout.yaml   # writes reports/<name>/figures/*.png|svg

Every `plot_*` function draws ONE stratum on one Axes (`ax=None` makes a fresh figure) and returns
the Axes. `make_figures` facets those over the strata of a `Results` (never pooling strata) and
saves each figure twice: PNG for MLflow/Markdown, SVG for the PDF. Saving is byte-deterministic:
same data, same files. No figure computes a statistic: intervals, SDs, verdicts and the
learning-curve bands are read from `Results`, so the figures show the numbers of results.json.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib as mpl
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from scipy import stats

from study.results import (Comparison, Curve, Endpoint, Group, Interaction, McSetting, Results,
                           SizeEffect, Stratum)
from study.results.anytime import Anytime
from study.results.diagnostics import Diagnostics, KeepRecord, SourceRecord

# Fixed salt: matplotlib otherwise seeds SVG element ids from a random value per process.
_SVG_SALT = "d2l-dropout-study"
# DejaVu Sans ships inside matplotlib, so figures never depend on the machine's fonts;
# svg.fonttype "path" turns glyphs into outlines, so the PDF needs no font for them either.
_RC: dict[str, Any] = {
    **sns.axes_style("whitegrid"),
    **sns.plotting_context("paper"),
    "font.family": "DejaVu Sans",
    "svg.fonttype": "path",
    "svg.hashsalt": _SVG_SALT,
    "figure.dpi": 100,
    "savefig.dpi": 150,
    "axes.titlesize": 9,
    "axes.labelsize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 7,
}
# Inches. Figures are placed in the PDF at their true size, so 7-pt labels stay 7 pt: one panel
# takes most of an A4 text width (6.6 in), two panels share it.
SINGLE_PANEL = (5.0, 3.0)
PANEL_SIZE = (3.3, 2.5)
MAX_COLUMNS = 2
PNG_METADATA = {"Software": None}
SVG_METADATA = {"Date": None, "Creator": None}

VERDICT_COLOURS = {"different": "#D55E00", "negligible": "#CC79A7", "equivalent": "#0072B2",
                   "inconclusive": "#7f7f7f"}
# Markers as well as colours, so the forest plot survives greyscale printing.
VERDICT_MARKERS = {"different": "D", "negligible": "^", "equivalent": "o", "inconclusive": "s"}
# Verdicts that rest on the TOST: the forest draws their TOST-dual interval as a wide bar.
TOST_VERDICTS = ("negligible", "equivalent")
METRIC_LABELS = {"test_acc": "test accuracy (%)", "train_acc": "train accuracy (%)",
                 "train_loss": "train loss"}
PERCENT_METRICS = {"test_acc", "train_acc"}


@dataclass(frozen=True)
class FigureFile:
    name: str
    png: Path
    svg: Path
    caption: str
    width_in: float = SINGLE_PANEL[0]


# --- data shaping ----------------------------------------------------------------------------


def setting_label(d1: float, d2: float) -> str:
    return f"({d1:g}, {d2:g})"


def with_setting(runs: pd.DataFrame) -> pd.DataFrame:
    """Add a `setting` label column, e.g. '(0.2, 0.5)'."""
    out = runs.copy()
    out["setting"] = [setting_label(a, b) for a, b in zip(out["dropout1"], out["dropout2"])]
    return out


def setting_order(runs: pd.DataFrame, protocol: dict[str, Any] | None = None) -> list[str]:
    """Protocol order when known (the order a reader set up), else ascending dropout."""
    present = {setting_label(a, b) for a, b in zip(runs["dropout1"], runs["dropout2"])}
    if protocol and protocol.get("dropout"):
        listed = [setting_label(*pair) for pair in protocol["dropout"]]
        return [s for s in listed if s in present] + sorted(present - set(listed))
    pairs = sorted({(a, b) for a, b in zip(runs["dropout1"], runs["dropout2"])})
    return [setting_label(a, b) for a, b in pairs]


def select_stratum(frame: pd.DataFrame, stratum: dict[str, Any]) -> pd.DataFrame:
    mask = np.ones(len(frame), dtype=bool)
    for column, value in stratum.items():
        mask &= (frame[column] == value).to_numpy()
    return frame[mask]


def _palette(order: list[str]) -> dict[str, Any]:
    return dict(zip(order, sns.color_palette("colorblind", len(order))))


def _new_axes(ax: Axes | None) -> Axes:
    if ax is not None:
        return ax
    # A bare Figure, not pyplot: no global figure registry, no backend chosen at import.
    return Figure(figsize=SINGLE_PANEL, layout="constrained").add_subplot()


# --- one stratum, one Axes -------------------------------------------------------------------


def plot_final_accuracy(runs: pd.DataFrame, *, order: list[str] | None = None,
                        palette: dict[str, Any] | None = None, ax: Axes | None = None) -> Axes:
    """Box per setting with every seed as a dot. Runs far below the healthy ones (e.g. p=1 at
    chance) would squash the interesting 1-pp differences, so the y-range follows `status == ok`
    runs and off-scale runs are drawn as triangles on the bottom edge, labelled with their mean."""
    ax = _new_axes(ax)
    frame = with_setting(runs[np.isfinite(runs["test_acc"].astype(float))])
    frame["acc"] = frame["test_acc"].astype(float) * 100
    order = order or setting_order(frame)
    palette = palette or _palette(order)
    low = _focus_floor(frame)
    shown = frame[frame["acc"] >= low] if low is not None else frame
    sns.boxplot(data=shown, x="setting", y="acc", order=order, hue="setting", palette=palette,
                ax=ax, fliersize=0, width=0.55, linewidth=0.8, boxprops={"alpha": 0.35})
    # A swarm, not a strip: seaborn's strip jitter draws from numpy's global RNG, which would make
    # the saved files differ run to run.
    sns.swarmplot(data=shown, x="setting", y="acc", order=order, hue="setting", palette=palette,
                  ax=ax, size=3.5, edgecolor="black", linewidth=0.4, warn_thresh=1.0)
    if low is not None:
        _mark_off_scale(ax, frame, order, low)
    ax.set_xlabel("(dropout1, dropout2)")
    ax.set_ylabel("final test accuracy (%)")
    _drop_legend(ax)
    return ax


def _focus_floor(frame: pd.DataFrame) -> float | None:
    """Lower y-limit that keeps all healthy runs in view, or None when nothing is far below."""
    ok = frame.loc[frame["status"] == "ok", "acc"]
    if ok.empty:
        return None
    spread = max(float(ok.max() - ok.min()), 1.0)
    floor = float(ok.min()) - 0.5 * spread
    return floor if (frame["acc"] < floor).any() else None


def _mark_off_scale(ax: Axes, frame: pd.DataFrame, order: list[str], floor: float) -> None:
    ax.set_ylim(bottom=floor)
    for x, setting in enumerate(order):
        low = frame[(frame["setting"] == setting) & (frame["acc"] < floor)]
        if low.empty:
            continue
        ax.plot([x], [floor], marker="v", color="black", markersize=6, clip_on=False, zorder=5)
        # The range of the runs themselves, not a mean: no figure computes a statistic.
        lo, hi = low["acc"].min(), low["acc"].max()
        at = f"at {lo:.1f}%" if round(lo, 1) == round(hi, 1) else f"{lo:.1f}\u2013{hi:.1f}%"
        ax.annotate(f"{len(low)} run(s)\n{at}", (x, floor),
                    xytext=(0, 6), textcoords="offset points", ha="center", va="bottom",
                    fontsize=6)


def plot_learning_curves(curves: Sequence[Curve], metric: str, *,
                         order: list[str] | None = None, palette: dict[str, Any] | None = None,
                         ax: Axes | None = None) -> Axes:
    """One stratum's `Results.curves` of `metric`: the mean per epoch across seeds with its 95%
    t-interval band (as the analysis computed them), one line per setting."""
    ax = _new_axes(ax)
    by_setting = {setting_label(c.dropout1, c.dropout2): c for c in curves if c.metric == metric}
    order = order or list(by_setting)
    palette = palette or _palette(order)
    scale = 100.0 if metric in PERCENT_METRICS else 1.0
    for setting in (s for s in order if s in by_setting):
        points = by_setting[setting].points
        epochs = [p.epoch for p in points]
        # One seed has no interval: a zero-width band at its value.
        band = [p.ci95 or (p.mean, p.mean) for p in points]
        ax.fill_between(epochs, [lo * scale for lo, _ in band], [hi * scale for _, hi in band],
                        color=palette[setting], alpha=0.18, linewidth=0)
        ax.plot(epochs, [p.mean * scale for p in points], color=palette[setting], marker="o",
                markersize=3, linewidth=1.2, label=setting)
    ax.set_xlabel("epoch")
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    if metric == "train_loss":
        ax.set_yscale("log")  # p=1 sits at ln 10 while healthy runs reach ~0.3: one scale for both
        ax.yaxis.set_major_locator(mpl.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(mpl.ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(mpl.ticker.NullFormatter())
    ax.xaxis.set_major_locator(mpl.ticker.MaxNLocator(integer=True))
    _drop_legend(ax)
    return ax


def plot_forest(comparisons: Sequence[Comparison], margin: float, *,
                ax: Axes | None = None, focus_pp: float = 5.0) -> Axes:
    """Mean difference to the baseline (pp) with its 95% CI, coloured and shaped by verdict, over
    the ±margin equivalence band; a verdict that rests on the TOST also gets its TOST-dual
    interval as a wide pale bar (inside the band exactly when the TOST passes). Rows whose CI
    reaches beyond `focus_pp` are drawn as arrows at the edge so the band stays readable; the
    numbers column on the right always shows the truth."""
    ax = _new_axes(ax)
    rows = [ForestRow.of(c) for c in comparisons]
    if not rows:  # a stratum with the baseline alone: say so rather than draw an empty axis
        ax.text(0.5, 0.5, "no comparison with the baseline", ha="center", va="center",
                transform=ax.transAxes, fontsize=7)
        ax.set_axis_off()
        return ax
    limit = _forest_limit(rows, margin * 100, focus_pp)
    ax.axvspan(-margin * 100, margin * 100, color="#0072B2", alpha=0.12, linewidth=0,
               label=f"±{margin * 100:g} pp equivalence margin")
    ax.axvline(0, color="black", linewidth=0.7)
    for y, row in enumerate(rows):
        _draw_forest_row(ax, y, row, limit)
    ax.set_yticks(range(len(rows)), [r.setting for r in rows])
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlim(-limit, limit)
    ax.set_xlabel("difference in mean test accuracy vs baseline (pp)")
    ax.set_ylabel("(dropout1, dropout2)")
    ax.grid(axis="y", visible=False)
    return ax


def _pp(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else v * 100


@dataclass(frozen=True)
class ForestRow:
    """One comparison in percentage points, as the forest draws it."""

    setting: str
    diff: float | None
    ci: tuple[float, float] | None
    tost_ci: tuple[float, float] | None  # drawn for TOST verdicts only
    verdict: str

    @classmethod
    def of(cls, c: Comparison) -> ForestRow:
        tost = c.tost_ci or c.tost_ci90
        return cls(setting_label(c.dropout1, c.dropout2), _pp(c.mean_diff),
                   _pp_pair(c.cs95 if c.adaptive else c.mean_diff_ci95),
                   _pp_pair(tost) if c.verdict in TOST_VERDICTS else None, c.verdict)

    def reach(self) -> float | None:
        values = [abs(v) for v in (self.diff, *(self.ci or ())) if v is not None]
        return max(values) if values else None


def _pp_pair(ci: Sequence[float | None] | None) -> tuple[float, float] | None:
    if not ci or any(_pp(v) is None for v in ci):
        return None
    return _pp(ci[0]), _pp(ci[1])


def _forest_limit(rows: list[ForestRow], margin_pp: float, focus_pp: float) -> float:
    near = [r for r in (row.reach() for row in rows) if r is not None and r <= focus_pp]
    return 1.15 * max([2 * margin_pp, *near])


def _draw_forest_row(ax: Axes, y: int, row: ForestRow, limit: float) -> None:
    colour = VERDICT_COLOURS.get(row.verdict, "#7f7f7f")
    marker = VERDICT_MARKERS.get(row.verdict, "s")
    text_at = ax.get_yaxis_transform()  # x in axes units, y in data: a column right of the plot
    if row.diff is None:
        ax.text(1.02, y, "not computable", transform=text_at, va="center", fontsize=6)
        return
    clip = lambda v: min(max(v, -limit), limit)  # noqa: E731
    inside = abs(row.diff) <= limit
    if row.tost_ci is not None:
        ax.plot([clip(v) for v in row.tost_ci], [y, y], color=colour, linewidth=6, alpha=0.3,
                solid_capstyle="butt", label="TOST interval")
    if row.ci is not None:
        ax.plot([clip(v) for v in row.ci], [y, y], color=colour, linewidth=1.6)
        for end in row.ci:
            if inside and abs(end) > limit:
                ax.plot([clip(end)], [y], marker=">" if end > 0 else "<", color=colour,
                        markersize=5)
    if not inside:  # the estimate itself is off the axis: an arrow at the edge points to it
        marker = ">" if row.diff > 0 else "<"
    ax.plot([clip(row.diff)], [y], marker=marker, color=colour, markersize=5,
            markeredgecolor="black", markeredgewidth=0.4, label=row.verdict, clip_on=False)
    ci = "" if row.ci is None else f" [{row.ci[0]:+.2f}, {row.ci[1]:+.2f}]"
    ax.text(1.02, y, f"{row.diff:+.2f}{ci} {row.verdict}", transform=text_at,
            va="center", fontsize=6, color=colour)


STOP_WORDS = {"settled": "settled", "max_seeds": "cap", "max_runs": "budget", None: "open"}
# The y-range of the CS figure: a CS still unbounded, or very wide at the first look, would
# squash the narrowing that matters near the margin; beyond it, bounds end in arrows.
CS_FOCUS_MARGINS = 6


@dataclass(frozen=True)
class CsTrack:
    """A C4 or C7 record in the CS figure: its legend label, the palette key of its setting
    (its colour) and its line style, which tells the kind of comparison apart."""

    label: str
    setting: str
    style: str
    record: Anytime


# Line styles of the CS figure: a comparison with the baseline or a contrast solid, C4's
# implementation - torch dashed, C7's MC - eval accuracy dotted.
CS_STYLES = {"C4": ("--", "C4: implementation \u2212 torch"),
             "C7": (":", "C7: MC \u2212 eval accuracy")}


def cs_tracks(results: Results, stratum: Stratum) -> list[CsTrack]:
    """The C4 and C7 records of `stratum` still open after their first look. A C4 record
    belongs to its implementation's stratum (its own stratum lacks that key)."""
    tracks = []
    diag = results.diagnostics
    for r in (diag.implementations.records if diag is not None else ()):
        key = {**r.stratum, "implementation": r.implementation}
        if was_open(r) and all(str(stratum.stratum.get(k)) == str(v) for k, v in key.items()):
            here = setting_label(r.dropout1, r.dropout2)
            tracks.append(CsTrack(f"{r.implementation} \u2212 torch {here}", here,
                                  CS_STYLES["C4"][0], r))
    for m in (results.inference.settings if results.inference is not None else ()):
        if was_open(m.accuracy) and m.stratum == stratum.stratum:
            here = setting_label(m.dropout1, m.dropout2)
            tracks.append(CsTrack(f"MC \u2212 eval {here}", here, CS_STYLES["C7"][0],
                                  m.accuracy))
    return tracks


def plot_cs_looks(comparisons: Sequence[Comparison], margin: float, *,
                  contrasts: Sequence[Comparison] = (), tracks: Sequence[CsTrack] = (),
                  palette: dict[str, Any] | None = None, ax: Axes | None = None) -> Axes:
    """Each adaptive comparison still open after its first look: its 95% confidence sequence
    (pp) at every look, against the seeds
    per setting: its bounds narrowing as seeds are added, over the ±margin band, the stop
    marked with its reason. The CS is read from `cs_looks` (the analysis's own); C4 and C7
    records come as `tracks` (`cs_tracks`)."""
    ax = _new_axes(ax)
    colour = (palette or {}).get
    drawn = [(cs_label(c), colour(cs_label(c), "#333333"), "-", c) for c in comparisons
             if was_open(c)] + \
        [(cs_label(c, contrast=True), "#333333", "-", c) for c in contrasts if was_open(c)] + \
        [(t.label, colour(t.setting, "#333333"), t.style, t.record) for t in tracks
         if was_open(t.record)]
    if not drawn:
        ax.text(0.5, 0.5, "every comparison stopped at its first look", ha="center", va="center",
                transform=ax.transAxes, fontsize=7)
        ax.set_axis_off()
        return ax
    limit = CS_FOCUS_MARGINS * margin * 100
    ax.axhspan(-margin * 100, margin * 100, color="#0072B2", alpha=0.12, linewidth=0)
    ax.axhline(0, color="black", linewidth=0.7)
    for label, colour, style, c in drawn:
        seeds = [look.seeds for look in c.cs_looks]
        lo = [-limit if look.lo is None else max(look.lo * 100, -limit) for look in c.cs_looks]
        hi = [limit if look.hi is None else min(look.hi * 100, limit) for look in c.cs_looks]
        ax.fill_between(seeds, lo, hi, color=colour, alpha=0.15, linewidth=0, step=None)
        ax.plot(seeds, lo, color=colour, linewidth=1.2, marker="_", label=label, linestyle=style)
        ax.plot(seeds, hi, color=colour, linewidth=1.2, marker="_", linestyle=style)
        ax.plot([seeds[-1], seeds[-1]], [lo[-1], hi[-1]], color=colour, linewidth=2.2)
        ax.annotate(STOP_WORDS.get(c.stop_reason, c.stop_reason or "open"),
                    (seeds[-1], hi[-1]), xytext=(2, 2), textcoords="offset points",
                    fontsize=6, color=colour)
    ax.set_ylim(-1.08 * limit, 1.08 * limit)
    ax.set_xlabel("seeds per setting")
    ax.set_ylabel("95% CS of the gap (pp)")
    ax.xaxis.set_major_locator(mpl.ticker.MaxNLocator(integer=True))
    return ax


def was_open(c: Anytime) -> bool:
    """Whether an adaptive comparison was still open after its first look (so asked for seeds):
    the ones whose narrowing there is to show."""
    return len(c.cs_looks or ()) > 1


def cs_label(c: Comparison, contrast: bool = False) -> str:
    """A comparison with the baseline is named by its setting (the palette's key); a contrast
    by both of its settings."""
    here = setting_label(c.dropout1, c.dropout2)
    return f"{here} \u2212 {setting_label(*c.baseline)}" if contrast else here


def interval_bar(ax: Axes, x: float, y: float, lo: float, hi: float, *, color: Any,
                 markersize: float, label: str | None = None) -> None:
    """A point and its interval drawn separately: a BCa interval of an SD need not contain the
    sample SD at small n (an errorbar would need negative lengths there)."""
    ax.plot([x, x], [lo, hi], color=color, linewidth=1.2, marker="_", markersize=8)
    ax.plot([x], [y], "o", color=color, markersize=markersize, markeredgecolor="black",
            markeredgewidth=0.4, label=label)


def plot_sd(groups: Sequence[Group], *, order: list[str] | None = None,
            palette: dict[str, Any] | None = None, ax: Axes | None = None) -> Axes:
    """Seed-to-seed SD per setting with the 95% bootstrap CI the analysis computed
    (`Group.sd`, `Group.sd_ci95`): the same numbers as results.json."""
    ax = _new_axes(ax)
    by_setting = {setting_label(g.dropout1, g.dropout2): g for g in groups}
    order = order or list(by_setting)
    palette = palette or _palette(order)
    for x, setting in enumerate(order):
        g = by_setting.get(setting)
        sd = _pp(g.sd) if g is not None else None
        if sd is None:
            continue
        lo, hi = _pp_pair(g.sd_ci95) or (sd, sd)
        interval_bar(ax, x, sd, lo, hi, color=palette[setting], markersize=5)
    ax.set_xticks(range(len(order)), order)
    ax.set_xlim(-0.5, len(order) - 0.5)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("(dropout1, dropout2)")
    ax.set_ylabel("SD of test accuracy (pp)")
    return ax


def plot_gap(runs: pd.DataFrame, groups: Sequence[Group], *,
             order: list[str] | None = None, palette: dict[str, Any] | None = None,
             ax: Axes | None = None) -> Axes:
    """Train minus test accuracy per seed (dots) with the results' mean and 95% CI (bar)."""
    ax = _new_axes(ax)
    frame = with_setting(runs)
    frame["gap"] = (frame["train_acc"].astype(float) - frame["test_acc"].astype(float)) * 100
    frame = frame[np.isfinite(frame["gap"])]
    order = order or setting_order(frame)
    palette = palette or _palette(order)
    sns.swarmplot(data=frame, x="setting", y="gap", order=order, hue="setting", palette=palette,
                  ax=ax, size=3, alpha=0.8, warn_thresh=1.0)
    _mean_bars(ax, order, [(setting_label(g.dropout1, g.dropout2), g.gap_mean, g.gap_ci95)
                           for g in groups])
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xlabel("(dropout1, dropout2)")
    ax.set_ylabel("train − test accuracy (pp)")
    _drop_legend(ax)
    return ax


def _mean_bars(ax: Axes, order: list[str],
               bars: Sequence[tuple[str, float | None, Sequence[float] | None]]) -> None:
    """(setting, mean, 95% CI) from the results as black bars beside that setting's seed dots."""
    for setting, mean, ci in bars:
        mean, ci = _pp(mean), _pp_pair(ci)
        if setting not in order or mean is None or ci is None:
            continue
        ax.errorbar([order.index(setting) + 0.28], [mean], yerr=[[mean - ci[0]], [ci[1] - mean]],
                    fmt="_", color="black", capsize=3, markersize=8)


def plot_flip_rate(runs: pd.DataFrame, settings: Sequence[McSetting], *,
                   order: list[str] | None = None, palette: dict[str, Any] | None = None,
                   ax: Axes | None = None) -> Axes:
    """Share of test images whose class differs between two stochastic passes (dropout left on
    at inference), per seed (dots), with the results' mean and 95% CI over seeds (bar)."""
    ax = _new_axes(ax)
    frame = with_setting(runs)
    frame["flip"] = frame.get("mc_flip_rate", pd.Series(np.nan, frame.index)).astype(float) * 100
    frame = frame[np.isfinite(frame["flip"])]
    order = [s for s in (order or setting_order(frame)) if s in set(frame["setting"])]
    palette = palette or _palette(order)
    sns.swarmplot(data=frame, x="setting", y="flip", order=order, hue="setting", palette=palette,
                  ax=ax, size=3.5, edgecolor="black", linewidth=0.4, warn_thresh=1.0)
    _mean_bars(ax, order, [(setting_label(s.dropout1, s.dropout2), s.flip_rate.mean,
                            s.flip_rate.ci95) for s in settings])
    ax.set_ylim(bottom=0)
    ax.set_xlabel("(dropout1, dropout2)")
    ax.set_ylabel("flip rate between two passes (%)")
    _drop_legend(ax)
    return ax


def _size_label(n: int) -> str:
    return f"{n // 1000}k images" if n % 1000 == 0 else f"{n:,} images"


def _size_palette(effects: Sequence[SizeEffect]) -> dict[int, Any]:
    sizes = [e.train_images for e in effects]
    return dict(zip(sizes, sns.color_palette("viridis_r", len(sizes))))


def plot_dose_response(effects: Sequence[SizeEffect], *, ax: Axes | None = None) -> Axes:
    """Mean test accuracy (primary endpoint, 95% CI from the analysis) against the dropout rate,
    one line per training-set size; filled markers: shown different from the baseline."""
    ax = _new_axes(ax)
    palette = _size_palette(effects)
    for e in effects:
        points = [p for p in e.dose if p.mean is not None]
        x = [(p.dropout1 + p.dropout2) / 2 for p in points]
        y = [p.mean * 100 for p in points]
        ax.plot(x, y, color=palette[e.train_images], marker="o", markersize=0, linewidth=1.2,
                label=_size_label(e.train_images))
        for xi, yi, p in zip(x, y, points):
            lo, hi = (v * 100 for v in p.ci95) if p.ci95 else (yi, yi)
            shown = p.verdict == "different"
            ax.errorbar([xi], [yi], yerr=[[yi - lo], [hi - yi]], fmt="o", markersize=4,
                        color=palette[e.train_images], capsize=2,
                        markerfacecolor=palette[e.train_images] if shown else "white")
    ax.set_xlabel("dropout rate (mean of p1, p2)")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(frameon=False)
    return ax


def plot_gain_vs_gap(interaction: Interaction, *, ax: Axes | None = None) -> Axes:
    """Per size: the best setting's gain over the baseline (95% CI) against the baseline's
    train - test gap (95% CI), with the seed-level trend line from the analysis."""
    ax = _new_axes(ax)
    palette = _size_palette(interaction.sizes)
    for e in interaction.sizes:
        gap, gain = _pp(e.regime.gap), _pp(e.gain)
        if gap is None or gain is None:
            continue
        xci, yci = _pp_pair(e.regime.gap_ci95), _pp_pair(e.gain_ci95)
        ax.errorbar([gap], [gain], xerr=None if xci is None else [[gap - xci[0]], [xci[1] - gap]],
                    yerr=None if yci is None else [[gain - yci[0]], [yci[1] - gain]], fmt="o",
                    color=palette[e.train_images], capsize=2, markersize=5,
                    label=f"{_size_label(e.train_images)}: {setting_label(*e.best)}")
    trend = interaction.trend
    gaps = [_pp(e.regime.gap) for e in interaction.sizes if e.regime.gap is not None]
    if trend.estimate is not None and trend.intercept is not None and gaps:
        x = np.array([min(gaps), max(gaps)])
        ax.plot(x, trend.intercept * 100 + trend.estimate * x, color="black", linewidth=0.8,
                linestyle="--", label=f"trend: slope {trend.estimate:+.3f}")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xlabel("(0, 0) train − test accuracy (pp)" if interaction.baseline == [0.0, 0.0]
                  else "baseline train − test accuracy (pp)")
    ax.set_ylabel("best setting − baseline (pp)")
    ax.legend(frameon=False)
    return ax


IMPLEMENTATION_MARKERS = {"torch": "o", "scratch": "s", "scratch-randn": "D"}
# Dodge per implementation along p: torch and scratch keep the same share and would hide each other.
KEEP_DODGE = 0.015


def plot_keep_rates(records: Sequence[KeepRecord], *, ax: Axes | None = None) -> Axes:
    """Measured keep rate (diagnostics `keep_rates` records) against the drop probability p,
    one marker per implementation, over the nominal 1 - p and, where scratch-randn ran, the
    P(N(0,1) > p) its `randn > p` mask draws."""
    ax = _new_axes(ax)
    impls = sorted({r.implementation for r in records}, key=lambda i: (i != "torch", i))
    grid = np.linspace(0.0, 1.0, 101)
    ax.plot(grid, 1 - grid, color="black", linewidth=0.8, label="nominal 1 − p")
    if "scratch-randn" in impls:
        inner = grid[1:-1]  # p = 0 and p = 1 draw no mask, so the curve holds strictly inside
        ax.plot(inner, stats.norm.sf(inner), color="black", linewidth=0.8, linestyle="--",
                label="P(N(0,1) > p)")
    colours = dict(zip(impls, sns.color_palette("colorblind", len(impls))))
    for k, impl in enumerate(impls):
        pts = [(r.p, r.observed) for r in records
               if r.implementation == impl and r.observed is not None]
        shift = (k - (len(impls) - 1) / 2) * KEEP_DODGE
        ax.plot([x + shift for x, _ in pts], [y for _, y in pts], linestyle="none",
                marker=IMPLEMENTATION_MARKERS.get(impl, "^"), color=colours[impl], markersize=5,
                markeredgecolor="black", markeredgewidth=0.4, label=impl)
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("drop probability p")
    ax.set_ylabel("share of units kept in training")
    ax.legend(loc="upper right", frameon=False)
    return ax


def plot_source_sds(records: Sequence[SourceRecord], *, ax: Axes | None = None) -> Axes:
    """Seed-to-seed SD (pp) per varied random source (diagnostics `variance_sources` records)
    with its bootstrap 95% CI, one colour per setting, dodged along the source axis."""
    ax = _new_axes(ax)
    sources = list(dict.fromkeys(r.source for r in records))
    settings = list(dict.fromkeys(_source_group(r) for r in records))
    palette = dict(zip(settings, sns.color_palette("colorblind", len(settings))))
    width = 0.6 / max(len(settings), 1)
    for k, group in enumerate(settings):
        shift = (k - (len(settings) - 1) / 2) * width
        for r in (r for r in records if _source_group(r) == group and r.sd is not None):
            sd, ci = r.sd * 100, r.sd_ci95 or (r.sd, r.sd)
            interval_bar(ax, sources.index(r.source) + shift, sd, ci[0] * 100, ci[1] * 100,
                         color=palette[group], markersize=4, label=group)
    ax.set_xticks(range(len(sources)), sources)
    ax.set_xlim(-0.5, len(sources) - 0.5)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("random source varied across seeds")
    ax.set_ylabel("SD of final test accuracy (pp)")
    if len(settings) > 1:  # one setting needs no key; the caption names it
        handles = {h.get_label(): h for h in ax.get_lines() if h.get_marker() == "o"}
        ax.legend(handles=list(handles.values()), labels=list(handles), loc="best", frameon=False)
    return ax


def _source_group(record: SourceRecord) -> str:
    return setting_label(record.dropout1, record.dropout2)


def _drop_legend(ax: Axes) -> None:
    if ax.get_legend() is not None:
        ax.get_legend().remove()


# --- faceting and saving: the one place that decides names, sizes and style ------------------


@contextmanager
def style() -> Iterator[None]:
    with mpl.rc_context(_RC):
        yield


def facet(n_panels: int, columns: int = MAX_COLUMNS) -> tuple[Figure, list[Axes]]:
    cols = max(1, min(columns, n_panels))
    panel = SINGLE_PANEL if cols == 1 else PANEL_SIZE
    if cols == 1 and n_panels > 1:  # stacked full-width panels: shorter, so a page holds several
        panel = (SINGLE_PANEL[0], 0.75 * SINGLE_PANEL[1])
    rows = math.ceil(n_panels / cols)
    fig = Figure(figsize=(panel[0] * cols, panel[1] * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for extra in axes[n_panels:]:
        extra.set_visible(False)
    return fig, axes[:n_panels]


def save(fig: Figure, out_dir: Path, name: str) -> tuple[Path, Path]:
    """Write `name.png` and `name.svg`; byte-identical for identical figures."""
    out_dir.mkdir(parents=True, exist_ok=True)
    png, svg = out_dir / f"{name}.png", out_dir / f"{name}.svg"
    with style():
        fig.savefig(png, format="png", metadata=PNG_METADATA)
        fig.savefig(svg, format="svg", metadata=SVG_METADATA)
    return png, svg


CAPTIONS = {
    "final_accuracy": "Final test accuracy per dropout setting; each dot is one seed (first "
                      "replicate of each cell, as in every figure), boxes show "
                      "median and IQR. Runs far below the healthy ones are drawn as triangles on "
                      "the bottom edge with their count and accuracy.",
    "curves_test_acc": "Test accuracy after each epoch (eval mode): mean across seeds with a 95% "
                       "Student-t band, one line per setting.",
    "curves_train_loss": "Training loss per epoch (train mode, dropout on, averaged over "
                         "minibatches): mean across seeds with a 95% Student-t band; log scale.",
    "forest": "Difference in mean {endpoint} to the baseline (primary analysis), with its 95% "
              "CI, coloured and shaped by verdict (different / negligible / equivalent / "
              "inconclusive); a negligible or equivalent verdict also shows its TOST interval "
              "as a wide pale bar, inside the shaded equivalence band exactly when the TOST "
              "passes. Intervals beyond the axis end in arrows; the numbers on the right are "
              "exact.",
    "sd": "Seed-to-seed SD of {endpoint} per setting. Error bars: the 95% bootstrap CI of the "
          "SD from the analysis (sd_ci95 in results.json); the method section states how well "
          "such intervals cover at this number of seeds.",
    "gap": "Train minus test accuracy at the last epoch; dots are seeds, black bars the mean and "
           "95% CI from the analysis. Train accuracy is measured with dropout on, so a negative "
           "gap is expected for strong dropout and is not 'underfitting' by itself.",
    "mc_flip_rate": "Dropout left on at inference: share of test images whose predicted class "
                    "differs between two stochastic passes (averaged over all pairs of the "
                    "{passes} passes), per seed (dots), with the mean and its 95% t interval "
                    "over seeds (bar), as in results.json.",
    "interaction": "Left: {endpoint} against the dropout rate, one line per training-set size, "
                   "with 95% CIs; filled markers are shown different from the baseline (Holm "
                   "over the rates of that size). Right: the best setting's gain over the "
                   "baseline against the baseline's final train \u2212 test gap, one point per "
                   "size with 95% CIs both ways; the dashed line is the seed-level regression "
                   "(standard errors clustered by seed).",
    "cs_looks": "Adaptive study: each comparison still open after its first look, with its 95% "
                "confidence sequence of the gap to the baseline (a contrast: between its two settings) at every look, against the "
                "seeds per setting at that look, up to the look where it stopped; the thick "
                "bar and the word mark the stop (settled, cap: max_seeds, budget: max_runs, "
                "open: rounds remain). The sequence only narrows (a running intersection); the "
                "shaded band is the equivalence margin, and bounds beyond the axis are clipped "
                "to its edge. A verdict is read off the CS at the stop. Where C4 or C7 "
                "comparisons drove rounds, dashed lines are an implementation against torch "
                "and dotted ones MC-averaged against eval-mode accuracy, each in its "
                "setting's colour.",
    "keep_rates": "Share of units each dropout layer kept in training, per implementation "
                  "(mean over first runs; one marker per setting and layer, dodged sideways so "
                  "implementations do not hide each other). Solid: the nominal 1 \u2212 p; "
                  "dashed: P(N(0,1) > p), what the lesson's randn mask keeps.",
    "variance_sources": "Seed-to-seed SD of final test accuracy when only one random source "
                        "follows the seed (the others held fixed), against all sources; error "
                        "bars are the bootstrap 95% CIs from the analysis.",
}
# Drawn from `Results.diagnostics` as one panel each, and placed by the report next to the
# claim they answer rather than among the per-stratum figures.
DIAGNOSTIC_FIGURES = ("keep_rates", "variance_sources")
# Figures the report places with their claim (C7's per stratum, C6's across sizes), not among
# the per-stratum ones.
CLAIM_FIGURES = ("mc_flip_rate", "interaction")


def caption(name: str, results: Results) -> str:
    """The caption of figure `name`, naming the endpoint the analysis used."""
    passes = sorted({s.passes for s in results.inference.settings}) if results.inference else []
    return CAPTIONS[name].format(endpoint=Endpoint.parse(results.endpoint).describe(),
                                 passes=" or ".join(map(str, passes)) or "T")


def _stratum_frames(results: Results, runs: pd.DataFrame) -> list[tuple[Stratum, pd.DataFrame]]:
    return [(s, select_stratum(runs, s.stratum)) for s in results.strata]


def _in_stratum(items: Sequence[Any], stratum: Stratum) -> list[Any]:
    return [item for item in items if item.stratum == stratum.stratum]


def panel_titles(strata: Sequence[Stratum]) -> list[str]:
    """What tells the panels apart: only the stratum columns whose values differ between them."""
    keys = [k for k in strata[0].stratum if len({str(s.stratum.get(k)) for s in strata}) > 1] \
        if strata else []
    if not keys:
        return [s.label for s in strata]
    return [", ".join(f"{k}: {s.stratum.get(k)}" for k in keys) for s in strata]


def _draw_facets(name: str, results: Results, table: Any, out_dir: Path,
                 draw: Callable[[Stratum, pd.DataFrame, Axes], None],
                 legend: dict[str, Any] | None = None, columns: int = MAX_COLUMNS,
                 legend_width: float | None = None) -> FigureFile:
    frames = _stratum_frames(results, table.runs)
    titles = panel_titles(results.strata)
    with style():
        fig, axes = facet(len(frames), columns)
        for (stratum, runs), ax, title in zip(frames, axes, titles):
            draw(stratum, runs, ax)
            if len(frames) > 1:
                ax.set_title(title)
        if legend:
            fig.legend(handles=list(legend.values()), labels=list(legend), loc="outside lower center",
                       ncols=legend_columns(len(legend), legend_width or fig.get_figwidth()),
                       frameon=False)
    png, svg = save(fig, out_dir, name)
    return FigureFile(name, png, svg, caption(name, results), float(fig.get_figwidth()))


def legend_columns(entries: int, width_in: float) -> int:
    """Columns for a figure legend: at most 5 on a wide figure (3 on a narrow one), and rows
    of equal length, so a 6-entry legend is 3 + 3 rather than 5 + 1 running off the edge."""
    most = 5 if width_in > 4.5 else 3
    rows = math.ceil(entries / most)
    return math.ceil(entries / rows)


def _setting_handles(palette: dict[str, Any]) -> dict[str, Any]:
    return {s: mpl.lines.Line2D([], [], color=c, marker="o", markersize=4) for s, c in palette.items()}


def _verdict_handles(margin: float) -> dict[str, Any]:
    handles = {v: mpl.lines.Line2D([], [], color=c, marker=VERDICT_MARKERS[v], linewidth=1.6,
                                   markeredgecolor="black", markeredgewidth=0.4, markersize=5)
               for v, c in VERDICT_COLOURS.items()}
    band = mpl.patches.Patch(color="#0072B2", alpha=0.12, linewidth=0)
    tost = mpl.lines.Line2D([], [], color="#7f7f7f", linewidth=6, alpha=0.3)
    return {**handles, "TOST interval": tost, f"±{margin * 100:g} pp equivalence margin": band}


def _cs_handles(results: Results, palette: dict[str, Any], margin: float) -> dict[str, Any]:
    """The legend of the CS figure: the settings drawn (a contrast in dark grey), the band."""
    drawn = {cs_label(c) for c in results.comparisons if was_open(c)}
    handles = {s: h for s, h in _setting_handles(palette).items() if s in drawn}
    handles.update({cs_label(c, contrast=True): mpl.lines.Line2D([], [], color="#333333")
                    for c in results.contrasts if was_open(c)})
    tracks = [t for s in results.strata for t in cs_tracks(results, s)]
    handles.update({s: h for s, h in _setting_handles(palette).items()
                    if s in {t.setting for t in tracks}})
    handles.update({words: mpl.lines.Line2D([], [], color="#333333", linestyle=style)
                    for style, words in CS_STYLES.values()
                    if any(t.style == style for t in tracks)})
    band = mpl.patches.Patch(color="#0072B2", alpha=0.12, linewidth=0)
    return {**handles, f"±{margin * 100:g} pp equivalence margin": band}


def make_figures(results: Results, table: Any, out_dir: Path) -> list[FigureFile]:
    """All report figures for every stratum of `results`, then the diagnostic ones, saved under
    `out_dir`."""
    order = setting_order(table.runs, table.protocol)
    palette = _palette(order)
    margin = results.equivalence_margin
    # Replicates repeat a cell exactly; drawing them would count one seed twice.
    table = _first_replicates(table)

    def curves(metric):
        def draw(s, runs, ax):
            plot_learning_curves(_in_stratum(results.curves, s), metric, order=order,
                                 palette=palette, ax=ax)
        return draw

    def forest(s, runs, ax):
        plot_forest(_in_stratum(results.comparisons, s), margin, ax=ax)

    def sd(s, runs, ax):
        plot_sd(_in_stratum(results.groups, s), order=_present(order, runs), palette=palette,
                ax=ax)

    def gap(s, runs, ax):
        plot_gap(runs, _in_stratum(results.groups, s),
                 order=_present(order, runs), palette=palette, ax=ax)

    lines = _setting_handles(palette)
    per_stratum = [
        final_accuracy_figure(results, table, out_dir, order, palette),
        _draw_facets("curves_test_acc", results, table, out_dir, curves("test_acc"), lines),
        _draw_facets("curves_train_loss", results, table, out_dir, curves("train_loss"), lines),
        _draw_facets("sd", results, table, out_dir, sd),
        _draw_facets("gap", results, table, out_dir, gap),
    ]
    if results.inference is not None:
        def flips(s, runs, ax):
            plot_flip_rate(runs, _in_stratum(results.inference.settings, s),
                           order=_present(order, runs), palette=palette, ax=ax)
        per_stratum.append(_draw_facets("mc_flip_rate", results, table, out_dir, flips))
    if results.comparisons:  # the baseline alone (e.g. a determinism study): nothing to draw
        # One column: the numbers printed right of each panel need the full width.
        per_stratum.insert(3, _draw_facets("forest", results, table, out_dir, forest,
                                           _verdict_handles(margin), columns=1))
    tracks = [t for s in results.strata for t in cs_tracks(results, s)]
    if results.adaptive is not None and (tracks or any(map(was_open, (*results.comparisons,
                                                                     *results.contrasts)))):
        def narrowing(s, runs, ax):
            plot_cs_looks(_in_stratum(results.comparisons, s), margin,
                          contrasts=_in_stratum(results.contrasts, s),
                          tracks=cs_tracks(results, s), palette=palette, ax=ax)
        per_stratum.append(_draw_facets("cs_looks", results, table, out_dir, narrowing,
                                        _cs_handles(results, palette, margin), columns=1,
                                        legend_width=4.0))
    if results.interactions:
        per_stratum.append(interaction_figure(results, out_dir))
    return per_stratum + diagnostic_figures(results.diagnostics, out_dir)


def at_chance(groups: Sequence[Group]) -> list[Group]:
    """The settings without a single run above chance: every run `degenerate` (its final test
    accuracy within the training code's margin of 10%) or diverged."""
    return [g for g in groups if not g.status_counts.get("ok")]


def final_accuracy_figure(results: Results, table: Any, out_dir: Path, order: list[str],
                          palette: dict[str, Any]) -> FigureFile:
    """Final test accuracy per stratum. When some setting sits at chance (e.g. (1, 1) at 10%),
    its scale squeezes the healthy settings into one band, so each stratum gets a second
    panel zoomed on the settings above chance; the caption names the settings left out."""
    frames = _stratum_frames(results, table.runs)
    out = {str(s.stratum): at_chance(_in_stratum(results.groups, s)) for s in results.strata}
    zoom = any(out.values())
    titles = panel_titles(results.strata)
    with style():
        fig, axes = facet(len(frames) * (2 if zoom else 1), MAX_COLUMNS)
        for i, ((stratum, runs), title) in enumerate(zip(frames, titles)):
            panels = axes[2 * i:2 * i + 2] if zoom else axes[i:i + 1]
            plot_final_accuracy(runs, order=_present(order, runs), palette=palette, ax=panels[0])
            if zoom:
                _zoom_panel(runs, out[str(stratum.stratum)], order, palette, panels[1])
            where = f"{title}: " if len(frames) > 1 else ""
            for ax, what in zip(panels, ("all settings", "settings above chance")):
                if zoom:
                    ax.set_title(where + what)
                    # Half-width panels: six setting labels would run into each other.
                    ax.tick_params(axis="x", labelrotation=30)
                    for label in ax.get_xticklabels():
                        label.set_horizontalalignment("right")
                elif len(frames) > 1:
                    ax.set_title(title)
    png, svg = save(fig, out_dir, "final_accuracy")
    text = caption("final_accuracy", results) + _zoom_caption(results, out)
    return FigureFile("final_accuracy", png, svg, text, float(fig.get_figwidth()))


def _zoom_panel(runs: pd.DataFrame, left_out: Sequence[Group], order: list[str],
                palette: dict[str, Any], ax: Axes) -> None:
    left = {setting_label(g.dropout1, g.dropout2) for g in left_out}
    kept = runs[~with_setting(runs)["setting"].isin(left).to_numpy()]
    if not np.isfinite(kept["test_acc"].to_numpy(dtype=float)).any():
        ax.text(0.5, 0.5, "no setting above chance", ha="center", va="center",
                transform=ax.transAxes, fontsize=7)
        ax.set_axis_off()
        return
    plot_final_accuracy(kept, order=_present(order, kept), palette=palette, ax=ax)


def _zoom_caption(results: Results, out: dict[str, list[Group]]) -> str:
    if not any(out.values()):
        return ""
    labels = {str(s.stratum): s.label for s in results.strata}
    several = len(results.strata) > 1
    left = "; ".join(
        f"{setting_label(g.dropout1, g.dropout2)}"
        f"{' in ' + labels[key] if several else ''} (runs by status: "
        f"{', '.join(f'{k} {v}' for k, v in sorted(g.status_counts.items()))})"
        for key, groups in out.items() for g in groups)
    return (f" Right: the same runs zoomed on the settings with a run above chance, leaving out "
            f"{left}: no run of theirs learned beyond chance (10%), and their scale would "
            f"squeeze the healthy settings into one band.")


def interaction_figure(results: Results, out_dir: Path) -> FigureFile:
    """C6: per stratum of the other columns, the dose-response curves and gain against gap."""
    with style():
        fig, axes = facet(2 * len(results.interactions), columns=2)
        for i, interaction in enumerate(results.interactions):
            plot_dose_response(interaction.sizes, ax=axes[2 * i])
            plot_gain_vs_gap(interaction, ax=axes[2 * i + 1])
            if len(results.interactions) > 1:
                axes[2 * i].set_title(interaction.label)
    png, svg = save(fig, out_dir, "interaction")
    return FigureFile("interaction", png, svg, caption("interaction", results),
                      float(fig.get_figwidth()))


def diagnostic_figures(diag: Diagnostics | None, out_dir: Path) -> list[FigureFile]:
    """One single-panel figure per applicable section of `Results.diagnostics` that has one."""
    if diag is None:
        return []
    draw = {"keep_rates": plot_keep_rates, "variance_sources": plot_source_sds}
    out = []
    for name in DIAGNOSTIC_FIGURES:
        section = getattr(diag, name)
        if section.applicable and section.records:
            out.append(_single_figure(name, out_dir, lambda ax, f=draw[name], s=section:
                                      f(s.records, ax=ax)))
    return out


def _single_figure(name: str, out_dir: Path, draw: Callable[[Axes], Any]) -> FigureFile:
    with style():
        fig, (ax,) = facet(1)
        draw(ax)
    png, svg = save(fig, out_dir, name)
    return FigureFile(name, png, svg, CAPTIONS[name], float(fig.get_figwidth()))


def _first_replicates(table: Any) -> Any:
    runs = table.runs[table.runs["replicate"] == 0]
    return dataclasses.replace(table, runs=runs,
                               curves=table.curves[table.curves["run_id"].isin(runs["run_id"])])


def _present(order: list[str], runs: pd.DataFrame) -> list[str]:
    here = set(with_setting(runs)["setting"])
    return [s for s in order if s in here]

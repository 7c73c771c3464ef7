"""C6 as a measured interaction: does dropout's gain grow as the model overfits more?

    python -m study analyze protocols/overfitting.yaml    # results.json: "interactions"

Where the runs span several training-set sizes (`train_images`, a stratum column), each size
is a stratum analysed as usual: every setting against the baseline, Holm over the settings of
that size. This module reads those comparisons across sizes, within each stratum of the other
columns:

- the regime: the baseline's final train accuracy and train - test gap per size;
- the best setting per size: the largest gain among those shown `different` and positive
  (Holm-adjusted over the rates), else the largest mean gain, with its verdict as analysed;
- the trend: a seed-level regression of that gain on the baseline's gap, across sizes. A seed
  reuses its init and data-order streams at every size, so points of one seed are not
  independent: the primary slope has standard errors clustered by seed (t on G - 1 df), and the
  slope fitted within each seed, with a t interval over seeds, is reported beside it;
- the dose-response curve per size, read for the lesson's "too small does nothing, too large
  constrains the fit".
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from study.analysis import stats
from study.analysis.settings import METRIC, Setting, by_seed, rows_of, setting_of
from study.results import (OVERFIT_GAP, OVERFIT_TRAIN_ACC, Comparison, DosePoint, Group,
                           Interaction, Regime, SizeEffect)
from study.analysis.table import STRATUM_COLUMNS, scalar, stratum_label

SIZE = "train_images"
OTHERS = tuple(c for c in STRATUM_COLUMNS if c != SIZE)


def analyze(runs: pd.DataFrame, groups: list[Group], comparisons: list[Comparison],
            base: Setting, column: str, endpoint: str) -> list[Interaction]:
    """One Interaction per stratum of the other columns that holds at least two sizes.

    `runs`: first runs with the endpoint column `column`; `groups`, `comparisons`: the per-size
    results `analysis` already computed (so verdicts are the report's own)."""
    out = []
    varying = [c for c in OTHERS if runs[c].nunique(dropna=False) > 1]
    for values, frame in runs.groupby(list(OTHERS), dropna=False, sort=True):
        sizes = sorted(int(n) for n in frame[SIZE].dropna().unique())
        if len(sizes) < 2:
            continue
        others = {c: scalar(v) for c, v in zip(OTHERS, values)}
        effects = [_size_effect(frame[frame[SIZE] == n], {**others, SIZE: n}, groups,
                                comparisons, base, column) for n in sizes]
        out.append(_interaction(frame, others, stratum_label(others, varying), effects, base,
                                column, endpoint))
    return out


def _interaction(frame: pd.DataFrame, others: dict[str, Any], label: str,
                 effects: list[SizeEffect], base: Setting, column: str,
                 endpoint: str) -> Interaction:
    gap, gain, seed = _points(frame, effects, base, column)
    trend = stats.cluster_slope(gap, gain, seed)
    per_seed = stats.per_cluster_slope(gap, gain, seed)
    notes = ["the gain at each size is that of the best setting, chosen on the same data: the "
             "maximum of several estimates is biased upwards, more where more rates are close"]
    if base != (0.0, 0.0):
        notes.append(f"the baseline is {list(base)}, not (0, 0): gains are over that setting")
    holds, why = verdict(effects, trend)
    return Interaction(stratum=others, label=label,
                       baseline=list(base), endpoint=endpoint, sizes=effects, trend=trend,
                       trend_per_seed=per_seed, n_points=int(np.isfinite(gain).sum()),
                       holds=holds, holds_reason=why, notes=notes)


def _points(frame: pd.DataFrame, effects: list[SizeEffect], base: Setting,
            column: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per (size, seed): the baseline's final train - test gap, and the best setting's gain
    over the baseline on `column` (the primary endpoint), paired by seed. Arrays [N]."""
    parts = []
    for e in effects:
        if e.best is None:
            continue
        rows = frame[frame[SIZE] == e.train_images]
        gap = by_seed(rows, base, "train_acc") - by_seed(rows, base, METRIC)
        gain = by_seed(rows, setting_of(*e.best), column) - by_seed(rows, base, column)
        both = gap.index.intersection(gain.index)
        parts.append(pd.DataFrame({"gap": gap.loc[both].to_numpy(),
                                   "gain": gain.loc[both].to_numpy(), "seed": both.to_numpy()}))
    points = pd.concat(parts) if parts else pd.DataFrame({"gap": [], "gain": [], "seed": []})
    return (points["gap"].to_numpy(dtype=float), points["gain"].to_numpy(dtype=float),
            points["seed"].to_numpy())


# ----------------------------------------------------------------------------- one size


def _size_effect(frame: pd.DataFrame, stratum: dict[str, Any], groups: list[Group],
                 comparisons: list[Comparison], base: Setting, column: str) -> SizeEffect:
    comps = [c for c in comparisons if c.stratum == stratum]
    best, chosen_by = choose_best(comps)
    by_setting = {(g.dropout1, g.dropout2): g for g in groups if g.stratum == stratum}
    dose = [_dose_point(g, next((c for c in comps if (c.dropout1, c.dropout2) == s), None))
            for s, g in sorted(by_setting.items())]
    finite = [p for p in dose if p.mean is not None]
    peak = max(finite, key=lambda p: p.mean) if finite else None
    return SizeEffect(
        train_images=int(stratum[SIZE]), stratum=stratum, regime=regime(frame, base),
        chosen_by=chosen_by, **_best_fields(best), dose=dose,
        peak=None if peak is None else [peak.dropout1, peak.dropout2],
        smallest_rate=_smallest_rate(dose, base),
        largest_constrains=_largest_constrains(dose, base, peak))


def _best_fields(best: Comparison | None) -> dict[str, Any]:
    """SizeEffect's fields read off the chosen comparison (all None when there is none)."""
    if best is None:
        return dict.fromkeys(("best", "gain", "gain_ci95", "p_adjusted", "verdict", "robust"))
    return {"best": [best.dropout1, best.dropout2], "gain": best.mean_diff,
            "gain_ci95": best.mean_diff_ci95, "p_adjusted": best.p_adjusted,
            "verdict": best.verdict, "robust": best.robust}


def choose_best(comps: list[Comparison]) -> tuple[Comparison | None, str]:
    """The largest gain among settings shown better than the baseline (their p-values Holm-
    adjusted over the rates of the size); if none is, the largest mean gain, as analysed."""
    shown = [c for c in comps if c.verdict == "different" and (c.mean_diff or 0) > 0]
    if shown:
        return (max(shown, key=lambda c: c.mean_diff),
                "largest gain among the settings shown better than the baseline (Holm over the "
                "rates)")
    finite = [c for c in comps if c.mean_diff is not None]
    if not finite:
        return None, "no comparison with the baseline could be made"
    return (max(finite, key=lambda c: c.mean_diff),
            "largest mean gain; no setting is shown better than the baseline (Holm over the "
            "rates)")


def regime(frame: pd.DataFrame, base: Setting) -> Regime:
    """The baseline's fit at one size, from each seed's final epoch; overfitting is decided on
    the medians over seeds (see `Regime`), robust to one seed's late spike."""
    rows = rows_of(frame, base)
    train, test = (rows[c].to_numpy(dtype=float) for c in ("train_acc", METRIC))
    ok = np.isfinite(train) & np.isfinite(test)
    train, test = train[ok], test[ok]
    if not train.size:
        return Regime(0, None, None, None, None, False)
    gap = train - test
    med_train, med_gap = float(np.median(train)), float(np.median(gap))
    each = int(((train >= OVERFIT_TRAIN_ACC) & (gap >= OVERFIT_GAP)).sum())
    return Regime(int(train.size), float(train.mean()), float(test.mean()), float(gap.mean()),
                  stats.mean_ci(gap), med_train >= OVERFIT_TRAIN_ACC and med_gap >= OVERFIT_GAP,
                  med_train, med_gap, each)


def _dose_point(g: Group, c: Comparison | None) -> DosePoint:
    return DosePoint(g.dropout1, g.dropout2, g.mean, g.ci95, g.train_acc_mean,
                     None if c is None else c.mean_diff,
                     None if c is None else c.mean_diff_ci95, None if c is None else c.verdict)


def _smallest_rate(dose: list[DosePoint], base: Setting) -> str:
    """What the smallest rate above the baseline's does: helps, hurts, nothing (shown within
    the margin) or unclear (not shown either way)."""
    above = [p for p in dose if p.verdict is not None and (p.dropout1, p.dropout2) > base]
    if not above:
        return "unclear"
    p = min(above, key=lambda p: (p.dropout1, p.dropout2))
    if p.verdict == "different":
        return "helps" if (p.mean_diff or 0) > 0 else "hurts"
    return "nothing" if p.verdict in ("equivalent", "negligible") else "unclear"


def _largest_constrains(dose: list[DosePoint], base: Setting,
                        peak: DosePoint | None) -> bool | None:
    """Whether the largest rate fits the training set less than the baseline (train mode) and
    tests below the curve's peak: the lesson's "too large constrains the fit"."""
    base_point = next((p for p in dose if (p.dropout1, p.dropout2) == base), None)
    top = max(dose, key=lambda p: (p.dropout1, p.dropout2), default=None)
    if top is None or base_point is None or peak is None or top is base_point or None in (
            top.train_acc_mean, base_point.train_acc_mean, top.mean):
        return None
    return top.train_acc_mean < base_point.train_acc_mean and top.mean < peak.mean


# ----------------------------------------------------------------------------- the claim


def verdict(effects: list[SizeEffect], trend: stats.Slope) -> tuple[str, str]:
    """Whether C6 ("dropout only pays off once the model overfits") holds, and why."""
    overfit = [e for e in effects if e.regime.overfits]
    if not overfit:
        return "not tested", "no size reached the overfitting regime"
    helped = [e for e in overfit if e.verdict == "different" and (e.gain or 0) > 0]
    no_help = all(e.verdict in ("equivalent", "negligible")
                  or (e.verdict == "different" and (e.gain or 0) < 0) for e in overfit)
    lo, hi = trend.ci95 if trend.ci95 is not None else (None, None)
    grows, shrinks = lo is not None and lo > 0, hi is not None and hi < 0
    sizes = ", ".join(f"{e.train_images:,}" for e in helped)
    if shrinks or no_help:
        return "contradicted", ("the gain shrinks as the baseline's gap grows" if shrinks else
                                "at every overfitting size dropout is shown not to help")
    if grows and helped:
        return "supported", (f"dropout is shown to help where the model overfits ({sizes} "
                             "images) and the gain grows with the baseline's gap")
    if helped:
        return "partly supported", (f"dropout is shown to help where the model overfits "
                                    f"({sizes} images), but the trend with the gap is not shown")
    if grows:
        return "partly supported", ("the gain grows with the baseline's gap, but no overfitting "
                                    "size shows a gain")
    return "not shown", "neither a gain where the model overfits nor a trend with the gap is shown"

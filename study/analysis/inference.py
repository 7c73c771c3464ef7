"""Claim C7 from the runs' stochastic test-set passes: run table in, `results.Inference` out.

    python -m study analyze protocols/d2l-dropout.yaml    # results.json, key "inference"

Seeds are the units throughout: each run gives one flip rate, one unstable share and one
(MC-averaged, eval-mode) pair of accuracy, NLL and ECE. Per setting and stratum:

- flip rate and unstable share: mean over seeds with a Student-t 95% CI;
- MC-averaged against eval-mode accuracy, paired within runs: the t test and TOST at the
  protocol's equivalence margin, Holm over the stratum's settings, with the usual four verdicts
  (`stats.location`, `stats.verdict`);
- NLL and ECE: the same paired t test and Holm family per metric, with a CI, but no equivalence
  claim: they have no margin in their units, so a difference is `different` or
  `not_shown_different` (or `identical` where every run gives the same number, as without dropout).

And per stratum, Spearman's rank correlation of the flip rate with the dropout rate (`McTrend`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps

from study.analysis import stats
from study.protocol.schema import Analysis
from study.results import (ECE_BINS, Endpoint, Inference, McSetting, McTrend, Paired, Share)
from study.analysis.table import scalar

Setting = tuple[float, float]
# Columns of a run's two predictions, (MC-averaged, eval-mode), per paired metric.
PAIRED = {"accuracy": ("mc_test_acc", "test_acc"), "nll": ("mc_test_nll", "test_nll"),
          "ece": ("mc_test_ece", "test_ece")}


def analyze(strata: Iterable[tuple[dict[str, Any], pd.DataFrame]],
            options: Analysis) -> Inference | None:
    """strata: (stratum, its first-replicate runs) as `analysis` splits them -> the C7 results,
    or None when no run made passes (the table has no `mc_passes` column or it is all NaN)."""
    settings, trends = [], []
    for stratum, frame in strata:
        if "mc_passes" not in frame or not (frame["mc_passes"] > 0).any():
            continue
        runs = frame[frame["mc_passes"] > 0]
        settings += _settings(stratum, runs, options)
        trends.append(trend(stratum, runs))
    if not settings:
        return None
    return Inference(ece_bins=ECE_BINS, equivalence_margin=options.equivalence_margin,
                     settings=settings, trends=trends)


def _by_setting(runs: pd.DataFrame) -> list[tuple[Setting, pd.DataFrame]]:
    # Rounded as analysis rounds: 0.2 read back as 0.20000000001 names the same setting.
    keys = [runs["dropout1"].round(6), runs["dropout2"].round(6)]
    return [((float(a), float(b)), rows.sort_values("seed"))
            for (a, b), rows in runs.groupby(keys, sort=True)]


def _settings(stratum: dict[str, Any], runs: pd.DataFrame, options: Analysis) -> list[McSetting]:
    groups = _by_setting(runs)
    paired = {metric: _family(metric, [rows for _, rows in groups], options)
              for metric in PAIRED}
    return [_setting(stratum, s, rows, {m: paired[m][i] for m in PAIRED})
            for i, (s, rows) in enumerate(groups)]


def _setting(stratum: dict[str, Any], setting: Setting, rows: pd.DataFrame,
             paired: dict[str, Paired]) -> McSetting:
    seed, image = example(rows)
    return McSetting(
        stratum=stratum, dropout1=setting[0], dropout2=setting[1],
        passes=int(rows["mc_passes"].max()), n=int(rows["mc_flip_rate"].notna().sum()),
        flip_rate=share(rows["mc_flip_rate"]), unstable_share=share(rows["mc_unstable_share"]),
        eval_acc_mean=_mean(rows["test_acc"]), mc_acc_mean=_mean(rows["mc_test_acc"]),
        accuracy=paired["accuracy"], nll=paired["nll"], ece=paired["ece"],
        example_image=image, example_seed=seed)


def share(values: pd.Series) -> Share:
    """values: [seeds] shares of test images (NaN: a run without passes, dropped)."""
    x, _ = stats.drop_nan(values.to_numpy(dtype=float))
    return Share(_mean(values), stats.mean_ci(x))


def _mean(values: pd.Series) -> float | None:
    x, _ = stats.drop_nan(values.to_numpy(dtype=float))
    return float(x.mean()) if x.size else None


def example(rows: pd.DataFrame) -> tuple[int | None, int | None]:
    """(seed, test image) of the lowest seed whose run recorded a flipped image."""
    found = rows[rows["mc_flip_example"].notna()].sort_values("seed")
    if found.empty:
        return None, None
    first = found.iloc[0]
    return int(first["seed"]), int(first["mc_flip_example"])


# --- MC against eval, paired within runs ---------------------------------------------------------


def _family(metric: str, groups: list[pd.DataFrame], options: Analysis) -> list[Paired]:
    """One metric's comparison for every setting of a stratum, Holm-adjusted together."""
    mc, ev = PAIRED[metric]
    # The accuracy grid: rank-free here, but it settles a gap that is the same in every seed.
    grid = Endpoint.parse("final").grid if metric == "accuracy" else None
    locs = [stats.location("t", rows[mc].to_numpy(dtype=float), rows[ev].to_numpy(dtype=float),
                           paired=True, margin=options.equivalence_margin, grid=grid)
            for rows in groups]
    p_adj = stats.holm([loc.p for loc in locs])
    tost_adj = stats.holm([loc.tost_p for loc in locs]) if metric == "accuracy" \
        else [None] * len(locs)
    n_pairs = [int((rows[mc].notna() & rows[ev].notna()).sum()) for rows in groups]
    return [Paired(metric=metric, n_pairs=n, mean_diff=loc.estimate, ci95=loc.ci95, p=loc.p,
                   p_adjusted=p, tost_p_adjusted=t,
                   verdict=(stats.verdict(p, t, options.alpha, loc.forced) if metric == "accuracy"
                            else difference_verdict(loc, p, options.alpha)),
                   reason=loc.reason)
            for loc, p, t, n in zip(locs, p_adj, tost_adj, n_pairs)]


def difference_verdict(loc: stats.Location, p_adjusted: float | None, alpha: float) -> str:
    """`different` when the Holm-adjusted test rejects (or every seed gives the same non-zero
    gap); `identical` when every seed's gap is 0 (below float round-off); else
    `not_shown_different`. Never `equivalent`: there is no margin to be equivalent within."""
    if loc.forced is not None:  # a gap the same in every seed: no test, settled as it is
        return "identical" if abs(loc.estimate or 0.0) <= stats.TOLERANCE else "different"
    return "different" if p_adjusted is not None and p_adjusted < alpha else "not_shown_different"


# --- flip rate against dropout rate --------------------------------------------------------------


def trend(stratum: dict[str, Any], runs: pd.DataFrame) -> McTrend:
    """Spearman's rho of each run's flip rate with its mean dropout rate, over the runs of the
    settings without a rate of 1 (see `results.McTrend`)."""
    runs = runs[np.isfinite(runs["mc_flip_rate"].to_numpy(dtype=float))]
    settings = [s for s, _ in _by_setting(runs)]
    kept = [s for s in settings if max(s) < 1.0]
    left_out = [list(s) for s in settings if max(s) >= 1.0]
    use = runs[(runs["dropout1"] < 1.0) & (runs["dropout2"] < 1.0)]
    rate = ((use["dropout1"] + use["dropout2"]) / 2).to_numpy(dtype=float)
    flips = use["mc_flip_rate"].to_numpy(dtype=float)
    base = dict(stratum=stratum, n_runs=int(len(use)), settings=[list(s) for s in kept],
                left_out=left_out)
    if len(kept) < 2 or len(use) < stats.MIN_N:
        return McTrend(**base, rho=None, p=None,
                       reason="fewer than 2 settings below a rate of 1, or fewer than "
                              f"{stats.MIN_N} runs: no trend to test")
    if stats.is_constant(flips):
        return McTrend(**base, rho=None, p=None,
                       reason="every run has the same flip rate: the rank correlation is undefined")
    res = sps.spearmanr(rate, flips)
    return McTrend(**base, rho=scalar(float(res.statistic)), p=scalar(float(res.pvalue)),
                   reason=None)

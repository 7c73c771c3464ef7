"""Repeatability and the lesson's side claims: replicates, determinism modes, CPU against GPU,
sources of variance, and the hand-written dropout implementations.

    python -m study analyze protocols/determinism.yaml      (see results.json -> "diagnostics")

`analyze(table, options, seed)` turns a `RunTable` into one JSON-able dict (no NaN: a value that
cannot be computed is None and its record's `reason` says why). `analysis.analyze` stores it as
`results["diagnostics"]`. Every section has the same three keys, plus its own extras:

    {"applicable": bool,            # False when the table holds nothing this section can measure
     "reason": str | None,          # why not applicable (or a section-wide caveat)
     "records": [ {...}, ... ],     # one flat record per row of the section's CSV
     ...}

A record's `stratum` is a dict of the `table.STRATUM_COLUMNS` that stay fixed within it; settings
are `dropout1`, `dropout2`; intervals are [lo, hi] lists or None; `reason` is None or a string.

`replicates` (issue item 1) -- one record per (device, determinism, execution):
    stratum, n_cells (cells with a replicate > 0), n_replicates (runs with replicate > 0 whose
    replicate 0 exists), n_missing_first (replicate > 0 runs without one), n_hash_compared,
    n_identical, share_identical (replicate k vs replicate 0 of its cell, by weights_sha256),
    share_identical_ci95 (Clopper-Pearson), max_abs_diff {test_acc, train_loss} (largest
    |replicate k - replicate 0|), nondeterminism_var / nondeterminism_sd (pooled within-cell
    variance of test_acc across all replicates of each cell; exactly 0.0 when they agree),
    nondeterminism_df, seed_var / seed_sd (pooled variance of replicate-0 test_acc across seeds
    within each setting and stratum), seed_df, variance_ratio (nondeterminism_var / seed_var),
    finding (one sentence), reason.

`modes` (item 2) -- extra key `reference` (the mode compared against: "default" when present).
    One record per (device, execution, mode != reference), pairing replicate-0 runs of the same
    cell (every other stratum column, setting and seed equal) under `mode` and `reference`:
    stratum, mode, reference, n_pairs, n_hash_compared, n_identical, share_identical,
    share_identical_ci95, max_abs_diff {test_acc, train_loss}, mean_diff (mode - reference,
    test_acc), mean_diff_ci95, test ("paired_t"), p, p_adjusted, tost_p, tost_p_adjusted
    (Holm over the modes of one device/execution), verdict (`stats.verdict`: different /
    equivalent / inconclusive), no_change_observed (every pair bitwise identical), finding, reason.

`devices` (item 2) -- one record per (stratum without device, setting) with runs of the same
    cells on both "cpu" and "cuda": stratum, dropout1, dropout2, n_pairs, n_hash_compared,
    n_identical, share_identical (expected 0), share_identical_ci95, max_abs_diff
    {test_acc, train_loss}, mean_diff (cuda - cpu, test_acc), mean_diff_ci95, p, p_adjusted,
    tost_p, tost_p_adjusted (Holm over all records), verdict, finding, reason.

`variance_sources` (item 3) -- extra keys `low_ratio` (0.5) and `summaries`.
    records: one per (stratum without vary, setting, vary source): stratum, dropout1, dropout2,
    source (all / init / data / dropout), n, mean, sd (SD of replicate-0 test_acc across seeds),
    sd_ci95 (percentile bootstrap), ratio (sd / sd of "all"), ratio_ci95 (bootstrap, resampled
    by seed when the seed sets match), paired, brown_forsythe_p (source vs all),
    brown_forsythe_p_adjusted (Holm over the single sources of one setting), summers
    (consistent / smaller / much_smaller / larger / inconclusive / not_computable / reference),
    finding, reason.
    summaries: one per (stratum without vary, setting): stratum, dropout1, dropout2, sources,
    omnibus {test: "brown_forsythe", statistic, p, reason} across every source, agreement
    (agree / disagree / inconclusive / not_computable) with Summers & Dinneen (ICML 2021),
    finding, reason.

`keep_rates` (item 4) -- one record per (implementation, setting, layer 1|2), from the
    keep_rate1/keep_rate2 columns of replicate-0 runs (pooled over devices and modes):
    implementation, dropout1, dropout2, layer, p, n, observed (mean keep rate), observed_sd,
    nominal (1 - p), expected (what the code draws: 1 - p, or P(N(0,1) > p) for scratch-randn;
    1 at p = 0 and 0 at p = 1 for all), deviation (observed - nominal), matches_nominal and
    matches_expected (within KEEP_TOLERANCE), rescale (1 / (1 - p); None at p = 1),
    activation_scale (observed * rescale: the mean factor a live unit is multiplied by in
    training; 1 for correct inverted dropout), finding, reason.

`implementations` (item 4) -- extra keys `reference` ("torch"), `margin`, `claim`.
    One record per (stratum without implementation, setting, implementation != torch), paired
    by seed with torch: stratum, dropout1, dropout2, implementation, reference, n_pairs,
    n_identical, share_identical, mean_diff (implementation - torch, test_acc), mean_diff_ci95,
    p, p_adjusted, tost_p, tost_p_adjusted (Holm over the implementations and settings of one
    stratum), verdict, mde, seeds_needed, finding, reason.

Only replicate-0 runs enter every section except `replicates`.
"""

from __future__ import annotations

import json
import math
import zlib
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps
from statsmodels.stats.proportion import proportion_confint

from study import stats
from study.protocol import Analysis
from study.table import STRATUM_COLUMNS, RunTable, jsonable, scalar

METRIC = "test_acc"
METRICS = ("test_acc", "train_loss")
CELL = (*STRATUM_COLUMNS, "dropout1", "dropout2", "seed")
SETTING = ("dropout1", "dropout2")
SOURCES = ("all", "init", "data", "dropout")
# A single source whose SD ratio CI lies above this gives "about the full spread" in the sense
# tested here: the CI excludes half of the all-sources SD.
LOW_RATIO = 0.5
# Keep rates are averaged over millions of mask draws per run: a gap above one point is no
# sampling noise but a different mask law.
KEEP_TOLERANCE = 0.01
SUMMERS = "Summers & Dinneen (ICML 2021)"


# ----------------------------------------------------------------------------- entry point


def analyze(table: RunTable, options: Analysis, seed: int = 0) -> dict[str, Any]:
    """RunTable -> diagnostics dict (schema in the module docstring). `seed` drives bootstraps."""
    runs = _normalised(table.runs)
    first = runs[runs["replicate"] == 0]
    return jsonable({
        "replicates": replicates(runs),
        "modes": modes(first, options, seed),
        "devices": devices(first, options, seed),
        "variance_sources": variance_sources(first, options, seed),
        "keep_rates": keep_rates(first),
        "implementations": implementations(first, options, seed),
    })


def _normalised(runs: pd.DataFrame) -> pd.DataFrame:
    # Rounded so 0.2 read back from MLflow as 0.20000000001 still names the same setting.
    return runs.assign(dropout1=runs["dropout1"].astype(float).round(6),
                       dropout2=runs["dropout2"].astype(float).round(6))


def _skip(reason: str, **extra: Any) -> dict[str, Any]:
    return {"applicable": False, "reason": reason, "records": [], **extra}


# ----------------------------------------------------------------------------- small pieces


def pooled_variance(groups: list[np.ndarray]) -> tuple[float | None, int]:
    """groups: arrays [n_i] (NaN dropped) -> (sum of squared deviations from each group's mean /
    sum(n_i - 1), that df), over groups with at least 2 finite values; (None, 0) when none has.

    Each group is shifted by its first value before squaring: variance is shift-invariant, and
    bitwise-identical values then give exact zeros, so identical replicates give exactly 0.0."""
    ss, df = 0.0, 0
    for g in groups:
        g = np.asarray(g, dtype=float)
        g = g[np.isfinite(g)]
        if g.size < 2:
            continue
        d = g - g[0]
        ss += float(((d - d.mean()) ** 2).sum())
        df += g.size - 1
    return (ss / df if df else None), df


def sd(x: np.ndarray) -> float | None:
    """x: [n] finite -> sample SD (ddof 1), exactly 0.0 for identical values; None when n < 2."""
    var, _ = pooled_variance([x])
    return None if var is None else math.sqrt(var)


def bootstrap_sd_ci(x: np.ndarray, rng: np.random.Generator, n_boot: int = 10_000,
                    level: float = stats.LEVEL) -> tuple[float, float] | None:
    """x: [n] finite -> bootstrap interval of the SD (ddof 1), `stats.sd_ci`; None when n < 2."""
    return stats.sd_ci(x, rng, n_boot, level)


def share_ci(count: int, nobs: int, level: float = stats.LEVEL) -> tuple[float, float] | None:
    """Clopper-Pearson interval of a proportion count / nobs; None when nobs = 0."""
    if nobs == 0:
        return None
    lo, hi = proportion_confint(count, nobs, alpha=1 - level, method="beta")
    return (float(lo), float(hi))


def hash_agreement(a: pd.Series, b: pd.Series) -> tuple[int, int]:
    """Aligned weight hashes -> (pairs where both are known, of those how many are equal)."""
    known = [(x, y) for x, y in zip(a, b) if _known_hash(x) and _known_hash(y)]
    return len(known), sum(x == y for x, y in known)


def _known_hash(h: Any) -> bool:
    return isinstance(h, str) and len(h) > 0


def max_abs_diff(a: pd.Series, b: pd.Series) -> float | None:
    """Aligned values -> max |a - b| over the pairs where both are finite; None when none is."""
    d = a.to_numpy(dtype=float) - b.to_numpy(dtype=float)
    d = d[np.isfinite(d)]
    return float(np.abs(d).max()) if d.size else None


def expected_keep_rate(implementation: str, p: float) -> float | None:
    """Share of units the implementation's mask keeps at drop probability p (before rescaling).

    torch and scratch keep 1 - p; the lesson's `randn(X.shape) > p` keeps P(N(0,1) > p). Every
    implementation returns X at p = 0 and zeros at p = 1 without drawing a mask."""
    if p <= 0:
        return 1.0
    if p >= 1:
        return 0.0
    if implementation in ("torch", "scratch"):
        return 1.0 - p
    if implementation == "scratch-randn":
        return float(sps.norm.sf(p))
    return None


def summers_verdict(ci: tuple[float | None, float | None] | None,
                    low: float = LOW_RATIO) -> str:
    """SD ratio CI (single source / all sources) -> how it bears on "one source alone gives about
    the full spread": consistent (CI contains 1 and lies above `low`), smaller (CI below 1),
    much_smaller (CI below `low`), larger (CI above 1), inconclusive (CI spans `low` to 1),
    not_computable (no CI). An infinite upper bound (None) counts as +inf."""
    if ci is None or ci[0] is None:
        return "not_computable"
    lo, hi = ci[0], math.inf if ci[1] is None else ci[1]
    if lo > 1:
        return "larger"
    if hi < low:
        return "much_smaller"
    if hi < 1:
        return "smaller"
    if lo > low:
        return "consistent"
    return "inconclusive"


def _rng(seed: int, *keys: Any) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(json.dumps(keys, default=str).encode())])


def _stratum(values: Any, columns: list[str]) -> dict[str, Any]:
    values = values if isinstance(values, tuple) else (values,)
    return {c: scalar(v) for c, v in zip(columns, values)}


def _groups(frame: pd.DataFrame, columns: list[str]):
    if frame.empty:
        return []
    return [(_stratum(k, columns), g) for k, g in frame.groupby(columns, dropna=False, sort=True)]


def _pairs(frame: pd.DataFrame, column: str, a: Any, b: Any) -> pd.DataFrame:
    """Runs with `column == a` joined to those with `column == b` on every other cell key;
    suffixes _a and _b, sorted by the keys."""
    keys = [k for k in CELL if k != column]
    left, right = frame[frame[column] == a], frame[frame[column] == b]
    return left.merge(right, on=keys, suffixes=("_a", "_b")).sort_values(keys, kind="stable")


def _pct(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{100 * x:.{digits}f}%"


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _pp(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:+.2f} pp"


def _fmt_ci(ci: Any, fmt=lambda v: f"{v:.3g}") -> str:
    if ci is None or ci[0] is None:
        return "[n/a]"
    hi = "inf" if ci[1] is None else fmt(ci[1])
    return f"[{fmt(ci[0])}, {hi}]"


# ----------------------------------------------------------------------------- 1. replicates


REPLICATE_BY = ["device", "determinism", "execution"]


def replicates(runs: pd.DataFrame) -> dict[str, Any]:
    """runs: every run (replicates included) -> the `replicates` section."""
    if runs.empty or not (runs["replicate"] > 0).any():
        return _skip("no replicate runs (the protocol has replicates: 1)")
    records = [_replicate_record(stratum, frame)
               for stratum, frame in _groups(runs, REPLICATE_BY)
               if (frame["replicate"] > 0).any()]
    return {"applicable": True, "reason": None, "records": records}


def _replicate_record(stratum: dict[str, Any], frame: pd.DataFrame) -> dict[str, Any]:
    keys = list(CELL)
    first = frame[frame["replicate"] == 0]
    later = frame[frame["replicate"] > 0]
    pairs = later.merge(first, on=keys, suffixes=("", "_first"), how="inner")
    missing = len(later) - len(pairs)
    n_hash, n_same = hash_agreement(pairs["weights_sha256"], pairs["weights_sha256_first"])
    share = n_same / n_hash if n_hash else None
    max_abs = {m: max_abs_diff(pairs[m], pairs[f"{m}_first"]) for m in METRICS}
    # Cells that were replicated: every replicate of each, replicate 0 included.
    replicated = frame.merge(later[keys].drop_duplicates(), on=keys)
    cells = [g[METRIC].to_numpy(dtype=float) for _, g in replicated.groupby(keys, dropna=False)]
    nd_var, nd_df = pooled_variance(cells)
    others = [c for c in STRATUM_COLUMNS if c not in REPLICATE_BY] + list(SETTING)
    seeds = [g[METRIC].to_numpy(dtype=float) for _, g in first.groupby(others, dropna=False)]
    seed_var, seed_df = pooled_variance(seeds)
    reasons = []
    if missing:
        reasons.append(f"{missing} replicate run(s) without a replicate 0 of their cell ignored")
    if n_hash < len(pairs):
        reasons.append(f"{len(pairs) - n_hash} pair(s) without a recorded weight hash")
    if nd_var is None:
        reasons.append("no replicated cell has 2 finite test accuracies: no nondeterminism variance")
    elif n_hash and n_same == n_hash == len(pairs):
        reasons.append("every replicate is bitwise identical to its first run: "
                       "nondeterminism variance is exactly 0")
    if seed_var is None:
        reasons.append("no setting has 2 seeds with finite accuracy: no seed variance")
    ratio = None
    if nd_var is not None and seed_var is not None:
        if seed_var > 0:
            ratio = nd_var / seed_var
        else:
            reasons.append("seed variance is 0: ratio undefined")
    return {
        "stratum": stratum, "n_cells": int(len(later[keys].drop_duplicates())),
        "n_replicates": int(len(pairs)), "n_missing_first": int(missing),
        "n_hash_compared": n_hash, "n_identical": n_same, "share_identical": share,
        "share_identical_ci95": share_ci(n_same, n_hash), "max_abs_diff": max_abs,
        "nondeterminism_var": nd_var, "nondeterminism_sd": _sqrt(nd_var),
        "nondeterminism_df": nd_df, "seed_var": seed_var, "seed_sd": _sqrt(seed_var),
        "seed_df": seed_df, "variance_ratio": ratio,
        "finding": _replicate_finding(stratum, len(pairs), n_hash, n_same, max_abs, nd_var,
                                      seed_var),
        "reason": stats.join_reasons(*reasons),
    }


def _sqrt(v: float | None) -> float | None:
    return None if v is None else math.sqrt(v)


def _replicate_finding(stratum, n_pairs, n_hash, n_same, max_abs, nd_var, seed_var) -> str:
    where = f"{stratum['device']} / {stratum['determinism']} / {stratum['execution']}"
    if n_pairs == 0:
        return f"{where}: no replicate could be matched to its first run."
    seed_sd = "n/a" if seed_var is None else _pp(math.sqrt(seed_var)).lstrip("+")
    if n_hash and n_same == n_hash:
        return (f"{where}: all {n_hash} replicate(s) bitwise identical to their first run "
                f"(same weight hash); nondeterminism variance exactly 0, against a seed-to-seed "
                f"SD of {seed_sd}.")
    nd_sd = "n/a" if nd_var is None else _pp(math.sqrt(nd_var)).lstrip("+")
    return (f"{where}: {n_hash - n_same} of {n_hash} replicate(s) differ from their first run; "
            f"largest |difference| in test accuracy {_pp(max_abs['test_acc']).lstrip('+')}; "
            f"nondeterminism SD {nd_sd} against a seed-to-seed SD of {seed_sd}.")


# ----------------------------------------------------------------------------- paired comparisons


def _paired(pairs: pd.DataFrame, options: Analysis, rng: np.random.Generator
            ) -> tuple[dict[str, Any], stats.Comparison, str | None]:
    """Pairs (columns *_a, *_b) -> the shared fields of a paired comparison of a against b."""
    comp = stats.compare(pairs[f"{METRIC}_a"].to_numpy(dtype=float),
                         pairs[f"{METRIC}_b"].to_numpy(dtype=float), paired=True, rng=rng,
                         margin=options.equivalence_margin, alpha=options.alpha,
                         power=options.power, n_boot=options.bootstrap)
    n_hash, n_same = hash_agreement(pairs["weights_sha256_a"], pairs["weights_sha256_b"])
    fields = {
        "n_pairs": int(len(pairs)), "n_hash_compared": n_hash, "n_identical": n_same,
        "share_identical": n_same / n_hash if n_hash else None,
        "share_identical_ci95": share_ci(n_same, n_hash),
        "max_abs_diff": {m: max_abs_diff(pairs[f"{m}_a"], pairs[f"{m}_b"]) for m in METRICS},
        "mean_diff": comp.mean_diff, "mean_diff_ci95": comp.mean_diff_ci95, "test": comp.test,
        "p": comp.p, "tost_p": comp.tost_p, "mde": comp.mde, "seeds_needed": comp.seeds_needed,
    }
    why = None if n_hash else "no pair has weight hashes on both sides"
    return fields, comp, stats.join_reasons(why, comp.reason)


def _adjust(records: list[dict[str, Any]], comps: list[stats.Comparison],
            options: Analysis) -> None:
    """Holm over one family of records, then the verdict of each; in place."""
    p_adj = stats.holm([r["p"] for r in records])
    tost_adj = stats.holm([r["tost_p"] for r in records])
    for r, c, p, t in zip(records, comps, p_adj, tost_adj):
        r["p_adjusted"], r["tost_p_adjusted"] = p, t
        r["verdict"] = stats.verdict(p, t, options.alpha, c.forced)


# ----------------------------------------------------------------------------- 2. modes


MODES_BY = ["device", "execution"]


def modes(first: pd.DataFrame, options: Analysis, seed: int) -> dict[str, Any]:
    """first: replicate-0 runs -> the `modes` section."""
    found = sorted(first["determinism"].dropna().unique())
    if len(found) < 2:
        return _skip(f"one determinism mode only ({', '.join(found) or 'none'}): nothing to compare",
                     reference=None)
    reference = "default" if "default" in found else found[0]
    records = []
    for stratum, frame in _groups(first, MODES_BY):
        family, comps = [], []
        for mode in [m for m in found if m != reference]:
            pairs = _pairs(frame, "determinism", mode, reference)
            if pairs.empty:
                continue
            rng = _rng(seed, "modes", stratum, mode, reference)
            fields, comp, why = _paired(pairs, options, rng)
            same = fields["n_hash_compared"] > 0 and \
                fields["n_identical"] == fields["n_hash_compared"] == fields["n_pairs"]
            family.append({"stratum": stratum, "mode": mode, "reference": reference, **fields,
                           "no_change_observed": same, "reason": why})
            comps.append(comp)
        _adjust(family, comps, options)
        for r in family:
            r["finding"] = _mode_finding(r)
        records.extend(family)
    if not records:
        return _skip("no cell was run under two determinism modes on the same device",
                     reference=reference)
    return {"applicable": True, "reason": None, "reference": reference, "records": records}


def _mode_finding(r: dict[str, Any]) -> str:
    where = f"{r['stratum']['device']} ({r['stratum']['execution']})"
    if r["no_change_observed"]:
        return (f"No change observed on {where}: all {r['n_pairs']} runs under '{r['mode']}' have "
                f"the same weight hash as under '{r['reference']}'. A null result for these cells, "
                f"this model and this machine only, not proof that the mode has no effect elsewhere.")
    return (f"On {where}, {r['n_hash_compared'] - r['n_identical']} of {r['n_hash_compared']} runs "
            f"under '{r['mode']}' differ bitwise from '{r['reference']}'; mean test-accuracy gap "
            f"{_pp(r['mean_diff'])} (95% CI {_fmt_ci(r['mean_diff_ci95'], _pp)}), largest "
            f"|gap| {_pp(r['max_abs_diff']['test_acc']).lstrip('+')}; verdict: {r['verdict']}.")


# ----------------------------------------------------------------------------- 2. devices


def devices(first: pd.DataFrame, options: Analysis, seed: int) -> dict[str, Any]:
    """first: replicate-0 runs -> the `devices` section (cuda - cpu, paired by cell)."""
    found = sorted(first["device"].dropna().unique())
    if not {"cpu", "cuda"} <= set(found):
        return _skip(f"needs runs of the same cells on cpu and cuda; found {found or 'none'}")
    others = [c for c in STRATUM_COLUMNS if c != "device"]
    pairs_all = _pairs(first, "device", "cuda", "cpu")
    if pairs_all.empty:
        return _skip("no cell was run on both cpu and cuda")
    records, comps = [], []
    for stratum, pairs in _groups(pairs_all, others + list(SETTING)):
        setting = {k: stratum.pop(k) for k in SETTING}
        rng = _rng(seed, "devices", stratum, setting)
        fields, comp, why = _paired(pairs, options, rng)
        records.append({"stratum": stratum, **setting, **fields, "reason": why})
        comps.append(comp)
    _adjust(records, comps, options)
    for r in records:
        r["finding"] = (
            f"({r['dropout1']:g}, {r['dropout2']:g}), {r['stratum']['determinism']}: "
            f"{r['n_identical']} of {r['n_hash_compared']} cuda runs bitwise identical to their "
            f"cpu twin; mean test-accuracy gap cuda - cpu {_pp(r['mean_diff'])} (95% CI "
            f"{_fmt_ci(r['mean_diff_ci95'], _pp)}), largest |gap| "
            f"{_pp(r['max_abs_diff']['test_acc']).lstrip('+')}; verdict: {r['verdict']}.")
    return {"applicable": True, "reason": None, "records": records}


# ----------------------------------------------------------------------------- 3. sources


def variance_sources(first: pd.DataFrame, options: Analysis, seed: int) -> dict[str, Any]:
    """first: replicate-0 runs -> the `variance_sources` section."""
    extra = {"low_ratio": LOW_RATIO, "summaries": []}
    if first.empty or set(first["vary"].dropna()) <= {"all"}:
        return _skip("every run varies all sources (vary: [all]): nothing to compare", **extra)
    others = [c for c in STRATUM_COLUMNS if c != "vary"]
    records, summaries = [], []
    for stratum, frame in _groups(first, others + list(SETTING)):
        if frame["vary"].nunique() < 2:
            continue
        setting = {k: stratum.pop(k) for k in SETTING}
        recs, summary = _sources(stratum, setting, frame, options, seed)
        records.extend(recs)
        summaries.append(summary)
    if not records:
        return _skip("no setting was run with more than one `vary` source", **extra)
    return {"applicable": True, "reason": None, "records": records, "low_ratio": LOW_RATIO,
            "summaries": summaries}


def _by_seed(frame: pd.DataFrame) -> pd.Series:
    s = pd.Series(frame[METRIC].to_numpy(dtype=float), index=frame["seed"].to_numpy()).sort_index()
    return s[np.isfinite(s.to_numpy())]


def _sources(stratum, setting, frame, options, seed):
    present = [s for s in SOURCES if (frame["vary"] == s).any()]
    present += sorted(set(frame["vary"]) - set(SOURCES))
    values = {s: _by_seed(frame[frame["vary"] == s]) for s in present}
    full = values.get("all")
    records = []
    for source in present:
        x = values[source]
        rng = _rng(seed, "sources", stratum, setting, source)
        rec = {"stratum": stratum, **setting, "source": source, "n": int(x.size),
               "mean": float(x.mean()) if x.size else None, "sd": sd(x.to_numpy()),
               "sd_ci95": bootstrap_sd_ci(x.to_numpy(), rng, options.bootstrap),
               "ratio": None, "ratio_ci95": None, "paired": None, "brown_forsythe_p": None}
        reasons = [] if x.size >= 2 else ["fewer than 2 seeds: no SD"]
        if rec["sd"] == 0.0 and x.size >= 2:
            reasons.append("SD exactly 0: this source changes nothing here "
                           "(e.g. dropout masks at p = 0 are never drawn)")
        if source == "all":
            rec["summers"] = "reference"
        elif full is None:
            rec["summers"] = "not_computable"
            reasons.append("no vary: all runs in this setting: no full spread to compare with")
        else:
            reasons.append(_against_full(rec, x, full, rng, options))
        rec["reason"] = stats.join_reasons(*reasons)
        records.append(rec)
    singles = [r for r in records if r["source"] != "all"]
    for r, p in zip(singles, stats.holm([r["brown_forsythe_p"] for r in singles])):
        r["brown_forsythe_p_adjusted"] = p
        r["finding"] = _source_finding(r)
    records[0].setdefault("brown_forsythe_p_adjusted", None)
    if records[0]["source"] == "all":
        records[0]["finding"] = (f"All sources vary: SD {_pp(records[0]['sd']).lstrip('+')} "
                                 f"over {records[0]['n']} seeds (the reference spread).")
    return records, _source_summary(stratum, setting, values, singles)


def _against_full(rec: dict[str, Any], x: pd.Series, full: pd.Series, rng, options) -> str | None:
    paired = set(x.index) == set(full.index)
    a, b = (x.to_numpy(), full.loc[x.index].to_numpy()) if paired else (x.to_numpy(), full.to_numpy())
    rec["paired"] = paired
    if min(a.size, b.size) < stats.MIN_N:
        rec["summers"] = "not_computable"
        return f"fewer than {stats.MIN_N} seeds in this source or in 'all': no ratio or test"
    spread = stats.spread(a, b, paired, rng, options.bootstrap)
    rec["ratio"] = spread.ratio
    rec["ratio_ci95"] = list(spread.ratio_ci95) if spread.ratio_ci95 else None
    rec["brown_forsythe_p"] = spread.brown_forsythe.p
    rec["summers"] = summers_verdict(spread.ratio_ci95) if spread.ratio is not None \
        else "not_computable"
    return stats.join_reasons(spread.reason, spread.brown_forsythe.reason)


def _source_finding(r: dict[str, Any]) -> str:
    head = (f"Only {r['source']} varies: SD {_pp(r['sd']).lstrip('+')}, ratio to all sources "
            f"{_num(r['ratio'])} (95% CI "
            f"{_fmt_ci(r['ratio_ci95'], lambda v: f'{v:.2f}')})")
    text = {
        "consistent": f"consistent with {SUMMERS}: the CI contains 1 and excludes {LOW_RATIO}, "
                      "so this source alone is not shown to give less than the full spread and "
                      f"is shown to give more than {LOW_RATIO:g} of it",
        "smaller": "smaller than the full spread (the CI excludes 1), though not shown below "
                   f"{LOW_RATIO:g} of it: partly against {SUMMERS}",
        "much_smaller": f"less than {LOW_RATIO:g} of the full spread (the CI excludes both 1 "
                        f"and {LOW_RATIO:g}): against {SUMMERS}",
        "larger": "larger than the full spread (the CI lies above 1)",
        "inconclusive": f"inconclusive: the CI reaches both {LOW_RATIO:g} and 1; more seeds needed",
        "not_computable": "no ratio could be computed",
    }[r["summers"]]
    return f"{head}: {text}."


def _source_summary(stratum, setting, values, singles) -> dict[str, Any]:
    groups = [v.to_numpy() for v in values.values() if v.size > 0]
    omnibus = {"test": "brown_forsythe", "statistic": None, "p": None, "reason": None}
    if len(groups) < 2 or min(g.size for g in groups) < 2:
        omnibus["reason"] = "fewer than 2 sources with 2 or more seeds"
    elif all(stats.is_constant(g) for g in groups):
        omnibus["reason"] = "every source has zero spread: nothing to test"
    else:
        res = stats._quiet(sps.levene, *groups, center="median")
        omnibus["statistic"], omnibus["p"] = _finite(res.statistic), _finite(res.pvalue)
        if omnibus["p"] is None:
            omnibus["statistic"], omnibus["reason"] = None, "Brown-Forsythe not computable here"
    labels = [r["summers"] for r in singles]
    if not labels or any(x == "not_computable" for x in labels):
        agreement = "not_computable"
    elif all(x == "consistent" for x in labels):
        agreement = "agree"
    elif any(x in ("smaller", "much_smaller", "larger") for x in labels):
        agreement = "disagree"
    else:
        agreement = "inconclusive"
    detail = ", ".join(f"{r['source']}: {r['summers']}" for r in singles)
    finding = {
        "agree": f"The data agree with {SUMMERS}: each single source alone gives a spread "
                 f"whose SD-ratio CI contains 1 and excludes {LOW_RATIO:g} ({detail}).",
        "disagree": f"The data disagree with {SUMMERS} for at least one source ({detail}).",
        "inconclusive": f"Inconclusive against {SUMMERS}: no source is shown smaller or larger "
                        f"than the full spread, but not every CI excludes {LOW_RATIO:g} ({detail}).",
        "not_computable": f"No comparison with {SUMMERS} possible for every source ({detail}).",
    }[agreement]
    return {"stratum": stratum, **setting, "sources": list(values), "omnibus": omnibus,
            "agreement": agreement, "finding": finding,
            "reason": None if "all" in values else "no vary: all runs: ratios undefined"}


def _finite(v: Any) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


# ----------------------------------------------------------------------------- 4. keep rates


def keep_rates(first: pd.DataFrame) -> dict[str, Any]:
    """first: replicate-0 runs -> the `keep_rates` section."""
    cols = ["keep_rate1", "keep_rate2"]
    if first.empty or not np.isfinite(first[cols].to_numpy(dtype=float)).any():
        return _skip("no keep rates recorded (keep_rate1/keep_rate2 missing)")
    records = []
    for stratum, frame in _groups(first, ["implementation", *SETTING]):
        for layer in (1, 2):
            records.append(_keep_record(stratum, layer, frame[f"keep_rate{layer}"]))
    return {"applicable": True, "reason": None, "records": records}


def _keep_record(stratum: dict[str, Any], layer: int, rates: pd.Series) -> dict[str, Any]:
    impl, p = stratum["implementation"], float(stratum[f"dropout{layer}"])
    x = rates.to_numpy(dtype=float)
    n_missing = int((~np.isfinite(x)).sum())
    x = x[np.isfinite(x)]
    observed = float(x.mean()) if x.size else None
    nominal, expected = 1.0 - p, expected_keep_rate(impl, p)
    rescale = 1.0 / (1.0 - p) if p < 1 else None
    reasons = []
    if n_missing:
        reasons.append(f"{n_missing} run(s) without a recorded keep rate")
    if expected is None:
        reasons.append(f"unknown implementation {impl!r}: no expected keep rate")
    rec = {
        **stratum, "layer": layer, "p": p, "n": int(x.size), "observed": observed,
        "observed_sd": sd(x), "nominal": nominal, "expected": expected,
        "deviation": None if observed is None else observed - nominal,
        "matches_nominal": None if observed is None else abs(observed - nominal) <= KEEP_TOLERANCE,
        "matches_expected": None if observed is None or expected is None
        else abs(observed - expected) <= KEEP_TOLERANCE,
        "rescale": rescale,
        "activation_scale": None if observed is None or rescale is None else observed * rescale,
    }
    rec["finding"] = _keep_finding(rec)
    rec["reason"] = stats.join_reasons(*reasons)
    return rec


def _keep_finding(r: dict[str, Any]) -> str:
    where = f"{r['implementation']} at p = {r['p']:g} (layer {r['layer']})"
    if r["observed"] is None:
        return f"{where}: no keep rate recorded."
    text = f"{where} keeps {_pct(r['observed'], 1)} of live units against a nominal {_pct(r['nominal'], 1)}"
    if r["matches_nominal"]:
        return text + "."
    if r["implementation"] == "scratch-randn" and r["matches_expected"]:
        text += f" (P(N(0,1) > {r['p']:g}) = {_pct(r['expected'], 1)})"
    if r["rescale"] is not None:
        text += (f", yet rescales by 1/(1-p) = {r['rescale']:.2f}, so a live unit is multiplied "
                 f"by {r['activation_scale']:.2f} on average in training instead of 1")
    return text + "."


# ----------------------------------------------------------------------------- 4. equivalence


CLAIM = "the hand-written and the built-in (nn.Dropout) dropout perform about the same"


def implementations(first: pd.DataFrame, options: Analysis, seed: int) -> dict[str, Any]:
    """first: replicate-0 runs -> the `implementations` section (each one against torch)."""
    extra = {"reference": "torch", "margin": options.equivalence_margin, "claim": CLAIM}
    found = sorted(first["implementation"].dropna().unique())
    if "torch" not in found or len(found) < 2:
        return _skip(f"needs torch and another implementation; found {found or 'none'}", **extra)
    others = [c for c in STRATUM_COLUMNS if c != "implementation"]
    records = []
    for stratum, frame in _groups(first, others):
        family, comps = [], []
        for impl in [i for i in found if i != "torch"]:
            for setting, pairs in _groups(_pairs(frame, "implementation", impl, "torch"),
                                          list(SETTING)):
                rng = _rng(seed, "implementations", stratum, impl, setting)
                fields, comp, why = _paired(pairs, options, rng)
                family.append({"stratum": stratum, **setting, "implementation": impl,
                               "reference": "torch", **fields, "reason": why})
                comps.append(comp)
        _adjust(family, comps, options)
        records.extend(family)
    if not records:
        return _skip("no seed was run with torch and another implementation in the same cell",
                     **extra)
    for r in records:
        r["finding"] = _impl_finding(r, options.equivalence_margin)
    return {"applicable": True, "reason": None, **extra, "records": records}


def _impl_finding(r: dict[str, Any], margin: float) -> str:
    head = (f"{r['implementation']} vs torch at ({r['dropout1']:g}, {r['dropout2']:g}), "
            f"{r['n_pairs']} paired seeds: mean test-accuracy gap {_pp(r['mean_diff'])} (95% CI "
            f"{_fmt_ci(r['mean_diff_ci95'], _pp)})")
    tail = {
        "different": "different (Holm-adjusted t test)",
        "negligible": f"a real gap, shown to lie within \u00b1{100 * margin:.2f} pp (Holm-adjusted "
                      "t test and TOST): negligible",
        "equivalent": f"equivalent within \u00b1{100 * margin:.2f} pp (Holm-adjusted TOST)",
        "inconclusive": f"inconclusive: neither a difference nor equivalence within "
                        f"\u00b1{100 * margin:.2f} pp is shown",
    }[r["verdict"]]
    return f"{head}: {tail}."

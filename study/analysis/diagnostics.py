"""Repeatability and the lesson's side claims: replicates, determinism modes, thread counts, CPU
against GPU, sources of variance, and the hand-written dropout implementations.

    python -m study analyze protocols/determinism.yaml      (see results.json -> "diagnostics")

`analyze(table, options, seed)` turns a `RunTable` into `results_diagnostics.Diagnostics`, one
typed section per question (fields documented there); `analysis.analyze` stores it as
`Results.diagnostics`. This module computes numbers only: the report words them
(`study.report.diagnostics`). A value that cannot be computed is None and its record's
`reason` says why; a section with nothing to measure has `applicable` False and a `reason`.

- `replicates`: replicate k > 0 of a cell against its replicate 0, per (device, determinism,
  execution, threads): shares of identical weight hashes (Clopper-Pearson), the largest gaps,
  and the pooled within-cell (nondeterminism) variance against the seed-to-seed variance.
- `modes`: each determinism mode against "default" (else the first), replicate-0 runs paired
  by cell; paired t test and TOST, Holm over the modes of one device / execution.
- `threads`: the same cells at two thread counts: does the count change the bits.
- `devices`: cuda against cpu, paired by cell; Holm over all records.
- `variance_sources`: one random source varied at a time against all of them: SD, SD ratio
  with its bootstrap CI, Brown-Forsythe (Holm over the single sources of a setting), and how
  the ratio bears on Summers & Dinneen (ICML 2021) (`summers_verdict`).
- `keep_rates`: the measured share of kept units per implementation, setting and layer,
  against the nominal 1 - p and what the code draws.
- `implementations`: each implementation against torch, paired by seed; Holm per stratum.

Only replicate-0 runs enter every section except `replicates`.
"""

from __future__ import annotations

import itertools
import json
import math
import zlib
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps
from statsmodels.stats.proportion import proportion_confint

from study.analysis import stats
from study.protocol.schema import Analysis
from study.results.diagnostics import (DeviceRecord, DevicesSection, Diagnostics,
                                       ImplementationRecord, ImplementationsSection,
                                       KeepRatesSection, KeepRecord, MaxAbsDiff, ModeRecord,
                                       ModesSection, ReplicateRecord, ReplicatesSection, Section,
                                       SourceOmnibus, SourceRecord, SourcesSection, SourceSummary,
                                       ThreadRecord, ThreadsSection)
from study.analysis.table import STRATUM_COLUMNS, RunTable, scalar

METRIC = "test_acc"
METRICS = ("test_acc", "train_loss")
CELL = (*STRATUM_COLUMNS, "dropout1", "dropout2", "seed")
SETTING = ("dropout1", "dropout2")
SOURCES = ("all", "init", "data", "dropout", "bitflip")
# A single source whose SD ratio CI lies above this gives "about the full spread" in the sense
# tested here: the CI excludes half of the all-sources SD.
LOW_RATIO = 0.5
# Keep rates are averaged over millions of mask draws per run: a gap above one point is no
# sampling noise but a different mask law.
KEEP_TOLERANCE = 0.01
CLAIM = "the hand-written and the built-in (nn.Dropout) dropout perform about the same"


# ----------------------------------------------------------------------------- entry point


def analyze(table: RunTable, options: Analysis, seed: int = 0) -> Diagnostics:
    """RunTable -> Diagnostics. `seed` drives the bootstraps."""
    runs = _normalised(table.runs)
    first = runs[runs["replicate"] == 0]
    return Diagnostics(
        replicates=replicates(runs), modes=modes(first, options, seed),
        devices=devices(first, options, seed),
        variance_sources=variance_sources(first, options, seed), keep_rates=keep_rates(first),
        implementations=implementations(first, options, seed), threads=threads(first))


def _normalised(runs: pd.DataFrame) -> pd.DataFrame:
    # Rounded so 0.2 read back from MLflow as 0.20000000001 still names the same setting.
    return runs.assign(dropout1=runs["dropout1"].astype(float).round(6),
                       dropout2=runs["dropout2"].astype(float).round(6))


def _skip(cls: type[Section], reason: str, **extra: Any) -> Any:
    return cls(applicable=False, reason=reason, records=[], **extra)


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


def _interval(ci: Any) -> tuple[Any, Any] | None:
    """A (lo, hi) pair as a tuple of plain floats (None stays None): equal after a JSON round trip."""
    if ci is None:
        return None
    return tuple(None if v is None else _finite(v) for v in ci)


def _finite(v: Any) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def _agreement(stratum: dict[str, Any], pairs: pd.DataFrame, a: str, b: str) -> dict[str, Any]:
    """Pairs with columns `<col>{a}` and `<col>{b}` -> the `Agreement` fields, as keywords."""
    n_hash, n_same = hash_agreement(pairs[f"weights_sha256{a}"], pairs[f"weights_sha256{b}"])
    return {"stratum": stratum, "n_hash_compared": n_hash, "n_identical": n_same,
            "share_identical": n_same / n_hash if n_hash else None,
            "share_identical_ci95": share_ci(n_same, n_hash),
            "max_abs_diff": MaxAbsDiff(**{m: max_abs_diff(pairs[f"{m}{a}"], pairs[f"{m}{b}"])
                                          for m in METRICS})}


# ----------------------------------------------------------------------------- 1. replicates


REPLICATE_BY = ["device", "determinism", "execution", "threads"]


def replicates(runs: pd.DataFrame) -> ReplicatesSection:
    """runs: every run (replicates included) -> the `replicates` section."""
    if runs.empty or not (runs["replicate"] > 0).any():
        return _skip(ReplicatesSection, "no replicate runs: the protocol sets replicates to 1")
    records = [_replicate_record(stratum, frame)
               for stratum, frame in _groups(runs, REPLICATE_BY)
               if (frame["replicate"] > 0).any()]
    return ReplicatesSection(applicable=True, reason=None, records=records)


def _replicate_record(stratum: dict[str, Any], frame: pd.DataFrame) -> ReplicateRecord:
    keys = list(CELL)
    first = frame[frame["replicate"] == 0]
    later = frame[frame["replicate"] > 0]
    pairs = later.merge(first, on=keys, suffixes=("", "_first"), how="inner")
    missing = len(later) - len(pairs)
    agreement = _agreement(stratum, pairs, "", "_first")
    n_hash, n_same = agreement["n_hash_compared"], agreement["n_identical"]
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
    return ReplicateRecord(
        **agreement, n_cells=int(len(later[keys].drop_duplicates())),
        n_replicates=int(len(pairs)), n_missing_first=int(missing),
        nondeterminism_var=nd_var, nondeterminism_sd=_sqrt(nd_var), nondeterminism_df=nd_df,
        seed_var=seed_var, seed_sd=_sqrt(seed_var), seed_df=seed_df, variance_ratio=ratio,
        reason=stats.join_reasons(*reasons))


def _sqrt(v: float | None) -> float | None:
    return None if v is None else math.sqrt(v)


# ----------------------------------------------------------------------------- paired comparisons


Draft = tuple[dict[str, Any], stats.Comparison]  # a paired record's fields before Holm, its test


def _paired(stratum: dict[str, Any], pairs: pd.DataFrame, options: Analysis,
            rng: np.random.Generator) -> Draft:
    """Pairs (columns *_a, *_b) -> the `PairedRecord` fields of a against b but the adjusted
    ones, and the comparison they came from."""
    comp = stats.compare(pairs[f"{METRIC}_a"].to_numpy(dtype=float),
                         pairs[f"{METRIC}_b"].to_numpy(dtype=float), paired=True, rng=rng,
                         margin=options.equivalence_margin, alpha=options.alpha,
                         power=options.power, n_boot=options.bootstrap)
    agreement = _agreement(stratum, pairs, "_a", "_b")
    why = None if agreement["n_hash_compared"] else "no pair has weight hashes on both sides"
    return {**agreement, "n_pairs": int(len(pairs)), "mean_diff": comp.mean_diff,
            "mean_diff_ci95": _interval(comp.mean_diff_ci95), "test": comp.test, "p": comp.p,
            "tost_p": comp.tost_p, "mde": comp.mde, "seeds_needed": comp.seeds_needed,
            "reason": stats.join_reasons(why, comp.reason)}, comp


def _adjusted(family: list[Draft], options: Analysis) -> list[dict[str, Any]]:
    """Holm over one family of paired drafts, then the verdict of each."""
    p_adj = stats.holm([fields["p"] for fields, _ in family])
    tost_adj = stats.holm([fields["tost_p"] for fields, _ in family])
    return [{**fields, "p_adjusted": p, "tost_p_adjusted": t,
             "verdict": stats.verdict(p, t, options.alpha, comp.forced)}
            for (fields, comp), p, t in zip(family, p_adj, tost_adj)]


# ----------------------------------------------------------------------------- 2. modes


MODES_BY = ["device", "execution"]


def modes(first: pd.DataFrame, options: Analysis, seed: int) -> ModesSection:
    """first: replicate-0 runs -> the `modes` section."""
    found = sorted(first["determinism"].dropna().unique())
    if len(found) < 2:
        return _skip(ModesSection, f"one determinism mode only ({', '.join(found) or 'none'}): "
                     "nothing to compare", reference=None)
    reference = "default" if "default" in found else found[0]
    records = []
    for stratum, frame in _groups(first, MODES_BY):
        family = []
        for mode in [m for m in found if m != reference]:
            pairs = _pairs(frame, "determinism", mode, reference)
            if pairs.empty:
                continue
            fields, comp = _paired(stratum, pairs, options,
                                   _rng(seed, "modes", stratum, mode, reference))
            same = fields["n_hash_compared"] > 0 and \
                fields["n_identical"] == fields["n_hash_compared"] == fields["n_pairs"]
            family.append(({**fields, "mode": mode, "reference": reference,
                            "no_change_observed": same}, comp))
        records += [ModeRecord(**f) for f in _adjusted(family, options)]
    if not records:
        return _skip(ModesSection, "no cell was run under two determinism modes on the same "
                     "device", reference=reference)
    return ModesSection(applicable=True, reason=None, records=records, reference=reference)


# ----------------------------------------------------------------------------- 2. devices


def devices(first: pd.DataFrame, options: Analysis, seed: int) -> DevicesSection:
    """first: replicate-0 runs -> the `devices` section (cuda - cpu, paired by cell)."""
    found = sorted(first["device"].dropna().unique())
    if not {"cpu", "cuda"} <= set(found):
        return _skip(DevicesSection,
                     f"needs runs of the same cells on cpu and cuda; found {found or 'none'}")
    others = [c for c in STRATUM_COLUMNS if c != "device"]
    pairs_all = _pairs(first, "device", "cuda", "cpu")
    if pairs_all.empty:
        return _skip(DevicesSection, "no cell was run on both cpu and cuda")
    family = []
    for stratum, pairs in _groups(pairs_all, others + list(SETTING)):
        setting = {k: stratum.pop(k) for k in SETTING}
        fields, comp = _paired(stratum, pairs, options, _rng(seed, "devices", stratum, setting))
        family.append(({**fields, **setting}, comp))
    return DevicesSection(applicable=True, reason=None,
                          records=[DeviceRecord(**f) for f in _adjusted(family, options)])


# ----------------------------------------------------------------------------- threads


THREADS_BY = ["device", "determinism", "execution"]


def threads(first: pd.DataFrame) -> ThreadsSection:
    """first: replicate-0 runs -> the `threads` section (thread count a against b, by cell)."""
    counts = sorted({str(t) for t in first["threads"].dropna()}, key=_thread_order)
    if len(counts) < 2:
        return _skip(ThreadsSection,
                     f"needs the same cells at two thread counts; found {counts or 'none'}")
    records = []
    for a, b in itertools.combinations(counts, 2):
        for stratum, pairs in _groups(_pairs(first, "threads", a, b), THREADS_BY):
            agreement = _agreement(stratum, pairs, "_a", "_b")
            missing = len(pairs) - agreement["n_hash_compared"]
            records.append(ThreadRecord(
                **agreement, threads_a=a, threads_b=b, n_pairs=int(len(pairs)),
                reason=f"{missing} pair(s) without a recorded weight hash" if missing else None))
    if not records:
        return _skip(ThreadsSection, f"no cell was run at two of the thread counts {counts}")
    return ThreadsSection(applicable=True, reason=None, records=records)


def _thread_order(t: str) -> tuple[int, str]:
    return (int(t), t) if t.isdigit() else (1 << 30, t)


# ----------------------------------------------------------------------------- 3. sources


def variance_sources(first: pd.DataFrame, options: Analysis, seed: int) -> SourcesSection:
    """first: replicate-0 runs -> the `variance_sources` section."""
    if first.empty or set(first["vary"].dropna()) <= {"all"}:
        return _skip(SourcesSection, "every run varies all sources (vary: [all]): nothing to "
                     "compare", low_ratio=LOW_RATIO, summaries=[])
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
        return _skip(SourcesSection, "no setting was run with more than one `vary` source",
                     low_ratio=LOW_RATIO, summaries=[])
    return SourcesSection(applicable=True, reason=None, records=records, low_ratio=LOW_RATIO,
                          summaries=summaries)


def _by_seed(frame: pd.DataFrame) -> pd.Series:
    s = pd.Series(frame[METRIC].to_numpy(dtype=float), index=frame["seed"].to_numpy()).sort_index()
    return s[np.isfinite(s.to_numpy())]


def _sources(stratum, setting, frame, options, seed) -> tuple[list[SourceRecord], SourceSummary]:
    present = [s for s in SOURCES if (frame["vary"] == s).any()]
    present += sorted(set(frame["vary"]) - set(SOURCES))
    values = {s: _by_seed(frame[frame["vary"] == s]) for s in present}
    drafts = [_source_draft(stratum, setting, source, values, options, seed) for source in present]
    adjusted = iter(stats.holm([d["brown_forsythe_p"] for d in drafts if d["source"] != "all"]))
    records = [SourceRecord(**d, brown_forsythe_p_adjusted=None if d["source"] == "all"
                            else next(adjusted)) for d in drafts]
    return records, _source_summary(stratum, setting, values,
                                    [r for r in records if r.source != "all"])


def _source_draft(stratum, setting, source, values, options, seed) -> dict[str, Any]:
    """One source's SourceRecord fields but the Holm-adjusted p."""
    x, full = values[source], values.get("all")
    rng = _rng(seed, "sources", stratum, setting, source)
    draft = {"stratum": stratum, **setting, "source": source, "n": int(x.size),
             "mean": float(x.mean()) if x.size else None, "sd": sd(x.to_numpy()),
             "sd_ci95": _interval(bootstrap_sd_ci(x.to_numpy(), rng, options.bootstrap)),
             "ratio": None, "ratio_ci95": None, "paired": None, "brown_forsythe_p": None}
    reasons = [] if x.size >= 2 else ["fewer than 2 seeds: no SD"]
    if draft["sd"] == 0.0 and x.size >= 2:
        reasons.append("SD exactly 0: this source changes nothing here "
                       "(e.g. dropout masks at p = 0 are never drawn)")
    if source == "all":
        draft["summers"] = "reference"
    elif full is None:
        draft["summers"] = "not_computable"
        reasons.append("no vary: all runs in this setting: no full spread to compare with")
    else:
        against = _against_full(x, full, rng, options)
        reasons.append(against.pop("reason"))
        draft.update(against)
    return {**draft, "reason": stats.join_reasons(*reasons)}


def _against_full(x: pd.Series, full: pd.Series, rng, options) -> dict[str, Any]:
    """One source's spread against all sources: ratio, its CI, Brown-Forsythe, the Summers
    label, and a reason."""
    paired = set(x.index) == set(full.index)
    a, b = (x.to_numpy(), full.loc[x.index].to_numpy()) if paired else (x.to_numpy(), full.to_numpy())
    if min(a.size, b.size) < stats.MIN_N:
        return {"paired": paired, "summers": "not_computable",
                "reason": f"fewer than {stats.MIN_N} seeds in this source or in 'all': no ratio "
                          "or test"}
    spread = stats.spread(a, b, paired, rng, options.bootstrap)
    return {"paired": paired, "ratio": spread.ratio, "ratio_ci95": _interval(spread.ratio_ci95),
            "brown_forsythe_p": spread.brown_forsythe.p,
            "summers": summers_verdict(spread.ratio_ci95) if spread.ratio is not None
            else "not_computable",
            "reason": stats.join_reasons(spread.reason, spread.brown_forsythe.reason)}


def _source_summary(stratum, setting, values, singles: list[SourceRecord]) -> SourceSummary:
    return SourceSummary(stratum=stratum, **setting, sources=list(values),
                         omnibus=_sources_omnibus(values),
                         agreement=summers_agreement([r.summers for r in singles]),
                         reason=None if "all" in values else "no vary: all runs: ratios undefined")


def _sources_omnibus(values: dict[str, pd.Series]) -> SourceOmnibus:
    """Brown-Forsythe across every source of one setting."""
    groups = [v.to_numpy() for v in values.values() if v.size > 0]
    if len(groups) < 2 or min(g.size for g in groups) < 2:
        return SourceOmnibus("brown_forsythe", None, None,
                             "fewer than 2 sources with 2 or more seeds")
    if all(stats.is_constant(g) for g in groups):
        return SourceOmnibus("brown_forsythe", None, None,
                             "every source has zero spread: nothing to test")
    res = stats.quiet(sps.levene, *groups, center="median")
    p = _finite(res.pvalue)
    if p is None:
        return SourceOmnibus("brown_forsythe", None, None, "Brown-Forsythe not computable here")
    return SourceOmnibus("brown_forsythe", _finite(res.statistic), p, None)


def summers_agreement(labels: list[str]) -> str:
    """The single sources' `summers_verdict` labels -> agree (all consistent), disagree (one
    shown smaller or larger), inconclusive, or not_computable (none, or one without a ratio)."""
    if not labels or any(x == "not_computable" for x in labels):
        return "not_computable"
    if all(x == "consistent" for x in labels):
        return "agree"
    if any(x in ("smaller", "much_smaller", "larger") for x in labels):
        return "disagree"
    return "inconclusive"


# ----------------------------------------------------------------------------- 4. keep rates


def keep_rates(first: pd.DataFrame) -> KeepRatesSection:
    """first: replicate-0 runs -> the `keep_rates` section."""
    cols = ["keep_rate1", "keep_rate2"]
    if first.empty or not np.isfinite(first[cols].to_numpy(dtype=float)).any():
        return _skip(KeepRatesSection, "no keep rates recorded (keep_rate1/keep_rate2 missing)")
    records = []
    for stratum, frame in _groups(first, ["implementation", *SETTING]):
        for layer in (1, 2):
            records.append(_keep_record(stratum, layer, frame[f"keep_rate{layer}"]))
    return KeepRatesSection(applicable=True, reason=None, records=records)


def _keep_record(stratum: dict[str, Any], layer: int, rates: pd.Series) -> KeepRecord:
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
    return KeepRecord(
        **stratum, layer=layer, p=p, n=int(x.size), observed=observed, observed_sd=sd(x),
        nominal=nominal, expected=expected,
        deviation=None if observed is None else observed - nominal,
        matches_nominal=None if observed is None else abs(observed - nominal) <= KEEP_TOLERANCE,
        matches_expected=None if observed is None or expected is None
        else abs(observed - expected) <= KEEP_TOLERANCE,
        rescale=rescale,
        activation_scale=None if observed is None or rescale is None else observed * rescale,
        reason=stats.join_reasons(*reasons))


# ----------------------------------------------------------------------------- 4. equivalence


def implementations(first: pd.DataFrame, options: Analysis, seed: int) -> ImplementationsSection:
    """first: replicate-0 runs -> the `implementations` section (each one against torch)."""
    extra = {"reference": "torch", "margin": options.equivalence_margin, "claim": CLAIM}
    found = sorted(first["implementation"].dropna().unique())
    if "torch" not in found or len(found) < 2:
        return _skip(ImplementationsSection,
                     f"needs torch and another implementation; found {found or 'none'}", **extra)
    others = [c for c in STRATUM_COLUMNS if c != "implementation"]
    records = []
    for stratum, frame in _groups(first, others):
        family = []
        for impl in [i for i in found if i != "torch"]:
            for setting, pairs in _groups(_pairs(frame, "implementation", impl, "torch"),
                                          list(SETTING)):
                rng = _rng(seed, "implementations", stratum, impl, setting)
                fields, comp = _paired(stratum, pairs, options, rng)
                family.append(({**fields, **setting, "implementation": impl,
                                "reference": "torch"}, comp))
        records += [ImplementationRecord(**f) for f in _adjusted(family, options)]
    if not records:
        return _skip(ImplementationsSection, "no seed was run with torch and another "
                     "implementation in the same cell", **extra)
    return ImplementationsSection(applicable=True, reason=None, records=records, **extra)

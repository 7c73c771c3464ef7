"""Run table in, typed results out: the numbers behind every claim in the report.

    python -m study analyze protocols/d2l-dropout.yaml

`analyze` turns a `RunTable` into `results.Results` (the contract: docs/results.md); `write`
saves its JSON form as `results.json` plus flat CSV tables. Only first runs of a cell
(`replicate == 0`) enter the statistics: replicates repeat a seed exactly and measure
determinism, not seed-to-seed spread.

Runs are split into strata by `table.STRATUM_COLUMNS` and never pooled across them: a CPU and a
CUDA run of the same seed are different experiments. Within a stratum:

- Each setting is compared with the baseline on the seeds finite in both (paired), or by Welch
  when fewer than 3 seeds are shared; one missing run elsewhere does not unpair a comparison.
- The declared primary analysis is the protocol's `analysis.endpoint` under the t test. Every
  comparison is also run under the robustness set (endpoints `final`, `last:3`, `last:5` x the t
  test, a rank test with its Hodges-Lehmann interval and Yuen's 20%-trimmed test), each analysis
  its own Holm family. A comparison is `robust` when all give the primary's verdict.
- Verdicts are `different`, `negligible` (a real gap shown inside the margin), `equivalent` or
  `inconclusive`; never "no difference".
- Diverged runs are left out of the accuracy tests and counted: their rate is tested against
  the baseline's (Fisher's exact test, Holm over the stratum).

`results.diagnostics` holds `diagnostics.analyze(table, options, seed)`: replicates,
determinism modes, CPU against GPU, sources of variance, keep rates and implementation
equivalence (typed in `study/results_diagnostics.py`). `write` also saves each applicable
section's records as `diagnostics_<section>.csv` and returns those paths too, so they are logged.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from study.analysis import diagnostics, inference as mc_analysis, interaction, stats
from study.analysis.settings import (SETTING, Setting, by_seed, rows_of, setting_of,
                                     settings_in, with_settings)
from study.protocol.schema import Analysis
from study.results import (ROBUSTNESS_ENDPOINTS, ROBUSTNESS_TESTS, Analysed, Comparison, Curve,
                           CurvePoint, Endpoint, Group, Omnibus, Results, Stratum)
from study.analysis.table import CURVE_METRICS, D2L_FACTORS, STRATUM_COLUMNS, Columns, RunTable, scalar, stratum_label

class AnalysisError(ValueError):
    """The runs cannot be analysed as asked (e.g. an endpoint longer than the runs)."""
# ----------------------------------------------------------------------------- entry points


def analyze(table: RunTable, baseline: Sequence[Any], options: Analysis,
            seed: int = 0) -> Results:
    """RunTable -> Results (JSON form: `Results.to_json()`). `seed` drives every bootstrap.

    `baseline`: one value per factor of `table.columns` (for the d2l study (dropout1,
    dropout2)). A stratum without it gets a note and no comparisons; `check_baseline` refuses
    a baseline that no run has at all."""
    cols = table.columns
    runs = with_settings(table.runs[table.runs["replicate"] == 0], cols.factors)
    base = _typed(runs, baseline, cols)
    strata_by = [*STRATUM_COLUMNS, *cols.strata]
    _check_unique(runs, strata_by)
    primary = Endpoint.parse(options.endpoint)
    endpoints, left_out = _endpoints(runs, table.curves, primary, cols.metric)
    runs = _with_endpoints(runs, table.curves, endpoints, cols.metric)
    strata, groups, comparisons, contrasts, curves = [], [], [], [], []
    varying = _varying_columns(runs, strata_by)
    for stratum, frame in _strata(runs, strata_by):
        s, g, c, k = _analyze_stratum(stratum, frame, base, primary, endpoints, options, seed,
                                      stratum_label(stratum, varying), cols)
        strata.append(s)
        groups.extend(g)
        comparisons.extend(c)
        contrasts.extend(k)
        curves.extend(learning_curves(stratum, frame, table.curves, cols))
    # The diagnostics, C6 and C7 read the d2l study's own columns (the two rates, test
    # accuracy): under other names they are not analysed, and results.json says so ({}, [], null).
    d2l = cols.d2l
    return Results(
        experiment=table.experiment_name, baseline=list(base), alpha=options.alpha,
        equivalence_margin=options.equivalence_margin, power=options.power,
        bootstrap=options.bootstrap, seed=seed, metric=cols.metric, endpoint=primary.name,
        robustness_endpoints=[e.name for e in endpoints], robustness_tests=list(ROBUSTNESS_TESTS),
        endpoints_left_out=left_out, stratified_by=varying,
        n_runs=int(len(runs)), n_replicate_runs_ignored=int(len(table.runs) - len(runs)),
        strata=strata, groups=groups, comparisons=comparisons, contrasts=contrasts,
        diagnostics=diagnostics.analyze(table, options, seed) if d2l else None, curves=curves,
        inference=mc_analysis.analyze(_strata(runs, strata_by), options) if d2l else None,
        interactions=_interactions(runs, groups, comparisons, base, primary) if d2l else [],
        factors=list(cols.factors), seed_param=cols.seed, lower_is_better=cols.lower_is_better)


def check_baseline(table: RunTable, baseline: Sequence[Any]) -> None:
    """An AnalysisError naming the values present unless some first run has the baseline: a
    user's baseline that matches nothing is a wrong name, not a stratum without it."""
    cols = table.columns
    runs = with_settings(table.runs[table.runs["replicate"] == 0], cols.factors)
    base, present = _typed(runs, baseline, cols), settings_in(runs)
    for i, factor in enumerate(cols.factors):
        seen = sorted({s[i] for s in present})
        if base[i] not in seen:
            raise AnalysisError(f"baseline {factor}={baseline[i]}: no run has it; {factor} is "
                                f"{', '.join(map(_show, seen))} in these runs")
    if base not in present:
        raise AnalysisError(f"baseline {', '.join(map(_show, base))}: no run has this "
                            f"combination of {', '.join(cols.factors)}; settings with runs: "
                            + "; ".join(", ".join(map(_show, s)) for s in present))


PRIMARY = "endpoint:primary"  # the column `primary_strata` gives each run's primary endpoint in


def primary_strata(table: RunTable,
                   options: Analysis) -> list[tuple[dict[str, Any], pd.DataFrame]]:
    """Each stratum (the same dicts `analyze` gives its records) and its first runs, with their
    setting and primary endpoint (column PRIMARY; NaN for a diverged run): what a reader that
    decides on the primary endpoint by seed needs (study.analysis.looks)."""
    cols = table.columns
    runs = with_settings(table.runs[table.runs["replicate"] == 0], cols.factors)
    primary = Endpoint.parse(options.endpoint)
    runs = _with_endpoints(runs, table.curves, [primary], cols.metric)
    runs = runs.rename(columns={_column(primary): PRIMARY})
    return _strata(runs, [*STRATUM_COLUMNS, *cols.strata])


def _typed(runs: pd.DataFrame, baseline: Sequence[Any], cols: Columns) -> Setting:
    """The baseline as a Setting of the runs' factor types (numbers or strings)."""
    if len(baseline) != len(cols.factors):
        raise AnalysisError(f"baseline {','.join(map(str, baseline))}: expected one value per "
                            f"factor ({','.join(cols.factors)})")
    values = []
    for factor, value in zip(cols.factors, baseline):
        numeric = pd.api.types.is_numeric_dtype(runs[factor])
        try:
            values.append(float(value) if numeric else str(value))
        except (TypeError, ValueError):
            raise AnalysisError(f"baseline {factor}={value!r}: {factor} is a number in these "
                                "runs") from None
    return setting_of(*values)


def _show(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _interactions(runs: pd.DataFrame, groups: list[Group], comparisons: list[Comparison],
                  base: Setting, primary: Endpoint) -> list:
    return interaction.analyze(runs, groups, comparisons, base, _column(primary), primary.name)


def write(results: Results, table: RunTable, out_dir: Path) -> list[Path]:
    """Write results.json, groups.csv, comparisons.csv, contrasts.csv, multiverse.csv, runs.csv and the
    diagnostics CSVs (sorted by section) into out_dir; return every path written, in that order.

    Byte-identical for the same input: sorted JSON keys, fixed row order, '\\n' line ends."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = ("results.json", "groups.csv", "comparisons.csv", "contrasts.csv", "multiverse.csv",
             "runs.csv")
    paths = [out_dir / name for name in names]
    data = results.to_json()
    # allow_nan=False: a NaN reaching the JSON is a bug to surface, not a value to write.
    paths[0].write_text(json.dumps(data, sort_keys=True, indent=2, allow_nan=False) + "\n")
    _write_csv(_counts_as_int(pd.DataFrame([flatten(r) for r in data["groups"]])), paths[1])
    for records, path in ((data["comparisons"], paths[2]), (data["contrasts"], paths[3])):
        _write_csv(pd.DataFrame([flatten({k: v for k, v in r.items() if k != "multiverse"})
                                 for r in records]), path)
    rows = _multiverse_rows(data["comparisons"] + data["contrasts"])
    # Named columns, so an empty multiverse still writes its header; the stratum first.
    strata_by = [*STRATUM_COLUMNS, *table.columns.strata]
    _write_csv(pd.DataFrame(rows, columns=[*strata_by, *_MULTIVERSE_COLUMNS]), paths[4])
    _write_csv(_sorted_runs(table.runs, [*strata_by, *table.columns.factors]), paths[5])
    # Returned, not only written: the caller logs exactly this list to the MLflow analysis run.
    return paths + write_diagnostics(data.get("diagnostics") or {}, out_dir)


_MULTIVERSE_COLUMNS = ["setting", "dropout1", "dropout2", "baseline_dropout1",
                       "baseline_dropout2", "baseline",
                       "endpoint", "test", "verdict", "mean_diff", "ci95_lo", "ci95_hi",
                       "tost_ci90_lo", "tost_ci90_hi", "p_adjusted", "tost_p_adjusted", "paired",
                       "n_pairs"]


def _multiverse_rows(comparisons: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per comparison and robustness analysis, the stratum in its own columns."""
    return [{**c["stratum"], **{k: c[k] for k in ("dropout1", "dropout2")},
             "setting": setting_text(c["setting"]),
             **_baseline_columns(c["baseline"], c["dropout1"] is not None),
             **{k: v for k, v in flatten(m).items() if k in _MULTIVERSE_COLUMNS}}
            for c in comparisons for m in c["multiverse"]]


def write_diagnostics(diag: dict[str, Any], out_dir: Path) -> list[Path]:
    """Each diagnostics section with records -> out_dir/diagnostics_<section>.csv; a stale file
    of a section without records is removed. Returns the files written."""
    written = []
    for section, body in sorted(diag.items()):
        path = Path(out_dir) / f"diagnostics_{section}.csv"
        records = body.get("records") or []
        if not records:
            path.unlink(missing_ok=True)
            continue
        # A missing interval still gets its _lo/_hi columns, so every row has the same columns.
        rows = [flatten({k: [None, None] if v is None and k.endswith("ci95") else v
                         for k, v in r.items()}) for r in records]
        _write_csv(pd.DataFrame(rows), path)
        written.append(path)
    return written


# ----------------------------------------------------------------------------- strata


def _check_unique(runs: pd.DataFrame, strata_by: list[str]) -> None:
    keys = [*strata_by, SETTING, "seed"]
    dup = runs[runs.duplicated(keys, keep=False)]
    if len(dup):
        first = dup.iloc[0]
        raise AnalysisError(f"{len(dup)} runs share a setting and seed (and stratum), e.g. "
                            f"{ {k: first[k] for k in keys} }; each seed of a setting needs one "
                            "run (a param that tells them apart belongs in --factor)")


def _varying_columns(runs: pd.DataFrame, strata_by: list[str]) -> list[str]:
    return [c for c in strata_by if runs[c].nunique(dropna=False) > 1]


def _strata(runs: pd.DataFrame,
            strata_by: list[str] = list(STRATUM_COLUMNS)) -> list[tuple[dict[str, Any], pd.DataFrame]]:
    """Split by every stratum column (constant ones split nothing but are recorded)."""
    if runs.empty:
        return []
    out = []
    for values, frame in runs.groupby(strata_by, dropna=False, sort=True):
        out.append(({c: scalar(v) for c, v in zip(strata_by, values)}, frame))
    return out


def _pairs_by_seed(frame: pd.DataFrame, settings: list[Setting]) -> bool:
    seed_sets = {frozenset(rows_of(frame, s)["seed"]) for s in settings}
    return len(seed_sets) == 1


def _rng(seed: int, *keys: Any) -> np.random.Generator:
    # One stream per (stratum, setting): a group's bootstrap does not shift when others are added.
    return np.random.default_rng([seed, zlib.crc32(json.dumps(keys, default=str).encode())])


# ----------------------------------------------------------------------------- endpoints


def _column(endpoint: Endpoint) -> str:
    return f"endpoint:{endpoint.name}"


def _evaluated_epochs(runs: pd.DataFrame, curves: pd.DataFrame, metric: str) -> int:
    """The fewest evaluated epochs (steps of `metric`) of any finite run: how far back
    `last:K` can look."""
    finite = runs.loc[np.isfinite(runs[metric].to_numpy(dtype=float)), "run_id"]
    acc = curves[(curves["metric"] == metric) & curves["run_id"].isin(finite)]
    counts = acc.groupby("run_id")["epoch"].nunique()
    return int(counts.reindex(finite, fill_value=0).min()) if len(finite) else 0


def _endpoints(runs: pd.DataFrame, curves: pd.DataFrame, primary: Endpoint,
               metric: str) -> tuple[list[Endpoint], list[str]]:
    """The primary endpoint and the robustness set, minus those the runs are too short for."""
    wanted = sorted({primary, *(Endpoint.parse(e) for e in ROBUSTNESS_ENDPOINTS)})
    epochs = _evaluated_epochs(runs, curves, metric)
    kept = [e for e in wanted if e.k == 1 or e.k <= epochs]
    left_out = [f"{e.name} (only {epochs} evaluated epoch(s) in the shortest run)"
                for e in wanted if e not in kept]
    if primary not in kept:
        raise AnalysisError(f"analysis.endpoint {primary.name!r}: the runs have only {epochs} "
                            "evaluated epoch(s); choose final or last:K with K <= {epochs}"
                            .replace("{epochs}", str(epochs)))
    return kept, left_out


def _with_endpoints(runs: pd.DataFrame, curves: pd.DataFrame, endpoints: list[Endpoint],
                    metric: str) -> pd.DataFrame:
    """runs plus one column per endpoint, read from `metric`'s steps. Diverged runs (non-finite
    final value) stay NaN under every endpoint: their earlier epochs are not an outcome."""
    out = runs.copy()
    acc = curves[curves["metric"] == metric].sort_values(["run_id", "epoch"], kind="stable")
    finite = np.isfinite(out[metric].to_numpy(dtype=float))
    for e in endpoints:
        if e.k == 1:
            out[_column(e)] = np.where(finite, out[metric].to_numpy(dtype=float), np.nan)
            continue
        means = acc.groupby("run_id").tail(e.k).groupby("run_id")["value"].mean()
        out[_column(e)] = np.where(finite, out["run_id"].map(means).to_numpy(dtype=float), np.nan)
    return out


# ----------------------------------------------------------------------------- learning curves


def learning_curves(stratum: dict[str, Any], frame: pd.DataFrame, curves: pd.DataFrame,
                    cols: Columns = Columns()) -> list[Curve]:
    """frame: one stratum's first runs (with their settings); curves: `RunTable.curves` -> per
    setting and metric, the mean across runs at each epoch with its 95% t interval
    (`stats.mean_ci`). The d2l study's CURVE_METRICS, else the analysed metric's."""
    values = curves[curves["metric"].isin(cols.curve_metrics)]
    if values.empty:  # the common case in simulations: skip the join
        return []
    if SETTING not in frame:  # a caller's own frame of runs (analyze adds it once for all)
        frame = with_settings(frame, cols.factors)
    values = values.merge(frame[["run_id", SETTING]], on="run_id")
    values = values[np.isfinite(values["value"].to_numpy(dtype=float))]
    out = []
    for setting in sorted(set(values[SETTING])):
        for metric, rows in rows_of(values, setting).groupby("metric", sort=True):
            points = [_curve_point(int(epoch), v.to_numpy(dtype=float))
                      for epoch, v in rows.groupby("epoch", sort=True)["value"]]
            out.append(Curve(stratum=stratum, **_pair(setting, cols), metric=metric,
                             points=points, setting=list(setting)))
    return out


def _pair(setting: Setting, cols: Columns) -> dict[str, float | None]:
    """dropout1 and dropout2 of a record: the setting's values in the d2l study, else None."""
    d2l = cols.factors == D2L_FACTORS
    return {"dropout1": setting[0] if d2l else None, "dropout2": setting[1] if d2l else None}


def _curve_point(epoch: int, x: np.ndarray) -> CurvePoint:
    return CurvePoint(epoch=epoch, n=int(x.size), mean=float(x.mean()), ci95=stats.mean_ci(x))


# ----------------------------------------------------------------------------- one stratum


def _analyze_stratum(stratum: dict[str, Any], frame: pd.DataFrame, base: Setting,
                     primary: Endpoint, endpoints: list[Endpoint], options: Analysis,
                     seed: int, label: str, cols: Columns = Columns(),
                     ) -> tuple[Stratum, list[Group], list[Comparison], list[Comparison]]:
    settings = settings_in(frame)
    column = _column(primary)
    groups = [_group(frame, s, stratum, column, options, seed, cols) for s in settings]
    notes = []
    if base not in settings:
        notes.append(f"baseline {list(base)} has no runs in this stratum: no comparisons")
    pairs = [(s, base) for s in settings if s != base and base in settings]
    comparisons = _comparisons(frame, pairs, stratum, primary, endpoints, options, seed, cols)
    declared = [(setting_of(*a), setting_of(*b)) for a, b in options.contrasts]
    present = [(a, b) for a, b in declared if a in settings and b in settings]
    notes += [f"contrast {list(a)} against {list(b)}: a setting has no runs in this stratum"
              for a, b in declared if (a, b) not in present]
    contrasts = _comparisons(frame, present, stratum, primary, endpoints, options, seed, cols)
    complete = _pairs_by_seed(frame, settings)
    summary = Stratum(stratum=stratum, label=label, paired=complete,
                      n_seeds=int(frame["seed"].nunique()), settings=[list(s) for s in settings],
                      omnibus=_omnibus(frame, settings, complete, column), notes=notes)
    return summary, groups, comparisons, contrasts


def _omnibus(frame: pd.DataFrame, settings: list[Setting], paired: bool, column: str) -> Omnibus:
    if paired:
        matrix = pd.concat([by_seed(frame, s, column) for s in settings], axis=1).to_numpy()
        result = stats.friedman(matrix)
    else:
        result = stats.welch_anova([by_seed(frame, s, column).to_numpy() for s in settings])
    second = result.secondary
    return Omnibus(result.test, result.statistic, result.p, result.reason,
                   None if second is None else
                   Omnibus(second.test, second.statistic, second.p, second.reason))


def _group(frame: pd.DataFrame, setting: Setting, stratum: dict[str, Any], column: str,
           options: Analysis, seed: int, cols: Columns = Columns()) -> Group:
    rows = rows_of(frame, setting)
    acc = rows[column].to_numpy(dtype=float)
    desc = stats.describe(acc, _rng(seed, "group", stratum, setting), options.bootstrap)
    # The generalisation gap is train minus test accuracy: only where the metric is test_acc.
    gap = (rows["train_acc"].to_numpy(dtype=float) - rows["test_acc"].to_numpy(dtype=float)
           if cols.metric == "test_acc" else np.array([]))
    gap = gap[np.isfinite(gap)]
    reason = desc.reason
    if desc.n_dropped:
        excluded = f"{desc.n_dropped} diverged run(s) (non-finite {cols.metric}) excluded"
        reason = stats.join_reasons(excluded, reason)
    return Group(
        stratum=stratum, **_pair(setting, cols), setting=list(setting), n=desc.n,
        n_diverged=desc.n_dropped, mean=desc.mean, sd=desc.sd,
        sd_ci95=stats.sd_ci(acc[np.isfinite(acc)], _rng(seed, "sd", stratum, setting),
                            options.bootstrap),
        ci95=desc.ci95,
        ci95_boot=desc.ci95_boot, median=desc.median, iqr=desc.iqr,
        train_loss_mean=_finite_mean(rows["train_loss"]),
        train_acc_mean=_finite_mean(rows["train_acc"]),
        gap_mean=float(gap.mean()) if gap.size else None, gap_ci95=stats.mean_ci(gap),
        status_counts={str(k): int(v) for k, v in sorted(rows["status"].value_counts().items())},
        # `== True`, not astype(bool): a missing check (NaN) must not count as passed.
        textbook_check_passed=int((rows["textbook_check"] == True).sum()),  # noqa: E712
        n_excluded=desc.n_dropped, reason=reason)


def _finite_mean(values: pd.Series) -> float | None:
    x = values.to_numpy(dtype=float)
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else None


# ----------------------------------------------------------------------------- comparisons


@dataclass(frozen=True)
class Sample:
    """What one comparison tests under one endpoint: paired arrays over the seeds finite in both
    groups when at least MIN_N are shared, else each group's finite values (Welch)."""

    x: np.ndarray
    y: np.ndarray
    paired: bool
    n_pairs: int
    note: str | None


def _sample(frame: pd.DataFrame, setting: Setting, base: Setting, column: str) -> Sample:
    x, y = by_seed(frame, setting, column), by_seed(frame, base, column)
    x, y = x[np.isfinite(x.to_numpy())], y[np.isfinite(y.to_numpy())]
    common = x.index.intersection(y.index)
    if len(common) >= stats.MIN_N:
        unmatched = len(x.index.union(y.index)) - len(common)
        note = f"{unmatched} finite run(s) without a partner seed left out of the pairing" \
            if unmatched else None
        return Sample(x.loc[common].to_numpy(), y.loc[common].to_numpy(), True, len(common), note)
    note = (f"only {len(common)} seed(s) finite in both groups: unpaired (Welch)"
            if len(x) and len(y) else None)
    return Sample(x.to_numpy(), y.to_numpy(), False, 0, note)


Pair = tuple[Setting, Setting]  # (setting, reference): the gap is setting - reference


@dataclass(frozen=True)
class Family:
    """One Holm family of comparisons in a stratum, analysed together: the baseline
    comparisons, or the declared contrasts (a family of their own, so declaring a contrast
    never moves a baseline comparison's p-values)."""

    pairs: list[Pair]
    samples: dict[Endpoint, list[Sample]]
    verse: dict[tuple[str, str], list[Cell]]
    main: list[stats.Comparison]
    divergence: list[Divergence]
    variance_adjusted: list[float | None]
    divergence_adjusted: list[float | None]
    tost_multipliers: list[int | None]


def _family(frame: pd.DataFrame, pairs: list[Pair], stratum: dict[str, Any], primary: Endpoint,
            endpoints: list[Endpoint], options: Analysis, seed: int, cols: Columns) -> Family:
    samples = {e: [_sample(frame, s, ref, _column(e)) for s, ref in pairs] for e in endpoints}
    verse = _multiverse(samples, options, on_test_grid=cols.metric == "test_acc")
    main = [_primary(sample, options, _rng(seed, "comparison", stratum, s, ref))
            for sample, (s, ref) in zip(samples[primary], pairs)]
    divergence = [_divergence(frame, s, ref) for s, ref in pairs]
    return Family(pairs, samples, verse, main, divergence,
                  stats.holm([c.brown_forsythe_p for c in main]),
                  stats.holm([d.p for d in divergence]),
                  _holm_multipliers([cell.location.tost_p for cell in verse[(primary.name, "t")]]))


def _comparisons(frame: pd.DataFrame, pairs: list[Pair], stratum: dict[str, Any],
                 primary: Endpoint, endpoints: list[Endpoint], options: Analysis,
                 seed: int, cols: Columns = Columns()) -> list[Comparison]:
    if not pairs:
        return []
    fam = _family(frame, pairs, stratum, primary, endpoints, options, seed, cols)
    return [_record(fam, i, stratum, primary, options, cols) for i in range(len(pairs))]


def _record(fam: Family, i: int, stratum: dict[str, Any], primary: Endpoint,
            options: Analysis, cols: Columns) -> Comparison:
    (s, ref), sample, c, div = fam.pairs[i], fam.samples[primary][i], fam.main[i], fam.divergence[i]
    first, rank = fam.verse[(primary.name, "t")][i], fam.verse[(primary.name, "rank")][i]
    robust, disagreeing = _robustness({k: v[i].entry for k, v in fam.verse.items()},
                                      (primary.name, "t"))
    k = fam.tost_multipliers[i]
    level = stats.tost_level(options.alpha, k) if k is not None else None
    # `compare` already ran the power analysis (with the margin); only groups too small for it
    # to test still get their seed counts here.
    pw = c.power or stats.power_analysis(first.location.estimate or 0.0, _sd(sample),
                                         sample.x.size, sample.y.size, sample.paired,
                                         options.alpha, options.power, options.equivalence_margin)
    return Comparison(
        stratum=stratum, **_pair(s, cols), setting=list(s), baseline=list(ref),
        endpoint=primary.name, n=c.n, n_setting=c.n_setting, n_baseline=c.n_baseline,
        n_dropped=div.n_setting_diverged + div.n_base_diverged,
        paired=sample.paired, n_pairs=sample.n_pairs,
        mean_diff=c.mean_diff, mean_diff_ci95=c.mean_diff_ci95, test=c.test,
        p=first.location.p, p_adjusted=first.entry.p_adjusted,
        rank_test=rank.location.test, rank_p=rank.location.p,
        rank_p_adjusted=rank.entry.p_adjusted,
        hedges_g=c.hedges_g, prob_superiority=c.prob_superiority,
        tost_p=first.location.tost_p, tost_p_adjusted=first.entry.tost_p_adjusted,
        tost_ci90=first.location.ci90,
        tost_ci=(stats.location_ci("t", sample.x, sample.y, paired=sample.paired, level=level)
                 if level is not None else None),
        tost_ci_level=level, verdict=first.entry.verdict,
        settled_by_construction=first.location.forced is not None,
        robust=robust, disagreeing=disagreeing,
        multiverse=[cells[i].entry for cells in fam.verse.values()],
        sd_ratio=c.variance_ratio, sd_ratio_ci95=c.variance_ratio_ci95,
        brown_forsythe_p=c.brown_forsythe_p, fligner_p=c.fligner_p,
        variance_p_adjusted=fam.variance_adjusted[i],
        variance_verdict=stats.variance_verdict(fam.variance_adjusted[i], options.alpha),
        mde=pw.mde, seeds_needed=pw.seeds_needed, seeds_needed_margin=pw.seeds_needed_margin,
        seeds_needed_equivalence=pw.seeds_needed_equivalence,
        n_diverged_setting=div.n_setting_diverged, n_diverged_baseline=div.n_base_diverged,
        divergence_p=div.p, divergence_p_adjusted=fam.divergence_adjusted[i],
        divergence_verdict=stats.variance_verdict(fam.divergence_adjusted[i], options.alpha),
        reason=stats.join_reasons(sample.note, div.note, first.location.reason, c.reason,
                                  pw.reason))


def _sd(sample: Sample) -> float:
    """SD of the paired differences, or the pooled SD: the scale power is computed on."""
    if sample.x.size < 2 or sample.y.size < 2:
        return 0.0
    if sample.paired:
        return float((sample.x - sample.y).std(ddof=1))
    return stats.pooled_sd(sample.x, sample.y)


def _primary(sample: Sample, options: Analysis, rng: np.random.Generator) -> stats.Comparison:
    """The descriptive extras of the primary analysis: interval, effect sizes, spread."""
    return stats.compare(sample.x, sample.y, paired=sample.paired, rng=rng,
                         margin=options.equivalence_margin, alpha=options.alpha,
                         power=options.power, n_boot=options.bootstrap)


@dataclass(frozen=True)
class Divergence:
    n_setting_diverged: int
    n_base_diverged: int
    p: float | None
    note: str | None


def _divergence(frame: pd.DataFrame, setting: Setting, base: Setting) -> Divergence:
    """Diverged runs are left out of the accuracy test but counted here, so a setting that
    often blows up is not made to look as good as one that never does."""
    a, b = rows_of(frame, setting), rows_of(frame, base)
    da, db = int((a["status"] == "diverged").sum()), int((b["status"] == "diverged").sum())
    test = stats.divergence(da, len(a), db, len(b))
    note = (f"{da} diverged run(s) of the setting and {db} of the baseline excluded from the "
            "accuracy test" if da or db else None)
    return Divergence(da, db, test.p if (da or db) else None, note)


@dataclass(frozen=True)
class Cell:
    """One comparison under one (endpoint, test): the location result and its verdict."""

    location: stats.Location
    entry: Analysed


def _multiverse(samples: dict[Endpoint, list[Sample]], options: Analysis,
                on_test_grid: bool = True) -> dict[tuple[str, str], list[Cell]]:
    """Every (endpoint, test) analysis of every comparison, each its own Holm family.
    on_test_grid: the values are test accuracies on the 10,000-image test set (`Endpoint.grid`);
    another metric's resolution is unknown, so its rank tests round nothing."""
    out = {}
    for endpoint, row in samples.items():
        grid = endpoint.grid if on_test_grid else None
        for test in ROBUSTNESS_TESTS:
            locs = [stats.location(test, s.x, s.y, paired=s.paired,
                                   margin=options.equivalence_margin, grid=grid)
                    if min(s.x.size, s.y.size) >= stats.MIN_N else None for s in row]
            p_adj = stats.holm([loc.p if loc else None for loc in locs])
            t_adj = stats.holm([loc.tost_p if loc else None for loc in locs])
            out[(endpoint.name, test)] = [
                _cell(endpoint, test, s, loc, p, t, options.alpha)
                for s, loc, p, t in zip(row, locs, p_adj, t_adj)]
    return out


def _cell(endpoint: Endpoint, test: str, sample: Sample, loc: stats.Location | None,
          p_adj: float | None, tost_adj: float | None, alpha: float) -> Cell:
    if loc is None:
        loc = stats.Location(test, "", None, None, None, None, None,
                             reason=f"fewer than {stats.MIN_N} finite runs per group")
    verdict = stats.verdict(p_adj, tost_adj, alpha, loc.forced)
    return Cell(loc, Analysed(endpoint=endpoint.name, test=test, verdict=verdict,
                              mean_diff=loc.estimate, p_adjusted=p_adj, tost_p_adjusted=tost_adj,
                              paired=sample.paired, n_pairs=sample.n_pairs, ci95=loc.ci95,
                              tost_ci90=loc.ci90))


def _robustness(verdicts: dict[tuple[str, str], Analysed],
                primary: tuple[str, str]) -> tuple[bool | None, list[str]]:
    """Robust when every analysis gives the primary's verdict (and, for `different`, the same
    sign); otherwise the analyses that disagree, named "endpoint/test: verdict"."""
    main = verdicts[primary]
    def agrees(a: Analysed) -> bool:
        if a.verdict != main.verdict:
            return False
        return a.verdict != "different" or np.sign(a.mean_diff or 0) == np.sign(main.mean_diff or 0)
    others = [a for a in verdicts.values() if a is not main]
    if not others:
        return None, []
    off = [f"{a.endpoint}/{a.test}: {a.verdict}" for a in others if not agrees(a)]
    return not off, off


def _holm_multipliers(p: list[float | None]) -> list[int | None]:
    """Holm's multiplier (m - rank) for each p-value; None stays None and is not counted."""
    idx = sorted((i for i, v in enumerate(p) if v is not None), key=lambda i: p[i])
    out: list[int | None] = [None] * len(p)
    for rank, i in enumerate(idx):
        out[i] = len(idx) - rank
    return out


# ----------------------------------------------------------------------------- output helpers


def setting_text(values: list[Any]) -> str:
    """A setting in one CSV cell: its factor values joined by ' / '."""
    return " / ".join(str(v) for v in values)


def _baseline_columns(baseline: list[Any], d2l: bool) -> dict[str, Any]:
    """The d2l pair as baseline_dropout1/2 (as before); any other baseline as one cell."""
    if d2l:
        return {"baseline_dropout1": baseline[0], "baseline_dropout2": baseline[1]}
    return {"baseline": setting_text(baseline)}


def flatten(record: dict[str, Any]) -> dict[str, Any]:
    """One results record -> one CSV row: stratum dict into its columns, [lo, hi] lists into
    `_lo`/`_hi`, the baseline into `baseline_dropout1/2` (other baselines and every setting
    into one ' / '-joined cell), other dicts into `key_sub`."""
    row: dict[str, Any] = {}
    for key, value in record.items():
        if key == "stratum":
            row.update(value)
        elif key == "baseline":
            row.update(_baseline_columns(value, record.get("dropout1") is not None))
        elif key == "setting":
            row[key] = setting_text(value)
        elif isinstance(value, dict):
            row.update({f"{key}_{k}": v for k, v in value.items()})
        elif isinstance(value, (list, tuple)) and len(value) == 2:
            row[f"{key}_lo"], row[f"{key}_hi"] = value
        elif value is None and key in _INTERVALS:
            row[f"{key}_lo"] = row[f"{key}_hi"] = None
        elif isinstance(value, (list, tuple)):
            row[key] = "; ".join(map(str, value))
        else:
            row[key] = value
    return row


# Interval-valued fields that may be None: they still get their _lo/_hi columns.
_INTERVALS = ("ci95", "ci95_boot", "iqr", "gap_ci95", "mean_diff_ci95", "variance_ratio_ci95",
              "sd_ratio_ci95", "tost_ci90", "tost_ci")


def _counts_as_int(frame: pd.DataFrame) -> pd.DataFrame:
    # A status absent from a group is a count of 0, not a missing value (which prints as 10.0).
    cols = [c for c in frame.columns if c.startswith("status_counts_")]
    frame[cols] = frame[cols].fillna(0).astype(int)
    return frame


def _sorted_runs(runs: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    keys = [*keys, "seed", "replicate"]
    return runs.sort_values(keys, kind="stable").reset_index(drop=True)


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    frame.to_csv(path, index=False, lineterminator="\n")

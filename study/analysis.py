"""Run table in, statistical results out: the numbers behind every claim in the report.

    python -m study analyze protocols/d2l-dropout.yaml

`analyze` turns a `RunTable` into one JSON-able dict (schema below); `write` saves it as
`results.json` plus flat CSV tables. Only first runs of a cell (`replicate == 0`) enter the
statistics: replicates repeat a seed exactly and measure determinism, not seed-to-seed spread.

Runs are split into strata by `table.STRATUM_COLUMNS` and never pooled across them: a CPU and a
CUDA run of the same seed are different experiments. Within a stratum the settings "pair by
seed" when every setting has the same set of seeds; then each comparison uses the seeds finite
in both groups. Each stratum's comparisons against the baseline form one Holm family per
p-value kind (mean, rank, TOST, variance).

`results["diagnostics"]` holds `diagnostics.analyze(table, options, seed)`: replicates,
determinism modes, CPU against GPU, sources of variance, keep rates and implementation
equivalence (schema in `study/diagnostics.py`). `write` also saves each applicable section's
records as `diagnostics_<section>.csv` and returns those paths too, so they are logged.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from study import diagnostics, stats
from study.protocol import Analysis
from study.table import STRATUM_COLUMNS, RunTable, jsonable, scalar

METRIC = "test_acc"
Setting = tuple[float, float]


# ----------------------------------------------------------------------------- entry points


def analyze(table: RunTable, baseline: tuple[float, float], options: Analysis,
            seed: int = 0) -> dict[str, Any]:
    """RunTable -> results dict (JSON-able, no NaN). `seed` drives every bootstrap."""
    base = _setting(*baseline)
    runs = table.runs[table.runs["replicate"] == 0]
    _check_unique(runs)
    strata, groups, comparisons = [], [], []
    for stratum, frame in _strata(runs):
        s, g, c = _analyze_stratum(stratum, frame, base, options, seed)
        strata.append(s)
        groups.extend(g)
        comparisons.extend(c)
    results = jsonable({
        "experiment": table.experiment_name, "baseline": list(base), "alpha": options.alpha,
        "equivalence_margin": options.equivalence_margin, "power": options.power,
        "bootstrap": options.bootstrap, "seed": seed, "metric": METRIC,
        "stratified_by": _varying_columns(runs),
        "n_runs": int(len(runs)), "n_replicate_runs_ignored": int(len(table.runs) - len(runs)),
        "strata": strata, "groups": groups, "comparisons": comparisons,
    })
    results["diagnostics"] = diagnostics.analyze(table, options, seed)
    return results


def write(results: dict[str, Any], table: RunTable, out_dir: Path) -> list[Path]:
    """Write results.json, groups.csv, comparisons.csv, runs.csv and the diagnostics CSVs
    (sorted by section) into out_dir; return every path written, in that order.

    Byte-identical for the same input: sorted JSON keys, fixed row order, '\\n' line ends."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / name for name in ("results.json", "groups.csv", "comparisons.csv", "runs.csv")]
    # allow_nan=False: a NaN reaching the JSON is a bug to surface, not a value to write.
    paths[0].write_text(json.dumps(results, sort_keys=True, indent=2, allow_nan=False) + "\n")
    _write_csv(_counts_as_int(pd.DataFrame([flatten(r) for r in results["groups"]])), paths[1])
    _write_csv(pd.DataFrame([flatten(r) for r in results["comparisons"]]), paths[2])
    _write_csv(_sorted_runs(table.runs), paths[3])
    # Returned, not only written: the caller logs exactly this list to the MLflow analysis run.
    return paths + write_diagnostics(results.get("diagnostics") or {}, out_dir)


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


def _setting(d1: float, d2: float) -> Setting:
    # Rounded so 0.2 read back from MLflow as 0.20000000001 still names the same setting.
    return (round(float(d1), 6), round(float(d2), 6))


def _check_unique(runs: pd.DataFrame) -> None:
    keys = [*STRATUM_COLUMNS, "dropout1", "dropout2", "seed"]
    dup = runs[runs.duplicated(keys, keep=False)]
    if len(dup):
        first = dup.iloc[0]
        raise ValueError(f"{len(dup)} runs share a cell with replicate 0, e.g. "
                         f"{ {k: first[k] for k in keys} }; the run table should hold one per cell")


def _varying_columns(runs: pd.DataFrame) -> list[str]:
    return [c for c in STRATUM_COLUMNS if runs[c].nunique(dropna=False) > 1]


def _strata(runs: pd.DataFrame) -> list[tuple[dict[str, Any], pd.DataFrame]]:
    """Split by every stratum column (constant ones split nothing but are recorded)."""
    if runs.empty:
        return []
    out = []
    for values, frame in runs.groupby(list(STRATUM_COLUMNS), dropna=False, sort=True):
        out.append(({c: scalar(v) for c, v in zip(STRATUM_COLUMNS, values)}, frame))
    return out


def _label(stratum: dict[str, Any]) -> str:
    return " / ".join(str(stratum[c]) for c in STRATUM_COLUMNS)


def _settings(frame: pd.DataFrame) -> list[Setting]:
    pairs = {_setting(a, b) for a, b in zip(frame["dropout1"], frame["dropout2"])}
    return sorted(pairs)


def _rows(frame: pd.DataFrame, setting: Setting) -> pd.DataFrame:
    keys = [_setting(a, b) for a, b in zip(frame["dropout1"], frame["dropout2"])]
    return frame[[k == setting for k in keys]]


def _by_seed(frame: pd.DataFrame, setting: Setting, column: str = METRIC) -> pd.Series:
    rows = _rows(frame, setting)
    return pd.Series(rows[column].to_numpy(dtype=float), index=rows["seed"].to_numpy()).sort_index()


def _pairs_by_seed(frame: pd.DataFrame, settings: list[Setting]) -> bool:
    seed_sets = {frozenset(_rows(frame, s)["seed"]) for s in settings}
    return len(seed_sets) == 1


def _rng(seed: int, *keys: Any) -> np.random.Generator:
    # One stream per (stratum, setting): a group's bootstrap does not shift when others are added.
    return np.random.default_rng([seed, zlib.crc32(json.dumps(keys, default=str).encode())])


# ----------------------------------------------------------------------------- one stratum


def _analyze_stratum(stratum: dict[str, Any], frame: pd.DataFrame, base: Setting,
                     options: Analysis, seed: int) -> tuple[dict, list[dict], list[dict]]:
    settings = _settings(frame)
    paired = _pairs_by_seed(frame, settings)
    groups = [_group(frame, s, stratum, options, seed) for s in settings]
    notes = []
    if base not in settings:
        notes.append(f"baseline {list(base)} has no runs in this stratum: no comparisons")
        comparisons = []
    else:
        others = [s for s in settings if s != base]
        comparisons = _comparisons(frame, others, base, paired, stratum, options, seed)
    summary = {
        "stratum": stratum, "label": _label(stratum), "paired": paired,
        "n_seeds": int(frame["seed"].nunique()), "settings": [list(s) for s in settings],
        "omnibus": _omnibus(frame, settings, paired), "notes": notes,
    }
    return summary, groups, comparisons


def _omnibus(frame: pd.DataFrame, settings: list[Setting], paired: bool) -> dict[str, Any]:
    if paired:
        matrix = pd.concat([_by_seed(frame, s) for s in settings], axis=1).to_numpy()
        result = stats.friedman(matrix)
    else:
        result = stats.welch_anova([_by_seed(frame, s).to_numpy() for s in settings])
    secondary = result.secondary
    return {
        "test": result.test, "statistic": result.statistic, "p": result.p, "reason": result.reason,
        "secondary": None if secondary is None else {
            "test": secondary.test, "statistic": secondary.statistic, "p": secondary.p,
            "reason": secondary.reason},
    }


def _group(frame: pd.DataFrame, setting: Setting, stratum: dict[str, Any], options: Analysis,
           seed: int) -> dict[str, Any]:
    rows = _rows(frame, setting)
    acc = rows[METRIC].to_numpy(dtype=float)
    desc = stats.describe(acc, _rng(seed, "group", stratum, setting), options.bootstrap)
    gap = (rows["train_acc"].to_numpy(dtype=float) - acc)
    gap = gap[np.isfinite(gap)]
    reason = desc.reason
    if desc.n_dropped:
        excluded = f"{desc.n_dropped} diverged run(s) (non-finite {METRIC}) excluded"
        reason = stats.join_reasons(excluded, reason)
    return {
        "stratum": stratum, "dropout1": setting[0], "dropout2": setting[1],
        "n": desc.n, "mean": desc.mean, "sd": desc.sd, "ci95": desc.ci95,
        "ci95_boot": desc.ci95_boot, "median": desc.median, "iqr": desc.iqr,
        "train_loss_mean": _finite_mean(rows["train_loss"]),
        "train_acc_mean": _finite_mean(rows["train_acc"]),
        "gap_mean": float(gap.mean()) if gap.size else None, "gap_ci95": stats.mean_ci(gap),
        "status_counts": {str(k): int(v) for k, v in sorted(rows["status"].value_counts().items())},
        # `== True`, not astype(bool): a missing check (NaN) must not count as passed.
        "textbook_check_passed": int((rows["textbook_check"] == True).sum()),  # noqa: E712
        "n_excluded": desc.n_dropped, "reason": reason,
    }


def _finite_mean(values: pd.Series) -> float | None:
    x = values.to_numpy(dtype=float)
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else None


# ----------------------------------------------------------------------------- comparisons


def _aligned(frame: pd.DataFrame, setting: Setting, base: Setting) -> tuple[np.ndarray, np.ndarray, int]:
    """Paired arrays over the seeds both groups have; the count of seeds only one group has."""
    x, y = _by_seed(frame, setting), _by_seed(frame, base)
    common = x.index.intersection(y.index)
    unmatched = len(x.index.union(y.index)) - len(common)
    return x.loc[common].to_numpy(), y.loc[common].to_numpy(), unmatched


def _compare_one(frame: pd.DataFrame, setting: Setting, base: Setting, paired: bool,
                 stratum: dict[str, Any], options: Analysis, seed: int
                 ) -> tuple[stats.Comparison, str | None]:
    rng = _rng(seed, "comparison", stratum, setting, base)
    kwargs = dict(rng=rng, margin=options.equivalence_margin, alpha=options.alpha,
                  power=options.power, n_boot=options.bootstrap)
    if not paired:
        return stats.compare(_by_seed(frame, setting).to_numpy(), _by_seed(frame, base).to_numpy(),
                             paired=False, **kwargs), None
    x, y, unmatched = _aligned(frame, setting, base)
    note = f"{unmatched} seed(s) not in both groups dropped" if unmatched else None
    return stats.compare(x, y, paired=True, **kwargs), note


def _comparisons(frame: pd.DataFrame, others: list[Setting], base: Setting, paired: bool,
                 stratum: dict[str, Any], options: Analysis, seed: int) -> list[dict[str, Any]]:
    done = [_compare_one(frame, s, base, paired, stratum, options, seed) for s in others]
    results = [c for c, _ in done]
    # One Holm family per p-value kind within the stratum.
    adj = {key: stats.holm([getattr(c, key) for c in results])
           for key in ("p", "rank_p", "tost_p", "brown_forsythe_p")}
    return [_comparison_record(s, base, stratum, c, note, {k: v[i] for k, v in adj.items()}, options)
            for i, (s, (c, note)) in enumerate(zip(others, done))]


def _comparison_record(setting: Setting, base: Setting, stratum: dict[str, Any],
                       c: stats.Comparison, note: str | None, adj: dict[str, float | None],
                       options: Analysis) -> dict[str, Any]:
    return {
        "stratum": stratum, "dropout1": setting[0], "dropout2": setting[1], "baseline": list(base),
        "n": c.n, "n_setting": c.n_setting, "n_baseline": c.n_baseline, "n_dropped": c.n_dropped,
        "paired": c.paired, "mean_diff": c.mean_diff, "mean_diff_ci95": c.mean_diff_ci95,
        "test": c.test, "p": c.p, "p_adjusted": adj["p"],
        "rank_test": c.rank_test, "rank_p": c.rank_p, "rank_p_adjusted": adj["rank_p"],
        "hedges_g": c.hedges_g, "prob_superiority": c.prob_superiority,
        "tost_p": c.tost_p, "tost_p_adjusted": adj["tost_p"],
        "verdict": stats.verdict(adj["p"], adj["tost_p"], options.alpha, c.forced),
        "variance_ratio": c.variance_ratio, "variance_ratio_ci95": c.variance_ratio_ci95,
        "brown_forsythe_p": c.brown_forsythe_p, "fligner_p": c.fligner_p,
        "variance_p_adjusted": adj["brown_forsythe_p"],
        "variance_verdict": stats.variance_verdict(adj["brown_forsythe_p"], options.alpha),
        "mde": c.mde, "seeds_needed": c.seeds_needed,
        "reason": stats.join_reasons(note, c.reason),
    }


# ----------------------------------------------------------------------------- output helpers


def flatten(record: dict[str, Any]) -> dict[str, Any]:
    """One results record -> one CSV row: stratum dict into its columns, [lo, hi] lists into
    `_lo`/`_hi`, the baseline into `baseline_dropout1/2`, other dicts into `key_sub`."""
    row: dict[str, Any] = {}
    for key, value in record.items():
        if key == "stratum":
            row.update(value)
        elif key == "baseline":
            row["baseline_dropout1"], row["baseline_dropout2"] = value
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
_INTERVALS = ("ci95", "ci95_boot", "iqr", "gap_ci95", "mean_diff_ci95", "variance_ratio_ci95")


def _counts_as_int(frame: pd.DataFrame) -> pd.DataFrame:
    # A status absent from a group is a count of 0, not a missing value (which prints as 10.0).
    cols = [c for c in frame.columns if c.startswith("status_counts_")]
    frame[cols] = frame[cols].fillna(0).astype(int)
    return frame


def _sorted_runs(runs: pd.DataFrame) -> pd.DataFrame:
    keys = [*STRATUM_COLUMNS, "dropout1", "dropout2", "seed", "replicate"]
    return runs.sort_values(keys, kind="stable").reset_index(drop=True)


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    frame.to_csv(path, index=False, lineterminator="\n")

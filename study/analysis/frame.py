"""Runs with the user's own names -> RunTable: the one path into the analysis.

    from study import analyze_frame      (a pandas table; README "Your own runs")
    python -m study analyze --experiment byo --factor dropout --metric val_accuracy --baseline 0.5

`tracking.load_runs` turns MLflow runs into a raw table (one row per run: its params, its
`study.*` tags and the last value of each metric) and the per-step curves; `from_frame` does the
same for a user's DataFrame. Both then go through `run_table`, which checks that every name
asked for is there, converts, and fills only what a default can honestly stand for. A factor,
seed or metric that is missing from any run is a `ColumnError` naming it, in how many runs it
is, and what the runs do record: the analysis never answers on a column that is not there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from study.analysis.table import (CURVE_COLUMNS, D2L_FACTORS, D2L_METRIC, INFERENCE_COLUMNS,
                                  RUN_COLUMNS, Columns, RunTable)

if TYPE_CHECKING:
    from study.results import Results

# Columns a user's own runs may omit, with the value that means "the usual". None: not
# recorded, and said so (the training-set size, the d2l check), never a guessed value.
DEFAULTS: dict[str, Any] = {
    "device": "cpu", "determinism": "default", "implementation": "torch",
    "execution": "sequential", "randomness": "native", "mask_rng": "torch", "kernels": "torch", "vary": "all",
    "replicate": 0, "threads": "unrecorded", "train_images": None,
    "status": "ok", "textbook_check": None, "weights_sha256": "", "epochs_done": None,
}
# Metrics the harness logs per epoch; in a table they are never params.
KNOWN_METRICS = ("test_acc", "train_acc", "train_loss", *INFERENCE_COLUMNS)
# The d2l textbook's end-of-training assertion (train loss, train and test accuracy).
TEXTBOOK_CHECK = ("train_loss", "train_acc", "test_acc")


class ColumnError(ValueError):
    """A name the analysis was asked to read is not in (every one of) the runs."""


@dataclass(frozen=True)
class Source:
    """Where runs came from, for messages: "experiment 'byo'" or "table runs.csv", and the
    names it records (params and metrics; a table's columns are both)."""

    name: str
    params: tuple[str, ...]
    metrics: tuple[str, ...]
    columns: tuple[str, ...] | None = None  # a table's: what a message lists for any name

    def logs(self, kind: str) -> str:
        if self.columns is not None:
            return f"it has columns {', '.join(self.columns)}"
        names = self.params if kind == "params" else self.metrics
        return f"it logs {kind} {', '.join(names) if names else '(none)'}"


def run_table(raw: pd.DataFrame, curves: pd.DataFrame, columns: Columns, source: Source,
              **meta: Any) -> RunTable:
    """raw: one row per run (run_id, run_name and every recorded name); curves: CURVE_COLUMNS.
    meta: RunTable's other fields (experiment_id, experiment_name, protocol, ...)."""
    for name in (*columns.factors, columns.seed):
        _require(raw, raw[name].notna() if name in raw else None, name, "param", source)
    _require(raw, _has_metric(raw, curves, columns.metric), columns.metric, "metric", source)
    runs = pd.DataFrame({"run_id": raw["run_id"].astype(str),
                         "run_name": raw["run_name"].fillna("").astype(str)})
    for factor in columns.factors:
        runs[factor] = _factor(raw[factor])
    runs["seed"] = [_integer(v, columns.seed, rid, source) for v, rid in
                    zip(raw[columns.seed], runs["run_id"])]
    for column, kind in RUN_COLUMNS.items():
        if column not in runs:
            runs[column] = _converted(raw, column, kind, source)
    if columns.metric not in runs:
        runs[columns.metric] = _converted(raw, columns.metric, float, source)
    _diverged(runs, raw, columns.metric)
    runs["textbook_check"] = _textbook_check(runs)
    if "mc_passes" in raw and raw["mc_passes"].notna().any():
        for column, kind in INFERENCE_COLUMNS.items():
            runs[column] = _converted(raw, column, kind, source, fill=float("nan"))
    strata = _extra_strata(raw, columns, source)
    for column in strata:
        runs[column] = _factor(raw[column])
    runs = runs.sort_values([*columns.factors, "seed", "replicate"], kind="stable",
                            ignore_index=True)
    curves = curves.sort_values(["run_id", "metric", "epoch"], kind="stable", ignore_index=True)
    return RunTable(runs=runs, curves=curves,
                    columns=Columns(columns.factors, columns.seed, columns.metric,
                                    columns.lower_is_better, strata), **meta)


def _require(raw: pd.DataFrame, present: pd.Series | None, name: str, kind: str,
             source: Source) -> None:
    n = len(raw)
    have = 0 if present is None else int(present.sum())
    if have == n:
        return
    missing = raw if present is None else raw[~present.to_numpy()]
    first = missing.iloc[0]
    example = f"run {first['run_id']}" + (f" ({first['run_name']})" if first["run_name"] else "")
    raise ColumnError(f"{kind} {name!r} is in {have} of {n} runs of {source.name} (not in "
                      f"{example}); {source.logs(kind + 's')}")


def _has_metric(raw: pd.DataFrame, curves: pd.DataFrame, metric: str) -> pd.Series:
    """A run has the metric if it has a value or a step of it, or is recorded as diverged
    (the harness logs no non-finite value: its status says the run blew up)."""
    value = raw[metric].notna() if metric in raw else pd.Series(False, index=raw.index)
    stepped = raw["run_id"].isin(curves.loc[curves["metric"] == metric, "run_id"])
    diverged = raw["status"].eq("diverged") if "status" in raw else False
    return value | stepped | diverged


def _factor(values: pd.Series) -> pd.Series:
    """Numbers where every value reads as one (MLflow keeps params as text), else text."""
    try:
        return values.astype(float)
    except (TypeError, ValueError):
        return values.astype(str)


def _integer(value: Any, name: str, run_id: str, source: Source) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not number.is_integer():
        raise ColumnError(f"{source.name}, run {run_id}: seed param {name}={value!r} is not an "
                          "integer")
    return int(number)


def _converted(raw: pd.DataFrame, column: str, kind: type, source: Source,
               fill: Any = None) -> list[Any]:
    default = DEFAULTS.get(column, fill)
    values = raw[column] if column in raw else [None] * len(raw)
    return [_convert(v, kind, default, column, rid, source)
            for v, rid in zip(values, raw["run_id"])]


def _convert(raw: Any, kind: type, default: Any, column: str, run_id: str,
             source: Source) -> Any:
    if raw is None or (isinstance(raw, float) and math.isnan(raw) and kind is not float) \
            or (kind is float and raw == "none"):
        return default if default is not None or kind is not float else float("nan")
    try:
        if kind is bool:
            return str(raw).lower() == "true"
        return kind(float(raw)) if kind is int else kind(raw)
    except (TypeError, ValueError):
        raise ColumnError(f"{source.name}, run {run_id}: {column}={raw!r} is not a "
                          f"{kind.__name__}") from None


def _diverged(runs: pd.DataFrame, raw: pd.DataFrame, metric: str) -> None:
    """A run blew up when its status says so or its metric's last value is NaN or infinite
    (an absent metric never gets here: `_require` refused it). Its last finite values are from
    before the blow-up, not an outcome: NaN makes the analysis exclude and count the run."""
    recorded = raw["status"].notna().to_numpy() if "status" in raw else np.zeros(len(raw), bool)
    value = runs[metric].to_numpy(dtype=float)
    blew_up = ~recorded & ~np.isfinite(value)
    runs.loc[blew_up, "status"] = "diverged"
    gone = (runs["status"] == "diverged").to_numpy()
    for column in {metric, *TEXTBOOK_CHECK}:
        runs.loc[gone, column] = float("nan")


def _textbook_check(runs: pd.DataFrame) -> list[bool | None]:
    """As recorded; else computed where all three numbers were recorded; else None (unknown)."""
    out = []
    for check, loss, train, test in zip(runs["textbook_check"], *(
            runs[c].to_numpy(dtype=float) for c in TEXTBOOK_CHECK)):
        if check is not None and not (isinstance(check, float) and math.isnan(check)):
            out.append(bool(check))
        elif np.isfinite([loss, train, test]).all():
            out.append(bool(loss < 0.5 and train > 0.7 and test > 0.7))
        else:
            out.append(None)
    return out


def _extra_strata(raw: pd.DataFrame, columns: Columns, source: Source) -> tuple[str, ...]:
    """Params that vary across runs and are neither a factor, the seed nor a known column:
    runs are split by them, never pooled (a learning rate the user also varied)."""
    known = {*columns.factors, columns.seed, columns.metric, *RUN_COLUMNS, *INFERENCE_COLUMNS,
             *KNOWN_METRICS, "run_id", "run_name"}
    return tuple(sorted(p for p in source.params if p in raw and p not in known
                        and not p.startswith("protocol.")
                        and raw[p].nunique(dropna=False) > 1))


# --- a user's table ------------------------------------------------------------------------


def from_frame(frame: pd.DataFrame, columns: Columns, name: str = "table",
               step: str | None = None) -> RunTable:
    """A DataFrame of runs -> RunTable. One row per run, or (with a `step` column, found as
    "step" when not named) one row per run and step: then a run is a `run_id` (else a distinct
    factors + seed), its params are the columns constant within it, its metrics the others,
    each read at its last step with a value. In a table an empty cell is "not recorded"; a
    value `inf` or `nan` written as such is a recorded non-finite value (a divergence)."""
    frame = frame.reset_index(drop=True)
    step = step if step is not None else ("step" if "step" in frame else None)
    if step is not None and step not in frame:
        raise ColumnError(f"step column {step!r} is not in {name}; it has columns "
                          f"{', '.join(map(str, frame.columns))}")
    keys = ["run_id"] if "run_id" in frame else [c for c in (*columns.factors, columns.seed)
                                                 if c in frame]
    if step is None:
        raw = frame.copy()
        curves = pd.DataFrame(columns=list(CURVE_COLUMNS))
        params = [c for c in frame.columns if c not in KNOWN_METRICS and c != columns.metric]
    else:
        raw, curves, params = _long(frame, keys, step, columns.metric)
    if "run_id" not in raw:
        raw["run_id"] = [f"row {i}" for i in range(len(raw))]
    if "run_name" not in raw:
        raw["run_name"] = ""
    if step is None:
        curves = pd.DataFrame(columns=list(CURVE_COLUMNS))
    metrics = [str(c) for c in frame.columns if c not in params and c != step]
    source = Source(f"table {name}", tuple(map(str, params)), tuple(metrics),
                    tuple(str(c) for c in frame.columns if c != step))
    return run_table(raw, curves, columns, source, experiment_id="", experiment_name=name)


def _long(frame: pd.DataFrame, keys: list[str], step: str,
          metric: str) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """Per-step rows -> (one row per run, curves, param names)."""
    run_of = frame.groupby(keys, sort=False, dropna=False).ngroup() if keys else \
        pd.Series(0, index=frame.index)
    ids = frame["run_id"].astype(str) if "run_id" in frame else run_of.map(lambda i: f"run {i}")
    frame = frame.assign(run_id=ids)
    others = [c for c in frame.columns if c not in (step, "run_id")]
    varying = frame.groupby("run_id", sort=False)[others].nunique(dropna=True).max()
    metric_cols = [c for c in others if c == metric or c in KNOWN_METRICS or varying[c] > 1]
    params = [c for c in others if c not in metric_cols]
    ordered = frame.sort_values(["run_id", step], kind="stable")
    raw = ordered.groupby("run_id", sort=False)[params].first()
    for c in metric_cols:  # last step with a value
        raw[c] = ordered.dropna(subset=[c]).groupby("run_id", sort=False)[c].last()
    raw = raw.reset_index()
    curves = ordered.melt(id_vars=["run_id", step], value_vars=metric_cols, var_name="metric",
                          value_name="value").dropna(subset=["value"])
    curves = curves.rename(columns={step: "epoch"}).astype({"epoch": int, "value": float})
    return raw, curves[list(CURVE_COLUMNS)], params


def export(table: RunTable) -> pd.DataFrame:
    """A RunTable as one row per run and step ("step"): every run column beside each step's
    metric values; `from_frame` reads it back to the same table."""
    wide = table.curves.pivot_table(index=["run_id", "epoch"], columns="metric",
                                    values="value", aggfunc="last").reset_index()
    wide = wide.rename(columns={"epoch": "step"})
    wide.columns.name = None
    metrics = [c for c in wide.columns if c not in ("run_id", "step")]
    runs = table.runs.drop(columns=[c for c in metrics if c in table.runs])
    return runs.merge(wide, on="run_id", how="left").sort_values(
        ["run_id", "step"], kind="stable", ignore_index=True)


def columns_of(factor: str | Sequence[str], seed: str, metric: str,
               lower_is_better: bool = False) -> Columns:
    """Columns from what a user types: factors as "a,b" or a list."""
    factors = tuple(f.strip() for f in (factor.split(",") if isinstance(factor, str) else factor))
    if not factors or not all(factors):
        raise ColumnError(f"factor {factor!r}: expected PARAM[,PARAM...]")
    return Columns(factors, seed, metric, lower_is_better)




def read_csv(path: str | Path) -> pd.DataFrame:
    """A CSV of runs; an empty cell is "not recorded", `nan`/`inf` are recorded values."""
    try:
        return pd.read_csv(path, keep_default_na=False, na_values=[""])
    except FileNotFoundError:
        raise ColumnError(f"--csv {str(path)!r}: no such file") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ColumnError(f"--csv {str(path)!r}: not a CSV table ({err})") from None


def analyze_frame(frame: pd.DataFrame, factor: str | Sequence[str] = D2L_FACTORS,
                  seed: str = "seed", metric: str = D2L_METRIC,
                  baseline: Sequence[Any] | Any = (0.2, 0.5), *, lower_is_better: bool = False,
                  margin: float | None = None, endpoint: str = "final",
                  step: str | None = None, name: str = "table", random_state: int = 0,
                  out_dir: str | Path | None = None, adaptive: str | None = None) -> Results:
    """A table of runs -> the typed `Results` that `study analyze` writes as results.json.

        from study import analyze_frame
        r = analyze_frame(df, factor="dropout", metric="val_accuracy", baseline=0.5)

    frame: one row per run, or one row per run and step (`step`, found as "step" when there);
    factor: the column(s) whose values make a setting; seed: the column that pairs runs across
    settings; metric: the outcome (`lower_is_better` for a loss); baseline: one value per
    factor; margin: the equivalence margin in the metric's units (default 0.005); endpoint:
    "final" or "last:K" (K steps); random_state: the bootstrap's seed; adaptive: runs made in
    rounds, "start=10,round=5,max=100[,stop=settled|first]" as `analyze --adaptive` takes it
    (each setting's seeds in ascending order are the looks). Other columns that vary
    across runs become strata. A missing name is a ColumnError; a baseline no run has, an
    AnalysisError. With `out_dir`, results.json, the CSVs and summary.md are written there."""
    # Imported here: the loader (store/tracking) imports this module and needs no scipy.
    from study.analysis import comparisons
    from study.protocol.schema import Analysis

    columns = columns_of(factor, seed, metric, lower_is_better)
    base = tuple(baseline) if isinstance(baseline, (list, tuple)) else (baseline,)
    table = from_frame(frame, columns, name, step)
    comparisons.check_baseline(table, base)
    options = Analysis(endpoint=endpoint, factor=columns.factors, seed=seed, metric=metric,
                       lower_is_better=lower_is_better,
                       **({} if margin is None else {"equivalence_margin": float(margin)}))
    if adaptive is None:
        results = comparisons.analyze(table, base, options, random_state)
    else:
        from study.analysis import looks

        looked = looks.analyze(table, base, options, looks.parse(adaptive, options), random_state)
        table, results = looked.table, looked.results
    if out_dir is not None:
        from study.report.summary import write_summary

        comparisons.write(results, table, Path(out_dir))
        write_summary(results, table, Path(out_dir))
    return results

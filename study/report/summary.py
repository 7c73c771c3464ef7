"""summary.md: the analysis of any experiment in words, under its own names and units.

    python -m study analyze --experiment byo --factor dropout --metric val_accuracy --baseline 0.5

`analyze` writes it beside results.json. Unlike the paper (`report`), it assumes nothing about
the runs: settings are named by the factors, numbers are in the metric's own units, "better"
follows `Results.lower_is_better`, and the method section says which descriptions come from
the runs and which were not recorded.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from study.analysis.table import RunTable
from study.results import Comparison, Results

NOT_RECORDED = "not recorded"


def setting_text(names: list[str], values: list[Any]) -> str:
    """'dropout=0.3' or 'optimizer=adam, lr=0.1'."""
    return ", ".join(f"{n}={_value(v)}" for n, v in zip(names, values))


def _value(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _num(x: Any) -> str:
    return f"{x:.4g}" if isinstance(x, (int, float)) and math.isfinite(x) else "n/a"


def _ci(ci: Any) -> str:
    return f"[{_num(ci[0])}, {_num(ci[1])}]" if ci else "[n/a]"


def direction(c: Comparison, lower_is_better: bool) -> str:
    """Whether the setting is shown better or worse than the baseline, by the sign of the gap
    and which way the metric improves; only a `different` verdict shows either."""
    if c.verdict != "different" or c.mean_diff is None or c.mean_diff == 0:
        return {"equivalent": "equivalent to the baseline within the margin",
                "negligible": "a real gap, shown to lie within the margin"}.get(
            c.verdict, "not shown better or worse than the baseline")
    better = (c.mean_diff < 0) if lower_is_better else (c.mean_diff > 0)
    return "better than the baseline" if better else "worse than the baseline"


def comparison_line(c: Comparison, r: Results) -> str:
    way = "lower" if (c.mean_diff or 0) < 0 else "higher"
    rule = "lower is better" if r.lower_is_better else "higher is better"
    if c.adaptive:
        return (f"{setting_text(r.factors, c.setting)}: {r.metric} {_num(abs(c.mean_diff or 0))} "
                f"{way} than the baseline over {c.n_pairs} paired seeds ({rule}); 95% CS at the "
                f"stop {_ci(c.cs95)}: {direction(c, r.lower_is_better)}. Verdict {c.verdict} "
                f"(anytime-valid t-mixture, {_stop(c)}; anytime p {_num(c.p_anytime)}; a fixed "
                f"design would need {_num(c.seeds_fixed_equivalent)} seeds; the "
                f"{len(c.multiverse)} fixed-n analyses are descriptive)."
                + (f" Note: {c.reason}." if c.reason else ""))
    return (f"{setting_text(r.factors, c.setting)}: {r.metric} {_num(abs(c.mean_diff or 0))} "
            f"{way} than the baseline (difference {_num(c.mean_diff)}, 95% CI "
            f"{_ci(c.mean_diff_ci95)}; {rule}): {direction(c, r.lower_is_better)}. Verdict "
            f"{c.verdict} (Holm-adjusted p {_num(c.p_adjusted)}, TOST p "
            f"{_num(c.tost_p_adjusted)}, {'robust' if c.robust else 'not robust'} across "
            f"{len(c.multiverse)} analyses; {c.n_pairs} paired seeds).")


def _stop(c: Comparison) -> str:
    where = {"settled": "settled", "max_seeds": "cap reached",
             "max_runs": "run budget reached"}.get(c.stop_reason or "", "still open")
    return f"{where} at {c.stopped_at} seeds"


def _looks(r: Results) -> str:
    a = r.adaptive
    rule = ("once the CS lies wholly inside or wholly beyond the margin" if a.stop == "settled"
            else "at its first verdict other than inconclusive")
    return (f"- Adaptive: each setting's seeds in ascending order, looked at after "
            f"{a.start}, {a.start} + {a.round}, ... up to {a.max_seeds} seeds; a comparison "
            f"stops {rule}, and its verdict comes from the t-mixture's 95% confidence sequence "
            f"(precision {a.mixture_precision:.2f}), valid under this optional stopping. The "
            f"other p-values and `robust` are descriptive.")


def method(r: Results, table: RunTable) -> list[str]:
    runs = table.runs
    base = setting_text(r.factors, r.baseline)
    settings = sorted({tuple(g.setting) for g in r.groups})
    lines = [
        f"- Settings (from the runs): the params {', '.join(r.factors)}, "
        f"{len(settings)} settings: " + "; ".join(setting_text(r.factors, list(s))
                                                 for s in settings) + f". Baseline: {base}.",
        f"- Seeds (from the runs): the param `{r.seed_param}`, "
        f"{runs['seed'].nunique()} distinct over {r.n_runs} runs.",
        f"- Outcome (from the runs): `{r.metric}`, "
        f"{'lower' if r.lower_is_better else 'higher'} is better; primary endpoint "
        f"{r.endpoint} (the metric's last step, or the mean of its last K steps); also "
        f"{', '.join(r.robustness_endpoints)}" + (f" (left out: {'; '.join(r.endpoints_left_out)})"
                                                  if r.endpoints_left_out else "")
        + f". Equivalence margin ±{_num(r.equivalence_margin)} in {r.metric}'s units.",
        "- Strata: " + (", ".join(r.stratified_by) if r.stratified_by else "none varies")
        + " (runs are compared only within a stratum).",
    ]
    unknown = [what for what, missing in (
        ("the model and training set-up", not table.protocol),
        ("the training-set size", runs["train_images"].isna().all()),
        ("train_acc", np.isnan(runs["train_acc"].to_numpy(dtype=float)).all()),
        ("the d2l textbook check", runs["textbook_check"].isna().all())) if missing]
    if r.adaptive is not None:
        lines.append(_looks(r))
    lines.append("- Not recorded with these runs, so not described: "
                 + (", ".join(unknown) if unknown else "nothing of the above") + ".")
    if r.diagnostics is None:
        lines.append("- The d2l study's diagnostics (determinism modes, devices, sources of "
                     "variance) and claims read dropout1, dropout2 and test_acc: not analysed "
                     "under these names.")
    return lines


def summary_text(r: Results, table: RunTable) -> str:
    out = [f"# {r.experiment}: {r.metric} by {', '.join(r.factors)}", "", "## Method", "",
           *method(r, table), "", "## Results", ""]
    for s in r.strata:
        out += [f"### {s.label}", ""]
        groups = [g for g in r.groups if g.stratum == s.stratum]
        out += [f"- {setting_text(r.factors, g.setting)}: mean {_num(g.mean)} "
                f"(SD {_num(g.sd)}, n {g.n}" + (f", {g.n_diverged} diverged" if g.n_diverged
                                                else "") + ")" for g in groups]
        out += [f"- {comparison_line(c, r)}" for c in r.comparisons if c.stratum == s.stratum]
        out += [f"- note: {n}" for n in s.notes] + [""]
    return "\n".join(out)


def write_summary(r: Results, table: RunTable, out_dir: Path) -> Path:
    path = Path(out_dir) / "summary.md"
    path.write_text(summary_text(r, table), encoding="utf-8")
    return path

"""An experiment run elsewhere in rounds, decided as an adaptive study: each setting's seeds, in
ascending order, are the looks.

    python -m study analyze --experiment byo --factor dropout --metric val_accuracy \\
        --baseline 0.5 --adaptive start=10,round=5,max=100,stop=settled

A protocol's adaptive study plans its rounds (`study.analysis.rounds`); an own experiment's runs
already exist. Both are decided by the one rule, `sequential.decide`, on the same paired gaps
(setting - reference by ascending seed, NaN for a diverged run), and written into the results
by the same `rounds.with_decision`: data laid out as a protocol's rounds would lay it out get
the same verdict, stopped_at, cs95, p_anytime and seeds_fixed_equivalent.

What is read, and what is not:
- Each setting's first `max` seeds in each stratum, ascending. Later runs are left out of the
  whole analysis (as a protocol reads no seed past max_seeds); each stratum's notes count them.
- A comparison reads the seeds of its two settings in ascending order up to the last seed both
  have (as a protocol's comparison reads the seeds of the shorter of its two settings). A seed
  that only one of them has inside that range counts as a seed without a pair, like a diverged
  run: the looks count it and the test skips it. The comparison's `reason` names those seeds.
  This keeps its level when a run is missing for reasons unrelated to its outcome; a run lost
  because of its setting is a failure the analysis cannot see, so the note asks to check.
- Looks at start, start + round, ... and max seeds. A comparison that has not stopped when the
  runs end is still open (stop_reason null, stopped_at the last look): there is no run budget
  here, so `max_runs` is null and never a stop reason.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np
import pandas as pd

from study.analysis import comparisons, rounds, sequential as sq, stats
from study.analysis.settings import by_seed, setting_of
from study.analysis.table import STRATUM_COLUMNS, RunTable, scalar
from study.protocol.schema import Analysis, ProtocolError
from study.results import AdaptiveDesign, Comparison, Results

# --adaptive keys: the first look, seeds per look, the cap (required); the stop rule.
KEYS = ("start", "round", "max", "stop")


def parse(text: str, options: Analysis) -> sq.Design:
    """`start=10,round=5,max=100[,stop=settled|first]` -> the design, at the options' alpha and
    margin. A bad value is a ProtocolError naming the option, the key and the value."""
    values: dict[str, str] = {}
    for item in text.split(","):
        key, eq, value = (part.strip() for part in item.partition("="))
        if not eq or not key or not value:
            _bad(text, f"{item.strip()!r} is not KEY=VALUE")
        if key not in KEYS:
            _bad(text, f"unknown key {key!r}; the keys are {', '.join(KEYS)}")
        if key in values:
            _bad(text, f"{key} is given twice")
        values[key] = value
    for key in KEYS[:3]:
        if key not in values:
            _bad(text, f"give {key} (start=FIRST_LOOK,round=SEEDS_PER_LOOK,max=CAP)")
    start, step, cap = (_count(text, key, values[key]) for key in KEYS[:3])
    stop = values.get("stop", "settled")
    if stop not in ("settled", "first"):
        _bad(text, f"stop={stop!r}: expected settled or first")
    if cap < 2 or cap < start:
        _bad(text, f"max={cap}: expected at least 2 and at least start ({start})")
    return sq.Design(alpha=options.alpha, margin=options.equivalence_margin, start=start,
                     round=step, max_seeds=cap, stop=stop)


def _count(text: str, key: str, value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        _bad(text, f"{key}={value!r} is not an integer")
    if number < 1:
        _bad(text, f"{key}={number}: expected an integer >= 1")
    return number


def _bad(text: str, why: str) -> NoReturn:
    raise ProtocolError(f"--adaptive {text!r}: {why}")


# ----------------------------------------------------------------------------- the analysis


@dataclass(frozen=True)
class Looked:
    """An own experiment decided at its looks: the runs read, the results, and the line that
    says which runs past `max` were left out (None: none)."""

    table: RunTable
    results: Results
    left_out: str | None


def analyze(table: RunTable, baseline: tuple[Any, ...], options: Analysis, design: sq.Design,
            seed: int = 0) -> Looked:
    """`comparisons.analyze` over each setting's first max seeds, each comparison then decided
    at its looks (`decide`)."""
    kept, beyond = within_max(table, design)
    results = comparisons.analyze(kept, baseline, options, seed)
    results = decide(results, kept, design, options, beyond)
    line = None
    if len(beyond):
        line = (f"--adaptive max={design.max_seeds}: left out {len(beyond)} run(s) past the "
                f"{design.max_seeds}th seed of their setting (seeds "
                f"{_seeds(beyond['seed'])}); they stay where they are")
    return Looked(kept, results, line)


def _strata_by(table: RunTable) -> list[str]:
    return [*STRATUM_COLUMNS, *table.columns.strata]


def within_max(table: RunTable, design: sq.Design) -> tuple[RunTable, pd.DataFrame]:
    """The table cut to each setting's first max_seeds seeds per stratum (every replicate of
    them), and the runs cut off."""
    runs = table.runs
    keys = [*_strata_by(table), *table.columns.factors]
    rank = runs.groupby(keys, dropna=False, sort=False)["seed"].rank(method="dense")
    keep = (rank <= design.max_seeds).to_numpy()
    kept = runs[keep].reset_index(drop=True)
    curves = table.curves[table.curves["run_id"].isin(kept["run_id"])].reset_index(drop=True)
    return dataclasses.replace(table, runs=kept, curves=curves), runs[~keep]


def decide(results: Results, table: RunTable, design: sq.Design, options: Analysis,
           beyond: pd.DataFrame) -> Results:
    """Each comparison (and contrast) decided by `sequential.decide` on its paired gaps by
    ascending seed; `adaptive` records the design; strata that lost runs past max say so."""
    frames = {_key(s): f for s, f in comparisons.primary_strata(table, options)}
    decided: list[sq.Decision] = []

    def one(c: Comparison) -> Comparison:
        gaps, note = paired_gaps(frames[_key(c.stratum)], setting_of(*c.setting),
                                 setting_of(*c.baseline))
        d = sq.decide(gaps, design, options.power)
        decided.append(d)
        out = rounds.with_decision(c, d)
        return dataclasses.replace(out, reason=stats.join_reasons(c.reason, note, d.reason))

    compared = [one(c) for c in results.comparisons]
    contrasts = [one(c) for c in results.contrasts]
    stopped = [d.stopped_at for d in decided]
    record = AdaptiveDesign(
        start=design.start, round=design.round, max_seeds=design.max_seeds, max_runs=None,
        stop=design.stop, mixture_precision=design.mixture_precision,
        rounds=sum(k <= max(stopped, default=0) for k in design.looks()), runs=len(table.runs),
        study_stop="settled" if all(not d.open for d in decided) else None)
    return dataclasses.replace(results, adaptive=record, comparisons=compared,
                               contrasts=contrasts,
                               strata=[_noted(s, beyond, table, design) for s in results.strata])


def paired_gaps(frame: pd.DataFrame, setting: tuple, reference: tuple) -> tuple[np.ndarray,
                                                                              str | None]:
    """setting - reference by ascending seed over the seeds of either, up to the last seed
    both have (module docstring); NaN where a run diverged or one of the two lacks the seed.
    With a note naming the seeds only one of them has."""
    x = by_seed(frame, setting, comparisons.PRIMARY)
    y = by_seed(frame, reference, comparisons.PRIMARY)
    if x.empty or y.empty:
        return np.array([], dtype=float), None
    last = min(x.index.max(), y.index.max())
    seeds = sorted(s for s in set(x.index) | set(y.index) if s <= last)
    gaps = np.array([x.get(s, math.nan) - y.get(s, math.nan) for s in seeds], dtype=float)
    alone = [s for s in seeds if (s in x.index) != (s in y.index)]
    note = None
    if alone:
        note = (f"seed(s) {_seeds(alone)} have a run in only one of the two settings: each "
                f"counts at the looks as a seed without a pair (like a diverged run) and adds "
                f"nothing to the test; check that those runs are not missing because of their "
                f"setting")
    return gaps, note


def _noted(s: Any, beyond: pd.DataFrame, table: RunTable, design: sq.Design) -> Any:
    by = _strata_by(table)
    here = [r for _, r in beyond.iterrows() if {c: scalar(r[c]) for c in by} == s.stratum]
    if not here:
        return s
    note = (f"--adaptive max={design.max_seeds}: {len(here)} run(s) past the "
            f"{design.max_seeds}th seed of their setting left out (seeds "
            f"{_seeds([r['seed'] for r in here])})")
    return dataclasses.replace(s, notes=[*s.notes, note])


def _key(stratum: dict[str, Any]) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in stratum.items()))


def _seeds(seeds: Any) -> str:
    values = sorted({int(s) for s in seeds})
    shown = ", ".join(map(str, values[:8]))
    return shown + (f", ... ({len(values)} in all)" if len(values) > 8 else "")

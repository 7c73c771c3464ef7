"""The report of an adaptive study: the interval is the confidence sequence, the stop is named,
and the fixed-n multiverse is labelled descriptive (results built by hand, tests/results_factory).

    .venv/bin/python -m pytest tests/test_report_adaptive.py -q
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from study.report import sections
from study.report.context import Inputs
from study.report.render_markdown import render_markdown
from study.results import AdaptiveDesign, Results
from tests.results_factory import make_results, make_table

DESIGN = AdaptiveDesign(start=10, round=5, max_seeds=60, max_runs=400, stop="settled",
                        mixture_precision=1.386, rounds=4, runs=150, study_stop="settled")


def adaptive(results: Results, stop_reason: str, stopped_at: int) -> Results:
    def decided(c):
        if (c.dropout1, c.dropout2) != (0.0, 0.0):
            return c
        return dataclasses.replace(c, cs95=(-0.0311, -0.0052), p_anytime=0.0012,
                                   stopped_at=stopped_at, stop_reason=stop_reason,
                                   seeds_fixed_equivalent=14)
    return dataclasses.replace(results, adaptive=DESIGN,
                               comparisons=[decided(c) for c in results.comparisons])


@pytest.fixture(scope="module")
def table():
    return make_table(("torch",), name="d2l-dropout")


def markdown(results: Results, table) -> str:
    return render_markdown(sections.document(Inputs.of(results, table)), "x")


def test_an_adaptive_comparison_shows_its_cs_and_its_stop(table):
    md = markdown(adaptive(make_results(table), "settled", 25), table)
    c1 = md[md.index("C1: no dropout"):md.index("C2: (1, 1)")]
    assert "anytime-valid t-mixture, settled at 25 seeds) the gap of (0, 0)" in c1
    assert "\u22123.11, \u22120.52" in c1  # the CS, not the t interval
    assert "descriptive" in c1 and "different: the 95% CS excludes 0" in c1
    assert "Holm correction (p = " not in c1
    assert "The study was adaptive: every setting started with 10 seeds" in md
    assert "95% CS" in md


def test_a_comparison_at_the_cap_names_the_cap_and_its_cs(table):
    md = markdown(adaptive(make_results(table), "max_seeds", 60), table)
    assert "cap reached at 60 seeds; CS \\[\u22123.11" in md


def test_a_fixed_design_report_is_unchanged(table):
    md = markdown(make_results(table), table)
    assert "anytime-valid" not in md and "The study was adaptive" not in md
    assert "95% CS" not in md


def test_the_scorecard_says_where_each_adaptive_comparison_stopped(table):
    from study.report import scorecard

    def decided(reason: str, n: int):
        return next(c for c in adaptive(make_results(table), reason, n).comparisons if c.adaptive)

    capped = decided("max_seeds", 60)
    assert scorecard.settle_text(decided("settled", 25)) == "settled at 25 seeds"
    assert scorecard.settle_text(capped).startswith("cap reached at 60 seeds; CS [\u22123.11, ")
    assert scorecard.robust_text(capped).endswith("descriptive)")


# --- the figure of each confidence sequence narrowing ----------------------------------------


def _open_gaps(n: int = 30):
    """Paired gaps whose CS never settles before the cap (a small gap, a wide spread)."""
    import numpy as np
    return np.random.default_rng(3).normal(0.002, 0.012, n)


def test_each_look_is_the_decision_the_rule_took_with_that_many_seeds():
    from study.analysis import sequential as sq

    design = sq.Design(start=10, round=5, max_seeds=30)
    gaps = _open_gaps()
    final = sq.decide(gaps, design)
    assert final.stop_reason == "max_seeds" and [k for k, _, _ in final.looks] == [10, 15, 20, 25, 30]
    for k, lo, hi in final.looks:
        at_k = sq.decide(gaps[:k], design)  # the round's decision with the seeds it had then
        assert at_k.stopped_at == k and at_k.cs95 == (lo, hi)
    widths = [hi - lo for _, lo, hi in final.looks]
    assert all(b <= a for a, b in zip(widths, widths[1:]))  # a running intersection
    assert final.looks[-1][1:] == final.cs95


def test_a_stopped_comparison_has_no_look_after_its_stop():
    from study.analysis import sequential as sq

    design = sq.Design(start=10, round=5, max_seeds=60)
    gaps = _open_gaps(60) - 0.03  # far below the margin: settles at the first look
    d = sq.decide(gaps, design)
    assert d.stop_reason == "settled" and [k for k, _, _ in d.looks] == [d.stopped_at]


def with_looks(results: Results) -> Results:
    from study.analysis import sequential as sq
    from study.results import Look

    design = sq.Design(start=10, round=5, max_seeds=30)
    d = sq.decide(_open_gaps(), design)
    decided = adaptive(results, d.stop_reason, d.stopped_at)
    return dataclasses.replace(decided, comparisons=[
        dataclasses.replace(c, cs_looks=[Look.of(*x) for x in d.looks]) if c.adaptive else c
        for c in decided.comparisons])


def test_the_cs_figure_is_drawn_for_an_adaptive_study_only(table, tmp_path):
    from study.report import figures

    results = with_looks(make_results(table))
    made = {f.name: f for f in figures.make_figures(results, table, tmp_path / "a")}
    assert made["cs_looks"].svg.stat().st_size > 0 and "confidence sequence" in \
        made["cs_looks"].caption
    fixed = {f.name for f in figures.make_figures(make_results(table), table, tmp_path / "b")}
    assert "cs_looks" not in fixed
    ax = figures.plot_cs_looks(results.comparisons, results.equivalence_margin)
    (c,) = [c for c in results.comparisons if c.cs_looks]
    drawn = [line for line in ax.get_lines() if line.get_label() == "(0, 0)"]
    lows = drawn[0].get_ydata()
    assert list(drawn[0].get_xdata()) == [x.seeds for x in c.cs_looks]
    assert [round(v, 9) for v in lows] == [round(max(x.lo * 100, -3.0), 9) for x in c.cs_looks]
    assert "cs_looks" in json.dumps(results.to_json())

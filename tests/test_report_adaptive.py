"""The report of an adaptive study: the interval is the confidence sequence, the stop is named,
and the fixed-n multiverse is labelled descriptive (results built by hand, tests/results_factory).

    .venv/bin/python -m pytest tests/test_report_adaptive.py -q
"""

from __future__ import annotations

import dataclasses

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

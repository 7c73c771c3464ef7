"""Each claim's section opens with one bottom-line sentence on the claim, derived from the
results: every verdict case of a comparison, the adaptive CS, and the paper.

    .venv/bin/python -m pytest tests/test_bottomline.py -x -q
"""

from __future__ import annotations

import dataclasses

import pytest

from study.report import bottomline, claims, sections
from study.report.context import Inputs
from study.report.render_markdown import render_markdown
from study.results import AdaptiveDesign, Results
from tests.results_factory import comparison_at, make_results, make_table

DESIGN = AdaptiveDesign(start=10, round=5, max_seeds=60, max_runs=400, stop="settled",
                        mixture_precision=1.386, rounds=4, runs=150, study_stop="settled")


@pytest.fixture(scope="module")
def table():
    return make_table(("torch",), name="d2l-dropout")


def planted(results: Results, setting, **fields) -> Results:
    """Results with one comparison's fields replaced (in the first stratum)."""
    target = comparison_at(results, setting)
    return dataclasses.replace(results, comparisons=[
        dataclasses.replace(c, **fields) if c is target else c for c in results.comparisons])


def line(key: str, results: Results, table) -> str:
    claim = next(c for c in claims.CLAIMS if c.key == key)
    return claim.bottom_line(Inputs.of(results, table))


def test_c1_worse_and_adaptive_reads_the_cs(table):
    r = planted(make_results(table), (0.0, 0.0), verdict="different", mean_diff=-0.0184,
                cs95=(-0.0361, -0.0008), p_anytime=0.01, stopped_at=25, stop_reason="settled")
    assert line("C1", r, table) == ("C1 not supported: (0, 0) was never shown better than "
                                    "(0.2, 0.5); it was worse by \u22121.84 pp (95% CS "
                                    "[\u22123.61, \u22120.08]).")


@pytest.mark.parametrize("verdict, diff, status, words", [
    ("different", 0.0048, "partly supported", "(0, 0) was shown better than (0.2, 0.5) by +0.48 pp"),
    ("negligible", 0.0021, "not supported", "differ by a real gap shown inside \u00b10.50 pp"),
    ("equivalent", 0.0004, "not supported", "are equivalent within \u00b10.50 pp"),
    ("inconclusive", 0.0031, "not settled", "was not shown different from (0.2, 0.5)"),
])
def test_c1_follows_the_verdict_and_the_sign(table, verdict, diff, status, words):
    r = planted(make_results(table), (0.0, 0.0), verdict=verdict, mean_diff=diff,
                mean_diff_ci95=(diff - 0.001, diff + 0.001))
    text = line("C1", r, table)
    assert text.startswith(f"C1 {status}: ") and words in text
    assert f"{diff * 100:+.2f} pp (95% CI [".replace("-", "\u2212") in text
    assert "no difference" not in text and "no real difference" not in text


def test_the_sentence_follows_the_numbers_not_a_template(table):
    a = planted(make_results(table), (0.0, 0.0), verdict="different", mean_diff=-0.0100,
                mean_diff_ci95=(-0.015, -0.005))
    b = planted(a, (0.0, 0.0), mean_diff=-0.0250, mean_diff_ci95=(-0.031, -0.019))
    assert "\u22121.00 pp (95% CI [\u22121.50, \u22120.50])" in line("C1", a, table)
    assert "\u22122.50 pp (95% CI [\u22123.10, \u22121.90])" in line("C1", b, table)


def test_c1_with_no_dropout_as_baseline_counts_the_settings_it_beats(table):
    r = dataclasses.replace(make_results(table), baseline=[0.0, 0.0])
    comps = [dataclasses.replace(c, verdict="different", mean_diff=-0.01) for c in r.comparisons]
    r = dataclasses.replace(r, comparisons=comps)
    n = len(comps)
    assert line("C1", r, table) == f"C1 supported: (0, 0) was shown better than {n} of {n} " \
                                   f"dropout settings."
    comps[0] = dataclasses.replace(comps[0], verdict="inconclusive")
    text = line("C1", dataclasses.replace(r, comparisons=comps), table)
    assert text.startswith(f"C1 not settled: (0, 0) was shown better than {n - 1} of {n}")
    assert "not shown different" in text


def test_c3_prime_reads_the_contrast_both_ways(table):
    base = make_results(table)
    c = dataclasses.replace(comparison_at(base, (0.0, 0.0)), dropout1=0.8, dropout2=0.6,
                            baseline=[0.6, 0.8], verdict="different", mean_diff=-0.012,
                            mean_diff_ci95=(-0.02, -0.004))
    r = dataclasses.replace(base, contrasts=[c])
    assert line("C3\u2032", r, table).startswith(
        "C3\u2032 supported: (0.8, 0.6) was shown worse than (0.6, 0.8) by \u22121.20 pp")
    flipped = dataclasses.replace(r, contrasts=[dataclasses.replace(c, mean_diff=0.012)])
    assert line("C3\u2032", flipped, table).startswith("C3\u2032 not supported: (0.8, 0.6) was "
                                                      "shown better than (0.6, 0.8), the opposite")
    open_ = dataclasses.replace(r, contrasts=[dataclasses.replace(c, verdict="inconclusive")])
    assert line("C3\u2032", open_, table).startswith("C3\u2032 not settled: (0.8, 0.6) was not "
                                                    "shown different from (0.6, 0.8)")


def test_degenerate_setting_counts_the_failed_assertions(table):
    r = make_results(table)
    g = next(g for g in r.groups if (g.dropout1, g.dropout2) == (1.0, 1.0))
    n = g.n + g.n_excluded
    text = line("C2", r, table)
    assert text.startswith(f"C2 supported: the textbook's end-of-training assertion fails in "
                           f"{n - g.textbook_check_passed} of {n} runs of (1, 1)")


def test_every_claim_section_opens_with_its_bottom_line(table):
    r = planted(make_results(table), (0.0, 0.0), verdict="different", mean_diff=-0.0184,
                cs95=(-0.0361, -0.0008), p_anytime=0.01, stopped_at=25, stop_reason="settled")
    r = dataclasses.replace(r, adaptive=DESIGN)
    md = render_markdown(sections.document(Inputs.of(r, table)), "x")
    for claim in claims.CLAIMS:
        head = f" {claim.key}: {claim.heading}\n\n"
        after = md[md.index(head) + len(head):]
        assert after.startswith(f"**{claim.key} "), claim.key
    assert "**C1 not supported: (0, 0) was never shown better than (0.2, 0.5); it was worse by " \
           "\u22121.84 pp (95% CS \\[\u22123.61, \u22120.08\\]).**" in md


def test_joined_strata_name_each_stratum():
    a, b = bottomline.BottomLine("supported", "x"), bottomline.BottomLine("not settled", "y")
    assert bottomline.joined([("s1", a), ("s2", a)]).sentence("C9") == \
        "C9 supported: in s1, x; in s2, x."
    assert bottomline.joined([("s1", a), ("s2", b)]).sentence("C9") == \
        "C9 mixed across strata: in s1, supported (x); in s2, not settled (y)."

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


# --- C4 and C7 records decided by the rounds (issue 19): their CS, stop and anytime p ----------

SEQ = dict(start=10, round=5, max_seeds=30)


def _decision(kind: str):
    """A decision of the runner's own rule (study.analysis.sequential): 'settled' at the first
    look (a gap far beyond the margin), or 'open' until the cap (small gap, wide spread)."""
    import numpy as np
    from study.analysis import sequential as sq

    gaps = _open_gaps() - 0.03 if kind == "settled" else _open_gaps()
    return sq.decide(np.asarray(gaps), sq.Design(**SEQ))


@pytest.fixture(scope="module")
def records_table():
    from tests.results_factory import with_passes
    return with_passes(make_table(("torch", "scratch"), name="d2l-dropout"))


@pytest.fixture(scope="module")
def fixed_records(records_table) -> Results:
    """Fixed-n C4 (scratch against torch) and C7 records, from the analysis itself."""
    from study.analysis import comparisons, diagnostics
    from study.protocol.schema import Analysis

    options = Analysis(bootstrap=200)
    results = make_results(records_table)
    return dataclasses.replace(
        results, diagnostics=diagnostics.analyze(records_table, options, seed=0),
        inference=comparisons.analyze(records_table, (0.2, 0.5), options).inference)


def decided_records(results: Results) -> Results:
    """C4 record 0 and C7 setting (0.2, 0.5) settled at their first look; C4 record 1 and C7
    (0.6, 0.8) at the cap; the rest (and every C1 comparison) fixed-n. Through the rounds'
    own `with_decision`."""
    from study.analysis.rounds import with_decision

    settled, capped = _decision("settled"), _decision("open")
    assert (settled.stop_reason, capped.stop_reason) == ("settled", "max_seeds")
    section = results.diagnostics.implementations
    recs = list(section.records)
    recs[0], recs[1] = with_decision(recs[0], settled), with_decision(recs[1], capped)
    plan = {(0.2, 0.5): settled, (0.6, 0.8): capped}
    settings = [dataclasses.replace(m, accuracy=with_decision(m.accuracy, plan[key]))
                if (key := (m.dropout1, m.dropout2)) in plan else m
                for m in results.inference.settings]
    return dataclasses.replace(
        results, adaptive=DESIGN,
        diagnostics=dataclasses.replace(results.diagnostics, implementations=dataclasses.replace(
            section, records=recs)),
        inference=dataclasses.replace(results.inference, settings=settings))


def test_adaptive_c4_rows_show_the_cs_the_stop_and_anytime_p(fixed_records, records_table):
    from study.report.diagnostics import equivalence_blocks
    from study.report.wording import ANYTIME_BASIS, fmt_ci_pp, fmt_p

    results = decided_records(fixed_records)
    md = render_markdown(equivalence_blocks(results), "x")
    recs = results.diagnostics.implementations.records
    first, second = recs[0], recs[1]
    assert "95% CS (adaptive) / CI" in md and "anytime p" in md and "seeds needed / stop" in md
    assert fmt_ci_pp(first.cs95).replace("[", "\\[").replace("]", "\\]") in md
    assert fmt_ci_pp(first.mean_diff_ci95).replace("[", "\\[") not in md  # CS, not the t CI
    assert f"| {fmt_p(first.p_anytime)} | {first.verdict} | settled at 10 seeds |" in md
    assert "cap reached at 30 seeds; CS \\[" in md
    assert ANYTIME_BASIS in md and "the fixed-n p-values and TOST beside it are descriptive" in md
    assert "verdicts read off each 95% CS at its stop: settled at 10 seeds (" in md
    fixed = render_markdown(equivalence_blocks(fixed_records), "x")
    assert "anytime" not in fixed and "CS" not in fixed and "| 95% CI |" in fixed


def test_adaptive_c7_accuracy_reads_its_cs_and_stop(fixed_records, records_table):
    from study.report import inference
    from study.report.document import text_of
    from study.report.wording import ANYTIME_BASIS, fmt_ci_pp

    results = decided_records(fixed_records)
    blocks = inference.claim_inference(Inputs.of(results, records_table))
    text = " ".join(text_of(b) for b in blocks if hasattr(b, "parts"))
    acc = next(m.accuracy for m in results.inference.settings if (m.dropout1, m.dropout2)
               == (0.2, 0.5))
    assert f"(95% CS {fmt_ci_pp(acc.cs95)}), " in text and "settled at 10 seeds" in text
    assert fmt_ci_pp(acc.ci95) not in text
    assert "cap reached at 30 seeds; CS [" in text and ANYTIME_BASIS in text
    table_block = next(b for b in blocks if hasattr(b, "rows") and b.rows[0][0] == "(0, 0)")
    cell = dict((r[0], r[5]) for r in table_block.rows)["(0.2, 0.5)"]
    assert cell.startswith(f"{wording_pp(acc.mean_diff)} CS {fmt_ci_pp(acc.cs95)}: ")
    assert cell.endswith("; settled at 10 seeds)") and "anytime p" in cell
    plain = " ".join(text_of(b) for b in inference.claim_inference(
        Inputs.of(fixed_records, records_table)) if hasattr(b, "parts"))
    assert "CS" not in plain and "anytime" not in plain


def wording_pp(x):
    from study.report.wording import fmt_pp
    return fmt_pp(x)


def test_scorecard_c4_and_c7_say_where_they_stopped(fixed_records, records_table):
    from study.report import scorecard

    results = decided_records(fixed_records)
    c4 = scorecard.score_implementations(Inputs.of(results, records_table))
    first = results.diagnostics.implementations.records[0]
    assert c4.settle.startswith(f"settled at 10 seeds (scratch {wording_setting(first)})")
    assert "cap reached at 30 seeds; CS [" in c4.settle
    c7 = scorecard.score_inference(Inputs.of(results, records_table))
    # Two strata (torch, scratch), each with its C7 records: each named with its stratum.
    assert c7.settle.startswith("settled at 10 seeds ((0.2, 0.5) in scratch, (0.2, 0.5) in "
                                "torch); cap reached at 30 seeds; CS [")
    fixed4 = scorecard.score_implementations(Inputs.of(fixed_records, records_table))
    fixed7 = scorecard.score_inference(Inputs.of(fixed_records, records_table))
    assert "settled at" not in fixed4.settle + fixed7.settle and "CS" not in fixed4.settle


def wording_setting(r):
    from study.report.wording import fmt_setting
    return fmt_setting(r)


def test_bottom_lines_of_c4_and_c7_name_the_stops(fixed_records, records_table):
    from study.report import claims

    def line(key, results):
        claim = next(c for c in claims.CLAIMS if c.key == key)
        return claim.bottom_line(Inputs.of(results, records_table))

    results = decided_records(fixed_records)
    c4, c7 = line("C4", results), line("C7", results)
    assert "(verdicts read off each 95% CS at its stop: settled at 10 seeds (" in c4
    assert "cap reached at 30 seeds; CS [" in c4
    assert "; MC-averaged against eval-mode accuracy, " in c7
    assert ("verdicts read off each 95% CS at its stop: settled at 10 seeds ((0.2, 0.5) in "
            "scratch, (0.2, 0.5) in torch)") in c7
    assert "95% CS" not in line("C4", fixed_records) + line("C7", fixed_records)


def test_the_cs_figure_draws_open_c4_and_c7_records(fixed_records, records_table, tmp_path):
    from study.report import figures

    results = decided_records(fixed_records)
    made = {f.name for f in figures.make_figures(results, table=records_table,
                                                 out_dir=tmp_path)}
    assert "cs_looks" in made  # no C1 comparison was adaptive: the C4/C7 records alone
    scratch = next(s for s in results.strata if s.stratum["implementation"] == "scratch")
    torch = next(s for s in results.strata if s.stratum["implementation"] == "torch")
    tracks = figures.cs_tracks(results, scratch)
    capped = results.diagnostics.implementations.records[1]
    # The capped C4 record and the capped C7 one; the settled ones had a single look.
    assert [t.style for t in tracks] == ["--", ":"]
    assert tracks[0].record is capped and tracks[0].label.startswith("scratch \u2212 torch")
    mc = figures.cs_tracks(results, torch)
    assert [(t.style, t.label) for t in mc] == [(":", "MC \u2212 eval (0.6, 0.8)")]
    ax = figures.plot_cs_looks([], results.equivalence_margin, tracks=tracks)
    (drawn,) = [x for x in ax.get_lines() if x.get_label() == tracks[0].label]
    assert drawn.get_linestyle() == "--"
    assert list(drawn.get_xdata()) == [look.seeds for look in capped.cs_looks]
    plain = {f.name for f in figures.make_figures(fixed_records, records_table, tmp_path / "b")}
    assert "cs_looks" not in plain


def test_no_sentence_claims_family_wise_control_for_adaptive_verdicts(fixed_records,
                                                                      records_table):
    from study.report.wording import ANYTIME_BASIS

    results = decided_records(fixed_records)
    contrast = dataclasses.replace(results.comparisons[0], dropout1=0.8, dropout2=0.6,
                                   baseline=[0.6, 0.8], cs95=(-0.031, -0.005), p_anytime=0.001,
                                   stopped_at=15, stop_reason="settled")
    results = dataclasses.replace(results, contrasts=[contrast])
    md = render_markdown(sections.document(Inputs.of(results, records_table)), "x")
    assert ANYTIME_BASIS in md and "applies to the fixed-n analyses only" in md
    lowered = md.lower()
    assert "family-wise" not in lowered and "familywise" not in lowered
    c3 = md[md.index("C3\u2032: too much"):md.index("C4: hand-written")]
    assert "anytime-valid t-mixture, settled at 15 seeds" in c3 and "Holm family" not in c3

"""Report: files appear, the PDF is reproducible to the byte, and the words follow the results.

    .venv/bin/python -m pytest tests/test_report.py -q

The results are built by hand (tests/results_factory.py) with planted verdicts, so every
sentence checked here is checked against a number chosen in the test.
"""

from __future__ import annotations

import dataclasses
import math
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from study.analysis import diagnostics
from study.report import figures
from study import report
from study.protocol.schema import Analysis
from study.report import claims, describe, inference, sections, tables, wording
from study.report.bottomline import BottomLine
from study.report.context import Inputs, find_comparison, find_group
from study.report.diagnostics import claim_repeatability, sources_section
from study.report.document import Code, Strong, para, text_of
from study.report.render_markdown import escape_markdown, render_markdown
from study.report.render_typst import escape_typst, render_typst
from study.results import Results
from study.results.diagnostics import Diagnostics
from study.analysis.table import CURVE_COLUMNS, RUN_COLUMNS, RunTable
from tests.results_factory import (BASELINE, LEFT_OUT, comparison_at, make_results, make_table,
                                   with_passes, with_protocol)

# C7's figure is drawn only where runs made stochastic passes (test_c7_... below), C6's only
# where training-set sizes vary (tests/test_interaction.py), the CS one only for an adaptive
# study (tests/test_report_adaptive.py).
STRATUM_FIGURES = [n for n in figures.CAPTIONS
                   if n not in figures.DIAGNOSTIC_FIGURES + figures.CLAIM_FIGURES + ("cs_looks",)]


@pytest.fixture(scope="module")
def two_strata() -> tuple[Results, RunTable]:
    table = make_table(("torch", "scratch"), name="d2l#drop_out*[x]$", replicate=True)
    return make_results(table), table


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory,
            two_strata: tuple[Results, RunTable]) -> report.ReportFiles:
    results, table = two_strata
    return report.write_report(results, table, tmp_path_factory.mktemp("report"))


@pytest.fixture(scope="module")
def md(written: report.ReportFiles) -> str:
    return written.markdown.read_text()


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.;])\s+", text) if s]


def _section(md: str, start: str, end: str) -> str:
    return md[md.index(start):md.index(end, md.index(start))]


def _markdown(results: Results, table: RunTable) -> str:
    return render_markdown(sections.document(Inputs.of(results, table)), "x")


def test_writes_every_file(written: report.ReportFiles) -> None:
    for path in (written.pdf, written.markdown, written.typst, written.style):
        assert path.stat().st_size > 0
    assert written.pdf.read_bytes().startswith(b"%PDF")
    assert written.style in written.all()
    # The generated body carries content only: the look comes from the packaged style file.
    typ = written.typst.read_text()
    assert typ.startswith('#import "style.typ": *\n#show: paper.with(')
    assert "set page(" not in typ and "set page(" in written.style.read_text()
    assert len(written.figures) == 6  # no diagnostics in these results: no diagnostic figures
    for f in written.figures:
        assert f.png.stat().st_size > 0 and f.svg.stat().st_size > 0
        assert f"figures/{f.png.name}" in written.markdown.read_text()
        assert f"figures/{f.svg.name}" in typ


def test_pdf_is_byte_identical_across_compilations(written: report.ReportFiles,
                                                   tmp_path: Path) -> None:
    copy = tmp_path / "again.pdf"
    report.compile_pdf(written.typst, copy)
    assert copy.read_bytes() == written.pdf.read_bytes()


def test_whole_report_is_reproducible(written: report.ReportFiles, two_strata,
                                      tmp_path: Path) -> None:
    results, table = two_strata
    again = report.write_report(results, table, tmp_path)
    assert again.pdf.read_bytes() == written.pdf.read_bytes()
    assert again.markdown.read_text() == written.markdown.read_text()
    for fa, fb in zip(again.figures, written.figures):
        assert fa.svg.read_bytes() == fb.svg.read_bytes()
        assert fa.png.read_bytes() == fb.png.read_bytes()


def test_figures_facet_every_stratum(written: report.ReportFiles, two_strata) -> None:
    assert [f.name for f in written.figures] == STRATUM_FIGURES
    for f in written.figures:
        # One panel per stratum, side by side: strata are never pooled into one panel. The
        # final accuracies get a second panel per stratum, zoomed past (1, 1) at chance.
        panels = 4 if f.name == "final_accuracy" else 2
        assert f.svg.read_text().count('<g id="axes_') == panels
        columns = 1 if f.name == "forest" else 2
        assert f.width_in == pytest.approx(columns * figures.PANEL_SIZE[0] if columns == 2
                                           else figures.SINGLE_PANEL[0])
    assert figures.panel_titles(two_strata[0].strata) == ["implementation: torch",
                                                         "implementation: scratch"]


def test_abstract_states_the_numbers_from_the_results(two_strata) -> None:
    results, table = two_strata
    text = text_of(sections.abstract(Inputs.of(results, table)))
    torch = results.strata[0].stratum
    base = find_group(results, torch, *BASELINE)
    best = find_group(results, torch, 0.0, 0.0)
    assert wording.fmt_mean_sd(base) in text and wording.fmt_mean_sd(best) in text
    assert wording.fmt_pct(base.mean) == f"{base.mean * 100:.2f}%"
    diff = find_comparison(results, torch, 0.0, 0.0)
    assert f"{wording.fmt_pp(diff.mean_diff)} {wording.fmt_ci_pp(diff.mean_diff_ci95)}" in text
    assert "different after Holm correction (p = 0.004), not robust" in text
    # A TOST verdict keeps the interval of its decision, even in the abstract.
    equivalent = find_comparison(results, torch, 0.6, 0.8)
    assert (f"equivalent within ±0.50 pp (Holm-adjusted 97.5% CI "
            f"{wording.fmt_ci_pp(equivalent.tost_ci)} pp), robust") in text
    assert "primary endpoint (final-epoch test accuracy), each verdict checked under 6 analyses" \
        in text
    for stratum in results.strata:
        assert stratum.label in text


def test_wording_rule_follows_planted_verdicts(md: str, two_strata) -> None:
    results, _ = two_strata
    # "No real difference" only for equivalent comparisons: each use is followed by the
    # equivalence it rests on, except the one sentence in the Verdicts intro that defines it.
    uses = [s for s in _sentences(md) if "no real difference" in s.lower()]
    assert sum("equivalent within" not in s for s in uses) == 1
    for c in results.comparisons:
        phrase = wording.verdict_phrase(c, results)
        if c.verdict == "equivalent":
            assert phrase.startswith("no real difference")
        else:
            assert "no real difference" not in phrase.lower()
        if c.verdict == "inconclusive":
            assert "not shown different" in phrase and "needs more seeds" in phrase
            assert "about 23 seeds per setting to detect the observed gap at 80% power" in phrase
    equivalents = sum(c.verdict == "equivalent" for c in results.comparisons)
    # The abstract is the only prose that names (0.6, 0.8): once per equivalent comparison,
    # plus the definition in the Verdicts intro.
    assert md.lower().count("no real difference") == equivalents + 1


def test_tost_verdicts_carry_the_interval_of_the_same_decision(two_strata) -> None:
    results, _ = two_strata
    c = comparison_at(results, (0.6, 0.8))
    # The planted Holm multiplier of 4 makes the dual interval a 97.5% one: named as such.
    assert "(TOST, Holm-adjusted p = 0.020; Holm-adjusted 97.5% CI [" in \
        wording.verdict_phrase(c, results)
    lo, hi = (wording.fmt_pp(v, unit=False) for v in c.tost_ci)
    assert f"97.5% CI [{lo}, {hi}] pp, inside ±0.50 pp" in wording.verdict_phrase(c, results)
    # A Holm multiplier of 1 is the plain 90% interval; no adjusted interval: the 90% one, so said.
    plain = dataclasses.replace(c, tost_ci_level=0.9)
    assert "; 90% CI [" in wording.verdict_phrase(plain, results)
    assert "Holm-adjusted 90%" not in wording.verdict_phrase(plain, results)
    bare = dataclasses.replace(c, tost_ci=None, tost_ci_level=None)
    lo90 = wording.fmt_pp(c.tost_ci90[0], unit=False)
    assert f"90% CI, unadjusted [{lo90}," in wording.verdict_phrase(bare, results)
    # An inconclusive one says its interval reaches beyond the margin.
    assert "not inside ±0.50 pp" in wording.verdict_phrase(comparison_at(results, (0.9, 0.9)),
                                                           results)
    assert wording.tost_interval_cell(c, results.alpha) == f"[{lo}, {hi}] 97.5%*"


def test_negligible_reads_as_a_real_gap_inside_the_margin(two_strata) -> None:
    results, _ = two_strata
    c = dataclasses.replace(comparison_at(results, (0.0, 0.0)), verdict="negligible")
    phrase = wording.verdict_phrase(c, results)
    assert phrase.startswith("negligible: a real gap (Holm-adjusted p = 0.004), shown to lie "
                             "within ±0.50 pp (TOST")
    assert "Holm-adjusted 97.5% CI" in phrase and "no real difference" not in phrase
    assert wording.verdict_word("negligible", 0.005) == "negligible (a real gap within ±0.50 pp)"
    assert "negligible (a real gap within ±0.50 pp) in 1 of 2" in \
        wording.verdict_counts([SimpleNamespace(verdict="negligible"),
                                SimpleNamespace(verdict="different")], 0.005)
    # Diagnostics records (results_diagnostics.PairedRecord) take the four verdicts too.
    record = SimpleNamespace(verdict="negligible", p_adjusted=0.01, tost_p_adjusted=0.02)
    assert wording.record_verdict_phrase(record, 0.005) == (
        "negligible: a real gap (Holm-adjusted p = 0.010), shown to lie within ±0.50 pp (TOST, "
        "Holm-adjusted p = 0.020)")
    names = {"negligible": ["(0.2, 0.5)"], "equivalent": ["(0.5, 0.5)"]}
    assert wording.verdict_lists(names, 0.005, []) == (
        "a real gap shown within ±0.50 pp (negligible) at (0.2, 0.5); no real difference "
        "(equivalent within ±0.50 pp) at (0.5, 0.5)")


def test_constant_gap_says_settled_by_construction(two_strata) -> None:
    results, _ = two_strata
    c = dataclasses.replace(comparison_at(results, (1.0, 1.0)), settled_by_construction=True,
                            p_adjusted=None)
    phrase = wording.verdict_phrase(c, results)
    assert phrase == ("different, settled by construction: the gap is the same in every seed "
                      "and lies outside ±0.50 pp, so no test could add to it")
    inside = dataclasses.replace(c, verdict="equivalent")
    assert wording.verdict_phrase(inside, results).startswith(
        "no real difference: equivalent within ±0.50 pp, settled by construction")
    assert "different (by construction)" in render_markdown(
        [tables.comparison_table(results, results.strata[0], [c])], "x")


def test_variance_not_shown_different_never_reads_as_same(written: report.ReportFiles,
                                                          two_strata) -> None:
    results, _ = two_strata
    c = results.comparisons[0]
    assert c.variance_verdict == "not_shown_different"
    phrase = wording.variance_phrase(c, results)
    assert "not shown" in phrase
    for text in (phrase, written.markdown.read_text(), written.typst.read_text()):
        lowered = text.lower()
        for wrong in ("same variance", "equal variance", "same spread", "variances are equal",
                      "spreads are equal"):
            assert wrong not in lowered


def test_inconclusive_without_seed_estimate_says_why(two_strata) -> None:
    results, _ = two_strata
    c = dataclasses.replace(comparison_at(results, (0.9, 0.9)), seeds_needed=None,
                            seeds_needed_margin=None, seeds_needed_equivalence=None,
                            reason="zero variance in both groups")
    phrase = wording.verdict_phrase(c, results)
    assert "needs more seeds" in phrase and "zero variance in both groups" in phrase


def test_comparison_notes_from_the_analysis_are_shown(two_strata) -> None:
    results, table = two_strata
    noted = [dataclasses.replace(c, reason="2 shared seeds: Welch") if c.dropout1 == 0.9 else c
             for c in results.comparisons]
    md = _markdown(dataclasses.replace(results, comparisons=noted), table)
    assert md.count("Notes from the analysis:\n\n- (0.9, 0.9): 2 shared seeds: Welch.") == 2
    assert "Notes from the analysis" not in _markdown(results, table)


def test_what_it_would_take_gives_all_three_seed_counts(md: str, two_strata) -> None:
    results, _ = two_strata
    c = comparison_at(results, (0.9, 0.9))
    assert wording.seeds_needed_text(c, results) == (
        "about 23 seeds per setting to detect the observed gap at 80% power, 9 to detect a gap "
        "the size of the margin (±0.50 pp), 12 for TOST to show equivalence if the true gap "
        "were 0")
    assert "| (0.9, 0.9) | inconclusive | 0.62 | 23 | 9 | 12 |" in md
    tiny = dataclasses.replace(c, seeds_needed=None)  # a gap too small for any count
    assert wording.seeds_needed_text(tiny, results) == (
        "about 9 seeds per setting to detect a gap the size of the margin (±0.50 pp), 12 for "
        "TOST to show equivalence if the true gap were 0, no count for the observed gap (see "
        "the notes)")
    assert "| seeds: observed gap | seeds: gap of ±0.50 pp | seeds: equivalence if gap 0 |" in md


def test_c1_states_primary_verdict_robustness_and_the_disagreeing_analyses(md: str) -> None:
    c1 = _section(md, "C1: no dropout", "C2: (1, 1)")
    assert "Under the primary analysis (final-epoch test accuracy, t test) the gap of (0, 0) " \
           "to the baseline is +" in c1
    # How they disagree is said (inconclusive), never just "disagree", which reads as "opposite".
    assert ": different after Holm correction (p = 0.004). This verdict is not robust: 2 of 5 " \
           "other analyses give another verdict (2 inconclusive: last:3 / t test gives " \
           "inconclusive; last:3 / 20%-trimmed (Yuen) gives inconclusive)." in c1
    assert c1.count("not robust") == 2  # one line per stratum


def test_c1_says_robust_when_every_analysis_agrees(two_strata) -> None:
    results, table = two_strata
    agreed = [dataclasses.replace(c, robust=True, disagreeing=[]) for c in results.comparisons]
    c1 = _section(_markdown(dataclasses.replace(results, comparisons=agreed), table),
                  "C1: no dropout", "C2: (1, 1)")
    assert "This verdict is robust: all 6 analyses (endpoints × tests) give this verdict." in c1
    assert "not robust" not in c1


def test_c1_with_no_dropout_as_baseline_words_every_comparison(two_strata) -> None:
    results, table = two_strata
    c = comparison_at(results, (0.6, 0.8))
    zero = dataclasses.replace(results, baseline=[0.0, 0.0],
                               comparisons=[dataclasses.replace(c, baseline=[0.0, 0.0])])
    c1 = _section(_markdown(zero, table), "C1: no dropout", "C2: (1, 1)")
    assert "(0, 0) is the baseline; it is shown better than 0 of 1 dropout settings." in c1
    assert "the gap of (0.6, 0.8) to the baseline" in c1 and "robust: all 6 analyses" in c1


def test_multiverse_table_has_a_verdict_per_endpoint_and_test(md: str) -> None:
    assert ("| setting | final t\\* | final rank | final trimmed | last:3 t | last:3 rank | "
            "last:3 trimmed |") in md
    assert ("| (0, 0) | different (+) | different (+) | different (+) | inconclusive | "
            "different (+) | inconclusive |") in md
    assert "| (0.9, 0.9) | inconclusive | different (−) | inconclusive |" in md


def test_multiverse_estimates_table_shows_each_tests_own_interval(md: str, two_strata) -> None:
    results, _ = two_strata
    c = comparison_at(results, (0.0, 0.0))
    assert ("| setting | endpoint | t: mean gap (pp) \\[95% CI\\] | rank: HL shift (pp) "
            "\\[95% CI\\] | trimmed: trimmed-mean gap (pp) \\[95% CI\\] |") in md
    cells = {a.test: f"{wording.fmt_pp(a.mean_diff, unit=False)} "
                     f"{escape_markdown(wording.fmt_ci_pp(a.ci95))}"
             for a in c.multiverse if a.endpoint == "last:3"}
    assert f"| (0, 0) | last:3 | {cells['t']} | {cells['rank']} | {cells['trimmed']} |" in md
    assert len(set(cells.values())) == 3  # each test's own interval, not one copied
    assert "takes 6 seeds" not in md  # every rank interval was computable here
    short = dataclasses.replace(c, multiverse=[dataclasses.replace(a, ci95=None)
                                               if a.test == "rank" else a for a in c.multiverse])
    table = tables.multiverse_estimates_table(results, results.strata[0], [short])
    assert "takes 6 seeds" in table.caption and "n/a" in table.rows[0][3]


def test_divergence_is_counted_and_tested_where_runs_diverged(md: str, two_strata) -> None:
    results, _ = two_strata
    c3 = _section(md, "C3: (0.9, 0.9)", "C4: hand-written")
    assert ("1 of 5 runs of (0.9, 0.9) and 0 of 5 of the baseline diverged and are left out of "
            "the accuracy test; the divergence rate was not shown to differ from the "
            "baseline's (Fisher's exact test, Holm-adjusted p = 1.000).") in c3
    assert "| (0.9, 0.9) | 4 | 1 | 68.50% |" in md  # n finite, n diverged
    # No run of (0, 0) or the baseline diverged: C1 says nothing about divergence.
    assert "diverged" not in _section(md, "C1: no dropout", "C2: (1, 1)")
    c = dataclasses.replace(comparison_at(results, (0.9, 0.9)), divergence_verdict="different",
                            divergence_p_adjusted=0.01)
    assert "the divergence rate differs from the baseline's (Fisher's exact test, " \
           "Holm-adjusted p = 0.010)" in wording.divergence_phrase(c, results)


def test_endpoints_and_robustness_set_are_stated(md: str) -> None:
    method = _section(md, "2.3 Statistics", "3. Results")
    assert "The primary endpoint, declared before the runs, is final (final-epoch test " \
           "accuracy), analysed by the t test." in method
    assert "endpoints final, last:3 crossed with the t test, rank test (Hodges-Lehmann), " \
           "20%-trimmed (Yuen)" in method
    assert f"Left out of the robustness set: {LEFT_OUT[0]}." in method
    assert f"Endpoints left out (the runs are too short for them): {LEFT_OUT[0]}." in md
    assert "scipy.stats.bootstrap BCa intervals with 10,000 resamples, seeded from the " \
           "analysis seed 0; paired comparisons resample seeds as pairs" in method


def test_method_states_measured_coverage_and_labels_approximate(monkeypatch, two_strata) -> None:
    results, table = two_strata
    assert "not stated by this version of study.stats" in sections.bootstrap_text(results) \
        or wording.coverage()  # the statistics branch may already state it
    # The form study.stats gives it: {(interval, n): coverage}.
    measured = {("mean", 5): 0.91, ("mean", 10): 0.93, ("mean", 20): 0.94, ("sd", 5): 0.72,
                ("sd", 10): 0.81, ("sd", 20): 0.88, ("sd_ratio", 5): 0.88,
                ("sd_ratio", 10): 0.91, ("sd_ratio", 20): 0.93}
    monkeypatch.setattr(wording.stats, "COVERAGE", measured, raising=False)
    monkeypatch.delattr(wording.stats, "APPROXIMATE", raising=False)
    text = sections.bootstrap_text(results)
    assert "group SD 72.0% at n = 5, 81.0% at n = 10, 88.0% at n = 20" in text
    assert "Below 90% at n = 10, these are labelled approximate: group SD." in text
    md = _markdown(results, table)
    assert "SD CI: bootstrap (approximate)" in md and "CI: bootstrap (approximate))" not in md
    nested = {"sd": {10: 0.81}}  # {interval: {n: coverage}} reads the same
    monkeypatch.setattr(wording.stats, "COVERAGE", nested, raising=False)
    assert wording.coverage() == {"sd": {10: 0.81}}
    # The module's own list wins over the 90% rule.
    monkeypatch.setattr(wording.stats, "APPROXIMATE", ("sd", "sd_ratio"), raising=False)
    assert "labelled approximate: SD ratio, group SD." in sections.bootstrap_text(results)


# --- what ran: the model, data and training come from the runs' protocol (defect 9) -----------


def test_lenet_report_describes_lenet(two_strata) -> None:
    _, table = two_strata
    lenet = with_protocol(table, "determinism-lenet.yaml")
    md = _markdown(make_results(lenet), lenet)
    abstract = md[:md.index("1. The question")]
    assert "We trained d2l's LeNet-5 on Fashion-MNIST" in abstract
    model_row = next(line for line in md.splitlines() if line.startswith("| model |"))
    assert "LeNet-5 with sigmoid activations" in model_row and "Xavier-uniform" in model_row
    assert "| training | SGD, lr 0.9, batch 256, 5 epochs, cross-entropy |" in md
    assert "the first 20,000 training images" in md
    for wrong in ("MLP 784", "256-256", "hidden \\[256, 256\\]", "N(0, 0.01²)", "d2l.ai dropout MLP"):
        assert wrong not in md, wrong
    assert "One model (d2l's LeNet-5), learning rate (0.9) and epoch budget (5 epochs)" in md


def test_overfitting_report_describes_sizes_and_their_budgets(two_strata) -> None:
    _, table = two_strata
    sized = with_protocol(table, "overfitting.yaml")
    md = _markdown(make_results(sized), sized)
    assert "We trained an MLP 784-256-256-10 on Fashion-MNIST" in md
    assert ("SGD, batch 256, 400 epochs at lr 0.2 (test every 20) at 1,000 images; 100 epochs "
            "at lr 0.2 (test every 10) at 3,000 images; 30 epochs at lr 0.2 (test every 5) at "
            "10,000 images; otherwise 5 epochs at lr 0.3, cross-entropy") in md
    assert "training-set sizes 1,000, 3,000, 10,000, all 60,000 (the first N images" in md


def test_runs_without_a_protocol_say_the_setup_was_not_recorded(two_strata) -> None:
    _, table = two_strata
    bare = with_protocol(table, None)
    md = _markdown(make_results(bare), bare)
    assert "We analysed runs of a model whose set-up was not recorded" in md
    assert "so the model, data and training are not recorded" in md
    assert "MLP" not in md.replace("trains an MLP with dropout", "")  # only the lesson's own
    assert "were not recorded with these runs, so the verdicts cannot be tied to them" in md


def test_cudnn_expectation_follows_the_model() -> None:
    from study.report.diagnostics import cudnn_expectation

    lenet = describe.setup({"model": {"arch": "lenet", "init": "xavier"}})
    mlp = describe.setup({"model": {"arch": "mlp", "hidden": [8, 8], "init_std": 0.1}})
    assert "which this model has" in cudnn_expectation(lenet)
    assert "this model has neither and runs on BLAS" in cudnn_expectation(mlp)
    assert "was not recorded" in cudnn_expectation(describe.setup(None))


# --- structure ---------------------------------------------------------------------------------


def test_a_new_claim_is_one_entry(monkeypatch, two_strata) -> None:
    results, table = two_strata
    extra = claims.Claim("C6", "dropout makes training slower;", "dropout costs time",
                         lambda inputs: [para(f"{len(inputs.results.groups)} groups seen.")],
                         lambda inputs: BottomLine("not tested", "no timings were recorded"))
    monkeypatch.setattr(claims, "CLAIMS", (*claims.CLAIMS, extra))
    md = _markdown(results, table)
    assert "- **C6** dropout makes training slower;" in md
    assert (f"### 4.{len(claims.CLAIMS)} C6: dropout costs time\n\n**C6 not tested: no timings "
            f"were recorded.**\n\n10 groups seen.") in md


def test_typst_escaping_keeps_user_strings_literal(tmp_path: Path) -> None:
    nasty = "a#b*c_d`e$f<g>h@i[j]k\\l~m=n/o+p-q // not a comment /* nor this */"
    escaped = escape_typst(nasty)
    doc = render_typst([para(nasty, Code(nasty), Strong(nasty))], nasty)
    typ = tmp_path / "x.typ"
    typ.write_text(doc)
    report.compile_pdf(typ, tmp_path / "x.pdf")  # raises on any markup error
    assert escaped.count("\\#") == 1 and "//" not in escaped
    if shutil.which("pdftotext"):
        text = subprocess.run(["pdftotext", str(tmp_path / "x.pdf"), "-"], capture_output=True,
                              text=True, check=True).stdout
        assert "a#b*c_d`e$f<g>h@i[j]k\\l~m=n/o+p-q" in text.replace("\n", "")


def test_report_names_experiment_protocol_and_environment(md: str) -> None:
    assert "d2l\\#drop\\_out\\*\\[x\\]\\$" in md  # Markdown escaped, so it shows literally
    assert "python -m study report protocols/d2l#drop_out*[x]$.yaml" in md
    assert "make study" in md
    # The machine and the commit are in environment.md, which the report names.
    assert "environment.md beside this report" in md
    assert "Test CPU" not in md and "296de8c" not in md
    assert "Appendix A" in md and "equivalence_margin: 0.005" in md


def test_strata_are_reported_separately(md: str, two_strata) -> None:
    results, _ = two_strata
    for stratum in results.strata:
        assert f"Stratum {stratum.label}" in md
    # 6 per stratum (groups, comparisons, multiverse verdicts and estimates, power, spread)
    # + protocol, C4, environment
    assert md.count("**Table") == 2 * 6 + 3
    # What every run shares is said once, in the method section, in words.
    method = md[md.index("Method"):md.index("Hardware and software")]
    assert "Every run shares:" in method and "1 thread" not in method.split("Every run shares:")[0]


def test_without_diagnostics_c5_says_what_was_not_measured(md: str) -> None:
    c5 = md[md.index("C5: a fixed seed"):md.index("Reproducibility")]
    assert "did not measure run-to-run repeatability" in c5 and "rerun python -m study analyze" in c5
    assert "No GPU runs were in the data" in c5
    assert "Sources of variance" not in md


def test_report_from_analysis_module_output(tmp_path: Path) -> None:
    """End to end through analysis.analyze: needs the statistics branch's new stats functions."""
    analysis = pytest.importorskip("study.analysis.comparisons")

    table = make_table(replicate=True)
    results = analysis.analyze(table, BASELINE, Analysis(bootstrap=200))
    files = report.write_report(results, table, tmp_path)
    assert files.pdf.read_bytes().startswith(b"%PDF")
    text = text_of(sections.abstract(Inputs.of(results, table)))
    base = find_group(results, results.strata[0].stratum, *BASELINE)
    assert wording.fmt_mean_sd(base) in text
    # The replicates of make_table repeat seed 0 exactly: the diagnostics say so, once per cell.
    assert "bit-identical weights in 5/5 on cpu." in text
    assert "| cpu / default / sequential / 2 | 5 | 5/5 (100%) |" in files.markdown.read_text()


def test_first_layer_claim_reads_the_declared_contrast(tmp_path: Path) -> None:
    """C3': the contrast (0.8, 0.6) against (0.6, 0.8) through analysis.analyze, worded with
    its verdict and what it says about the lesson's guess; undeclared, the section says so."""
    from study.analysis import comparisons as analysis

    table = make_table()
    runs = table.runs.copy()
    moved = runs[(runs.dropout1 == 0.6) & (runs.dropout2 == 0.8)].copy()
    moved["dropout1"], moved["dropout2"] = 0.8, 0.6
    moved["test_acc"] -= 0.03  # more first-layer dropout loses 3 points in every seed, +- noise
    moved["test_acc"] += np.random.default_rng(0).normal(0, 0.002, len(moved))
    moved["run_id"] = moved["run_id"] + "-first"
    table = dataclasses.replace(table, runs=pd.concat([runs, moved], ignore_index=True))
    options = Analysis(bootstrap=200, contrasts=(((0.8, 0.6), (0.6, 0.8)),))
    results = analysis.analyze(table, BASELINE, options)
    (bullets,) = claims.claim_first_layer(Inputs.of(results, table))
    text = text_of(bullets.items[0])
    assert re.search(r"\(0\.8, 0\.6\) against \(0\.6, 0\.8\) is [\u2212-](2\.9|3\.0)\d pp", text), text
    assert "different" in text and "costs accuracy here, as the lesson guessed" in text
    plain = analysis.analyze(table, BASELINE, Analysis(bootstrap=200))
    (missing,) = claims.claim_first_layer(Inputs.of(plain, table))
    assert "was not declared" in text_of(missing)


def test_c7_section_states_flips_verdicts_trend_and_shows_its_figure(tmp_path: Path) -> None:
    """C7 through analysis.analyze on runs with planted passes (results_factory.with_passes)."""
    from study.analysis import comparisons as analysis

    table = with_passes(make_table())
    results = analysis.analyze(table, BASELINE, Analysis(bootstrap=200))
    files = report.write_report(results, table, tmp_path)
    md = files.markdown.read_text()
    section = _section(md, "C7: dropout left on at inference flips predictions", "## 5.")
    blocks = inference.claim_inference(Inputs.of(results, table, files.figures))
    text = " ".join(text_of(b) for b in blocks if hasattr(b, "parts"))
    top = max(results.inference.settings, key=lambda s: s.flip_rate.mean)
    assert (top.dropout1, top.dropout2) == (0.9, 0.9)
    assert (f"two passes disagree on {wording.fmt_pct(top.flip_rate.mean)} "
            f"{wording.fmt_ci_pct(top.flip_rate.ci95)} of test images at (0.9, 0.9) (e.g. test "
            f"image 1000 in seed 0)") in text
    assert "Spearman \u03c1 = " in text and "(1, 1) left out" in text
    assert "15 equal-width confidence bins" in text and "no equivalence is claimed" in text
    (table_block,) = [b for b in blocks if hasattr(b, "rows")]
    assert [r[0] for r in table_block.rows] == ["(0, 0)", "(0.2, 0.5)", "(0.6, 0.8)", "(0.9, 0.9)",
                                               "(1, 1)"]
    nll = results.inference.settings[1].nll  # (0.2, 0.5): planted 0.02 nats lower
    assert table_block.rows[1][6].startswith(f"{wording.fmt_num(nll.mean_diff, 3)} [")
    assert table_block.rows[1][6].endswith("different, p < 0.001")
    # NLL and ECE cells never read "equivalent"; the accuracy cells carry the usual verdicts.
    assert not any("equivalent" in r[6] + r[7] for r in table_block.rows)
    assert table_block.rows[0][5].endswith("equivalent")
    assert "figures/mc_flip_rate.png" in section
    assert "mc_flip_rate.png" not in _section(md, "## 3.", "## 4.")  # placed with C7 only
    assert any(f.name == "mc_flip_rate" for f in files.figures)


def test_without_passes_c7_says_the_data_do_not_speak(md: str) -> None:
    assert "no run made stochastic passes with dropout on" in md


# --- diagnostics: synthetic runs with planted findings, through study.diagnostics.analyze ----

DIAG_OPTIONS = Analysis(alpha=0.05, equivalence_margin=0.005, bootstrap=500, power=0.8)


def _diag_row(setting, seed, acc, *, device="cpu", determinism="default", implementation="torch",
              vary="all", replicate=0, sha=None, keep=(math.nan, math.nan)) -> dict:
    name = f"{setting}-{seed}-{device}-{determinism}-{implementation}-{vary}-{replicate}"
    return {"run_id": name, "run_name": name, "dropout1": setting[0], "dropout2": setting[1],
            "seed": seed, "device": device, "determinism": determinism,
            "implementation": implementation, "execution": "sequential", "randomness": "native",
            "mask_rng": "torch", "kernels": "torch", "vary": vary, "replicate": replicate, "status": "ok", "threads": "2",
            "textbook_check": True,
            "weights_sha256": sha or f"h{name}", "epochs_done": 10, "test_acc": acc,
            "train_acc": acc + 0.01, "train_loss": 0.4, "keep_rate1": keep[0],
            "keep_rate2": keep[1]}


def _diagnose(rows: list[dict]) -> Diagnostics:
    curves = pd.DataFrame({c: pd.Series(dtype=t) for c, t in CURVE_COLUMNS.items()})
    table = RunTable("1", "synthetic", pd.DataFrame(rows, columns=list(RUN_COLUMNS)), curves)
    return diagnostics.analyze(table, DIAG_OPTIONS, seed=0)


def _repeat_rows() -> list[dict]:
    """cpu: replicates and modes bitwise identical. cuda/default: replicate 1 of seeds 0 and 1
    is 0.1 pp off (4 of 12 differ); cuda/strict: other weights than cuda/default but the same
    accuracy within 0.03 pp. cuda against cpu: a per-seed gap."""
    rng = np.random.default_rng(1)
    rows = []
    for setting in ((0.0, 0.0), (0.2, 0.5)):
        base = 0.85 + rng.normal(0, 0.004, 6)
        gpu = base + rng.normal(0.001, 0.002, 6)
        jitter = rng.normal(0, 0.0003, 6)
        for seed in range(6):
            for mode in ("default", "strict"):
                for rep in (0, 1):
                    rows.append(_diag_row(setting, seed, base[seed], determinism=mode,
                                          replicate=rep, sha=f"c{setting}{seed}"))
                    acc, sha = gpu[seed], f"g{setting}{seed}"
                    if mode == "strict":
                        acc, sha = acc + jitter[seed], sha + "s"
                    elif rep == 1 and seed < 2:
                        acc, sha = acc + 0.001, sha + "x"
                    rows.append(_diag_row(setting, seed, acc, device="cuda", determinism=mode,
                                          replicate=rep, sha=sha))
    return rows


def _implementation_rows(n: int = 10) -> list[dict]:
    """scratch = torch within 0.08 pp per seed (equivalent), but at (0.9, 0.9) 1 pp per seed
    (inconclusive); scratch-randn 2 pp worse (different) and keeps P(N(0,1) > p) of units."""
    rng = np.random.default_rng(8)
    rows = []
    for setting in ((0.2, 0.5), (0.5, 0.5), (0.9, 0.9)):
        base = 0.85 + rng.normal(0, 0.004, n)
        noise = 0.01 if setting == (0.9, 0.9) else 0.0008
        accs = {"torch": base, "scratch": base + rng.normal(0, noise, n),
                "scratch-randn": base - 0.02 + rng.normal(0, 0.002, n)}
        for impl, values in accs.items():
            keep = [float(sps.norm.sf(p)) if impl == "scratch-randn" else 1 - p for p in setting]
            rows += [_diag_row(setting, s, values[s], implementation=impl,
                               keep=(keep[0] + 1e-4 * s, keep[1])) for s in range(n)]
    return rows


def _source_rows(n: int = 10) -> list[dict]:
    """Dropout masks alone give 1/8 of the full spread: against Summers & Dinneen."""
    rng = np.random.default_rng(0)
    rows = []
    for vary, spread in {"all": 0.004, "init": 0.004, "data": 0.0035, "dropout": 0.0005}.items():
        values = 0.85 + rng.normal(0, 1, n) * spread
        rows += [_diag_row((0.2, 0.5), s, values[s], vary=vary) for s in range(n)]
    return rows


def make_diagnostics() -> Diagnostics:
    """Each group of sections from its own table, so the planted effects do not mix."""
    rep, impl = _diagnose(_repeat_rows()), _diagnose(_implementation_rows())
    return dataclasses.replace(rep, keep_rates=impl.keep_rates,
                               implementations=impl.implementations,
                               variance_sources=_diagnose(_source_rows()).variance_sources)


@pytest.fixture(scope="module")
def with_diagnostics(two_strata) -> tuple[Results, RunTable]:
    results, table = two_strata
    return dataclasses.replace(results, diagnostics=make_diagnostics()), table


@pytest.fixture(scope="module")
def diag_written(tmp_path_factory: pytest.TempPathFactory,
                 with_diagnostics) -> report.ReportFiles:
    results, table = with_diagnostics
    return report.write_report(results, table, tmp_path_factory.mktemp("diag"))


def test_planted_diagnostics_are_what_the_fixture_says(with_diagnostics) -> None:
    diag = with_diagnostics[0].diagnostics
    verdicts = {(r.implementation, r.dropout1): r.verdict for r in diag.implementations.records}
    assert verdicts == {("scratch", 0.2): "equivalent", ("scratch", 0.5): "equivalent",
                        ("scratch", 0.9): "inconclusive", ("scratch-randn", 0.2): "different",
                        ("scratch-randn", 0.5): "different", ("scratch-randn", 0.9): "different"}
    assert [r.no_change_observed for r in diag.modes.records] == [True, False]
    assert diag.variance_sources.summaries[0].agreement == "disagree"


def test_repeatability_section_states_the_measured_numbers(diag_written) -> None:
    c5 = _section(diag_written.markdown.read_text(), "C5: a fixed seed", "Sources of variance")
    assert "In 3 of 4 device / mode strata every replicate gave bit-identical final weights" in c5
    assert "| cpu / strict / sequential / 2 | 12 | 12/12 (100%) | \\[74, 100\\] | 0 (exact) | 0 (exact) |" in c5
    assert "| cuda / default / sequential / 2 | 12 | 8/12 (67%) | \\[35, 90\\] | 0.10 |" in c5
    assert "4 of 12 replicates differ from their first run" in c5
    # A mode that changed nothing is a null result, never proof.
    assert "strict vs default on cpu / sequential: no change observed" in c5
    assert "not proof that the mode never matters" in c5
    assert "strict vs default on cuda / sequential: 12 of 12 runs differ bitwise" in c5
    assert "0 of 24 pairs gave identical weights" in c5
    assert "No GPU runs" not in c5


def test_repeatability_numbers_come_from_the_records(with_diagnostics) -> None:
    results, table = with_diagnostics
    md = render_markdown(claim_repeatability(results, table, describe.setup(table.protocol)), "x")
    rec = next(r for r in results.diagnostics.replicates.records
               if r.stratum["device"] == "cuda" and r.stratum["determinism"] == "default")
    assert rec.variance_ratio > 0
    assert f"{wording.fmt_num(rec.variance_ratio, 3)} times the seed-to-seed variance" in md
    assert f"| {wording.fmt_pp(rec.nondeterminism_sd, sign=False, unit=False)} |" in md


def test_implementation_section_tables_and_wording(diag_written, with_diagnostics) -> None:
    results, _ = with_diagnostics
    c4 = _section(diag_written.markdown.read_text(), "C4: hand-written", "C5: a fixed seed")
    assert ("scratch vs torch: no real difference (equivalent within ±0.50 pp) at (0.2, 0.5), "
            "(0.5, 0.5); not shown different nor equivalent at (0.9, 0.9) (needs more seeds") in c4
    assert "scratch-randn vs torch: different at (0.2, 0.5), (0.5, 0.5), (0.9, 0.9)." in c4
    for r in results.diagnostics.implementations.records:
        row = (f"| {r.implementation} | {wording.fmt_setting(r)} | cpu | 10 | "
               f"{wording.fmt_pp(r.mean_diff, unit=False)} | "
               f"{escape_markdown(wording.fmt_ci_pp(r.mean_diff_ci95))} |")
        assert row in c4, row
    # Keep rates: measured against nominal and the randn law, with the activation scale.
    randn = next(r for r in results.diagnostics.keep_rates.records
                 if r.implementation == "scratch-randn" and r.p == 0.5)
    assert "| scratch-randn | (0.2, 0.5) | 2 | 0.5 | 10 | 30.9% | 50.0% | 30.9% | 0.62 |" in c4
    assert randn.expected == pytest.approx(sps.norm.sf(0.5))
    assert "(no between-implementation test)" not in c4  # the paired test replaces that table
    assert "![Figure 7](figures/keep_rates.png)" in c4


def test_sources_section_states_sds_ratios_and_agreement(diag_written, with_diagnostics) -> None:
    results, _ = with_diagnostics
    md = diag_written.markdown.read_text()
    sources = _section(md, "5. Sources of variance", "6. Reproducibility")
    for r in results.diagnostics.variance_sources.records:
        sd = wording.fmt_pp(r.sd, sign=False, unit=False)
        ci = escape_markdown(wording.fmt_ci_pp(r.sd_ci95, sign=False))
        assert f"| (0.2, 0.5) | {r.source} | 10 | {sd} | {ci} |" in sources
    drop = results.diagnostics.variance_sources.records[-1]
    assert drop.source == "dropout" and drop.summers == "much_smaller"
    assert (f"| {wording.fmt_num(drop.ratio)} | "
            f"{escape_markdown(wording.fmt_ratio_ci(drop.ratio_ci95))} |") in sources
    assert "much smaller |" in sources and "1 (ref.)" in sources
    assert "The data disagree with Summers & Dinneen (ICML 2021)" in sources
    assert "figures/variance_sources.png" in sources


def test_abstract_carries_the_headline_diagnostics(with_diagnostics) -> None:
    results, table = with_diagnostics
    text = text_of(sections.abstract(Inputs.of(results, table)))
    assert ("bit-identical weights in 12/12 on cpu / default, 12/12 on cpu / strict, "
            "8/12 on cuda / default, 12/12 on cuda / strict.") in text
    assert "no change was observed for strict on cpu (a null result, not proof)" in text
    assert "scratch-randn keeps 42.1% of units at p = 0.2 (nominal 80.0%)" in text
    assert ("scratch equivalent within ±0.50 pp in 2 of 3, not shown different (needs more "
            "seeds) in 1 of 3 settings; scratch-randn different in 3 of 3 settings") in text
    assert "the data disagree in 1 of 1 settings" in text


def test_diagnostic_wording_rule_holds(diag_written) -> None:
    md = diag_written.markdown.read_text()
    # Every "no real difference" rests on a shown equivalence, but the Verdicts definition.
    uses = [s for s in _sentences(md) if "no real difference" in s.lower()]
    assert sum("equivalent within" not in s for s in uses) == 1
    for sentence in _sentences(md):
        if "inconclusive" in sentence and "|" not in sentence:
            assert "no real difference: " not in sentence.lower()
    for wrong in ("proves", "proof that", "same performance", "perform the same."):
        hits = [s for s in _sentences(md) if wrong in s.lower() and "not proof" not in s.lower()]
        assert not hits, hits


def test_inapplicable_sections_say_so_in_one_sentence(with_diagnostics) -> None:
    results, table = with_diagnostics
    # The sections a cpu-only, single-replicate, vary: [all] table gives, through the analysis.
    cpu_only = _diagnose([r for r in _repeat_rows() if r["device"] == "cpu" and not r["replicate"]])
    diag = dataclasses.replace(results.diagnostics, replicates=cpu_only.replicates,
                               variance_sources=cpu_only.variance_sources,
                               devices=cpu_only.devices)
    plain = dataclasses.replace(results, diagnostics=diag)
    md = render_markdown(claim_repeatability(plain, table, describe.setup(table.protocol)), "x")
    assert "did not measure run-to-run repeatability with a fixed seed (no replicate runs" in md
    assert "did not measure which random stream" in md and "(vary: \\[all\\])" in md
    assert "No GPU runs were in the data" in md  # the table holds cpu runs only
    assert sources_section(plain, []) == []


def test_diagnostic_figures_are_single_panels(diag_written) -> None:
    names = [f.name for f in diag_written.figures]
    assert names == STRATUM_FIGURES + list(figures.DIAGNOSTIC_FIGURES)
    for f in diag_written.figures[len(STRATUM_FIGURES):]:
        assert f.svg.read_text().count('<g id="axes_') == 1
        assert f"figures/{f.svg.name}" in diag_written.typst.read_text()


def test_diagnostics_pdf_is_byte_identical_across_compilations(diag_written, tmp_path) -> None:
    copy = tmp_path / "again.pdf"
    report.compile_pdf(diag_written.typst, copy)
    assert copy.read_bytes() == diag_written.pdf.read_bytes()

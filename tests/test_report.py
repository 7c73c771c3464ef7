"""Report: files appear, the PDF is reproducible to the byte, and the words follow the results.

    .venv/bin/python -m pytest tests/test_report.py -q
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from study import figures, report
from study.table import RunTable
from tests.test_figures import BASELINE, make_results, make_table


@pytest.fixture(scope="module")
def two_strata() -> tuple[dict[str, Any], RunTable]:
    table = make_table(("torch", "scratch"), name="d2l#drop_out*[x]$", replicate=True)
    return make_results(table), table


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory,
            two_strata: tuple[dict[str, Any], RunTable]) -> report.ReportFiles:
    results, table = two_strata
    return report.write_report(results, table, tmp_path_factory.mktemp("report"))


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.;])\s+", text) if s]


def test_writes_every_file(written: report.ReportFiles) -> None:
    for path in (written.pdf, written.markdown, written.typst):
        assert path.stat().st_size > 0
    assert written.pdf.read_bytes().startswith(b"%PDF")
    assert len(written.figures) == 6
    for f in written.figures:
        assert f.png.stat().st_size > 0 and f.svg.stat().st_size > 0
        assert f"figures/{f.png.name}" in written.markdown.read_text()
        assert f"figures/{f.svg.name}" in written.typst.read_text()


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
    assert [f.name for f in written.figures] == list(figures.CAPTIONS)
    for f in written.figures:
        # One panel per stratum, side by side: strata are never pooled into one panel.
        assert f.svg.read_text().count('<g id="axes_') == 2
        columns = 1 if f.name == "forest" else 2
        assert f.width_in == pytest.approx(columns * figures.PANEL_SIZE[0] if columns == 2
                                           else figures.SINGLE_PANEL[0])
    assert figures.panel_titles(two_strata[0]["strata"]) == ["implementation: torch",
                                                            "implementation: scratch"]


def test_abstract_states_the_numbers_from_the_results(two_strata) -> None:
    results, table = two_strata
    text = "".join(report.abstract(results, table).parts)
    torch = results["strata"][0]["stratum"]
    base = report.find_group(results, torch, *BASELINE)
    best = report.find_group(results, torch, 0.0, 0.0)
    assert report.fmt_mean_sd(base) in text and report.fmt_mean_sd(best) in text
    assert report.fmt_pct(base["mean"]) == f"{base['mean'] * 100:.2f}%"
    diff = report.find_comparison(results, torch, 0.0, 0.0)
    assert report.fmt_pp(diff["mean_diff"]) in text
    assert report.fmt_ci_pp(diff["mean_diff_ci95"]) in text
    assert "different after Holm correction (p = 0.004)" in text
    for stratum in results["strata"]:
        assert stratum["label"] in text


def test_wording_rule_follows_planted_verdicts(written: report.ReportFiles,
                                               two_strata) -> None:
    results, _ = two_strata
    md = written.markdown.read_text()
    # "No real difference" only for equivalent comparisons: each use is followed by the
    # equivalence it rests on, except the one sentence in the Verdicts intro that defines it.
    uses = [s for s in _sentences(md) if "no real difference" in s.lower()]
    assert sum("equivalent within" not in s for s in uses) == 1
    for c in results["comparisons"]:
        phrase = report.verdict_phrase(c, results)
        if c["verdict"] == "equivalent":
            assert phrase.startswith("no real difference")
        else:
            assert "no real difference" not in phrase.lower()
        if c["verdict"] == "inconclusive":
            assert "not shown different" in phrase and "needs more seeds" in phrase
            assert "about 23 seeds" in phrase
    equivalents = sum(c["verdict"] == "equivalent" for c in results["comparisons"])
    # Abstract + C1-C3 never mention (0.6, 0.8), so the phrase appears once per equivalent
    # comparison in the abstract plus the definition in the Verdicts intro.
    assert md.lower().count("no real difference") == equivalents + 1


def test_variance_not_shown_different_never_reads_as_same(written: report.ReportFiles,
                                                          two_strata) -> None:
    results, _ = two_strata
    c = results["comparisons"][0]
    assert c["variance_verdict"] == "not_shown_different"
    phrase = report.variance_phrase(c, results)
    assert "not shown" in phrase
    for text in (phrase, written.markdown.read_text(), written.typst.read_text()):
        lowered = text.lower()
        for wrong in ("same variance", "equal variance", "same spread", "variances are equal",
                      "spreads are equal"):
            assert wrong not in lowered


def test_inconclusive_without_seed_estimate_says_why() -> None:
    c = {"verdict": "inconclusive", "p_adjusted": 0.3, "seeds_needed": None,
         "reason": "zero variance in both groups"}
    phrase = report.verdict_phrase(c, {"equivalence_margin": 0.005})
    assert "needs more seeds" in phrase and "zero variance in both groups" in phrase


def test_typst_escaping_keeps_user_strings_literal(tmp_path: Path) -> None:
    nasty = "a#b*c_d`e$f<g>h@i[j]k\\l~m=n/o+p-q // not a comment /* nor this */"
    escaped = report.escape_typst(nasty)
    doc = report.render_typst([report.para(nasty, report.Code(nasty), report.Strong(nasty))],
                              nasty)
    typ = tmp_path / "x.typ"
    typ.write_text(doc)
    report.compile_pdf(typ, tmp_path / "x.pdf")  # raises on any markup error
    assert escaped.count("\\#") == 1 and "//" not in escaped
    if shutil.which("pdftotext"):
        text = subprocess.run(["pdftotext", str(tmp_path / "x.pdf"), "-"], capture_output=True,
                              text=True, check=True).stdout
        assert "a#b*c_d`e$f<g>h@i[j]k\\l~m=n/o+p-q" in text.replace("\n", "")


def test_report_names_experiment_protocol_and_environment(written: report.ReportFiles) -> None:
    md = written.markdown.read_text()
    assert "d2l\\#drop\\_out\\*\\[x\\]\\$" in md  # Markdown escaped, so it shows literally
    assert "python -m study report protocols/d2l#drop_out*[x]$.yaml" in md
    assert "make study" in md
    assert "PyTorch 2.14.1" in md and "296de8c" in md
    assert "Appendix A" in md and "equivalence_margin: 0.005" in md


def test_strata_are_reported_separately(written: report.ReportFiles, two_strata) -> None:
    results, _ = two_strata
    md = written.markdown.read_text()
    for stratum in results["strata"]:
        assert f"Stratum {stratum['label']}" in md
    assert md.count("**Table") == 2 * 3 + 3  # 3 per stratum + protocol, C4 side-by-side, env


def test_replicates_give_a_repeatability_verdict(two_strata) -> None:
    _, table = two_strata
    reps = report.repeatability(table.runs)
    assert list(reps["repeated"]) == [5, 5] and list(reps["identical"]) == [5, 5]
    broken = table.runs.copy()
    broken.loc[broken.index[-1], "weights_sha256"] = "different"
    assert report.repeatability(broken)["identical"].sum() == 9


def test_report_from_analysis_module_output(tmp_path: Path) -> None:
    analysis = pytest.importorskip("study.analysis")
    from study.protocol import Analysis

    table = make_table(replicate=True)
    results = analysis.analyze(table, BASELINE, Analysis(bootstrap=200))
    files = report.write_report(results, table, tmp_path)
    assert files.pdf.read_bytes().startswith(b"%PDF")
    text = "".join(report.abstract(results, table).parts)
    base = report.find_group(results, results["strata"][0]["stratum"], *BASELINE)
    assert report.fmt_mean_sd(base) in text

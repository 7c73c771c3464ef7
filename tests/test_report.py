"""Report: files appear, the PDF is reproducible to the byte, and the words follow the results.

    .venv/bin/python -m pytest tests/test_report.py -q
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from study import diagnostics, figures, report
from study.protocol import Analysis
from study.table import CURVE_COLUMNS, RUN_COLUMNS, RunTable
from tests.test_figures import BASELINE, make_results, make_table

STRATUM_FIGURES = [n for n in figures.CAPTIONS if n not in figures.DIAGNOSTIC_FIGURES]


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
    assert len(written.figures) == 6  # no diagnostics in these results: no diagnostic figures
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
    assert [f.name for f in written.figures] == STRATUM_FIGURES
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


def test_without_diagnostics_c5_says_what_was_not_measured(written: report.ReportFiles) -> None:
    md = written.markdown.read_text()
    c5 = md[md.index("C5: a fixed seed"):md.index("Reproducibility")]
    assert "did not measure run-to-run repeatability" in c5 and "rerun python -m study analyze" in c5
    assert "No GPU runs were in the data" in c5
    assert "Sources of variance" not in md


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
    # The replicates of make_table repeat seed 0 exactly: the diagnostics say so, once per cell.
    assert "bit-identical weights in 5/5 on cpu." in text
    assert "| cpu / default / sequential / 2 | 5 | 5/5 (100%) |" in files.markdown.read_text()


# --- diagnostics: synthetic runs with planted findings, through study.diagnostics.analyze ----

DIAG_OPTIONS = Analysis(alpha=0.05, equivalence_margin=0.005, bootstrap=500, power=0.8)


def _diag_row(setting, seed, acc, *, device="cpu", determinism="default", implementation="torch",
              vary="all", replicate=0, sha=None, keep=(math.nan, math.nan)) -> dict:
    name = f"{setting}-{seed}-{device}-{determinism}-{implementation}-{vary}-{replicate}"
    return {"run_id": name, "run_name": name, "dropout1": setting[0], "dropout2": setting[1],
            "seed": seed, "device": device, "determinism": determinism,
            "implementation": implementation, "execution": "sequential", "randomness": "native",
            "mask_rng": "torch", "vary": vary, "replicate": replicate, "status": "ok", "threads": "2",
            "textbook_check": True,
            "weights_sha256": sha or f"h{name}", "epochs_done": 10, "test_acc": acc,
            "train_acc": acc + 0.01, "train_loss": 0.4, "keep_rate1": keep[0],
            "keep_rate2": keep[1]}


def _diagnose(rows: list[dict]) -> dict[str, Any]:
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


def make_diagnostics() -> dict[str, Any]:
    """Each group of sections from its own table, so the planted effects do not mix."""
    rep, impl = _diagnose(_repeat_rows()), _diagnose(_implementation_rows())
    return {"replicates": rep["replicates"], "modes": rep["modes"], "devices": rep["devices"],
            "keep_rates": impl["keep_rates"], "implementations": impl["implementations"],
            "variance_sources": _diagnose(_source_rows())["variance_sources"]}


@pytest.fixture(scope="module")
def with_diagnostics(two_strata) -> tuple[dict[str, Any], RunTable]:
    results, table = two_strata
    return {**results, "diagnostics": make_diagnostics()}, table


@pytest.fixture(scope="module")
def diag_written(tmp_path_factory: pytest.TempPathFactory,
                 with_diagnostics) -> report.ReportFiles:
    results, table = with_diagnostics
    return report.write_report(results, table, tmp_path_factory.mktemp("diag"))


def _section(md: str, start: str, end: str) -> str:
    return md[md.index(start):md.index(end, md.index(start))]


def test_planted_diagnostics_are_what_the_fixture_says(with_diagnostics) -> None:
    diag = with_diagnostics[0]["diagnostics"]
    verdicts = {(r["implementation"], r["dropout1"]): r["verdict"]
                for r in diag["implementations"]["records"]}
    assert verdicts == {("scratch", 0.2): "equivalent", ("scratch", 0.5): "equivalent",
                        ("scratch", 0.9): "inconclusive", ("scratch-randn", 0.2): "different",
                        ("scratch-randn", 0.5): "different", ("scratch-randn", 0.9): "different"}
    assert [r["no_change_observed"] for r in diag["modes"]["records"]] == [True, False]
    assert diag["variance_sources"]["summaries"][0]["agreement"] == "disagree"


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
    md = report.render_markdown(report.claim_repeatability(results, table), "x")
    rec = next(r for r in results["diagnostics"]["replicates"]["records"]
               if r["stratum"]["device"] == "cuda" and r["stratum"]["determinism"] == "default")
    assert rec["variance_ratio"] > 0
    assert f"{report.fmt_num(rec['variance_ratio'], 3)} times the seed-to-seed variance" in md
    assert f"| {report.fmt_pp(rec['nondeterminism_sd'], sign=False, unit=False)} |" in md


def test_implementation_section_tables_and_wording(diag_written, with_diagnostics) -> None:
    results, _ = with_diagnostics
    c4 = _section(diag_written.markdown.read_text(), "C4: hand-written", "C5: a fixed seed")
    assert ("scratch vs torch: no real difference (equivalent within ±0.50 pp) at (0.2, 0.5), "
            "(0.5, 0.5); not shown different nor equivalent at (0.9, 0.9) (needs more seeds") in c4
    assert "scratch-randn vs torch: different at (0.2, 0.5), (0.5, 0.5), (0.9, 0.9)." in c4
    for r in results["diagnostics"]["implementations"]["records"]:
        row = (f"| {r['implementation']} | {report.fmt_setting(r)} | cpu | 10 | "
               f"{report.fmt_pp(r['mean_diff'], unit=False)} | "
               f"{report.escape_markdown(report.fmt_ci_pp(r['mean_diff_ci95']))} |")
        assert row in c4, row
    # Keep rates: measured against nominal and the randn law, with the activation scale.
    randn = next(r for r in results["diagnostics"]["keep_rates"]["records"]
                 if r["implementation"] == "scratch-randn" and r["p"] == 0.5)
    assert "| scratch-randn | (0.2, 0.5) | 2 | 0.5 | 10 | 30.9% | 50.0% | 30.9% | 0.62 |" in c4
    assert randn["expected"] == pytest.approx(sps.norm.sf(0.5))
    assert "(no between-implementation test)" not in c4  # the paired test replaces that table
    assert "![Figure 7](figures/keep_rates.png)" in c4


def test_sources_section_states_sds_ratios_and_agreement(diag_written, with_diagnostics) -> None:
    results, _ = with_diagnostics
    md = diag_written.markdown.read_text()
    sources = _section(md, "5. Sources of variance", "6. Reproducibility")
    for r in results["diagnostics"]["variance_sources"]["records"]:
        sd = report.fmt_pp(r["sd"], sign=False, unit=False)
        ci = report.escape_markdown(report.fmt_ci_pp(r["sd_ci95"], sign=False))
        assert f"| (0.2, 0.5) | {r['source']} | 10 | {sd} | {ci} |" in sources
    drop = results["diagnostics"]["variance_sources"]["records"][-1]
    assert drop["source"] == "dropout" and drop["summers"] == "much_smaller"
    assert (f"| {report.fmt_num(drop['ratio'])} | "
            f"{report.escape_markdown(report.fmt_ratio_ci(drop['ratio_ci95']))} |") in sources
    assert "much smaller |" in sources and "1 (ref.)" in sources
    assert "The data disagree with Summers & Dinneen (ICML 2021)" in sources
    assert "figures/variance_sources.png" in sources


def test_abstract_carries_the_headline_diagnostics(with_diagnostics) -> None:
    results, table = with_diagnostics
    text = "".join(report.abstract(results, table).parts)
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
    diag = dict(results["diagnostics"])
    diag["replicates"] = {"applicable": False, "reason": "no replicate runs (the protocol has "
                          "replicates: 1)", "records": []}
    diag["variance_sources"] = {"applicable": False, "reason": "every run varies all sources "
                                "(vary: [all]): nothing to compare", "records": [], "summaries": []}
    diag["devices"] = {"applicable": False, "reason": "needs runs of the same cells on cpu and "
                       "cuda; found ['cpu']", "records": []}
    plain = {**results, "diagnostics": diag}
    md = report.render_markdown(report.claim_repeatability(plain, table), "x")
    assert "did not measure run-to-run repeatability with a fixed seed (no replicate runs" in md
    assert "did not measure which random stream" in md and "(vary: \\[all\\])" in md
    assert "No GPU runs were in the data" in md  # the table holds cpu runs only
    assert report.sources_section(plain, []) == []


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

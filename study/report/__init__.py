"""The paper-style report of a dropout study: `Results` + run table in, PDF and Markdown twin out.

    python -m study report protocols/d2l-dropout.yaml

`write_report` builds the document once as a list of blocks (`document`) and renders that list
twice, to Typst (compiled to PDF with the typst package's embedded fonts only; the look lives in
the static `style.typ`) and to Markdown, so the two can never say different things.

- `wording`: how numbers and verdicts read (the one place for the wording rules);
- `describe`: the model, data and training, from the resolved protocol of the runs;
- `sections`: abstract, question, method, results, reproducibility, threats, appendix;
- `tables`: the per-stratum results tables (groups, comparisons, multiverse, power, spread);
- `claims`: the lesson's claims, one `Claim` entry each (C1-C5);
- `diagnostics`: C4, C5 and the sources of variance, worded from `Results.diagnostics`;
- `document`, `render_typst`, `render_markdown`: the block model and its two renderers.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

from study.report import environment, figures
from study.report.figures import FigureFile
from study.report.context import Inputs
from study.report.render_markdown import render_markdown
from study.report.render_typst import compile_pdf, install_style, render_typst
from study.report.sections import document, title
from study.results import Results
from study.analysis.table import RunTable

__all__ = ["ReportFiles", "write_report", "compile_pdf"]


@dataclass(frozen=True)
class ReportFiles:
    pdf: Path
    markdown: Path
    typst: Path
    style: Path  # the Typst style report.typ imports; needed to recompile it
    figures: list[FigureFile] = field(default_factory=list)
    # Where and when, kept out of the PDF so its bytes are the same on every machine.
    environment: Path | None = None

    def all(self) -> list[Path]:
        """Every file written, for logging to the analysis run."""
        return [self.pdf, self.markdown, self.typst, self.style,
                *([self.environment] if self.environment else []),
                *(path for f in self.figures for path in (f.png, f.svg))]


def write_report(results: Results, table: RunTable, out_dir: Path,
                 date: dt.date | None = None) -> ReportFiles:
    """Write figures, report.typ (+ style.typ), report.pdf and report.md under `out_dir`.

    `date` goes into the PDF metadata when given; by default the PDF carries no date, and the
    machine, time and store go to environment.md beside it, so the same runs give the same
    bytes on any machine."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figs = figures.make_figures(results, table, out_dir / "figures")
    blocks = document(Inputs.of(results, table, figs))
    doc_title = title(table)
    typ, md, pdf = out_dir / "report.typ", out_dir / "report.md", out_dir / "report.pdf"
    typ.write_text(render_typst(blocks, doc_title, date), encoding="utf-8")
    md.write_text(render_markdown(blocks, doc_title), encoding="utf-8")
    style = install_style(out_dir)
    compile_pdf(typ, pdf)
    env = environment.write(out_dir, pdf.name, {table.experiment_name: table})
    return ReportFiles(pdf=pdf, markdown=md, typst=typ, style=style, figures=figs,
                       environment=env)

"""One paper for the whole lesson: every protocol's analysis in one document.

    python -m study paper protocols/lesson.yaml

Abstract, then the claims scorecard (`scorecard`), then one section per claim built by the same
section builders as the per-protocol reports (`claims.CLAIMS`), once per protocol that answers it.
The appendices merge what the protocols ran: resolved files, environments (and where they
differ), method, commits. Rendered like a per-protocol report, to Typst/PDF and Markdown.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from study.protocol.lesson import Lesson
from study.report import ReportFiles, environment
from study.report.claims import Claim, question_bullets
from study.report.diagnostics import sources_section
from study.report.document import (Abstract, Appendix, Block, Bullets, Code, CodeBlock, Fig,
                                   Heading, Para, Strong, Table, para)
from study.report.render_markdown import render_markdown
from study.report.render_typst import compile_pdf, install_style, render_typst
from study.report.scorecard import (DASH, HEADER, Evidence, Row, lesson_claims, rows)
from study.report.sections import protocol_table, resolved_yaml, statistics_blocks
from study.report.wording import count

# The per-stratum figures a reader of the paper needs, for the protocols whose claims are read
# off comparisons of settings; the rest stay in each protocol's own report.
PAPER_FIGURES = ("final_accuracy", "forest", "cs_looks")
FIGURE_CLAIMS = ("C1", "C2", "C3", "C3\u2032")
# Determinism flags follow each protocol's modes (its method table names them): a difference
# there is the design, not the environment.
FLAG_TAGS = "study.flag."
NOT_MEASURED = "not measured"


@dataclass(frozen=True)
class Paper:
    lesson: Lesson
    lesson_file: str
    evidence: tuple[Evidence, ...]
    command: str  # the command that makes this paper (and the runs it lacks)

    def scorecard(self) -> list[Row]:
        return rows(self.lesson, self.evidence, self.lesson_file, self.command)

    @property
    def analysed(self) -> list[Evidence]:
        return [e for e in self.evidence if e.inputs is not None]


def title(paper: Paper) -> str:
    return f"Does dropout help? Every claim of the d2l dropout lesson, re-run: {paper.lesson.name}"


def document(paper: Paper) -> list[Block]:
    card = paper.scorecard()
    return [Abstract(abstract(paper, card)), *scorecard_section(card),
            *question_section(paper), *claims_section(paper, card), *sources(paper),
            *figures_section(paper), *reproducibility_section(paper), Appendix(),
            *protocols_appendix(paper), *environment_appendix(paper), *method_appendix(paper),
            *commits_appendix(paper)]


# --- abstract and scorecard --------------------------------------------------------------------


def abstract(paper: Paper, card: Sequence[Row]) -> Para:
    runs = sum(e.runs for e in paper.evidence)
    measured = [r.claim for r in card if not r.verdict.startswith(NOT_MEASURED)]
    missing = [r.claim for r in card if r.verdict.startswith(NOT_MEASURED)]
    partial = [r.claim for r in card if "not measured" in r.verdict and r.claim in measured]
    text = (f"The d2l.ai Dropout lesson draws {count(len(card), 'claim')} from one run per "
            f"setting. We tested them with {count(len(paper.evidence), 'protocol')} "
            f"({', '.join(e.name for e in paper.evidence)}), {count(runs, 'training run')} in "
            f"all, every setting repeated over seeds and every verdict checked under several "
            f"analyses. {count(len(measured), 'claim')} ({', '.join(measured) or DASH}) "
            f"{'has' if len(measured) == 1 else 'have'} a measured verdict here")
    text += f"; {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not measured" \
        if missing else ""
    text += f", and part of {', '.join(partial)} is not" if partial else ""
    text += ". The scorecard below gives each verdict and what would settle the open ones."
    return para(text)


def scorecard_section(card: Sequence[Row]) -> list[Block]:
    return [Heading(1, "Claims scorecard"),
            para("One row per claim of the lesson. Verdicts are those of the primary analysis "
                 "(different, negligible, equivalent, inconclusive), or the claim's own form "
                 "(a share of identical replicates, of failed textbook assertions); robust means "
                 "every analysis of the multiverse (endpoints \u00d7 tests) gives the same "
                 "verdict. Each claim's section below gives the numbers behind its row."),
            Table(HEADER, tuple(r.cells() for r in card),
                  "The lesson's claims against the data.", "lllrlll",
                  # The verdict and the lesson's words carry the text; the keys and counts do not.
                  ("auto", "2fr", "1fr", "auto", "3fr", "1fr", "2fr"))]


def question_section(paper: Paper) -> list[Block]:
    rows = tuple((e.name, e.file, ", ".join(e.claims), str(e.runs),
                  _description(e)) for e in paper.evidence)
    return [Heading(1, "The question"),
            para("The lesson (a write-up of the d2l.ai Dropout chapter) trains an MLP with "
                 "dropout after each hidden layer and, from one run per setting, concludes:"),
            question_bullets(lesson_claims()),
            para("Each protocol below was built to answer some of these claims; the paper runs "
                 "them all and reads each claim off the protocols that answer it."),
            Table(("protocol", "file", "claims", "runs", "what it runs"), rows,
                  "The protocols of this paper.", "lllrl")]


def _description(e: Evidence) -> str:
    if e.inputs is None or not e.inputs.table.protocol:
        return "no finished runs yet"
    return str(e.inputs.table.protocol.get("description") or DASH)


# --- body: the same builders as the per-protocol reports ---------------------------------------


def claims_section(paper: Paper, card: Sequence[Row]) -> list[Block]:
    blocks: list[Block] = [
        Heading(1, "Claims, one by one"),
        para("Each claim's text comes from the section builder the per-protocol reports use, "
             "applied to each protocol that answers it.")]
    by_key = {r.claim: r for r in card}
    for claim in lesson_claims():
        blocks.append(Heading(2, f"{claim.key}: {claim.heading}"))
        mine = [e for e in paper.evidence if claim.key in e.claims]
        if not mine:
            row = by_key[claim.key]
            blocks.append(para(f"{row.verdict[:1].upper()}{row.verdict[1:]}. To measure it: ",
                               Code(row.settle), "."))
        blocks += bottom_lines(claim, mine)
        for e in mine:
            blocks += _claim_from(e, claim)
    return blocks


def bottom_lines(claim: Claim, mine: Sequence[Evidence]) -> list[Block]:
    """The claim's bottom-line sentence from each protocol that answers it (named when several),
    ahead of the numbers."""
    done = [e for e in mine if e.inputs is not None]
    if len(done) == 1:
        return [para(Strong(claim.bottom_line(done[0].inputs)))]
    return [para(Strong(f"From {e.name}: {claim.bottom_line(e.inputs)}")) for e in done]


def _claim_from(e: Evidence, claim: Claim) -> list[Block]:
    lead = para("From protocol ", Code(e.name), f" ({count(e.runs, 'run')}, {e.file}):")
    if e.inputs is None:
        return [lead, para("No finished runs to analyse; ", Code(f"python -m study run {e.file}"),
                           " makes them.")]
    return [lead, *relocate(claim.build(e.inputs), e.name)]


def relocate(blocks: Sequence[Block], name: str) -> list[Block]:
    """A protocol's figures live in figures/<protocol>/ of the paper: point its Fig blocks there."""
    return [dataclasses.replace(b, folder=figure_folder(name)) if isinstance(b, Fig) else b
            for b in blocks]


def figure_folder(name: str) -> str:
    return f"figures/{name}"


def sources(paper: Paper) -> list[Block]:
    return [b for e in paper.analysed
            for b in relocate(sources_section(e.inputs.results, e.inputs.figs), e.name)]


def figures_section(paper: Paper) -> list[Block]:
    blocks: list[Block] = []
    for e in paper.analysed:
        if not set(e.claims) & set(FIGURE_CLAIMS):
            continue
        figs = [Fig(f, figure_folder(e.name)) for f in e.inputs.figs if f.name in PAPER_FIGURES]
        if figs:
            blocks += [Heading(2, e.name), *figs]
    return [Heading(1, "Figures"),
            para("Final accuracy and the gaps to the baseline (and, for an adaptive protocol, "
                 "how each confidence sequence narrowed), for the protocols whose claims "
                 "compare settings; every other figure is in the protocol's own report "
                 "(python -m study report FILE)."),
            *blocks] if blocks else []


def reproducibility_section(paper: Paper) -> list[Block]:
    return [Heading(1, "Reproducibility"),
            para("Everything here is regenerated from the MLflow store. The command below runs "
                 "every cell not yet finished (finished ones are never rerun), analyses each "
                 "protocol and rewrites this paper; run twice, it runs nothing and writes the "
                 "same bytes on any machine. Experiments per protocol are in Appendix D."),
            *promises(paper), CodeBlock(f"make paper\n{paper.command}", "sh")]


def promises(paper: Paper) -> list[Block]:
    """The portable promise of each protocol whose runs make it (`environment`)."""
    found = [(e.name, text) for e in paper.analysed
             if (text := environment.portable_promise(e.inputs.table, e.file))]
    return [Bullets(tuple(para(Code(name), f": {text}") for name, text in found))] if found \
        else []


# --- appendices: what the protocols ran, merged ------------------------------------------------


def protocols_appendix(paper: Paper) -> list[Block]:
    blocks: list[Block] = [Heading(1, "Resolved protocols")]
    for e in paper.analysed:
        blocks += [Heading(2, e.name), CodeBlock(resolved_yaml(e.inputs.table), "yaml")]
    return blocks


def environment_differences(paper: Paper) -> list[str]:
    """Environment keys whose value is not the same in every analysed protocol."""
    envs = [e.inputs.table.environment or {} for e in paper.analysed]
    keys = sorted({k for env in envs for k in env if not k.startswith(FLAG_TAGS)})
    return [k for k in keys if len({env.get(k) for env in envs}) > 1]


def environment_appendix(paper: Paper) -> list[Block]:
    """The machines stay out of the PDF (`environment`): environment.md holds each protocol's
    tags and the keys that differ between them; the flags a mode sets are its method's."""
    return [Heading(1, "Environments"), para(environment.pointer()),
            para("Determinism flags follow each protocol's modes (named with its method, "
                 "Appendix C); their values are in each protocol's own report.")]


def environment_notes(paper: Paper) -> list[str]:
    """environment.md's line on the keys whose values differ between the protocols' runs."""
    differing = environment_differences(paper)
    if not differing:
        return ["every protocol ran in the same recorded environment"]
    return [f"the protocols' environments differ in {', '.join(differing)}: a verdict holds for "
            f"the environment its protocol ran in, and bit-level results (C5) need not carry "
            f"over between them"]


def method_appendix(paper: Paper) -> list[Block]:
    blocks: list[Block] = [Heading(1, "Method")]
    for e in paper.analysed:
        blocks += [Heading(2, e.name), *protocol_table(e.inputs)]
    if paper.analysed:
        blocks += statistics_blocks(paper.analysed[0].inputs.results)
        blocks.append(Table(("protocol", "alpha", "margin", "bootstrap", "power", "endpoint"),
                            tuple(_options(e) for e in paper.analysed),
                            "Analysis options per protocol (the statistics above use them).",
                            "lrrrrl"))
    return blocks


def _options(e: Evidence) -> tuple[str, ...]:
    r = e.inputs.results
    return (e.name, f"{r.alpha:g}", f"{r.equivalence_margin:g}", f"{r.bootstrap:,}",
            f"{r.power:g}", r.endpoint)


def commits_appendix(paper: Paper) -> list[Block]:
    rows = tuple((e.name, e.file, str(e.runs), e.inputs.table.experiment_name)
                 for e in paper.analysed)
    return [Heading(1, "Reproducibility"),
            para("Each protocol's runs and the MLflow experiment that holds them; the paper "
                 "itself is logged to the experiment ", Code(paper.lesson.experiment),
                 ". The commits the runs were made at are in environment.md."),
            Table(("protocol", "file", "runs", "MLflow experiment"), rows,
                  "Experiments per protocol.", "llrl")]


# --- files -------------------------------------------------------------------------------------


def write_paper(paper: Paper, out_dir: Path, date: dt.date | None = None) -> ReportFiles:
    """paper.typ (+ style.typ), paper.pdf and paper.md under `out_dir`; the figures are already
    there (figures/<protocol>/). No date by default: the same inputs give the same bytes."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    blocks = document(paper)
    typ, md, pdf = out_dir / "paper.typ", out_dir / "paper.md", out_dir / "paper.pdf"
    typ.write_text(render_typst(blocks, title(paper), date), encoding="utf-8")
    md.write_text(render_markdown(blocks, title(paper)), encoding="utf-8")
    style = install_style(out_dir)
    compile_pdf(typ, pdf)
    env = environment.write(out_dir, pdf.name, {e.name: e.inputs.table for e in paper.analysed},
                            environment_notes(paper))
    figs = [f for e in paper.analysed for f in e.inputs.figs]
    return ReportFiles(pdf=pdf, markdown=md, typst=typ, style=style, figures=figs,
                       environment=env)


__all__ = ["Paper", "document", "write_paper"]

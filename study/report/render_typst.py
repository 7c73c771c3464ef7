"""Blocks -> Typst markup, and Typst -> PDF.

The generated `report.typ` holds content only: it imports `style.typ` (package data, copied
next to it) for page, type and table style, so the look is edited in one static file.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import typst

from study.report.document import (Abstract, Appendix, Block, Bullets, Code, CodeBlock, Fig,
                                   Heading, Inline, Para, Strong, Table)

STYLE = "style.typ"
TEXT_WIDTH_IN = 6.6  # A4 minus the page margins set in style.typ

# Characters with a markup meaning in Typst; a backslash makes any of them literal.
_TYPST_SPECIAL = re.compile(r"([\\#*_`$<>@\[\]~=/+\-'\"])")


def escape_typst(text: str) -> str:
    """Literal text for Typst markup: specials escaped, newlines folded into spaces."""
    return _TYPST_SPECIAL.sub(r"\\\1", re.sub(r"\s+", " ", str(text)))


def typst_string(text: str) -> str:
    """A Typst string literal."""
    return json.dumps(str(text), ensure_ascii=False)


def _inline(part: Inline) -> str:
    # The trailing ';' ends the embedded expression, so a following '(' or '.x' stays text.
    if isinstance(part, Strong):
        return f"#strong[{escape_typst(part.text)}];"
    if isinstance(part, Code):
        return f"#raw({typst_string(part.text)});"
    return escape_typst(part)


def _para(p: Para) -> str:
    return "".join(_inline(x) for x in p.parts)


def _table(t: Table) -> str:
    align = ", ".join("right" if a == "r" else "left" for a in (t.align or "l" * len(t.header)))
    cells = [f"[{escape_typst(h)}]" for h in t.header]
    body = [f"[{escape_typst(c)}]" for row in t.rows for c in row]
    columns = f"({', '.join(t.widths)},)" if t.widths else str(len(t.header))
    return (f"#figure(kind: table, caption: [{escape_typst(t.caption)}],\n"
            f"  table(columns: {columns}, align: ({align},),\n"
            f"    table.header({', '.join(cells)}),\n    {', '.join(body)}))\n")


def _figure(b: Fig) -> str:
    width = f"{min(b.file.width_in, TEXT_WIDTH_IN):.2f}in"
    path = typst_string(f"{b.folder}/{b.file.svg.name}")
    return (f"#figure(image({path}, width: {width}),\n"
            f"  caption: [{escape_typst(b.file.caption)}])\n")


def _block(b: Block) -> str:
    if isinstance(b, Heading):
        return f"{'=' * b.level} {escape_typst(b.text)}\n"
    if isinstance(b, Para):
        return _para(b) + "\n"
    if isinstance(b, Abstract):
        return f"#abstract[{_para(b.para)}]\n"
    if isinstance(b, Bullets):
        return "".join(f"- {_para(i)}\n" for i in b.items)
    if isinstance(b, Table):
        return _table(b)
    if isinstance(b, Fig):
        return _figure(b)
    if isinstance(b, CodeBlock):
        return f"#raw(block: true, lang: {typst_string(b.lang)}, {typst_string(b.text)})\n"
    if isinstance(b, Appendix):
        return "#show: appendix\n"
    raise TypeError(f"unknown block {b!r}")


def _head(doc_title: str, date: dt.date | None) -> str:
    date_expr = "none" if date is None else \
        f"datetime(year: {date.year}, month: {date.month}, day: {date.day})"
    return (f"#import {typst_string(STYLE)}: *\n"
            f"#show: paper.with(title: {typst_string(doc_title)}, date: {date_expr})\n\n")


def render_typst(blocks: Sequence[Block], doc_title: str, date: dt.date | None = None) -> str:
    return _head(doc_title, date) + "\n".join(_block(b) for b in blocks)


def style_text() -> str:
    return resources.files("study.report").joinpath(STYLE).read_text(encoding="utf-8")


def install_style(folder: Path) -> Path:
    """Put the packaged style next to a report.typ (rewritten only when it differs)."""
    path = Path(folder) / STYLE
    text = style_text()
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")
    return path


def compile_pdf(typ: Path, pdf: Path) -> None:
    """Compile with Typst's embedded fonts only, so no machine's font set changes the PDF."""
    install_style(typ.parent)
    typst.compile(str(typ), output=str(pdf), root=str(typ.parent), ignore_system_fonts=True)

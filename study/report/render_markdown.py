"""Blocks -> Markdown, numbered the way Typst numbers headings, tables and figures."""

from __future__ import annotations

import re
from collections.abc import Sequence

from study.report.document import (Abstract, Appendix, Block, Bullets, Code, CodeBlock, Fig,
                                   Heading, Inline, Para, Strong, Table)

_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>#|~$])")


def escape_markdown(text: str) -> str:
    return _MD_SPECIAL.sub(r"\\\1", re.sub(r"\s+", " ", str(text)))


def _inline(part: Inline) -> str:
    if isinstance(part, Strong):
        return f"**{escape_markdown(part.text)}**"
    if isinstance(part, Code):
        return f"`{part.text.replace('`', '')}`"
    return escape_markdown(part)


def _para(p: Para) -> str:
    return "".join(_inline(x) for x in p.parts)


def _table(b: Table, number: int) -> str:
    head = "| " + " | ".join(escape_markdown(h) for h in b.header) + " |"
    rule = "|" + "|".join("---:" if a == "r" else "---" for a in
                          (b.align or "l" * len(b.header))) + "|"
    rows = ["| " + " | ".join(escape_markdown(c) for c in row) + " |" for row in b.rows]
    return f"**Table {number}.** {escape_markdown(b.caption)}\n\n" + \
        "\n".join([head, rule, *rows]) + "\n"


class _MarkdownRenderer:
    """Numbers figures, tables and headings the way Typst does, so both documents agree."""

    def __init__(self) -> None:
        self.figure = self.table = 0
        self.numbers = [0, 0, 0]
        self.appendix = False

    def heading(self, b: Heading) -> str:
        self.numbers[b.level - 1] += 1
        self.numbers[b.level:] = [0] * (3 - b.level)
        used = self.numbers[:b.level]
        first = chr(ord("A") + used[0] - 1) if self.appendix else str(used[0])
        label = ".".join([first, *map(str, used[1:])]) + ("" if b.level > 1 or self.appendix else ".")
        prefix = "Appendix " if self.appendix and b.level == 1 else ""
        return f"{'#' * (b.level + 1)} {prefix}{label} {escape_markdown(b.text)}\n"

    def block(self, b: Block) -> str:
        if isinstance(b, Heading):
            return self.heading(b)
        if isinstance(b, Para):
            return _para(b) + "\n"
        if isinstance(b, Abstract):
            return f"**Abstract.** {_para(b.para)}\n"
        if isinstance(b, Bullets):
            return "".join(f"- {_para(i)}\n" for i in b.items)
        if isinstance(b, Table):
            self.table += 1
            return _table(b, self.table)
        if isinstance(b, Fig):
            self.figure += 1
            return (f"![Figure {self.figure}]({b.folder}/{b.file.png.name})\n\n"
                    f"**Figure {self.figure}.** {escape_markdown(b.file.caption)}\n")
        if isinstance(b, CodeBlock):
            return f"```{b.lang}\n{b.text}\n```\n"
        if isinstance(b, Appendix):
            self.appendix = True
            self.numbers = [0, 0, 0]
            return ""
        raise TypeError(f"unknown block {b!r}")


def render_markdown(blocks: Sequence[Block], doc_title: str) -> str:
    r = _MarkdownRenderer()
    body = [r.block(b) for b in blocks]
    return f"# {escape_markdown(doc_title)}\n\n" + "\n".join(x for x in body if x)

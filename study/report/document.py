"""The report as data: a flat list of blocks that both renderers (Typst, Markdown) understand.

Sections build blocks; `render_typst` and `render_markdown` turn the same list into two files,
so the PDF and its Markdown twin can never say different things.
"""

from __future__ import annotations

from dataclasses import dataclass

from study.report.figures import FigureFile


@dataclass(frozen=True)
class Strong:
    text: str


@dataclass(frozen=True)
class Code:
    text: str


Inline = str | Strong | Code


@dataclass(frozen=True)
class Heading:
    level: int
    text: str


@dataclass(frozen=True)
class Para:
    parts: tuple[Inline, ...]


@dataclass(frozen=True)
class Bullets:
    items: tuple[Para, ...]


@dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    caption: str
    # 'l' or 'r' per column: numbers right-aligned so decimal points line up roughly.
    align: str = ""
    # Typst column widths ("auto", "2fr"), for a table whose text columns would otherwise get
    # equal shares; empty: Typst's default. Markdown has no widths.
    widths: tuple[str, ...] = ()


@dataclass(frozen=True)
class Fig:
    file: FigureFile
    # Where the renderers find the file, relative to the document: a paper of several protocols
    # keeps each protocol's figures in a folder of its own, as their names repeat.
    folder: str = "figures"


@dataclass(frozen=True)
class CodeBlock:
    text: str
    lang: str = ""


@dataclass(frozen=True)
class Abstract:
    para: Para


@dataclass(frozen=True)
class Appendix:
    """Marks where appendix numbering (A, B, ...) starts."""


Block = Heading | Para | Bullets | Table | Fig | CodeBlock | Abstract | Appendix


def para(*parts: Inline) -> Para:
    return Para(tuple(parts))


def text_of(block: Para | Abstract) -> str:
    """The plain text of a paragraph (for tests and for sentences built from other sentences)."""
    p = block.para if isinstance(block, Abstract) else block
    return "".join(x if isinstance(x, str) else x.text for x in p.parts)

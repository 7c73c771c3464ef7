"""The documentation holds together: a short README, links that land, no orphan page.

    .venv/bin/python -m pytest tests/test_docs.py -q

Standard library and pytest only. Checked in README.md, CHANGELOG.md and docs/*.md:

1. README.md stays under 10,000 characters (the reference lives in docs/) and names its test
   command, `make test`.
2. Every relative Markdown link points to a file that exists; a `page.md#anchor` (or `#anchor`)
   link points to a heading of that page, slugged as GitHub does: lowercase, punctuation dropped
   (letters, digits, spaces, hyphens and underscores stay), spaces to hyphens, a repeated heading
   numbered -1, -2, ...
3. Every docs/*.md page is linked from README.md or from another docs page.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_LIMIT = 10_000
TEST_COMMAND = "make test"


def _pages() -> list[Path]:
    pages = [README, ROOT / "CHANGELOG.md", *sorted(DOCS.glob("*.md"))]
    return [p for p in pages if p.exists()]


def _name(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


FENCE = re.compile(r"^\s{0,3}(```|~~~)")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
# [text](target) or [text](target "title"); images (![alt](src)) are links to files too.
INLINE_LINK = re.compile(r"\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+[\"'(].*?[\"')])?\s*\)")
REFERENCE_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def _prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    lines, fenced, marker = [], False, ""
    for line in text.splitlines():
        m = FENCE.match(line)
        if m and (not fenced or m.group(1) == marker):
            fenced, marker = (not fenced), m.group(1)
            continue
        if not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text."""
    text = CODE_SPAN.sub(lambda m: m.group(2), heading)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link in a heading keeps its text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.strip().lower()
    text = "".join(ch for ch in text if ch.isalnum() or ch in " -_")
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file, repeated headings numbered as GitHub does."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    for line in _prose_lines(path.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path) -> list[str]:
    """Every link target in a Markdown file, outside code blocks and code spans."""
    out = []
    for line in _prose_lines(path.read_text(encoding="utf-8")):
        m = REFERENCE_DEF.match(line)
        if m:
            out.append(m.group(1))
            continue
        prose = CODE_SPAN.sub("code", line)
        out += [m.group(1) for m in INLINE_LINK.finditer(prose)]
    return out


def relative_links(path: Path) -> list[str]:
    return [t for t in links(path) if not SCHEME.match(t) and not t.startswith("//")]


def _resolve(page: Path, target: str) -> tuple[Path, str]:
    file_part, _, anchor = target.partition("#")
    dest = (page.parent / unquote(file_part)).resolve() if file_part else page
    return dest, unquote(anchor)


def broken_links(page: Path) -> list[str]:
    """One line per relative link of `page` that does not land: the file, the link, the reason."""
    problems = []
    for target in relative_links(page):
        dest, anchor = _resolve(page, target)
        if not dest.exists():
            problems.append(f"{_name(page)}: link '{target}' -> no such file "
                            f"'{dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}'")
            continue
        if anchor and dest.is_file() and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{_name(page)}: link '{target}' -> no heading with anchor "
                            f"'#{anchor}' in {_name(dest)}")
    return problems


# The checks --------------------------------------------------------------------------------


def test_readme_is_short():
    size = len(README.read_text(encoding="utf-8"))
    assert size < README_LIMIT, (
        f"README.md is {size:,} characters, the limit is {README_LIMIT:,}: move reference text "
        f"into docs/ and link to it")


def test_readme_names_its_test_command():
    text = README.read_text(encoding="utf-8")
    assert TEST_COMMAND in text, f"README.md no longer names its test command `{TEST_COMMAND}`"


@pytest.mark.parametrize("page", _pages(), ids=_name)
def test_relative_links_land(page: Path):
    problems = broken_links(page)
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_every_docs_page_is_linked():
    pages = sorted(DOCS.glob("*.md"))
    linked: set[Path] = set()
    for page in [README, *pages]:
        for target in relative_links(page):
            dest, _ = _resolve(page, target)
            if dest != page.resolve():
                linked.add(dest)
    orphans = [_name(p) for p in pages if p.resolve() not in linked]
    assert not orphans, ("docs pages linked from neither README.md nor another docs page: "
                         + ", ".join(orphans))


# The checker itself -----------------------------------------------------------------------


@pytest.mark.parametrize("heading, expected", [
    ("Store, server and lease", "store-server-and-lease"),
    ("The whole lesson: one paper", "the-whole-lesson-one-paper"),
    ("`make paper`", "make-paper"),
    ("Student's t without scipy", "students-t-without-scipy"),
    ("C3′ and C7", "c3-and-c7"),
    ("What differs from `--backend local`", "what-differs-from---backend-local"),
])
def test_slug_follows_github(heading, expected):
    assert slug(heading) == expected


def test_checker_finds_broken_links_and_skips_code(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "b.md").write_text("# Title\n\n## Part\n\n## Part\n", encoding="utf-8")
    page = tmp_path / "a.md"
    page.write_text(
        "# A\n\n[ok](b.md#part-1) [ok](b.md) [self](#a) [web](https://example.org/x.md)\n"
        "[gone](missing.md) [bad anchor](b.md#nope) `[in code](missing-too.md)`\n\n"
        "```sh\n[fenced](missing-three.md)\n```\n", encoding="utf-8")
    problems = broken_links(page)
    assert len(problems) == 2, problems
    assert "a.md: link 'missing.md' -> no such file" in problems[0]
    assert "a.md: link 'b.md#nope' -> no heading with anchor '#nope' in b.md" in problems[1]

"""Every relative link in README.md and docs/*.md leads to a file that exists, and every
``#anchor`` to a heading of its page, as GitHub names headings."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)


def prose(text: str) -> str:
    """The page without code blocks and code spans, where brackets are not links."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def anchors(page: Path) -> set[str]:
    """The anchors GitHub gives the page's headings: lower case, punctuation dropped, spaces
    as hyphens, and ``-1``, ``-2`` ... after a repeated one."""
    seen: dict[str, int] = {}
    for line in prose(page.read_text(encoding="utf-8")).splitlines():
        heading = re.match(r"#{1,6} +(.+?) *#* *$", line)
        if not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading[1].lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        if count:
            seen[f"{slug}-{count}"] = 1
    return set(seen)


def links(page: Path) -> list[str]:
    return [m[1] for m in LINK.finditer(prose(page.read_text(encoding="utf-8")))]


def leads_somewhere(page: Path, link: str) -> bool:
    path, _, anchor = link.partition("#")
    target = (page.parent / path).resolve() if path else page
    if not target.exists():
        return False
    return not anchor or (target.suffix == ".md" and anchor in anchors(target))


def test_the_pages_have_links() -> None:
    """The check below sees links at all: the README links every page of docs/."""
    readme = set(links(ROOT / "README.md"))
    for page in PAGES[1:]:
        assert f"docs/{page.name}" in {link.split("#")[0] for link in readme}, page.name


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_lead_somewhere(page: Path) -> None:
    """Each relative link names an existing file, and its anchor a heading of that file."""
    relative = [link for link in links(page) if not EXTERNAL.match(link)]
    assert [link for link in relative if not leads_somewhere(page, link)] == []


def test_a_broken_anchor_is_caught(tmp_path: Path) -> None:
    """The anchor rule rejects a heading that is not there and accepts one that is."""
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n## Fold: aggregator throughput\n\n```\n# not a heading\n```\n")
    assert anchors(page) == {"title", "fold-aggregator-throughput"}
    assert leads_somewhere(page, "#fold-aggregator-throughput")
    assert not leads_somewhere(page, "#not-a-heading")
    assert not leads_somewhere(page, "missing.md")

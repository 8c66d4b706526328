"""The README stays a front page, and every link in it and in docs/ resolves.

- README.md has at most 250 lines;
- its first fenced code block holds exactly the two install/test command lines (CI and users
  copy them);
- every relative Markdown link ``[text](path)`` / ``[text](path#anchor)`` (images too) in
  README.md and ``docs/**/*.md`` points to an existing file, and an anchor to a heading of that
  file (GitHub-style slug); http(s) and mailto links are not checked;
- every page under docs/ is reachable by links from docs/index.md or README.md.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAX_README_LINES = 250
INSTALL_LINES = [
    'pip install -e ".[demo]" && mavl demo          # the whole chain, offline, in about a minute on 2 CPU cores',
    'pip install -e ".[dev]" && python -m pytest -q   # the test suite',
]

FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"!?\[(?P<text>[^\]]*)\]\((?P<target>[^)\s]*)(?:\s+\"[^\"]*\")?\)")
INLINE_CODE = re.compile(r"`+[^`]*`+")
EXTERNAL = ("http://", "https://", "mailto:")


def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    out, fenced = [], False
    for n, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((n, line))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation other than - and _ dropped, spaces to -."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file (repeated headings get -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        m = re.match(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(2))
        k = seen.get(base, 0)
        seen[base] = k + 1
        out.add(base if k == 0 else f"{base}-{k}")
    return out


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every relative link in a Markdown file, code left out."""
    out = []
    for n, line in prose_lines(path.read_text(encoding="utf-8")):
        for m in LINK.finditer(INLINE_CODE.sub("", line)):
            target = m.group("target")
            if target and not target.startswith(EXTERNAL):
                out.append((n, target))
    return out


def resolve(source: Path, target: str) -> tuple[Path, str | None]:
    """The file a link points at and its anchor (None without one)."""
    file_part, _, anchor = target.partition("#")
    dest = source if not file_part else (source.parent / unquote(file_part)).resolve()
    return dest, (unquote(anchor) if anchor else None)


def broken_links(path: Path) -> list[str]:
    problems = []
    for n, target in links(path):
        dest, anchor = resolve(path, target)
        where = f"{path.relative_to(ROOT)}:{n}: ({target})"
        if not dest.exists():
            problems.append(f"{where}: {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest} does not exist")
        elif anchor is not None:
            if dest.suffix != ".md":
                problems.append(f"{where}: an anchor into a file that is not Markdown")
            elif anchor not in anchors(dest):
                problems.append(f"{where}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
    return problems


def test_readme_is_short() -> None:
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines (at most {MAX_README_LINES}); move the rest into docs/"


def test_readme_first_code_block_is_the_install_commands() -> None:
    block, fenced = [], False
    for line in README.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            if fenced:
                break
            fenced = True
            continue
        if fenced:
            block.append(line)
    assert fenced, "README.md has no fenced code block"
    assert block == INSTALL_LINES, f"README.md's first code block must be exactly the two install lines, got {block!r}"


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path) -> None:
    problems = broken_links(path)
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_every_docs_page_is_reachable() -> None:
    start = [README, DOCS / "index.md"]
    assert start[1].exists(), "docs/index.md is missing"
    seen, todo = set(), [p.resolve() for p in start]
    while todo:
        page = todo.pop()
        if page in seen:
            continue
        seen.add(page)
        for _, target in links(page):
            dest, _ = resolve(page, target)
            if dest.suffix == ".md" and dest.exists() and dest not in seen:
                todo.append(dest)
    orphans = [str(p.relative_to(ROOT)) for p in sorted(DOCS.rglob("*.md")) if p.resolve() not in seen]
    assert not orphans, f"docs pages no link from README.md or docs/index.md leads to: {orphans}"


def test_slugs_follow_github() -> None:
    assert slug("Does the LRFL regulariser help? (measured)") == "does-the-lrfl-regulariser-help-measured"
    assert slug("`train-lrf`: the low-rank head") == "train-lrf-the-low-rank-head"
    assert slug("torch.distributed") == "torchdistributed"
    assert slug("predict --explain") == "predict---explain"
    assert slug("Default model for `predict`") == "default-model-for-predict"

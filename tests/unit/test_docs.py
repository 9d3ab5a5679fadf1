"""The documentation holds together: a README of minutes with the two commands first, every link
between the documents leads somewhere, and every performance table says where it came from."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = sorted([ROOT / "README.md", ROOT / "deploy" / "k8s" / "README.md", *(ROOT / "docs").rglob("*.md")])
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.DOTALL)
    return {_slug(m) for m in re.findall(r"^#+ (.+)$", text, flags=re.MULTILINE)}


def test_the_readme_is_minutes_long_and_starts_with_the_two_commands() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; move detail to docs/"
    first_block = next(i for i, line in enumerate(lines) if line.startswith("```"))
    commands = [line.split("#")[0].strip() for line in lines[first_block + 1 : first_block + 3]]
    assert commands == ["make run", "make test"]


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_leads_somewhere(document: Path) -> None:
    text = re.sub(r"```.*?```", "", document.read_text(), flags=re.DOTALL)
    broken = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target):  # http(s), mailto: not ours to check offline
            continue
        file_part, _, anchor = target.partition("#")
        path = (document.parent / file_part).resolve() if file_part else document
        if not path.exists():
            broken.append(f"{target}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(f"{target}: no such heading in {path.name}")
    assert broken == []


def test_the_oracle_finds_a_broken_link(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# A title\n\n[ok](#a-title) [bad](#nowhere) [missing](other.md)\n")
    text = page.read_text()
    targets = LINK.findall(text)
    assert targets == ["#a-title", "#nowhere", "other.md"]
    assert "a-title" in _anchors(page) and "nowhere" not in _anchors(page)


def test_every_performance_table_says_where_it_came_from() -> None:
    """Each table of figures in docs/performance.md sits under a 'Measured on:' stamp naming the
    CPU flags, the versions, the commit and the date, in the section that names its command."""
    text = (ROOT / "docs" / "performance.md").read_text()
    sections = re.split(r"^## ", text, flags=re.MULTILINE)[1:]
    measured = [s for s in sections if re.search(r"^\| .*(img/s|ms|MB)", s, flags=re.MULTILINE)]
    assert measured, "no table of figures found"
    for section in measured:
        title = section.splitlines()[0]
        stamp = re.search(r"Measured on: (.*?)(?:\n\n|$)", section, flags=re.DOTALL)
        assert stamp, f"'{title}': a table with no 'Measured on:' stamp"
        words = stamp.group(1)
        assert re.search(r"\d{4}-\d{2}-\d{2}", words), f"'{title}': the stamp has no date"
        assert "avx2" in words or "AVX2" in words, f"'{title}': the stamp names no CPU flags"
        assert "torch" in words and "OpenVINO" in words and "commit" in words, f"'{title}': versions or commit"
        assert re.search(r"`(make [a-z-]+|python -m [\w.]+)`", section), f"'{title}': no command to rerun it"

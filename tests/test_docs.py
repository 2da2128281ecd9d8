"""Every ``.md`` file the code, tests, benchmarks and examples name is one the repository ships.

Docstrings once sent readers to method notes that were never committed; a citation must now resolve to a file in
the tree: relative to the repository root, to ``docs/`` or to the citing file's folder, or, for a bare file name
(``FORMAT.md``, ``README.md``, a report a script writes), to a file of that name somewhere in the tree.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("mmer", "cli", "tests", "bench", "examples")
SKIPPED_DIRS = {".venv", ".git", ".cache", "__pycache__", "node_modules"}
CITATION = re.compile(r"(?<![\w./-])([\w./-]*[\w-]\.md)\b")
URL = re.compile(r"https?://\S+")


def shipped_markdown() -> set[Path]:
    return {
        p.relative_to(ROOT)
        for p in ROOT.rglob("*.md")
        if not SKIPPED_DIRS.intersection(p.relative_to(ROOT).parts) and not p.name.startswith(".")
    }


SHIPPED = shipped_markdown()
SHIPPED_NAMES = {p.name for p in SHIPPED}


def cited(text: str) -> list[str]:
    return CITATION.findall(URL.sub("", text))


def resolves(citation: str, citing: Path) -> bool:
    if "/" not in citation and citation in SHIPPED_NAMES:
        return True
    folder = citing.parent.relative_to(ROOT)
    candidates = (Path(citation), Path("docs") / citation, folder / citation)
    return any((ROOT / c).resolve().is_relative_to(ROOT) and (ROOT / c).resolve().relative_to(ROOT) in SHIPPED
               for c in candidates)  # fmt: skip


def source_files() -> list[Path]:
    out = []
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*")):
            if path.suffix in (".py", ".md", ".yaml", ".toml", ".txt") and path.is_file():
                if not SKIPPED_DIRS.intersection(path.relative_to(ROOT).parts):
                    out.append(path)
    return out


def test_the_method_notes_are_shipped():
    assert {Path("docs/method.md"), Path("docs/moextend.md"), Path("docs/layouts.md")} <= SHIPPED


def test_a_citation_of_a_file_the_repository_does_not_ship_is_caught():
    citing = ROOT / "mmer" / "merge" / "masks.py"
    never_shipped = "notes-that-were-never-committed" + ".md"
    assert cited(f"read beside {never_shipped} §3") == [never_shipped]
    assert not resolves(never_shipped, citing)
    assert not resolves("docs/" + never_shipped, citing)
    assert resolves("docs/method.md", citing) and resolves("method.md", citing)
    assert resolves("FORMAT.md", citing) and resolves("../checkpoint/" + "FORMAT.md", citing)
    assert cited("see https://github.com/o/r/blob/main/" + never_shipped) == []


@pytest.mark.parametrize("path", source_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_cited_markdown_file_exists(path):
    text = path.read_text(encoding="utf-8", errors="replace")
    missing = sorted({c for c in cited(text) if not resolves(c, path)})
    assert not missing, f"{path.relative_to(ROOT)} cites {missing}: cite a paper's section or a file under docs/"

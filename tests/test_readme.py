"""The README as a user meets it (issue 16, item 2): every Python snippet runs as written, in a
fresh namespace; no link of the README or docs/ points outside the project or to a missing file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _python_blocks(path: Path) -> list[tuple[int, str]]:
    blocks, lines, start = [], None, 0
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if lines is None and line.strip() == "```python":
            lines, start = [], number
        elif lines is not None and line.strip() == "```":
            blocks.append((start, "\n".join(lines)))
            lines = None
        elif lines is not None:
            lines.append(line)
    return blocks


README_BLOCKS = _python_blocks(ROOT / "README.md")


def test_the_readme_has_snippets():
    assert len(README_BLOCKS) >= 3


@pytest.mark.parametrize("start, code", README_BLOCKS, ids=[f"README.md:{s}" for s, _ in README_BLOCKS])
def test_readme_snippet_runs_as_written(start, code, tmp_path, monkeypatch, capsys):
    pytest.importorskip("torch")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"README.md:{start}", "exec"), {"__name__": "__readme__"})


LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("doc", DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_links_stay_inside_the_project(doc):
    bad = []
    for target in LINK.findall(doc.read_text()):
        if re.match(r"[a-z]+://", target) or target.startswith(("#", "mailto:")):
            continue
        if not re.fullmatch(r"[\w./#-]+", target) or not re.search(r"[./]", target):  # math like [a](k)
            continue
        path = (doc.parent / target.split("#")[0]).resolve()
        if ROOT not in (path, *path.parents) or not path.exists():
            bad.append(target)
    assert not bad, f"{doc.name}: links outside the project or to missing files: {bad}"

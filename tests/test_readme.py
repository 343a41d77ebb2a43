"""The README and docs as a user meets them (issue 16, item 2): every Python snippet runs as
written, in a fresh namespace (docs blocks that load files not in the project start with
``# needs the files on disk``); no link points outside the project or to a missing file."""

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
#: a block whose first line is this comment shows loaders of files that are not in the project
NEEDS_FILES = "# needs the files on disk"
DOC_BLOCKS = [(f"{p.relative_to(ROOT)}:{start}", code) for p in DOCS[1:] for start, code in _python_blocks(p)
              if not code.startswith(NEEDS_FILES)]


def test_the_readme_has_snippets():
    assert len(README_BLOCKS) >= 3


@pytest.mark.parametrize("start, code", README_BLOCKS, ids=[f"README.md:{s}" for s, _ in README_BLOCKS])
def test_readme_snippet_runs_as_written(start, code, tmp_path, monkeypatch, capsys):
    pytest.importorskip("torch")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"README.md:{start}", "exec"), {"__name__": "__readme__"})


@pytest.mark.parametrize("where, code", DOC_BLOCKS, ids=[w for w, _ in DOC_BLOCKS])
def test_docs_snippet_runs_as_written(where, code, tmp_path, monkeypatch, capsys):
    pytest.importorskip("torch")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, where, "exec"), {"__name__": "__docs__"})


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

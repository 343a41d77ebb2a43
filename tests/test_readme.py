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


# --- the README's shell lines -------------------------------------------------------------------

#: options appended to a README line to run it at small sizes (argparse keeps the last
#: occurrence of an option, so these override the line's own); the line is otherwise as written
SMALL = [
    (r"smoothchain check\b", "--points 1 --ascent-steps 0 --iters 5"),
    (r"smoothchain pl\b", "--samples 4"),
    (r"smoothchain train\b", "--steps 3 --limit 300 --eval-every 3 --hidden 8"),
    (r"smoothchain experiment dsgd\b", "--batch-steps 2 --minibatch-steps 2 --tune-steps 1 --grid 1 --limit 300 "
                                       "--batch-size 16 --hidden 8 --eval-every 2"),
    (r"smoothchain experiment prop21\b", "--points 3"),
]


def _shell_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, command) for every line of every ```bash block, comments removed."""
    out, inside = [], False
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip() == "```bash":
            inside = True
        elif inside and line.strip() == "```":
            inside = False
        elif inside and line.strip() and not line.lstrip().startswith("#"):
            out.append((number, re.sub(r"\s+#.*$", "", line.strip())))
    return out


def _runnable(command: str) -> str | None:
    """The command as the test runs it: the set-up part of `pip install ... && CMD` dropped (the
    installation is what .ci/run does from a clean clone), small sizes appended; None for the
    test command itself (this suite)."""
    command = re.sub(r"^pip install [^&]*&&\s*", "", command)
    if command.startswith("pip install") or command.startswith("python -m pytest"):
        return None
    for pattern, extra in SMALL:
        if re.search(pattern, command):
            return f"{command} {extra}"
    return command


README_SHELL = [(n, c) for n, c in _shell_lines(ROOT / "README.md") if _runnable(c) is not None]


def test_the_readme_shell_lines_are_found():
    commands = [c for _, c in README_SHELL]
    assert len(commands) >= 15
    assert any("--resume" in c for c in commands) and any("--nproc 2" in c for c in commands)


def test_readme_shell_lines_run_in_order(tmp_path):
    """Every shell line of the README, in order, in one fresh folder holding a copy of examples/
    (so that `--resume` meets the run the line before it made): each exits 0 without a
    traceback."""
    import os
    import shutil
    import subprocess
    import sys

    pytest.importorskip("torch")
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
           "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    failures = []
    for number, command in README_SHELL:
        run = _runnable(command).replace("python -m", f"{sys.executable} -m", 1)
        proc = subprocess.run(run, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0 or "Traceback" in proc.stderr:
            failures.append(f"README.md:{number}: `{run}` exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    assert not failures, "\n\n".join(failures)
    # what they wrote is git-ignored when they run in the project's folder
    rooted = {line.strip().strip("/") for line in (ROOT / ".gitignore").read_text().splitlines()
              if line.startswith("/")}
    written = {p.name for p in tmp_path.iterdir()} - {"examples"}
    assert written and written <= rooted, f"not in .gitignore: {sorted(written - rooted)}"

"""Shared by the benchmark scripts: print the result as one JSON line, optionally save it."""

from __future__ import annotations

import json


def emit(doc: dict, out: str | None = None) -> dict:
    """Print ``doc`` as one JSON line; with ``out``, also write that line to the file."""
    line = json.dumps(doc)
    print(line)
    if out:
        with open(out, "w") as fh:
            fh.write(line + "\n")
    return doc

"""Shared by the benchmark scripts: their common options, and the result as one JSON line
(optionally saved)."""

from __future__ import annotations

import argparse
import json

import torch


def parse_args(ap: argparse.ArgumentParser, argv=None, *, repeats: int = 3) -> argparse.Namespace:
    """Add the options the timing benchmarks share (``--repeats``, ``--threads``, ``--seed``,
    ``--out``) to ``ap``, parse ``argv`` and set torch's intra-op threads to ``--threads``."""
    ap.add_argument("--repeats", type=int, default=repeats)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="also write the JSON line to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    return args


def emit(doc: dict, out: str | None = None) -> dict:
    """Print ``doc`` as one JSON line; with ``out``, also write that line to the file."""
    line = json.dumps(doc)
    print(line)
    if out:
        with open(out, "w") as fh:
            fh.write(line + "\n")
    return doc


def wall_times(cmd: list[str], repeats: int, *, cwd=None, quiet_stderr: bool = False) -> list[float]:
    """Wall times of ``repeats`` runs of the command ``cmd`` (start-up included), stdout dropped."""
    import subprocess
    import time

    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=cwd, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL if quiet_stderr else None)
        times.append(time.perf_counter() - t0)
    return times

"""Wall time of the README's two `smoothchain check` examples with their defaults (issue 16:
under 60 s on a 2-core machine), start-up included.

Prints one JSON line: each example's wall time (the minimum over the repeats), the same
model's `smoothchain certify` wall time measured in the same run (the start-up and
certificate floor the search adds to), their ratio, and whether every example stayed under the
60 s target.  Run: `python benchmarks/check_readme.py [--repeats N]` (takes about a minute per
repeat).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from _report import wall_times  # benchmarks/_report.py (the script directory is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = {
    "cnn": ["--model", "cnn", "--json"],
    "my_net": ["--module", "examples/my_net.py:make_model", "--input-shape", "1,28,28"],
}
TARGET_S = 60.0


def wall(args: list[str], repeats: int) -> float:
    return min(wall_times([sys.executable, "-m", "smoothchain", *args], repeats, cwd=ROOT, quiet_stderr=True))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    out = {"benchmark": "check_readme_examples", "threads": os.cpu_count(), "target_s": TARGET_S}
    for name, opts in EXAMPLES.items():
        check = wall(["check", *opts], args.repeats)
        certify = wall(["certify", *[o for o in opts if o != "--json"]], args.repeats)
        out[f"{name}_check_s"] = round(check, 2)
        out[f"{name}_certify_s"] = round(certify, 2)
        out[f"{name}_check_over_certify"] = round(check / certify, 1)
    out["all_under_target"] = all(out[f"{n}_check_s"] < TARGET_S for n in EXAMPLES)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

"""Wall time of `smoothchain certify` on VGG-16 (RH Sec. 5), start-up included.

Prints one JSON line: the median wall time of the CLI over several runs, the median time of a
bare `python -c pass` measured in the same run (the start-up floor), their ratio, and whether
the CLI stayed under the 2 s target.  Run: `python benchmarks/certify_cli.py [--repeats N]`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

from _report import wall_times as wall  # benchmarks/_report.py (the script directory is on sys.path)

CMD = [sys.executable, "-m", "smoothchain", "certify", "--model", "vgg16-smooth", "--batch-size", "128",
       "--radius", "1", "--input-norm", "1", "--constants", "paper", "--json"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    wall(CMD, 1)  # warm the file cache
    cli = wall(CMD, args.repeats)
    bare = wall([sys.executable, "-c", "pass"], args.repeats)
    med_cli, med_bare = statistics.median(cli), statistics.median(bare)
    print(json.dumps({
        "benchmark": "certify_cli_vgg16_smooth_m128",
        "cli_wall_s_median": round(med_cli, 4),
        "cli_wall_s_max": round(max(cli), 4),
        "python_startup_s_median": round(med_bare, 4),
        "ratio_to_bare_python": round(med_cli / med_bare, 3),
        "target_s": 2.0,
        "under_target": med_cli < 2.0,
        "repeats": args.repeats,
    }))


if __name__ == "__main__":
    main()

"""Wall time of `smoothchain certify` on ResNet-18 (issue 13: under 5 s), start-up included.

ResNet-18 is examples/resnet.py's, written from torch.nn with torchvision's structure (read by
torch.fx, docs/graphs.md), at batch 128 on 3x224x224 inputs.  Prints one JSON line: the minimum
wall time of the CLI over the repeats, the time of `python -c "import torch"` and of building
the module alone in the same run (the floors), and whether the CLI stayed under 5 s.  Where
torchvision imports, the same for torchvision's own ``resnet18()`` (issue 13's acceptance
command, ``--module FILE:resnet18`` with FILE holding ``from torchvision.models import
resnet18``), under ``torchvision``; else that entry says why it is missing.
Run: `python benchmarks/certify_resnet.py [--repeats N]`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from _report import wall_times  # benchmarks/_report.py (the script directory is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
CMD = [sys.executable, "-m", "smoothchain", "certify", "--module", "examples/resnet.py:resnet18", "--input-shape",
       "3,224,224", "--batch-size", "128", "--json"]
BUILD = [sys.executable, "-c", "import sys; sys.path.insert(0, 'examples'); import resnet; resnet.resnet18()"]


def wall(cmd: list[str], repeats: int) -> float:
    return min(wall_times(cmd, repeats, cwd=ROOT))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    wall(CMD, 1)  # warm the file cache
    cli, build = wall(CMD, args.repeats), wall(BUILD, args.repeats)
    torch_import = wall([sys.executable, "-c", "import torch"], args.repeats)
    print(json.dumps({"benchmark": "certify_resnet18_m128", "cli_wall_s": round(cli, 3),
                      "build_module_s": round(build, 3), "import_torch_s": round(torch_import, 3),
                      "cli_over_build": round(cli / build, 2), "under_5s": cli < 5.0,
                      "torchvision": torchvision_row(args.repeats)}))


def torchvision_row(repeats: int) -> dict:
    """The acceptance command on torchvision's resnet18() as it is (or why it cannot run here)."""
    probe = subprocess.run([sys.executable, "-c", "import torchvision; print(torchvision.__version__)"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        return {"skipped": (probe.stderr.strip().splitlines() or ["torchvision does not import"])[-1]}
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "tv_models.py"
        f.write_text("from torchvision.models import resnet18\n")
        cmd = CMD[:CMD.index("--module") + 1] + [f"{f}:resnet18"] + CMD[CMD.index("--module") + 2:]
        wall(cmd, 1)
        cli = wall(cmd, repeats)
    build = wall([sys.executable, "-c", "import torchvision; torchvision.models.resnet18()"], repeats)
    return {"version": probe.stdout.strip(), "cli_wall_s": round(cli, 3), "build_module_s": round(build, 3),
            "under_5s": cli < 5.0}

if __name__ == "__main__":
    main()

"""VGG-16-smooth at m = 128, R = 1 (RH Sec. 5): the local certificate next to paper and tight.

Prints one JSON line: the study's paper and tight rows for ``vgg16-smooth`` (balls around 0,
any batch with ||x|| = 1), the ``local`` row on one batch with ||x|| = 1 for the same balls
(every weight 0: the same C), and the tight and local rows around PyTorch's default
initialisation (seed 0); the local rows' wall time; and the wall time of
``smoothchain certify --model vgg16-smooth`` with whether it imported torch (it must not).
Minutes of CPU: ``python benchmarks/vgg_local.py [--batch-size 128] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from _report import emit, parse_args

from smoothchain.vgg_study import local_vgg_rows, run_vgg_study

PROBE = ("import sys, time; t = time.perf_counter(); from smoothchain import certify; "
         "certify('vgg16-smooth', batch_size={m}, radius={r}, input_norm=1.0, mode='tight'); "
         "print(time.perf_counter() - t, 'torch' in sys.modules)")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--radius", type=float, default=1.0)
    ap.add_argument("--centres", default="zero,init", help="comma-separated: zero, init")
    args = parse_args(ap, argv, repeats=1)
    m, R = args.batch_size, args.radius
    doc: dict = {"benchmark": "vgg16_smooth_local", "batch_size": m, "radius": R, "input_norm": 1.0,
                 "threads": args.threads}
    study = run_vgg_study(batch_size=m, radius=R, input_norm=1.0)
    for row in study.rows:
        if row.model == "vgg16-smooth":
            doc[row.mode] = {"l": row.lipschitz, "L": row.smoothness, "L_F": row.objective_smoothness}
    for centre in args.centres.split(","):
        t0 = time.perf_counter()
        rows = local_vgg_rows(batch_size=m, radius=R, input_norm=1.0, seed=args.seed, centre=centre)
        for row in rows:
            doc[f"{row.mode}@{centre}"] = {"l": row.lipschitz, "L": row.smoothness, "L_F": row.objective_smoothness}
        doc[f"seconds@{centre}"] = round(time.perf_counter() - t0, 1)
        print(f"# {centre}: {doc[f'seconds@{centre}']} s", file=sys.stderr, flush=True)
    out = subprocess.run([sys.executable, "-c", PROBE.format(m=m, r=R)], check=True, capture_output=True,
                         text=True).stdout.split()
    doc["certify_builtin_s"], doc["certify_imports_torch"] = round(float(out[0]), 4), out[1] == "True"
    if "tight" in doc and "local@zero" in doc:
        doc["local_over_tight_L_F@zero"] = doc["local@zero"]["L_F"] / doc["tight"]["L_F"]
    if "tight@init" in doc and "local@init" in doc:
        doc["local_over_tight_L_F@init"] = doc["local@init"]["L_F"] / doc["tight@init"]["L_F"]
    return emit(doc, args.out)


if __name__ == "__main__":
    main()

"""Newton step (RH eq. (14)) by dynamic programming vs dense Newton, as the chain gets deeper.

``newton_step(method="dp")`` is RH Algo. 4 / Prop. C.1 (``smoothchain.oracles.lq``): per layer it
materialises A_l, B_l and the lambda-contracted layer Hessians, then runs the Riccati recursion,
so its cost is linear in the depth tau at fixed width and batch.  ``method="dense"`` builds the
p x p Hessian of F with ``torch.func.hessian`` (p = tau (d^2 + d) forward-over-reverse sweeps of a
depth-tau chain: ~tau^2) and factors it (Cholesky, ~p^3 / 3: ~tau^3).

Chain: ``depth`` x ``nn.Linear(width, width)`` with tanh in between, float64, square loss on
random targets, l2 = 1e-3, gamma = 0.01 (feasible here: both methods keep it, checked).  For
each depth both methods run ``--repeats`` times after one warm-up run of each at the smallest
depth; the time is the best run in process CPU time (``time.process_time``; the wall clock is
reported too), with ``--threads`` intra-op threads (default 1: reproducible on a shared machine).  The two directions are compared (max
relative difference reported).  Exponents: least-squares slope of log(time) vs log(depth).

Prints ONE JSON line (and writes it to ``--out`` if given).  Acceptance (issue 4): DP exponent
<= 1.3, dense exponent >= 2, DP at least 10x faster at the largest depth.

Usage: ``python benchmarks/newton_depth.py [--width 16] [--batch 4] [--depths 2,4,8,16]``.
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import torch
from torch import nn

from smoothchain.oracles import newton_step

from _report import emit, parse_args  # benchmarks/_report.py (the script directory is on sys.path)


def chain(depth: int, width: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    mods: list[nn.Module] = [nn.Linear(width, width)]
    for _ in range(depth - 1):
        mods += [nn.Tanh(), nn.Linear(width, width)]
    return nn.Sequential(*mods).to(torch.float64)


def slope(xs, ys) -> float:
    """Least-squares slope of log(ys) against log(xs)."""
    lx = [math.log(v) for v in xs]
    ly = [math.log(v) for v in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def rel_diff(a, b) -> float:
    fa = torch.cat([t.reshape(-1) for t in a])
    fb = torch.cat([t.reshape(-1) for t in b])
    return float((fa - fb).norm() / fb.norm())


def best_time(fn, repeats: int):
    """(best process CPU seconds, best wall seconds, last result) over ``repeats`` runs.

    CPU time (``time.process_time``, all threads of this process) is what the exponents are fitted
    on: on a machine shared with other jobs the wall clock also counts the time this process
    waits for a core, which is noise here (with one intra-op thread, CPU time = work done)."""
    cpu = wall = math.inf
    out = None
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        out = fn()
        cpu = min(cpu, time.process_time() - c0)
        wall = min(wall, time.perf_counter() - w0)
    return cpu, wall, out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--depths", default="2,4,8,16")
    ap.add_argument("--dense-repeats", type=int, default=3,
                    help="repeats of the dense method (default 3)")
    ap.add_argument("--gamma", type=float, default=0.01)
    ap.add_argument("--l2", type=float, default=1e-3)
    args = parse_args(ap, argv, repeats=5)
    depths = [int(d) for d in args.depths.split(",")]
    dense_repeats = args.dense_repeats

    def data(width):
        gen = torch.Generator().manual_seed(args.seed + 1)
        x = torch.randn(args.batch, width, generator=gen, dtype=torch.float64)
        y = torch.randn(args.batch, width, generator=gen, dtype=torch.float64)
        return x, y

    x, y = data(args.width)
    kw = dict(loss="square", l2=args.l2, gamma=args.gamma)
    warm = chain(min(depths), args.width, args.seed)
    for method in ("dp", "dense"):
        newton_step(warm, x, y, method=method, **kw)

    dp_t, dense_t, dp_w, dense_w, diffs, params = [], [], [], [], [], []
    for depth in depths:
        model = chain(depth, args.width, args.seed)
        params.append(sum(p.numel() for p in model.parameters()))
        t_dp, w_dp, r_dp = best_time(lambda: newton_step(model, x, y, method="dp", **kw), args.repeats)
        t_dense, w_dense, r_dense = best_time(lambda: newton_step(model, x, y, method="dense", **kw),
                                              dense_repeats)
        if r_dp.gamma != args.gamma or r_dense.gamma != args.gamma:
            raise SystemExit(f"gamma {args.gamma} was halved at depth {depth}: choose a smaller --gamma")
        dp_t.append(t_dp)
        dense_t.append(t_dense)
        dp_w.append(w_dp)
        dense_w.append(w_dense)
        diffs.append(rel_diff(r_dp.direction, r_dense.direction))

    dp_exp, dense_exp = slope(depths, dp_t), slope(depths, dense_t)
    speedup = [b / a for a, b in zip(dp_t, dense_t)]
    doc = {
        "benchmark": "newton_depth",
        "width": args.width, "batch": args.batch, "depths": depths, "parameters": params,
        "threads": args.threads, "repeats": args.repeats, "dense_repeats": dense_repeats,
        "gamma": args.gamma, "l2": args.l2,
        "dp_cpu_seconds": [round(t, 5) for t in dp_t], "dense_cpu_seconds": [round(t, 5) for t in dense_t],
        "dp_exponent": round(dp_exp, 3), "dense_exponent": round(dense_exp, 3),
        "speedup": [round(s, 2) for s in speedup], "speedup_at_max_depth": round(speedup[-1], 2),
        "dp_wall_seconds": [round(t, 5) for t in dp_w], "dense_wall_seconds": [round(t, 5) for t in dense_w],
        "dp_exponent_wall": round(slope(depths, dp_w), 3),
        "dense_exponent_wall": round(slope(depths, dense_w), 3),
        "speedup_at_max_depth_wall": round(dense_w[-1] / dp_w[-1], 2),
        "max_rel_diff_dp_vs_dense": max(diffs),
        "acceptance": {"dp_exponent_le_1.3": dp_exp <= 1.3, "dense_exponent_ge_2": dense_exp >= 2.0,
                       "dp_10x_faster_at_max_depth": speedup[-1] >= 10.0},
        "torch": torch.__version__, "machine": platform.machine(),
    }
    return emit(doc, args.out)


if __name__ == "__main__":
    main()

"""Gauss-Newton step (RH eq. (13)) by the dual (Prop. 3.5) vs a materialised Gauss-Newton solve,
as the parameter count p grows at a fixed output dimension q = batch x outputs.

``gauss_newton_step(method="dual")`` runs conjugate gradient on the q-dimensional dual (18)
with autodiff-oracle calls only (<= 2q + 1 of them, each a sweep costing ~ one gradient), so its
cost grows like q x p.  ``method="dense"`` materialises J = grad psi(w) (p x q, q vectorised
vjps), forms J H J^T + (l2 + 1/gamma) I (p x p, ~ q p^2) and solves it (~ p^3 / 3): its cost
grows like p^2 to p^3.

Chain: ``Linear(16, h) - tanh - Linear(h, k)``, float64, cross-entropy on random labels,
l2 = 1e-3, gamma = 1, batch m, q = m k; the hidden width h takes the values of ``--hidden``.
Best of ``--repeats`` runs in process CPU time after a warm-up of each method, ``--threads`` intra-op
threads (default 1).  Exponents: least-squares slope of log(time) vs log(p).  The directions of
both methods are compared (max relative difference) and the dual's oracle calls are checked
against 2q + 1.  Prints ONE JSON line (also written to ``--out``).

Usage: ``python benchmarks/gauss_newton_dual.py [--batch 8] [--classes 4] [--hidden 16,32,...]``.
"""

from __future__ import annotations

import argparse
import platform

import torch
from torch import nn

from smoothchain.oracles import gauss_newton_step

from newton_depth import best_time, rel_diff, slope

from _report import emit, parse_args  # benchmarks/_report.py (the script directory is on sys.path)


def mlp(d_in: int, hidden: int, classes: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, classes)).to(torch.float64)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--inputs", type=int, default=16)
    ap.add_argument("--hidden", default="16,32,64,128,256")
    args = parse_args(ap, argv, repeats=3)
    hidden = [int(h) for h in args.hidden.split(",")]
    gen = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(args.batch, args.inputs, generator=gen, dtype=torch.float64)
    y = torch.randint(0, args.classes, (args.batch,), generator=gen)
    q = args.batch * args.classes
    kw = dict(loss="cross-entropy", l2=1e-3, gamma=1.0)
    warm = mlp(args.inputs, hidden[0], args.classes, args.seed)
    for method in ("dual", "dense"):
        gauss_newton_step(warm, x, y, method=method, **kw)

    params, t_dual, t_dense, calls, diffs = [], [], [], [], []
    for h in hidden:
        model = mlp(args.inputs, h, args.classes, args.seed)
        params.append(sum(p.numel() for p in model.parameters()))
        a, _, r_dual = best_time(lambda: gauss_newton_step(model, x, y, method="dual", **kw), args.repeats)
        b, _, r_dense = best_time(lambda: gauss_newton_step(model, x, y, method="dense", **kw), args.repeats)
        t_dual.append(a)
        t_dense.append(b)
        calls.append(r_dual.oracle_calls)
        diffs.append(rel_diff(r_dual.direction, r_dense.direction))
    dual_exp, dense_exp = slope(params, t_dual), slope(params, t_dense)
    speedup = [b / a for a, b in zip(t_dual, t_dense)]
    doc = {
        "benchmark": "gauss_newton_dual",
        "batch": args.batch, "classes": args.classes, "q": q, "hidden": hidden, "parameters": params,
        "threads": args.threads, "repeats": args.repeats,
        "dual_cpu_seconds": [round(t, 5) for t in t_dual], "dense_cpu_seconds": [round(t, 5) for t in t_dense],
        "dual_exponent_in_p": round(dual_exp, 3), "dense_exponent_in_p": round(dense_exp, 3),
        "speedup": [round(s, 2) for s in speedup],
        "dual_oracle_calls": calls, "bound_2q_plus_1": 2 * q + 1,
        "calls_within_bound": all(c <= 2 * q + 1 for c in calls),
        "max_rel_diff_dual_vs_dense": max(diffs),
        "torch": torch.__version__, "machine": platform.machine(),
    }
    return emit(doc, args.out)


if __name__ == "__main__":
    main()

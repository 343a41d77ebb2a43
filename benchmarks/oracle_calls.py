"""Autodiff-oracle calls per step for each step type and method (RH Sec. 3.3, Prop. 3.5), and the
step's wall-clock time relative to a gradient step measured in the same run.

One call = one sweep through the chain applying derivative information (a backward sweep or a
forward-mode linearisation sweep, ``smoothchain.oracles.autodiff``); the counts are read from the
``OracleCounter`` that the oracles increment on each sweep (``tests/test_oracles.py`` also
tallies the vjp closures and jvps that really run).  RH: a gradient step makes one call, a
Gauss-Newton step by the dual at most 2q + 1 (q = batch x outputs).

Models: smoothchain's built-in ``mlp`` (64-32-10 tanh) and ``cnn`` (two 3x3 convolutions with
softplus and average pooling, then linear) in float64, on ``--batch`` digits (random inputs if
scikit-learn is missing), both losses, l2 = 1e-3, gamma = 0.05 (small enough for the Newton step
to keep it).  Times: best of ``--repeats`` in process CPU time, ``--threads`` intra-op threads (default 1).
Prints ONE JSON line (also written to ``--out``).

Usage: ``python benchmarks/oracle_calls.py [--batch 8]``.
"""

from __future__ import annotations

import argparse
import platform

import torch

from smoothchain.models import builtin
from smoothchain.oracles import gauss_newton_step, gradient_step, newton_step
from smoothchain.torch_chain import torch_module

from newton_depth import best_time

from _report import emit, parse_args  # benchmarks/_report.py (the script directory is on sys.path)

STEPS = [("gradient", "dp", gradient_step), ("gradient", "dense", gradient_step),
         ("gauss-newton", "dual", gauss_newton_step), ("gauss-newton", "dp", gauss_newton_step),
         ("gauss-newton", "dense", gauss_newton_step), ("newton", "dp", newton_step)]


def batch(shape, m: int, seed: int):
    try:
        from smoothchain.data import digits

        ds = digits(dtype=torch.float64, seed=seed)
        x = ds.x_train[:m].reshape((m,) + tuple(shape))
        return x, ds.labels_train[:m], ds.y_train[:m], "digits"
    except Exception:   # no scikit-learn: random inputs, random labels
        gen = torch.Generator().manual_seed(seed)
        x = torch.rand((m,) + tuple(shape), generator=gen, dtype=torch.float64)
        labels = torch.randint(0, 10, (m,), generator=gen)
        return x, labels, torch.nn.functional.one_hot(labels, 10).double(), "random"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--gamma", type=float, default=0.05)
    args = parse_args(ap, argv, repeats=3)
    rows, source = [], None
    for name in ("mlp", "cnn"):
        spec = builtin(name)
        torch.manual_seed(args.seed)
        model = torch_module(spec.components, spec.names).to(torch.float64)
        x, labels, onehot, source = batch(spec.input_shape, args.batch, args.seed)
        p = sum(t.numel() for t in model.parameters())
        for loss, y in (("cross-entropy", labels), ("square", onehot)):
            q = model(x).numel()
            kw = dict(loss=loss, l2=1e-3, gamma=args.gamma)
            base = None
            for kind, method, fn in STEPS:
                fn(model, x, y, method=method, **kw)           # warm-up
                t, _, res = best_time(lambda: fn(model, x, y, method=method, **kw), args.repeats)
                base = t if base is None else base              # gradient by DP comes first
                rows.append({"model": name, "loss": loss, "p": p, "q": q, "step": kind, "method": method,
                             "oracle_calls": res.oracle_calls, "gamma_used": res.gamma,
                             "cpu_seconds": round(t, 5), "time_vs_gradient": round(t / base, 2)})
    gn = [r for r in rows if r["step"] == "gauss-newton" and r["method"] == "dual"]
    doc = {
        "benchmark": "oracle_calls", "batch": args.batch, "data": source, "threads": args.threads,
        "rows": rows,
        "gradient_dp_calls_all_1": all(r["oracle_calls"] == 1 for r in rows
                                       if r["step"] == "gradient" and r["method"] == "dp"),
        "gauss_newton_dual_within_2q_plus_1": all(r["oracle_calls"] <= 2 * r["q"] + 1 for r in gn),
        "torch": torch.__version__, "machine": platform.machine(),
    }
    return emit(doc, args.out)


if __name__ == "__main__":
    main()

"""Tightness of the certified objective smoothness L_F: est/cert per model and constants mode.

For each model and each constants mode, ``smoothchain.check.check`` certifies L_F on the balls
C = {||v_l - v*_l|| <= R} around the actual weights (RH Cor. 4.5; ``around_weights=True``) and
estimates the supremum over C of the objective's top |Hessian eigenvalue| (random points of C
plus projected gradient ascent, float64).  The estimate is attained in C, so est/cert <= 1 unless
the certificate is unsound (a violation); the closer to 1, the tighter the certificate.

Exactly what ``smoothchain check --model M --constants MODE --around-weights --radius R
--batch-size B --points P --ascent-steps S --no-per-layer --json`` computes, with the CLI's
defaults otherwise (``input_norm`` 1: a Gaussian batch scaled to ||x|| = 1, random labels,
cross-entropy, ``iters`` 60, ``tolerance`` 1e-6, ``seed`` for both the weights and the check).

Models (``--models``, default all three):

* ``mlp``: the built-in 64-32-10 tanh MLP, weights of ``seeded_module("mlp", seed)``;
* ``cnn``: the built-in 1x8x8 conv-softplus-avgpool x2 + linear CNN, ``seeded_module("cnn", seed)``;
* ``tanh3``: ``nn.Sequential(Linear(64,32), Tanh(), Linear(32,32), Tanh(), Linear(32,10))``
  built right after ``torch.manual_seed(seed)`` (the global generator's state is restored after).

Modes (``--modes``, default tight,local,paper): ``paper`` is recorded for reference; the
``acceptance`` object gives per model the best est/cert among tight and local and whether it
is >= ``--threshold`` (default 0.1).

Prints ONE JSON line (also written to ``--out``, default benchmarks/tightness.json): per model
and mode the certified and estimated L_F, est/cert, the number of violations (and their
details), where the estimate was found and the wall seconds of the check.

Usage: ``python benchmarks/tightness.py [--models mlp,cnn,tanh3] [--modes tight,local,paper]
[--radius 0.1] [--batch-size 8] [--points 2] [--ascent-steps 4] [--threads 1]
[--out benchmarks/tightness.json]``.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time

import torch
from torch import nn

from smoothchain.certificate import seeded_module
from smoothchain.check import check
from smoothchain.models import builtin
from smoothchain.spec import json_number

from _report import emit, parse_args  # benchmarks/_report.py (the script directory is on sys.path)

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tightness.json")


def tanh3(seed: int) -> nn.Sequential:
    """The 64-32-32-10 tanh MLP with the weights ``torch.manual_seed(seed)`` then construction give."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 10))


def load(name: str, seed: int) -> tuple[nn.Module, tuple[int, ...], str]:
    """The module, its per-example input shape and a description."""
    if name == "tanh3":
        return tanh3(seed), (64,), f"torch.nn 64-32-32-10 tanh MLP (torch.manual_seed({seed}))"
    arch = builtin(name)
    return seeded_module(name, seed=seed), tuple(arch.input_shape), f"built-in {name} (seeded_module seed {seed})"


def ratio(est: float, cert: float) -> float | None:
    return None if cert == 0 or math.isinf(cert) or math.isnan(cert) else est / cert


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mlp,cnn,tanh3", help="comma-separated: mlp, cnn, tanh3")
    ap.add_argument("--modes", default="tight,local,paper", help="comma-separated constants modes")
    ap.add_argument("--radius", type=float, default=0.1)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--input-norm", type=float, default=1.0, help="||x|| of the whole batch (the CLI's default 1)")
    ap.add_argument("--points", type=int, default=2)
    ap.add_argument("--ascent-steps", type=int, default=4)
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--tolerance", type=float, default=1e-6)
    ap.add_argument("--threshold", type=float, default=0.1, help="acceptance: best est/cert of tight/local >= this")
    ap.add_argument("--note", default=None, help="free text recorded in the settings (e.g. why points were reduced)")
    args = parse_args(ap, argv, repeats=1)
    out = DEFAULT_OUT if args.out is None else (args.out or None)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]

    t_all = time.perf_counter()
    results: dict[str, dict] = {}
    acceptance: dict[str, dict] = {}
    for name in models:
        model, shape, desc = load(name, args.seed)
        per_mode: dict[str, dict] = {}
        for mode in modes:
            t0 = time.perf_counter()
            res = check(model, input_shape=shape, batch_size=args.batch_size, radius=args.radius,
                        input_norm=args.input_norm, loss="cross-entropy", mode=mode, around_weights=True,
                        points=args.points, ascent_steps=args.ascent_steps, iters=args.iters,
                        tolerance=args.tolerance, seed=args.seed, per_layer=False)
            wall = time.perf_counter() - t0
            cert = res.certified["objective_smoothness"]
            est = res.estimated["objective_smoothness"]
            r = ratio(est, cert)
            per_mode[mode] = {
                "certified_L_F": json_number(cert), "estimated_L_F": json_number(est),
                "est_over_cert": None if r is None else json_number(r),
                "violations": len(res.violations), "violation_details": list(res.violations),
                "estimate_found_at": res.where.get("objective_smoothness"),
                "seconds": wall,
            }
        results[name] = {"model": desc, "input_shape": list(shape),
                         "parameters": sum(p.numel() for p in model.parameters()), "modes": per_mode}
        cands = {m: per_mode[m]["est_over_cert"] for m in ("tight", "local") if m in per_mode
                 and per_mode[m]["est_over_cert"] is not None}
        if cands:
            best_mode = max(cands, key=lambda m: cands[m])
            acceptance[name] = {"best_mode": best_mode, "best_est_over_cert": cands[best_mode],
                                "meets_threshold": bool(cands[best_mode] >= args.threshold)}
        else:
            acceptance[name] = {"best_mode": None, "best_est_over_cert": None, "meets_threshold": False}
    acceptance["all_meet_threshold"] = all(v["meets_threshold"] for v in acceptance.values())
    acceptance["threshold"] = args.threshold

    doc = {
        "benchmark": "tightness",
        "quantity": "objective smoothness L_F: estimate over C / certified bound",
        "settings": {"radius": args.radius, "around_weights": True, "loss": "cross-entropy",
                     "batch_size": args.batch_size, "input_norm": args.input_norm, "points": args.points,
                     "ascent_steps": args.ascent_steps, "iters": args.iters, "tolerance": args.tolerance,
                     "seed": args.seed, "per_layer": False, "modes": modes, "note": args.note},
        "models": results,
        "acceptance": acceptance,
        "total_violations": sum(v["violations"] for m in results.values() for v in m["modes"].values()),
        "seconds": time.perf_counter() - t_all,
        "threads": args.threads, "torch": torch.__version__, "machine": platform.machine(),
    }
    return emit(doc, out)


if __name__ == "__main__":
    main()

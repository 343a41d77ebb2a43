"""Certified-step gradient descent (``smoothchain.optim.CertifiedGD``) vs constant-step GD.

scikit-learn digits (``smoothchain.data.digits``, the training split, full batch), the built-in
``mlp`` (64-32-10 tanh, weights of ``smoothchain.certificate.seeded_module(seed)``), float64,
cross-entropy, ``--steps`` steps (default 300):

* certified GD: ``CertifiedGD(mode=--mode, radius=--radius, recertify_every=1)``: with the
  default ``segment`` each step's eta and decrease are certified on the step's own segment
  (docs/segment.md); with ``local``/``tight``/``paper`` eta = min(1/L_F, R / max_l ||g_l||) with
  L_F certified on the ball around the weights; ``--compare`` modes run too (default tight,local);
* plain GD w <- w - eta g with a constant eta from ``--grid`` (default 1e-3, 3e-3, ..., 10),
  the same start.

Prints ONE JSON line (also written to ``--out``): the final loss of certified GD, the best grid
loss and its step, their ratio, min over the steps of (actual - certified decrease) (>= 0 up
to rounding: the descent lemma holds), the mean certified eta and its ratio to the best constant
step, how often the ball rather than 1/L_F limited the step, the L_F range and the wall time of
``certify`` per step, and a summary of each ``--compare`` mode.  ``--plot FILE``: loss vs step of
certified GD (each mode), the best tuned GD, two other grid steps and the guaranteed curve
F(w_0) - cumulative certified decrease (left); actual and certified decrease per step (middle);
the certified eta with 1 / certified curvature (and the ball-limited step) (right).

Usage: ``python benchmarks/certified_gd.py [--steps 300] [--radius 0.1] [--mode segment] [--compare tight,local]
[--plot docs/figures/certified_gd.png] [--out benchmarks/certified_gd.json]``.
"""

from __future__ import annotations

import argparse
import copy
import math
import platform
import time

import torch

from smoothchain.certificate import seeded_module
from smoothchain.data import digits
from smoothchain.losses import loss_function
from smoothchain.optim import CertifiedGD

from _report import emit, parse_args  # benchmarks/_report.py (the script directory is on sys.path)

GRID = "0.001,0.003,0.01,0.03,0.1,0.3,1,3,10"


def constant_gd(model, x, y, eta: float, steps: int) -> list[float]:
    """Plain full-batch GD with a constant step: F(w_0), ..., F(w_steps) (inf after a blow-up)."""
    f = loss_function("cross-entropy", y, x)
    params = list(model.parameters())
    losses = []
    for _ in range(steps):
        value = f(model(x))
        losses.append(float(value.detach()))
        if not math.isfinite(losses[-1]):
            return losses + [math.inf] * (steps + 1 - len(losses))
        grads = torch.autograd.grad(value, params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.add_(g, alpha=-eta)
    with torch.no_grad():
        last = float(f(model(x)))
    return losses + [last if math.isfinite(last) else math.inf]


def certified_run(model0, x, y, mode: str, radius: float, steps: int):
    """CertifiedGD from a copy of ``model0``: its history and wall time."""
    model = copy.deepcopy(model0)
    opt = CertifiedGD(model, loss="cross-entropy", radius=radius, mode=mode, recertify_every=1)
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.step(lambda: (x, y))
    return opt.history, time.perf_counter() - t0


def plot(path, cert_losses, guaranteed, grid_curves, best, others, hist, *, mode: str, radius: float,
         compared=None) -> None:
    from smoothchain.report import new_figure, save_figure

    fig = new_figure(figsize=(15, 5.4))
    ax, dx, bx = fig.subplots(1, 3)
    steps = range(len(cert_losses))
    ax.plot(steps, grid_curves[best], label=f"GD, best constant step {best:g}", color="C3")
    for i, eta in enumerate(others):
        curve = [v if math.isfinite(v) else float("nan") for v in grid_curves[eta]]
        ax.plot(steps, curve, label=f"GD, step {eta:g}", color=f"C{i + 1}", ls="-.")
    ax.plot(steps, cert_losses, label=f"certified GD ({mode})", color="C0", lw=2.5, zorder=5)
    for i, (other, curve) in enumerate((compared or {}).items()):
        ax.plot(steps, curve, label=f"certified GD ({other}, ball R = {radius:g})", color=f"C{i + 4}", lw=1.5, ls=":")
    ax.plot(steps, guaranteed, label=f"guaranteed ({mode}): F(w0) - sum of certified decreases", color="k",
            ls="--", zorder=6)
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.set_ylabel("cross-entropy (training set, full batch)")
    ax.set_title("loss: digits, mlp 64-32-10 tanh, full batch")
    # below the axes: inside, the legend covered the curves' ends
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    ts = [r.step for r in hist]
    dx.plot(ts, [r.actual_decrease for r in hist], label="actual decrease", color="C0", lw=2)
    dx.plot(ts, [r.certified_decrease for r in hist], label="certified decrease", color="k", ls="--")
    dx.set_yscale("log")
    dx.set_xlabel("step")
    dx.set_ylabel("F(w_t) - F(w_t+1)")
    dx.set_title(f"per step ({mode}): actual >= certified")
    dx.legend(fontsize=7, loc="upper right")
    bx.plot(ts, [r.eta for r in hist], label="certified eta", color="C0", lw=2)
    bx.plot(ts, [r.inverse_smoothness for r in hist], label="1 / certified curvature", color="C1", ls="--")
    if any(math.isfinite(r.ball_eta) for r in hist):
        bx.plot(ts, [r.ball_eta for r in hist], label="R / max_l ||g_l||", color="C2", ls=":")
    bx.axhline(best, color="C3", label=f"best constant step {best:g}")
    bx.set_yscale("log")
    bx.set_xlabel("step")
    bx.set_ylabel("step size")
    bx.set_title("step sizes")
    bx.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--radius", type=float, default=0.1)
    ap.add_argument("--mode", default="segment", help="CertifiedGD's mode (segment, local, tight, paper)")
    ap.add_argument("--compare", default="tight,local",
                    help="other CertifiedGD modes run for comparison (summary and figure); '' for none")
    ap.add_argument("--grid", default=GRID, help="constant steps of plain GD")
    ap.add_argument("--plot", default=None, help="write the figure to this PNG")
    args = parse_args(ap, argv, repeats=1)
    grid = [float(t) for t in args.grid.split(",") if t.strip()]
    ds = digits(dtype=torch.float64)
    x, y = ds.x_train, ds.labels_train
    model0 = seeded_module("mlp", seed=args.seed).to(torch.float64)

    hist, cert_wall = certified_run(model0, x, y, args.mode, args.radius, args.steps)
    compared = {}
    for mode in [m.strip() for m in args.compare.split(",") if m.strip() and m.strip() != args.mode]:
        h, wall = certified_run(model0, x, y, mode, args.radius, args.steps)
        compared[mode] = {"final_loss": h[-1].loss_after, "mean_eta": sum(r.eta for r in h) / len(h),
                          "smoothness_range": [min(r.smoothness for r in h), max(r.smoothness for r in h)],
                          "all_steps_certified": all(r.actual_decrease >= r.certified_decrease - 1e-12 for r in h),
                          "seconds_per_step": wall / args.steps,
                          "curve": [h[0].loss_before] + [r.loss_after for r in h]}
    cert_losses = [hist[0].loss_before] + [r.loss_after for r in hist]
    guaranteed = [hist[0].loss_before]
    for r in hist:
        guaranteed.append(guaranteed[-1] - r.certified_decrease)

    grid_curves = {eta: constant_gd(copy.deepcopy(model0), x, y, eta, args.steps) for eta in grid}
    finals = {eta: c[-1] for eta, c in grid_curves.items()}
    best = min(grid, key=lambda e: finals[e])
    etas = [r.eta for r in hist]
    mean_eta = sum(etas) / len(etas)
    # two other grid steps for the figure: the smallest above the mean certified eta, and the
    # one in the middle (geometrically) between it and the best
    above = [e for e in grid if e > mean_eta and e != best] or [e for e in grid if e != best]
    first = above[0]
    mid = min((e for e in grid if e not in (best, first)), key=lambda e: abs(math.log(e / math.sqrt(first * best))),
              default=None)
    others = [first] + ([mid] if mid is not None else [])
    if args.plot:
        plot(args.plot, cert_losses, guaranteed, grid_curves, best, others, hist, mode=args.mode, radius=args.radius,
             compared={k: v["curve"] for k, v in compared.items()})
    margin = [r.actual_decrease - r.certified_decrease for r in hist]
    slack = [r.actual_decrease / r.certified_decrease for r in hist if r.certified_decrease > 0]
    doc = {
        "benchmark": "certified_gd",
        "model": f"mlp 64-32-10 tanh (seeded_module seed {args.seed}), float64",
        "data": f"digits train split, {len(x)} examples, full batch", "loss": "cross-entropy",
        "mode": args.mode, "radius": args.radius, "recertify_every": 1, "steps": args.steps,
        "initial_loss": cert_losses[0],
        "certified_final_loss": cert_losses[-1],
        "guaranteed_final_loss": guaranteed[-1],
        "grid": grid, "grid_final_losses": {f"{e:g}": (f if math.isfinite(f) else "inf") for e, f in finals.items()},
        "best_grid_step": best, "best_grid_loss": finals[best],
        "loss_ratio_certified_to_best": cert_losses[-1] / finals[best],
        "min_actual_minus_certified_decrease": min(margin),
        "all_steps_certified": all(m >= -1e-12 * max(1.0, abs(r.loss_before)) for m, r in zip(margin, hist)),
        "actual_over_certified_decrease": {"min": min(slack), "median": sorted(slack)[len(slack) // 2],
                                           "max": max(slack)},
        "mean_eta": mean_eta, "eta_ratio_to_best_step": mean_eta / best,
        "ball_limited_steps": sum(r.ball_eta < r.inverse_smoothness for r in hist),
        "smoothness_range": [min(r.smoothness for r in hist), max(r.smoothness for r in hist)],
        "certify_seconds_per_step": sum(r.certify_seconds for r in hist) / len(hist),
        "certified_gd_seconds_per_step": cert_wall / args.steps,
        "compared_modes": {k: {q: v[q] for q in v if q != "curve"} for k, v in compared.items()},
        "figure": args.plot,
        "threads": args.threads, "torch": torch.__version__, "machine": platform.machine(),
    }
    return emit(doc, args.out)


if __name__ == "__main__":
    main()

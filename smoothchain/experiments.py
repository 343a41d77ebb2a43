"""Experiments of Flynn's paper ("F"): the Sec. 5 protocol and the Sec. 2 motivating example.

* :func:`dsgd_experiment` -- F Sec. 5 and its appendix: one hidden layer of sigmoid units
  (default 300), squared loss (F eqs. 21-22), uniform [-1, 1] initialisation.
  (1) Batch mode (F Sec. 5.1, Figs. 2, 3, 7): DSGD with the theoretical lr = 1 against RANDOM and
  SEQUENTIAL, whose step sizes are tuned: each candidate in ``grid`` (default {0.001, 0.01, 0.1,
  1, 10}) trains on 5/6 of the training set for ``tune_steps`` steps and the one with the
  smallest validation error (on the withheld 1/6) is used for the full run.
  (2) Mini-batch mode (F Sec. 5.2, Figs. 4, 5): DSGD_ALL against SGD with Euclidean updates
  (SGD_STANDARD) and with q-norm duality updates (SGD_q), all tuned the same way.
  Writes ``report.md``, ``results.json`` and the figures to ``out``.
* :func:`prop21` -- F Sec. 2, Prop. 2.1: along w(eps) = (1, 1, eps, (y - eps sigma(1)) / sigma(1))
  the Hessian of E(w) = sigma(w3 sigma(w1) + w4 sigma(w2))^2 grows linearly in eps (F's proof:
  d^2E / dw1 dw3 = a eps + b with a > 0 for y <= 0), while every layer block stays below DSGD's
  local bound p_i(w)^2 (F Prop. 4.3), i.e. F Assumption 3.5 holds with L = 1.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path

from .report import atomic_write_text, fmt_number, legend_below, new_figure, save_figure

__all__ = ["dsgd_experiment", "f_claims", "prop21", "GRID"]

GRID = (0.001, 0.01, 0.1, 1.0, 10.0)
#: the defaults of dsgd_experiment and `smoothchain experiment dsgd` (F runs 20,000 batch steps;
#: these keep the whole protocol on digits within about 10 minutes on 2 cores)
BATCH_STEPS, MINIBATCH_STEPS, TUNE_STEPS = 6000, 6000, 500


def _q_label(q) -> str:
    return fmt_number(float(q), ".0f")


def dsgd_experiment(data: str = "digits", *, out: str | Path = "dsgd-experiment", hidden: int = 300,
                    batch_steps: int = BATCH_STEPS, minibatch_steps: int = MINIBATCH_STEPS, tune_steps: int = TUNE_STEPS,
                    batch_size: int = 128, qs=(1, 2, math.inf), grid=GRID, limit: int | None = None,
                    seed: int = 0, eval_every: int | None = None, progress: bool = True) -> dict:
    """F Sec. 5 protocol on ``data`` (see the module docstring); returns the results dict, whose
    ``claims`` (:func:`f_claims`) state F's Sec. 5 observations with the measured numbers.
    ``eval_every`` defaults to 1/200 of the longest run."""
    from .data import load_dataset, validation_split
    from .train import TrainConfig, plot_metrics, train

    out = Path(out)
    ds = load_dataset(data, limit=limit)
    out.mkdir(parents=True, exist_ok=True)  # after the data: a data error leaves nothing behind
    tune_train, tune_val = validation_split(ds, 1 / 6, seed=seed)
    # validation examples play the role of the test set while tuning
    tune_ds = replace(tune_train, x_test=tune_val.x_train, y_test=tune_val.y_train,
                      labels_test=tune_val.labels_train)
    qs = [float(q) for q in qs]
    if eval_every is None:
        eval_every = max(1, max(batch_steps, minibatch_steps, tune_steps) // 200)

    def run(opt, q, lr, steps, bs, d=ds):
        cfg = TrainConfig(optimizer=opt, q=q, hidden=hidden, steps=steps, batch_size=bs, lr=lr,
                          seed=seed, eval_every=eval_every, plots=False)
        holder: dict = {}
        t0 = time.perf_counter()
        s = train(cfg, data=d, progress=progress, metrics_out=holder)
        # wall time per step, the evaluations (every eval_every steps, the same for every method) included
        s["seconds_per_step"] = (time.perf_counter() - t0) / max(1, steps)
        return s, holder["metrics"]

    def tune(opt, q, bs):
        scores = {}
        for lr in grid:
            s, _ = run(opt, q, lr, tune_steps, bs, tune_ds)
            err = s["final"]["test_accuracy"] if s["final"] else 0.0
            scores[lr] = math.inf if s["diverged"] else 1.0 - err  # validation error
        best = min(grid, key=lambda lr: (scores[lr], lr))
        return best, scores

    results: dict = {"data": ds.name, "hidden": hidden, "grid": list(grid), "batch": {}, "minibatch": {},
                     "batch_steps": batch_steps, "minibatch_steps": minibatch_steps,
                     "tune_steps": tune_steps, "batch_size": batch_size}
    figures = []
    # ---- (1) batch mode: DSGD (lr = 1) vs RANDOM / SEQUENTIAL (tuned) -----------------------
    for q in qs:
        ql = _q_label(q)
        runs, entry = {}, {}
        s, m = run("dsgd", q, 1.0, batch_steps, 0)
        runs["DSGD"] = m
        entry["dsgd"] = {"lr": 1.0, "final": s["final"], "counts": s["counts"],
                         "first_error": _first_error(m), "layer1_share_by_quarter": _quarter_shares(m),
                         "seconds_per_step": s["seconds_per_step"]}
        best_name, best_err = None, math.inf
        for opt in ("random", "sequential"):
            lr, scores = tune(opt, q, 0)
            s, m = run(opt, q, lr, batch_steps, 0)
            entry[opt] = {"lr": lr, "validation_error": {str(k): v for k, v in scores.items()},
                          "final": s["final"], "counts": s["counts"], "seconds_per_step": s["seconds_per_step"]}
            err = s["final"]["train_error"] if s["final"] else math.inf
            runs[opt.upper()] = m
            if err < best_err:
                best_name, best_err = opt, err
        entry["best_layerwise"] = best_name
        results["batch"][ql] = entry
        figures += plot_metrics(runs, out, layerwise=True, prefix=f"batch_q{ql}_",
                                title=f"{ds.name}, batch mode, q={ql}")
    # ---- (2) mini-batch mode: DSGD_ALL vs SGD variants (all tuned) -------------------------
    runs = {}
    s_lr, s_scores = tune("sgd", 2.0, batch_size)
    s, m = run("sgd", 2.0, s_lr, minibatch_steps, batch_size)
    runs["SGD_STANDARD"] = m
    results["minibatch"]["sgd_standard"] = {"method": "SGD_STANDARD", "lr": s_lr, "final": s["final"],
                                            "seconds_per_step": s["seconds_per_step"]}
    for q in qs:
        ql = _q_label(q)
        for opt, label in (("dsgd-all", f"DSGD_ALL q={ql}"), ("sgd-norm", f"SGD q={ql}")):
            lr, scores = tune(opt, q, batch_size)
            s, m = run(opt, q, lr, minibatch_steps, batch_size)
            runs[label] = m
            results["minibatch"][f"{opt}_q{ql}"] = {"method": label, "lr": lr, "final": s["final"],
                                                    "seconds_per_step": s["seconds_per_step"]}
    figures += plot_metrics(runs, out, layerwise=False, prefix="minibatch_",
                            title=f"{ds.name}, mini-batch mode (batch {batch_size})")
    results["figures"] = [Path(f).name for f in figures]
    results["claims"] = f_claims(results)
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(out / "report.md", _report(results))
    results["report"] = str(out / "report.md")
    return results


def _first_error(metrics: list) -> float | None:
    """The training error at the first evaluation (after step 1)."""
    return next((m["train_error"] for m in metrics if "train_error" in m), None)


def _quarter_shares(metrics: list) -> list[float | None]:
    """The share of layer-1 updates in each quarter of a run (from the cumulative counts)."""
    n = len(metrics)
    if n < 4 or not metrics[0].get("counts"):
        return []
    marks = [[0] * len(metrics[0]["counts"])] + [metrics[(k * n) // 4 - 1]["counts"] for k in range(1, 5)]
    shares = []
    for a, b in zip(marks, marks[1:]):
        d = [y - x for x, y in zip(a, b)]
        shares.append(d[0] / sum(d) if sum(d) else None)
    return shares


def _spread(shares: list) -> float | None:
    vals = [v for v in shares if v is not None]
    return max(vals) - min(vals) if vals else None


def f_claims(r: dict) -> list[dict]:
    """F Sec. 5's observations, each with what this run measured and whether it holds here:
    ``{"claim", "where", "measured", "holds"}`` (``holds`` None where the run lacks the data)."""
    out = []

    def claim(text, where, measured, holds):
        out.append({"claim": text, "where": where, "measured": measured,
                    "holds": None if holds is None else bool(holds)})

    batch, mini = r.get("batch", {}), r.get("minibatch", {})
    err = lambda e: (e.get("final") or {}).get("train_error")  # noqa: E731
    acc = lambda e: (e.get("final") or {}).get("test_accuracy")  # noqa: E731
    for ql, e in batch.items():
        d, best = e["dsgd"], e.get(e.get("best_layerwise") or "", {})
        de, be, first = err(d), err(best), d.get("first_error")
        claim(f"q={ql}: batch DSGD with the theory's step does not reach the best tuned layer-wise "
              "method's training error, but it trains", "Sec. 5.1, Fig. 2",
              f"DSGD {_fmt(de)} (from {_fmt(first)} at the first evaluation) vs "
              f"{(e.get('best_layerwise') or '?').upper()} {_fmt(be)}",
              None if None in (de, be, first) else (de >= be and de <= 0.5 * first))
    if "1" in batch:
        c = batch["1"]["dsgd"]["counts"]
        claim("q=1: all DSGD updates occur in the second layer", "Sec. 5.1, Fig. 3",
              f"layer updates {c}", len(c) > 1 and c[0] == 0)
    if "2" in batch:
        sh = batch["2"]["dsgd"].get("layer1_share_by_quarter", [])
        claim("q=2: the rate of updates of each layer stays about constant", "Sec. 5.1, Fig. 3",
              f"layer-1 share by quarter {[None if v is None else round(v, 2) for v in sh]}",
              None if _spread(sh) is None else _spread(sh) <= 0.2)
    if "inf" in batch and "2" in batch:
        si, s2 = (batch[k]["dsgd"].get("layer1_share_by_quarter", []) for k in ("inf", "2"))
        claim("q=inf: the rates vary more over the run than with q=2", "Sec. 5.1, Fig. 3",
              f"spread of the layer-1 share by quarter: q=inf {_fmt_share(_spread(si))}, q=2 {_fmt_share(_spread(s2))}",
              None if None in (_spread(si), _spread(s2)) else _spread(si) > _spread(s2))
    slow = []
    for ql, e in batch.items():
        others = [e[k]["seconds_per_step"] for k in ("random", "sequential") if "seconds_per_step" in e.get(k, {})]
        if "seconds_per_step" in e["dsgd"] and others:
            slow.append((ql, e["dsgd"]["seconds_per_step"] / min(others)))
    if slow:
        claim("batch DSGD steps are only 2-3 % slower than RANDOM and SEQUENTIAL (forward and backward "
              "passes dominate)", "Sec. 5.1",
              "DSGD / fastest layer-wise per step: " + ", ".join(f"q={q} {x:.2f}x" for q, x in slow),
              all(x <= 1.1 for _, x in slow))
    alls = {k: v for k, v in mini.items() if k.startswith("dsgd-all_")}
    if alls and all(acc(v) is not None for v in alls.values()):
        best = max(alls, key=lambda k: acc(alls[k]))
        claim("DSGD_ALL with q=2 has the best test accuracy among the DSGD_ALL variants", "Sec. 5.2, Fig. 4",
              ", ".join(f"{v['method']} {_fmt(acc(v))}" for v in alls.values()), best == "dsgd-all_q2")
        std = mini.get("sgd_standard")
        if std and acc(std) is not None:
            claim("SGD_STANDARD outperforms DSGD_ALL", "Sec. 5.2, Fig. 4",
                  f"SGD_STANDARD {_fmt(acc(std))} vs best DSGD_ALL {_fmt(acc(alls[best]))}",
                  acc(std) > max(acc(v) for v in alls.values()))
            if "seconds_per_step" in std:
                ratios = {v["method"]: v["seconds_per_step"] / std["seconds_per_step"]
                          for v in alls.values() if "seconds_per_step" in v}
                q2 = ratios.get("DSGD_ALL q=2")
                rest = [x for k, x in ratios.items() if k != "DSGD_ALL q=2"]
                claim("DSGD_ALL q=2 is the slowest, about 4x standard SGD per step; q=1 and q=inf run at "
                      "about SGD's speed", "Sec. 5.2",
                      ", ".join(f"{k} {x:.2f}x" for k, x in ratios.items()) + " of SGD_STANDARD",
                      None if q2 is None or not rest else (q2 >= max(rest) and max(rest) <= 1.5))
    return out


def _fmt_share(x) -> str:
    return "?" if x is None else f"{x:.2f}"


def _fmt(x) -> str:
    """A rate as a percentage."""
    return fmt_number(x, ".2f", scale=100, suffix=" %")


def _report(r: dict) -> str:
    lines = [f"# DSGD experiment (Flynn Sec. 5) on `{r['data']}`", "",
             f"Network: one hidden layer of {r['hidden']} sigmoid units, sigmoid outputs, squared loss "
             "(F eqs. 21-22), weights and biases ~ U[-1, 1].  Step sizes of all methods but batch DSGD "
             f"are tuned over {r['grid']} on 5/6 of the training set ({r['tune_steps']} steps), "
             "choosing the smallest error on the withheld 1/6.", "",
             f"## Batch mode ({r['batch_steps']} full-batch steps, F Sec. 5.1)", "",
             "| q | method | lr | train error | test accuracy | layer updates |", "|---|---|---|---|---|---|"]
    for ql, e in r["batch"].items():
        for name in ("dsgd", "random", "sequential"):
            f = e[name]["final"] or {}
            lines.append(f"| {ql} | {name.upper()} | {e[name]['lr']:g} | {_fmt(f.get('train_error'))} | "
                         f"{_fmt(f.get('test_accuracy'))} | {e[name]['counts']} |")
    lines += [""]
    for ql in r["batch"]:
        lines += [f"q = {ql}: ![training error](batch_q{ql}_training_error.png) "
                  f"![test accuracy](batch_q{ql}_test_accuracy.png) "
                  f"![layer updates](batch_q{ql}_layer_updates.png)", ""]
    lines += [f"## Mini-batch mode ({r['minibatch_steps']} steps of batch {r['batch_size']}, F Sec. 5.2)", "",
              "| method | lr | train error | test accuracy |", "|---|---|---|---|"]
    for name, e in r["minibatch"].items():
        f = e["final"] or {}
        lines.append(f"| {e.get('method', name)} | {e['lr']:g} | {_fmt(f.get('train_error'))} | {_fmt(f.get('test_accuracy'))} |")
    lines += ["", "![training error](minibatch_training_error.png) "
              "![test accuracy](minibatch_test_accuracy.png)", ""]
    claims = r.get("claims") or []
    if claims:
        lines += ["## F's observations, claim by claim", "",
                  "| F | claim | measured here | holds here |", "|---|---|---|---|"]
        for c in claims:
            verdict = {True: "yes", False: "**no**", None: "not measured"}[c["holds"]]
            lines.append(f"| {c['where']} | {c['claim']} | {c['measured']} | {verdict} |")
        lines += ["", "Training errors and accuracies are at the last evaluation; per-step times are wall "
                  "times with the evaluations included (the same schedule for every method). Why q=1's "
                  "DSGD is slow: docs/dsgd.md, section 4.2.", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# F Sec. 2, Prop. 2.1
# ------------------------------------------------------------------------------------------------


def prop21_quantities(eps: float, y: float = -1.0) -> dict:
    """Hessian of E at w(eps) (float64, torch.func.hessian), its spectral norm, the layer blocks'
    norms and DSGD's bounds p_i(w)^2 (q = 2) for the network as an nn.Sequential."""
    import torch
    from torch import nn

    from .dsgd import layer_bounds

    s1 = 1.0 / (1.0 + math.exp(-1.0))
    w = torch.tensor([1.0, 1.0, eps, (y - eps * s1) / s1], dtype=torch.float64)

    def E(w):  # F eq. (2): input 1, target 0
        h = torch.sigmoid(w[0:2])
        return torch.sigmoid(w[2] * h[0] + w[3] * h[1]) ** 2

    H = torch.func.hessian(E)(w)
    hn = float(torch.linalg.eigvalsh(H).abs().max())
    net = nn.Sequential(nn.Linear(1, 2, bias=False), nn.Sigmoid(), nn.Linear(2, 1, bias=False),
                        nn.Sigmoid()).double()
    with torch.no_grad():
        net[0].weight.copy_(w[0:2].reshape(2, 1))
        net[2].weight.copy_(w[2:4].reshape(1, 2))
    p = layer_bounds(net, 2)
    blocks = [float(torch.linalg.eigvalsh(H[0:2, 0:2]).abs().max()),
              float(torch.linalg.eigvalsh(H[2:4, 2:4]).abs().max())]
    return {"eps": eps, "hessian_norm": hn, "d2E_dw1dw3": float(H[0, 2]),
            "block_norms": blocks, "p_squared": [pi * pi for pi in p],
            "local_constant": max(b / (pi * pi) for b, pi in zip(blocks, p))}


def prop21(out: str | Path | None = None, *, eps_max: float = 1000.0, points: int = 25,
           y: float = -1.0) -> dict:
    """Tabulate :func:`prop21_quantities` on eps in [0, eps_max]; write prop21.json/.png to out."""
    if y > 0:
        raise ValueError(f"F Prop. 2.1's curve needs y <= 0, got y = {y}")
    epss = [eps_max * k / (points - 1) for k in range(points)]
    rows = [prop21_quantities(e, y) for e in epss]
    s1 = 1.0 / (1.0 + math.exp(-1.0))
    sp1 = s1 * (1 - s1)
    sy = 1.0 / (1.0 + math.exp(-y))
    spy = sy * (1 - sy)
    sppy = spy * (1 - 2 * sy)
    slope = 2 * sy * sppy * s1 * sp1 + 2 * spy * s1 * spy * sp1  # F's proof: coefficient of eps
    res = {"y": y, "rows": rows, "slope_predicted": slope, "intercept_predicted": 2 * sy * spy * sp1,
           "figures": []}
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        fig = new_figure(figsize=(6, 4.8))
        ax = fig.subplots()
        # each layer's block (solid) and DSGD's bound on it (dashed) share a colour; the whole
        # Hessian (black, dotted, drawn last) lies on top of the layer-1 block it is dominated by
        for i, colour in ((0, "C0"), (1, "C1")):
            ax.plot(epss, [r["block_norms"][i] for r in rows], color=colour,
                    label=f"||H_{i + 1}{i + 1}||, layer {i + 1}'s Hessian block")
            ax.plot(epss, [r["p_squared"][i] for r in rows], "--", color=colour,
                    label=f"p_{i + 1}(w)^2, DSGD's bound on it (F Prop. 4.3)")
        ax.plot(epss, [r["hessian_norm"] for r in rows], ":", color="black", linewidth=2,
                label="||H||_2, the whole Hessian (unbounded)")
        values = [v for r in rows for v in (r["hessian_norm"], *r["block_norms"], *r["p_squared"])]
        if min(values) > 0:
            ax.set_yscale("log")
        else:  # a block can vanish at eps = 0
            ax.set_yscale("symlog", linthresh=min((v for v in values if v > 0), default=1e-3))
        ax.set_xlabel("eps along F's curve w(eps)")
        ax.set_ylabel("spectral norm")
        ax.grid(alpha=0.3)
        ax.set_title("F Prop. 2.1: the Hessian grows without bound,\nDSGD's layer bounds stay above its blocks",
                     fontsize=10)
        legend_below(fig, *ax.get_legend_handles_labels(), ncol=2, fontsize=7)
        save_figure(fig, out / "prop21.png", dpi=90)
        res["figures"] = [str(out / "prop21.png")]
        atomic_write_text(out / "prop21.json", json.dumps(res, indent=2) + "\n")
    return res

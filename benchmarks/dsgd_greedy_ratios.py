"""Why greedy DSGD with q = 1 stalls (issue 14, item 3): the quantities of F Algo. 4.1's choice.

Full-batch greedy DSGD (lr = 1, the theory) on digits with F Sec. 5's network (64 -> 300 sigmoid
-> 10 sigmoid, weights and biases ~ U[-1, 1], seed 0), for q = 1, 2, inf.  Every ``--every``
steps it records, per layer i, p_i(w) (F Prop. 4.3, the optimizer's own certified values), the
dual norm ||g_i||_* (F eq. 26, :func:`smoothchain.dsgd.norms.dual_norm`, computed here for every
layer, not only the ones the screen keeps), the ratio ||g_i||_* / p_i that the greedy choice
maximises, and the guaranteed decrease ||g_i||_*^2 / (2 p_i^2) of a step on that layer
(F Prop. 4.4); and, at the end, the training error and how many times each layer was chosen.
Prints one JSON line.  Run: ``python benchmarks/dsgd_greedy_ratios.py [--steps 20000] [--every 2000]``.
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from smoothchain.data import load_dataset
from smoothchain.dsgd.bounds import objective
from smoothchain.dsgd.norms import dual_norm
from smoothchain.optim import DSGD
from smoothchain.train import build_model


def run(q: float, steps: int, every: int, data) -> dict:
    x, z, labels = data.x_train, data.y_train, data.labels_train
    net = build_model(x.shape[1], 300, z.shape[1], seed=0)
    opt = DSGD(net, q=q, variant="greedy", lr=1.0, mode="batch")
    counts = [0, 0]
    trace = []
    for t in range(steps + 1):
        opt.zero_grad()
        loss = objective(net, x, z)
        loss.backward()
        if t % every == 0 or t == steps:
            p = opt.layer_bounds()
            duals = [dual_norm(torch.cat([lin.weight.grad, lin.bias.grad[:, None]], 1).double(), q)
                     for lin in (net[0], net[2])]
            with torch.no_grad():
                err = float((net(x).argmax(1) != labels).double().mean())
            trace.append({"step": t, "loss": float(loss.detach()), "train_error": err, "p": p, "dual_norms": duals,
                          "ratios": [d / pi for d, pi in zip(duals, p)],
                          "guaranteed_decrease": [d * d / (2 * pi * pi) for d, pi in zip(duals, p)]})
        if t == steps:
            break
        opt.step()
        for i in opt.last_layers:
            counts[i - 1] += 1
    return {"layer_counts": counts, "trace": trace}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20000)
    ap.add_argument("--every", type=int, default=2000)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    data = load_dataset("digits")
    out = {"benchmark": "dsgd_greedy_ratios", "data": "digits", "network": "64-300-10 sigmoid, U[-1, 1]",
           "steps": args.steps,
           "runs": {("inf" if math.isinf(q) else str(int(q))): run(q, args.steps, args.every, data)
                    for q in (1.0, 2.0, math.inf)}}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()

"""Cost of a DSGD iteration relative to a torch.optim.SGD iteration (issue 5, item 4).

A 784-300-10 sigmoid MLP (F Sec. 5's MNIST network, uniform [-1, 1] init), mini-batches of 128
random inputs in [0, 1] with one-hot targets, the objective of F eqs. (21)-(22).  One iteration
= zero_grad + forward + loss + backward + optimizer step, the same for every optimizer, timed in
one process.  To be fair under a noisy (shared) machine the optimizers are interleaved in short
rounds and the per-iteration time is the median over all timed iterations (robust to the page
faults and preemptions of a loaded machine).  Prints one JSON line:

    {"threads": ..., "sgd_ms": ..., "dsgd": {"q1": {"ratio": ..., "ratio_median": ..., "ratios": [...],
     "layer_counts": ...}, "q2": {...}, "qinf": {...}, "q2_all": {...}}, ...}

The whole measurement is repeated ``--repeats`` times (default 5); ``ratio`` is the minimum of
the repeats' ratios (the issue's "min of >= 5"), ``ratio_median`` their median.
Usage: ``python benchmarks/dsgd_step.py [--rounds 30] [--iters 10] [--repeats 5] [--threads N]``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch
from torch import nn

from smoothchain.optim import DSGD


#: (name, q, variant): greedy DSGD for each q (the issue's targets: q2 <= 2x, q1/qinf <= 1.2x) and
#: DSGD_ALL with q = 2 (F Sec. 5.2's "4x slower than SGD" configuration, every layer's polar factor)
VARIANTS = (("q1", 1, "greedy"), ("q2", 2, "greedy"), ("qinf", math.inf, "greedy"), ("q2_all", 2, "all"))


def make_model(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(784, 300), nn.Sigmoid(), nn.Linear(300, 10), nn.Sigmoid())
    with torch.no_grad():
        for p in net.parameters():
            p.uniform_(-1.0, 1.0)
    return net


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--iters", type=int, default=10, help="iterations per optimizer per round")
    ap.add_argument("--repeats", type=int, default=5, help="independent measurements (ratio: their minimum)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=128)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    n_batches = 50
    xs = torch.rand(n_batches, args.batch_size, 784, generator=g)
    labels = torch.randint(10, (n_batches, args.batch_size), generator=g)
    zs = nn.functional.one_hot(labels, 10).float()

    runs = {"sgd": (make_model(1), None)}
    runs["sgd"] = (runs["sgd"][0], torch.optim.SGD(runs["sgd"][0].parameters(), lr=0.01))
    for name, q, variant in VARIANTS:
        net = make_model(1)
        runs[name] = (net, DSGD(net, q=q, variant=variant, mode="stochastic"))
    counters = {name: 0 for name in runs}
    layer_counts = {name: [0, 0] for name in runs if name != "sgd"}

    def iterate(name):
        """The timed work, identical for every optimizer: zero_grad, forward, loss, backward, step."""
        net, opt = runs[name]
        k = counters[name] % n_batches
        counters[name] += 1
        opt.zero_grad()
        loss = (net(xs[k]) - zs[k]).pow(2).sum(dim=1).mean()
        loss.backward()
        opt.step()

    def count(name):  # bookkeeping, outside the timed region
        if name != "sgd":
            for i in runs[name][1].last_layers:
                layer_counts[name][i - 1] += 1

    for name in runs:  # warm-up (lazy imports, allocator)
        for _ in range(3):
            iterate(name)
            count(name)
    ratios = {name: [] for name, _, _ in VARIANTS}
    sgd_ms = []
    for _ in range(args.repeats):  # each repeat: the medians of its own interleaved rounds
        times = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name in runs:
                for _ in range(args.iters):
                    t0 = time.perf_counter()
                    iterate(name)
                    times[name].append(time.perf_counter() - t0)
                    count(name)
        sgd = statistics.median(times["sgd"])
        sgd_ms.append(sgd * 1e3)
        for name, _, _ in VARIANTS:
            ratios[name].append(statistics.median(times[name]) / sgd)
    out = {
        "benchmark": "dsgd_step",
        "model": "784-300-10 sigmoid, batch %d" % args.batch_size,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "rounds": args.rounds,
        "iters_per_round": args.iters,
        "repeats": args.repeats,
        "sgd_ms": round(min(sgd_ms), 4),
        "dsgd": {},
    }
    for name, _, _ in VARIANTS:
        r = ratios[name]
        out["dsgd"][name] = {"ratio": round(min(r), 4), "ratio_median": round(statistics.median(r), 4),
                             "ratios": [round(x, 4) for x in r], "layer_counts": layer_counts[name]}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()

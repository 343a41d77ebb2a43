"""Top Hessian eigenvalue: smoothchain.estimators.hessian_top_eig vs PyHessian's method.

PyHessian (Yao et al. 2020, ``pyhessian/hessian.py``, ``hessian.eigenvalues``) computes the loss
with the gradient graph kept (``loss.backward(create_graph=True)``), then runs power iteration
with Hessian-vector products ``torch.autograd.grad(gradsH, params, grad_outputs=v,
retain_graph=True)`` (double backward), eigenvalue = <Hv, v>, v <- Hv / ||Hv||.  PyHessian is not
installed here (it may pull a CUDA torch); ``pyhessian_power`` below is a faithful re-implementation
of that loop (without its early stop, so both methods run the same number of iterations).

Both run on the same CNN (smoothchain's built-in ``cnn`` for 1x8x8 digits), the same batch, the
same start vector and the same number of power iterations, in float64: their iterates agree to
rounding, so "equal accuracy" is checked by comparing the eigenvalues.  Times are the best of
``--repeats`` runs (wall clock), set-up included (building the graph is part of each method).
Prints one JSON line.  Usage: ``python benchmarks/top_eigenvalue.py [--batch 64] [--iters 100]``.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from smoothchain.estimators import flat_parameters, hessian_top_eig, objective
from smoothchain.models import builtin
from smoothchain.torch_chain import torch_module


def pyhessian_power(model, x, y, v0: list[torch.Tensor], iters: int) -> float:
    """PyHessian's ``hessian.eigenvalues(maxIter=iters, tol=0, top_n=1)`` for one batch."""
    params = [p for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    out = model(x)
    loss = torch.nn.functional.cross_entropy(out, y)
    grads = torch.autograd.grad(loss, params, create_graph=True)  # PyHessian: backward(create_graph) + p.grad
    v = [t.clone() for t in v0]
    eigenvalue = 0.0
    for _ in range(iters):
        Hv = torch.autograd.grad(grads, params, grad_outputs=v, only_inputs=True, retain_graph=True)
        eigenvalue = float(sum(torch.sum(a * b) for a, b in zip(Hv, v)))  # group_product
        norm = torch.sqrt(sum(torch.sum(h * h) for h in Hv))  # normalization
        v = [h / (norm + 1e-6) for h in Hv]
    return eigenvalue


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = torch_module(builtin("cnn").components).double()
    x = torch.randn(args.batch, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 10, (args.batch,))
    w = flat_parameters(model)
    # the start vector of hessian_top_eig(seed=0): a unit Gaussian vector from a seeded generator
    g = torch.Generator().manual_seed(0)
    v = torch.randn(w.shape, generator=g, dtype=w.dtype)
    v = v / v.norm()
    v0, pos = [], 0
    for p in model.parameters():
        v0.append(v[pos : pos + p.numel()].view_as(p).clone())
        pos += p.numel()

    def ours() -> float:
        F = objective(model, x, y, loss="cross-entropy")
        return hessian_top_eig(F, w, method="power", iters=args.iters, tol=1e-300, seed=0).value

    def theirs() -> float:
        return abs(pyhessian_power(model, x, y, v0, args.iters))

    ours(), theirs()  # warm-up (first-call initialisation of torch.func and autograd)
    t_ours, t_theirs = [], []
    for _ in range(args.repeats):  # interleaved, best of repeats
        t = time.perf_counter()
        e_ours = ours()
        t_ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        e_theirs = theirs()
        t_theirs.append(time.perf_counter() - t)
    rel = abs(e_ours - e_theirs) / abs(e_theirs)
    print(json.dumps({
        "model": "cnn (1x8x8, conv8-conv16-fc10, softplus, avg pool)", "parameters": w.numel(), "batch": args.batch,
        "iterations": args.iters, "dtype": "float64", "threads": args.threads,
        "ours_s": min(t_ours), "pyhessian_s": min(t_theirs), "ratio_pyhessian_over_ours": min(t_theirs) / min(t_ours),
        "eigenvalue_ours": e_ours, "eigenvalue_pyhessian": e_theirs, "relative_difference": rel,
    }))


if __name__ == "__main__":
    main()

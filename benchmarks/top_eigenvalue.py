"""Top Hessian eigenvalue: smoothchain.estimators.hessian_top_eig vs PyHessian (issue 3, item 7).

PyHessian (Yao et al. 2020, ``pyhessian.hessian(...).eigenvalues``) keeps the gradient graph
(``loss.backward(create_graph=True)``) and runs power iteration with double-backward
Hessian-vector products, stopping when two consecutive eigenvalue estimates agree to a relative
``tol``.  The benchmark uses the real package when it imports with the installed PyTorch
(installing it with ``pip install --no-deps pyhessian`` first, which cannot touch torch, unless
``--no-install``); otherwise ``pyhessian_power`` below, a faithful re-implementation of that
loop.  The JSON says which baseline ran.

Same CNN (smoothchain's built-in ``cnn`` for 1x8x8 digits), same batch, float64 for both.

* ``equal_accuracy``: the reference eigenvalue is a tight Lanczos run (tol 1e-12).  Each method
  runs with its own stopping rule -- ours ``hessian_top_eig(method="lanczos", tol)``, PyHessian's
  power iteration with its relative-change ``tol`` (start vector seeded identically in every
  run) -- at the loosest tol in 1e-1, 1e-2, ... whose result is within ``--target`` (relative)
  of the reference; those runs are timed.  ``ratio`` = PyHessian time / ours (>= 1: ours at
  least as fast at equal accuracy); null when a method never reaches the target (PyHessian's
  power iteration stalls near 1e-6 here: the top two eigenvalues are close).
* ``same_iterations``: both run plain power iteration for ``--iters`` products from the same
  start (per-product cost; their iterates agree to rounding).

Times are the best of ``--repeats`` interleaved runs (wall clock), set-up included (building the
gradient graph is part of each method).  Prints one JSON line.
Usage: ``python benchmarks/top_eigenvalue.py [--batch 64] [--iters 100] [--no-install]``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import time

import torch

from smoothchain.estimators import flat_parameters, hessian_top_eig, objective
from smoothchain.models import builtin
from smoothchain.torch_chain import torch_module


def load_pyhessian(install: bool):
    """The ``pyhessian.hessian`` class, installing the package (without dependencies) if asked."""
    try:
        return importlib.import_module("pyhessian").hessian
    except Exception:
        if not install:
            return None
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "pyhessian"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"top_eigenvalue: pip install pyhessian failed: {proc.stderr.strip()[-300:]}", file=sys.stderr)
        return None
    try:
        importlib.invalidate_caches()
        return importlib.import_module("pyhessian").hessian
    except Exception as err:  # e.g. it does not import with this PyTorch
        print(f"top_eigenvalue: pyhessian does not import: {err}", file=sys.stderr)
        return None


def pyhessian_power(model, x, y, v0: list[torch.Tensor], iters: int, tol: float = 0.0) -> tuple[float, int]:
    """PyHessian's ``hessian.eigenvalues(maxIter=iters, tol=tol, top_n=1)`` loop for one batch,
    from the start ``v0``; returns (eigenvalue, products)."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = model(x)
    loss = torch.nn.functional.cross_entropy(out, y)
    grads = torch.autograd.grad(loss, params, create_graph=True)  # PyHessian: backward(create_graph) + p.grad
    v = [t.clone() for t in v0]
    eigenvalue, k = None, 0
    for k in range(1, iters + 1):
        Hv = torch.autograd.grad(grads, params, grad_outputs=v, only_inputs=True, retain_graph=True)
        tmp = float(sum(torch.sum(a * b) for a, b in zip(Hv, v)))  # group_product
        norm = torch.sqrt(sum(torch.sum(h * h) for h in Hv))  # normalization
        v = [h / (norm + 1e-6) for h in Hv]
        if eigenvalue is not None and abs(eigenvalue - tmp) / (abs(eigenvalue) + 1e-6) < tol:
            break
        eigenvalue = tmp
    return tmp, k


def best_time(fn, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return min(times), result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--iters", type=int, default=100, help="products for the same-iterations comparison")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target", type=float, default=1e-5, help="relative error both methods must reach")
    ap.add_argument("--no-install", action="store_true", help="do not pip-install pyhessian if missing")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = torch_module(builtin("cnn").components).double()
    x = torch.randn(args.batch, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 10, (args.batch,))
    w = flat_parameters(model)
    F = objective(model, x, y, loss="cross-entropy")
    reference = hessian_top_eig(F, w, method="lanczos", iters=min(w.numel(), 1000), tol=1e-12).value

    PyHessian = load_pyhessian(install=not args.no_install)
    criterion = torch.nn.CrossEntropyLoss()

    def theirs(tol: float, max_iter: int) -> tuple[float, int]:
        if PyHessian is None:
            gen = torch.Generator().manual_seed(args.seed)
            v0 = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in model.parameters()]
            norm = torch.sqrt(sum((t * t).sum() for t in v0))
            return pyhessian_power(model, x, y, [t / norm for t in v0], max_iter, tol)
        model.zero_grad(set_to_none=True)  # PyHessian reads p.grad: no stale graph-carrying grads
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)  # its torch.randn start vector, in the model's dtype
        try:
            torch.manual_seed(args.seed)
            h = PyHessian(model, criterion, data=(x, y), cuda=False)
            (value,), _ = h.eigenvalues(maxIter=max_iter, tol=tol, top_n=1)
        finally:
            torch.set_default_dtype(default)
            model.zero_grad(set_to_none=True)
        return value, -1  # the package does not report its iteration count

    def ours(tol: float):
        F_ = objective(model, x, y, loss="cross-entropy")
        return hessian_top_eig(F_, w, method="lanczos", iters=500, tol=tol)

    def loosest(run, error) -> tuple[float | None, float]:
        """The loosest tol in 1e-1, 1e-2, ..., 1e-14 whose result meets the target (None if none
        does), and the error reached at it (or the best error seen)."""
        tol, best = 1e-1, float("inf")
        while tol >= 1e-14:
            err = error(run(tol))
            best = min(best, err)
            if err <= args.target:
                return tol, err
            tol /= 10
        return None, best

    ours(1e-3), theirs(1e-3, 10)  # warm-up (first-call initialisation of torch.func and autograd)
    rel = lambda value: abs(abs(value) - reference) / abs(reference)  # noqa: E731
    tol_ours, err_ours = loosest(ours, lambda e: rel(e.value))
    tol_theirs, err_theirs = loosest(lambda t: theirs(t, 100000), lambda r: rel(r[0]))
    t_ours = best_time(lambda: ours(tol_ours), args.repeats)[0] if tol_ours else None
    t_theirs = best_time(lambda: theirs(tol_theirs, 100000), args.repeats)[0] if tol_theirs else None
    products_ours = ours(tol_ours).iterations if tol_ours else None
    products_theirs = theirs(tol_theirs, 100000)[1] if tol_theirs and PyHessian is None else None

    # same number of power-iteration products from the same start vector (per-product cost)
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(w.shape, generator=gen, dtype=w.dtype)
    v = v / v.norm()
    v0, pos = [], 0
    for p in model.parameters():
        v0.append(v[pos : pos + p.numel()].view_as(p).clone())
        pos += p.numel()
    t_power_ours, power_ours = best_time(
        lambda: hessian_top_eig(objective(model, x, y, loss="cross-entropy"), w, method="power", iters=args.iters,
                                tol=1e-300, seed=0).value, args.repeats)
    t_power_theirs, (power_theirs, _) = best_time(lambda: pyhessian_power(model, x, y, v0, args.iters), args.repeats)

    print(json.dumps({
        "benchmark": "top_eigenvalue",
        "baseline": "pyhessian " + getattr(sys.modules.get("pyhessian"), "__version__", "0.1") if PyHessian else
                    "double-backward re-implementation of PyHessian's loop",
        "model": "cnn (1x8x8, conv8-conv16-fc10, softplus, avg pool)", "parameters": w.numel(), "batch": args.batch,
        "dtype": "float64", "threads": args.threads, "torch": torch.__version__, "reference_eigenvalue": reference,
        "equal_accuracy": {
            "target_relative_error": args.target,
            "ours": {"method": "lanczos", "tol": tol_ours, "seconds": t_ours, "products": products_ours,
                     "relative_error": err_ours},
            "pyhessian": {"method": "power", "tol": tol_theirs, "seconds": t_theirs, "products": products_theirs,
                          "relative_error": err_theirs},
            "ratio_pyhessian_over_ours": (t_theirs / t_ours) if t_ours and t_theirs else None,
        },
        "same_iterations": {
            "iterations": args.iters, "ours_s": t_power_ours, "pyhessian_s": t_power_theirs,
            "ratio_pyhessian_over_ours": t_power_theirs / t_power_ours,
            "relative_difference": abs(power_ours - abs(power_theirs)) / abs(power_theirs),
        },
    }))


if __name__ == "__main__":
    main()

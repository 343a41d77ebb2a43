"""Top Hessian eigenvalue to a relative accuracy: smoothchain vs PyHessian and curvlinops (issue 14).

``smoothchain.estimators.hessian_top_eig`` (Lanczos with full reorthogonalisation, products by a
backward pass through one recorded gradient graph) against

* PyHessian 0.1 (``pyhessian.hessian(model, criterion, data).eigenvalues(top_n=1, tol)``: power
  iteration with double-backward products, stopped when two consecutive estimates agree to a
  relative ``tol``; it takes no start vector), and
* curvlinops (``HessianLinearOperator(...).to_scipy()`` under ``scipy.sparse.linalg.eigsh(k=1,
  which="LM", tol, v0)``: ARPACK's implicitly restarted Lanczos, products by forward-over-reverse
  ``torch.func``; ``check_deterministic=False`` so its set-up checks are not timed),

installed without dependencies (so that torch is never touched) before this runs, with

    pip install --no-deps pyhessian curvlinops-for-pytorch backpack-for-pytorch linear_operator \
        einops einconv opt-einsum tqdm jaxtyping typeguard

(``.ci``'s environment does not need them).  A missing package is reported as such, with no ratio.

Two networks, batch 128, float32, PyTorch's default initialisation, inputs uniform in [0, 1] and
random labels, cross-entropy (mean): ``cnn`` -- LeNet-5 for 3x32x32 images (conv 6@5x5, tanh,
avg-pool 2, conv 16@5x5, tanh, avg-pool 2, 400-120-84-10 with tanh; 62,006 weights) -- and
``mlp`` -- 784-300-10 with a sigmoid (F Sec. 5's MNIST network; 238,510 weights).

* ``cold``: every method from a random start.  The reference is a tight Lanczos run in float64
  (tol 1e-10; curvlinops' own tight run is reported beside it as an independent check).  Each
  method runs at the loosest ``tol`` of 1e-1, 1e-2, ..., 1e-8 whose value is within ``--target``
  (relative) of the reference; those runs are timed.
* ``tracking``: the use that motivates a warm start -- the top eigenvalue followed along a
  training run.  ``--points`` weights 10 full-batch SGD steps apart (lr 0.05); at each point after
  the first, ours starts from the previous point's Ritz vector (``start=``) and eigsh from the
  same vector (``v0=``); PyHessian cannot take one and starts cold.  Each method uses the loosest
  ``tol`` meeting the target at every point; the time is the sum over the points after the first.

Times are wall clock, set-up included (building the gradient graph or operator is part of each
method), the minimum over ``--repeats`` (>= 5) interleaved rounds, one thread.  ``products``:
Hessian-vector products (counted in an untimed run).  Prints one JSON line; ratios > 1 mean
smoothchain is faster.  Usage: ``python benchmarks/top_eigenvalue.py [--repeats 5] [--points 4]``.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from smoothchain.estimators import flat_parameters, hessian_top_eig, objective

TOLS = tuple(10.0 ** -k for k in range(1, 9))


def lenet5() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 6, 5), nn.Tanh(), nn.AvgPool2d(2), nn.Conv2d(6, 16, 5), nn.Tanh(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(400, 120), nn.Tanh(), nn.Linear(120, 84), nn.Tanh(), nn.Linear(84, 10))


def mlp784() -> nn.Sequential:
    return nn.Sequential(nn.Linear(784, 300), nn.Sigmoid(), nn.Linear(300, 10))


NETWORKS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "cnn": (lenet5, (3, 32, 32)),
    "mlp": (mlp784, (784,)),
}


def optional(name: str):
    try:
        return importlib.import_module(name)
    except Exception as err:  # missing, or does not import with this torch
        print(f"top_eigenvalue: {name} unavailable ({type(err).__name__}: {err}); install it as the "
              f"module docstring says (pip install --no-deps ..., torch untouched)", file=sys.stderr)
        return None


class Methods:
    """The three methods on one (model, batch); each call returns (|eigenvalue|, unit vector or None)."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, pyhessian, curvlinops, seed: int):
        self.model, self.x, self.y, self.seed = model, x, y, seed
        self.pyhessian, self.curvlinops = pyhessian, curvlinops
        self.criterion = nn.CrossEntropyLoss()
        self.products = 0

    def ours(self, tol: float, start: torch.Tensor | None = None):
        w = flat_parameters(self.model)
        est = hessian_top_eig(objective(self.model, self.x, self.y), w, iters=500, tol=tol, seed=self.seed,
                              start=start)
        self.products = est.iterations
        return est.value, est.vectors[0]

    def pyhessian_power(self, tol: float, start=None):
        del start  # no start-vector argument in its API
        torch.manual_seed(self.seed)  # its torch.randn start vector
        self.model.zero_grad(set_to_none=True)  # it reads p.grad
        module = sys.modules["pyhessian.hessian"]  # the module (``pyhessian.hessian`` is the class)
        h = module.hessian(self.model, self.criterion, data=(self.x, self.y), cuda=False)
        inner, count = module.hessian_vector_product, [0]

        def counted(*a, **k):
            count[0] += 1
            return inner(*a, **k)

        module.hessian_vector_product = counted
        try:
            (value,), _ = h.eigenvalues(maxIter=10_000, tol=tol, top_n=1)
        finally:
            module.hessian_vector_product = inner
            self.model.zero_grad(set_to_none=True)
        self.products = count[0]
        return abs(value), None

    def curvlinops_eigsh(self, tol: float, start: torch.Tensor | None = None):
        from scipy.sparse.linalg import LinearOperator, eigsh

        params = [p for p in self.model.parameters() if p.requires_grad]
        H = self.curvlinops.HessianLinearOperator(self.model, self.criterion, params, [(self.x, self.y)],
                                                  check_deterministic=False).to_scipy()
        count = [0]

        def matvec(v):
            count[0] += 1
            return H @ v

        op = LinearOperator(H.shape, matvec=matvec, dtype=H.dtype)
        if start is None:
            v0 = np.random.default_rng(self.seed).standard_normal(H.shape[0])
        else:
            v0 = start.detach().double().numpy()
        vals, vecs = eigsh(op, k=1, which="LM", tol=tol, v0=v0.astype(H.dtype))
        self.products = count[0]
        vec = torch.as_tensor(vecs[:, 0].copy(), dtype=self.x.dtype)
        return float(abs(vals[0])), vec / vec.norm()


def reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    m64 = copy.deepcopy(model).double()
    w = flat_parameters(m64)
    return hessian_top_eig(objective(m64, x.double(), y), w, iters=2000, tol=1e-10).value


def seconds_of(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def loosest(run: Callable[[float], float], ref: float, target: float) -> tuple[float | None, float]:
    """The loosest tol of TOLS whose run is within ``target`` of ``ref`` (None if none), and its error."""
    err = float("inf")
    for tol in TOLS:
        err = abs(run(tol) - ref) / ref
        if err <= target:
            return tol, err
    return None, err


def bench_network(name: str, args, pyhessian, curvlinops) -> dict:
    make, shape = NETWORKS[name]
    torch.manual_seed(args.seed)
    model = make()
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.rand((args.batch, *shape), generator=gen)
    y = torch.randint(0, 10, (args.batch,), generator=gen)
    methods = Methods(model, x, y, pyhessian, curvlinops, args.seed)
    available = {"ours": methods.ours}
    if pyhessian is not None:
        available["pyhessian"] = methods.pyhessian_power
    if curvlinops is not None:
        available["curvlinops"] = methods.curvlinops_eigsh
    out: dict = {"parameters": flat_parameters(model).numel()}

    # ---- cold: random start, equal accuracy
    ref = reference(model, x, y)
    out["reference_eigenvalue"] = ref
    if curvlinops is not None:
        out["curvlinops_tight_relative_difference"] = abs(methods.curvlinops_eigsh(1e-10)[0] - ref) / ref
    for fn in available.values():
        fn(1e-1)  # warm-up: first-call initialisation of torch.func / autograd
    cold: dict = {}
    for key, fn in available.items():
        tol, err = loosest(lambda t, fn=fn: fn(t)[0], ref, args.target)
        cold[key] = {"tol": tol, "relative_error": err}
        if tol is not None:
            fn(tol)
            cold[key]["products"] = methods.products
    timed = {k: v["tol"] for k, v in cold.items() if v["tol"] is not None}
    seconds = {k: [] for k in timed}
    for _ in range(args.repeats):  # interleaved rounds
        for key, tol in timed.items():
            seconds[key].append(seconds_of(lambda: available[key](tol)))
    for key in timed:
        cold[key]["seconds"] = min(seconds[key])
    out["cold"] = cold
    out["cold_ratios"] = _ratios(cold)

    # ---- tracking: points along a full-batch SGD run, warm starts where the API takes one
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    points = []
    for p in range(args.points):
        if p:
            for _ in range(10):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
        points.append(({k: v.detach().clone() for k, v in model.state_dict().items()}, reference(model, x, y)))

    def along(key: str, tol: float, record: bool = False) -> tuple[float, float, list[int]]:
        """Run ``key`` at every point (warm starts from the previous point's vector); returns the
        largest relative error, the seconds summed over the points after the first, and products."""
        worst, total, products, vec = 0.0, 0.0, [], None
        for i, (state, ref_i) in enumerate(points):
            model.load_state_dict(state)
            t = time.perf_counter()
            value, new = available[key](tol, vec)
            if i:
                total += time.perf_counter() - t
                products.append(methods.products)
            vec = new
            worst = max(worst, abs(value - ref_i) / ref_i)
        return worst, total, products

    tracking: dict = {}
    for key in available:
        tol = next((t for t in TOLS if along(key, t)[0] <= args.target), None)
        tracking[key] = {"tol": tol}
        if tol is not None:
            err, _, products = along(key, tol)
            tracking[key].update(relative_error=err, products=products)
    seconds = {k: [] for k, v in tracking.items() if v["tol"] is not None}
    for _ in range(args.repeats):
        for key in seconds:
            seconds[key].append(along(key, tracking[key]["tol"])[1])
    for key in seconds:
        tracking[key]["seconds"] = min(seconds[key])
    out["tracking"] = {"points": args.points, "sgd_steps_between": 10, **tracking}
    out["tracking_ratios"] = _ratios(tracking)
    return out


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _ratios(results: dict) -> dict:
    ours = results["ours"].get("seconds")
    return {f"{k}_over_ours": (v["seconds"] / ours if ours and v.get("seconds") else None)
            for k, v in results.items() if k != "ours"}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--points", type=int, default=4, help="points along the run for 'tracking'")
    ap.add_argument("--target", type=float, default=1e-3, help="relative error every method must reach")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.points < 2:
        ap.error("--repeats must be >= 1 and --points >= 2")
    torch.set_num_threads(args.threads)
    pyhessian = optional("pyhessian")
    if pyhessian is not None:
        importlib.import_module("pyhessian.hessian")
    curvlinops = optional("curvlinops")
    result = {
        "benchmark": "top_eigenvalue", "target_relative_error": args.target, "batch": args.batch,
        "dtype": "float32", "threads": args.threads, "repeats": args.repeats, "torch": torch.__version__,
        "pyhessian": _version("pyhessian") if pyhessian else None,
        "curvlinops": _version("curvlinops-for-pytorch") if curvlinops else None,
        "networks": {name: bench_network(name, args, pyhessian, curvlinops) for name in args.networks},
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

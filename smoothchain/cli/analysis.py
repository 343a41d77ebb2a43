"""``smoothchain pl`` and ``smoothchain rates``: thin command-line layers over
:mod:`smoothchain.pl` and :mod:`smoothchain.rates` (docs/pl.md, docs/rates.md).

Registered through ``smoothchain.cli.main.SUBCOMMANDS``; PyTorch is imported inside handlers only.
"""

from __future__ import annotations

import math
import sys

from ..losses import SUPERVISED_LOSSES
from ..spec import json_number
from .common import CLIError, check_input_fits, emit, errors_as_cli, load_model
from .options import integer, real

__all__ = ["register"]

#: the built-in MLPs of ``pl`` and ``rates noise`` (smoothchain.models: 64-32-10 and 64-256-10 tanh)
MLPS = ("mlp", "wide")

_pos_float = real(0.0, strict=True, finite=True)
_nonneg_float = real(0.0, finite=True)
_int = integer


def register(sub) -> None:
    """Add the ``pl`` and ``rates`` parsers to the ``smoothchain`` sub-parsers."""
    p = sub.add_parser("pl", help="PL constant mu of the MSE loss from sigma_min of the stacked per-sample Jacobians")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="built-in MLP: 'mlp' (64-32-10 tanh, default) or 'wide' (64-256-10 tanh)")
    src.add_argument("--module", metavar="FILE.py:FACTORY", help="a user's nn.Module returned by FACTORY()")
    p.add_argument("--data", choices=("digits", "random"), default="digits", help="inputs (default digits)")
    p.add_argument("--input-shape", metavar="D|C,H,W", help="per-example input shape for --data random with --module")
    p.add_argument("--samples", type=_int(1), default=20, metavar="N", help="number of samples N (default 20)")
    p.add_argument("--loss", choices=("mse", "square"), default="mse",
                   help="mse = (1/N) sum ||.||^2 (lecture); square = 1/(2N) sum ||.||^2 (project)")
    p.add_argument("--radius", type=_nonneg_float, default=0.1, metavar="R", help="neighbourhood B(w0, R) (default 0.1)")
    p.add_argument("--points", type=_int(0), default=6, help="random points of the ball (default 6)")
    p.add_argument("--method", choices=("auto", "dense", "lobpcg", "lanczos"), default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(handler=_cmd_pl)

    r = sub.add_parser("rates", help="SGD / PL / RH Thm 4.1 rate calculators and a gradient-noise estimator")
    rs = r.add_subparsers(dest="rate", required=True, metavar="KIND")
    _rate_parser(rs, "sgd", "E min ||grad||^2 <= 2 Delta/(eta T) + beta eta sigma^2", _cmd_sgd, min_iterations=1,
                 eta="step size (default: the best one <= 1/beta for T)", target="E min ||grad||^2")
    _rate_parser(rs, "pl", "E L_T - L* <= Delta (1 - mu eta)^T + beta eta sigma^2/(2 mu)", _cmd_plrate,
                 min_iterations=0, eta="step size (default 1/beta)", target="E L_T - L*", mu=True)
    g = rs.add_parser("gd", help="RH Thm 4.1: ceil(2 L_F Delta / epsilon^2) projected-GD iterations")
    g.add_argument("--smoothness", type=_nonneg_float, required=True, metavar="L_F")
    g.add_argument("--delta", type=_nonneg_float, required=True)
    g.add_argument("--epsilon", type=_pos_float, required=True)
    g.add_argument("--json", action="store_true")
    g.set_defaults(handler=_cmd_gd)
    n = rs.add_parser("noise", help="estimate sigma^2 = E ||g_B - grad F||^2 from mini-batches")
    n.add_argument("--model", default="mlp", help="built-in 'mlp' or 'wide' (default mlp)")
    n.add_argument("--data", choices=("digits", "random"), default="digits")
    n.add_argument("--examples", type=_int(2), default=200, help="data set size n (default 200)")
    n.add_argument("--batch-size", type=_int(1), default=16)
    n.add_argument("--samples", type=_int(2), default=100, help="mini-batches drawn (default 100)")
    n.add_argument("--loss", choices=SUPERVISED_LOSSES, default="cross-entropy")
    n.add_argument("--seed", type=int, default=0)
    n.add_argument("--json", action="store_true")
    n.set_defaults(handler=_cmd_noise)


def _rate_parser(rs, kind: str, help: str, handler, *, min_iterations: int, eta: str, target: str, mu: bool = False):
    """A ``rates sgd`` / ``rates pl`` parser: Delta, beta (and mu), eta, T, sigma^2, a target."""
    p = rs.add_parser(kind, help=help)
    p.add_argument("--delta", type=_nonneg_float, required=True)
    p.add_argument("--beta", type=_pos_float, required=True)
    if mu:
        p.add_argument("--mu", type=_pos_float, required=True)
    p.add_argument("--eta", type=_pos_float, help=eta)
    p.add_argument("--iterations", type=_int(min_iterations), required=True, metavar="T")
    p.add_argument("--sigma2", type=_nonneg_float, default=0.0)
    p.add_argument("--target", type=_pos_float, help=f"also: iterations needed for {target} <= TARGET")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=handler)


def _mlp(name: str, seed: int):
    """The seeded float64 module of ``mlp`` or ``wide``."""
    import torch

    if name not in MLPS:
        raise CLIError(f"unknown model {name!r}; choose mlp or wide (or use --module)")
    return load_model(name, seed=seed, dtype=torch.float64).module


def _data(kind: str, n: int, shape, seed: int):
    import torch

    if kind == "digits":
        from ..data import digits

        if tuple(shape) != (64,):
            raise CLIError(f"--data digits gives 64 inputs per example; the model expects {tuple(shape)}")
        ds = digits(dtype=torch.float64, seed=seed)
        if n > ds.x_train.shape[0]:
            raise CLIError(f"digits has {ds.x_train.shape[0]} training examples, asked for {n}")
        return ds.x_train[:n], ds.labels_train[:n], ds.y_train[:n]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((n,) + tuple(shape), generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 10, (n,), generator=gen)
    return x, labels, torch.nn.functional.one_hot(labels, 10).double()


def _jsonable(v):
    """Floats as :func:`~smoothchain.spec.json_number` (infinities as "inf"), in dicts too."""
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    return json_number(v) if isinstance(v, float) else v


def _emit(args, doc: dict, text: str) -> int:
    return emit(args.json, _jsonable(doc), text)


def _cmd_pl(args) -> int:
    import torch

    from ..pl import pl_report

    if args.module:
        model, name, shape = load_model(module=args.module, input_shape=args.input_shape, dtype=torch.float64)
        if shape is None and args.data == "digits":
            shape = (64,)
        if shape is None:
            raise CLIError("--module with --data random needs --input-shape")
        check_input_fits(model, shape, f"--data {args.data}")
    else:
        name = args.model or "mlp"
        model, shape = _mlp(name, args.seed), (64,)
    x, _, _ = _data(args.data, args.samples, shape, args.seed)
    report = _wrap(pl_report, model, x, loss=args.loss, radius=args.radius, points=args.points, seed=args.seed,
                   method=args.method)
    res, mu0, mu_b = report.neighbourhood, report.at_centre, report.over_ball
    c = res.at_centre
    doc = {
        "model": name, "data": args.data, "samples": args.samples, "outputs": c.outputs, "parameters": c.parameters,
        "over_parameterised": c.parameters >= c.outputs, "loss": args.loss, "method": c.method,
        "sigma_min": c.value, "mu": mu0.mu, "gradient_dominance": mu0.gradient_dominance,
        "neighbourhood": {"radius": res.radius, "points": res.points, "sigma_min": res.minimum, "mu": mu_b.mu,
                          "gradient_dominance": mu_b.gradient_dominance, "where": res.where},
    }
    text = "\n".join([
        f"model {name}: {c.parameters} parameters, N = {args.samples} samples x {c.outputs // args.samples} outputs"
        f" = {c.outputs} ({'over' if c.parameters >= c.outputs else 'under'}-parameterised)",
        f"sigma_min(stacked per-sample Jacobians) at w0 = {c.value:.6g} ({c.method})",
        f"PL ({args.loss}): mu = {mu0.mu:.6g}  (||grad L||^2 >= {mu0.gradient_dominance:.6g} (L - L*))",
        f"over B(w0, {res.radius:g}) ({res.points} random points): sigma_min >= {res.minimum:.6g} (sampled, at {res.where}),"
        f" mu = {mu_b.mu:.6g}",
    ])
    return _emit(args, doc, text)


def _wrap(fn, *a, **k):
    with errors_as_cli(ValueError):
        return fn(*a, **k)


def _cmd_sgd(args) -> int:
    from ..rates import sgd_best_step, sgd_bound, sgd_iterations

    eta = args.eta if args.eta is not None else _wrap(sgd_best_step, args.delta, args.iterations, args.beta, args.sigma2)
    bound = _wrap(sgd_bound, args.delta, eta, args.iterations, args.beta, args.sigma2)
    doc = {"kind": "sgd", "delta": args.delta, "beta": args.beta, "eta": eta, "iterations": args.iterations,
           "sigma2": args.sigma2, "bound": bound}
    text = f"E min_t ||grad L||^2 <= 2*{args.delta:g}/({eta:.6g}*{args.iterations}) + {args.beta:g}*{eta:.6g}*{args.sigma2:g} = {bound:.6g}"
    if args.target is not None:
        doc["target"] = args.target
        doc["iterations_needed"] = _wrap(sgd_iterations, args.delta, eta, args.beta, args.sigma2, args.target)
        text += f"\niterations for <= {args.target:g}: {doc['iterations_needed']:g}"
    return _emit(args, doc, text)


def _cmd_plrate(args) -> int:
    from ..rates import pl_bound, pl_iterations

    eta = args.eta if args.eta is not None else 1.0 / args.beta
    bound = _wrap(pl_bound, args.delta, eta, args.iterations, args.beta, args.mu, args.sigma2)
    doc = {"kind": "pl", "delta": args.delta, "beta": args.beta, "mu": args.mu, "eta": eta,
           "iterations": args.iterations, "sigma2": args.sigma2, "bound": bound}
    text = f"E L_T - L* <= {args.delta:g}(1 - {args.mu:g}*{eta:.6g})^{args.iterations} + noise floor = {bound:.6g}"
    if args.target is not None:
        doc["target"] = args.target
        doc["iterations_needed"] = _wrap(pl_iterations, args.delta, eta, args.beta, args.mu, args.sigma2, args.target)
        text += f"\niterations for <= {args.target:g}: {doc['iterations_needed']:g}"
    return _emit(args, doc, text)


def _cmd_gd(args) -> int:
    from ..rates import gd_iterations

    its = _wrap(gd_iterations, args.smoothness, args.delta, args.epsilon)
    doc = {"kind": "gd", "smoothness": args.smoothness, "delta": args.delta, "epsilon": args.epsilon,
           "step_size": 1.0 / args.smoothness if args.smoothness > 0 else math.inf, "iterations": its}
    return _emit(args, doc, f"projected GD, step 1/L_F: min ||G_k|| <= {args.epsilon:g} within {its:g} iterations")


def _cmd_noise(args) -> int:
    from ..rates import gradient_noise

    model = _mlp(args.model, args.seed)
    x, labels, onehot = _data(args.data, args.examples, (64,), args.seed)
    y = labels if args.loss == "cross-entropy" else onehot
    res = _wrap(gradient_noise, model, x, y, loss=args.loss, batch_size=args.batch_size, samples=args.samples,
                seed=args.seed)
    doc = {"kind": "noise", "model": args.model, "data": args.data, "examples": res.examples,
           "batch_size": res.batch_size, "samples": res.samples, "loss": args.loss, "sigma2": res.sigma2,
           "stderr": res.stderr, "gradient_norm2": res.gradient_norm2}
    print(f"rates noise: {res.samples} mini-batches of {res.batch_size}", file=sys.stderr)
    return _emit(args, doc, f"sigma^2 = {res.sigma2:.6g} +- {res.stderr:.2g} (||grad F||^2 = {res.gradient_norm2:.6g})")

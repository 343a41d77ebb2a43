"""Command-line interface: a thin layer over the library (DESIGN.md).

``smoothchain certify``   certified bounds of a chain (RH Prop. 4.4 / Cor. 4.5, Prop. 4.2, Thm 4.1)
``smoothchain check``     estimates on C that the certificate must survive (exit 3 on violation)
``smoothchain vgg-study`` RH Sec. 5: VGG / VGG-smooth / VGG-bn table, claims and bar chart

Every subcommand accepts ``--json`` (one JSON document on stdout) and exits with status 2 and a
one-line error on bad input.  PyTorch is imported only when a module must be loaded.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path
from typing import Sequence

from .chain import ChainError
from .cli_types import integer, real
from .models import BUILTIN_MODELS
from .objective import LOSSES, MODES

__all__ = ["main", "build_parser"]


# Modules that add subcommands: each defines ``register(subparsers)``, which adds its parser(s)
# and sets ``handler=`` (a function of the parsed args returning the exit status) with
# ``set_defaults``.  They must import torch only inside their handlers, so that ``certify``
# with a built-in or spec model stays torch-free.
PLUGIN_COMMANDS: tuple[str, ...] = ("cli_analysis", "cli_train", "cli_oracles")


#: top-level modules of the "data" extra (pyproject.toml): a command that needs a missing one
#: fails with a one-line error naming it
OPTIONAL_DEPENDENCIES = ("sklearn", "scipy", "mnist1d")


class CLIError(Exception):
    """Bad command-line input: printed as one line, exit status 2."""


_nonneg_float = real(0.0)
_pos_float = real(0.0, strict=True)
_pos_int = integer(1)


def add_model_options(p: argparse.ArgumentParser) -> None:
    """Model source and certificate options shared by ``certify`` (and later ``check``)."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", choices=sorted(BUILTIN_MODELS), help="built-in architecture")
    src.add_argument("--module", metavar="FILE.py:FACTORY", help="a user's nn.Sequential-like module: FACTORY() returns it")
    src.add_argument("--spec", metavar="FILE.json", help="explicit constants (DESIGN.md spec format)")
    p.add_argument("--batch-size", type=_pos_int, default=1, metavar="M", help="batch size m (default 1)")
    p.add_argument("--input-shape", metavar="C,H,W|D", help="per-example input shape (default: the model's)")
    p.add_argument("--radius", type=_nonneg_float, default=None, metavar="R", help="ball radius R (default 1, or the spec's)")
    p.add_argument("--input-norm", type=_nonneg_float, default=None, metavar="X",
                   help="||x||_2 of the whole input batch (default 1, or the spec's)")
    p.add_argument("--loss", choices=LOSSES, default="cross-entropy", help="loss f (default cross-entropy)")
    p.add_argument("--constants", choices=MODES, default="paper",
                   help="paper = RH Appendix B as printed; tight = sharper sound constants (docs/tight-constants.md)")
    p.add_argument("--l2", type=_nonneg_float, default=None, metavar="LAMBDA", help="r(w) = LAMBDA/2 ||w||^2 (default 0)")
    p.add_argument("--epsilon", type=_pos_float, default=1e-2, metavar="E", help="target stationarity for the iteration bound")
    p.add_argument("--gap", type=_nonneg_float, default=None, metavar="DELTA",
                   help="F(w0) - min F for the iteration bound (default: certified 2 l_f m_psi + range of r on C)")
    p.add_argument("--target-norm", type=_nonneg_float, default=1.0, metavar="Y",
                   help="bound on each target's norm for the square loss (default 1)")
    p.add_argument("--around-weights", action="store_true",
                   help="balls around the current weights (RH Cor. 4.5) instead of around 0")
    p.add_argument("--bn-eps", type=_pos_float, default=1e-5, metavar="EPS", help="batch-norm eps for vgg16-bn")
    p.add_argument("--seed", type=int, default=0, help="seed for the weights of built-in models with --around-weights")
    p.add_argument("--json", action="store_true", help="print one JSON document")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smoothchain",
        description="Smoothness certificates for chains of layers (Roulet & Harchaoui).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    c = sub.add_parser("certify", help="certified output bound, Lipschitz and smoothness constants, step size")
    add_model_options(c)
    c.add_argument("--save-spec", metavar="FILE.json", help="also write the chain's constants as a spec file")
    k = sub.add_parser("check", help="estimate m, l, L and L_F on C and compare with the certificate (exit 3 on violation)")
    add_model_options(k)
    k.add_argument("--points", type=_pos_int, default=3, help="random points of C (default 3)")
    k.add_argument("--ascent-steps", type=int, default=8, help="projected gradient ascent steps per point (default 8)")
    k.add_argument("--iters", type=_pos_int, default=60, help="power/Lanczos iterations per estimate (default 60)")
    k.add_argument("--tolerance", type=_nonneg_float, default=1e-6, help="relative tolerance for a violation")
    k.add_argument("--no-per-layer", action="store_true", help="estimate only the whole chain, not every prefix")
    k.add_argument("--plot", metavar="FILE.png", help="write a certified-vs-estimated bar chart (log scale)")
    v = sub.add_parser("vgg-study", help="RH Sec. 5: VGG variants, claims, markdown table and PNG chart")
    v.add_argument("--out", default="vgg-study", metavar="DIR", help="output directory (default ./vgg-study)")
    v.add_argument("--batch-size", type=_pos_int, default=128, metavar="M")
    v.add_argument("--radius", type=_nonneg_float, default=1.0, metavar="R")
    v.add_argument("--input-norm", type=_nonneg_float, default=1.0, metavar="X")
    v.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")
    v.add_argument("--json", action="store_true")
    for name in PLUGIN_COMMANDS:
        importlib.import_module(f"{__package__}.{name}").register(sub)
    return parser


def load_module(ref: str):
    """``FILE.py:FACTORY`` -> the nn.Module returned by FACTORY()."""
    path_text, sep, factory = ref.rpartition(":")
    if not sep or not path_text or not factory:
        raise CLIError(f"--module must look like FILE.py:FACTORY, got {ref!r}")
    path = Path(path_text)
    if not path.is_file():
        raise CLIError(f"--module file not found: {path}")
    spec = importlib.util.spec_from_file_location(f"smoothchain_user_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise CLIError(f"cannot import {path} as a Python module")
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
    except Exception as err:
        raise CLIError(f"importing {path} failed: {type(err).__name__}: {err}") from None
    fn = getattr(mod, factory, None)
    if fn is None or not callable(fn):
        raise CLIError(f"{path} has no callable {factory!r}")
    try:
        model = fn()
    except Exception as err:
        raise CLIError(f"{path}:{factory}() failed: {type(err).__name__}: {err}") from None
    from torch import nn

    if not isinstance(model, nn.Module):
        raise CLIError(f"{path}:{factory}() returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _certificate(args):
    from .certificate import build_chain, certify_chain, parse_input_shape
    from .chain import Chain
    from .objective import loss_constants
    from .recursion import chain_bounds
    from .spec import load_spec

    shape = parse_input_shape(args.input_shape) if args.input_shape else None
    if args.spec:
        spec = load_spec(args.spec)
        radius = spec.chain.radius if args.radius is None else args.radius
        input_norm = spec.chain.input_norm if args.input_norm is None else args.input_norm
        chain = build_chain(spec.chain, radius=radius, input_norm=input_norm, around_weights=args.around_weights)
        l2 = spec.regularization_smoothness if args.l2 is None else args.l2
        return chain, certify_chain(
            chain, spec.loss, l2=l2, epsilon=args.epsilon, gap=args.gap, mode="spec", loss_name="spec",
            batch_size=None, model=str(args.spec),
        )
    radius = 1.0 if args.radius is None else args.radius
    input_norm = 1.0 if args.input_norm is None else args.input_norm
    if args.module:
        model, name = load_module(args.module), args.module
    else:
        model, name = args.model, args.model
        if args.around_weights:  # the built-in module gets PyTorch's default initialisation
            import torch

            torch.manual_seed(args.seed)
    chain: Chain = build_chain(
        model, input_shape=shape, batch_size=args.batch_size, mode=args.constants, radius=radius,
        input_norm=input_norm, around_weights=args.around_weights, bn_eps=args.bn_eps,
    )
    bounds = chain_bounds(chain)
    loss = loss_constants(
        args.loss, batch_size=args.batch_size, output_bound=bounds.output_bound, mode=args.constants,
        target_norm=args.target_norm, input_norm=input_norm,
    )
    return chain, certify_chain(
        chain, loss, l2=args.l2 or 0.0, epsilon=args.epsilon, gap=args.gap, mode=args.constants,
        loss_name=args.loss, batch_size=args.batch_size, model=name, bounds=bounds,
    )


def _fmt(x) -> str:
    if isinstance(x, str):
        return x
    if x is None:
        return "-"
    return "inf" if math.isinf(x) else f"{x:.4g}"


def format_certificate(cert) -> str:
    """The human-readable table of ``smoothchain certify``."""
    b, o, ch = cert.bounds, cert.objective, cert.chain
    centre = "the weights (Cor. 4.5)" if ch.centre == "weights" else "0 (Prop. 4.4)"
    head = (
        f"smoothchain certificate: {cert.model} | constants={cert.mode} | batch m={cert.batch_size or '-'} | "
        f"R={_fmt(ch.radius)} around {centre} | ||x||={_fmt(ch.input_norm)}"
    )
    rows = [("#", "layer", "m_l (output)", "l_l (Lipschitz)", "L_l (smooth)", "nonlinear parts")]
    for layer, r in zip(ch.layers, b.layers):
        parts = ", ".join(a.name or "?" for a in layer.nonlinear) or "-"
        rows.append((str(r.index), r.name, _fmt(r.output_bound), _fmt(r.lipschitz), _fmt(r.smoothness), parts))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [head, ""]
    for k, row in enumerate(rows):
        lines.append("  ".join(cell.rjust(widths[i]) if 2 <= i <= 4 else cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines += [
        "",
        f"chain      m_psi = {_fmt(b.output_bound)}   l_psi = {_fmt(b.lipschitz)}   L_psi = {_fmt(b.smoothness)}",
        f"loss       {cert.loss}: l_f = {_fmt(o.loss_lipschitz)}   L_f = {_fmt(o.loss_smoothness)}   L_r = {_fmt(o.regularization_smoothness)}",
        f"objective  L_F = L_psi l_f + l_psi^2 L_f + L_r = {_fmt(o.smoothness)}   (RH Prop. 4.2)",
        f"step size  1/L_F = {_fmt(o.step_size)}",
        f"iterations ceil(2 L_F Delta / eps^2) = {_fmt(o.iterations)} for eps = {_fmt(o.epsilon)}, Delta = {_fmt(o.gap)}   (RH Thm 4.1)",
    ]
    return "\n".join(lines)


def _cmd_certify(args) -> int:
    chain, cert = _certificate(args)
    if args.save_spec:
        from .spec import spec_to_dict
        from .objective import LossConstants

        doc = spec_to_dict(chain, LossConstants(cert.objective.loss_lipschitz, cert.objective.loss_smoothness),
                           cert.objective.regularization_smoothness)
        Path(args.save_spec).write_text(json.dumps(doc, indent=2) + "\n")
    if args.json:
        print(json.dumps(cert.to_dict()))
    else:
        print(format_certificate(cert))
    return 0


def _cmd_check(args) -> int:
    from .certificate import parse_input_shape
    from .check import check, plot_check

    if args.spec:
        raise CLIError("check needs a network to evaluate: use --model or --module, not --spec")
    if args.module:
        model = load_module(args.module)
        shape = parse_input_shape(args.input_shape) if args.input_shape else getattr(model, "input_shape", None)
        if shape is None:
            raise CLIError("an nn.Module needs --input-shape (per example, e.g. 3,32,32 or 784)")
    else:
        import torch

        from .models import builtin
        from .torch_chain import torch_module

        torch.manual_seed(args.seed)
        spec = builtin(args.model, bn_eps=args.bn_eps)
        model = torch_module(spec.components, spec.names)
        shape = parse_input_shape(args.input_shape) if args.input_shape else spec.input_shape
    result = check(
        model, input_shape=shape, batch_size=args.batch_size,
        radius=1.0 if args.radius is None else args.radius,
        input_norm=1.0 if args.input_norm is None else args.input_norm,
        loss=args.loss, mode=args.constants, l2=args.l2 or 0.0, around_weights=args.around_weights,
        target_norm=args.target_norm, points=args.points, ascent_steps=args.ascent_steps, iters=args.iters,
        tolerance=args.tolerance, seed=args.seed, per_layer=not args.no_per_layer,
        progress=lambda s: print(s, file=sys.stderr),
    )
    if args.plot:
        plot_check(result, args.plot)
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(format_check(result))
    return 3 if result.violations else 0


def format_check(result) -> str:
    """Per-layer table of certified vs estimated values and their ratio (the tightness gap)."""
    rows = [("#", "layer", "quantity", "certified", "estimated", "est/cert")]
    for r in result.layers:
        ratios = r.ratios()
        for q in ("output_bound", "lipschitz", "smoothness"):
            rows.append((str(r.index), r.name, q, _fmt(r.certified[q]), _fmt(r.estimated[q]), _fmt(ratios[q])))
    c, e = result.certified["objective_smoothness"], result.estimated["objective_smoothness"]
    ratio = None if math.isinf(c) or c == 0 else e / c
    rows.append(("-", "objective", "smoothness L_F", _fmt(c), _fmt(e), _fmt(ratio)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    verdict = "no violation" if not result.violations else f"{len(result.violations)} VIOLATION(S): " + "; ".join(
        f"{v['name']} {v['quantity']} estimated {v['estimated']:.4g} > certified {v['certified']}" for v in result.violations)
    return "\n".join(lines + ["", verdict])


def _cmd_vgg_study(args) -> int:
    from .vgg_study import run_vgg_study, study_to_dict, write_vgg_study

    study = run_vgg_study(batch_size=args.batch_size, radius=args.radius, input_norm=args.input_norm)
    files = write_vgg_study(study, args.out, plot=not args.no_plot)
    if args.json:
        doc = study_to_dict(study)
        doc["files"] = files
        print(json.dumps(doc))
    else:
        print(Path(files["markdown"]).read_text())
        print("wrote " + ", ".join(files.values()), file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {"certify": _cmd_certify, "check": _cmd_check, "vgg-study": _cmd_vgg_study}
    try:
        handler = getattr(args, "handler", None) or handlers[args.command]
        return handler(args)
    except (ChainError, CLIError) as err:
        print(f"smoothchain: error: {err}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as err:
        # an optional dependency (scikit-learn, scipy, mnist1d: the "data" extra) is missing
        if err.name and err.name.split(".")[0] in OPTIONAL_DEPENDENCIES:
            print(f"smoothchain: error: {err} -- install the optional dependencies with "
                  f"pip install 'smoothchain[data]'", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""``smoothchain certify``, ``check`` and ``vgg-study``: thin layers over
:func:`smoothchain.certificate.certify_source`, :func:`smoothchain.check.check` and
:mod:`smoothchain.vgg_study`.

``certify`` of a built-in model or a spec never imports PyTorch (only ``--module`` and
``--around-weights`` do).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from ..models import BUILTIN_MODELS
from ..objective import LOSSES, MODES
from ..report import fmt_number
from .common import CLIError, check_output_dir, check_output_file, emit, format_table, load_model, load_module
from .options import integer, real

__all__ = ["register", "add_model_options", "format_certificate", "format_check"]

_nonneg_float = real(0.0)
_pos_float = real(0.0, strict=True)
_pos_int = integer(1)


def add_model_options(p: argparse.ArgumentParser) -> None:
    """Model source and certificate options shared by ``certify`` and ``check``."""
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
    p.add_argument("--constants", choices=MODES + ("local",), default="paper",
                   help="paper = RH Appendix B as printed; tight = sharper sound constants (docs/tight-constants.md); "
                        "local = tight around the weights for one batch (check only, docs/local.md)")
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


def register(sub) -> None:
    """Add the ``certify``, ``check`` and ``vgg-study`` parsers to the ``smoothchain`` sub-parsers."""
    c = sub.add_parser("certify", help="certified output bound, Lipschitz and smoothness constants, step size")
    add_model_options(c)
    c.add_argument("--save-spec", metavar="FILE.json", help="also write the chain's constants as a spec file")
    c.set_defaults(handler=_cmd_certify)
    k = sub.add_parser("check", help="estimate m, l, L and L_F on C and compare with the certificate (exit 3 on violation)")
    add_model_options(k)
    k.add_argument("--points", type=_pos_int, default=3, help="random points of C (default 3)")
    k.add_argument("--ascent-steps", type=int, default=8, help="projected gradient ascent steps per point (default 8)")
    k.add_argument("--iters", type=_pos_int, default=60, help="power/Lanczos iterations per estimate (default 60)")
    k.add_argument("--tolerance", type=_nonneg_float, default=1e-6, help="relative tolerance for a violation")
    k.add_argument("--no-per-layer", action="store_true", help="estimate only the whole chain, not every prefix")
    k.add_argument("--budget", type=real(0.0, strict=True, finite=True), default=None, metavar="SECONDS",
                   help="stop the search after SECONDS and report what it found (still sound: every estimate is "
                        "a lower bound); default: no limit, the time left is shown as it goes")
    k.add_argument("--plot", metavar="FILE.png", help="write a certified-vs-estimated bar chart (log scale)")
    k.set_defaults(handler=_cmd_check)
    v = sub.add_parser("vgg-study", help="RH Sec. 5: VGG variants, claims, markdown table and PNG chart")
    v.add_argument("--out", default="vgg-study", metavar="DIR", help="output directory (default ./vgg-study)")
    v.add_argument("--batch-size", type=_pos_int, default=128, metavar="M")
    v.add_argument("--radius", type=_nonneg_float, default=1.0, metavar="R")
    v.add_argument("--input-norm", type=_nonneg_float, default=1.0, metavar="X")
    v.add_argument("--local", type=_local_centres, default=(), metavar="CENTRES",
                   help="also certify vgg16-smooth locally on one batch around these weights, comma-separated: "
                        "'zero' (the same balls as the other rows), 'init' (PyTorch's initialisation); "
                        "needs torch, about 25 minutes and 12 GB each at m=128 on 2 cores")
    v.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")
    v.add_argument("--json", action="store_true")
    v.set_defaults(handler=_cmd_vgg_study)


def _local_centres(text: str) -> tuple[str, ...]:
    from ..vgg_study import LOCAL_CENTRES

    centres = tuple(c.strip() for c in text.split(",") if c.strip())
    bad = [c for c in centres if c not in LOCAL_CENTRES]
    if bad or not centres:
        raise argparse.ArgumentTypeError(f"choose among {', '.join(LOCAL_CENTRES)} (comma-separated), got {text!r}")
    return centres


def _fmt(x) -> str:
    return fmt_number(x, ".4g")


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
    return "\n".join([head, ""] + format_table(rows, right=lambda i: 2 <= i <= 4) + [
        "",
        f"chain      m_psi = {_fmt(b.output_bound)}   l_psi = {_fmt(b.lipschitz)}   L_psi = {_fmt(b.smoothness)}",
        f"loss       {cert.loss}: l_f = {_fmt(o.loss_lipschitz)}   L_f = {_fmt(o.loss_smoothness)}   L_r = {_fmt(o.regularization_smoothness)}",
        f"objective  L_F = L_psi l_f + l_psi^2 L_f + L_r = {_fmt(o.smoothness)}   (RH Prop. 4.2)",
        f"step size  1/L_F = {_fmt(o.step_size)}",
        f"iterations ceil(2 L_F Delta / eps^2) = {_fmt(o.iterations)} for eps = {_fmt(o.epsilon)}, Delta = {_fmt(o.gap)}   (RH Thm 4.1)",
    ])


def _cmd_certify(args) -> int:
    from ..certificate import certify_source

    if args.constants == "local":
        raise CLIError("--constants local certifies one batch around the weights: run `smoothchain check "
                       "--constants local --around-weights` (on its batch), or smoothchain.local.certify_local / "
                       "smoothchain.optim.CertifiedGD(mode='local') from Python")
    if args.save_spec:
        check_output_file(args.save_spec, "--save-spec")
    cert = certify_source(
        load_module(args.module) if args.module else args.model, spec=args.spec, name=args.module, seed=args.seed,
        input_shape=args.input_shape, batch_size=args.batch_size, radius=args.radius, input_norm=args.input_norm,
        loss=args.loss, mode=args.constants, l2=args.l2, epsilon=args.epsilon, gap=args.gap,
        target_norm=args.target_norm, around_weights=args.around_weights, bn_eps=args.bn_eps,
    )
    if args.save_spec:
        from ..objective import LossConstants
        from ..report import atomic_write_text
        from ..spec import spec_to_dict

        o = cert.objective
        doc = spec_to_dict(cert.chain, LossConstants(o.loss_lipschitz, o.loss_smoothness), o.regularization_smoothness)
        try:
            atomic_write_text(args.save_spec, json.dumps(doc, indent=2) + "\n")
        except OSError as err:  # checked before the work, but the disk may still fail: keep the certificate
            emit(args.json, cert.to_dict(), lambda: format_certificate(cert))
            raise CLIError(f"--save-spec {args.save_spec}: could not write it ({err.strerror or err}); "
                           "the certificate is printed above") from None
    return emit(args.json, cert.to_dict(), lambda: format_certificate(cert))


def _cmd_check(args) -> int:
    from ..check import check, plot_check

    if args.spec:
        raise CLIError("check needs a network to evaluate: use --model or --module, not --spec")
    if args.plot:
        check_output_file(args.plot, "--plot")
    model, _, shape = load_model(args.model, args.module, input_shape=args.input_shape, seed=args.seed,
                                 bn_eps=args.bn_eps, shape_example="3,32,32 or 784")
    result = check(
        model, input_shape=shape, batch_size=args.batch_size,
        radius=1.0 if args.radius is None else args.radius,
        input_norm=1.0 if args.input_norm is None else args.input_norm,
        loss=args.loss, mode=args.constants, l2=args.l2 or 0.0, around_weights=args.around_weights,
        target_norm=args.target_norm, points=args.points, ascent_steps=args.ascent_steps, iters=args.iters,
        tolerance=args.tolerance, seed=args.seed, per_layer=not args.no_per_layer, budget=args.budget,
        progress=lambda s: print(s, file=sys.stderr),
    )
    if args.plot:
        plot_check(result, args.plot)
    emit(args.json, result.to_dict(), lambda: format_check(result))
    return 3 if result.violations else 0


def format_check(result) -> str:
    """Per-layer table of certified vs estimated values and their ratio (the tightness gap)."""
    rows = [("#", "layer", "quantity", "certified", "estimated", "est/cert")]
    for r in result.layers:
        ratios = r.ratios()
        for q in ("output_bound", "lipschitz", "smoothness"):
            rows.append((str(r.index), r.label, q, _fmt(r.certified[q]), _fmt(r.estimated[q]), _fmt(ratios[q])))
    c, e = result.certified["objective_smoothness"], result.estimated["objective_smoothness"]
    ratio = None if e is None or math.isinf(c) or c == 0 else e / c
    rows.append(("-", "objective", "smoothness L_F", _fmt(c), _fmt(e), _fmt(ratio)))
    verdict = "no violation" if not result.violations else f"{len(result.violations)} VIOLATION(S): " + "; ".join(
        f"{v['name']} {v['quantity']} estimated {v['estimated']:.4g} > certified {v['certified']}" for v in result.violations)
    lines = format_table(rows) + ["", verdict]
    if result.stopped:
        lines.append(f"stopped early: {result.stopped} (- = not estimated)")
    return "\n".join(lines)


def _cmd_vgg_study(args) -> int:
    from ..vgg_study import run_vgg_study, study_to_dict, write_vgg_study

    check_output_dir(args.out, "--out")
    study = run_vgg_study(batch_size=args.batch_size, radius=args.radius, input_norm=args.input_norm,
                          local=args.local)
    files = write_vgg_study(study, args.out, plot=not args.no_plot)
    emit(args.json, {**study_to_dict(study), "files": files}, lambda: Path(files["markdown"]).read_text())
    if not args.json:
        print("wrote " + ", ".join(files.values()), file=sys.stderr)
    return 0

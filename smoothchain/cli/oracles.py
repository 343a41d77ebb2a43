"""``smoothchain complexity``: predicted (RH Prop. 3.3, Cor. 3.4, Prop. C.5; Prop. 3.5, Algo. 4)
vs measured (FlopCounterMode's formulas) costs of a chain's forward/backward passes and oracle
steps -- a thin layer over :func:`smoothchain.complexity.complexity_report`
(docs/complexity.md).

Registered through ``smoothchain.cli.main.SUBCOMMANDS``; PyTorch is imported inside the handler.
"""

from __future__ import annotations

from ..losses import SUPERVISED_LOSSES
from ..report import fmt_number
from .common import emit, errors_as_cli, format_table, load_model
from .options import integer, real

__all__ = ["register", "format_report"]

MODELS = ("mlp", "cnn")


_pos_int = integer(1)


def register(sub) -> None:
    """Add the ``complexity`` parser to the ``smoothchain`` sub-parsers."""
    p = sub.add_parser("complexity", help="predicted (RH Prop. 3.3, Cor. 3.4, Prop. C.5) vs measured "
                                          "FLOPs of the forward/backward passes and oracle steps")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", choices=MODELS, help="built-in architecture (as in certify)")
    src.add_argument("--module", metavar="FILE.py:FACTORY", help="a user's nn.Sequential: FACTORY() returns it")
    p.add_argument("--input-shape", metavar="C,H,W|D", help="per-example input shape (default: the model's)")
    p.add_argument("--batch-size", type=_pos_int, default=4, metavar="M", help="batch size m (default 4)")
    p.add_argument("--loss", choices=SUPERVISED_LOSSES, default="cross-entropy")
    p.add_argument("--l2", type=real(0.0, finite=True), default=0.0, metavar="LAMBDA", help="r(w) = LAMBDA/2 ||w||^2")
    p.add_argument("--gamma", type=real(0.0, strict=True, finite=True), default=1.0, help="step size of the oracle steps (default 1)")
    p.add_argument("--no-steps", action="store_true", help="per-layer costs only (skip the oracle steps)")
    p.add_argument("--seed", type=int, default=0, help="seed of the built-in weights and of the random batch")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(handler=_cmd_complexity)


def _fmt(x) -> str:
    """Counts exactly (thousands separated by spaces from 10 000 on), other numbers to 3 digits."""
    if isinstance(x, int) and abs(x) >= 10_000:
        return f"{x:,}".replace(",", " ")
    return str(x) if isinstance(x, int) else fmt_number(x, ".3g")


def _ratio(a, b) -> str:
    return "-" if not b else fmt_number(a / b, ".4g")


def _table(rows) -> list[str]:
    return format_table(rows, right=lambda i: i > 1)


def format_report(doc: dict) -> str:
    """The human-readable tables of ``smoothchain complexity``."""
    lines = [f"smoothchain complexity: {doc['model']} | batch m={doc['batch_size']} | input {doc['input_shape']} | "
             f"loss {doc['loss']} | p={doc['parameters']} q={doc['q']}", "",
             "per layer -- FLOPs as FlopCounterMode counts them (2 per multiply-add, products only);",
             "Prop. 3.3 / Cor. 3.4 / Prop. C.5: the backward pass in RH's units", ""]
    rows = [("#", "layer", "delta_in", "delta_out", "rho", "s_beta", "s_a", "fwd pred", "fwd meas",
             "bwd pred", "bwd meas", "Prop 3.3", "Cor 3.4", "Prop C.5")]
    for c in doc["layers"]:
        rows.append((str(c["index"]), f"{c['name']} ({c['kind']})", *(_fmt(c[k]) for k in (
            "delta_in", "delta_out", "rho", "s_beta", "s_a", "forward_flops", "measured_forward",
            "backward_flops", "measured_backward", "prop_3_3_backward", "cor_3_4_backward", "prop_c5_backward"))))
    lines += _table(rows)
    steps = doc.get("steps")
    if steps:
        g, d, n = steps["gradient"], steps["gauss_newton_dual"], steps["newton_dp"]
        rows = [("step", "method", "predicted", "measured", "meas/pred", "oracle calls"),
                ("gradient", "dp (Prop. C.2)", _fmt(g["predicted"]), _fmt(g["measured"]),
                 _ratio(g["measured"], g["predicted"]), "1"),
                ("gauss-newton", "dual (Prop. 3.5)", _fmt(d["predicted"]), _fmt(d["measured"]),
                 _ratio(d["measured"], d["predicted"]), f"{d['oracle_calls']} (<= 2q+1 = {d['bound_2q_plus_1']})"),
                ("newton", "dp (Algo. 4)", _fmt(n["predicted"]), _fmt(n["measured"]),
                 _ratio(n["measured"], n["predicted"]), str(n["oracle_calls"])),
                ("  assembly", "A, B, Hessians", _fmt(n["predicted_assembly"]), _fmt(n["measured_assembly"]),
                 _ratio(n["measured_assembly"], n["predicted_assembly"]), ""),
                ("  riccati", f"{n['riccati_passes']} pass(es)", _fmt(n["predicted_riccati"]),
                 _fmt(n["measured_riccati"]), _ratio(n["measured_riccati"], n["predicted_riccati"]), "")]
        lines += ["", f"oracle steps -- FLOPs (gamma = {doc['gamma']}, l2 = {doc['l2']})", ""] + _table(rows)
        lines += ["", f"Newton: gamma used {n['gamma_used']:.4g}; Cholesky factorisations and triangular solves "
                      f"(~{_fmt(n['uncounted_riccati'])} operations) are not counted by FlopCounterMode"]
    return "\n".join(lines)


def _cmd_complexity(args) -> int:
    from ..complexity import complexity_report

    model, name, shape = load_model(args.model, args.module, input_shape=args.input_shape, seed=args.seed,
                                    shape_example="1,8,8 or 64")
    with errors_as_cli(ValueError, TypeError, RuntimeError, first_line=True, with_type=True):
        doc = complexity_report(model, shape, args.batch_size, loss=args.loss, seed=args.seed, l2=args.l2,
                                gamma=args.gamma, steps=not args.no_steps)
    doc = {"model": name, **doc}
    return emit(args.json, doc, lambda: format_report(doc))

"""``smoothchain train`` and ``smoothchain experiment {dsgd,prop21}`` (Flynn's DSGD, issue 5).

Thin wrappers over :mod:`smoothchain.train` and :mod:`smoothchain.experiments`; torch is
imported only inside the handlers.  See ``docs/train.md``.
"""

from __future__ import annotations

import math

from .common import CLIError, check_output_dir, emit, errors_as_cli
from .options import integer, layer_norm, real

__all__ = ["register"]

_OPTIMIZERS = ("dsgd", "dsgd-all", "random", "sequential", "sgd-norm", "sgd", "gd",
               "gauss-newton", "newton", "certified-gd")
#: smoothchain.train.CERTIFY_MODES, written out so that the CLI imports no torch before a
#: handler runs (tests/test_layout.py checks the two agree)
CERTIFY_MODES = ("segment", "local", "tight", "paper")


_DEFAULT_HIDDEN = 300          # F Sec. 5
_SECOND_ORDER_HIDDEN = 32      # Newton by DP holds (rho_l + delta_l)^2 dense entries per layer
_SECOND_ORDER_BATCH = 64


def register(sub) -> None:
    t = sub.add_parser("train", help="train F Sec. 5's network with DSGD or a baseline (metrics, "
                                     "checkpoints, --resume, figures)")
    t.add_argument("--optimizer", choices=_OPTIMIZERS, default="dsgd")
    t.add_argument("--q", type=layer_norm, default=2.0, help="layer norm: 1, 2 or inf (F Prop. 4.5)")
    t.add_argument("--data", default="digits", help="digits, mnist1d or a directory with MNIST, "
                   "Fashion-MNIST, CIFAR-10 or SVHN files")
    t.add_argument("--hidden", type=int, default=None,
                   help=f"hidden units (default {_DEFAULT_HIDDEN}; {_SECOND_ORDER_HIDDEN} for gauss-newton/newton, "
                        "whose dense layer matrices grow with the square of the width)")
    t.add_argument("--steps", type=int, default=100)
    t.add_argument("--batch-size", type=int, default=None,
                   help=f"0 = full batch (F's batch mode; the default), {_SECOND_ORDER_BATCH} by default for "
                        "gauss-newton/newton")
    t.add_argument("--lr", type=float, default=None, help="default: 1 for dsgd/dsgd-all, 0.1 otherwise "
                   "(certified-gd takes its step from the certificate and ignores it)")
    t.add_argument("--radius", type=real(0.0, strict=True, finite=True), default=0.1, metavar="R",
                   help="certified-gd: radius R of the ball around the weights on which each step's "
                        "smoothness L_F is certified (RH Cor. 4.5; default 0.1)")
    t.add_argument("--certify", choices=CERTIFY_MODES, default=CERTIFY_MODES[0],
                   help="certified-gd: 'segment' (default) certifies the curvature along each step's own "
                        "segment (docs/segment.md); 'local', 'tight', 'paper' certify L_F on the ball of "
                        "radius R around the weights (docs/local.md, RH Cor. 4.5)")
    t.add_argument("--out", default=None, help="directory for metrics.jsonl, checkpoint.pt, PNGs")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt (the options must "
                   "match the checkpoint's, except --steps, --eval-every, --checkpoint-every, --no-plots)")
    t.add_argument("--overwrite", action="store_true", help="replace the run OUT holds (without it, or "
                   "--resume, an OUT holding a run is an error)")
    t.add_argument("--checkpoint-every", type=int, default=50)
    t.add_argument("--eval-every", type=int, default=10)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--limit", type=int, default=None, help="keep at most this many examples per split")
    t.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    t.add_argument("--distributed", action="store_true",
                   help="data-parallel over the torchrun processes (gloo); implied under torchrun and --nproc")
    t.add_argument("--nproc", type=integer(1), default=1, metavar="N",
                   help="data-parallel over N local processes started here (gloo; like torchrun --standalone "
                        "--nproc_per_node N, with one-line errors)")
    t.add_argument("--no-plots", action="store_true")
    t.add_argument("--rescale-data", action="store_true",
                   help="dsgd/dsgd-all: divide the inputs by their max |entry| when it exceeds 1 "
                        "(F Assumption 4.1 ii); without it such data is an error")
    t.add_argument("--json", action="store_true")
    t.set_defaults(handler=_cmd_train)

    e = sub.add_parser("experiment", help="F's experiments: dsgd (Sec. 5 protocol), prop21 (Sec. 2)")
    e.add_argument("which", choices=("dsgd", "prop21"))
    e.add_argument("--data", default="digits")
    e.add_argument("--out", default=None, help="output directory (default: dsgd-experiment / prop21)")
    e.add_argument("--hidden", type=int, default=300)
    e.add_argument("--batch-steps", type=int, default=None, help="full-batch steps per run (default 6000; F: 20,000)")
    e.add_argument("--minibatch-steps", type=int, default=None, help="mini-batch steps per run (default 6000)")
    e.add_argument("--tune-steps", type=int, default=None, help="steps per step-size candidate (default 500)")
    e.add_argument("--batch-size", type=int, default=128)
    e.add_argument("--qs", default="1,2,inf", help="comma-separated subset of 1,2,inf")
    e.add_argument("--grid", default="0.001,0.01,0.1,1,10", help="step sizes to tune over")
    e.add_argument("--limit", type=int, default=None)
    e.add_argument("--eval-every", type=int, default=None, help="default: 1/200 of the longest run")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--eps-max", type=float, default=1000.0, help="prop21: end of the curve")
    e.add_argument("--points", type=int, default=25, help="prop21: points on the curve")
    e.add_argument("--json", action="store_true")
    e.set_defaults(handler=_cmd_experiment)


def _cmd_train(args) -> int:
    from ..data import DatasetNotFoundError
    from ..distributed import in_torchrun
    from ..train import LAYERWISE, TrainConfig, method_name, train

    second_order = args.optimizer in ("gauss-newton", "newton")
    if args.hidden is None:
        args.hidden = _SECOND_ORDER_HIDDEN if second_order else _DEFAULT_HIDDEN
    if args.batch_size is None:
        args.batch_size = 0
        if second_order:  # --limit caps the training split
            args.batch_size = _SECOND_ORDER_BATCH if args.limit is None else min(_SECOND_ORDER_BATCH, args.limit)
    if args.steps < 0 or args.batch_size < 0 or args.hidden < 1:
        raise CLIError("--steps and --batch-size must be >= 0 and --hidden >= 1")
    if args.checkpoint_every < 1 or args.eval_every < 1:
        raise CLIError("--checkpoint-every and --eval-every must be >= 1")
    if args.lr is not None and not (args.lr > 0 and math.isfinite(args.lr)):
        raise CLIError(f"--lr must be positive, got {args.lr}")
    if args.resume and not args.out:
        raise CLIError("--resume needs --out DIR")
    if args.nproc > 1 and not in_torchrun():
        from ..distributed import launch

        return launch(args.argv, args.nproc)
    cfg = TrainConfig(optimizer=args.optimizer, q=args.q, data=args.data, hidden=args.hidden,
                      steps=args.steps, batch_size=args.batch_size, lr=args.lr, out=args.out,
                      resume=args.resume, seed=args.seed, checkpoint_every=args.checkpoint_every,
                      eval_every=args.eval_every, limit=args.limit, dtype=args.dtype,
                      distributed=args.distributed or in_torchrun(), plots=not args.no_plots,
                      rescale_data=args.rescale_data, radius=args.radius,
                      certify=args.certify, overwrite=args.overwrite)
    ctx = None
    try:
        if cfg.distributed:
            from ..distributed import Context

            ctx = Context.from_env()
        with errors_as_cli(DatasetNotFoundError, ValueError, FileNotFoundError):
            summary = train(cfg, progress=True, dist_ctx=ctx)
    finally:
        if ctx is not None:
            ctx.close()
    if ctx is None or ctx.rank == 0:
        f = summary["final"] or {}
        tail = f", layer updates {summary['counts']}" if summary["optimizer"] in LAYERWISE else ""
        emit(args.json, summary, f"{method_name(summary['optimizer'], cfg.q)}: {summary['steps']} steps, train error "
                                 f"{_percent(f.get('train_error'))}, test accuracy {_percent(f.get('test_accuracy'))}{tail}")
    return 0


def _percent(rate) -> str:
    return "-" if rate is None else f"{100 * rate:.2f} %"


def _cmd_experiment(args) -> int:
    from ..data import DatasetNotFoundError

    if args.which == "prop21":
        from ..experiments import prop21

        if args.points < 2 or not args.eps_max > 0:
            raise CLIError("--points must be >= 2 and --eps-max > 0")
        check_output_dir(args.out or "prop21", "--out")
        res = prop21(args.out or "prop21", eps_max=args.eps_max, points=args.points)
        last = res["rows"][-1]
        return emit(args.json, res, f"eps={last['eps']:g}: ||H||={last['hessian_norm']:.4g}, blocks "
                                    f"{last['block_norms']}, p_i^2 {last['p_squared']}; figure {res['figures']}")
    from ..experiments import dsgd_experiment

    try:
        qs = [layer_norm(t) for t in args.qs.split(",") if t.strip()]
        grid = [float(t) for t in args.grid.split(",") if t.strip()]
    except Exception as exc:  # argparse.ArgumentTypeError or ValueError
        raise CLIError(f"bad --qs or --grid: {exc}") from None
    if not qs or not grid or any(not (g > 0) for g in grid):
        raise CLIError("--qs and --grid must be non-empty, step sizes positive")
    for name in ("batch_steps", "minibatch_steps", "tune_steps", "batch_size", "hidden", "eval_every"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be >= 1")
    # the run sizes left out keep the library's defaults (experiments.BATCH_STEPS, ...)
    sizes = {k: getattr(args, k) for k in ("batch_steps", "minibatch_steps", "tune_steps", "eval_every")
             if getattr(args, k) is not None}
    check_output_dir(args.out or "dsgd-experiment", "--out")
    with errors_as_cli(DatasetNotFoundError, ValueError):
        res = dsgd_experiment(args.data, out=args.out or "dsgd-experiment", hidden=args.hidden,
                              batch_size=args.batch_size, qs=qs, grid=grid, limit=args.limit,
                              seed=args.seed, progress=True, **sizes)
    return emit(args.json, res, f"report: {res['report']}")

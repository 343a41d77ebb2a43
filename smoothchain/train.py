"""Training runs for the DSGD study (F Sec. 5): models, optimizers, metrics, checkpoints, plots.

``train(TrainConfig(...))`` trains F Sec. 5's network (one hidden layer of sigmoid units, sigmoid
outputs, uniform [-1, 1] initialisation) on the objective of F eqs. (21)-(22) (batch mean of the
squared Euclidean error against one-hot targets, no 1/2) with one of

* ``dsgd`` (F Algo. 4.1, greedy, lr = 1 is the theory), ``dsgd-all`` (F Sec. 5.2's DSGD_ALL),
  ``random`` / ``sequential`` (F Sec. 5.1's layer-wise baselines, tuned step, no p_i scaling),
  ``sgd-norm`` (F Sec. 5.2's SGD with q-norm duality updates in every layer);
* ``sgd`` (mini-batch ``torch.optim.SGD``), ``gd`` (full-batch ``torch.optim.SGD``);
* ``gauss-newton`` / ``newton`` (``smoothchain.optim.GaussNewton`` / ``Newton``, imported lazily;
  their ``step(closure)`` takes a closure returning the batch ``(x, y)``);
* ``certified-gd`` (``smoothchain.optim.CertifiedGD``: gradient descent with a certified step,
  recertified every step; ``lr`` unused): ``certify = "segment"`` (the default) certifies the
  curvature along each step's own segment (docs/segment.md); ``"local"``, ``"tight"``, ``"paper"``
  certify L_F on the ball of radius ``radius`` around the weights (RH Cor. 4.5 / Prop. 4.2) and
  step min(1/L_F, R / max_l ||g_l||).

``batch_size = 0`` means full batch (F's batch mode).  Every step appends one JSON line to
``OUT/metrics.jsonl``: ``step``, ``loss`` (the step's batch objective before the step), ``layers``
(layers updated, 1-based, for layer-wise optimizers), ``counts`` (cumulative updates per layer);
evaluation steps add ``train_loss``, ``train_error``, ``test_accuracy``.  Checkpoints
(``OUT/checkpoint.pt``: model, optimizer ``state_dict`` -- DSGD's includes its "random"
generator --, the mini-batch generator's state, step, the metrics so far, the options) are
written every ``checkpoint_every`` steps and at the end in :mod:`smoothchain.checkpoint`'s
format (checksum, ``weights_only`` loading, the previous one kept as ``checkpoint.pt.prev``);
``resume=True`` restarts from it and first rewrites ``metrics.jsonl`` from the checkpoint's
metrics, so a run killed at any moment continues with no metric lost or duplicated.  The end of
a run writes ``training_error.png``, ``test_accuracy.png`` and ``layer_updates.png``
(F Figs. 2-4 and 3/6) and ``summary.json``.  All randomness (initial weights, mini-batches, DSGD's
"random" layers) comes from explicit generators seeded from ``seed``: torch's global generator
is neither seeded nor drawn from.

Distributed (``distributed=True`` or under ``torchrun``): see :mod:`smoothchain.distributed`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import skip_init

from .losses import squared_error
from .report import atomic_write_text, atomic_write_with, fmt_number, legend_below, new_figure, save_figure, uncreatable
from .spec import json_number

__all__ = ["TrainConfig", "train", "check_out", "config_differences", "build_model", "make_optimizer", "evaluate",
           "OPTIMIZERS", "LAYERWISE", "plot_metrics", "load_data", "Progress", "method_name"]

OPTIMIZERS = ("dsgd", "dsgd-all", "random", "sequential", "sgd-norm", "sgd", "gd",
              "gauss-newton", "newton", "certified-gd")
LAYERWISE = ("dsgd", "dsgd-all", "random", "sequential", "sgd-norm")
#: optimizers whose steps divide by p_i(w), valid under F Assumption 4.1 (ii) only
BOUNDED = ("dsgd", "dsgd-all")
DEFAULT_LR = {"dsgd": 1.0, "dsgd-all": 1.0, "random": 0.1, "sequential": 0.1, "sgd-norm": 0.1,
              "sgd": 0.1, "gd": 0.1, "gauss-newton": 1.0, "newton": 1.0,
              "certified-gd": 1.0}  # certified-gd takes no lr: its step is the certificate's
#: optimizers whose ``step(closure)`` takes a closure returning the batch ``(x, y)``
BATCH_CLOSURE = ("gauss-newton", "newton", "certified-gd")
#: certified-gd: what its certificates hold on (CertifiedGD's ``mode``); the first is the default
CERTIFY_MODES = ("segment", "local", "tight", "paper")


@dataclass
class TrainConfig:
    optimizer: str = "dsgd"
    q: float = 2.0
    data: str = "digits"
    hidden: int = 300
    steps: int = 100
    batch_size: int = 0  # 0 = full batch
    lr: float | None = None  # None = DEFAULT_LR[optimizer]
    out: str | None = None
    resume: bool = False
    seed: int = 0
    checkpoint_every: int = 50
    eval_every: int = 10
    limit: int | None = None
    dtype: str = "float32"
    distributed: bool = False
    plots: bool = True
    rescale_data: bool = False  # DSGD: divide inputs by max |x| if F Assumption 4.1 (ii) fails
    radius: float = 0.1  # certified-gd: R of the ball around the weights (RH Cor. 4.5)
    certify: str = CERTIFY_MODES[0]  # certified-gd: CertifiedGD's mode
    overwrite: bool = False  # replace the run OUT holds (else such an OUT is an error unless resume)

    def resolved_lr(self) -> float:
        return float(DEFAULT_LR[self.optimizer] if self.lr is None else self.lr)


def _check_assumption_41(x_tr, z_tr, x_te, z_te, cfg):
    """F Assumption 4.1 (ii) with D = 1 for the optimizers whose steps use p_i(w): a clear
    ``ValueError`` naming the split, or (``cfg.rescale_data``) inputs divided by their largest
    |entry| over both splits (one factor, so train and test stay comparable).  Targets are never
    rescaled (that would change the objective)."""
    from .dsgd import check_data

    m = max(float(x_tr.abs().max()) if x_tr.numel() else 0.0,
            float(x_te.abs().max()) if x_te.numel() else 0.0)
    if cfg.rescale_data and m > 1.0:
        x_tr, x_te = x_tr / m, x_te / m
    for split, x, z in (("training", x_tr, z_tr), ("test", x_te, z_te)):
        try:
            check_data(x, z, 1.0)
        except ValueError as exc:
            hint = "" if cfg.rescale_data else " (--rescale-data divides the inputs by their max |entry|)"
            raise ValueError(f"{cfg.optimizer} on {cfg.data!r}, {split} split: {exc}{hint}") from None
    return x_tr, z_tr, x_te, z_te


def method_name(optimizer: str, q: float) -> str:
    """How summaries, reports and figure legends name a run: ``dsgd q=inf``, ``sgd``."""
    return f"{optimizer} q={fmt_number(float(q), 'g')}" if optimizer in LAYERWISE else optimizer


def build_model(n_in: int, hidden: int, n_out: int, *, seed: int = 0,
                dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """F Sec. 5: n_in -> hidden (sigmoid) -> n_out (sigmoid), weights and biases ~ U[-1, 1]
    drawn from a generator seeded with ``seed`` (torch's global generator is not used: the layers
    are allocated by ``torch.nn.utils.skip_init``, without their default initialisation)."""
    g = torch.Generator().manual_seed(int(seed))
    net = nn.Sequential(skip_init(nn.Linear, n_in, hidden), nn.Sigmoid(),
                        skip_init(nn.Linear, hidden, n_out), nn.Sigmoid())
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.rand(p.shape, generator=g, dtype=torch.float64) * 2 - 1)
    return net.to(dtype)


def make_optimizer(name: str, model: nn.Module, q: float, lr: float, *, batch_size: int = 0,
                   seed: int = 0, capture: str = "auto", radius: float = 0.1, certify: str = CERTIFY_MODES[0]):
    """The optimizer called ``name`` (see :data:`OPTIMIZERS`); ``radius`` and ``certify`` are
    certified-gd's R and mode."""
    from .optim import DSGD

    mode = "batch" if batch_size == 0 else "stochastic"
    common = dict(q=q, lr=lr, mode=mode, seed=seed, capture=capture)
    if name == "dsgd":
        return DSGD(model, variant="greedy", **common)
    if name == "dsgd-all":
        return DSGD(model, variant="all", **common)
    if name in ("random", "sequential"):
        return DSGD(model, variant=name, bound_scaling=False, **common)
    if name == "sgd-norm":
        return DSGD(model, variant="all", bound_scaling=False, **common)
    if name in ("sgd", "gd"):
        return torch.optim.SGD(model.parameters(), lr=lr)
    if name in ("gauss-newton", "newton"):
        try:
            from . import optim as _optim
            cls = getattr(_optim, "GaussNewton" if name == "gauss-newton" else "Newton")
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"optimizer {name!r} is not available in this installation "
                             f"(smoothchain.optim.{'GaussNewton' if name == 'gauss-newton' else 'Newton'} "
                             f"is missing)") from exc
        return cls(model, loss="square", gamma=lr)
    if name == "certified-gd":
        from .optim import CertifiedGD

        # The run's objective is F's squared error (1/m) sum ||z_i - y_i||^2, twice the library's
        # "square" loss 1/(2m) sum ||z_i - y_i||^2, which has the RH constants.  CertifiedGD
        # certifies "squared-error" as "square" (with l2 halved) and doubles L_F: every term of
        # RH Prop. 4.2, L_psi l_f + l_psi^2 L_f, scales with the loss (certificate_loss).
        return CertifiedGD(model, loss="squared-error", radius=radius, mode=certify)
    raise ValueError(f"unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZERS)}")


def load_data(spec: str, *, limit: int | None = None, dtype: torch.dtype = torch.float32):
    """``digits``, ``mnist1d`` or a directory holding a supported data set (smoothchain.data)."""
    from .data import load_dataset

    return load_dataset(spec, limit=limit, dtype=dtype)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, z: torch.Tensor, labels: torch.Tensor) -> dict:
    """Objective (F eq. 21), classification error and accuracy (arg max of the outputs)."""
    out = model(x)
    acc = float((out.argmax(dim=1) == labels).to(torch.float64).mean())
    return {"loss": float(squared_error(out, z)), "error": 1.0 - acc, "accuracy": acc}


#: a sigmoid unit within this of 0 or 1 is saturated (its derivative is below 1e-6)
SATURATION_EPS = 1e-6
#: a run whose sigmoid units are saturated in at least this fraction is flagged as diverged
SATURATED_FRACTION = 0.99


def saturated_fraction(model: nn.Module, x: torch.Tensor) -> float:
    """The fraction of the sigmoid units' outputs on ``x`` (all layers, all examples) within
    :data:`SATURATION_EPS` of 0 or 1: where gradient steps no longer move anything."""
    hits, total = 0, 0
    h = x
    with torch.no_grad():
        for layer in model:
            h = layer(h)
            if isinstance(layer, nn.Sigmoid):
                hits += int(((h < SATURATION_EPS) | (h > 1 - SATURATION_EPS)).sum())
                total += h.numel()
    return hits / total if total else 0.0


class TrainingWarning(UserWarning):
    """A run that ended without training: diverged, saturated, or with nothing to do."""


class Progress:
    """A progress bar on stderr (no dependencies): steps done, the rate of this process's steps
    (a resumed run counts from where it resumed) and the time left.

    On a terminal it is one line redrawn at every percent; elsewhere (a log file, CI) it is a
    line every 10 % so that a log stays readable.  ``interactive`` overrides the detection.
    """

    def __init__(self, total: int, label: str = "", enabled: bool = True, width: int = 30,
                 interactive: bool | None = None):
        self.total, self.label, self.enabled, self.width = max(total, 1), label, enabled, width
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        self._last = -1
        self._shown = 0  # length of the line on screen, to blank what a shorter one leaves
        self._t0 = 0.0
        self._start: int | None = None  # the first step count seen (the checkpoint's on resume), and when

    def update(self, done: int, info: str = "") -> None:
        if not self.enabled:
            return
        if self._start is None:
            self._start, self._t0 = done, time.perf_counter()
        frac = min(done / self.total, 1.0)
        tick = int(frac * 100) // (1 if self.interactive else 10)
        if tick == self._last and done != self.total:
            return
        self._last = tick
        n = int(frac * self.width)
        ran, elapsed = done - self._start, time.perf_counter() - self._t0
        speed = ""
        if ran > 0 and elapsed > 0:
            rate = ran / elapsed
            left = (self.total - done) / rate
            speed = f"{rate:.1f} it/s" + (f", {left:.0f} s left " if done < self.total else " ")
        line = f"{self.label} [{'#' * n}{'.' * (self.width - n)}] {done}/{self.total} {speed}{info}"
        if self.interactive:
            sys.stderr.write("\r" + line.ljust(self._shown))
            self._shown = len(line)
        else:
            sys.stderr.write(line + "\n")
        if done >= self.total:
            if self.interactive:
                sys.stderr.write("\n")
            self._last, self._shown = None, 0  # the line is finished
        sys.stderr.flush()

    def close(self) -> None:
        """End an unfinished bar's line, so that what is printed next (an error) starts a line."""
        if self.enabled and self._last is not None and self._last >= 0:
            if self.interactive:  # a log's lines are already finished
                sys.stderr.write("\n")
                sys.stderr.flush()
            self._last = None


def _rewrite_metrics(path: Path, metrics: list[dict]) -> None:
    def w(tmp):
        with open(tmp, "w") as fh:
            for rec in metrics:
                fh.write(json.dumps(rec) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    atomic_write_with(path, w, fixed_tmp=True)


def train(cfg: TrainConfig, *, data=None, progress: bool = True,
          stop_after: int | None = None, dist_ctx=None, metrics_out: dict | None = None) -> dict:
    """Run (or resume) a training run; returns the summary (also written to OUT/summary.json).

    ``data``: an already loaded :class:`smoothchain.data.Dataset` (else ``cfg.data`` is loaded).
    ``stop_after``: stop (without the final checkpoint) after this global step -- a simulated
    kill, for tests.  ``metrics_out``: a dict that receives ``"metrics"`` (the list of records).
    ``dist_ctx``: a :class:`smoothchain.distributed.Context` (else, when ``cfg.distributed``,
    one is made from the environment and closed -- barrier, ``destroy_process_group`` -- at
    the end).
    """
    from .distributed import Context

    own = None
    if dist_ctx is None:
        dist_ctx = own = Context.from_env() if cfg.distributed else Context.single()
    try:
        return _train(cfg, data=data, progress=progress, stop_after=stop_after, ctx=dist_ctx,
                      metrics_out=metrics_out)
    finally:
        if own is not None:
            own.close()


@dataclass
class _Data:
    """A run's data in its dtype: flattened inputs and targets of both splits (and the labels in
    ``ds``), checked against F Assumption 4.1 (ii) for the optimizers that need it."""

    ds: Any
    x_tr: torch.Tensor
    z_tr: torch.Tensor
    x_te: torch.Tensor
    z_te: torch.Tensor


@dataclass
class _Run:
    """What a run carries from step to step -- and what a checkpoint saves and restores."""

    cfg: TrainConfig
    ctx: Any                      # smoothchain.distributed.Context
    model: nn.Module
    opt: Any
    gen: torch.Generator          # the mini-batch sampler's (the only randomness of a run)
    lr: float
    out: Path | None
    start: int = 0                # the last step done (checkpoint's step when resumed)
    metrics: list[dict] = field(default_factory=list)
    counts: list[int] = field(default_factory=lambda: [0, 0])  # updates per layer (K = 2)

    @property
    def is_main(self) -> bool:
        return self.ctx.rank == 0

    @property
    def ckpt_path(self) -> Path | None:
        return self.out / "checkpoint.pt" if self.out else None

    @property
    def metrics_path(self) -> Path | None:
        return self.out / "metrics.jsonl" if self.out else None


def _check_config(cfg: TrainConfig) -> None:
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}; expected one of {', '.join(OPTIMIZERS)}")
    if cfg.steps < 0 or cfg.batch_size < 0 or cfg.checkpoint_every < 1 or cfg.eval_every < 1:
        raise ValueError("steps and batch_size must be >= 0, checkpoint_every and eval_every >= 1")
    if cfg.optimizer == "certified-gd" and not (isinstance(cfg.radius, (int, float)) and 0 < cfg.radius < math.inf):
        raise ValueError(f"certified-gd needs a finite radius > 0, got {cfg.radius!r}")
    if cfg.certify not in CERTIFY_MODES:
        raise ValueError(f"certify must be one of {', '.join(CERTIFY_MODES)}, got {cfg.certify!r}")


def _training_data(cfg: TrainConfig, data, dtype: torch.dtype) -> _Data:
    ds = data if data is not None else load_data(cfg.data, limit=cfg.limit, dtype=dtype)
    x_tr = ds.x_train.reshape(ds.x_train.shape[0], -1).to(dtype)
    z_tr = ds.y_train.to(dtype)
    x_te = ds.x_test.reshape(ds.x_test.shape[0], -1).to(dtype)
    z_te = ds.y_test.to(dtype)
    if cfg.optimizer in BOUNDED:
        x_tr, z_tr, x_te, z_te = _check_assumption_41(x_tr, z_tr, x_te, z_te, cfg)
    n = x_tr.shape[0]
    if cfg.batch_size > n:
        raise ValueError(f"batch_size {cfg.batch_size} exceeds the {n} training examples")
    return _Data(ds, x_tr, z_tr, x_te, z_te)


def _setup(cfg: TrainConfig, ctx, d: _Data, dtype: torch.dtype) -> _Run:
    """Model, optimizer and batch generator of a fresh run, all seeded from ``cfg.seed`` by
    explicit generators (torch's global generator is neither seeded nor used)."""
    if ctx.world_size > 1 and cfg.optimizer in BATCH_CLOSURE:
        raise ValueError(f"{cfg.optimizer} does not support distributed training")
    lr = cfg.resolved_lr()
    model = build_model(d.x_tr.shape[1], cfg.hidden, d.z_tr.shape[1], seed=cfg.seed, dtype=dtype)
    opt = make_optimizer(cfg.optimizer, model, cfg.q, lr, batch_size=cfg.batch_size, seed=cfg.seed,
                         capture="none" if ctx.world_size > 1 else "auto", radius=cfg.radius,
                         certify=cfg.certify)
    batch_seed = cfg.seed + 1  # the mini-batch sampler's own generator
    gen = torch.Generator().manual_seed(batch_seed)
    run = _Run(cfg, ctx, model, opt, gen, lr, Path(cfg.out) if cfg.out else None)
    if run.out and run.is_main:
        run.out.mkdir(parents=True, exist_ok=True)
    return run


#: options a resumed run may change: they alter neither the model nor the optimizer's path
RESUME_MAY_CHANGE = ("steps", "out", "resume", "overwrite", "checkpoint_every", "eval_every", "plots",
                     "distributed")
#: the files that mark a directory as holding a run
RUN_FILES = ("checkpoint.pt", "checkpoint.pt.prev", "metrics.jsonl", "summary.json")


class CheckpointWarning(UserWarning):
    """The latest checkpoint was unusable and the run resumed from the previous one."""


def config_differences(stored: dict, cfg: TrainConfig) -> list[str]:
    """The options of ``cfg`` that differ from a checkpoint's configuration ``stored`` and would
    change the model or the optimizer, as ``--option old -> new`` (``lr`` compared as resolved:
    the default of its optimizer when not given)."""
    diffs = []
    for key, new in asdict(cfg).items():
        if key in RESUME_MAY_CHANGE:
            continue
        old = stored.get(key, "(not stored)")
        if key == "lr":
            old = DEFAULT_LR.get(stored.get("optimizer"), old) if old is None else old
            new = cfg.resolved_lr()
        if old != new:
            diffs.append(f"--{key.replace('_', '-')} {fmt_number(old, 'g') if isinstance(old, float) else old}"
                         f" -> {fmt_number(new, 'g') if isinstance(new, float) else new}")
    return diffs


def _load_checkpoint(run: _Run) -> None:
    """Restore ``run`` from OUT/checkpoint.pt (or the previous checkpoint when the latest is
    unusable, with a :class:`CheckpointWarning`; :mod:`smoothchain.checkpoint`): weights, then
    the optimizer through its ``load_state_dict`` (for DSGD also its weight-norm bounds and
    "random" generator), the batch generator, the step, the metrics and the layer counts.  A
    configuration that differs in an option that changes the model or the optimizer is an error
    listing every such option."""
    from .checkpoint import CheckpointError, checkpoint_files, load_checkpoint

    path, cfg = run.ckpt_path, run.cfg
    if not any(p.exists() for p in checkpoint_files(path)[:2]) and run.metrics_path.exists():
        warnings.warn(f"--resume: {run.out} has no checkpoint yet (the run stopped before its first one): "
                      f"starting again from step 0", CheckpointWarning, stacklevel=2)
        return
    try:
        ck, used, warning = load_checkpoint(path)
    except CheckpointError as exc:
        raise CheckpointError(f"--resume: {exc}; run without --resume to start afresh (--overwrite replaces "
                              f"what --out holds)") from None
    diffs = config_differences(ck["config"], cfg)
    if diffs:
        raise ValueError(f"--resume: {used} was written with other options: {'; '.join(diffs)}; give the "
                         f"checkpoint's options, or --overwrite to start a new run")
    if ck["step"] > cfg.steps:
        raise ValueError(f"--resume: {used} is at step {ck['step']}, beyond --steps {cfg.steps}; give --steps "
                         f">= {ck['step']}")
    if warning:
        warnings.warn(warning, CheckpointWarning, stacklevel=2)
    run.model.load_state_dict(ck["model"])
    run.opt.load_state_dict(ck["optimizer"])
    run.gen.set_state(ck["rng"]["batch"])
    run.start, run.metrics, run.counts = ck["step"], ck["metrics"], ck["counts"]


def _save_checkpoint(run: _Run, step: int) -> None:
    """OUT/checkpoint.pt (rank 0 only), the previous one kept as checkpoint.pt.prev until the
    new one is complete (:func:`smoothchain.checkpoint.save_checkpoint`)."""
    from .checkpoint import save_checkpoint

    if not (run.out and run.is_main):
        return
    ck = {"config": asdict(run.cfg), "model": run.model.state_dict(),
          "optimizer": run.opt.state_dict(), "rng": {"batch": run.gen.get_state()},
          "step": step, "metrics": run.metrics, "counts": run.counts}
    save_checkpoint(run.ckpt_path, ck)


def check_out(cfg: TrainConfig) -> None:
    """Validate ``cfg.out`` before any work: a directory (created with its parents if missing)
    that can be written to, and that holds no run unless ``resume`` (continue it) or
    ``overwrite`` (its run files are removed).  ``ValueError`` naming the path and the fix;
    nothing is written then."""
    if not cfg.out:
        return
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a directory: give a directory (created if missing)")
    held = [name for name in RUN_FILES if (out / name).exists()] if out.is_dir() else []
    if held and cfg.resume and cfg.overwrite:
        raise ValueError("--resume and --overwrite exclude each other: continue the run in --out, or replace it")
    if held and not (cfg.resume or cfg.overwrite):
        raise ValueError(f"--out {out} holds a run ({', '.join(held)}): --resume continues it, --overwrite "
                         f"replaces it, or choose another directory")
    if not out.exists():
        if cfg.resume:
            raise ValueError(f"--resume: no checkpoint in {out} (the directory does not exist)")
        reason = uncreatable(out)
        if reason:
            raise ValueError(f"--out {out}: cannot create it ({reason}); choose another directory")
    elif not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out} is not writable: choose a directory you can write to")


def _clear_run(out: Path) -> None:
    """--overwrite: remove the files of the run ``out`` held (so that no stale checkpoint can be
    resumed later)."""
    from .checkpoint import checkpoint_files

    for path in (*checkpoint_files(out / "checkpoint.pt"), out / "metrics.jsonl", out / "summary.json"):
        if path.exists():
            path.unlink()


def _batch(run: _Run, d: _Data) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The step's batch (the full training set, or a mini-batch drawn with the run's generator)
    -- this rank's shard of it when distributed -- and the weight making the shards' mean
    objectives average to the global batch's."""
    cfg, ctx = run.cfg, run.ctx
    if cfg.batch_size:
        idx = torch.randperm(d.x_tr.shape[0], generator=run.gen)[: cfg.batch_size]
        xb, zb = d.x_tr[idx], d.z_tr[idx]
    else:
        xb, zb = d.x_tr, d.z_tr
    weight = 1.0
    if ctx.world_size > 1:  # each rank its shard of the global batch
        n_global = xb.shape[0]
        xb, zb = ctx.shard(xb), ctx.shard(zb)
        weight = xb.shape[0] * ctx.world_size / n_global  # unequal shards: exact mean
    return xb, zb, weight


def _train_step(run: _Run, xb: torch.Tensor, zb: torch.Tensor, weight: float) -> float:
    """One optimizer step on the batch; returns F's objective (eq. 21) on it before the step."""
    model, opt, ctx = run.model, run.opt, run.ctx
    if run.cfg.optimizer == "certified-gd":
        # its loss is F's objective (eq. 21) itself: the value before the step, in float64
        return float(opt.step(lambda: (xb, zb)))
    if run.cfg.optimizer in ("gauss-newton", "newton"):
        # the same column as the other optimizers: F's objective (eq. 21, no 1/2) on the
        # batch at the weights before the step (the optimizer's own value is 1/(2m) sum)
        with torch.no_grad():
            loss = float(squared_error(model(xb), zb))
        opt.step(lambda: (xb, zb))
        return loss

    def closure():
        opt.zero_grad()
        val = squared_error(model(xb), zb) * weight
        val.backward()
        if ctx.world_size > 1:
            ctx.average_gradients(model)
        return val

    loss = float(opt.step(closure).detach())
    if ctx.world_size > 1:
        loss = ctx.average_scalar(loss)
    return loss


def _record(run: _Run, d: _Data, t: int, loss: float) -> dict:
    """Step t's metrics record (appended to ``run.metrics``): loss, layers updated, cumulative
    counts and, at evaluation steps, training loss / error and test accuracy."""
    cfg, ctx = run.cfg, run.ctx
    layers = list(getattr(run.opt, "last_layers", [])) if cfg.optimizer in LAYERWISE else []
    if ctx.world_size > 1 and layers:
        ctx.check_same(layers)
    for i in layers:
        run.counts[i - 1] += 1
    rec = {"step": t, "loss": loss, "layers": layers, "counts": list(run.counts)}
    if cfg.optimizer == "certified-gd" and run.opt.history:
        h = run.opt.history[-1]  # the step's certificate (smoothchain.optim.CertifiedStep)
        rec["certified"] = {"eta": h.eta, "smoothness": h.smoothness, "ball_eta": json_number(h.ball_eta),
                            "certified_decrease": h.certified_decrease, "actual_decrease": h.actual_decrease}
    if t % cfg.eval_every == 0 or t == cfg.steps or t == 1:
        tr = evaluate(run.model, d.x_tr, d.z_tr, d.ds.labels_train)
        te = evaluate(run.model, d.x_te, d.z_te, d.ds.labels_test)
        rec.update(train_loss=tr["loss"], train_error=tr["error"], test_accuracy=te["accuracy"])
    run.metrics.append(rec)
    return rec


def _finish(run: _Run, d: _Data, final_step: int, *, write: bool = True) -> dict:
    """The run's summary; rank 0 with an OUT directory also writes the figures and summary.json."""
    cfg, metrics, out = run.cfg, run.metrics, run.out
    evals = [m for m in metrics if "train_error" in m]
    divergence = None
    if metrics and not math.isfinite(metrics[-1]["loss"]):
        divergence = "non-finite loss"
    elif metrics:
        frac = saturated_fraction(run.model, d.x_tr)
        if frac >= SATURATED_FRACTION:
            divergence = f"saturated ({100 * frac:.1f}% of the sigmoid units within {SATURATION_EPS:g} of 0 or 1)"
    if divergence and run.is_main:
        hint = "" if cfg.optimizer in ("certified-gd",) else "; a smaller --lr may train"
        warnings.warn(f"the run diverged at step {metrics[-1]['step']}: {divergence}{hint}", TrainingWarning,
                      stacklevel=3)
    summary = {
        "optimizer": cfg.optimizer, "q": json_number(cfg.q), "lr": run.lr,
        "data": getattr(d.ds, "name", cfg.data),
        "hidden": cfg.hidden, "batch_size": cfg.batch_size, "steps": final_step,
        "world_size": run.ctx.world_size,
        **({"radius": cfg.radius, "certify": cfg.certify} if cfg.optimizer == "certified-gd" else {}),
        "final": evals[-1] if evals else None, "counts": run.counts,
        "diverged": divergence is not None, "divergence": divergence,
        **({"full_batch": True} if cfg.optimizer == "sgd" and not cfg.batch_size else {}),
        "out": str(out) if out else None, "figures": [],
    }
    if out and run.is_main and write:
        if cfg.plots and metrics:  # no empty figures for a run without steps
            name = method_name(cfg.optimizer, cfg.q)
            batch = f"batch {cfg.batch_size}" if cfg.batch_size else "full batch"
            summary["figures"] = plot_metrics({name: metrics}, out, layerwise=cfg.optimizer in LAYERWISE,
                                              title=f"{name} on {summary['data']}, {batch}")
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _train(cfg: TrainConfig, *, data, progress: bool, stop_after: int | None, ctx,
           metrics_out: dict | None) -> dict:
    _check_config(cfg)
    check_out(cfg)
    dtype = {"float32": torch.float32, "float64": torch.float64}[cfg.dtype]
    d = _training_data(cfg, data, dtype)
    run = _setup(cfg, ctx, d, dtype)
    if cfg.overwrite and run.out and run.is_main:
        _clear_run(run.out)
    if cfg.resume:
        _load_checkpoint(run)
    if metrics_out is not None:
        metrics_out["metrics"] = run.metrics
    if cfg.steps == 0 or (cfg.resume and run.start >= cfg.steps):
        what = ("--steps 0: nothing to train" if cfg.steps == 0 else
                f"the run in {run.out} already finished at step {run.start}: give --steps > {run.start} to continue")
        if run.is_main:
            warnings.warn(what, TrainingWarning, stacklevel=3)
        return _finish(run, d, run.start, write=False)
    if run.is_main and run.metrics_path:  # the checkpoint's metrics (none for a fresh run)
        _rewrite_metrics(run.metrics_path, run.metrics)
    if cfg.optimizer == "sgd" and not cfg.batch_size and run.is_main:
        warnings.warn("sgd with --batch-size 0 takes full-batch steps (the same as gd); give --batch-size for "
                      "mini-batches", TrainingWarning, stacklevel=3)
    fh = open(run.metrics_path, "a") if (run.metrics_path and run.is_main) else None
    label = f"{cfg.optimizer} q={fmt_number(cfg.q, '')}" if cfg.optimizer in LAYERWISE else cfg.optimizer
    bar = Progress(cfg.steps, label, enabled=progress and run.is_main)
    bar.update(run.start)
    try:
        for t in range(run.start + 1, cfg.steps + 1):
            loss = _train_step(run, *_batch(run, d))
            rec = _record(run, d, t, loss)
            if fh:
                fh.write(json.dumps(rec) + "\n")
                fh.flush()
            if not math.isfinite(loss):
                bar.update(t, "diverged")
                break
            bar.update(t, f"loss {loss:.4g}")
            if stop_after is not None and t >= stop_after:
                return {"stopped_at": t}
            if t % cfg.checkpoint_every == 0:
                _save_checkpoint(run, t)
    finally:
        bar.close()
        if fh:
            fh.close()
    final_step = run.metrics[-1]["step"] if run.metrics else run.start
    _save_checkpoint(run, final_step)
    return _finish(run, d, final_step)


def plot_metrics(runs: dict[str, list[dict]], out: Path, *, layerwise: bool = True,
                 prefix: str = "", title: str = "") -> list[str]:
    """training_error.png, test_accuracy.png and (layer-wise runs) layer_updates.png.

    ``runs`` maps a method's name (as the report or summary writes it) to its metrics.  Each
    figure has a title (``title``, then what it shows); rates are drawn in percent on a fixed
    0-100 % axis, so a run at chance stays a flat line instead of its noise filling the figure;
    the legend sits below the axes.
    """
    files = []
    for key, what, fname in (("train_error", "training error", "training_error.png"),
                             ("test_accuracy", "test accuracy", "test_accuracy.png")):
        fig = new_figure(figsize=(5.5, 4.2))
        ax = fig.subplots()
        for label, ms in runs.items():
            pts = [(m["step"], 100 * m[key]) for m in ms if key in m]
            if pts:
                ax.plot(*zip(*pts), label=label)
        ax.set_ylim(0, 100)
        ax.set_xlabel("step")
        ax.set_ylabel(f"{what} (%)")
        ax.grid(alpha=0.3)
        ax.set_title(f"{title}: {what}" if title else what, fontsize=10)
        legend_below(fig, *ax.get_legend_handles_labels())
        files.append(str(save_figure(fig, out / (prefix + fname), dpi=90)))
    if layerwise:
        fig = new_figure(figsize=(5.5, 4.2))
        ax = fig.subplots()
        for k, (label, ms) in enumerate(runs.items()):
            if not ms or not ms[0].get("counts"):
                continue
            steps = [m["step"] for m in ms]
            styles = ("-", "--", ":", "-.")
            for i in range(len(ms[0]["counts"])):
                # one run: a colour per layer; several: a colour per method, a line style per layer
                style, colour = ("-", f"C{i}") if len(runs) == 1 else (styles[i % len(styles)], f"C{k}")
                ax.plot(steps, [m["counts"][i] for m in ms], style, color=colour, label=f"{label}, layer {i + 1}")
        ax.set_xlabel("step")
        ax.set_ylabel("cumulative updates of the layer")
        ax.grid(alpha=0.3)
        ax.set_title(f"{title}: layer updates" if title else "layer updates", fontsize=10)
        legend_below(fig, *ax.get_legend_handles_labels(), ncol=2)
        files.append(str(save_figure(fig, out / (prefix + "layer_updates.png"), dpi=90)))
    return files

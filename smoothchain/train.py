"""Training runs for the DSGD study (F Sec. 5): models, optimizers, metrics, checkpoints, plots.

``train(TrainConfig(...))`` trains F Sec. 5's network (one hidden layer of sigmoid units, sigmoid
outputs, uniform [-1, 1] initialisation) on the objective of F eqs. (21)-(22) (batch mean of the
squared Euclidean error against one-hot targets, no 1/2) with one of

* ``dsgd`` (F Algo. 4.1, greedy, lr = 1 is the theory), ``dsgd-all`` (F Sec. 5.2's DSGD_ALL),
  ``random`` / ``sequential`` (F Sec. 5.1's layer-wise baselines, tuned step, no p_i scaling),
  ``sgd-norm`` (F Sec. 5.2's SGD with q-norm duality updates in every layer);
* ``sgd`` (mini-batch ``torch.optim.SGD``), ``gd`` (full-batch ``torch.optim.SGD``);
* ``gauss-newton`` / ``newton`` (``smoothchain.optim.GaussNewton`` / ``Newton``, imported lazily;
  their ``step(closure)`` takes a closure returning the batch ``(x, y)``).

``batch_size = 0`` means full batch (F's batch mode).  Every step appends one JSON line to
``OUT/metrics.jsonl``: ``step``, ``loss`` (the step's batch objective before the step), ``layers``
(layers updated, 1-based, for layer-wise optimizers), ``counts`` (cumulative updates per layer);
evaluation steps add ``train_loss``, ``train_error``, ``test_accuracy``.  Checkpoints
(``OUT/checkpoint.pt``: model, optimizer, RNG states, step, the metrics so far) are written
atomically (temporary file + ``os.replace``) every ``checkpoint_every`` steps and at the end;
``resume=True`` restarts from it and first rewrites ``metrics.jsonl`` from the checkpoint's
metrics, so a run killed at any moment continues with no metric lost or duplicated.  The end of
a run writes ``training_error.png``, ``test_accuracy.png`` and ``layer_updates.png``
(F Figs. 2-4 and 3/6) and ``summary.json``.

Distributed (``distributed=True`` or under ``torchrun``): see :mod:`smoothchain.distributed`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

__all__ = ["TrainConfig", "train", "build_model", "make_optimizer", "evaluate", "objective",
           "OPTIMIZERS", "LAYERWISE", "plot_metrics", "load_data", "Progress"]

OPTIMIZERS = ("dsgd", "dsgd-all", "random", "sequential", "sgd-norm", "sgd", "gd",
              "gauss-newton", "newton")
LAYERWISE = ("dsgd", "dsgd-all", "random", "sequential", "sgd-norm")
#: optimizers whose steps divide by p_i(w), valid under F Assumption 4.1 (ii) only
BOUNDED = ("dsgd", "dsgd-all")
DEFAULT_LR = {"dsgd": 1.0, "dsgd-all": 1.0, "random": 0.1, "sequential": 0.1, "sgd-norm": 0.1,
              "sgd": 0.1, "gd": 0.1, "gauss-newton": 1.0, "newton": 1.0}


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


def objective(out: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """F eqs. (21)-(22): batch mean of ||out - z||_2^2 (no 1/2)."""
    return (out - z).pow(2).reshape(out.shape[0], -1).sum(dim=1).mean()


def build_model(n_in: int, hidden: int, n_out: int, *, seed: int = 0,
                dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """F Sec. 5: n_in -> hidden (sigmoid) -> n_out (sigmoid), weights and biases ~ U[-1, 1]."""
    g = torch.Generator().manual_seed(int(seed))
    net = nn.Sequential(nn.Linear(n_in, hidden), nn.Sigmoid(), nn.Linear(hidden, n_out), nn.Sigmoid())
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.rand(p.shape, generator=g, dtype=torch.float64) * 2 - 1)
    return net.to(dtype)


def make_optimizer(name: str, model: nn.Module, q: float, lr: float, *, batch_size: int = 0,
                   seed: int = 0, capture: str = "auto"):
    """The optimizer called ``name`` (see :data:`OPTIMIZERS`)."""
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
    return {"loss": float(objective(out, z)), "error": 1.0 - acc, "accuracy": acc}


class Progress:
    """A one-line progress bar on stderr (no dependencies)."""

    def __init__(self, total: int, label: str = "", enabled: bool = True, width: int = 30):
        self.total, self.label, self.enabled, self.width = max(total, 1), label, enabled, width
        self._last = -1
        self._t0 = time.perf_counter()

    def update(self, done: int, info: str = "") -> None:
        if not self.enabled:
            return
        frac = min(done / self.total, 1.0)
        tick = int(frac * 100)
        if tick == self._last and done != self.total:
            return
        self._last = tick
        n = int(frac * self.width)
        rate = done / max(time.perf_counter() - self._t0, 1e-9)
        sys.stderr.write(f"\r{self.label} [{'#' * n}{'.' * (self.width - n)}] {done}/{self.total} "
                         f"{rate:.1f} it/s {info}")
        if done >= self.total:
            sys.stderr.write("\n")
            self._last = None  # the line is finished
        sys.stderr.flush()

    def close(self) -> None:
        """End an unfinished bar's line, so that what is printed next (an error) starts a line."""
        if self.enabled and self._last is not None and self._last >= 0:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self._last = None


def _atomic_write_bytes(path: Path, writer: Callable[[str], None]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    writer(str(tmp))
    os.replace(tmp, path)


def _rewrite_metrics(path: Path, metrics: list[dict]) -> None:
    def w(tmp):
        with open(tmp, "w") as fh:
            for rec in metrics:
                fh.write(json.dumps(rec) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    _atomic_write_bytes(path, w)


def _rng_state(gen: torch.Generator) -> dict:
    return {"batch": gen.get_state(), "torch": torch.get_rng_state()}


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


def _train(cfg: TrainConfig, *, data, progress: bool, stop_after: int | None, ctx,
           metrics_out: dict | None) -> dict:
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}; expected one of {', '.join(OPTIMIZERS)}")
    if cfg.steps < 0 or cfg.batch_size < 0 or cfg.checkpoint_every < 1 or cfg.eval_every < 1:
        raise ValueError("steps and batch_size must be >= 0, checkpoint_every and eval_every >= 1")
    dtype = {"float32": torch.float32, "float64": torch.float64}[cfg.dtype]
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
    if ctx.world_size > 1:
        if cfg.optimizer in ("gauss-newton", "newton"):
            raise ValueError(f"{cfg.optimizer} does not support distributed training")
    lr = cfg.resolved_lr()
    torch.manual_seed(cfg.seed)
    model = build_model(x_tr.shape[1], cfg.hidden, z_tr.shape[1], seed=cfg.seed, dtype=dtype)
    opt = make_optimizer(cfg.optimizer, model, cfg.q, lr, batch_size=cfg.batch_size, seed=cfg.seed,
                         capture="none" if ctx.world_size > 1 else "auto")
    K = 2
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    out = Path(cfg.out) if cfg.out else None
    is_main = ctx.rank == 0
    metrics: list[dict] = []
    counts = [0] * K
    start = 0
    ckpt_path = out / "checkpoint.pt" if out else None
    metrics_path = out / "metrics.jsonl" if out else None
    if out and is_main:
        out.mkdir(parents=True, exist_ok=True)
    if cfg.resume:
        if not ckpt_path or not ckpt_path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
        ck = torch.load(ckpt_path, weights_only=False)
        if ck["config"]["optimizer"] != cfg.optimizer or ck["config"]["q"] != cfg.q:
            raise ValueError(f"--resume: checkpoint {ckpt_path} is for optimizer "
                             f"{ck['config']['optimizer']} q={ck['config']['q']}")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        if "dsgd_gen" in ck and getattr(opt, "_gen", None) is not None:
            opt._gen.set_state(ck["dsgd_gen"])
        gen.set_state(ck["rng"]["batch"])
        torch.set_rng_state(ck["rng"]["torch"])
        start, metrics, counts = ck["step"], ck["metrics"], ck["counts"]
        if is_main and metrics_path:
            _rewrite_metrics(metrics_path, metrics)
    elif out and is_main and metrics_path:
        _rewrite_metrics(metrics_path, [])

    def save_checkpoint(step: int) -> None:
        if not (out and is_main):
            return
        ck = {"config": asdict(cfg), "model": model.state_dict(), "optimizer": opt.state_dict(),
              "rng": _rng_state(gen), "step": step, "metrics": metrics, "counts": counts}
        if getattr(opt, "_gen", None) is not None:
            ck["dsgd_gen"] = opt._gen.get_state()
        _atomic_write_bytes(ckpt_path, lambda tmp: torch.save(ck, tmp))

    if metrics_out is not None:
        metrics_out["metrics"] = metrics
    fh = open(metrics_path, "a") if (metrics_path and is_main) else None
    label = f"{cfg.optimizer} q={_qs(cfg.q)}" if cfg.optimizer in LAYERWISE else cfg.optimizer
    bar = Progress(cfg.steps, label, enabled=progress and is_main)
    bar.update(start)
    newton = cfg.optimizer in ("gauss-newton", "newton")
    try:
        for t in range(start + 1, cfg.steps + 1):
            if cfg.batch_size:
                idx = torch.randperm(n, generator=gen)[: cfg.batch_size]
            else:
                idx = None
            xb = x_tr if idx is None else x_tr[idx]
            zb = z_tr if idx is None else z_tr[idx]
            weight = 1.0
            if ctx.world_size > 1:  # each rank its shard of the global batch
                n_global = xb.shape[0]
                xb, zb = ctx.shard(xb), ctx.shard(zb)
                weight = xb.shape[0] * ctx.world_size / n_global  # unequal shards: exact mean
            if newton:
                # the same column as the other optimizers: F's objective (eq. 21, no 1/2) on the
                # batch at the weights before the step (the optimizer's own value is 1/(2m) sum)
                with torch.no_grad():
                    loss = float(objective(model(xb), zb))
                opt.step(lambda xb=xb, zb=zb: (xb, zb))
            else:
                def closure(xb=xb, zb=zb, weight=weight):
                    opt.zero_grad()
                    val = objective(model(xb), zb) * weight
                    val.backward()
                    if ctx.world_size > 1:
                        ctx.average_gradients(model)
                    return val

                loss = float(opt.step(closure).detach())
                if ctx.world_size > 1:
                    loss = ctx.average_scalar(loss)
            layers = list(getattr(opt, "last_layers", [])) if cfg.optimizer in LAYERWISE else []
            if ctx.world_size > 1 and layers:
                ctx.check_same(layers)
            for i in layers:
                counts[i - 1] += 1
            rec = {"step": t, "loss": loss, "layers": layers, "counts": list(counts)}
            if t % cfg.eval_every == 0 or t == cfg.steps or t == 1:
                tr = evaluate(model, x_tr, z_tr, ds.labels_train)
                te = evaluate(model, x_te, z_te, ds.labels_test)
                rec.update(train_loss=tr["loss"], train_error=tr["error"],
                           test_accuracy=te["accuracy"])
            metrics.append(rec)
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
                save_checkpoint(t)
    finally:
        bar.close()
        if fh:
            fh.close()
    final_step = metrics[-1]["step"] if metrics else start
    save_checkpoint(final_step)
    evals = [m for m in metrics if "train_error" in m]
    summary = {
        "optimizer": cfg.optimizer, "q": _qs(cfg.q), "lr": lr, "data": getattr(ds, "name", cfg.data),
        "hidden": cfg.hidden, "batch_size": cfg.batch_size, "steps": final_step,
        "world_size": ctx.world_size,
        "final": evals[-1] if evals else None, "counts": counts,
        "diverged": bool(metrics and not math.isfinite(metrics[-1]["loss"])),
        "out": str(out) if out else None, "figures": [],
    }
    if out and is_main:
        if cfg.plots:
            summary["figures"] = plot_metrics({cfg.optimizer: metrics}, out, layerwise=cfg.optimizer in LAYERWISE)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _qs(q) -> str | float:
    return "inf" if q == math.inf else q


def plot_metrics(runs: dict[str, list[dict]], out: Path, *, layerwise: bool = True,
                 prefix: str = "") -> list[str]:
    """training_error.png, test_accuracy.png and (layer-wise runs) layer_updates.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for key, ylabel, fname in (("train_error", "training error", "training_error.png"),
                               ("test_accuracy", "test accuracy", "test_accuracy.png")):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for label, ms in runs.items():
            pts = [(m["step"], m[key]) for m in ms if key in m]
            if pts:
                ax.plot(*zip(*pts), label=label)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7, loc="upper right")
        fig.tight_layout()
        path = out / (prefix + fname)
        fig.savefig(path, dpi=90)
        plt.close(fig)
        files.append(str(path))
    if layerwise:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for label, ms in runs.items():
            if not ms or not ms[0].get("counts"):
                continue
            steps = [m["step"] for m in ms]
            for i in range(len(ms[0]["counts"])):
                ax.plot(steps, [m["counts"][i] for m in ms], label=f"{label} layer {i + 1}")
        ax.set_xlabel("step")
        ax.set_ylabel("cumulative updates")
        ax.legend(fontsize=7, loc="upper right")
        fig.tight_layout()
        path = out / (prefix + "layer_updates.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        files.append(str(path))
    return files

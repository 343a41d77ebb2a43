"""Check a certificate against the network: estimates on C that must never exceed the bounds.

For a chain-like ``nn.Module``, :func:`check` certifies it (RH Prop. 4.4 / Cor. 4.5, Prop. 4.2),
then draws points w in C = {||v_l - v*_l|| <= R} -- v_l the parameters of RH layer l -- and
runs projected gradient ascent within C on each estimate, computing with
:mod:`smoothchain.estimators`

* ||psi(w)|| (vs m), ||grad psi(w)||_op (vs l), ||grad^2 psi(w)||_{2,2,2} (vs L) for every
  prefix psi_l of the chain that ends at a module boundary (the per-layer table), and
* the objective's top |Hessian eigenvalue| (vs L_F, RH Prop. 4.2), also after ascent on the
  curvature along the top eigenvector.

Every estimate is a value attained at some point of C, hence a lower bound of the supremum the
certificate bounds: an estimate above its bound (beyond ``tolerance``) is a violation.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import grad, jvp

from .certificate import Certificate, certify
from .chain import Chain, ChainError
from .components import layer_spans
from .estimators import (
    ESTIMATOR_LOSSES,
    flat_parameters,
    functional_chain,
    hessian_top_eig,
    jacobian_norm,
    objective,
    output_norm,
    second_derivative_norm,
)
from .spec import json_number
from .torch_chain import components_from_module, leaf_modules, module_layers

__all__ = ["CheckResult", "LayerCheck", "check", "layer_blocks"]

QUANTITIES = ("output_bound", "lipschitz", "smoothness")


@dataclass(frozen=True)
class LayerCheck:
    """Certified vs estimated m_l, l_l, L_l for the prefix ending at RH layer ``index`` (for a
    graph: at node ``index`` in topological order, a layer or a merge, ``kind`` saying which)."""

    index: int
    name: str
    certified: dict[str, float]
    estimated: dict[str, float | None]
    kind: str = ""  # the type of the module that ends the layer, e.g. "Conv2d"

    @property
    def label(self) -> str:
        """``name``, with the module type where the name is only an index (``3.0 Conv2d``)."""
        bare = self.name.replace(".", "").isdigit()
        return f"{self.name} {self.kind}" if bare and self.kind else self.name

    def ratios(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for k in QUANTITIES:
            est, cert = self.estimated.get(k), self.certified[k]
            out[k] = None if est is None or cert == 0 or math.isinf(cert) else est / cert
        return out


@dataclass(frozen=True)
class CheckResult:
    """The certificate, the estimates found on C (None where the budget ran out first), violations."""

    certificate: Certificate
    certified: dict[str, float]
    estimated: dict[str, float | None]
    layers: tuple[LayerCheck, ...]
    violations: tuple[dict[str, Any], ...]
    tolerance: float
    points: int
    ascent_steps: int
    where: dict[str, str] = field(default_factory=dict)
    budget: float | None = None
    elapsed: float = 0.0
    stopped: str | None = None  # why the search stopped early (the budget), None when complete

    def to_dict(self) -> dict[str, Any]:
        return {
            "certified": {k: json_number(v) for k, v in self.certified.items()},
            "estimated": {k: (None if v is None else json_number(v)) for k, v in self.estimated.items()},
            "violations": list(self.violations),
            "layers": [
                {
                    "index": r.index,
                    "name": r.name,
                    "kind": r.kind,
                    "certified": {k: json_number(v) for k, v in r.certified.items()},
                    "estimated": {k: (None if v is None else json_number(v)) for k, v in r.estimated.items()},
                    "ratio": {k: (None if v is None else json_number(v)) for k, v in r.ratios().items()},
                }
                for r in self.layers
            ],
            "where": dict(self.where),
            "elapsed_s": self.elapsed,
            "stopped": self.stopped,
            "settings": {"tolerance": self.tolerance, "points": self.points, "ascent_steps": self.ascent_steps,
                         "budget_s": self.budget, **self.certificate.to_dict()["settings"]},
        }


def layer_blocks(model: nn.Module, input_shape: Sequence[int]) -> tuple[list[slice], list[int]]:
    """Flat-vector slices of each RH layer's parameters (``flat_parameters`` order).

    The layers are those of the component chain (:func:`~smoothchain.components.layer_spans` of
    :func:`~smoothchain.torch_chain.components_from_module`); a layer opened by a bi-affine
    component owns the parameters of that component's module
    (:func:`~smoothchain.torch_chain.module_layers`).  Also returns, for each RH layer, the number
    of leading leaf modules that end it (or -1 when the layer ends inside a module, e.g. batch
    norm followed by its affine part).
    """
    mc = components_from_module(model, input_shape)
    leaf_of = mc.leaf_index  # component i comes from leaf leaf_of[i]
    spans = layer_spans(mc.components)
    offsets, pos = {}, 0
    for _, p in model.named_parameters():
        offsets[id(p)] = (pos, pos + p.numel())
        pos += p.numel()
    owned = {group.positions[0]: group for group in module_layers(model).layers}
    blocks: list[slice] = []
    ends: list[int] = []
    for k, span in enumerate(spans):
        start = span.start
        if mc.components[start].role == "bilinear" and leaf_of[start] in owned:
            spans_p = sorted(offsets[id(p)] for _, p in owned.pop(leaf_of[start]).params)
            lo, hi = spans_p[0][0], spans_p[-1][1]
            if sum(b - a for a, b in spans_p) != hi - lo:
                raise ChainError(f"parameters of {mc.names[start]!r} are not contiguous in named_parameters order")
            blocks.append(slice(lo, hi))
        else:
            blocks.append(slice(0, 0))
        last_leaf = leaf_of[span.stop - 1]
        same_leaf_next = span.stop < len(mc.components) and leaf_of[span.stop] == last_leaf
        ends.append(-1 if same_leaf_next else last_leaf + 1)
    if owned:
        names = ", ".join(repr(g.modules[0][0]) for g in owned.values())
        raise ChainError(f"the parameters of {names} belong to no bi-affine layer; cannot sample C")
    return blocks, ends


def _project(w: Tensor, centre: Tensor, blocks: Sequence[slice], radius: float) -> Tensor:
    out = w.clone()
    for b in blocks:
        d = out[b] - centre[b]
        n = float(d.norm())
        if n > radius:
            out[b] = centre[b] + d * (radius / n)
    return out


def _random_point(centre: Tensor, blocks: Sequence[slice], radius: float, gen: torch.Generator, boundary: bool) -> Tensor:
    w = centre.clone()
    for b in blocks:
        if b.stop == b.start:
            continue
        d = torch.randn(b.stop - b.start, generator=gen, dtype=w.dtype)
        r = radius if boundary else radius * float(torch.rand((), generator=gen, dtype=w.dtype))
        w[b] = centre[b] + d * (r / float(d.norm()))
    return w


def _ascent(value_fn: Callable[[Tensor], Tensor], w: Tensor, centre: Tensor, blocks, radius: float, steps: int,
            deadline: float | None = None) -> Tensor:
    """Projected gradient ascent on a scalar, block-normalised steps of radius/4, halved on failure.

    Stops early at ``deadline`` (a ``time.monotonic()`` value): every iterate lies in C, so an
    estimate at the point reached is still a lower bound of the supremum.
    """
    step = radius / 4
    g_fn = grad(value_fn)
    cur = float(value_fn(w))
    for _ in range(steps):
        if deadline is not None and time.monotonic() >= deadline:
            break
        g = g_fn(w)
        d = torch.zeros_like(w)
        for b in blocks:
            n = float(g[b].norm())
            if n > 0:
                d[b] = g[b] / n
        cand = _project(w + step * d, centre, blocks, radius)
        val = float(value_fn(cand))
        if val > cur:
            w, cur = cand, val
        else:
            step /= 2
            if step < radius * 1e-4:
                break
    return w


@dataclass(frozen=True)
class _Search:
    """What every estimate at a point shares: the set C, the ascent and iteration budgets."""

    centre: Tensor
    blocks: Sequence[slice]
    radius: float
    ascent_steps: int
    iters: int
    seed: int
    deadline: float | None

    def ascent(self, value_fn, w: Tensor, steps: int | None = None) -> Tensor:
        return _ascent(value_fn, w, self.centre, self.blocks, self.radius,
                       self.ascent_steps if steps is None else steps, self.deadline)


def _chain_at_point(psi, i: int, w: Tensor, s: _Search) -> dict[str, tuple[float, str]]:
    """||psi||, ||grad psi||, ||grad^2 psi|| at point ``i`` of C and after ascent from it, and where."""
    out: dict[str, tuple[float, str]] = {}
    here, there = f"point {i}", f"ascent from point {i}"
    cands = [(output_norm(psi, w).value, here)]
    if s.ascent_steps:
        cands.append((output_norm(psi, s.ascent(lambda u: psi(u).pow(2).sum(), w)).value, there))
    out["output_bound"] = max(cands, key=lambda c: c[0])
    # Lipschitz: power iteration, then ascent on ||J(w) v|| along the top right vector v
    est = jacobian_norm(psi, w, iters=s.iters, seed=s.seed + i)
    cands = [(est.value, here)]
    if s.ascent_steps and est.vectors:
        v = est.vectors[0]
        wa = s.ascent(lambda u: jvp(psi, (u,), (v,))[1].pow(2).sum(), w)
        cands.append((jacobian_norm(psi, wa, iters=s.iters, seed=s.seed + i).value, there))
    out["lipschitz"] = max(cands, key=lambda c: c[0])
    est = second_derivative_norm(psi, w, iters=s.iters, seed=s.seed + i, restarts=2)
    cands = [(est.value, here)]
    if s.ascent_steps and len(est.vectors) == 3:
        u, v, z = est.vectors

        def t_uvz(x, u=u, v=v, z=z):
            return jvp(lambda y: jvp(psi, (y,), (v,))[1], (x,), (u,))[1].dot(z)

        wa = s.ascent(t_uvz, w, max(1, s.ascent_steps // 2))
        cands.append((second_derivative_norm(psi, wa, iters=s.iters, seed=s.seed + i, restarts=2).value, there))
    out["smoothness"] = max(cands, key=lambda c: c[0])
    return out


def _objective_at_point(F, i: int, w: Tensor, s: _Search) -> dict[str, tuple[float, str]]:
    """The top |Hessian eigenvalue| of F at point ``i`` of C and after ascent from it, and where."""
    est = hessian_top_eig(F, w, method="lanczos", iters=s.iters, seed=s.seed + i)
    cands = [(est.value, f"point {i}")]
    if s.ascent_steps and est.vectors:
        # ascent on the curvature along the top eigenvector, v^T grad^2 F(w) v (its sign makes it
        # increase |v^T H v|), then a fresh Lanczos where it ends
        (v,) = est.vectors
        sign = 1.0 if float(v.dot(jvp(grad(F), (w,), (v,))[1])) >= 0 else -1.0

        def curvature(u, v=v, sign=sign):
            return sign * jvp(grad(F), (u,), (v,))[1].dot(v)

        wa = s.ascent(curvature, w, max(1, s.ascent_steps // 2))
        # warm start: the top eigenvector at the start of the ascent is close to the one at its end
        cands.append((hessian_top_eig(F, wa, method="lanczos", iters=s.iters, start=v).value,
                      f"ascent from point {i}"))
    return {"objective_smoothness": max(cands, key=lambda c: c[0])}


class _Clock:
    """Elapsed time and an estimate of the time left for ``units`` = points x targets of work.

    A unit's cost is its target's mean measured time; a target not yet measured (the first
    point) costs the largest measured so far, so the first estimates err on the long side.
    """

    def __init__(self, points: int, targets: int, start: float):
        self.start = start
        self.points, self.targets = points, targets
        self.spent: dict[int, list[float]] = {}

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def record(self, target: int, seconds: float) -> None:
        self.spent.setdefault(target, []).append(seconds)

    def left(self, point: int, target: int) -> float | None:
        """Seconds left before unit (``point``, ``target``) starts, both 0-based; None before any."""
        means = {t: sum(v) / len(v) for t, v in self.spent.items()}
        if not means:
            return None
        default = max(means.values())  # pessimistic for targets not yet timed (the first point)
        per_point = sum(means.get(t, default) for t in range(self.targets))
        this_point = sum(means.get(t, default) for t in range(target, self.targets))
        return this_point + (self.points - point - 1) * per_point


def _seconds(x: float) -> str:
    return f"{x:.0f} s" if x >= 10 else f"{x:.1f} s"


def check(
    model: nn.Module,
    *,
    # the certificate's settings (those of certify(), with a batch of 2 by default)
    input_shape: Sequence[int], batch_size: int = 2, radius: float = 1.0, input_norm: float = 1.0,
    loss: str = "cross-entropy", mode: str = "paper", l2: float = 0.0, around_weights: bool = False,
    target_norm: float = 1.0,
    # the search for estimates
    points: int = 3, ascent_steps: int = 8, iters: int = 60, tolerance: float = 1e-6, seed: int = 0,
    per_layer: bool = True, budget: float | None = None, progress: Callable[[str], None] | None = None,
) -> CheckResult:
    """Certify ``model`` and compare with estimates at ``points`` random points of C plus ascent.

    The input batch has ``batch_size`` Gaussian examples scaled to ||x|| = ``input_norm``;
    labels are random classes (cross-entropy) or random targets of norm ``target_norm``
    (square).  Estimates use float64.  ``tolerance`` is relative: a violation is an estimate
    above ``certified * (1 + tolerance)``.

    The search goes point by point; at each point it estimates the objective's smoothness, the
    whole chain, then every prefix.  ``budget`` (seconds) stops it when spent -- between two
    estimates, or inside an ascent -- and the result holds what was found (``stopped`` says
    where; a quantity never reached is None).  Fewer estimates are still lower bounds, so the
    comparison stays sound.  ``progress`` receives one line per estimate with the time elapsed
    and an estimate of the time left.
    """
    say = progress or (lambda s: None)
    started = time.monotonic()
    if loss not in ESTIMATOR_LOSSES:
        raise ChainError(f"check supports the losses {', '.join(ESTIMATOR_LOSSES)}, got {loss!r}")
    if points < 1:
        raise ChainError(f"--points must be >= 1, got {points}")
    if budget is not None and not budget > 0:
        raise ChainError(f"--budget must be a positive number of seconds, got {budget}")
    if mode == "local" and not around_weights:
        raise ChainError("local constants are certified around the weights: add --around-weights")
    if mode != "local":
        cert = certify(
            model, input_shape=input_shape, batch_size=batch_size, radius=radius, input_norm=input_norm, loss=loss,
            mode=mode, l2=l2, around_weights=around_weights, target_norm=target_norm,
        )
    model = copy.deepcopy(model).double()  # estimates in float64; the user's model is untouched
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((batch_size,) + tuple(input_shape), generator=gen, dtype=torch.float64)
    x = x * (input_norm / float(x.norm())) if float(x.norm()) > 0 else x
    if mode == "local":
        from .components import UnsupportedModuleError

        try:
            leaf_modules(model)
        except UnsupportedModuleError as err:
            if getattr(err, "module_name", "") != "<root>":
                raise
            raise ChainError(f"local constants (docs/local.md) are certified for chains; {type(model).__name__} "
                             "has skip connections (docs/graphs.md): use --constants paper or tight") from None
    graph = mode != "local" and not isinstance(cert.chain, Chain)
    blocks, prefixes = _prefixes(model, input_shape, x, graph=graph)
    w_star = flat_parameters(model)
    centre = w_star if around_weights else torch.zeros_like(w_star)
    pts = [_random_point(centre, blocks, radius, gen, boundary=(i % 2 == 0)) for i in range(points)]
    y = _random_targets(model, x, loss, target_norm, gen)
    if mode == "local":  # the certificate of this very batch (smoothchain.local)
        from .local import certify_local

        cert = certify_local(model, x, y, loss=loss, radius=radius, l2=l2)
    # the table: a chain's layers (RH Prop. 4.4), or a graph's nodes in topological order
    table = list(cert.bounds.nodes[1:]) if graph else list(cert.bounds.layers)

    # what is estimated at every point: the objective, the whole network, then each prefix psi_l
    # whose value some module or operation computes (a layer ending inside a module, e.g. batch
    # norm before its affine part, has none and stays unestimated)
    n_rows = len(table)
    if len(prefixes) != n_rows:  # pragma: no cover - the readers and the certificate agree
        raise ChainError(f"{len(prefixes)} prefixes for {n_rows} certified rows")
    F = objective(model, x, y, loss=loss, l2=l2)
    targets: list[tuple[str, int | None, Callable]] = [("objective smoothness", None, partial(_objective_at_point, F))]
    modules = dict(model.named_modules())
    kinds = [row.kind if getattr(row, "kind", "layer") not in ("layer", "input") else _kind(modules, row.name)
             for row in table]
    for li in [n_rows - 1] + list(range(n_rows - 1)):
        row, psi, kind = table[li], prefixes[li], kinds[li]
        if psi is None or not (per_layer or li == n_rows - 1):
            continue
        label = LayerCheck(row.index, row.name, {}, {}, kind).label
        targets.append((f"{'node' if graph else 'layer'} {row.index}/{n_rows} ({label})", li,
                        partial(_chain_at_point, psi)))
    clock = _Clock(points, len(targets), started)
    deadline = None if budget is None else clock.start + budget
    search = _Search(centre, blocks, radius, ascent_steps, iters, seed, deadline)
    best: dict[int | None, dict[str, tuple[float, str]]] = {}
    stopped = None
    for i, w in enumerate(pts):
        for t, (label, li, run) in enumerate(targets):
            if deadline is not None and time.monotonic() >= deadline:
                stopped = f"budget of {_seconds(budget)} spent at point {i + 1}/{points}, before {label}"
                break
            left = clock.left(i, t)
            say(f"check: point {i + 1}/{points}, {label}: {_seconds(clock.elapsed())} elapsed, "
                + ("estimating time left" if left is None else f"about {_seconds(left)} left"))
            t0 = time.monotonic()
            found = run(i, w, search)
            clock.record(t, time.monotonic() - t0)
            mine = best.setdefault(li, {})
            for k, (val, where_found) in found.items():
                if k not in mine or val > mine[k][0]:
                    mine[k] = (val, where_found)
        if stopped:
            break
    if stopped:
        say(f"check: {stopped}; reporting what was found")

    say(f"check: {'stopped' if stopped else 'done'} after {_seconds(clock.elapsed())}")
    rows = []
    for li, row in enumerate(table):
        got = best.get(li, {})
        rows.append(LayerCheck(row.index, row.name, {k: getattr(row, k) for k in QUANTITIES},
                               {k: got[k][0] if k in got else None for k in QUANTITIES}, kinds[li]))
    full, obj = best.get(n_rows - 1, {}), best.get(None, {})
    certified = {k: getattr(cert.bounds, k) for k in QUANTITIES}
    certified["objective_smoothness"] = cert.objective.smoothness
    estimated = {k: full[k][0] if k in full else None for k in QUANTITIES}
    estimated["objective_smoothness"] = obj["objective_smoothness"][0] if obj else None
    where = {k: v[1] for k, v in {**full, **obj}.items()}
    violations = _violations(rows, certified["objective_smoothness"], estimated["objective_smoothness"], tolerance)
    return CheckResult(cert, certified, estimated, tuple(rows), tuple(violations), tolerance, points, ascent_steps,
                       where, budget=budget, elapsed=clock.elapsed(), stopped=stopped)


def _prefixes(model: nn.Module, input_shape, x: Tensor, *, graph: bool):
    """The balls' slices of the flat weights (``flat_parameters`` order) and, per row of the
    table -- a chain's layers, a graph's nodes after the input -- its value psi as a function of
    the flat weights (None where no module or operation computes it, or it depends on no
    weight)."""
    if not graph:
        blocks, ends = layer_blocks(model, input_shape)
        leaves = leaf_modules(model)
        out = []
        for li, end in enumerate(ends):
            prefix = model if li == len(ends) - 1 else nn.Sequential(*[m for _, m in leaves[:end]])
            out.append(None if end < 0 else _prefix_map(model, prefix, x))
        return blocks, out
    from .torch_graph import graph_from_module, prefix_module

    mg = graph_from_module(model, tuple(input_shape), int(x.shape[0]))
    offsets, pos = {}, 0
    for name, p in model.named_parameters():
        offsets[name] = (pos, pos + p.numel())
        pos += p.numel()
    blocks, out = [], []
    for node, output, params in zip(mg.graph.nodes[1:], mg.outputs[1:], mg.params[1:]):
        if params:
            spans = sorted(offsets[n] for n in params)
            if sum(b - a for a, b in spans) != spans[-1][1] - spans[0][0]:
                raise ChainError(f"parameters of {node.name!r} are not contiguous in named_parameters order")
            blocks.append(slice(spans[0][0], spans[-1][1]))
        psi = None
        cut = prefix_module(mg.module, output) if output else None
        if cut is not None and any(True for _ in cut.parameters()):  # else z_n does not depend on w
            idx = torch.cat([torch.arange(*offsets[n]) for n, _ in cut.named_parameters()])
            inner, _ = functional_chain(cut, x)
            psi = (lambda w, f=inner, idx=idx: f(w[idx]))
        out.append(psi)
    if sum(b.stop - b.start for b in blocks) != pos:
        raise ChainError(f"{pos - sum(b.stop - b.start for b in blocks)} parameters belong to no bi-affine layer; "
                         "cannot sample C")
    return blocks, out


def _prefix_map(model: nn.Module, prefix: nn.Module, x: Tensor) -> Callable[[Tensor], Tensor]:
    """psi_l as a function of the whole flat weight vector (the prefix's own are its first entries)."""
    psi_full, _ = functional_chain(prefix, x)
    if prefix is model:
        return psi_full
    n = sum(p.numel() for p in prefix.parameters())
    return lambda w: psi_full(w[:n])


def _kind(modules: dict[str, nn.Module], name: str) -> str:
    """The type of the module an RH layer is named after (a readable label where names are indices)."""
    if name in modules:
        return type(modules[name]).__name__
    base, _, part = name.rpartition(".")
    return f"{type(modules[base]).__name__} {part}" if base and base in modules else ""


def _random_targets(model, x, loss: str, target_norm: float, gen) -> torch.Tensor:
    """Random classes (cross-entropy) or random targets of norm ``target_norm`` per example (square)."""
    with torch.no_grad():
        out = model(x)
    if loss == "cross-entropy":
        return torch.randint(0, out.shape[-1], (x.shape[0],), generator=gen)
    y = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    return y * (target_norm / y.flatten(1).norm(dim=1).clamp_min(1e-300)).reshape((-1,) + (1,) * (y.dim() - 1))


def _violations(rows, certified_objective: float, obj_best: float | None, tolerance: float) -> list[dict]:
    """Each estimate above its certified value times (1 + tolerance)."""
    violations = []
    for r in rows:
        for k in QUANTITIES:
            est = r.estimated[k]
            if est is not None and est > r.certified[k] * (1 + tolerance):
                violations.append({"layer": r.index, "name": r.name, "quantity": k,
                                   "certified": json_number(r.certified[k]), "estimated": est})
    if obj_best is not None and obj_best > certified_objective * (1 + tolerance):
        violations.append({"layer": None, "name": "objective", "quantity": "objective_smoothness",
                           "certified": json_number(certified_objective), "estimated": obj_best})
    return violations


def plot_check(result: CheckResult, path) -> None:
    """Log-scale bars of certified vs estimated m, l, L per layer and the objective smoothness.

    Layers are labelled by name (with the module type where the name is an index); an infinite
    bound is drawn above every finite value and marked "inf"; a quantity never estimated (budget)
    has no bar.  The legend sits below the axes, off the data.
    """
    from .report import legend_below, new_figure, save_figure

    fig = new_figure(figsize=(16, 4.6))
    axes = fig.subplots(1, 4, gridspec_kw={"width_ratios": [3, 3, 3, 1.4]})
    titles = {"output_bound": "output bound m_l", "lipschitz": "Lipschitz l_l", "smoothness": "smoothness L_l"}
    panels = [(titles[k], [r.label for r in result.layers], [r.certified[k] for r in result.layers],
               [r.estimated[k] for r in result.layers]) for k in QUANTITIES]
    panels.append(("objective smoothness L_F", ["objective"], [result.certified["objective_smoothness"]],
                   [result.estimated["objective_smoothness"]]))
    for ax, (title, names, cert, est) in zip(axes, panels):
        finite = [v for v in cert + est if v is not None and v > 0 and not math.isinf(v)]
        top = max(finite) * 10 if finite else 1.0
        xs = list(range(len(names)))
        bars = ax.bar([i - 0.2 for i in xs], [top if math.isinf(c) else c for c in cert], 0.4, color="C0",
                      label="certified bound")
        ax.bar([i + 0.2 for i in xs], [math.nan if e is None else e for e in est], 0.4, color="C1",
               label="best estimate found (a lower bound)")
        for b, c in zip(bars, cert):
            if math.isinf(c):
                ax.annotate("inf", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom",
                            fontsize=7)
        ax.set_yscale("log")
        if finite:  # a decade below the smallest value: every bar shows, none starts at the axis
            ax.set_ylim(min(finite) / 10, (top if any(math.isinf(c) for c in cert) else max(finite)) * 3)
        ax.set_xticks(xs)
        ax.set_xticklabels(names, rotation=30 if len(names) > 1 else 0, ha="right" if len(names) > 1 else "center",
                           fontsize=7)
        ax.set_title(title, fontsize=10)
    done = "" if result.stopped is None else f"; stopped early: {result.stopped}"
    fig.suptitle(f"certified vs estimated on C ({result.certificate.mode} constants, {result.points} point{'s' if result.points != 1 else ''} + ascent"
                 f"{done})", fontsize=11)
    legend_below(fig, *axes[0].get_legend_handles_labels(), ncol=2)
    save_figure(fig, path, dpi=110)

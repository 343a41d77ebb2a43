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
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import grad, jvp

from .certificate import Certificate, certify
from .chain import ChainError
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
from .torch_chain import components_from_module, leaf_modules

__all__ = ["CheckResult", "LayerCheck", "check", "layer_blocks"]

QUANTITIES = ("output_bound", "lipschitz", "smoothness")


@dataclass(frozen=True)
class LayerCheck:
    """Certified vs estimated m_l, l_l, L_l for the prefix ending at RH layer ``index``."""

    index: int
    name: str
    certified: dict[str, float]
    estimated: dict[str, float | None]

    def ratios(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for k in QUANTITIES:
            est, cert = self.estimated.get(k), self.certified[k]
            out[k] = None if est is None or cert == 0 or math.isinf(cert) else est / cert
        return out


@dataclass(frozen=True)
class CheckResult:
    certificate: Certificate
    certified: dict[str, float]
    estimated: dict[str, float]
    layers: tuple[LayerCheck, ...]
    violations: tuple[dict[str, Any], ...]
    tolerance: float
    points: int
    ascent_steps: int
    where: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "certified": {k: json_number(v) for k, v in self.certified.items()},
            "estimated": {k: json_number(v) for k, v in self.estimated.items()},
            "violations": list(self.violations),
            "layers": [
                {
                    "index": r.index,
                    "name": r.name,
                    "certified": {k: json_number(v) for k, v in r.certified.items()},
                    "estimated": {k: (None if v is None else json_number(v)) for k, v in r.estimated.items()},
                    "ratio": {k: (None if v is None else json_number(v)) for k, v in r.ratios().items()},
                }
                for r in self.layers
            ],
            "where": dict(self.where),
            "settings": {"tolerance": self.tolerance, "points": self.points, "ascent_steps": self.ascent_steps,
                         **self.certificate.to_dict()["settings"]},
        }


def layer_blocks(model: nn.Module, input_shape: Sequence[int]) -> tuple[list[slice], list[int]]:
    """Flat-vector slices of each RH layer's parameters (``flat_parameters`` order).

    Also returns, for each RH layer, the number of leading leaf modules that end it (or -1 when
    the layer ends inside a module, e.g. batch norm followed by its affine part).
    """
    mc = components_from_module(model, input_shape)
    leaves, leaf_of = mc.leaves, mc.leaf_index  # component i comes from leaves[leaf_of[i]]
    offsets, pos = {}, 0
    for _, p in model.named_parameters():
        offsets[id(p)] = (pos, pos + p.numel())
        pos += p.numel()
    blocks: list[slice] = []
    ends: list[int] = []
    bil = [i for i, c in enumerate(mc.components) if c.role == "bilinear"]
    first_nonlinear = next((i for i, c in enumerate(mc.components) if c.role == "nonlinear"), None)
    starts = ([0] if first_nonlinear is not None and (not bil or first_nonlinear < bil[0]) else []) + bil
    for k, start in enumerate(starts):
        leaf = leaves[leaf_of[start]][1]
        if mc.components[start].role == "bilinear":
            names = ("weight", "bias") if mc.names[start].endswith(".affine") else None
            params = [p for n, p in leaf.named_parameters(recurse=False) if names is None or n in names]
            spans = sorted(offsets[id(p)] for p in params if p is not None)
            lo, hi = spans[0][0], spans[-1][1]
            if sum(b - a for a, b in spans) != hi - lo:
                raise ChainError(f"parameters of {mc.names[start]!r} are not contiguous in named_parameters order")
            blocks.append(slice(lo, hi))
        else:
            blocks.append(slice(0, 0))
        nxt = starts[k + 1] if k + 1 < len(starts) else len(mc.components)
        last_leaf = leaf_of[nxt - 1] if nxt >= 1 else len(leaves) - 1
        same_leaf_next = nxt < len(mc.components) and leaf_of[nxt] == last_leaf
        ends.append(-1 if same_leaf_next else last_leaf + 1)
    covered = sum(b.stop - b.start for b in blocks)
    if covered != pos:
        raise ChainError(f"{pos - covered} parameters belong to no bi-affine layer; cannot sample C")
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


def _ascent(value_fn: Callable[[Tensor], Tensor], w: Tensor, centre: Tensor, blocks, radius: float, steps: int) -> Tensor:
    """Projected gradient ascent on a scalar, block-normalised steps of radius/4, halved on failure."""
    step = radius / 4
    g_fn = grad(value_fn)
    cur = float(value_fn(w))
    for _ in range(steps):
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


def _estimate_chain(psi, points: Sequence[Tensor], centre, blocks, radius, ascent_steps, iters, seed):
    """Max over points (and ascent) of ||psi||, ||grad psi||, ||grad^2 psi|| and where found."""
    best = {k: (0.0, "") for k in QUANTITIES}
    for i, w in enumerate(points):
        cands = [(w, f"point {i}")]
        if ascent_steps:
            cands.append((_ascent(lambda u: psi(u).pow(2).sum(), w, centre, blocks, radius, ascent_steps), f"ascent from point {i}"))
        for wk, label in cands:
            m = output_norm(psi, wk).value
            if m > best["output_bound"][0]:
                best["output_bound"] = (m, label)
        # Lipschitz: power iteration, then ascent on ||J(w) v|| along the top right vector v
        est = jacobian_norm(psi, w, iters=iters, seed=seed + i)
        cands = [(w, est.value, f"point {i}")]
        if ascent_steps and est.vectors:
            v = est.vectors[0]
            wa = _ascent(lambda u: jvp(psi, (u,), (v,))[1].pow(2).sum(), w, centre, blocks, radius, ascent_steps)
            cands.append((wa, jacobian_norm(psi, wa, iters=iters, seed=seed + i).value, f"ascent from point {i}"))
        for _wk, val, label in cands:
            if val > best["lipschitz"][0]:
                best["lipschitz"] = (val, label)
        est = second_derivative_norm(psi, w, iters=iters, seed=seed + i, restarts=2)
        cands = [(est.value, f"point {i}")]
        if ascent_steps and len(est.vectors) == 3:
            u, v, z = est.vectors

            def t_uvz(x, u=u, v=v, z=z):
                return jvp(lambda y: jvp(psi, (y,), (v,))[1], (x,), (u,))[1].dot(z)

            wa = _ascent(t_uvz, w, centre, blocks, radius, max(1, ascent_steps // 2))
            cands.append((second_derivative_norm(psi, wa, iters=iters, seed=seed + i, restarts=2).value, f"ascent from point {i}"))
        for val, label in cands:
            if val > best["smoothness"][0]:
                best["smoothness"] = (val, label)
    return best


def check(
    model: nn.Module,
    *,
    # the certificate's settings (those of certify(), with a batch of 2 by default)
    input_shape: Sequence[int], batch_size: int = 2, radius: float = 1.0, input_norm: float = 1.0,
    loss: str = "cross-entropy", mode: str = "paper", l2: float = 0.0, around_weights: bool = False,
    target_norm: float = 1.0,
    # the search for estimates
    points: int = 3, ascent_steps: int = 8, iters: int = 60, tolerance: float = 1e-6, seed: int = 0,
    per_layer: bool = True, progress: Callable[[str], None] | None = None,
) -> CheckResult:
    """Certify ``model`` and compare with estimates at ``points`` random points of C plus ascent.

    The input batch has ``batch_size`` Gaussian examples scaled to ||x|| = ``input_norm``;
    labels are random classes (cross-entropy) or random targets of norm ``target_norm``
    (square).  Estimates use float64.  ``tolerance`` is relative: a violation is an estimate
    above ``certified * (1 + tolerance)``.
    """
    say = progress or (lambda s: None)
    if loss not in ESTIMATOR_LOSSES:
        raise ChainError(f"check supports the losses {', '.join(ESTIMATOR_LOSSES)}, got {loss!r}")
    if points < 1:
        raise ChainError(f"--points must be >= 1, got {points}")
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
    blocks, ends = layer_blocks(model, input_shape)
    w_star = flat_parameters(model)
    centre = w_star if around_weights else torch.zeros_like(w_star)
    pts = [_random_point(centre, blocks, radius, gen, boundary=(i % 2 == 0)) for i in range(points)]
    y = _random_targets(model, x, loss, target_norm, gen)
    if mode == "local":  # the certificate of this very batch (smoothchain.local)
        from .local import certify_local

        cert = certify_local(model, x, y, loss=loss, radius=radius, l2=l2)

    leaves = leaf_modules(model)
    rows: list[LayerCheck] = []
    where: dict[str, str] = {}
    full_est = None
    for li, row in enumerate(cert.bounds.layers):
        is_last = li == len(cert.bounds.layers) - 1
        end = ends[li]
        certified = {k: getattr(row, k) for k in QUANTITIES}
        if not (per_layer or is_last) or end < 0:
            rows.append(LayerCheck(row.index, row.name, certified, {k: None for k in QUANTITIES}))
            continue
        say(f"check: layer {row.index}/{len(cert.bounds.layers)} ({row.name})")
        prefix = model if is_last else nn.Sequential(*[m for _, m in leaves[:end]])
        psi_full, _ = functional_chain(prefix, x)
        if prefix is not model:
            # the prefix's own parameters are the first entries of the flat vector
            n = sum(p.numel() for p in prefix.parameters())

            def psi(w, f=psi_full, n=n):
                return f(w[:n])
        else:
            psi = psi_full
        best = _estimate_chain(psi, pts, centre, blocks, radius, ascent_steps, iters, seed)
        rows.append(LayerCheck(row.index, row.name, certified, {k: best[k][0] for k in QUANTITIES}))
        if is_last:
            full_est = best
            where.update({k: best[k][1] for k in QUANTITIES})

    say("check: objective smoothness")
    F = objective(model, x, y, loss=loss, l2=l2)
    obj_best, where["objective_smoothness"] = _objective_estimate(F, pts, centre, blocks, radius, ascent_steps,
                                                                   iters, seed)
    certified = {k: getattr(cert.bounds, k) for k in QUANTITIES}
    certified["objective_smoothness"] = cert.objective.smoothness
    estimated = {k: full_est[k][0] for k in QUANTITIES}
    estimated["objective_smoothness"] = obj_best
    violations = _violations(rows, certified["objective_smoothness"], obj_best, tolerance)
    return CheckResult(cert, certified, estimated, tuple(rows), tuple(violations), tolerance, points, ascent_steps, where)


def _random_targets(model, x, loss: str, target_norm: float, gen) -> torch.Tensor:
    """Random classes (cross-entropy) or random targets of norm ``target_norm`` per example (square)."""
    with torch.no_grad():
        out = model(x)
    if loss == "cross-entropy":
        return torch.randint(0, out.shape[-1], (x.shape[0],), generator=gen)
    y = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    return y * (target_norm / y.flatten(1).norm(dim=1).clamp_min(1e-300)).reshape((-1,) + (1,) * (y.dim() - 1))


def _objective_estimate(F, pts, centre, blocks, radius, ascent_steps, iters, seed) -> tuple[float, str]:
    """The largest top Hessian eigenvalue of F found at the points and after ascent, and where."""
    obj_best, obj_where = 0.0, ""
    for i, w in enumerate(pts):
        est = hessian_top_eig(F, w, method="lanczos", iters=iters, seed=seed + i)
        cands = [(est.value, f"point {i}")]
        if ascent_steps and est.vectors:
            # ascent on the curvature along the top eigenvector, v^T grad^2 F(w) v (its sign
            # makes it increase |v^T H v|), then a fresh Lanczos where it ends
            (v,) = est.vectors
            sign = 1.0 if float(v.dot(jvp(grad(F), (w,), (v,))[1])) >= 0 else -1.0

            def curvature(u, v=v, sign=sign):
                return sign * jvp(grad(F), (u,), (v,))[1].dot(v)

            wa = _ascent(curvature, w, centre, blocks, radius, max(1, ascent_steps // 2))
            cands.append((hessian_top_eig(F, wa, method="lanczos", iters=iters, seed=seed + i).value,
                          f"ascent from point {i}"))
        for val, label in cands:
            if val > obj_best:
                obj_best, obj_where = val, label
    return obj_best, obj_where


def _violations(rows, certified_objective: float, obj_best: float, tolerance: float) -> list[dict]:
    """Each estimate above its certified value times (1 + tolerance)."""
    violations = []
    for r in rows:
        for k in QUANTITIES:
            est = r.estimated[k]
            if est is not None and est > r.certified[k] * (1 + tolerance):
                violations.append({"layer": r.index, "name": r.name, "quantity": k,
                                   "certified": json_number(r.certified[k]), "estimated": est})
    if obj_best > certified_objective * (1 + tolerance):
        violations.append({"layer": None, "name": "objective", "quantity": "objective_smoothness",
                           "certified": json_number(certified_objective), "estimated": obj_best})
    return violations


def plot_check(result: CheckResult, path) -> None:
    """Log-scale bars of certified vs estimated m, l, L per layer and the objective smoothness."""
    from .report import new_figure, save_figure

    fig = new_figure(figsize=(16, 4))
    axes = fig.subplots(1, 4)
    titles = {"output_bound": "output bound m_l", "lipschitz": "Lipschitz l_l", "smoothness": "smoothness L_l"}
    for ax, k in zip(axes, QUANTITIES):
        names = [r.name for r in result.layers]
        cert = [r.certified[k] for r in result.layers]
        est = [r.estimated[k] or 0.0 for r in result.layers]
        finite = [c for c in cert + est if c > 0 and not math.isinf(c)]
        top = max(finite) * 10 if finite else 1.0
        xs = range(len(names))
        ax.bar([i - 0.2 for i in xs], [top if math.isinf(c) else c for c in cert], 0.4, label="certified")
        ax.bar([i + 0.2 for i in xs], est, 0.4, label="estimated")
        ax.set_yscale("log")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(names, rotation=30, fontsize=7)
        ax.set_title(titles[k])
        ax.legend(fontsize=7)
    c, e = result.certified["objective_smoothness"], result.estimated["objective_smoothness"]
    axes[3].bar([0, 1], [c if not math.isinf(c) else max(e, 1.0) * 10, e], color=["C0", "C1"])
    axes[3].set_xticks([0, 1])
    axes[3].set_xticklabels(["certified L_F", "estimated"])
    axes[3].set_yscale("log")
    axes[3].set_title("objective smoothness")
    fig.suptitle(f"certified vs estimated ({result.certificate.mode} constants)")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)

"""The convex-clustering objective of RH Sec. 2.2.2 and App. B.2 (eq. (25)), as a function f of
the batch output z = psi(w) (shape (n, ...)); its row in the loss table is in :mod:`smoothchain.losses`.

Convex clustering (RH eq. (25), Prop. B.1).  With z_i the i-th example's output (flattened),

    f(z) = min_y  sum_i 1/2 ||y_i - z_i||_2^2 + sum_{i<j} ||y_i - y_j||_2
         = min_y  1/2 ||y - z||^2 + ||D y||_G,

the Moreau envelope of Omega(y) = ||D y||_G (D y = (y_i - y_j)_{i<j}, groups = pairs).  It is
convex and 1-smooth with grad f(z) = z - prox_Omega(z) (RH proof of Prop. B.1).  As printed in
(25) the objective is a sum over the batch, not a mean.

Solver.  Omega(y) = max_{||u_ij|| <= 1} <u, D y>, so (RH proof of Prop. B.1)

    f(z) = max_{||u_ij|| <= 1}  <D^T u, z> - 1/2 ||D^T u||^2 = 1/2||z||^2 - min_u 1/2||D^T u - z||^2,

and at a dual solution u*, prox_Omega(z) = z - D^T u*, grad f(z) = D^T u*.  We solve the dual,
a smooth problem on a product of unit balls, by FISTA (accelerated projected gradient, step
1/||D||^2 = 1/n: D^T D is the Laplacian of the complete graph on n nodes, largest eigenvalue n)
with function-value adaptive restart.  Every iterate gives a certificate: for any y',

    gap = P(y') - d(u) >= f(z) - d(u) >= 0,   P(y) = 1/2||y - z||^2 + Omega(y),
    d(u) = <D^T u, z> - 1/2||D^T u||^2   (so d(u) <= f(z) <= P(y')),

with y' the best of y = z - D^T u and copies of y whose nearly fused points are averaged (at
fused clusters P(y) - f(z) is first order in the dual error, P of the averaged copy second
order, so the certificate reaches the accuracy the iterate really has).  We stop once
gap <= ``tol`` (default 1e-12 (1 + ||z||^2)) and return d(u) as the value and D^T u as the
gradient.  Then

* 0 <= f(z) - value <= gap <= tol,
* ||D^T u - grad f(z)|| <= sqrt(2 gap): g -> 1/2||g - z||^2 is 1-strongly convex on the convex
  set {D^T u : ||u_ij|| <= 1}, minimised there at grad f(z), and its excess at D^T u is
  f(z) - d(u) <= gap,

which is the stated tolerance.  Not converging within ``max_iter`` emits a ``RuntimeWarning``.

The envelope is C^1 with a 1-Lipschitz gradient but is not twice differentiable where clusters
fuse, so only the gradient oracle uses it (``gradient_step``); the Gauss-Newton and Newton
steps need grad^2 f and reject it.  Its ``torch.autograd.Function`` gives the exact value and
gradient (up to the tolerance) under ``torch.func.grad`` and plain autograd; its second
derivative is not defined (differentiating the backward raises, ``once_differentiable``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

__all__ = ["ClusteringResult", "convex_clustering_prox", "convex_clustering"]


@dataclass(frozen=True)
class ClusteringResult:
    """value: d(u) (a lower bound on f(z) within ``gap``); grad: D^T u (= z - y), shaped like z;
    prox: y = z - D^T u; gap: the certified duality gap; iterations: FISTA iterations."""

    value: torch.Tensor
    grad: torch.Tensor
    prox: torch.Tensor
    gap: float
    iterations: int


def _dual_map(U: torch.Tensor) -> torch.Tensor:
    """D^T u for u stored antisymmetrically (U[i, j] = u_ij = -U[j, i], i < j): (D^T u)_i = sum_j U[i, j]."""
    return U.sum(dim=1)


def _project(U: torch.Tensor) -> torch.Tensor:
    """Projection of each u_ij on the unit ball (keeps U antisymmetric)."""
    norms = torch.linalg.vector_norm(U, dim=2, keepdim=True)
    return U / torch.clamp(norms, min=1.0)


def _pair_norm_sum(y: torch.Tensor) -> torch.Tensor:
    """Omega(y) = sum_{i<j} ||y_i - y_j|| (y of shape (n, d))."""
    diff = y.unsqueeze(1) - y.unsqueeze(0)
    return 0.5 * torch.linalg.vector_norm(diff, dim=2).sum()   # each pair twice, diagonal 0


def convex_clustering_prox(z: torch.Tensor, *, tol: float | None = None,
                           max_iter: int = 20_000) -> ClusteringResult:
    """Value, gradient and prox of the convex-clustering envelope (RH eq. (25)) at z (n, ...),
    by FISTA on the dual with restart, stopped at duality gap <= ``tol`` (module docstring)."""
    z = z.detach()
    shape = z.shape
    n = shape[0] if z.dim() > 0 else 0
    zf = z.reshape(n, -1)
    if tol is None:
        tol = 1e-12 * (1.0 + float((zf * zf).sum()))
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol!r}")
    if n <= 1:
        zero = torch.zeros((), dtype=z.dtype, device=z.device)
        return ClusteringResult(zero, torch.zeros_like(z), z.clone(), 0.0, 0)
    step = 1.0 / n
    U = torch.zeros(n, n, zf.shape[1], dtype=z.dtype, device=z.device)
    V, t = U.clone(), 1.0

    def dual_obj(W):  # 1/2 ||D^T w - z||^2, minimised
        r = _dual_map(W) - zf
        return 0.5 * float((r * r).sum())

    obj = dual_obj(U)
    gap = math.inf
    for it in range(1, max_iter + 1):
        r = _dual_map(V) - zf                       # gradient of the dual at V is D r
        grad = r.unsqueeze(1) - r.unsqueeze(0)      # (D r)_ij = r_i - r_j
        U_new = _project(V - step * grad)
        obj_new = dual_obj(U_new)
        if obj_new > obj and t > 1.0:               # adaptive restart (O'Donoghue & Candes):
            t, V = 1.0, U                           # redo the step as a plain projected
            continue                                # gradient step from U
        t_new = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
        V = U_new + ((t - 1.0) / t_new) * (U_new - U)
        U, t, obj = U_new, t_new, obj_new
        if it % 10 == 0:
            gap = _gap(U, zf, tol)
            if gap <= tol:
                break
    gap = _gap(U, zf, tol)
    if gap > tol:
        warnings.warn(f"convex clustering: FISTA stopped after {max_iter} iterations at duality "
                      f"gap {gap:.2e} > tol {tol:.2e}; value and gradient are inexact",
                      RuntimeWarning, stacklevel=2)
    g = _dual_map(U)
    value = (g * zf).sum() - 0.5 * (g * g).sum()
    return ClusteringResult(value, g.reshape(shape), (zf - g).reshape(shape), float(gap), it)


def _primal(y: torch.Tensor, zf: torch.Tensor) -> torch.Tensor:
    """P(y) = 1/2 ||y - z||^2 + Omega(y)."""
    return 0.5 * ((y - zf) ** 2).sum() + _pair_norm_sum(y)


def _fused(y: torch.Tensor, threshold: float) -> torch.Tensor:
    """y with every group of points linked by distances <= threshold replaced by its mean."""
    close = torch.linalg.vector_norm(y.unsqueeze(1) - y.unsqueeze(0), dim=2) <= threshold
    n = y.shape[0]
    labels = torch.arange(n, device=y.device)
    big = torch.full((n, n), n, device=y.device)
    while True:  # connected components: propagate the smallest index over the links
        new = torch.where(close, labels.unsqueeze(0), big).amin(dim=1)
        if bool((new == labels).all()):
            break
        labels = new
    labels = torch.unique(labels, return_inverse=True)[1]
    k = int(labels.max()) + 1
    sums = torch.zeros(k, y.shape[1], dtype=y.dtype, device=y.device).index_add_(0, labels, y)
    counts = torch.bincount(labels, minlength=k).to(y.dtype).unsqueeze(1)
    return (sums / counts)[labels]


def _gap(U: torch.Tensor, zf: torch.Tensor, tol: float = 0.0) -> float:
    """P(y') - d(u) for the best of a few primal candidates y' (any y' gives a valid bound):
    y = z - D^T u, and y with nearly fused points averaged -- the exact fusion of the solution's
    clusters makes P(y') - f(z) second order in the dual error instead of first order."""
    g = _dual_map(U)
    y = zf - g
    dual = (g * zf).sum() - 0.5 * (g * g).sum()
    scale = 1.0 + float(torch.linalg.vector_norm(zf, dim=1).max())
    primal = float(_primal(y, zf))
    for rel in (1e-9, 1e-7, 1e-5):
        if primal - float(dual) <= tol:
            break
        primal = min(primal, float(_primal(_fused(y, rel * scale), zf)))
    return max(primal - float(dual), 0.0)


class _ConvexClustering(torch.autograd.Function):
    """f(z) of RH eq. (25) with grad f(z) = z - prox(z); works under ``torch.func.grad``."""

    @staticmethod
    def forward(z, tol, max_iter):
        res = convex_clustering_prox(z, tol=tol, max_iter=max_iter)
        return res.value, res.grad

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output[1])
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_value, grad_grad):
        (g,) = ctx.saved_tensors
        return grad_value * g, None, None


def convex_clustering(z: torch.Tensor, *, tol: float | None = None,
                      max_iter: int = 20_000) -> torch.Tensor:
    """The convex-clustering objective (RH eq. (25)) of the batch output z, differentiable once."""
    value, _ = _ConvexClustering.apply(z, tol, max_iter)
    return value

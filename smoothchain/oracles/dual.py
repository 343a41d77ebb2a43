"""Gauss-Newton step (13) through its dual (RH Prop. 3.5, Lemma C.6), with autodiff-oracle calls only.

Notation: J = grad psi(w_t) (p x q, RH's transposed Jacobian), g = grad f(psi(w_t)),
H = grad^2 f(psi(w_t)) (q x q, PSD for the square and cross-entropy losses), q_r = l2 w_t and
c = l2 + 1/gamma.  The primal (28) is

    min_w~ 1/2 w~^T J H J^T w~ + g^T J^T w~ + q_r^T w~ + c/2 ||w~||^2
    <=>  (J H J^T + c I) w~ = -(J g + q_r).

Dual (18).  With q~_f(y) = g^T y + 1/2 y^T H y and q~_r(w~) = q_r^T w~ + c/2 ||w~||^2 (the
proximal term 1/(2 gamma)||w~||^2 is part of q~_r; RH print ||w||^2/2 there, which is the
gamma = 1 case), q~_r*(u) = ||u - q_r||^2 / (2c) and q~_f*(mu) = 1/2 (mu-g)^T H^+ (mu-g) on
mu - g in range(H) (+inf elsewhere).  For both losses g lies in range(H) (square: H = I/m;
cross-entropy: each example's block of g sums to zero and H's null space is the constant
vector), so the dual variable is mu = H nu, and (18) reads

    min_nu  1/2 nu^T (H + H K H) nu - b^T nu,   K = J^T J / c,   b = g - H J^T q_r / c,

a convex quadratic on R^q whose matrix has rank <= rank H <= q.  Conjugate gradient from nu = 0
reaches its minimiser in at most rank(H) <= q iterations (exact arithmetic); the primal step is
w~* = grad q~_r*(-J mu*) = -(J H nu* + q_r) / c (Prop. 3.5 (2)).

Calls (Lemma C.6): each CG iteration needs (H + HKH) p, i.e. u = J (H p) (one backward call)
and J^T u (one linearisation call) -- two calls.  b needs J^T q_r: one linearisation call when
l2 > 0, none when l2 = 0.  The final J H nu* = sum_k alpha_k J H p_k is accumulated from the
u's already computed, so no call is needed at the end.  Total <= 2 q + 1 (Prop. 3.5 (3)), where
q = m k is the output dimension of the (mini-)batch the step is taken on.  The forward pass that
builds the oracle is not a call (see ``autodiff``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .autodiff import AutodiffOracle, OracleCounter, loss_grad, loss_hvp

__all__ = ["DualInfo", "gauss_newton_dual"]


@dataclass(frozen=True)
class DualInfo:
    iterations: int          # CG iterations (each two oracle calls)
    residual: float          # ||b - (H + HKH) nu|| / ||b|| by the CG recursion (0 if b = 0)
    output_dim: int          # q


def gauss_newton_dual(model: nn.Module, x: torch.Tensor, f: Callable, l2: float, gamma: float,
                      counter: OracleCounter, *, tol: float | None = None,
                      maxiter: int | None = None) -> tuple[list[torch.Tensor], DualInfo]:
    """Gauss-Newton direction by CG on the dual (18); ``maxiter`` defaults to q (the paper's bound).

    Stops when the recursive residual falls below ``tol`` times ||b||, when the curvature along
    the search direction vanishes (the rank of H is reached) or after ``maxiter`` iterations.
    ``tol`` defaults to 1e-13 in float64 and to 10 x the machine epsilon in lower precisions
    (1.2e-6 in float32), where 1e-13 cannot be reached and CG would always run q iterations; a
    ``RuntimeWarning`` says when the final residual exceeds max(1e-6, 100 tol).
    """
    oracle = AutodiffOracle(model, x, counter)
    z = oracle.output
    if tol is None:
        tol = max(1e-13, 10 * torch.finfo(z.dtype).eps) if z.is_floating_point() else 1e-13
    qdim = oracle.output_dim
    maxiter = qdim if maxiter is None else int(maxiter)
    c = l2 + 1.0 / gamma
    g = loss_grad(f, z).reshape(-1)
    hvp_struct = loss_hvp(f, z)

    def H(u: torch.Tensor) -> torch.Tensor:
        return hvp_struct(u.reshape(z.shape)).reshape(-1)

    q_r = [l2 * w for w in oracle.params] if l2 else None
    b = g - H(oracle.linearize(q_r).reshape(-1)) / c if l2 else g.clone()

    J_mu = [torch.zeros_like(w) for w in oracle.params]   # J H nu, accumulated
    b_norm = float(torch.linalg.vector_norm(b))
    r = b.clone()
    d = r.clone()
    rr = r @ r
    iterations = 0
    res = 0.0 if b_norm == 0.0 else 1.0
    while b_norm > 0.0 and iterations < maxiter and res > tol:
        Hd = H(d)
        u = oracle.backward(Hd)                                  # J H d
        Ad = Hd + H(oracle.linearize(u).reshape(-1)) / c         # (H + H J^T J H / c) d
        dAd = d @ Ad
        if not bool(dAd > 0):
            break
        iterations += 1
        alpha = rr / dAd
        for acc, ui in zip(J_mu, u):
            acc.add_(ui, alpha=float(alpha))
        r = r - alpha * Ad
        rr_new = r @ r
        res = float(torch.sqrt(rr_new)) / b_norm
        d = r + (rr_new / rr) * d
        rr = rr_new
    if res > max(1e-6, 100 * tol):
        warnings.warn(f"Gauss-Newton dual: conjugate gradient stopped after {iterations} "
                      f"iterations (q = {qdim}) at relative residual {res:.2e}; the direction "
                      "is inexact (ill-conditioned H + HKH?)", RuntimeWarning, stacklevel=3)
    if q_r is None:
        direction = [-m / c for m in J_mu]
    else:
        direction = [-(m + qi) / c for m, qi in zip(J_mu, q_r)]
    return direction, DualInfo(iterations, res, qdim)

"""Polyak-Lojasiewicz (PL) constants from the stacked per-sample Jacobians (lecture, "PL for
neural networks").

Notation (Scaman's lecture, slides "The Polyak-Lojasiewicz condition" and "PL for neural
networks"): L is mu-PL when ||grad L(theta)||^2 >= 2 mu (L(theta) - L(theta*)) (Definition,
Polyak & Lojasiewicz 1963).  For a model g_theta on N samples with k outputs each, the stacked
per-sample Jacobians are the p x (N k) matrix A = (J(x_1)^T | ... | J(x_N)^T) = J^T, where J is
the (N k) x p Jacobian of the whole batch output (:func:`smoothchain.estimators.functional_chain`).
The lecture's condition is sigma_min(A) >= eps, with sigma_min(M) = min_{x != 0} ||M x|| / ||x||,
i.e.  eps^2 <= lambda_min(J J^T)  (the N k x N k Gram matrix, the empirical neural tangent kernel).
This is 0 whenever p < N k: only over-parameterised models can be PL this way.

Constants (proved in docs/pl.md; L* >= 0 for both losses):

* ``loss="mse"`` -- the lecture's L = (1/N) sum_i ||g(x_i) - y_i||^2.  grad L = (2/N) J^T r with
  r the stacked residual, so ||grad L||^2 >= (4 eps^2 / N^2) ||r||^2 = (4 eps^2 / N) L.  The
  lecture's theorem prints "mu = 4 eps^2/N": that is the constant c of ||grad L||^2 >= c L.  Under
  the lecture's own PL definition (with the factor 2) it gives **mu = 2 eps^2 / N**, which is
  what :func:`mse_pl_constant` returns as ``mu`` (``gradient_dominance`` = c = 4 eps^2 / N is
  returned too).  mu = 4 eps^2/N itself is false: L(theta) = (theta - 1)^2 (N = 1, eps = 1) has
  ||grad L||^2 = 4 L = 2 * 2 * L, so mu = 2 and no more.
* ``loss="square"`` -- the project's 1/(2N) sum_i ||g(x_i) - y_i||^2 (DESIGN.md "Oracles"):
  grad L = (1/N) J^T r, ||grad L||^2 >= (eps^2/N^2) ||r||^2 = (2 eps^2 / N) L, so mu = eps^2 / N.

Composition (lecture, "Theorem (PL condition for compositions)"): f mu-PL and
sigma_min(J_g^T) >= eps everywhere give f o g mu'-PL with mu' = mu eps^2 (:func:`compose_pl`).

A value of sigma_min at one point, or the minimum over sampled points of a ball, is an
ESTIMATE: the PL theorems need the bound at every point of the region (Liu et al.'s uniform
conditioning on B(theta_0, R)); a sampled minimum can only overstate it.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import Tensor
from torch.func import jvp, vjp

from .losses import get_loss, loss_names

#: "mse" (the lecture's name of the squared error) and "square": the square losses reading targets
_PL_LOSSES = ("mse",) + loss_names(square=True, reads=("targets",))

__all__ = [
    "SigmaMin",
    "PLConstant",
    "gram_operator",
    "smallest_singular_value",
    "mse_pl_constant",
    "compose_pl",
    "pl_over_ball",
    "NeighbourhoodPL",
    "PLReport",
    "pl_report",
]



@dataclass(frozen=True)
class SigmaMin:
    """sigma_min of the stacked per-sample Jacobians J^T (p x n, n = N k outputs).

    ``value`` = sqrt(max(lambda_min(J J^T), 0)); ``eigenvalue`` = lambda_min(J J^T) as computed;
    ``method`` the one used; ``converged`` whether the iterative method met its tolerance
    (always true for "dense"); ``iterations`` iterations used (0 for dense).
    """

    value: float
    eigenvalue: float
    method: str
    converged: bool
    iterations: int
    outputs: int
    parameters: int


@dataclass(frozen=True)
class PLConstant:
    """PL constants of an MSE-type loss from sigma_min = eps (see the module docstring)."""

    mu: float
    gradient_dominance: float
    sigma_min: float
    samples: int
    loss: str


def gram_operator(psi: Callable[[Tensor], Tensor], w: Tensor) -> tuple[Callable[[Tensor], Tensor], int]:
    """``(matvec, n)``: u -> J J^T u (J = dpsi/dw at w, n x p), one vjp and one jvp, no J formed."""
    w = w.detach()
    out, vjp_fn = vjp(psi, w)

    def matvec(u: Tensor) -> Tensor:
        (a,) = vjp_fn(u.to(out.dtype))
        return jvp(psi, (w,), (a,))[1]

    return matvec, out.numel()


def smallest_singular_value(
    psi: Callable[[Tensor], Tensor],
    w: Tensor,
    method: str = "auto",
    tol: float = 1e-10,
    maxiter: int = 500,
    seed: int = 0,
    dense_limit: int = 400,
) -> SigmaMin:
    """sigma_min((J(x_1)^T | ... | J(x_N)^T)) = sqrt(lambda_min(J J^T)) at ``w``.

    ``method``: ``"dense"`` (J by reverse mode, one eigendecomposition of J J^T: exact, for small
    n), ``"lobpcg"`` (scipy's LOBPCG for the smallest eigenvalue of the matrix-free J J^T, with
    its residual tolerance ``tol`` relative to the largest eigenvalue found by a few power
    steps), ``"lanczos"`` (scipy's ARPACK ``eigsh``, which="SA", matrix-free), or ``"auto"``
    (dense when n = N k <= ``dense_limit``, else LOBPCG).
    """
    if method not in ("auto", "dense", "lobpcg", "lanczos"):
        raise ValueError(f"method must be auto, dense, lobpcg or lanczos, got {method!r}")
    w = w.detach()
    matvec, n = gram_operator(psi, w)
    p = w.numel()
    if method == "auto":
        method = "dense" if n <= dense_limit else "lobpcg"
    if method == "dense":
        K = torch.stack([matvec(e) for e in torch.eye(n, dtype=w.dtype, device=w.device)], dim=1)
        lam = float(torch.linalg.eigvalsh((K + K.T) / 2)[0])
        return SigmaMin(math.sqrt(max(lam, 0.0)), lam, "dense", True, 0, n, p)
    from scipy.sparse.linalg import LinearOperator, eigsh, lobpcg

    count = [0]

    def mv(u: np.ndarray) -> np.ndarray:
        count[0] += 1
        t = torch.as_tensor(np.asarray(u).reshape(n, -1), dtype=w.dtype, device=w.device)
        cols = [matvec(t[:, j]) for j in range(t.shape[1])]
        return torch.stack(cols, dim=1).cpu().numpy().reshape(np.shape(u))

    op = LinearOperator((n, n), matvec=mv, matmat=mv, dtype=np.float64)
    rng = np.random.default_rng(seed)
    if method == "lanczos":
        if n < 3:
            return smallest_singular_value(psi, w, "dense")
        vals = eigsh(op, k=1, which="SA", tol=tol, maxiter=maxiter * n, v0=rng.standard_normal(n),
                     return_eigenvectors=False)
        lam = float(vals[0])
        return SigmaMin(math.sqrt(max(lam, 0.0)), lam, "lanczos", True, count[0], n, p)
    # scale of J J^T (a few power steps) for a tolerance relative to its largest eigenvalue
    v = torch.as_tensor(rng.standard_normal(n), dtype=w.dtype, device=w.device)
    scale = 0.0
    for _ in range(5):
        v = matvec(v / v.norm())
        scale = float(v.norm())
    k = min(4, max(1, n // 5))
    X = rng.standard_normal((n, k))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vals, _, hist = lobpcg(op, X, largest=False, tol=tol * max(scale, 1e-300), maxiter=maxiter,
                               retResidualNormsHistory=True)
    lam = float(np.min(vals))
    res = float(np.min(hist[-1])) if len(hist) else math.inf
    return SigmaMin(math.sqrt(max(lam, 0.0)), lam, "lobpcg", bool(res <= tol * scale), len(hist), n, p)


def mse_pl_constant(sigma_min: float, samples: int, loss: str = "mse") -> PLConstant:
    """PL constant of the MSE loss from sigma_min(J^T) >= eps (lecture, "Theorem (PL condition
    for MSE loss)"), in the lecture's PL convention ||grad L||^2 >= 2 mu (L - L*).

    ``loss="mse"``: L = (1/N) sum ||g(x_i) - y_i||^2 -> gradient_dominance = 4 eps^2 / N (the
    lecture's printed value), mu = 2 eps^2 / N.  ``loss="square"``: L = 1/(2N) sum ||.||^2 ->
    gradient_dominance = 2 eps^2 / N, mu = eps^2 / N.
    """
    scale = get_loss(loss, among=_PL_LOSSES).square_scale
    if int(samples) != samples or samples < 1:
        raise ValueError(f"samples must be a positive integer, got {samples!r}")
    if not (sigma_min >= 0 and math.isfinite(sigma_min)):
        raise ValueError(f"sigma_min must be a finite number >= 0, got {sigma_min!r}")
    # ||grad L||^2 = (2s/N)^2 ||J^T r||^2 >= (2s/N)^2 eps^2 ||r||^2 = (4 s eps^2 / N) L
    c = 4.0 * scale * sigma_min**2 / samples
    return PLConstant(c / 2.0, c, float(sigma_min), int(samples), loss)


def compose_pl(mu: float, eps: float) -> float:
    """mu' = mu eps^2 (lecture, "Theorem (PL condition for compositions)"): f mu-PL and
    sigma_min(J_g(theta)^T) >= eps for all theta give f o g mu'-PL."""
    if not (mu >= 0 and eps >= 0):
        raise ValueError(f"mu and eps must be >= 0, got {mu!r}, {eps!r}")
    return mu * eps * eps


@dataclass(frozen=True)
class NeighbourhoodPL:
    """sigma_min at the centre and its minimum over sampled points of B(w0, radius)."""

    at_centre: SigmaMin
    minimum: float
    where: str
    radius: float
    points: int
    values: tuple[float, ...] = field(default_factory=tuple)


def pl_over_ball(
    psi: Callable[[Tensor], Tensor],
    w0: Tensor,
    radius: float,
    points: int = 8,
    seed: int = 0,
    method: str = "auto",
) -> NeighbourhoodPL:
    """min of sigma_min(J(w)^T) over w0 and ``points`` random points of the Euclidean ball
    B(w0, radius) on all the weights (half on its boundary sphere, half uniform inside).

    An estimate from above of the uniform-conditioning constant inf_{B(w0, R)} sigma_min
    (lecture, "PL for neural networks"): a sampled minimum can only overstate the infimum.
    """
    if not (radius >= 0 and math.isfinite(radius)):
        raise ValueError(f"radius must be a finite number >= 0, got {radius!r}")
    if int(points) != points or points < 0:
        raise ValueError(f"points must be an integer >= 0, got {points!r}")
    w0 = w0.detach()
    gen = torch.Generator().manual_seed(int(seed))
    centre = smallest_singular_value(psi, w0, method, seed=seed)
    best, where, values = centre.value, "centre", [centre.value]
    d = w0.numel()
    for i in range(int(points)):
        u = torch.randn(d, generator=gen, dtype=w0.dtype)
        u = u / u.norm()
        r = radius if i % 2 == 0 else radius * float(torch.rand((), generator=gen, dtype=w0.dtype)) ** (1.0 / d)
        val = smallest_singular_value(psi, w0 + r * u.to(w0.device), method, seed=seed + i + 1).value
        values.append(val)
        if val < best:
            best, where = val, f"point {i}"
    return NeighbourhoodPL(centre, best, where, float(radius), int(points), tuple(values))


@dataclass(frozen=True)
class PLReport:
    """sigma_min and the PL constant of the loss at w0 (``at_centre``) and over the sampled
    ball B(w0, R) (``over_ball``, from the smallest sigma_min found); what ``smoothchain pl`` prints."""

    neighbourhood: NeighbourhoodPL
    at_centre: PLConstant
    over_ball: PLConstant


def pl_report(model: torch.nn.Module, x: Tensor, *, loss: str = "mse", radius: float = 0.1, points: int = 6,
              seed: int = 0, method: str = "auto") -> PLReport:
    """The PL constants of ``loss`` for ``model`` on the N = ``len(x)`` samples ``x``: sigma_min of
    the stacked per-sample Jacobians (:func:`pl_over_ball` on :func:`~smoothchain.estimators.functional_chain`)
    turned into mu by the lecture's "PL condition for MSE loss" (:func:`mse_pl_constant`)."""
    from .estimators import functional_chain

    psi, w0 = functional_chain(model, x)
    res = pl_over_ball(psi, w0, radius, points=points, seed=seed, method=method)
    n = int(x.shape[0])
    return PLReport(res, mse_pl_constant(res.at_centre.value, n, loss), mse_pl_constant(res.minimum, n, loss))

"""Finsler and duality structures (F Sec. 3) and the abstract DSGD iteration (F Algo. 3.1).

A :class:`DualityStructure` supplies, at each point w, a norm ||.||_w (F Assumption 3.1), its
dual norm (F eq. 3) and a duality map rho_w (F Def. 3.2-3.3):
||rho_w(l)||_w = ||l||_w (4a) and l . rho_w(l) = ||l||_w^2 (4b).  Subclass it with three
methods; :func:`dsgd` then runs F Algo. 3.1, w(t+1) = w(t) - eps(t) rho_{w(t)}(g(t)), on any
user-defined structure.  Points, vectors and functionals are flat float64 numpy arrays.

Provided structures:

* :class:`Euclidean` -- ||.||_2 everywhere; rho is the identity and DSGD is plain (S)GD
  (F Cor. 3.10 case 1; convexity c = 1).
* :class:`WeightedProduct` -- blocks with norms ||.||_{X_i} and point-dependent weights p_i(w):
  ||u||_w = sum_i p_i(w) ||u_i||_{X_i}; dual norm and duality map of F Prop. 4.6 (eqs. 30-31).
  The neural-network structure of F eq. (25) is this with matrix q-norm blocks; so is
  Example 3.4 / 3.12, see :func:`example_312`.

Example (F Example 3.12): f(x, y) = g(x) h(y) with |g''|, |h''| <= 1 has no Lipschitz gradient
(g = x^2/2, h = y^2/2), but with ||(dx, dy)||_w = sqrt(1 + |h(y)|) |dx| + sqrt(1 + |g(x)|) |dy|
it satisfies F Assumption 3.5 with L = 1, so batch DSGD with eps = 1 never increases f:

>>> import numpy as np
>>> f, grad, structure = example_312()
>>> result = dsgd(grad, np.array([3.0, -2.0]), structure, step_size=1.0, num_steps=200, f=f)
>>> bool(np.all(np.diff(result.values) <= 1e-12)) and result.values[-1] < 1e-2
True
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from .norms import check_q, dual_norm, duality_map, matrix_norm

__all__ = [
    "DualityStructure",
    "Euclidean",
    "WeightedProduct",
    "DSGDResult",
    "dsgd",
    "check_duality",
    "example_312",
]


class DualityStructure:
    """A Finsler structure with a duality structure (F Def. 3.3).

    Subclasses implement :meth:`norm`, :meth:`dual_norm` and :meth:`duality_map`;
    ``convexity`` is the parameter c of F Def. 3.7 (0 is always valid) used by the stochastic
    rates of F Thm 3.9.
    """

    convexity: float = 0.0

    def norm(self, w: np.ndarray, u: np.ndarray) -> float:  # ||u||_w
        raise NotImplementedError

    def dual_norm(self, w: np.ndarray, ell: np.ndarray) -> float:  # ||l||_w, F eq. (3)
        raise NotImplementedError

    def duality_map(self, w: np.ndarray, ell: np.ndarray) -> np.ndarray:  # rho_w(l)
        raise NotImplementedError


class Euclidean(DualityStructure):
    """||u||_w = ||u||_2 for every w; rho_w = identity (F Sec. 3)."""

    convexity = 1.0

    def norm(self, w, u):
        return float(np.linalg.norm(np.ravel(u)))

    def dual_norm(self, w, ell):
        return float(np.linalg.norm(np.ravel(ell)))

    def duality_map(self, w, ell):
        return np.array(ell, dtype=float, copy=True)


class WeightedProduct(DualityStructure):
    """||u||_w = sum_i p_i(w) ||u_i||_{q_i} over blocks of a flat vector (F Prop. 4.6).

    ``shapes``: block shapes (a 2-D shape carries the operator q-norm of F Prop. 4.5, a 1-D
    shape of length n is an n x 1 column, i.e. the vector q-norm); ``weights(w)`` returns the
    positive p_i(w); ``q``: one q in {1, 2, inf} or one per block.  The duality map updates the
    single block i* = argmax ||l_i||_* / p_i by rho_q(l_i*) / p_i*^2 (F eq. 31).
    """

    def __init__(self, shapes: Sequence[Sequence[int]], weights: Callable[[np.ndarray], Sequence[float]],
                 q=2):
        self.shapes = [tuple(int(d) for d in s) for s in shapes]
        self.sizes = [int(np.prod(s)) for s in self.shapes]
        qs = list(q) if isinstance(q, (list, tuple)) else [q] * len(self.shapes)
        if len(qs) != len(self.shapes):
            raise ValueError(f"need one q per block: {len(self.shapes)} blocks, {len(qs)} q's")
        self.q = [check_q(v) for v in qs]
        self.weights = weights

    def split(self, v: np.ndarray) -> list[np.ndarray]:
        v = np.asarray(v, dtype=float).ravel()
        if v.size != sum(self.sizes):
            raise ValueError(f"vector of size {v.size} does not match blocks {self.shapes}")
        out, k = [], 0
        for shape, size in zip(self.shapes, self.sizes):
            out.append(v[k:k + size].reshape(shape))
            k += size
        return out

    def _p(self, w) -> list[float]:
        p = [float(x) for x in self.weights(w)]
        if len(p) != len(self.shapes) or not all(x > 0 and math.isfinite(x) for x in p):
            raise ValueError(f"weights(w) must return {len(self.shapes)} positive numbers, got {p}")
        return p

    def norm(self, w, u):
        return sum(p * matrix_norm(b, q) for p, b, q in zip(self._p(w), self.split(u), self.q))

    def _ratios(self, w, ell):
        return [dual_norm(b, q) / p for p, b, q in zip(self._p(w), self.split(ell), self.q)]

    def dual_norm(self, w, ell):
        return max(self._ratios(w, ell))

    def duality_map(self, w, ell):
        p = self._p(w)
        blocks = self.split(ell)
        ratios = [dual_norm(b, q) / pi for pi, b, q in zip(p, blocks, self.q)]
        i_star = int(np.argmax(ratios))  # first maximiser
        out = [np.zeros_like(b) for b in blocks]
        out[i_star] = duality_map(blocks[i_star], self.q[i_star])[0] / p[i_star] ** 2
        return np.concatenate([b.ravel() for b in out])


@dataclass
class DSGDResult:
    """Output of :func:`dsgd`.

    ``w``: last iterate; ``values``: f(w(t)) for t = 1..T+1 when ``f`` was given;
    ``dual_norms_sq``: ||df/dw(w(t))||_{w(t)}^2 for t = 1..T (exact gradient when
    ``exact_grad`` was given, else the estimate g(t)); ``tau``: first t (1-based) with
    ``dual_norms_sq`` <= gamma (F eq. 5), or None.
    """

    w: np.ndarray
    values: list[float] = field(default_factory=list)
    dual_norms_sq: list[float] = field(default_factory=list)
    tau: int | None = None


def dsgd(grad: Callable, w0, structure: DualityStructure, step_size, num_steps: int, *,
         f: Callable | None = None, exact_grad: Callable | None = None,
         gamma: float | None = None, stop_at_tau: bool = False) -> DSGDResult:
    """F Algo. 3.1: w(t+1) = w(t) - eps(t) rho_{w(t)}(g(t)).

    ``grad(w)`` (or ``grad(w, t)``) returns the derivative estimate g(t) as a flat array;
    ``step_size`` is a constant eps or a function t -> eps(t) (t from 1).  ``exact_grad`` (if
    the estimate is stochastic) is used only to record ||df/dw||_{w(t)}^2 and tau.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 0:
        raise ValueError(f"num_steps must be a non-negative integer, got {num_steps!r}")
    eps_fn = step_size if callable(step_size) else (lambda t, e=float(step_size): e)
    if not callable(step_size) and not (float(step_size) > 0 and math.isfinite(float(step_size))):
        raise ValueError(f"step_size must be positive and finite, got {step_size!r}")

    def call(fn, w, t):
        return fn(w, t) if _takes_two(fn) else fn(w)

    w = np.array(w0, dtype=float).ravel().copy()
    res = DSGDResult(w=w)
    if f is not None:
        res.values.append(float(f(w)))
    for t in range(1, num_steps + 1):
        g = np.asarray(call(grad, w, t), dtype=float).ravel()
        true_g = g if exact_grad is None else np.asarray(exact_grad(w), dtype=float).ravel()
        dn2 = structure.dual_norm(w, true_g) ** 2
        res.dual_norms_sq.append(dn2)
        if gamma is not None and res.tau is None and dn2 <= gamma:
            res.tau = t
            if stop_at_tau:
                break
        w = w - float(eps_fn(t)) * structure.duality_map(w, g)
        if f is not None:
            res.values.append(float(f(w)))
    res.w = w
    return res


def _takes_two(fn: Callable) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)


def check_duality(structure: DualityStructure, w, ell, rtol: float = 1e-9) -> tuple[float, float]:
    """Relative defects of (4a) and (4b) for rho_w(ell); both ~0 for a correct duality map."""
    w = np.asarray(w, dtype=float).ravel()
    ell = np.asarray(ell, dtype=float).ravel()
    rho = np.asarray(structure.duality_map(w, ell), dtype=float).ravel()
    dn = structure.dual_norm(w, ell)
    scale = max(dn, rtol)
    return (abs(structure.norm(w, rho) - dn) / scale,
            abs(float(ell @ rho) - dn * dn) / (scale * scale))


def example_312(g: Callable = None, dg: Callable = None, h: Callable = None, dh: Callable = None):
    """F Example 3.12: f(x, y) = g(x) h(y) with the structure of F Example 3.4.

    Defaults g(x) = x^2/2, h(y) = y^2/2 (|g''| = |h''| = 1; the gradient of f is not Lipschitz).
    Returns ``(f, grad, structure)``: the norm is sqrt(1 + |h(y)|)|dx| + sqrt(1 + |g(x)|)|dy|,
    the duality map updates x by f_x / (1 + |h(y)|) or y by f_y / (1 + |g(x)|), whichever has
    the larger ratio (F eq. 20), and F Assumption 3.5 holds with L = 1.
    """
    if g is None:
        g, dg = (lambda x: 0.5 * x * x), (lambda x: x)
    if h is None:
        h, dh = (lambda y: 0.5 * y * y), (lambda y: y)
    if dg is None or dh is None:
        raise ValueError("pass the derivatives dg and dh along with g and h")

    def f(w):
        return float(g(w[0]) * h(w[1]))

    def grad(w):
        return np.array([dg(w[0]) * h(w[1]), g(w[0]) * dh(w[1])])

    structure = WeightedProduct(
        [(1,), (1,)],
        lambda w: (math.sqrt(1 + abs(h(w[1]))), math.sqrt(1 + abs(g(w[0])))),
        q=1,
    )
    return f, grad, structure

"""DSGD for networks as a ``torch.optim.Optimizer`` (F Algo. 4.1).

One step, given the gradient g = (g_1, ..., g_K) of the objective (F eqs. 21-22: batch mean of
||output - target||_2^2, no 1/2) already in ``.grad`` (or computed by ``closure``):

1. p_i(w) of F Prop. 4.3 for the current weights, from *upper bounds* on the operator norms
   ||[W_j | b_j]||_q, j > i (exact, or certified incremental bounds, see below);
2. choose the layers to update (``variant``):

   * ``"greedy"`` -- F Algo. 4.1: i* = argmax_i ||g_i||_* / p_i(w) (first maximiser); this is the
     duality map of the Finsler structure (25), F eq. (33);
   * ``"all"`` -- F Sec. 5.2's DSGD_ALL: every layer, each with its own step;
   * ``"random"`` -- one layer uniformly at random (F Sec. 5.1's RANDOM);
   * ``"sequential"`` -- layers 1, 2, ..., K, 1, ... in turn (F Sec. 5.1's SEQUENTIAL);

3. update each chosen layer along a direction Q ~ rho_q(g_i) / ||g_i||_* (F Prop. 4.5) with the
   certified step of the descent lemma (F Prop. 4.4),

       [W_i | b_i] <- [W_i | b_i] - lr * eps * ip / (p_i(w)^2 * bound^2) * Q,

   ip <= <g_i, Q> and bound >= ||Q||_q certified.  For q = 1, inf, Q is F's sign matrix
   (eqs. 27, 29), ip = ||g_i||_* and bound = 1 exactly, so this *is* F Algo. 4.1 line 10:
   -lr eps rho_q(g_i) / p_i^2.  For q = 2, Q is the polar factor U V^T (eq. 28) computed from
   m x m matrices (:mod:`smoothchain.dsgd.lowrank`), and ip / bound = ||g_i||_* up to rounding.

``eps`` is the theoretical step: 1 in batch mode (F Thm 4.8), and in stochastic mode with a
target ``gamma`` the step (gamma - sigma2) / (4 (gamma + sigma2)) of F Thm 4.12 (sigma2 from
:func:`smoothchain.dsgd.rates.variance_bound` unless given).  ``lr`` multiplies it, so
``lr = 1`` is the theory.  With 0 < lr <= 1 a full-batch step of greedy, random or sequential
updates a single layer i and decreases f by at least (lr - lr^2/2) (ip/bound)^2 / p_i^2
(F Props. 4.3-4.4); "all" has no such guarantee.  F's RANDOM and SEQUENTIAL baselines do not
divide by p_i^2 (their step is tuned): ``bound_scaling=False`` reproduces them
(update -lr * rho_q(g_i)).

Layout (in the manner of ``torch/optim/sgd.py``): :class:`DSGD` gathers the state -- parameter
groups, the per-layer weight-norm bounds, the "random" generator, the q = 2 factor records --
computes p_i(w) and calls the functional :func:`dsgd_update`, which does the step on plain
tensors: layer choice (:func:`greedy_polar_layer`, :func:`greedy_sign_layer`,
:func:`random_layer`, :func:`sequential_layer`), duality-map direction
(:func:`polar_dual` / :func:`polar_direction`, :func:`smoothchain.dsgd.sign.sign_dual` /
:func:`~smoothchain.dsgd.sign.apply_sign_step`) and step size (:func:`step_size`).

Speed (``docs/dsgd.md`` section 4.1, ``benchmarks/dsgd_step.py``).

* Weight norms inside p_i are certified *upper* bounds at every step: exact (q = 1, inf: float64
  column / row sums times 1 + gamma; q = 2: sqrt of the largest eigenvalue of the float64 Gram
  matrix times 1 + 4(k + 1)u) every ``norm_refresh`` steps, and in between the increment
  ||W - s Q|| <= (||W|| + s ||Q||)(1 + 3u k') after each of our updates (k' = 1 for q = 1, inf,
  sqrt(min(r, c)) for q = 2).  A bound is kept together with a copy of the values it holds for
  (the weights as this optimizer last wrote them) and is only reused while the parameters still
  equal that copy (``torch.equal``); any other change (``load_state_dict``, user code) forces an
  exact recomputation.  ``norm_refresh=1`` makes every norm exact.
* q = 1, inf (:mod:`smoothchain.dsgd.sign`): one read-only pass over each gradient for its dual
  norm, arg maxima and a one-entry-per-column (row) update for the chosen layer only; with
  q = 1 a large layer is first screened by a Cauchy-Schwarz bound from one dot product.
* q = 2: a forward hook on every ``nn.Linear`` records the layer input X and, through a tensor
  hook, the gradient Delta at its output, so g_i = Delta^T [X | 1] has rank <= m (the batch)
  and the nuclear norm and polar factor come from m x m matrices.  The records are checked
  against the true ``.grad`` with a random probe (a stale record falls back to the dense
  route) and are cleared by ``zero_grad`` and ``step``.
"""

from __future__ import annotations

import functools
import math
import weakref
from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor, nn

from ..dsgd.bounds import ChainConstants, check_data, check_data_bound, parse_model
from ..dsgd.lowrank import certified_direction, polar_core, small_direction, small_polar, unit_roundoff
from ..dsgd.lowrank import gamma as gamma_n  # the rounding constant gamma_n = nu / (1 - nu)
from ..dsgd.norms import check_q, duality_map, spectral_norm
from ..dsgd.sign import SignDual, apply_sign_step, sign_dual
from ..dsgd.rates import stochastic_step_size, variance_bound

__all__ = ["DSGD", "DSGDStep", "dsgd_update", "step_size", "greedy_polar_layer",
           "greedy_sign_layer", "random_layer", "sequential_layer", "PolarDual", "PolarDuals",
           "SignDuals", "polar_dual", "polar_direction", "low_rank_factors", "weight_norm_bound",
           "incremented_norm_bound"]

VARIANTS = ("greedy", "all", "random", "sequential")
MODES = ("batch", "stochastic")
#: q = 2: layers with min(r, c) up to this get exact nuclear norms in the greedy screening at once
EXACT_NORM_MAX = 64
#: q = 1, inf: layers with at most this many weight entries get their arg maxima (for the
#: direction) together with the dual norm; larger ones only the maxima, and with q = 1 are first
#: screened with a Frobenius upper bound (see :func:`greedy_sign_layer`)
SIGN_INDEX_NUMEL = 1 << 15

@functools.lru_cache(maxsize=None)
def _unit_roundoff(dtype: torch.dtype) -> float:
    return unit_roundoff(dtype)


def _matrix(W: Tensor, b: Tensor | None) -> Tensor:
    """[W | b] (W alone without a bias), detached."""
    W = W.detach()
    return W if b is None else torch.cat([W, b.detach().reshape(-1, 1)], dim=1)


def _check_lr(lr) -> None:
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")


# --------------------------------------------------------------------------------------------
# weight norms (upper bounds) for p_i
def weight_norm_bound(W: Tensor, b: Tensor | None, q: float) -> float:
    """Certified upper bound on ||[W | b]||_q (q = 1, 2 or inf), computed from scratch."""
    W = W.detach()
    b = None if b is None else b.detach()
    r, c = W.shape[0], W.shape[1] + (0 if b is None else 1)
    if q == 1.0:
        cols = W.abs().sum(dim=0, dtype=torch.float64)
        val = float(cols.max())
        if b is not None:
            val = max(val, float(b.abs().sum(dtype=torch.float64)))
        return val * (1.0 + gamma_n(r + 1, torch.float64))
    if q == math.inf:
        rows = W.abs().sum(dim=1, dtype=torch.float64)
        if b is not None:
            rows = rows + b.abs().to(torch.float64)
        return float(rows.max()) * (1.0 + gamma_n(c + 1, torch.float64))
    # sqrt(lambda_max) of a float64 Gram matrix; eigvalsh is backward stable with error
    # ~ n u ||Gram||, covered by the relative slack below
    return spectral_norm(_matrix(W, b)) * (1.0 + 4 * (min(r, c) + 1) * unit_roundoff(torch.float64))


def incremented_norm_bound(bound: float, step_norm: float, dtype: torch.dtype,
                           round_k: float) -> float:
    """Certified ||W - s Q|| <= (||W|| + s ||Q||)(1 + 3 u k) after a stored update: the rounding
    of fl(W - sQ) adds at most 3 u k ||W - sQ|| with k = 1 (q = 1, inf: entrywise relative errors
    scale column / row sums) or sqrt(min(r, c)) (q = 2: ||E||_2 <= ||E||_F <= u ||W'||_F <=
    u sqrt(rank) ||W'||_2)."""
    return (bound + step_norm) * (1.0 + 3.0 * _unit_roundoff(dtype) * round_k)


# --------------------------------------------------------------------------------------------
# the step size (F Props. 4.3-4.4)
def step_size(lr: float, eps: float, ip: float, bound: float, p_i: float,
              bound_scaling: bool = True) -> float:
    """s = lr * eps * ip / (p_i^2 * bound^2): the certified step of the descent lemma (F Prop.
    4.4) along a direction Q with ip <= <g_i, Q> and bound >= ||Q||_q, p_i from F Prop. 4.3
    (``bound_scaling=False``: no division by p_i^2, F's tuned RANDOM / SEQUENTIAL)."""
    s = lr * eps * ip / (bound * bound)
    if bound_scaling:
        s /= p_i * p_i
    return s


# --------------------------------------------------------------------------------------------
# layer choice
def random_layer(K: int, generator: torch.Generator | None = None) -> int:
    """F Sec. 5.1's RANDOM: a layer uniformly at random (0-based; torch's global generator if
    ``generator`` is None)."""
    return int(torch.randint(K, (1,), generator=generator).item())


def sequential_layer(K: int, step: int) -> int:
    """F Sec. 5.1's SEQUENTIAL: layer ``step mod K`` (0-based) at the ``step``-th step (from 0)."""
    return step % K


def _first_argmax(ratios: dict[int, float], candidates: Sequence[int]) -> int:
    return max(candidates, key=lambda i: (ratios[i], -i))


def sign_screened(weights: Sequence[Tensor], q: float) -> list[bool]:
    """q = 1 greedy: the layers large enough to be screened first (see :func:`greedy_sign_layer`)."""
    K = len(weights)
    return [q == 1.0 and K > 1 and W.numel() > SIGN_INDEX_NUMEL for W in weights]


@functools.lru_cache(maxsize=None)
def _screen_factor(r: int, c: int, dtype: torch.dtype) -> float:
    """sqrt(c / (1 - gamma_n)) (1 + 1e-12) for n = r c entries in ``dtype``, so that
    ||G||_{1,*} <= factor * sqrt(fl(G . G)); inf where gamma_n is useless (>= 1)."""
    g = gamma_n(r * c, dtype)
    return math.sqrt(c / (1.0 - g)) * (1.0 + 1e-12) if g < 1.0 else math.inf


@functools.lru_cache(maxsize=None)
def _sign_ip_factor(r: int, c: int) -> float:
    """q = 1, inf: <G, Q> >= N (1 - gamma_{r+c+1}) (float64 summation of the exact maxima)."""
    return 1.0 - gamma_n(r + c + 1, torch.float64)


class SignDuals:
    """Per-step q = 1 / inf dual norms of the layers (:func:`smoothchain.dsgd.sign.sign_dual`),
    each computed at most once; ``duals[i]`` is None where it was not needed."""

    def __init__(self, grads_w: Sequence[Tensor], grads_b: Sequence[Tensor | None], q: float):
        self.grads_w, self.grads_b, self.q = grads_w, grads_b, q
        self.duals: list[SignDual | None] = [None] * len(grads_w)

    def __call__(self, i: int) -> SignDual:
        d = self.duals[i]
        if d is None:
            d = self.duals[i] = sign_dual(self.grads_w[i], self.grads_b[i], self.q,
                                          dense_max=SIGN_INDEX_NUMEL)
        return d

    def norms(self) -> list[float | None]:
        return [None if d is None else d.norm for d in self.duals]


def greedy_sign_layer(p: Sequence[float], duals: Callable[[int], SignDual],
                      grads_w: Sequence[Tensor], grads_b: Sequence[Tensor | None],
                      screened: Sequence[bool]) -> int:
    """i* = argmax_i ||g_i||_* / p_i (first maximiser), q = 1 / inf (F Algo. 4.1 line 9).

    q = 1 screening (``screened[i]``): the column maxima of a large gradient are a strided
    reduction, the slowest pass of the step, so a large layer is first bounded by Cauchy-Schwarz
    over its c columns, ||G||_{1,*} = sum_j max_i |G_ij| <= sum_j ||G_:j||_2 <= sqrt(c) ||G||_F,
    from one dot product (rounding: ||G||_F^2 <= fl(G . G) / (1 - gamma_n)).  A layer whose bound
    / p_i is below another layer's exact ratio cannot be the arg max and is skipped."""
    best, best_i = -1.0, 0
    K = len(screened)
    for i in range(K):
        if not screened[i]:
            r = duals(i).norm / p[i]
            if r > best:
                best, best_i = r, i
    for i in range(K):
        if not screened[i]:
            continue
        GW, gb = grads_w[i], grads_b[i]
        v = GW.reshape(-1)
        sq = torch.dot(v, v)
        if gb is not None:
            sq = sq + torch.dot(gb, gb)
        factor = _screen_factor(GW.shape[0], GW.shape[1] + (0 if gb is None else 1), GW.dtype)
        if math.sqrt(float(sq)) * factor / p[i] < best:
            continue
        r = duals(i).norm / p[i]
        if r > best or (r == best and i < best_i):
            best, best_i = r, i
    return best_i


# --------------------------------------------------------------------------------------------
# q = 2: low-rank factors, dual norms and polar directions
def _probe(probes: list, i: int, c: int, dtype: torch.dtype) -> Tensor:
    """Layer i's fixed random probe vector (seed 1234 + i), cached in ``probes[i]``."""
    v = probes[i]
    if v is None or v.dtype != dtype or v.shape[0] != c:
        g = torch.Generator().manual_seed(1234 + i)
        v = probes[i] = torch.randn(c, generator=g, dtype=torch.float64).to(dtype)
    return v


def low_rank_factors(records: Sequence[tuple[Tensor, Tensor]], GW: Tensor, gb: Tensor | None,
                     probe: Callable[[int, torch.dtype], Tensor], *, untouched: bool = False):
    """(A, X) with [G_W | g_b] = A [X | 1] (A = Delta^T) from a layer's hook records (input X,
    output gradient Delta per backward), or None: no records, not low rank (batch >= min(r, c)),
    another dtype, or the records do not match the gradient.  The match: with ``untouched``
    (G_W is the tensor autograd left after the recorded backward passes, unmodified since --
    see ``DSGD._untouched``) and a bias, g_b = Delta^T 1 is compared, which catches records
    of other passes, averaged (DDP) or rescaled gradients; otherwise [G_W | g_b] v and
    Delta^T ([X | 1] v) for the fixed random ``v = probe(c, dtype)``."""
    if not records:
        return None
    r, n = GW.shape
    c = n + (0 if gb is None else 1)
    xs = [x.reshape(-1, n) for x, _ in records]
    ds = [g.reshape(-1, r) for _, g in records]
    m = sum(x.shape[0] for x in xs)
    if m >= min(r, c):
        return None
    X = xs[0] if len(xs) == 1 else torch.cat(xs)
    D = ds[0] if len(ds) == 1 else torch.cat(ds)
    if X.dtype != GW.dtype or D.dtype != GW.dtype:
        return None
    if untouched and gb is not None:
        gap = float(torch.linalg.vector_norm(gb - D.sum(0)))
        if not gap <= 1e-4 * math.sqrt(m) * float(torch.linalg.vector_norm(D)) + 1e-30:
            return None
        return D.T, X
    v = probe(c, GW.dtype)
    vw = v[:n]
    Xv = X @ vw
    Gv = GW @ vw
    if gb is not None:
        Xv = Xv + v[-1]
        Gv = Gv + gb * v[-1]
    Fv = D.T @ Xv
    scale = float(torch.linalg.vector_norm(D)) * float(torch.linalg.vector_norm(Xv))
    if not float(torch.linalg.vector_norm(Gv - Fv)) <= 1e-4 * scale + 1e-30:
        return None
    return D.T, X


class PolarDual(NamedTuple):
    """||g_i||_* (F eq. 26, q = 2) of one layer and what its direction needs.

    ``kind`` "svd": ``core`` is rho_2(G) (F eq. 28, float64), ``data`` None; "factored": ``core``
    the m x m :class:`~smoothchain.dsgd.lowrank.PolarCore` of A [X | 1], ``data`` (A, X);
    "dense": ``core`` the core of the dense gradient, ``data`` (G, transposed); "small" (min(r, c)
    <= 64, CPU): ``core`` the :class:`~smoothchain.dsgd.lowrank.SmallPolar` of the dense
    gradient, ``data`` (dtype, transposed)."""

    kind: str
    norm: float
    core: object
    data: tuple | None


def polar_dual(GW: Tensor, gb: Tensor | None, method: str, factors=None) -> PolarDual:
    """The q = 2 dual norm of [G_W | g_b]: by LAPACK SVD (``method="svd"``), from the low-rank
    ``factors`` (A, X) when given, else from the dense gradient's Gram core."""
    if method == "svd":
        rho, N = duality_map(_matrix(GW, gb).to(torch.float64), 2, method="svd")
        return PolarDual("svd", N, rho, None)
    if factors is not None:
        A, X = factors
        core = polar_core(A, X, ones_column=gb is not None)
        return PolarDual("factored", core.nuclear, core, (A, X))
    r, c = GW.shape[0], GW.shape[1] + (0 if gb is None else 1)
    transposed = r > c
    if min(r, c) <= EXACT_NORM_MAX and GW.device.type == "cpu" and GW.dtype in (torch.float32, torch.float64):
        sp = small_polar(GW, gb, transposed)
        return PolarDual("small", sp.nuclear, sp, (GW.dtype, transposed))
    G = _matrix(GW, gb)
    core = polar_core(None, G.T if transposed else G)
    return PolarDual("dense", core.nuclear, core, (G, transposed))


def polar_direction(dual: PolarDual, GW: Tensor, gb: Tensor | None):
    """(Q_W, q_b, ip, bound): the direction Q ~ U V^T (F eq. 28) split as [Q_W | q_b] (q_b None
    without a bias) with ip <= <g_i, Q> and bound >= ||Q||_2 certified; (None, None, 0, 1) for a
    zero gradient."""
    n = GW.shape[1]
    if dual.kind == "svd":
        N = dual.norm
        if N <= 0:
            return None, None, 0.0, 1.0
        Q = dual.core / N  # rho / N
        bound = spectral_norm(Q) * (1.0 + 8 * unit_roundoff(torch.float64) * (min(Q.shape) + 1))
        G = _matrix(GW, gb).to(torch.float64)
        ip = float((G * Q).sum()) * (1.0 - gamma_n(G.numel(), torch.float64))
        Qw = Q.to(GW.dtype)
        return Qw[:, :n], (Qw[:, n] if gb is not None else None), ip, bound
    if dual.kind == "factored":
        A, X = dual.data
        return certified_direction(dual.core, A, X, (GW, gb) if gb is not None else GW,
                                   bias_column=gb is not None)
    if dual.kind == "small":
        dtype, transposed = dual.data
        Q, ip, bound = small_direction(dual.core, dtype)
        if Q is None:
            return None, None, 0.0, 1.0
        Q = Q.T if transposed else Q
        return Q[:, :n], (Q[:, n] if gb is not None else None), ip, bound
    G, transposed = dual.data
    Bm = G.T if transposed else G
    Q, _, ip, bound = certified_direction(dual.core, None, Bm, Bm)
    if Q is None:
        return None, None, 0.0, 1.0
    Q = Q.T if transposed else Q
    return Q[:, :n], (Q[:, n] if gb is not None else None), ip, bound


class PolarDuals:
    """Per-step q = 2 factors (:func:`low_rank_factors`) and dual norms (:func:`polar_dual`) of
    the layers, each computed at most once; ``duals(i)`` is layer i's :class:`PolarDual`.
    ``records[i]``: layer i's hook records (None: none), ``probes``: per-layer probe cache."""

    def __init__(self, grads_w: Sequence[Tensor], grads_b: Sequence[Tensor | None], method: str,
                 records: Sequence[Sequence] | None, probes: list, untouched: Sequence[bool] | None = None):
        self.grads_w, self.grads_b, self.method = grads_w, grads_b, method
        self.records, self.probes = records, probes
        self.untouched = untouched
        self.duals: dict[int, PolarDual] = {}
        self._factors: dict[int, tuple | None] = {}

    def factors(self, i: int):
        if i not in self._factors:
            recs = self.records[i] if self.records is not None else ()
            self._factors[i] = low_rank_factors(
                recs, self.grads_w[i], self.grads_b[i],
                lambda c, dtype: _probe(self.probes, i, c, dtype),
                untouched=bool(self.untouched and self.untouched[i]))
        return self._factors[i]

    def __call__(self, i: int) -> PolarDual:
        d = self.duals.get(i)
        if d is None:
            fac = None if self.method == "svd" else self.factors(i)
            d = self.duals[i] = polar_dual(self.grads_w[i], self.grads_b[i], self.method, fac)
        return d

    def norms(self) -> list[float | None]:
        return [self.duals[i].norm if i in self.duals else None for i in range(len(self.grads_w))]


def _row_norm_bounds(M: Tensor) -> Tensor:
    """Float64 upper bounds on the 2-norms of M's rows, computed in M's dtype: a sum of n squares
    in any order is within gamma_{n+1} of its value (and the norm's square root within u), and each square that underflows loses at
    most the dtype's smallest normal number (F's step needs only an upper bound here)."""
    n = M.shape[1]
    fin = torch.finfo(M.dtype)
    sq = torch.linalg.vector_norm(M, dim=1).to(torch.float64).square()
    return (sq * (1.0 + gamma_n(n + 4, M.dtype)) + 2 * n * fin.tiny).sqrt() * (1.0 + 2 * unit_roundoff(torch.float64))


def _polar_screen(p: Sequence[float], duals: PolarDuals) -> list[int]:
    """Layers that can maximise ||g_i||_* / p_i.  Small layers (min(r, c) <= 64) get their
    exact nuclear norm at once; a large layer only gets the upper bound
    ||G||_* <= sum_k ||delta_k|| ||[x_k; 1]|| from the hooks' factors (the triangle inequality
    over the batch's rank-one terms), else ||G||_* <= sqrt(min(r, c)) ||G||_F.  A large layer
    whose upper bound is below a small layer's exact ratio is never the arg max, so its b x b
    core is not computed.  Large layers left in the race keep the lower bound ||G||_F."""
    best = 0.0
    upper: dict[int, float] = {}
    for i in range(len(p)):
        GW, gb = duals.grads_w[i], duals.grads_b[i]
        r, c = GW.shape[0], GW.shape[1] + (0 if gb is None else 1)
        if min(r, c) <= EXACT_NORM_MAX:
            best = max(best, duals(i).norm / p[i])
            continue
        fac = duals.factors(i)
        if fac is not None:
            A, X = fac
            upper[i] = _factor_nuclear_bound(A, X, gb is not None) / p[i]
        else:
            fro = float(_row_norm_bounds(GW.reshape(1, -1))[0])
            if gb is not None:
                fro = math.hypot(fro, float(_row_norm_bounds(gb.reshape(1, -1))[0]))
            upper[i] = fro * math.sqrt(min(r, c)) * (1.0 + 1e-12) / p[i]
    return [i for i in range(len(p)) if i not in upper or upper[i] >= best]


def _factor_nuclear_bound(A: Tensor, X: Tensor, ones_column: bool) -> float:
    """An upper bound on sum_k ||a_k|| ||[x_k; 1]|| (a_k the columns of A, x_k the rows of X;
    without the 1 when not ``ones_column``) >= ||A [X | 1]||_*, computed in the factors' dtype
    in four operations: each computed norm is within (1 + gamma_{n+1}) of the exact one up to
    the squares that underflow, which lose at most sqrt(n tiny) (a norm), and a sum of m
    nonnegative products within gamma_{m+1} (all margins applied to the final float)."""
    m, n = X.shape
    r = A.shape[0]
    a = torch.linalg.vector_norm(A.T, dim=1)  # A = Delta^T: the contiguous rows of Delta
    x = torch.linalg.vector_norm(X, dim=1)
    if ones_column:
        x = torch.hypot(x, torch.ones((), dtype=x.dtype))
        n += 1
    # the three sums in one product: [a; 1] [x, 1]^T = [[a.x, sum a], [sum x, m]]
    ones = torch.ones(m, dtype=a.dtype)
    (total, sum_a), (sum_x, _) = (torch.stack((a, ones)) @ torch.stack((x, ones)).T).tolist()
    dtype = X.dtype
    tiny = torch.finfo(dtype).tiny
    ea, ex = math.sqrt(r * tiny), math.sqrt(n * tiny)
    ga, gx, gm = gamma_n(r + 2, dtype), gamma_n(n + 2, dtype), gamma_n(m + 1, dtype)
    # exact norms: a_k <= ca_k (1 + ga) + ea, x_k <= cx_k (1 + gx) + ex, so
    # sum a_k x_k <= (1+ga)(1+gx) sum ca_k cx_k + ex (1+ga) sum ca_k + ea (1+gx) sum cx_k + m ea ex,
    # and each computed sum is within (1 + gm) of the exact sum of its computed terms
    bound = ((1 + ga) * (1 + gx) * total + ex * (1 + ga) * sum_a + ea * (1 + gx) * sum_x) * (1 + gm) + m * ea * ex
    return bound * (1.0 + 1e-12)


def greedy_polar_layer(p: Sequence[float], duals: PolarDuals, screen: bool = True) -> int:
    """i* = argmax_i ||g_i||_* / p_i (first maximiser), q = 2 (F Algo. 4.1 line 9), the large
    layers first screened by upper bounds (:func:`_polar_screen`) when ``screen``."""
    candidates = list(range(len(p)))
    if len(p) > 1 and screen:
        candidates = _polar_screen(p, duals)
    if len(candidates) == 1:
        return candidates[0]
    return _first_argmax({i: duals(i).norm / p[i] for i in candidates}, candidates)


# --------------------------------------------------------------------------------------------
# the functional step
class DSGDStep(NamedTuple):
    """What :func:`dsgd_update` did: ``layers`` (0-based, in update order), per layer
    ``dual_norms`` (||g_i||_*, None where not computed) and ``certified`` (ip / bound, None for
    layers not chosen, 0 for a chosen layer left in place), and ``step_norms`` {layer: certified
    upper bound on ||s Q||_q} of the layers actually moved."""

    layers: list[int]
    dual_norms: list[float | None]
    certified: list[float | None]
    step_norms: dict[int, float]


def _abs_buffer(abs_buffers: list | None, i: int, W: Tensor) -> Tensor | None:
    """Layer i's persistent buffer for |G_W| when the layer is large (None otherwise, or when no
    buffers are kept; see :mod:`smoothchain.dsgd.sign`)."""
    if abs_buffers is None or W.numel() <= SIGN_INDEX_NUMEL:
        return None
    buf = abs_buffers[i]
    if buf is None or buf.dtype != W.dtype or buf.shape != W.shape:
        buf = abs_buffers[i] = torch.empty(W.shape, dtype=W.dtype)
    return buf


def _polar_update(duals: PolarDuals, i: int, W: Tensor, b: Tensor | None):
    """(update, ip, bound) for layer i, q = 2: the polar direction of :func:`polar_direction`
    (update None for a zero gradient)."""
    QW, qb, ip, bound = polar_direction(duals(i), duals.grads_w[i], duals.grads_b[i])
    if QW is None:
        return None, 0.0, 1.0

    def update(s: float) -> None:
        W.add_(QW, alpha=-s)
        if qb is not None:
            b.add_(qb, alpha=-s)
    return update, ip, bound


def _sign_update(duals: SignDuals, i: int, W: Tensor, b: Tensor | None, buf: Tensor | None):
    """(update, ip, bound) for layer i, q = 1 / inf: F's sign matrix Q (eqs. 27, 29), for which
    ||Q||_q = 1 and <g_i, Q> = ||g_i||_* up to the float64 summation of the maxima."""
    d = duals(i)
    r, n = duals.grads_w[i].shape
    ip = d.norm * _sign_ip_factor(r, n + (0 if b is None else 1))
    return (lambda s: apply_sign_step(W, b, d, duals.q, s, buf=buf)), ip, 1.0


def _choose(variant: str, K: int, greedy: Callable[[], int], generator, step: int) -> list[int]:
    if variant == "greedy":
        return [greedy()]
    if variant == "all":
        return list(range(K))
    if variant == "random":
        return [random_layer(K, generator)]
    if variant == "sequential":
        return [sequential_layer(K, step)]
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")


def dsgd_update(weights: Sequence[Tensor], biases: Sequence[Tensor | None],
                grads_w: Sequence[Tensor], grads_b: Sequence[Tensor | None],
                p: Sequence[float], lrs: Sequence[float], *, q: float, variant: str = "greedy",
                eps: float = 1.0, bound_scaling: bool = True, method: str = "auto",
                step: int = 0, generator: torch.Generator | None = None,
                records: Sequence[Sequence] | None = None, probes: list | None = None,
                abs_buffers: list | None = None, screened: Sequence[bool] | None = None,
                untouched: Sequence[bool] | None = None) -> DSGDStep:
    """One DSGD step (F Algo. 4.1 lines 9-10) on plain tensors, in place and without autograd
    (call it under ``torch.no_grad()``).

    Layer i is [``weights[i]`` | ``biases[i]``] (bias None: none) with gradient [``grads_w[i]`` |
    ``grads_b[i]``] (detached, zeros for a missing one), p_i(w) = ``p[i]`` (F Prop. 4.3) and
    learning rate ``lrs[i]``; ``q`` is 1.0, 2.0 or math.inf.  ``variant`` picks the layers
    (``step``, the number of steps taken so far, drives "sequential"; ``generator`` "random"),
    each moved by s Q with s = :func:`step_size` (``eps`` the theoretical step).  q = 2:
    ``method`` "auto"/"gram"/"svd" as for :class:`DSGD`, ``records[i]`` the (input, output
    gradient) pairs hooked for layer i (None: dense route), ``probes`` a per-layer cache of the
    records' probe vectors, ``untouched[i]`` whether layer i's weight gradient is known to be
    autograd's, unmodified, from the recorded passes (:func:`low_rank_factors`).  q = 1, inf:
    ``abs_buffers`` per-layer scratch buffers for large layers (None: temporaries),
    ``screened`` the q = 1 screening flags (default :func:`sign_screened`).  The caller keeps
    whatever state it needs (weight-norm bounds from ``step_norms``)."""
    K = len(weights)
    duals: PolarDuals | SignDuals
    if q == 2.0:
        duals = PolarDuals(grads_w, grads_b, method, records,
                           probes if probes is not None else [None] * K, untouched)
        chosen = _choose(variant, K, lambda: greedy_polar_layer(p, duals, screen=method != "svd"),
                         generator, step)
    else:
        duals = SignDuals(grads_w, grads_b, q)
        flags = sign_screened(weights, q) if screened is None else screened
        chosen = _choose(variant, K, lambda: greedy_sign_layer(p, duals, grads_w, grads_b, flags),
                         generator, step)
    certified: list[float | None] = [None] * K
    step_norms: dict[int, float] = {}
    for i in chosen:
        if q == 2.0:
            update, ip, bound = _polar_update(duals, i, weights[i], biases[i])
        else:
            update, ip, bound = _sign_update(duals, i, weights[i], biases[i],
                                             _abs_buffer(abs_buffers, i, weights[i]))
        if update is None or not ip > 0.0:
            certified[i] = 0.0
            continue
        s = step_size(lrs[i], eps, ip, bound, p[i], bound_scaling)
        update(s)
        certified[i] = ip / bound
        step_norms[i] = s * bound
    return DSGDStep(chosen, duals.norms(), certified, step_norms)


# --------------------------------------------------------------------------------------------
# the optimizer: state and bookkeeping around dsgd_update
class _NormBound(NamedTuple):
    """A certified upper bound on ||[W_i | b_i]||_q, valid while the parameters equal ``weight``
    / ``bias`` (copies of the values it was computed or incremented for)."""

    bound: float
    weight: Tensor
    bias: Tensor | None
    steps: int  # increments since the last exact computation


def _same(t: Tensor | None, copy: Tensor | None) -> bool:
    if t is None or copy is None:
        return t is None and copy is None
    return t.dtype == copy.dtype and t.shape == copy.shape and torch.equal(t, copy)


def _copy_into(t: Tensor | None, copy: Tensor | None) -> Tensor | None:
    """``copy`` overwritten with t's values (a fresh copy if it does not fit)."""
    if t is None:
        return None
    t = t.detach()
    if copy is None or copy.dtype != t.dtype or copy.shape != t.shape:
        return t.clone(memory_format=torch.contiguous_format)
    return copy.copy_(t)


class DSGD(torch.optim.Optimizer):
    """Duality structure gradient descent for an ``nn.Sequential`` of ``nn.Linear`` layers, each
    followed by a bounded activation (sigmoid, tanh); F Algo. 4.1.

    Args:
        model: the network; its Linear layers are the K layers, input to output.
        q: 1, 2 or math.inf -- the layer norms (F Assumption 4.2, Prop. 4.5).
        variant: "greedy" (F Algo. 4.1), "all", "random" or "sequential".
        lr: multiplier of the theoretical step (1 = F Thm 4.8 / 4.12).
        data_bound: D with ||x||_inf, ||z||_inf <= D for inputs and targets (F Assumption 4.1 ii).
        mode: "batch" (closure returns the full objective) or "stochastic" (a mini-batch mean).
        gamma: stochastic mode only: the target of F Thm 4.12; sets eps from gamma and sigma2.
        sigma2: variance bound for ``gamma`` (default: ``variance_bound(model, q, batch_size)``).
        batch_size: mini-batch size b, needed for the default sigma2.
        seed: seed of the "random" variant's generator (default: torch's global generator).
        bound_scaling: divide steps by p_i(w)^2 (required for "greedy").
        method: q = 2 route: "auto" (low-rank/Gram core, certified), "gram" (the same, never
            using the hooks' factors) or "svd" (LAPACK SVD of the dense gradient, the reference).
        capture: "auto" (hooks record layer inputs / output gradients when q = 2) or "none".
        norm_refresh: exact recomputation period of the incremental weight-norm bounds.

    After :meth:`step`, ``last_layers`` lists the updated layers (1-based), ``last_p`` the
    p_i(w) used, ``last_dual_norms`` the ||g_i||_* computed (None where not needed) and
    ``last_certified`` the certified ip / bound of each updated layer.  The step itself is
    :func:`dsgd_update`.
    """

    def __init__(self, model: nn.Module, q=2, variant: str = "greedy", lr: float = 1.0, *,
                 data_bound: float = 1.0, mode: str = "batch", gamma: float | None = None,
                 sigma2: float | None = None, batch_size: int | None = None,
                 seed: int | None = None, bound_scaling: bool = True, method: str = "auto",
                 capture: str = "auto", norm_refresh: int = 10):
        self.q = check_q(q)
        self._check_options(variant, mode, method, capture, norm_refresh, bound_scaling)
        _check_lr(lr)
        self.data_bound = check_data_bound(data_bound)
        self.variant, self.mode, self.method = variant, mode, method
        self.bound_scaling = bool(bound_scaling)
        self.norm_refresh = norm_refresh
        self._layers = parse_model(model)
        self.model = model
        self._consts = ChainConstants.build(self._layers, self.q, self.data_bound)
        self.gamma = gamma
        self.sigma2, self.theory_step = self._theory_step(model, mode, gamma, sigma2, batch_size)

        groups = []
        for spec in self._layers:
            params = [spec.linear.weight] + ([spec.linear.bias] if spec.bias else [])
            groups.append({"params": params, "layer": spec.index})
        super().__init__(groups, {"lr": lr})
        self._generator = None if seed is None else torch.Generator().manual_seed(int(seed))
        self.last_layers: list[int] = []
        self.last_p: list[float] = []
        self.last_dual_norms: list[float | None] = []
        self.last_certified: list[float | None] = []
        # the layers' parameters (the tensors of the param groups), looked up once
        self._W = [sp.linear.weight for sp in self._layers]
        self._b = [sp.linear.bias if sp.bias else None for sp in self._layers]
        K = len(self._layers)
        #: per-layer weight-norm bound (:class:`_NormBound`), None until first needed
        self._norm_cache: list[_NormBound | None] = [None] * K
        # rounding constant of incremented_norm_bound: 1 (q = 1, inf) or sqrt(min(r, c)) (q = 2)
        self._round_k = [math.sqrt(min(sp.out_features, sp.in_features + int(sp.bias)))
                         if self.q == 2.0 else 1.0 for sp in self._layers]
        self._screened = sign_screened(self._W, self.q)
        self._abs_bufs: list[Tensor | None] = [None] * K
        self._probes: list[Tensor | None] = [None] * K
        self._records: list[list] = [[] for _ in self._layers]
        self._seen: list[tuple | None] = [None] * K  # see _untouched
        self._hooks = []
        if capture == "auto" and self.q == 2.0 and method == "auto":
            for i, spec in enumerate(self._layers):
                # a small layer's dense core is no larger than a factored one: no hook (a
                # module hook costs every forward and backward pass)
                if min(spec.out_features, spec.in_features + int(spec.bias)) > EXACT_NORM_MAX:
                    self._hooks.append(spec.linear.register_forward_hook(self._make_hook(i)))
                    self._hooks.append(self._W[i].register_post_accumulate_grad_hook(self._make_watch(i)))

    @staticmethod
    def _check_options(variant, mode, method, capture, norm_refresh, bound_scaling) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if method not in ("auto", "svd", "gram"):
            raise ValueError(f"method must be 'auto', 'svd' or 'gram', got {method!r}")
        if capture not in ("auto", "none"):
            raise ValueError(f"capture must be 'auto' or 'none', got {capture!r}")
        if isinstance(norm_refresh, bool) or not isinstance(norm_refresh, int) or norm_refresh < 1:
            raise ValueError(f"norm_refresh must be a positive integer, got {norm_refresh!r}")
        if not bound_scaling and variant == "greedy":
            raise ValueError("variant 'greedy' needs bound_scaling=True (its choice uses p_i)")

    def _theory_step(self, model, mode, gamma, sigma2, batch_size) -> tuple[float | None, float]:
        """(sigma2, eps): eps = 1 (F Thm 4.8), or F Thm 4.12's step for a target ``gamma``."""
        if gamma is None:
            if sigma2 is not None:
                raise ValueError(f"sigma2={sigma2!r} is only used together with gamma")
            return None, 1.0
        if mode != "stochastic":
            raise ValueError(f"gamma (F Thm 4.12) is only used in stochastic mode, got "
                             f"gamma={gamma!r} with mode={mode!r}")
        if sigma2 is None:
            if batch_size is None:
                raise ValueError("stochastic mode with gamma needs batch_size (or sigma2)")
            sigma2 = variance_bound(model, self.q, batch_size, self.data_bound)
        return float(sigma2), stochastic_step_size(gamma, sigma2)

    # ----------------------------------------------------------------------------------------
    # checkpoints: the incremental norm bounds and the "random" generator travel with the state
    def state_dict(self):
        sd = super().state_dict()
        sd["dsgd"] = {"norm_cache": [None if c is None else (c.bound, c.steps) for c in self._norm_cache],
                      "generator": None if self._generator is None else self._generator.get_state()}
        return sd

    def load_state_dict(self, state_dict) -> None:
        """Restore; load the model's weights first (the restored norm bounds are attached to
        the parameters' current values, so a resumed run repeats an uninterrupted one)."""
        state_dict = dict(state_dict)
        extra = state_dict.pop("dsgd", None)
        super().load_state_dict(state_dict)
        if extra is None:
            return
        for i, c in enumerate(extra.get("norm_cache", [])):
            if c is None or i >= len(self._layers):
                continue
            self._norm_cache[i] = _NormBound(float(c[0]), *self._snapshot(i), int(c[1]))
        if extra.get("generator") is not None and self._generator is not None:
            self._generator.set_state(extra["generator"])

    # ----------------------------------------------------------------------------------------
    # factor capture (q = 2)
    def _make_hook(self, i: int):
        records = self._records
        spec = self._layers[i]
        # the factors serve only while the batch is below min(r, c) (low_rank_factors): a batch
        # at least that large is not recorded at all (its dense Gram core is as small)
        rank_cap = min(spec.out_features, spec.in_features + int(spec.bias))

        def hook(mod, inputs, out):
            if not (torch.is_grad_enabled() and out.requires_grad):
                return
            x = inputs[0].detach()
            if x.numel() >= rank_cap * x.shape[-1]:
                return

            def grad_hook(g, x=x):
                records[i].append((x, g.detach()))

            out.register_hook(grad_hook)

        return hook

    def _make_watch(self, i: int):
        """After autograd accumulates layer i's weight gradient: remember that tensor, its
        version and the records so far (:meth:`_untouched`)."""
        seen, records = self._seen, self._records

        def watch(param):
            g = param.grad  # held weakly: an old gradient is not kept alive by the watch
            seen[i] = (weakref.ref(g), g._version, len(records[i])) if g is not None else None

        return watch

    def _untouched(self, i: int) -> bool:
        """Whether layer i's weight gradient is the tensor autograd accumulated last, unmodified
        since (same object, same version counter: any in-place change -- clipping, unscaling,
        DDP's averaging, weight decay added to it -- bumps it) with one record per recorded
        pass.  Records of a pass that did not reach ``.grad`` (another ``zero_grad``) are caught
        by the bias test of :func:`low_rank_factors`."""
        seen, g = self._seen[i], self._W[i].grad
        return (seen is not None and g is not None and g is seen[0]() and g._version == seen[1]
                and seen[2] == len(self._records[i]))

    def remove_hooks(self) -> None:
        """Remove the factor-capturing hooks (q = 2 then uses the dense route)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._clear_records()

    def _clear_records(self) -> None:
        for r in self._records:
            r.clear()
        self._seen[:] = [None] * len(self._seen)  # in place: the watches hold this list

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._clear_records()
        super().zero_grad(set_to_none=set_to_none)

    def _factors(self, i: int, GW: Tensor, gb: Tensor | None):
        """(A, X) with [GW | gb] = A [X | 1] (A = Delta^T) if layer i's records match the gradient
        (:func:`low_rank_factors`), else None."""
        recs = self._records[i] if self._hooks else ()
        return low_rank_factors(recs, GW, gb, lambda c, dtype: _probe(self._probes, i, c, dtype),
                                untouched=bool(self._hooks) and self._untouched(i))

    # ----------------------------------------------------------------------------------------
    # weight norms (upper bounds) and p_i
    def _snapshot(self, i: int, old: _NormBound | None = None) -> tuple[Tensor, Tensor | None]:
        """Copies of layer i's current weight and bias (reusing ``old``'s buffers)."""
        return (_copy_into(self._W[i], None if old is None else old.weight),
                _copy_into(self._b[i], None if old is None else old.bias))

    def _norm_bound(self, i: int) -> float:
        """Certified upper bound on ||[W_i | b_i]||_q: the cached one while fewer than
        ``norm_refresh`` increments were added and the parameters still hold the values this
        optimizer last wrote (compared with a copy; any change elsewhere -- user code,
        ``load_state_dict`` -- fails the comparison), else exact (:func:`weight_norm_bound`)."""
        c = self._norm_cache[i]
        if (c is not None and c.steps < self.norm_refresh
                and _same(self._W[i], c.weight) and _same(self._b[i], c.bias)):
            return c.bound
        val = weight_norm_bound(self._W[i], self._b[i], self.q)
        self._norm_cache[i] = _NormBound(val, *self._snapshot(i, c), 0)
        return val

    def _after_update(self, i: int, step_norm: float) -> None:
        """Certified increment ||W - s Q|| <= ||W|| + s ||Q|| (+ rounding of the stored result)."""
        c = self._norm_cache[i]
        if c is not None:
            # c's copies match the parameters' shapes and dtypes: they were checked against (or
            # taken from) them by _norm_bound at the start of this step
            W, b = self._W[i], self._b[i]
            c.weight.copy_(W.detach())
            if b is not None:
                c.bias.copy_(b.detach())
            bound = incremented_norm_bound(c.bound, step_norm, W.dtype, self._round_k[i])
            self._norm_cache[i] = _NormBound(bound, c.weight, c.bias, c.steps + 1)

    def layer_bounds(self) -> list[float]:
        """p_i(w) of F Prop. 4.3 at the current weights (F eq. 23), from certified norm bounds."""
        nb = self._norm_bound
        return self._consts.p([0.0] + [nb(i) for i in range(1, len(self._W))])

    def check_data(self, x, z=None, *, rescale: bool = False):
        """F Assumption 4.1 (ii) for this optimizer's ``data_bound`` (see ``bounds.check_data``)."""
        return check_data(x, z, self.data_bound, rescale=rescale)

    # ----------------------------------------------------------------------------------------
    # the step
    def _grads(self, i: int):
        """(G_W, g_b) of layer i, detached; a missing gradient counts as zero."""
        W, b = self._W[i], self._b[i]
        GW = W.grad
        GW = torch.zeros_like(W) if GW is None else GW.detach()
        if b is None:
            return GW, None
        gb = b.grad
        return GW, (torch.zeros_like(b) if gb is None else gb.detach())

    def _learning_rates(self) -> list[float]:
        lrs = []
        for group in self.param_groups:
            lr = group["lr"]
            if type(lr) is not float or not 0.0 < lr < math.inf:
                _check_lr(lr)
            lrs.append(lr)
        return lrs

    def step(self, closure=None):
        """One step of F Algo. 4.1; ``closure`` (optional) re-evaluates the objective, calls
        ``backward()`` and returns the loss, which ``step`` returns."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.set_grad_enabled(False):
            self._step()
        return loss

    def _step(self) -> None:
        lrs = self._learning_rates()
        p = self.layer_bounds()
        grads = [self._grads(i) for i in range(len(self._W))]
        state = self.state[self._W[0]]
        result = dsgd_update(
            self._W, self._b, [g for g, _ in grads], [g for _, g in grads], p, lrs,
            q=self.q, variant=self.variant, eps=self.theory_step,
            bound_scaling=self.bound_scaling, method=self.method,
            step=state.get("dsgd_step", 0), generator=self._generator,
            records=self._records if self._hooks else None, probes=self._probes,
            abs_buffers=self._abs_bufs, screened=self._screened,
            untouched=[self._untouched(i) for i in range(len(self._W))] if self._hooks else None)
        for i, step_norm in result.step_norms.items():
            self._after_update(i, step_norm)
        state["dsgd_step"] = state.get("dsgd_step", 0) + 1
        if self._hooks:
            self._clear_records()
        self.last_layers = [i + 1 for i in result.layers]
        self.last_p = p
        self.last_dual_norms = result.dual_norms
        self.last_certified = result.certified

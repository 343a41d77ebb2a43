"""Fast, certified q = 2 duality-map steps from a low-rank factorisation (F Prop. 4.5, eq. 28).

The gradient of a linear layer over a batch of m examples is G = A Bm with A = Delta^T (r x m,
the gradients at the layer's outputs) and Bm = [X | 1] (m x c, the layer's augmented inputs), so
rank G <= m.  Its nuclear norm ||G||_* (F eq. 26, q = 2) and polar factor U V^T (F eq. 28)
follow from m x m matrices only:

    Ka = A^T A,  Kb = Bm Bm^T = L L^T (Cholesky),  S = L^T Ka L = W Lam W^T,
    sigma_i(G)^2 = Lam_i  (eig(Ka Kb) = eig(L^T Ka L)),  ||G||_* = sum_i sqrt(Lam_i),
    U V^T = A M Bm  with  M = L W Lam^{-1/2} W^T L^{-1}.

(Check: G^T G = Bm^T Ka Bm = Y^T S Y with Y = L^{-1} Bm, Y Y^T = I, so (G^T G)^{+1/2} =
Y^T W Lam^{-1/2} W^T Y and G (G^T G)^{+1/2} = A L W Lam^{-1/2} W^T L^{-1} Bm.)  A dense gradient
is the case A = I_r (then Ka = I and Kb = G G^T); :func:`polar_core` takes ``A=None`` for it.

**The step is certified, not the direction.**  Rounding (float32 layers, ill-conditioned Kb,
the jitter added when the Cholesky factorisation fails, dropped eigenvalues) makes the computed
Q^ only close to U V^T.  F Prop. 4.4's descent lemma needs neither: for any Q^ and the layer's
bound ||d^2 f / d w_i^2||_2 <= p^2 (F Prop. 4.3),

    f(w - s Q^) <= f(w) - s <G, Q^> + s^2 p^2 ||Q^||_2^2 / 2,

so with a certified lower bound ``ip`` <= <G, Q^> (computed from the true ``.grad``) and a
certified upper bound ``bound`` >= ||Q^||_2, the step s = lr * ip / (p^2 bound^2) decreases f by
at least (lr - lr^2/2) (ip / bound)^2 / p^2 (> 0 for 0 < lr < 2).  With exact arithmetic
ip = ||G||_* and bound = 1, which is F Algo. 4.1 line 10 exactly.  ``ip / bound`` <= ||G||_* is
the certified dual norm reported as ``certified``.

Error budget (u = unit roundoff of the dtype; gamma_n = n u / (1 - n u)):

* ||Q^||_2 where Q^ = fl(P Bm), P = fl(A M) in the layer dtype:
  ||P Bm||_2^2 = lambda_max(P Kb P^T) <= lambda_max(C) + ||E_chol||_2 ||P||_F^2, C = L^T P^T P L,
  and Kb = fl(Bm Bm^T) carries |error| <= gamma_c |Bm| |Bm|^T; both bounded by
  (gamma_{m+1} + gamma_c)(64-bit) * tr(Kb + jitter I) * ||P||_F^2.  In exact arithmetic C is the
  orthogonal projector W_k W_k^T, so lambda_max(C) <= 1 + ||C - W_k W_k^T||_F (evaluated in
  float64, plus gamma_{2m} ||C||_F for its own rounding).  The float32/64 product fl(P Bm)
  adds at most gamma_m(dtype) ||P||_F ||Bm||_F (Frobenius bound of the standard GEMM error).
* <G, Q^>: entrywise products rounded in the layer dtype, summed in float64:
  |error| <= (u(dtype) + gamma_n(64-bit)) ||G||_F ||Q^||_F.
* The nuclear norm used for the greedy *choice* comes from eig(S) in float64: singular values
  carry absolute errors ~ sqrt(u_64 m) sigma_max (negligible against the choice's margins); the
  choice never affects the decrease guarantee, which rests on (ip, bound) only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["PolarCore", "polar_core", "certified_direction", "SmallPolar", "small_polar", "small_direction",
           "unit_roundoff", "gamma"]

#: eigenvalues of S below ``EIG_RTOL * lambda_max`` are treated as zero (they are rounding noise:
#: eig(S) in float64 has absolute errors ~ m u_64 lambda_max).
EIG_RTOL = 1e-13


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = eps / 2 of a floating dtype."""
    return torch.finfo(dtype).eps / 2.0


def gamma(n: int, dtype: torch.dtype) -> float:
    """gamma_n = n u / (1 - n u), the standard bound of an n-term inner product's relative error."""
    nu = n * unit_roundoff(dtype)
    if nu >= 0.5:
        return math.inf
    return nu / (1.0 - nu)


@dataclass
class PolarCore:
    """m x m pieces of the polar factor of G = A Bm (see the module docstring)."""

    nuclear: float  # ||G||_* from eig(S) (for the greedy choice)
    L: torch.Tensor  # Cholesky factor of Kb (+ jitter), float64
    W: torch.Tensor  # kept eigenvectors of S, float64
    lam: torch.Tensor  # kept eigenvalues of S, float64
    Ka: torch.Tensor | None  # A^T A (None for A = I)
    kb_trace: float  # tr(Kb + jitter I)
    jitter: float


def polar_core(A: torch.Tensor | None, Bm: torch.Tensor, *, ones_column: bool = False) -> PolarCore:
    """Core of G = A Bm (A = None means the identity): Kb, its Cholesky factor, eig(L^T Ka L).

    ``A`` is r x m, ``Bm`` is m x c, any floating dtype; everything returned is float64.  With
    ``ones_column=True`` the factor is [Bm | 1] (a bias), Kb = Bm Bm^T + 1 1^T.
    """
    B64 = Bm.detach().to(torch.float64)
    Kb = B64 @ B64.T
    if ones_column:
        Kb += 1.0
    m = Kb.shape[0]
    tr = float(Kb.diagonal().sum())
    if A is None:
        Ka = None
    else:
        A64 = A.detach().to(torch.float64)
        Ka = A64.T @ A64
    if tr <= 0.0 or not math.isfinite(tr):
        z = Kb.new_zeros((m, 0))
        return PolarCore(0.0, torch.zeros_like(Kb), z, Kb.new_zeros(0), Ka, max(tr, 0.0), 0.0)
    eye = torch.eye(m, dtype=torch.float64)
    jitter = 0.0
    L, info = torch.linalg.cholesky_ex(Kb)
    k = 0
    while int(info) != 0:  # rank-deficient Kb (duplicate examples, m > c): regularise
        jitter = tr / m * 10.0 ** (-14 + 2 * k)
        L, info = torch.linalg.cholesky_ex(Kb + jitter * eye)
        k += 1
        if k > 7:
            raise FloatingPointError("Cholesky factorisation of the layer-input Gram matrix failed")
    S = L.T @ L if Ka is None else L.T @ Ka @ L
    S = 0.5 * (S + S.T)
    lam, W = torch.linalg.eigh(S)
    lmax = float(lam[-1]) if lam.numel() else 0.0
    keep = lam > max(lmax, 0.0) * EIG_RTOL
    if lmax <= 0.0:
        keep = torch.zeros_like(keep)
    lam_k, W_k = lam[keep], W[:, keep]
    nuclear = float(lam_k.sqrt().sum())
    return PolarCore(nuclear, L, W_k, lam_k, Ka, tr + m * jitter, jitter)


def certified_direction(core: PolarCore, A: torch.Tensor | None, Bm: torch.Tensor,
                        G: torch.Tensor, *, bias_column: bool = False):
    """Q^ ~ U V^T of G = A Bm (in G's dtype), a lower bound ``ip`` <= <G_true, Q^> and an upper
    bound ``bound`` >= ||Q^||_2.

    ``G`` is the true gradient in the layer's layout; with ``bias_column=True`` it is a pair
    ``(G_W, g_b)`` and Bm's last column is the constant 1 of the bias (not stored: ``Bm`` is then
    X and the bias part of Q^ is P @ 1).  Returns ``(Q_W, q_b or None, ip, bound)``.
    """
    dtype = Bm.dtype
    if core.lam.numel() == 0:
        return None, None, 0.0, 1.0
    L, W, lam = core.L, core.W, core.lam
    m = L.shape[0]
    N = (W / lam.sqrt()) @ W.T  # S^{+1/2}-inverse on the kept range
    LN = L @ N
    M = torch.linalg.solve_triangular(L, LN, upper=False, left=False)  # M L = L N
    if A is None:
        P64 = M
    else:
        P64 = A.detach().to(torch.float64) @ M
    P = P64.to(dtype)
    # ---- certified ||Q^||_2 -------------------------------------------------------------
    Pd = P.to(torch.float64)
    PL = Pd @ L
    C = PL.T @ PL
    E = C - W @ W.T
    c_fro = float(torch.linalg.matrix_norm(C))
    p_fro2 = float((Pd * Pd).sum())
    u64 = torch.float64
    lam_bound = (1.0 + float(torch.linalg.matrix_norm(E)) + gamma(2 * m + 2, u64) * c_fro
                 + (gamma(m + 1, u64) + gamma(Bm.shape[1] + 1, u64)) * core.kb_trace * p_fro2)
    bm_fro = math.sqrt(core.kb_trace)
    bound = math.sqrt(lam_bound) + gamma(m, dtype) * math.sqrt(p_fro2) * bm_fro
    bound *= 1.0 + 4 * unit_roundoff(u64)
    # ---- the direction and <G, Q^> --------------------------------------------------------
    if bias_column:
        GW, gb = G
        QW = P @ Bm
        qb = P.sum(dim=1)
        ip = float((GW * QW).sum(dtype=torch.float64)) + float((gb * qb).sum(dtype=torch.float64))
        g_fro = math.sqrt(float((GW * GW).sum(dtype=torch.float64)) + float((gb * gb).sum(dtype=torch.float64)))
        q_fro = math.sqrt(float((QW * QW).sum(dtype=torch.float64)) + float((qb * qb).sum(dtype=torch.float64)))
        n = GW.numel() + gb.numel()
    else:
        GW = G
        QW, qb = P @ Bm, None
        ip = float((GW * QW).sum(dtype=torch.float64))
        g_fro = math.sqrt(float((GW * GW).sum(dtype=torch.float64)))
        q_fro = math.sqrt(float((QW * QW).sum(dtype=torch.float64)))
        n = GW.numel()
    ip -= (unit_roundoff(dtype) + gamma(n, u64)) * 1.01 * g_fro * q_fro
    return QW, qb, ip, bound


# --------------------------------------------------------------------------------------------
# small dense gradients on the CPU: one eigendecomposition of the small Gram matrix, in NumPy
@dataclass
class SmallPolar:
    """Polar pieces of a dense CPU gradient G (r x c, r <= c after an optional transpose): the
    eigendecomposition K = G G^T = U Lam U^T in float64 and M = U Lam^{-1/2} U^T on the kept
    range, so that U V^T = M G.  NumPy arrays (float64)."""

    nuclear: float  # ||G||_* = sum_i sqrt(Lam_i) (for the greedy choice)
    M: np.ndarray | None  # r x r (None: G = 0)
    G64: np.ndarray  # G in float64 (exact copy)
    g_fro2: float  # an upper bound on ||G||_F^2


def small_polar(GW: torch.Tensor, gb: torch.Tensor | None = None, transposed: bool = False) -> SmallPolar:
    """:class:`SmallPolar` of the CPU matrix G = [G_W | g_b] (g_b None: G_W alone), transposed
    when ``transposed`` (so that its rows are the fewer; float32 or float64): the route
    for layers with min(r, c) <= 64, where the general route's fifty small torch operations
    (about 5 us each, more after a forward and backward pass have evicted the caches) cost far
    more than the arithmetic; NumPy's operations on such arrays cost about 1 us
    (benchmarks/dsgd_step.py)."""
    W = GW.detach().numpy()
    if gb is None:
        G64 = W.astype(np.float64)
    else:
        G64 = np.empty((W.shape[0], W.shape[1] + 1))
        G64[:, :-1] = W
        G64[:, -1] = gb.detach().numpy()
    if transposed:
        G64 = np.ascontiguousarray(G64.T)
    r, c = G64.shape
    K = G64 @ G64.T
    lam, U = np.linalg.eigh(K)
    lmax = float(lam[-1])
    g_fro2 = float(np.trace(K)) * (1.0 + 2 * gamma(c + r + 1, torch.float64))
    if not lmax > 0.0 or not math.isfinite(lmax):
        return SmallPolar(0.0, None, G64, g_fro2)
    keep = lam > lmax * EIG_RTOL
    lam_k, U_k = lam[keep], U[:, keep]
    nuclear = float(np.sqrt(lam_k).sum())
    return SmallPolar(nuclear, (U_k / np.sqrt(lam_k)) @ U_k.T, G64, g_fro2)


def small_direction(sp: SmallPolar, dtype: torch.dtype):
    """(Q^, ip, bound) for a :class:`SmallPolar`: Q^ = fl(M G) as a tensor of ``dtype`` (~ U V^T,
    F eq. 28), ``ip`` <= <G, Q^> and ``bound`` >= ||Q^||_2 certified; (None, 0, 1) for G = 0.

    * ||Q^||_2^2 = lambda_max(Q^ Q^^T): C = fl64(Q^ Q^^T) from the exact float64 copy of Q^ has
      ||C - Q^ Q^^T||_2 <= gamma_{c+1} ||Q^||_F^2, and the computed top eigenvalue of C is within
      8 (r + 1) u_64 ||C||_2 of the exact one (backward stability of the symmetric eigensolver,
      with a generous constant); ||Q^||_F^2 <= tr C (1 + 2 gamma_{c+r+1}).
    * <G, Q^> in float64 from the exact float64 copies: a product of two float32 numbers is exact
      in float64 (48 significant bits <= 53; float64 layers add u_64 per product), and the sum of
      the n = r c terms is within gamma_{n+1} ||G||_F ||Q^||_F.
    """
    if sp.M is None:
        return None, 0.0, 1.0
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"small_direction: float32 or float64 layers only, got {dtype}")
    r, c = sp.G64.shape
    Q = (sp.M @ sp.G64).astype(np.float32 if dtype == torch.float32 else np.float64)
    Qd = Q.astype(np.float64)
    C = Qd @ Qd.T
    top = float(np.linalg.eigvalsh(C)[-1])
    u64 = unit_roundoff(torch.float64)
    q_fro2 = float(np.trace(C)) * (1.0 + 2 * gamma(c + r + 1, torch.float64))
    slack = (gamma(c + 1, torch.float64) + 8 * (r + 1) * u64) * q_fro2
    bound = math.sqrt(max(top, 0.0) + slack) * (1.0 + 4 * u64)
    inexact_products = u64 if dtype == torch.float64 else 0.0
    ip = float(np.einsum("ij,ij->", sp.G64, Qd))
    ip -= (gamma(r * c + 1, torch.float64) + inexact_products) * 1.01 * math.sqrt(sp.g_fro2 * q_fro2)
    return torch.from_numpy(Q), ip, bound

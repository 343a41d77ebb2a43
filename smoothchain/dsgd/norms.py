"""Matrix q-norms, their duals and duality maps (F Prop. 4.5), and weighted product norms
(F Prop. 4.6).

"F" is Flynn, *The duality structure gradient descent algorithm* (``shared/papers``).

Norms (F Assumption 4.2, Sec. 4.1).  A weight matrix A (r x c) maps (R^c, ||.||_q) to
(R^r, ||.||_q) and carries the *induced operator norm* ||A||_q = sup ||A x||_q / ||x||_q:

=====  ==============================  =================================================
q      ||A||_q (primal)                ||G||_{q,*} (dual, F eq. 26)
=====  ==============================  =================================================
1      max column sum  max_j sum_i |A_ij|   sum over columns of the column's max |G_ij|
2      spectral norm  sigma_max(A)     nuclear norm  sum_i sigma_i(G)
inf    max row sum  max_i sum_j |A_ij|      sum over rows of the row's max |G_ij|
=====  ==============================  =================================================

A linear functional on matrices is represented by a matrix G of the same shape through
<G, A> = sum_ij G_ij A_ij (so the gradient of f w.r.t. a weight matrix is its functional).
The dual norm is ||G||_* = sup{<G, A> : ||A||_q <= 1} (F eq. 3).  For q = 1 the unit ball is a
product of l1-balls, one per column, so the dual is the sum of the columns' l_inf norms; q = inf
is the transpose (rows); q = 2 is the classical spectral / nuclear (trace) duality.

A duality map rho (F Def. 3.2) returns rho(G) with ||rho(G)||_q = ||G||_* (4a) and
<G, rho(G)> = ||G||_*^2 (4b).  We use F's choices (eqs. 27-29):

* q = 1:   rho(G) = ||G||_* m, m_ij = sgn(G_ij) at the first arg max of |G_.j| in each column;
* q = inf: the same per row;
* q = 2:   rho(G) = ||G||_* U V^T over the rank of G (its non-zero singular values set to one).

``sgn(0) = +1`` as in F's notation section, so m always has max column (row) sum one.  A 1-D
tensor is treated as a column vector (r x 1), for which the operator norm is the vector
q-norm and the dual is the conjugate vector norm.

Numerics.  Everything is computed in float64, and every Gram matrix is formed from the matrix
divided by its largest |entry| (so entries of any magnitude, ~1e-300 or ~1e300, neither
underflow nor overflow when squared).  Spectral norms of weights (needed as *upper*
bounds inside F's p_i) are exact: the largest eigenvalue of the smaller Gram matrix (A A^T or
A^T A) by ``torch.linalg.eigvalsh`` -- never power iteration, which under-estimates.  For the
nuclear norm and polar factor there are two methods: ``"svd"`` (LAPACK SVD; (4a)/(4b) to
machine precision) and ``"gram"`` (eigendecomposition of the smaller Gram matrix, much faster
for large layers; singular values below ``GRAM_RTOL * sigma_max`` are treated as zero, one
Newton-Schulz step restores orthogonality, and (4a)/(4b) then hold for the returned norm to
about 1e-9 relative).  ``"auto"`` picks ``"svd"`` when min(r, c) <= 32, else ``"gram"``.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

__all__ = [
    "check_q",
    "matrix_norm",
    "spectral_norm",
    "dual_norm",
    "duality_map",
    "product_norm",
    "product_dual_norm",
    "product_duality_map",
]

#: Relative threshold (in singular values) below which the ``"gram"`` method treats a singular
#: value as zero.
GRAM_RTOL = 1e-6
#: Size (min(r, c)) up to which ``method="auto"`` uses the SVD.
AUTO_SVD_MAX = 32

#: q = 1 and q = inf work block by block; the dim reduced within a block (q = 1: blocks are the
#: columns, dim 0; q = inf: the rows, dim 1).  ||A||_q is the largest block l1 norm, ||G||_{q,*}
#: the sum of the blocks' l_inf norms, and F's duality map puts sgn at each block's arg max.
_BLOCK_DIM = {1.0: 0, math.inf: 1}


def check_q(q) -> float:
    """Return q as 1.0, 2.0 or math.inf; raise ``ValueError`` naming the value otherwise."""
    if isinstance(q, str):
        key = q.strip().lower()
        if key in ("inf", "infinity", "math.inf"):
            return math.inf
        try:
            q = float(key)
        except ValueError:
            raise ValueError(f"q must be 1, 2 or math.inf (F Prop. 4.5), got {q!r}") from None
    if isinstance(q, bool) or not isinstance(q, (int, float, np.floating, np.integer)):
        raise ValueError(f"q must be 1, 2 or math.inf (F Prop. 4.5), got {q!r}")
    qf = float(q)
    if qf not in (1.0, 2.0, math.inf):
        raise ValueError(f"q must be 1, 2 or math.inf (F Prop. 4.5), got {q!r}")
    return qf


def _as_matrix(A) -> tuple[torch.Tensor, bool, tuple, torch.dtype | None]:
    """float64 2-D torch view of A; returns (matrix, was_numpy, original shape, dtype)."""
    was_numpy = isinstance(A, np.ndarray)
    t = torch.from_numpy(np.asarray(A)) if was_numpy else A
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(t)
    shape = tuple(t.shape)
    dtype = None if was_numpy else t.dtype
    if t.dim() == 1:
        t = t.reshape(-1, 1)
    elif t.dim() != 2:
        raise ValueError(f"expected a matrix (2-D) or a vector (1-D), got shape {shape}")
    return t.detach().to(torch.float64), was_numpy, shape, dtype


def _restore(M: torch.Tensor, was_numpy: bool, shape: tuple, dtype):
    M = M.reshape(shape)
    if was_numpy:
        return M.numpy()
    return M.to(dtype)


def _scaled(M: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(M / s, s) with s = max |M_ij| (1 for a zero or non-finite matrix), so that Gram matrices
    of M / s neither underflow (entries ~1e-200 square to 0) nor overflow (~1e200 to inf)."""
    s = M.abs().max().item()
    if not (s > 0.0 and math.isfinite(s)):
        return M, 1.0
    return M / s, s


def spectral_norm(A) -> float:
    """Exact largest singular value of A (float64): sqrt of lambda_max of the smaller Gram matrix.

    ``eigvalsh`` is backward stable, so lambda_max is accurate to ~1e-16 relative: this is an
    upper bound up to rounding, unlike power iteration which approaches sigma_max from below.
    The Gram matrix is formed from A / max|A_ij| (scale-robust: no under- or overflow).
    """
    M = _as_matrix(A)[0]
    if M.numel() == 0:
        return 0.0
    M, s = _scaled(M)
    gram = M @ M.T if M.shape[0] <= M.shape[1] else M.T @ M
    lam = torch.linalg.eigvalsh(gram)[-1].item()
    return math.sqrt(max(lam, 0.0)) * s


def matrix_norm(A, q) -> float:
    """Operator norm ||A||_{q->q} (F Sec. 4.1): max column sum (q=1), spectral (q=2), max row
    sum (q=inf).  A 1-D tensor is a column vector, whose operator norm is its vector q-norm."""
    q = check_q(q)
    M = _as_matrix(A)[0]
    if M.numel() == 0:
        return 0.0
    if q in _BLOCK_DIM:
        return M.abs().sum(dim=_BLOCK_DIM[q]).max().item()
    return spectral_norm(M)


def _pick(q: float, method: str, M: torch.Tensor) -> str:
    if method not in ("auto", "svd", "gram"):
        raise ValueError(f"method must be 'auto', 'svd' or 'gram', got {method!r}")
    if method == "auto":
        return "svd" if min(M.shape) <= AUTO_SVD_MAX else "gram"
    return method


def _gram_eig(M: torch.Tensor, vectors: bool):
    """Eigen-decomposition of the smaller Gram matrix of M (M already scaled, see
    :func:`_scaled`); returns (kept sigmas, U, X, transposed)."""
    transposed = M.shape[0] > M.shape[1]
    X = M.T if transposed else M
    gram = X @ X.T
    if vectors:
        lam, U = torch.linalg.eigh(gram)
    else:
        lam, U = torch.linalg.eigvalsh(gram), None
    lam_max = lam[-1].clamp_min(0.0)
    keep = lam > lam_max * (GRAM_RTOL**2)
    if lam_max.item() <= 0.0:
        keep = torch.zeros_like(keep)
    sig = lam[keep].sqrt()
    return sig, (U[:, keep] if vectors else None), X, transposed


def dual_norm(G, q, *, method: str = "auto") -> float:
    """||G||_{q,*} = sup{<G, A> : ||A||_q <= 1}, F eq. (26)."""
    q = check_q(q)
    M = _as_matrix(G)[0]
    if M.numel() == 0:
        return 0.0
    if q in _BLOCK_DIM:
        return _block_dual_norm(M, _BLOCK_DIM[q])
    if _pick(q, method, M) == "svd":
        return torch.linalg.svdvals(M).sum().item()
    M, s = _scaled(M)
    return _gram_eig(M, vectors=False)[0].sum().item() * s


def _block_dual_norm(M: torch.Tensor, dim: int) -> float:
    """F eq. (26) for q = 1 (``dim=0``) and q = inf (``dim=1``): sum of the blocks' max |M_ij|."""
    return M.abs().amax(dim=dim).sum().item()


def _argmax_sign(M: torch.Tensor, dim: int) -> torch.Tensor:
    """Matrix with sgn(M_ij) (sgn 0 = +1) at the first arg max of |M| along ``dim``, else 0."""
    idx = M.abs().argmax(dim=dim, keepdim=True)  # first maximal index (documented by torch)
    vals = M.gather(dim, idx)
    signs = torch.where(vals >= 0, 1.0, -1.0).to(M.dtype)
    return torch.zeros_like(M).scatter_(dim, idx, signs)


def _polar(M: torch.Tensor, method: str) -> tuple[torch.Tensor, float]:
    """(U V^T over the numerical range, nuclear norm consistent with it)."""
    if method == "svd":
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        # F eq. (28) sums over i <= rank G: keep the numerically non-zero singular values
        # (numpy.linalg.matrix_rank's tolerance); the dropped ones are below max(r, c) u_64 of
        # sigma_max, so (4b) holds to that relative order
        tol = S[0].item() * max(M.shape) * torch.finfo(torch.float64).eps if S.numel() else 0.0
        k = int((S > tol).sum()) if tol > 0 else 0
        return U[:, :k] @ Vh[:k], S.sum().item()
    M, scale = _scaled(M)  # the polar factor is scale-invariant; the nuclear norm scales
    sig, U, X, transposed = _gram_eig(M, vectors=True)
    if sig.numel() == 0:
        return torch.zeros_like(M), 0.0
    # P = U diag(1/sigma) U^T X has singular values one on the kept range (exactly, in exact
    # arithmetic); one Newton-Schulz step P <- (3P - P P^T P)/2 squares the orthogonality error.
    P = U @ ((U.T @ X) / sig[:, None])
    P = 1.5 * P - 0.5 * (P @ P.T) @ P
    nuclear = (P * X).sum().item() * scale  # = sum of kept sigmas; (4b) exact for this norm
    return (P.T if transposed else P), nuclear


def duality_map(G, q, *, method: str = "auto"):
    """Duality map of F Prop. 4.5 for the operator q-norm, q in {1, 2, inf}.

    Returns ``(rho, dual_norm)`` with ||rho||_q = ||G||_* (F 4a) and <G, rho> = ||G||_*^2
    (F 4b).  ``rho`` has G's shape and type (torch dtype, or numpy for numpy input);
    ``dual_norm`` is a float.  q = 1: F eq. (27); q = 2: eq. (28) (over the numerical rank);
    q = inf: eq. (29).
    """
    q = check_q(q)
    M, was_numpy, shape, dtype = _as_matrix(G)
    if M.numel() == 0:
        return _restore(M.clone(), was_numpy, shape, dtype), 0.0
    if q in _BLOCK_DIM:  # F eqs. (27), (29)
        dim = _BLOCK_DIM[q]
        norm = _block_dual_norm(M, dim)
        rho = norm * _argmax_sign(M, dim=dim)
    else:
        P, norm = _polar(M, _pick(q, method, M))
        rho = norm * P
    return _restore(rho, was_numpy, shape, dtype), norm


# --------------------------------------------------------------------------------------------
# Product spaces, F Prop. 4.6: ||(x_1..x_K)|| = sum_i p_i ||x_i||, dual = max_i ||l_i||_* / p_i.
# --------------------------------------------------------------------------------------------


def _check_weights(p: Sequence[float], k: int) -> list[float]:
    p = [float(v) for v in p]
    if len(p) != k:
        raise ValueError(f"need one weight per block: {k} blocks, {len(p)} weights")
    for i, v in enumerate(p):
        if not (v > 0 and math.isfinite(v)):
            raise ValueError(f"product-norm weight p_{i + 1} must be positive and finite, got {v!r}")
    return p


def product_norm(us: Sequence, p: Sequence[float], q) -> float:
    """||(u_1, ..., u_K)|| = sum_i p_i ||u_i||_q (F eq. 25 / Prop. 4.6)."""
    p = _check_weights(p, len(us))
    return sum(pi * matrix_norm(u, q) for pi, u in zip(p, us))


def product_dual_norm(ells: Sequence, p: Sequence[float], q, *, method: str = "auto"):
    """Dual of :func:`product_norm`: ``(max_i ||l_i||_* / p_i, i*)`` with i* 0-based, the first
    maximiser (F eqs. 30, 32)."""
    p = _check_weights(p, len(ells))
    ratios = [dual_norm(ell, q, method=method) / pi for pi, ell in zip(p, ells)]
    i_star = max(range(len(ratios)), key=lambda i: (ratios[i], -i))
    return ratios[i_star], i_star


def product_duality_map(ells: Sequence, p: Sequence[float], q, *, method: str = "auto"):
    """Duality map of F eq. (31): zero except block i*, which is rho_q(l_i*) / p_i*^2.

    Returns ``(blocks, dual_norm, i_star)`` with ``i_star`` 0-based."""
    p = _check_weights(p, len(ells))
    norm, i_star = product_dual_norm(ells, p, q, method=method)
    blocks = []
    for i, ell in enumerate(ells):
        if i == i_star:
            rho, _ = duality_map(ell, q, method=method)
            blocks.append(rho / p[i] ** 2)
        else:
            blocks.append(ell * 0)
    return blocks, norm, i_star

"""Matrix-free empirical estimators of the constants that smoothchain certifies.

At a point ``w`` (all the weights of a network, as ONE flat vector) and for a fixed input batch
``x``, the chain's output is ``psi(w)`` (the whole batch output, flattened, so psi: R^p -> R^q).
RH (long version) Fact A.3 gives, on a convex set C,

* output bound      m = sup_C ||psi(w)||,
* Lipschitz const.  l = sup_C ||grad psi(w)||_{2,2}          (operator norm of the Jacobian),
* smoothness        L = sup_C ||grad^2 psi(w)||_{2,2,2}      (RH Def. A.1, the tensor norm
  ||A||_{2,2,2} = sup_{||u||=||v||=||z||=1} A[u, v, z] = sup_{||u||=||v||=1} ||A[u, v, .]||),

and the objective F(w) = f(psi(w)) + lambda/2 ||w||^2 is L_F-smooth with L_F >= the largest
|eigenvalue| of its Hessian anywhere on C.  The functions below estimate these quantities AT ONE
POINT with torch.func (jvp, vjp) and double-backward Hessian-vector products on a recorded
gradient graph; nothing of size q x p or p x p is formed.

Every estimate is a LOWER bound of the quantity at ``w`` (it is the value of the sup at explicit
unit vectors, or a Ritz value), hence of the sup over C: an estimate above a certified bound
refutes the certificate, an estimate below it proves nothing.  The iterative ones return an
:class:`Estimate` with the iterations used and a ``converged`` flag, which says that the stated
residual test was met -- not that the GLOBAL maximiser was found (power-type methods can stall
at a smaller local maximum, or miss the top eigenvector when the start is nearly orthogonal to
it; random starts and restarts make this unlikely, never impossible).

Flat-vector convention: the parameters in ``model.named_parameters()`` order (tied parameters
once), each flattened in row-major order and concatenated -- see :func:`flat_parameters`
(from :mod:`.functional`, which also builds the functional copy of the model).
Costs and the math are in ``docs/estimators.md``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import jvp, vjp

from .data_conv import DataConvolutions
from .functional import flat_parameters, make_functional_call
from .losses import SUPERVISED_LOSSES, loss_function

__all__ = [
    "ESTIMATOR_LOSSES",
    "Estimate",
    "flat_parameters",
    "functional_chain",
    "objective",
    "output_norm",
    "jacobian_norm",
    "second_derivative_norm",
    "hessian_top_eig",
    "hutchinson_trace",
]

Psi = Callable[[Tensor], Tensor]
Scalar = Callable[[Tensor], Tensor]

#: the losses the estimators (and ``check``) take: the certified ones reading targets
ESTIMATOR_LOSSES = SUPERVISED_LOSSES


@dataclass(frozen=True)
class Estimate:
    """Result of an estimator.

    ``value``: the estimate (a lower bound of the exact quantity at the point, see the module
    docstring); ``iterations``: iterations used (power/Lanczos steps, alternating cycles summed
    over restarts, or Hutchinson samples; 1 for the single forward pass of :func:`output_norm`);
    ``converged``: whether the estimator's stopping test was met within its budget;
    ``vectors``: the maximising unit vectors found (right singular vector, eigenvector, or
    (u, v, z) for the tensor norm), empty when not meaningful; ``stderr``: standard error of a
    stochastic estimate (Hutchinson), else ``None``.
    """

    value: float
    iterations: int
    converged: bool
    vectors: tuple[Tensor, ...] = ()
    stderr: float | None = None


# --------------------------------------------------------------------------------------------
# Models as functions of one flat weight vector
# --------------------------------------------------------------------------------------------


def _functional_forward(model: nn.Module, x: Tensor) -> tuple[Callable[[Tensor], Tensor], Tensor]:
    """``forward(w)`` = the model's (unflattened) output on ``x`` with flat weights ``w``.

    Built on the pure functional copy of :func:`.functional.make_functional_call`
    (``pure=True``): the model is copied (sharing its parameter tensors, which are never
    written) so that later changes to it do not affect ``forward`` and ``forward`` never writes
    to it; batch norms that normalise with the batch statistics (training mode, or no running
    statistics) do so in elementary ops and track nothing; the others use their running
    statistics, read only;
    dropout is the identity, so that ``forward`` is a deterministic function of ``w``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    if not any(True for _ in model.parameters()):
        raise ValueError("the model has no parameters")
    call = make_functional_call(model, pure=True)
    w0 = flat_parameters(model)
    x = x.detach()
    # Images go in channels-last: on CPU the convolutions' transposed products in the second
    # derivatives run 2x faster in that layout (a Hessian-vector product of a LeNet at batch
    # 128 costs 0.8x; benchmarks/top_eigenvalue.py), values unchanged.  A model whose forward
    # needs the default layout (a .view of a feature map) fails with a RuntimeError: then the
    # default layout is used from that call on.
    layouts = [x.contiguous(memory_format=torch.channels_last)] if x.dim() == 4 and x.is_floating_point() else []

    def forward(w: Tensor) -> Tensor:
        # unflatten first: w must be ONE flat vector here, never a list of tensors
        if layouts:
            try:
                return call(call.unflatten(w), layouts[0])
            except RuntimeError:
                layouts.clear()
        return call(call.unflatten(w), x)

    return forward, w0


def functional_chain(model: nn.Module, x: Tensor) -> tuple[Psi, Tensor]:
    """``(psi, w0)``: ``psi(w)`` is the whole batch output ``model(x)`` flattened to a vector,
    as a function of the flat weight vector ``w`` (:func:`flat_parameters` order), and ``w0``
    the model's current weights.

    ``psi`` is built on a copy of the model (see :func:`_functional_forward`): batch norm in
    training mode uses the batch statistics of ``x`` (RH eq. 11) and never updates running
    statistics; dropout is the identity.  Pure and differentiable by torch.func.
    """
    forward, w0 = _functional_forward(model, x)
    return (lambda w: forward(w).reshape(-1)), w0


def objective(model: nn.Module, x: Tensor, y: Tensor, loss: str = "cross-entropy", l2: float = 0.0) -> Scalar:
    """``F(w) = f(psi(w)) + l2/2 ||w||^2`` as a function of the flat weight vector.

    ``loss="cross-entropy"``: mean over the batch of the cross-entropy of the logits
    ``model(x)`` (shape m x k) with ``y`` either class indices (integer, shape m) or class
    probabilities / one-hot rows (shape m x k).  ``loss="square"``: 1/(2m) sum_i
    ||model(x)_i - y_i||^2 (1/2 ||.||^2 averaged over the batch, ``y`` of the output's shape or
    size), as in DESIGN.md "Oracles".  Get the current weights with :func:`flat_parameters`.
    """
    f = loss_function(loss, y, x, among=ESTIMATOR_LOSSES)
    if not math.isfinite(l2) or l2 < 0:
        raise ValueError(f"l2 must be a finite number >= 0, got {l2!r}")
    forward, _ = _functional_forward(model, x)

    def F(w: Tensor) -> Tensor:
        value = f(forward(w))
        if l2:
            value = value + 0.5 * l2 * w.pow(2).sum()
        return value

    return F


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _flat(w: Tensor) -> Tensor:
    if not isinstance(w, Tensor) or w.dim() != 1:
        raise ValueError("w must be a flat (1-D) tensor")
    return w.detach()


def _check(w: Tensor, iters: int, tol: float) -> Tensor:
    if int(iters) != iters or iters < 1:
        raise ValueError(f"iters must be a positive integer, got {iters!r}")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol!r}")
    return _flat(w)


def _generator(w: Tensor, seed: int) -> torch.Generator:
    return torch.Generator(device=w.device).manual_seed(int(seed))


def _unit(w: Tensor, gen: torch.Generator) -> Tensor:
    v = torch.randn(w.shape, generator=gen, dtype=w.dtype, device=w.device)
    return v / v.norm()


def _start(w: Tensor, start: Tensor | None, seed: int) -> Tensor:
    """The unit start vector: ``start`` normalised (checked: w's shape, finite, nonzero), or a
    random one from ``seed``."""
    if start is None:
        return _unit(w, _generator(w, seed))
    if not isinstance(start, Tensor) or start.shape != w.shape:
        shape = tuple(start.shape) if isinstance(start, Tensor) else type(start).__name__
        raise ValueError(f"start must be a tensor of the weights' shape {tuple(w.shape)}, got {shape}")
    v = start.detach().to(device=w.device, dtype=w.dtype)
    norm = float(v.norm())
    if not math.isfinite(norm) or norm == 0.0:
        raise ValueError(f"start must be a finite nonzero vector, got norm {norm}")
    return v / norm


def _hvp(F: Scalar, w: Tensor) -> Callable[[Tensor], Tensor]:
    """v -> grad^2 F(w) v, reverse-over-reverse on a recorded gradient graph: the gradient is
    computed ONCE with its graph kept (``create_graph=True``), then every product is one
    backward pass through that graph (``retain_graph=True``) -- the same work per product as
    PyHessian's double backward, on one flat vector.  On CPU this is faster than a fresh
    forward-over-reverse ``jvp(grad F, w, v)`` per product, which re-runs the forward and
    backward passes (benchmarks/top_eigenvalue.py).  The gradient is recorded under
    :class:`.data_conv.DataConvolutions`, which leaves out the gradients onto the data that
    PyTorch's double backward of a convolution computes anyway (0.75x the product's time on a
    LeNet-5)."""
    w_ = w.detach().clone().requires_grad_(True)

    def gradient(mode) -> Tensor:
        with torch.enable_grad(), mode:
            return torch.autograd.grad(F(w_), w_, create_graph=True)[0]

    try:  # the data's convolutions without their unneeded input gradients (see .data_conv)
        g = gradient(DataConvolutions())
    except (RuntimeError, NotImplementedError):  # e.g. an F that runs torch.func transforms
        g = gradient(contextlib.nullcontext())

    def hvp(v: Tensor) -> Tensor:
        if not g.requires_grad:  # F affine in w: H = 0
            return torch.zeros_like(w)
        (hv,) = torch.autograd.grad(g, w_, v.to(w.dtype), retain_graph=True, allow_unused=True)
        return torch.zeros_like(w) if hv is None else hv.detach()

    return hvp


# --------------------------------------------------------------------------------------------
# Chain estimators
# --------------------------------------------------------------------------------------------


def output_norm(psi: Psi, w: Tensor) -> Estimate:
    """||psi(w)||_2 (exact; one forward pass)."""
    with torch.no_grad():
        value = float(psi(_flat(w)).norm())
    return Estimate(value, 1, True)


def jacobian_norm(psi: Psi, w: Tensor, iters: int = 200, tol: float = 1e-6, seed: int = 0) -> Estimate:
    """||grad psi(w)||_{2,2} = sigma_max(J), J = dpsi/dw, by power iteration on J^T J.

    Per iteration: a = J^T J v (one jvp, one vjp); lambda = ||J v||^2; converged when the
    eigen-residual ||a - lambda v|| <= tol * lambda (then lambda is within tol*lambda of an
    eigenvalue of J^T J; the top one unless the start was unlucky).  The value reported is
    ||J^T u|| / ||u|| with u = J v, the norm of J^T at a unit vector, hence <= sigma_max(J)
    and >= sqrt(lambda).  ``vectors = (v,)``, the last unit right vector.
    """
    w = _check(w, iters, tol)
    v = _unit(w, _generator(w, seed))
    _, vjp_fn = vjp(psi, w)
    value = 0.0
    for k in range(1, int(iters) + 1):
        u = jvp(psi, (w,), (v,))[1]
        a = vjp_fn(u)[0]
        lam = float(u.dot(u))
        norm_a = float(a.norm())
        if norm_a == 0.0:  # J v = 0 for a random v: J = 0 (almost surely)
            return Estimate(0.0, k, True, (v,))
        value = norm_a / math.sqrt(lam)
        if float((a - lam * v).norm()) <= tol * lam:
            return Estimate(value, k, True, (v,))
        v = a / norm_a
    return Estimate(value, int(iters), False, (v,))


def second_derivative_norm(
    psi: Psi,
    w: Tensor,
    iters: int = 50,
    tol: float = 1e-6,
    seed: int = 0,
    restarts: int = 2,
    lanczos_iters: int = 100,
    max_basis: int = 24,
) -> Estimate:
    """||grad^2 psi(w)||_{2,2,2} = sup_{|u|=|v|=|z|=1} T[u, v, z], T = D^2 psi(w) (RH Def. A.1).

    T is symmetric in its first two slots, so for fixed z the sup over u, v of u^T A(z) v,
    A(z) = sum_k z_k T_k = grad^2 <z, psi>(w), is ||A(z)||_2, attained at u = v, a
    top-|eigenvalue| eigenvector of A(z) (RH Fact A.2.3): ||T|| = sup_{|u|=1} ||T[u, u]||.
    The sup is found by a subspace (Davidson-like) method:

    1. Lanczos on A(z) (Hessian-vector products of w -> <z, psi(w)>, see ``_hvp``) gives its top
       eigenvalue lambda and Ritz vectors; the two of largest magnitude enter an orthonormal
       basis U = [U_1, ..., U_r] of candidate directions u.
    2. The projected tensor P_ij = T[U_i, U_j] (q-vectors, forward-over-forward jvps; only the
       new column is computed) turns the problem on span(U) into a small dense one,
       max_{|a|=1, |z|=1} z . sum_ij a_i a_j P_ij, solved in numpy by the block power iteration
       (a = top-|eigenvalue| eigenvector of sum_k z_k P_k, z = P[a, a] / |P[a, a]|; each step
       an exact block maximisation, so monotone) from the current z and from each basis vector.
    3. z <- the small problem's maximiser; u = U a.

    Converged when, at the small problem's maximiser z, Lanczos finds no better direction in
    the whole space: |lambda_max(A(z))| <= value (1 + tol) with a converged Lanczos solve --
    then (u, z) is a fixed point of the full alternating maximisation.  This can still be a
    local maximum over z (tensor norms are NP-hard in general); ``restarts`` runs from random
    unit z are made.  When the basis reaches ``max_basis`` vectors it restarts from the current
    best direction.

    The value returned is |T[u, u]| = T[u, u, z] at the returned unit vectors ``vectors =
    (u, u, z)`` -- a value of T, hence a lower bound of the norm, never more.  ``iterations``
    counts the second-order products used (Hessian-vector products plus T[., .] evaluations)
    over all runs; ``converged`` refers to the best run.
    """
    w = _check(w, iters, tol)
    for name, val in (("restarts", restarts), ("lanczos_iters", lanczos_iters), ("max_basis", max_basis)):
        if int(val) != val or val < (3 if name == "max_basis" else 1):
            raise ValueError(f"{name} must be an integer >= {3 if name == 'max_basis' else 1}, got {val!r}")
    gen = _generator(w, seed)
    with torch.no_grad():
        q = psi(w).numel()

    def t_pair(a: Tensor, b: Tensor) -> Tensor:  # T[a, b]
        return jvp(lambda w_: jvp(psi, (w_,), (b,))[1], (w,), (a,))[1]

    best: Estimate | None = None
    products = 0
    for _ in range(int(restarts)):
        z = torch.randn(q, generator=gen, dtype=w.dtype, device=w.device)
        z = (z / z.norm()).cpu().numpy()
        u = _unit(w, gen)
        basis: list[Tensor] = []
        P = np.zeros((q, 0, 0))
        value, vectors, converged = 0.0, None, False
        for _ in range(int(iters)):
            zt = torch.as_tensor(z, dtype=w.dtype, device=w.device)
            thetas, ritz, k, inner_ok = _lanczos(_hvp(lambda w_, zt=zt: psi(w_).dot(zt), w), u, int(lanczos_iters),
                                                 tol / 10, keep=2)
            products += k
            if inner_ok and vectors is not None and abs(thetas[0]) <= value * (1 + tol):
                converged = True
                break
            if len(basis) + len(ritz) > max_basis:  # restart the basis from the best direction
                keep = [vectors[0]] if vectors is not None else []
                basis, P = [], np.zeros((q, 0, 0))
                ritz = keep + ritz
            first_new = len(basis)
            for x in ritz:
                P, added = _extend_basis(basis, P, x, t_pair)
                products += added
            if thetas[0] == 0.0 and not np.any(P):
                # A(z) = 0 and T[., .] = 0 on every direction tried, from random starts: T = 0
                # almost surely
                value, vectors, converged = 0.0, (u, u, zt), True
                break
            starts = [z] + [P[:, i, i] for i in range(first_new, len(basis))]
            val, a_coef, z = _small_tensor_norm(P, starts)
            u = torch.as_tensor(a_coef, dtype=w.dtype, device=w.device) @ torch.stack(basis)
            u = u / u.norm()
            if vectors is None or val >= value:
                value, vectors = val, (u, u, torch.as_tensor(z, dtype=w.dtype, device=w.device))
        if vectors is None:
            vectors = (u, u, torch.as_tensor(z, dtype=w.dtype, device=w.device))
        run = Estimate(value, 0, converged, vectors)
        if best is None or run.value > best.value:
            best = run
    assert best is not None
    return Estimate(best.value, products, best.converged, best.vectors)


def _extend_basis(basis: list[Tensor], P: np.ndarray, x: Tensor, t_pair) -> tuple[np.ndarray, int]:
    """Orthonormalise ``x`` against ``basis``; if new, append it and the column T[U_i, x] to the
    projected tensor ``P`` (q x r x r, symmetric in its last two axes).  Returns (P, products)."""
    for _ in range(2):
        for b in basis:
            x = x - b.dot(x) * b
    n = float(x.norm())
    if n <= 1e-8:
        return P, 0
    x = x / n
    basis.append(x)
    col = torch.stack([t_pair(b, x) for b in basis], dim=1).cpu().numpy()  # q x r
    r = len(basis)
    out = np.zeros((P.shape[0], r, r))
    out[:, : r - 1, : r - 1] = P
    out[:, :, r - 1] = col
    out[:, r - 1, :] = col
    return out, r


def _small_tensor_norm(P: np.ndarray, starts: Sequence[np.ndarray], iters: int = 5000, tol: float = 1e-13):
    """max over unit a, z of z . P[a, a] for a small dense q x r x r tensor P (symmetric in its
    last two axes) by the monotone block power iteration from each start z (the current z, and
    z = P[e_i, e_i] for each new basis vector e_i); returns (value, a, z) of the best start."""
    q, r, _ = P.shape
    starts = [z / np.linalg.norm(z) for z in starts if np.linalg.norm(z) > 0]
    z0 = starts[0]
    best = (-1.0, None, None)
    for z in starts:
        val = -1.0
        for _ in range(iters):
            B = np.einsum("k,kij->ij", z, P)
            evals, evecs = np.linalg.eigh(B)
            a = evecs[:, int(np.argmax(np.abs(evals)))]
            s = np.einsum("kij,i,j->k", P, a, a)
            ns = float(np.linalg.norm(s))
            if ns == 0.0:
                break
            z_new = s / ns
            moved = min(np.linalg.norm(z_new - z), np.linalg.norm(z_new + z))
            z, val = z_new, ns
            if moved <= tol:
                break
        if val > best[0]:
            best = (val, a, z)
    if best[1] is None:
        return 0.0, np.eye(r)[0], z0
    return best


# --------------------------------------------------------------------------------------------
# Objective estimators
# --------------------------------------------------------------------------------------------


def hessian_top_eig(
    F: Scalar,
    w: Tensor,
    method: str = "lanczos",
    iters: int = 100,
    tol: float = 1e-6,
    seed: int = 0,
    start: Tensor | None = None,
) -> Estimate:
    """Largest |eigenvalue| of grad^2 F(w) (scalar F), with Hessian-vector products
    grad^2 F(w) v (reverse-over-reverse on the recorded gradient graph, see ``_hvp``; one per
    iteration).

    ``method="power"``: power iteration; lambda = v^T H v; converged when ||H v - lambda v|| <=
    tol * |lambda|.  If the two ends of the spectrum have (nearly) equal magnitude and opposite
    signs it does not converge -- use Lanczos.  ``method="lanczos"``: Lanczos with full
    reorthogonalisation (memory ``iters`` x p); the Ritz value theta of largest magnitude is
    reported, converged when its residual |beta_k s_k| <= tol * |theta| or the Krylov space
    becomes invariant.  Both values lie in [lambda_min, lambda_max], so |value| <= max |lambda|.
    ``vectors = (v,)``, the unit (Ritz) vector; its Rayleigh quotient gives the sign.

    ``start``: the start vector (any nonzero vector of ``w``'s shape, normalised here), e.g. the
    ``vectors[0]`` of a previous call at nearby weights -- along a training run the top
    eigenvector turns slowly, and a warm start needs a few products where a random one needs
    the whole Krylov build-up (benchmarks/top_eigenvalue.py, "tracking").  ``None``: a random
    unit vector drawn from ``seed``.
    """
    w = _check(w, iters, tol)
    if method not in ("power", "lanczos"):
        raise ValueError(f"method must be 'power' or 'lanczos', got {method!r}")
    v = _start(w, start, seed)
    hvp = _hvp(F, w)
    if method == "power":
        value = 0.0
        for k in range(1, int(iters) + 1):
            hv = hvp(v)
            lam = float(v.dot(hv))
            value = abs(lam)
            norm_hv = float(hv.norm())
            if float((hv - lam * v).norm()) <= tol * value:  # includes H v = 0
                return Estimate(value, k, True, (v,))
            v = hv / norm_hv
        return Estimate(value, int(iters), False, (v,))
    (theta,), (ritz,), k, converged = _lanczos(hvp, v, int(iters), tol)
    return Estimate(abs(theta), k, converged, (ritz,))


def _lanczos(
    hvp: Callable[[Tensor], Tensor], v: Tensor, iters: int, tol: float, keep: int = 1
) -> tuple[list[float], list[Tensor], int, bool]:
    """Lanczos with full reorthogonalisation from the unit vector ``v``.

    Returns the ``keep`` Ritz values of largest magnitude (signed, largest first), their unit
    Ritz vectors, the iterations used, and whether the top Ritz residual |beta_k s_k| <= tol
    |theta| was met or the Krylov space became invariant (then the Ritz values are eigenvalues).
    (A stop on the eigenvalue's error estimate r^2/gap instead, fewer products for the value
    alone, stopped 5e3 x tol away on random spectra at tol 1e-6 -- the Ritz value had settled
    on the wrong eigenvalue -- where this test stays within tol.)
    The basis lives in one matrix grown by doubling (no copy of the whole basis per product: at
    a few hundred thousand weights that copy cost as much as the product itself).
    """
    n = v.numel()
    steps = min(iters, n)
    Q = v.new_empty((min(steps, 16), n))
    Q[0] = v
    alphas: list[float] = []
    betas: list[float] = []
    converged, k = False, 0
    for k in range(1, steps + 1):
        q = Q[k - 1]
        r = hvp(q)
        alpha = float(q.dot(r))
        alphas.append(alpha)
        # The three-term recurrence, then full reorthogonalisation against the basis by classical
        # Gram-Schmidt, repeated only when the pass cancelled most of what was left
        # (Daniel-Gragg-Kaufman-Stewart: "twice is enough"; after the recurrence only rounding
        # is left, so one pass is the rule).  Memory-bound: each pass reads the basis twice.
        r.add_(q, alpha=-alpha)
        if k > 1:
            r.add_(Q[k - 2], alpha=-betas[-1])
        B = Q[:k]
        norm_before = float(r.norm())
        r.addmv_(B.T, B @ r, alpha=-1.0)
        beta = float(r.norm())
        if beta < 0.7071 * norm_before:
            r.addmv_(B.T, B @ r, alpha=-1.0)
            beta = float(r.norm())
        Tk = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
        evals, evecs = np.linalg.eigh(Tk)
        i = int(np.argmax(np.abs(evals)))
        theta, last = float(evals[i]), abs(evecs[-1, i])
        scale = max(abs(theta), 1e-300)
        # Converged: small Ritz residual, an (numerically) invariant Krylov space, or the whole
        # space spanned -- in the last two cases the Ritz values are eigenvalues.
        if beta * last <= tol * abs(theta) or beta <= 1e-14 * scale or k == n:
            converged = True
            break
        if k == steps:
            break
        betas.append(beta)
        if k == Q.shape[0]:
            grown = Q.new_empty((min(2 * k, steps), n))
            grown[:k] = Q
            Q = grown
        torch.div(r, beta, out=Q[k])
    order = np.argsort(-np.abs(evals))[: max(1, int(keep))]
    S = torch.as_tensor(evecs[:, order], dtype=Q.dtype, device=Q.device)
    vectors = [x / x.norm() for x in (Q[:k].T @ S).T]
    return [float(evals[j]) for j in order], vectors, k, converged


def hutchinson_trace(
    F: Scalar, w: Tensor, samples: int = 100, seed: int = 0, tol: float | None = None, min_samples: int = 10
) -> Estimate:
    """tr grad^2 F(w) by Hutchinson's estimator (Rademacher probes z): mean of z^T H z.

    ``stderr`` is the sample standard deviation over sqrt(n).  Runs ``samples`` probes, or stops
    early once ``stderr <= tol * |mean|`` after at least ``min_samples`` probes when ``tol`` is
    given.  ``converged``: with ``tol``, whether that test was met; without, whether the
    ``samples`` probes were drawn and the standard error is finite (n >= 2).  The estimate is
    unbiased, NOT a bound.  One HVP per probe.
    """
    if int(samples) != samples or samples < 1:
        raise ValueError(f"samples must be a positive integer, got {samples!r}")
    if tol is not None and not tol > 0:
        raise ValueError(f"tol must be > 0 or None, got {tol!r}")
    w = _flat(w)
    hvp = _hvp(F, w)
    gen = _generator(w, seed)
    values: list[float] = []
    stderr, converged = math.inf, False
    for n in range(1, int(samples) + 1):
        z = torch.randint(0, 2, w.shape, generator=gen, device=w.device).to(w.dtype) * 2 - 1
        values.append(float(z.dot(hvp(z))))
        if n >= 2:
            stderr = float(np.std(values, ddof=1)) / math.sqrt(n)
            if tol is not None and n >= min_samples and stderr <= tol * abs(float(np.mean(values))):
                converged = True
                break
    if tol is None:
        converged = len(values) >= 2
    return Estimate(float(np.mean(values)), len(values), converged, (), stderr)

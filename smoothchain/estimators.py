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
POINT with torch.func (jvp, vjp, double-backward Hessian-vector products on a recorded gradient graph); nothing of size
q x p or p x p is formed.

Every estimate is a LOWER bound of the quantity at ``w`` (it is the value of the sup at explicit
unit vectors, or a Ritz value), hence of the sup over C: an estimate above a certified bound
refutes the certificate, an estimate below it proves nothing.  The iterative ones return an
:class:`Estimate` with the iterations used and a ``converged`` flag, which says that the stated
residual test was met -- not that the GLOBAL maximiser was found (power-type methods can stall
at a smaller local maximum, or miss the top eigenvector when the start is nearly orthogonal to
it; random starts and restarts make this unlikely, never impossible).

Flat-vector convention: the parameters in ``model.named_parameters()`` order (tied parameters
once), each flattened in row-major order and concatenated -- see :func:`flat_parameters`.
Costs and the math are in ``docs/estimators.md``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp

__all__ = [
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

_LOSSES = ("cross-entropy", "square")


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


def flat_parameters(model: nn.Module) -> Tensor:
    """The model's parameters as one detached flat vector (``named_parameters()`` order)."""
    return torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()]).clone()


def _functional_forward(model: nn.Module, x: Tensor) -> tuple[Callable[[Tensor], Tensor], Tensor]:
    """``forward(w)`` = the model's (unflattened) output on ``x`` with flat weights ``w``.

    The model is copied (sharing its parameter tensors, which are never written) so that later
    changes to it do not affect ``forward`` and ``forward`` never writes to it: batch-norm modules
    in training mode lose their running statistics in the copy (they normalise with the batch
    statistics, as in training, and track nothing); batch norms in eval mode keep theirs, read
    only; dropout modules are put in eval mode (the identity), so that ``forward`` is a
    deterministic function of ``w``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    named = list(model.named_parameters())
    if not named:
        raise ValueError("the model has no parameters")
    memo = {id(p): p for _, p in named}  # share parameters: they are replaced in every call
    net = copy.deepcopy(model, memo)
    for mod in net.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.training:
            mod.track_running_stats = False
            mod.running_mean = None
            mod.running_var = None
            mod.num_batches_tracked = None
        elif isinstance(mod, nn.modules.dropout._DropoutNd):
            mod.eval()
    names = [n for n, _ in named]
    shapes = [p.shape for _, p in named]
    sizes = [p.numel() for _, p in named]
    w0 = flat_parameters(model)
    x = x.detach()

    def forward(w: Tensor) -> Tensor:
        if w.shape != w0.shape:
            raise ValueError(f"expected a flat weight vector of shape {tuple(w0.shape)}, got {tuple(w.shape)}")
        params = {n: c.view(s) for n, c, s in zip(names, torch.split(w, sizes), shapes)}
        out = functional_call(net, params, (x,))
        if not isinstance(out, Tensor):
            raise TypeError(f"the model must return one tensor, got {type(out).__name__}")
        return out

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
    if loss not in _LOSSES:
        raise ValueError(f"loss must be one of {_LOSSES}, got {loss!r}")
    if not math.isfinite(l2) or l2 < 0:
        raise ValueError(f"l2 must be a finite number >= 0, got {l2!r}")
    forward, w0 = _functional_forward(model, x)
    y = y.detach()
    target = None
    if loss == "cross-entropy" and not y.is_floating_point():
        # one-hot rows built once, outside F (no data-dependent op inside F, so F can be traced)
        with torch.no_grad():
            k = forward(w0).shape[-1]
        target = nn.functional.one_hot(y, k).to(w0.dtype)

    def F(w: Tensor) -> Tensor:
        out = forward(w)
        if loss == "cross-entropy":
            # -sum(target * log_softmax) / m, written out: torch.func's jvp-of-grad of
            # nn.functional.cross_entropy goes through slow Python decompositions.
            t = y if target is None else target.to(out.dtype)
            value = -(t * torch.log_softmax(out, dim=-1)).sum() / out.shape[0]
        else:
            value = 0.5 * (out - y.reshape(out.shape)).pow(2).sum() / out.shape[0]
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


def _hvp(F: Scalar, w: Tensor) -> Callable[[Tensor], Tensor]:
    """v -> grad^2 F(w) v, reverse-over-reverse on a recorded gradient graph: the gradient is
    computed ONCE with its graph kept (``create_graph=True``), then every product is one
    backward pass through that graph (``retain_graph=True``) -- the same work per product as
    PyHessian's double backward, on one flat vector.  On CPU this is faster than a fresh
    forward-over-reverse ``jvp(grad F, w, v)`` per product, which re-runs the forward and
    backward passes (benchmarks/top_eigenvalue.py)."""
    w_ = w.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(F(w_), w_, create_graph=True)

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
    iters: int = 300,
    tol: float = 1e-6,
    seed: int = 0,
    restarts: int = 8,
    vectorize: bool = False,
) -> Estimate:
    """||grad^2 psi(w)||_{2,2,2} = sup_{|u|=|v|=|z|=1} T[u, v, z], T = D^2 psi(w) (RH Def. A.1).

    Alternating (higher-order) power iteration, run from ``restarts`` random unit starts
    u = v (a maximiser with u = v exists, T being symmetric in its first two slots); one cycle is

        s = T[u, v]            (forward-over-forward: jvp along u of w -> jvp(psi, w, v))
        z = s / ||s||
        g = T[., v, z]         (reverse-over-forward: vjp at z of w -> jvp(psi, w, v))
        u = g / ||g||
        h = T[u, ., z]         (the same with the new u, by symmetry)
        v = h / ||h||

    Each step maximises T[u, v, z] exactly over one block, so a run's value never decreases.
    A run's residual is sqrt(||g - ||s|| u_old||^2 + ||h - ||g|| v_old||^2) (zero exactly at a
    stationary triple); the run stops when that is <= tol * ||h|| (converged) or after ``iters``
    cycles.  The problem is non-convex (tensor norms are NP-hard in general) and a run may stop
    at a LOCAL maximum: the largest value over the runs is returned, which is T[u, v, z] at the
    returned unit vectors ``vectors = (u, v, z)`` -- a lower bound of the norm, never more.
    ``iterations`` = cycles summed over the runs; ``converged`` = the best run converged.

    Cost per cycle and run: one forward-over-forward pass and two reverse-over-forward passes.
    ``vectorize=True`` batches the active runs with ``torch.func.vmap`` -- faster for small
    MLPs, much slower for convolutions (no efficient batching rule for their second-order
    forward mode), and ``restarts`` times the memory; the default loops over the runs.
    """
    w = _check(w, iters, tol)
    if int(restarts) != restarts or restarts < 1:
        raise ValueError(f"restarts must be a positive integer, got {restarts!r}")
    gen = _generator(w, seed)
    U = torch.stack([_unit(w, gen) for _ in range(int(restarts))])
    V = U.clone()

    def first(d: Tensor) -> Callable[[Tensor], Tensor]:  # w -> J(w) d
        return lambda w_: jvp(psi, (w_,), (d,))[1]

    def second(u: Tensor, v: Tensor) -> Tensor:  # T[u, v]
        return jvp(first(v), (w,), (u,))[1]

    def contract(d: Tensor, z: Tensor) -> Tensor:  # T[., d, z] = grad_w <z, J(w) d>
        return vjp(first(d), w)[1](z)[0]

    if vectorize:
        second_b, contract_b = torch.func.vmap(second), torch.func.vmap(contract)
    else:
        second_b = lambda A, B: torch.stack([second(a, b) for a, b in zip(A, B)])  # noqa: E731
        contract_b = lambda A, B: torch.stack([contract(a, b) for a, b in zip(A, B)])  # noqa: E731

    def safe(n: Tensor) -> Tensor:
        return torch.where(n > 0, n, torch.ones_like(n))

    R = int(restarts)
    Z = torch.zeros(R, psi(w).numel(), dtype=w.dtype, device=w.device)
    values = torch.zeros(R, dtype=w.dtype)
    done = torch.zeros(R, dtype=torch.bool)
    cycles = 0
    for _ in range(int(iters)):
        act = torch.nonzero(~done).flatten()
        if act.numel() == 0:
            break
        cycles += act.numel()
        u, v = U[act], V[act]
        s = second_b(u, v)
        s0 = s.norm(dim=1)
        z = s / safe(s0)[:, None]
        g = contract_b(v, z)
        s1 = g.norm(dim=1)
        r_u = (g - s0[:, None] * u).norm(dim=1)
        u = g / safe(s1)[:, None]
        h = contract_b(u, z)
        s2 = h.norm(dim=1)
        r_v = (h - s1[:, None] * v).norm(dim=1)
        v = h / safe(s2)[:, None]
        # s0 = 0 at a random start means T = 0 (almost surely): value 0, exact.
        U[act], V[act], Z[act], values[act] = u, v, z, s2
        done[act] = torch.hypot(r_u, r_v) <= tol * s2
    i = int(torch.argmax(values))
    return Estimate(float(values[i]), cycles, bool(done[i]), (U[i], V[i], Z[i]))


# --------------------------------------------------------------------------------------------
# Objective estimators
# --------------------------------------------------------------------------------------------


def hessian_top_eig(
    F: Scalar, w: Tensor, method: str = "lanczos", iters: int = 100, tol: float = 1e-6, seed: int = 0
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
    """
    w = _check(w, iters, tol)
    if method not in ("power", "lanczos"):
        raise ValueError(f"method must be 'power' or 'lanczos', got {method!r}")
    hvp = _hvp(F, w)
    v = _unit(w, _generator(w, seed))
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
    return _lanczos(hvp, v, int(iters), tol)


def _lanczos(hvp: Callable[[Tensor], Tensor], v: Tensor, iters: int, tol: float) -> Estimate:
    basis = [v]
    alphas: list[float] = []
    betas: list[float] = []
    theta, ritz, converged, k = 0.0, None, False, 0
    for k in range(1, min(iters, v.numel()) + 1):
        q = basis[-1]
        r = hvp(q)
        alpha = float(q.dot(r))
        alphas.append(alpha)
        r = r - alpha * q
        if len(basis) > 1:
            r = r - betas[-1] * basis[-2]
        Q = torch.stack(basis)
        for _ in range(2):  # full reorthogonalisation, twice is enough
            r = r - Q.T @ (Q @ r)
        beta = float(r.norm())
        Tk = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
        evals, evecs = np.linalg.eigh(Tk)
        i = int(np.argmax(np.abs(evals)))
        theta, s = float(evals[i]), evecs[:, i]
        ritz = Q.T @ torch.as_tensor(s, dtype=Q.dtype, device=Q.device)
        scale = max(abs(theta), np.abs(evals).max(), 1e-300)
        # Converged: small Ritz residual, an (numerically) invariant Krylov space, or the whole
        # space spanned -- in the last two cases the Ritz values are eigenvalues.
        if beta * abs(s[-1]) <= tol * abs(theta) or beta <= 1e-14 * scale or k == v.numel():
            converged = True
            break
        betas.append(beta)
        basis.append(r / beta)
    return Estimate(abs(theta), k, converged, (ritz / ritz.norm(),))


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

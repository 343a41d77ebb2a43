"""Oracle steps as linear-quadratic control problems (RH Prop. 3.1, eq. (15)) solved by dynamic
programming (RH Prop. C.1 / Algo. 4; Prop. C.2 for the gradient step).

Layers.  An ``nn.Sequential`` (nested ones are flattened) is grouped into RH layers: every leaf
module that owns parameters (``nn.Linear``, ``nn.Conv2d``, ...) opens a layer
phi_l(v_l, z_{l-1}); the parameter-free modules that follow it (activations, pooling, flatten)
join it.  Parameter-free modules before the first such module only transform the input:
z_0 = pre(x) (a parameter-free layer would have an empty v_l and z~ = 0 through it anyway).
v_l is the concatenation of the flattened parameters of the layer's module in
``named_parameters`` order, so (v_1; ...; v_tau) is ``model.parameters()`` flattened; z_l is the
flattened batch of activations after layer l (size delta_l = m x entries per example).

Problem (15), with the paper's notations (A_l, B_l are Jacobians, grad = transposed Jacobian):

    min  sum_l 1/2 z~_l^T P_l z~_l + p_l^T z~_l + z~_{l-1}^T R_l v~_l
               + 1/2 v~_l^T Q_l v~_l + q_l^T v~_l + 1/(2 gamma) ||v~_l||^2
    s.t. z~_l = A_l z~_{l-1} + B_l v~_l,  z~_0 = 0,

A_l = grad_z phi_l^T, B_l = grad_v phi_l^T, p_tau = grad f(psi(w_t)), q_l = grad r_l(v_l) = l2 v_l;
gradient (12): P = R = Q = 0; Gauss-Newton (13): P_tau = grad^2 f, Q_l = l2 I; Newton (14):
additionally P_{l-1} = grad^2_zz phi_l[., ., lambda_l], R_l = grad^2_zv phi_l[., ., lambda_l],
Q_l = l2 I + grad^2_vv phi_l[., ., lambda_l], lambda_tau = grad f, lambda_{l-1} = A_l^T lambda_l.
(A_1, P_0 and R_1 multiply z~_0 = 0: they are not computed, and the Riccati pass stops at
M_1, k_1 -- K_1, C_0, c_0 multiply z~_0 too.)  ``None`` stands for a zero or unused block.

Counting: the forward pass (values and per-layer vjp closures, Algo. 1) is not a call; the one
backward sweep through the layers (Algo. 2 for the gradient; Algo. 4 lines 7-12, which here
also materialises A_l, B_l from the stored closures and the lambda-contracted second
derivatives) is one call.  The Riccati pass (Algo. 4 lines 13-25, repeated on every halving) and
the rollout (lines 26-30) use only the stored matrices: no autodiff, no call.  A DP sweep with
matrix-valued derivatives costs far more than a sweep of the matrix-free oracle; the count says
how many times the chain is traversed by autodiff, not the arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Sequence

import torch
from torch import nn

from ..functional import FunctionalModule, make_functional_call
from ..torch_chain import module_layers
from .autodiff import OracleCounter, loss_grad, loss_hessian

__all__ = [
    "ChainLayer",
    "ChainLayers",
    "LQProblem",
    "LQSolution",
    "split_layers",
    "gradient_dp",
    "assemble_lq",
    "solve_lq",
    "lq_objective",
    "lq_bytes",
    "MAX_LQ_BYTES",
]

STEP_KINDS = ("gradient", "gauss-newton", "newton")

#: Refuse to assemble (15) when its dense matrices would need more than this many bytes
#: (:func:`lq_bytes`); the DP stores delta_l x delta_{l-1} and delta_l x rho_l matrices per layer,
#: delta_l = batch x width, so a full-batch Newton step on a wide layer cannot fit in memory.
MAX_LQ_BYTES = 8 * 2 ** 30


@dataclass(frozen=True)
class ChainLayer:
    """One RH layer: the module owning v_l followed by parameter-free modules."""

    modules: tuple[nn.Module, ...]
    names: tuple[str, ...]
    params: tuple[torch.Tensor, ...]

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    def vector(self) -> torch.Tensor:
        """v_l, the layer's parameters flattened and concatenated."""
        return torch.cat([p.detach().reshape(-1) for p in self.params])

    @cached_property
    def function(self) -> FunctionalModule:
        """The layer's first module as a function of v_l (called as it is, no copy)."""
        call = make_functional_call(self.modules[0])
        if call.names != tuple(self.names):
            raise ValueError(f"the layer's names {list(self.names)} are not the parameters "
                             f"{list(call.names)} of its first module")
        return call

    def unflatten(self, v: torch.Tensor) -> list[torch.Tensor]:
        """v_l as tensors shaped like the layer's parameters."""
        return self.function.unflatten(v)

    def apply(self, v: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """phi_l(v, z) on structured activations z (batch first)."""
        h = self.function(v, z)
        for mod in self.modules[1:]:
            h = mod(h)
        return h


@dataclass(frozen=True)
class ChainLayers:
    pre: tuple[nn.Module, ...]
    layers: tuple[ChainLayer, ...]

    def input(self, x: torch.Tensor) -> torch.Tensor:
        for mod in self.pre:
            x = mod(x)
        return x

    def vectors(self) -> list[torch.Tensor]:
        return [layer.vector() for layer in self.layers]

    def to_parameters(self, v: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per-layer flat vectors -> list shaped like ``model.parameters()``."""
        return [t for layer, vl in zip(self.layers, v) for t in layer.unflatten(vl)]


def split_layers(model: nn.Module) -> ChainLayers:
    """An ``nn.Sequential`` as RH layers: :func:`smoothchain.torch_chain.module_layers` (see the
    module docstring), with each layer's functional call."""
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"the DP oracles need an nn.Sequential chain, got {type(model).__name__}")
    parsed = module_layers(model)
    if not parsed.layers:
        raise ValueError("the model has no parameters: nothing to optimise")
    layers = [ChainLayer(tuple(m for _, m in layer.modules), tuple(n for n, _ in layer.params),
                         tuple(p for _, p in layer.params)) for layer in parsed.layers]
    return ChainLayers(tuple(m for _, m in parsed.pre), tuple(layers))


def _forward(chain: ChainLayers, vs: Sequence[torch.Tensor], x: torch.Tensor):
    """Algo. 1: activations z_0..z_tau (structured) and the per-layer vjp closures.

    The closure of layer l > 1 returns (grad_v, grad_z); that of layer 1 returns (grad_v,) only:
    z_0 is the fixed input, lambda_0 = A_1^T lambda_1 is never needed (z~_0 = 0).
    """
    zs = [chain.input(x).detach()]
    vjps = []
    for l, (layer, v) in enumerate(zip(chain.layers, vs)):
        if l == 0:
            out, vjp_fn = torch.func.vjp(lambda v, z=zs[0], layer=layer: layer.apply(v, z), v)
        else:
            out, vjp_fn = torch.func.vjp(layer.apply, v, zs[-1])
        zs.append(out.detach())
        vjps.append(vjp_fn)
    return zs, vjps


def gradient_dp(model: nn.Module, x: torch.Tensor, f: Callable, l2: float, gamma: float,
                counter: OracleCounter) -> list[torch.Tensor]:
    """Gradient step (12) by DP, RH Prop. C.2: linear costs-to-go lambda_l^T z, i.e. back-propagation.

    lambda_tau = grad f(psi(w)), lambda_{l-1} = A_l^T lambda_l, v~_l = -gamma (l2 v_l + B_l^T lambda_l).
    """
    chain = split_layers(model)
    vs = chain.vectors()
    zs, vjps = _forward(chain, vs, x)
    counter.forward_passes += 1
    lam = loss_grad(f, zs[-1])
    counter.backward_calls += 1
    steps = [None] * len(vs)
    for l in reversed(range(len(vs))):
        g_v, *rest = vjps[l](lam)
        lam = rest[0] if rest else None
        steps[l] = -gamma * (l2 * vs[l] + g_v)
    return chain.to_parameters(steps)


@dataclass
class LQProblem:
    """Problem (15). Lists over layers l = 1..tau (Python index l-1), P and p over 0..tau."""

    A: list[torch.Tensor | None]   # A[0] = None: A_1 multiplies z~_0 = 0
    B: list[torch.Tensor]
    P: list[torch.Tensor | None]
    p: list[torch.Tensor | None]
    R: list[torch.Tensor | None]
    Q: list[torch.Tensor | None]
    q: list[torch.Tensor | None]
    chain: ChainLayers

    @property
    def depth(self) -> int:
        return len(self.A)


@dataclass
class LQSolution:
    v: list[torch.Tensor]   # v~*_l, flat per layer
    gamma: float            # the step size used
    feasible: bool          # Algo. 4's flag: False iff the requested gamma needed halving
    tries: int              # Riccati passes run (1 + number of halvings)
    failed_at: tuple[int, ...] = ()   # per failed pass, the 0-based layer whose stage was not PD


def lq_bytes(deltas: Sequence[int], rhos: Sequence[int], kind: str, itemsize: int = 8) -> int:
    """Bytes of the dense matrices that :func:`assemble_lq` and :func:`solve_lq` hold at once.

    ``deltas`` = (delta_0, ..., delta_tau) (activation sizes over the batch), ``rhos`` =
    (rho_1, ..., rho_tau).  Stored per layer: B_l (delta_l x rho_l), A_l (delta_l x delta_{l-1})
    and K_l (rho_l x delta_{l-1}) for l > 1, and for Newton the layer Hessian
    ((rho_l + delta_{l-1})^2 with its Q_l, R_l, P_{l-1} blocks; rho_1^2 for l = 1); transient, for
    the largest layer: the basis of the vmapped vjps (delta_l^2), C_l (delta_l^2) and M_l (rho_l^2).
    """
    stored = transient = 0
    for l, rho in enumerate(rhos, start=1):
        d_in, d_out = deltas[l - 1], deltas[l]
        stored += d_out * rho + ((d_out * d_in + rho * d_in) if l > 1 else 0)
        if kind == "newton":
            stored += (rho + (d_in if l > 1 else 0)) ** 2
        transient = max(transient, 2 * d_out * d_out + rho * rho)
    return itemsize * (stored + transient)


def assemble_lq(model: nn.Module, x: torch.Tensor, f: Callable, l2: float, kind: str,
                counter: OracleCounter) -> LQProblem:
    """Build (15) at w_t for ``kind`` in {"gradient", "gauss-newton", "newton"} (RH Prop. 3.1).

    Raises ``ValueError`` before any derivative is materialised when the problem's dense matrices
    would exceed :data:`MAX_LQ_BYTES` (:func:`lq_bytes`).
    """
    if kind not in STEP_KINDS:
        raise ValueError(f"kind must be one of {STEP_KINDS}, got {kind!r}")
    chain = split_layers(model)
    vs = chain.vectors()
    tau = len(vs)
    zs, vjps = _forward(chain, vs, x)
    counter.forward_passes += 1
    deltas = [z.numel() for z in zs]
    need = lq_bytes(deltas, [v.numel() for v in vs], kind, zs[-1].element_size())
    if need > MAX_LQ_BYTES:
        raise ValueError(
            f"the {kind} step by dynamic programming would hold ~{need / 2 ** 30:.3g} GiB of dense "
            f"layer matrices (activation sizes batch x width = {deltas}; limit "
            f"smoothchain.oracles.lq.MAX_LQ_BYTES = {MAX_LQ_BYTES / 2 ** 30:.3g} GiB): take the "
            f"step on a smaller mini-batch or a narrower chain"
            + (", or use Gauss-Newton by the dual (method='dual')" if kind == "gauss-newton" else ""))
    g = loss_grad(f, zs[-1]).reshape(-1)
    A, B = [None] * tau, [None] * tau
    P: list = [None] * (tau + 1)
    p: list = [None] * (tau + 1)
    R: list = [None] * tau
    Q: list = [None] * tau
    q = [l2 * v if l2 else None for v in vs]
    p[tau] = g
    if kind != "gradient":
        P[tau] = loss_hessian(f, zs[-1])
    counter.backward_calls += 1  # one backward sweep (Algo. 4 lines 7-12)
    lam = g
    for l in reversed(range(tau)):
        z_in, z_out = zs[l], zs[l + 1]
        d_out, d_in = z_out.numel(), z_in.numel()
        basis = torch.eye(d_out, dtype=z_out.dtype, device=z_out.device).reshape(d_out, *z_out.shape)
        Bt, *At = torch.func.vmap(vjps[l])(basis)
        B[l] = Bt.reshape(d_out, -1)
        if l > 0:   # A_1 multiplies z~_0 = 0: not computed
            A[l] = At[0].reshape(d_out, d_in)
        rho = B[l].shape[1]
        if kind != "gradient" and l2:
            Q[l] = l2 * torch.eye(rho, dtype=g.dtype, device=g.device)
        if kind == "newton":
            layer, lam_l = chain.layers[l], lam

            def s(v, z, layer=layer, lam_l=lam_l, shape=z_in.shape):
                return torch.dot(lam_l, layer.apply(v, z.reshape(shape)).reshape(-1))

            if l == 0:  # z~_0 = 0: only the v-v block matters
                H_vv = torch.func.hessian(s, argnums=0)(vs[l], z_in.reshape(-1))
            else:
                (H_vv, _), (H_zv, H_zz) = torch.func.hessian(s, argnums=(0, 1))(
                    vs[l], z_in.reshape(-1))
                R[l] = H_zv.detach()
                P[l] = H_zz.detach()
            Q[l] = H_vv.detach() if Q[l] is None else Q[l] + H_vv.detach()
        if l > 0:
            lam = A[l].T @ lam
    return LQProblem(A, B, P, p, R, Q, q, chain)


def _riccati(lq: LQProblem, gamma: float):
    """Algo. 4 lines 14-22 for one gamma: ``(failed, K, k)``; ``failed`` is None when every stage
    is positive definite, else the 0-based layer index of the first stage that is not.

    At layer 1 only M_1 and k_1 are formed: K_1 and C_0, c_0 multiply z~_0 = 0.
    """
    tau = lq.depth
    C = lq.P[tau]
    c = lq.p[tau]
    K, k = [None] * tau, [None] * tau
    for l in reversed(range(tau)):
        A, B = lq.A[l], lq.B[l]
        rho = B.shape[1]
        M = torch.eye(rho, dtype=B.dtype, device=B.device) / gamma
        if lq.Q[l] is not None:
            M = M + lq.Q[l]
        if C is not None:
            M = M + (B.T @ C) @ B
        M = 0.5 * (M + M.T)
        L, info = torch.linalg.cholesky_ex(M)
        if int(info) != 0 or not bool(torch.isfinite(L).all()):
            return l, None, None
        n = B.T @ c if c is not None else torch.zeros(rho, dtype=B.dtype, device=B.device)
        if lq.q[l] is not None:
            n = n + lq.q[l]
        k[l] = -torch.cholesky_solve(n.unsqueeze(1), L).squeeze(1)
        if l == 0:
            break
        # N = R^T + B^T C A; K = -M^{-1} N; C_{l-1} = P_{l-1} + A^T C A + N^T K;
        # c_{l-1} = A^T c + p_{l-1} + N^T k
        CA = C @ A if C is not None else None
        N = B.T @ CA if CA is not None else torch.zeros(rho, A.shape[1], dtype=B.dtype, device=B.device)
        if lq.R[l] is not None:
            N = N + lq.R[l].T
        K[l] = -torch.cholesky_solve(N, L)
        C_new = N.T @ K[l]
        if CA is not None:
            C_new = C_new + A.T @ CA
        if lq.P[l] is not None:
            C_new = C_new + lq.P[l]
        C = 0.5 * (C_new + C_new.T)
        c_new = N.T @ k[l]
        if c is not None:
            c_new = c_new + A.T @ c
        if lq.p[l] is not None:
            c_new = c_new + lq.p[l]
        c = c_new
    return None, K, k


def solve_lq(lq: LQProblem, gamma: float, *, max_halvings: int = 100) -> LQSolution:
    """RH Prop. C.1 / Algo. 4: Riccati pass, halving gamma while a stage is not positive definite
    (gamma^-1 I + Q_l + B_l^T C_l B_l not > 0), then the rollout from z~_0 = 0."""
    feasible = True
    failed_at: list[int] = []
    for tries in range(1, max_halvings + 2):
        failed, K, k = _riccati(lq, gamma)
        if failed is None:
            break
        failed_at.append(failed)
        feasible = False
        gamma = gamma / 2.0
    else:
        raise RuntimeError(f"step problem still infeasible after {max_halvings} halvings of gamma "
                           f"(gamma = {gamma!r}); are the derivatives finite?")
    z = None
    v = []
    for l in range(lq.depth):
        vl = k[l] if z is None else K[l] @ z + k[l]
        if l + 1 < lq.depth:   # z~_tau is not needed
            z = lq.B[l] @ vl if z is None else lq.A[l] @ z + lq.B[l] @ vl
        v.append(vl)
    return LQSolution(v, gamma, feasible, tries, tuple(failed_at))


def lq_objective(lq: LQProblem, v: Sequence[torch.Tensor], gamma: float) -> torch.Tensor:
    """The value of (15) at v~ = (v~_1; ...; v~_tau), z~ given by the dynamics (for tests)."""
    B0 = lq.B[0]
    total = torch.zeros((), dtype=B0.dtype, device=B0.device)
    z_prev = None
    for l in range(lq.depth):
        z = lq.B[l] @ v[l] if z_prev is None else lq.A[l] @ z_prev + lq.B[l] @ v[l]
        if lq.P[l + 1] is not None:
            total = total + 0.5 * z @ lq.P[l + 1] @ z
        if lq.p[l + 1] is not None:
            total = total + lq.p[l + 1] @ z
        if lq.R[l] is not None and z_prev is not None:
            total = total + z_prev @ lq.R[l] @ v[l]
        if lq.Q[l] is not None:
            total = total + 0.5 * v[l] @ lq.Q[l] @ v[l]
        if lq.q[l] is not None:
            total = total + lq.q[l] @ v[l]
        total = total + v[l] @ v[l] / (2.0 * gamma)
        z_prev = z
    return total

"""Matrix-free estimators (smoothchain.estimators) against dense float64 references.

Every estimator is compared, by one helper with explicit tolerances, with the same quantity
computed from dense derivatives built with torch.func (jacrev, hessian) on tiny models listed in
``CASES`` (seeded, readable ids).  The tensor norm ||T||_{2,2,2} of T = grad^2 psi (q x p x p)
has exact dense references for q = 1 (spectral norm of one symmetric Hessian) and q = 2 (a
one-dimensional maximisation over z = (cos t, sin t) of ||z_1 T_1 + z_2 T_2||_2, RH Fact A.2.3);
for larger q the reference is the best of many restarts of an independent numpy iteration.
Hutchinson is tested by convergence within 4 standard errors, not by snapshots.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Callable

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar
from torch import nn
from torch.func import hessian, jacrev, jvp, vjp

from smoothchain.estimators import (
    Estimate,
    _hvp,
    flat_parameters,
    functional_chain,
    hessian_top_eig,
    hutchinson_trace,
    jacobian_norm,
    objective,
    output_norm,
    second_derivative_norm,
)

DT = torch.float64


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------


def _mlp_tanh():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    return model, torch.randn(3, 3, dtype=DT), torch.tensor([0, 1, 1]), "cross-entropy"


def _mlp_sigmoid_softplus():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(2, 3), nn.Sigmoid(), nn.Linear(3, 3), nn.Softplus(), nn.Linear(3, 2)).to(DT)
    return model, torch.randn(2, 2, dtype=DT), torch.randn(2, 2, dtype=DT), "square"


def _cnn_softplus_avgpool():
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.Softplus(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(8, 2)
    ).to(DT)
    y = torch.softmax(torch.randn(2, 2, dtype=DT), dim=1)  # soft labels
    return model, torch.randn(2, 1, 6, 6, dtype=DT), y, "cross-entropy"


def _mlp_batchnorm_train():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    model.train()
    return model, torch.randn(4, 3, dtype=DT), torch.tensor([0, 1, 0, 1]), "cross-entropy"


def _scalar_output():  # q = 1: ||T|| is the spectral norm of one Hessian
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 1)).to(DT)
    return model, torch.randn(1, 3, dtype=DT), torch.randn(1, 1, dtype=DT), "square"


def _two_outputs():  # q = 2 (batch of 2, one output each)
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(2, 3), nn.Softplus(), nn.Linear(3, 1)).to(DT)
    return model, torch.randn(2, 2, dtype=DT), torch.randn(2, 1, dtype=DT), "square"


def _affine():  # psi linear in w: T = 0
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(3, 2)).to(DT)
    return model, torch.randn(2, 3, dtype=DT), torch.tensor([1, 0]), "cross-entropy"


CASES: dict[str, Callable] = {
    "mlp-tanh-m3": _mlp_tanh,
    "mlp-sigmoid-softplus-square": _mlp_sigmoid_softplus,
    "cnn-softplus-avgpool": _cnn_softplus_avgpool,
    "mlp-batchnorm-train": _mlp_batchnorm_train,
    "scalar-output-q1": _scalar_output,
    "two-outputs-q2": _two_outputs,
    "affine": _affine,
}
MAIN = ["mlp-tanh-m3", "mlp-sigmoid-softplus-square", "cnn-softplus-avgpool", "mlp-batchnorm-train"]


@dataclass
class Dense:
    """A case with its functions and dense float64 references (computed on first use)."""

    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    loss: str

    @cached_property
    def chain(self):
        return functional_chain(self.model, self.x)

    @property
    def psi(self):
        return self.chain[0]

    @property
    def w0(self):
        return self.chain[1]

    @cached_property
    def F(self):
        return objective(self.model, self.x, self.y, loss=self.loss, l2=0.1)

    @cached_property
    def J(self) -> torch.Tensor:  # q x p
        return jacrev(self.psi)(self.w0)

    @cached_property
    def T(self) -> np.ndarray:  # q x p x p
        return jacrev(jacrev(self.psi))(self.w0).numpy()

    @cached_property
    def H(self) -> torch.Tensor:  # p x p
        return hessian(self.F)(self.w0)


@lru_cache(maxsize=None)
def dense(case: str) -> Dense:
    return Dense(*CASES[case]())


def assert_close(estimate: Estimate, exact: float, rtol: float = 1e-6, atol: float = 1e-12) -> None:
    """The shared comparison: a converged estimate within rtol of the dense value."""
    assert estimate.converged, estimate
    assert math.isfinite(estimate.value)
    assert abs(estimate.value - exact) <= rtol * abs(exact) + atol, (estimate.value, exact)


# --------------------------------------------------------------------------------------------
# Dense tensor-norm references
# --------------------------------------------------------------------------------------------


def tensor_norm_exact(T: np.ndarray) -> float:
    """||T||_{2,2,2} = sup_{|z|=1} ||sum_k z_k T_k||_2 (RH Fact A.2.3), exact for q <= 2."""
    q = T.shape[0]
    if q == 1:
        return float(np.abs(np.linalg.eigvalsh(T[0])).max())
    assert q == 2

    def f(t: float) -> float:
        return float(np.abs(np.linalg.eigvalsh(math.cos(t) * T[0] + math.sin(t) * T[1])).max())

    # f(t + pi) = f(t); f is Lipschitz: a fine grid, then a bounded Brent refinement around
    # each of the best grid points.
    grid = np.linspace(0.0, math.pi, 2001)
    vals = np.array([f(t) for t in grid])
    h = grid[1] - grid[0]
    best = vals.max()
    for i in np.argsort(vals)[-5:]:
        res = minimize_scalar(lambda t: -f(t), bounds=(grid[i] - h, grid[i] + h), method="bounded",
                              options={"xatol": 1e-13})
        best = max(best, -res.fun)
    return float(best)


def tensor_norm_restarts(T: np.ndarray, restarts: int = 64, seed: int = 123, tol: float = 1e-12) -> float:
    """Best of many runs of a dense alternating iteration on (u, v, z), vectorised in numpy, half
    of the runs from u = v and half from independent u, v.  A lower bound of ||T||_{2,2,2}."""
    q, p, _ = T.shape
    rng = np.random.default_rng(seed)
    U = rng.standard_normal((restarts, p))
    V = rng.standard_normal((restarts, p))
    V[: restarts // 2] = U[: restarts // 2]
    U /= np.linalg.norm(U, axis=1, keepdims=True)
    V /= np.linalg.norm(V, axis=1, keepdims=True)
    for _ in range(20000):
        S = np.einsum("kij,ri,rj->rk", T, U, V)
        Z = S / np.linalg.norm(S, axis=1, keepdims=True)
        G = np.einsum("kij,rj,rk->ri", T, V, Z)
        U_new = G / np.linalg.norm(G, axis=1, keepdims=True)
        Hm = np.einsum("kij,ri,rk->rj", T, U_new, Z)
        V_new = Hm / np.linalg.norm(Hm, axis=1, keepdims=True)
        moved = max(np.abs(U_new - U).max(), np.abs(V_new - V).max())
        U, V = U_new, V_new
        if moved <= tol:
            break
    return float(np.linalg.norm(Hm, axis=1).max())


def T_at(T: np.ndarray, u, v, z) -> float:
    return float(np.einsum("kij,i,j,k->", T, u.numpy(), v.numpy(), z.numpy()))


# --------------------------------------------------------------------------------------------
# The functions of w
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", MAIN + ["affine"])
def test_functional_chain_is_the_model(case):
    d = dense(case)
    reference = copy.deepcopy(d.model)  # train-mode batch norm would update running stats
    assert torch.equal(d.w0, flat_parameters(d.model))
    assert torch.allclose(d.psi(d.w0), reference(d.x).reshape(-1), rtol=0, atol=1e-14)
    w1 = d.w0 + 0.1 * torch.randn(d.w0.shape, generator=torch.Generator().manual_seed(0), dtype=DT)
    nn.utils.vector_to_parameters(w1, reference.parameters())
    assert torch.allclose(d.psi(w1), reference(d.x).reshape(-1), rtol=0, atol=1e-14)


def test_batchnorm_uses_batch_statistics_and_keeps_running_stats():
    d = dense("mlp-batchnorm-train")
    bn = d.model[1]
    before = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    out = d.psi(d.w0).reshape(d.x.shape[0], -1)
    jacobian_norm(d.psi, d.w0, iters=3)
    hessian_top_eig(d.F, d.w0, iters=3)
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    assert int(bn.num_batches_tracked) == before[2] and bn.training
    # batch statistics: an example's output depends on the others'
    psi_half, _ = functional_chain(d.model, d.x[:2])
    assert not torch.allclose(psi_half(d.w0).reshape(2, -1), out[:2])
    # in eval mode the (unchanged) running statistics are used: examples are independent
    evaluated = copy.deepcopy(d.model).eval()
    psi_eval, w0 = functional_chain(evaluated, d.x)
    psi_eval_half, _ = functional_chain(evaluated, d.x[:2])
    assert torch.allclose(psi_eval(w0).reshape(4, -1)[:2], psi_eval_half(w0).reshape(2, -1))


@pytest.mark.parametrize("case", ["mlp-batchnorm-train", "mlp-tanh-m3"])
def test_second_derivatives_match_finite_differences_in_every_ad_mode(case):
    """T[u, v] = D^2 psi(w)[u, v] by every AD mode the estimators use, against a float64
    central difference of psi values only.  Guards against PyTorch's fused batch norm, whose
    nested forward-mode derivative is wrong (pytorch/pytorch#196699): psi replaces it."""
    d = dense(case)
    psi, w = d.psi, d.w0
    gen = torch.Generator().manual_seed(0)
    u, v = (torch.randn(w.shape, generator=gen, dtype=DT) for _ in range(2))
    z = torch.randn(psi(w).shape, generator=gen, dtype=DT)
    e = 1e-4
    fd = (psi(w + e * u + e * v) - psi(w + e * u - e * v) - psi(w - e * u + e * v) + psi(w - e * u - e * v)) / (4 * e * e)
    fwd_fwd = jvp(lambda w_: jvp(psi, (w_,), (v,))[1], (w,), (u,))[1]
    rev_fwd = vjp(lambda w_: jvp(psi, (w_,), (v,))[1], w)[1](z)[0]         # T[., v, z]
    rev_rev = torch.einsum("kij,i,j->k", torch.as_tensor(d.T), u, v)        # jacrev(jacrev)
    hess_z = hessian(lambda w_: psi(w_).dot(z))(w)                           # forward-over-reverse
    scale = float(fd.norm())
    for name, val in [("fwd-fwd", fwd_fwd), ("rev-rev", rev_rev)]:
        assert float((val - fd).norm()) <= 1e-6 * scale, name
    assert float((rev_fwd - torch.einsum("kij,j,k->i", torch.as_tensor(d.T), v, z)).norm()) <= 1e-9 * scale
    assert abs(float(u @ hess_z @ v) - float(fd.dot(z))) <= 1e-6 * scale * float(z.norm())
    assert abs(float(u @ _hvp(lambda w_: psi(w_).dot(z), w)(v)) - float(fd.dot(z))) <= 1e-6 * scale * float(z.norm())


def test_dropout_is_the_identity():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5), nn.Linear(3, 2)).to(DT).train()
    x = torch.randn(2, 3, dtype=DT)
    psi, w0 = functional_chain(model, x)
    assert torch.allclose(psi(w0), copy.deepcopy(model).eval()(x).reshape(-1))
    assert model.training


@pytest.mark.parametrize("case", MAIN)
def test_objective_value(case):
    d = dense(case)
    out = copy.deepcopy(d.model)(d.x)
    m = out.shape[0]
    if d.loss == "cross-entropy":
        f = nn.functional.cross_entropy(out, d.y)
    else:
        f = 0.5 * ((out - d.y) ** 2).sum() / m
    expected = f + 0.05 * d.w0.pow(2).sum()
    assert torch.allclose(d.F(d.w0), expected, rtol=1e-13, atol=0)


class _ViewNet(nn.Module):
    """A CNN whose forward needs the default memory layout (``.view`` of a feature map)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.fc = nn.Linear(3 * 3 * 3, 4)

    def forward(self, x):
        h = torch.tanh(self.conv(x))
        return self.fc(h.view(h.size(0), -1))


def test_a_forward_that_needs_the_default_layout_still_works():
    torch.manual_seed(0)
    model = _ViewNet().double()
    x = torch.randn(5, 2, 5, 5, dtype=torch.float64)
    y = torch.randint(0, 4, (5,))
    with pytest.raises(RuntimeError):  # the layout the estimators try first
        model(x.contiguous(memory_format=torch.channels_last))
    F = objective(model, x, y)
    w0 = flat_parameters(model)
    assert torch.allclose(F(w0), nn.functional.cross_entropy(model(x), y), rtol=1e-13, atol=0)
    H = hessian(F)(w0)
    est = hessian_top_eig(F, w0, iters=500, tol=1e-10)
    assert abs(est.value - float(torch.linalg.eigvalsh(H).abs().max())) <= 1e-8 * est.value


def test_bad_arguments():
    d = dense("affine")
    with pytest.raises(ValueError, match="loss"):
        objective(d.model, d.x, d.y, loss="hinge")
    with pytest.raises(ValueError, match="l2"):
        objective(d.model, d.x, d.y, l2=-1.0)
    with pytest.raises(ValueError, match="iters"):
        jacobian_norm(d.psi, d.w0, iters=0)
    with pytest.raises(ValueError, match="tol"):
        second_derivative_norm(d.psi, d.w0, tol=0.0)
    with pytest.raises(ValueError, match="method"):
        hessian_top_eig(d.F, d.w0, method="arnoldi")
    with pytest.raises(ValueError, match="samples"):
        hutchinson_trace(d.F, d.w0, samples=0)
    with pytest.raises(ValueError, match="flat"):
        output_norm(d.psi, d.w0[None])


# --------------------------------------------------------------------------------------------
# Chain estimators
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", MAIN)
def test_output_norm_exact(case):
    d = dense(case)
    est = output_norm(d.psi, d.w0)
    with torch.no_grad():
        exact = float(copy.deepcopy(d.model)(d.x).norm())
    assert_close(est, exact, rtol=1e-14)


@pytest.mark.parametrize("case", MAIN + ["affine"])
def test_jacobian_norm_matches_dense(case):
    d = dense(case)
    exact = float(torch.linalg.matrix_norm(d.J, 2))
    est = jacobian_norm(d.psi, d.w0, iters=1000, tol=1e-6)
    assert_close(est, exact)
    assert est.value <= exact * (1 + 1e-12)  # a lower bound
    (v,) = est.vectors
    assert abs(float(v.norm()) - 1) < 1e-12


@pytest.mark.parametrize("case", ["scalar-output-q1", "two-outputs-q2"])
def test_second_derivative_norm_exact_small_q(case):
    d = dense(case)
    exact = tensor_norm_exact(d.T)
    # the numpy reference used for larger q agrees with the exact one here
    assert abs(tensor_norm_restarts(d.T) - exact) <= 1e-9 * exact
    est = second_derivative_norm(d.psi, d.w0, tol=1e-6)
    assert_close(est, exact)
    assert abs(T_at(d.T, *est.vectors) - est.value) <= 1e-10 * exact


@pytest.mark.parametrize("case", ["mlp-tanh-m3", "cnn-softplus-avgpool"])
def test_second_derivative_norm_matches_dense_restarts(case):
    d = dense(case)
    reference = tensor_norm_restarts(d.T)
    est = second_derivative_norm(d.psi, d.w0, tol=1e-6, restarts=4)
    assert_close(est, reference)
    # an upper bound: sup_z ||A(z)||_2 <= sup_z ||A(z)||_F = ||unfolding of T||_2
    assert est.value <= np.linalg.norm(d.T.reshape(d.T.shape[0], -1), 2) * (1 + 1e-12)
    u, v, z = est.vectors
    # the value is T[u, v, z] at unit vectors: a certificate-free lower bound of the norm
    assert all(abs(float(t.norm()) - 1) < 1e-12 for t in (u, v, z))
    assert abs(T_at(d.T, u, v, z) - est.value) <= 1e-10 * reference


def test_second_derivative_norm_of_affine_map_is_zero():
    d = dense("affine")
    est = second_derivative_norm(d.psi, d.w0, restarts=2)
    # per run: one Hessian-vector product (A(z) = 0: the Krylov space is invariant at once) and
    # one T[u, u], which is 0: the run stops
    assert est.value == 0.0 and est.converged and est.iterations == 4
    assert np.abs(d.T).max() == 0.0


# --------------------------------------------------------------------------------------------
# Objective estimators
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["power", "lanczos"])
@pytest.mark.parametrize("case", MAIN)
def test_hessian_top_eig_matches_dense(case, method):
    d = dense(case)
    eigs = torch.linalg.eigvalsh(d.H)
    exact = float(eigs.abs().max())
    est = hessian_top_eig(d.F, d.w0, method=method, iters=2000, tol=1e-6)
    assert_close(est, exact)
    assert est.value <= exact * (1 + 1e-12)
    (v,) = est.vectors
    rayleigh = float(v @ d.H @ v)
    assert abs(abs(rayleigh) - exact) <= 1e-6 * exact


def test_lanczos_needs_fewer_products_than_power():
    d = dense("mlp-tanh-m3")
    power = hessian_top_eig(d.F, d.w0, method="power", iters=2000, tol=1e-8)
    lanczos = hessian_top_eig(d.F, d.w0, method="lanczos", iters=2000, tol=1e-8)
    assert lanczos.converged and power.converged
    assert lanczos.iterations <= min(power.iterations, d.w0.numel())


@pytest.mark.parametrize("case", ["mlp-tanh-m3", "cnn-softplus-avgpool"])
def test_warm_start_from_a_nearby_eigenvector_needs_fewer_products(case):
    d = dense(case)
    eigs, vecs = torch.linalg.eigh(d.H)
    top = int(eigs.abs().argmax())
    exact, u = float(eigs[top].abs()), vecs[:, top]
    cold = hessian_top_eig(d.F, d.w0, iters=2000, tol=1e-6)
    # a start near the top eigenvector (as the previous call's along a run), any scale
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(u.shape, generator=gen, dtype=u.dtype)
    near = 7.0 * (u + 0.05 * noise / noise.norm())
    warm = hessian_top_eig(d.F, d.w0, iters=2000, tol=1e-6, start=near)
    assert cold.converged and warm.converged
    assert_close(warm, exact)
    assert warm.value <= exact * (1 + 1e-12)
    assert warm.iterations < cold.iterations
    # the exact eigenvector: one product, the eigenvalue itself
    exact_start = hessian_top_eig(d.F, d.w0, iters=2000, tol=1e-6, start=u)
    assert exact_start.iterations <= 2 and abs(exact_start.value - exact) <= 1e-9 * exact
    # the seed plays no part once a start is given
    again = hessian_top_eig(d.F, d.w0, iters=2000, tol=1e-6, start=near, seed=5)
    assert again.value == warm.value and again.iterations == warm.iterations


@pytest.mark.parametrize("method", ["power", "lanczos"])
def test_start_vector_is_checked(method):
    d = dense("mlp-tanh-m3")
    with pytest.raises(ValueError, match="start must be a tensor of the weights' shape"):
        hessian_top_eig(d.F, d.w0, method=method, start=torch.ones(3, dtype=d.w0.dtype))
    for bad in (torch.zeros_like(d.w0), torch.full_like(d.w0, float("nan"))):
        with pytest.raises(ValueError, match="finite nonzero"):
            hessian_top_eig(d.F, d.w0, method=method, start=bad)


@pytest.mark.parametrize("case", ["mlp-tanh-m3", "cnn-softplus-avgpool"])
def test_hutchinson_converges_to_trace(case):
    d = dense(case)
    exact = float(torch.trace(d.H))
    # Rademacher probes: Var(z^T H z) = 2 sum_{i != j} H_ij^2
    off = d.H - torch.diag(torch.diag(d.H))
    sd = math.sqrt(2 * float((off**2).sum()))
    for seed, n in [(0, 100), (1, 400)]:
        est = hutchinson_trace(d.F, d.w0, samples=n, seed=seed)
        assert est.iterations == n and est.converged
        assert abs(est.value - exact) <= 4 * est.stderr, (est, exact)
        # the reported standard error estimates the true one
        assert 0.6 <= est.stderr / (sd / math.sqrt(n)) <= 1.5, (est.stderr, sd / math.sqrt(n))


def test_hutchinson_tolerance_stops_early():
    d = dense("mlp-tanh-m3")
    est = hutchinson_trace(d.F, d.w0, samples=2000, seed=2, tol=0.05)
    assert est.converged and 10 <= est.iterations < 2000
    assert est.stderr <= 0.05 * abs(est.value)
    short = hutchinson_trace(d.F, d.w0, samples=3, seed=2, tol=1e-6)
    assert not short.converged and short.iterations == 3


# --------------------------------------------------------------------------------------------
# Truthful convergence flags
# --------------------------------------------------------------------------------------------


def test_one_iteration_budget_reports_not_converged():
    d = dense("mlp-tanh-m3")
    assert not jacobian_norm(d.psi, d.w0, iters=1).converged
    assert not second_derivative_norm(d.psi, d.w0, iters=1, restarts=2).converged
    assert not hessian_top_eig(d.F, d.w0, method="power", iters=1).converged
    assert not hessian_top_eig(d.F, d.w0, method="lanczos", iters=1).converged
    full = jacobian_norm(d.psi, d.w0, iters=1000)
    assert full.converged and full.iterations > 1


def test_converged_flag_means_the_tolerance_was_met():
    """A converged power iteration's value is within ~tol of the exact top value (gap-free bound:
    the eigenvalue error is at most the residual), at two tolerances."""
    d = dense("mlp-sigmoid-softplus-square")
    exact = float(torch.linalg.matrix_norm(d.J, 2))
    for tol in (1e-3, 1e-7):
        est = jacobian_norm(d.psi, d.w0, iters=1000, tol=tol)
        assert est.converged
        assert abs(est.value**2 - exact**2) <= tol * exact**2

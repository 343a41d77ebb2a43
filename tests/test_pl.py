"""PL tools (smoothchain.pl): sigma_min of the stacked per-sample Jacobians against known
singular values and dense SVDs; the PL constants against the PL inequality itself."""

from __future__ import annotations


import pytest
import torch
from torch import nn
from torch.func import grad, jacrev

from smoothchain.estimators import functional_chain
from smoothchain.pl import compose_pl, mse_pl_constant, pl_over_ball, smallest_singular_value

DT = torch.float64


def _orthonormal(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=DT))
    return q


def linear_case(singular=(3.0, 2.0, 0.5), d=6, k=2, seed=0):
    """g_W(x) = W x (no bias) on N = len(singular) inputs X = U diag(s) V^T.  psi(W) = X W^T, whose
    Jacobian is X (x) I_k: J J^T = (X X^T) (x) I_k, so sigma_min(J^T) = min(s) exactly."""
    N = len(singular)
    X = _orthonormal(N, N, seed) @ torch.diag(torch.tensor(singular, dtype=DT)) @ _orthonormal(d, N, seed + 1).T
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d, k, bias=False)).to(DT)
    return model, X


@pytest.mark.parametrize("method", ["dense", "lobpcg", "lanczos"])
def test_recovers_known_singular_value_of_linear_model(method):
    singular = (3.0, 2.0, 1.5, 1.0, 0.8, 0.7, 0.5)  # N k = 14 outputs, p = 9 * 2 = 18 >= 14
    model, X = linear_case(singular, d=9, k=2)
    psi, w = functional_chain(model, X)
    res = smallest_singular_value(psi, w, method=method, tol=1e-12)
    assert res.value == pytest.approx(0.5, rel=1e-8)
    assert res.converged
    assert (res.outputs, res.parameters) == (14, 18)


def test_recovers_mu_exactly_on_linear_model():
    """mu = 2 eps^2 / N for the lecture's MSE: with eps = 0.5 and N = 3, mu = 1/6; for the project's
    square loss eps^2 / N = 1/12 (docs/pl.md)."""
    model, X = linear_case((3.0, 2.0, 0.5))
    psi, w = functional_chain(model, X)
    eps = smallest_singular_value(psi, w).value
    assert mse_pl_constant(eps, 3, "mse").mu == pytest.approx(1 / 6, rel=1e-12)
    assert mse_pl_constant(eps, 3, "mse").gradient_dominance == pytest.approx(1 / 3, rel=1e-12)
    assert mse_pl_constant(eps, 3, "square").mu == pytest.approx(1 / 12, rel=1e-12)


@pytest.mark.parametrize("loss", ["mse", "square"])
def test_pl_inequality_holds_and_is_attained(loss):
    """On linear least squares with interpolation (L* = 0), ||grad L||^2 >= 2 mu L at random
    weights, with equality when the residual is the bottom singular direction -- so mu is the
    exact PL constant, and the lecture's printed 4 eps^2/N (for mse) would be violated."""
    model, X = linear_case((3.0, 2.0, 0.5), d=6, k=1)
    N = 3
    psi, w0 = functional_chain(model, X)
    eps = smallest_singular_value(psi, w0).value
    mu = mse_pl_constant(eps, N, loss).mu
    scale = 1.0 if loss == "mse" else 0.5
    target = torch.randn(N, dtype=DT)

    def L(w, y):
        return scale * (psi(w) - y).pow(2).sum() / N

    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        w = torch.randn(w0.shape, generator=g, dtype=DT)
        assert grad(L)(w, target).pow(2).sum() >= 2 * mu * L(w, target) * (1 - 1e-12)
    # residual along the smallest left singular vector: equality
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    y = psi(w0) - U[:, -1]
    lhs, rhs = grad(L)(w0, y).pow(2).sum(), 2 * mu * L(w0, y)
    assert float(lhs) == pytest.approx(float(rhs), rel=1e-10)
    if loss == "mse":  # the lecture's mu = 4 eps^2/N, read with its 2 mu definition, fails here
        assert lhs < 2 * (4 * eps**2 / N) * L(w0, y)


def test_dense_matches_svd_of_jacobian_on_mlp():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3)).to(DT)
    X = torch.randn(5, 4, dtype=DT)
    psi, w = functional_chain(model, X)
    J = jacrev(psi)(w)
    exact = float(torch.linalg.svdvals(J.T)[-1])  # p x Nk, p >= Nk
    for method in ("dense", "lobpcg", "lanczos"):
        assert smallest_singular_value(psi, w, method=method, tol=1e-12).value == pytest.approx(exact, rel=1e-7)


def test_under_parameterised_gives_zero():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(2, 1, bias=False)).to(DT)  # p = 2 < N = 4
    psi, w = functional_chain(model, torch.randn(4, 2, dtype=DT))
    assert smallest_singular_value(psi, w).value == pytest.approx(0.0, abs=1e-7)


def test_composition_rule():
    assert compose_pl(1.0, 0.5) == 0.25
    assert compose_pl(0.3, 2.0) == pytest.approx(1.2)
    with pytest.raises(ValueError):
        compose_pl(-1.0, 1.0)


def test_neighbourhood_minimum():
    """Linear model: J does not depend on W, so the minimum over the ball is the centre value;
    for an MLP the sampled minimum is at most the centre value and is a value at a sampled point."""
    model, X = linear_case((3.0, 2.0, 0.5))
    psi, w = functional_chain(model, X)
    res = pl_over_ball(psi, w, radius=2.0, points=4)
    assert res.minimum == pytest.approx(0.5, rel=1e-8)
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(3, 12), nn.Tanh(), nn.Linear(12, 2)).to(DT)
    psi, w = functional_chain(mlp, torch.randn(4, 3, dtype=DT))
    res = pl_over_ball(psi, w, radius=0.5, points=5, seed=2)
    assert res.minimum <= res.at_centre.value
    assert res.minimum == min(res.values) and len(res.values) == 6


def test_bad_arguments():
    with pytest.raises(ValueError):
        mse_pl_constant(1.0, 0)
    with pytest.raises(ValueError):
        mse_pl_constant(1.0, 3, "huber")
    model, X = linear_case()
    psi, w = functional_chain(model, X)
    with pytest.raises(ValueError):
        smallest_singular_value(psi, w, method="svd")
    with pytest.raises(ValueError):
        pl_over_ball(psi, w, radius=-1.0)

"""Tests of the unsupervised objectives (RH Sec. 2.2.2, App. B.2; smoothchain.oracles.clustering).

Convex clustering (eq. (25)) is checked against computations that share nothing with the FISTA
dual solver: the closed form for two points, a brute force over all partitions of the points
into clusters (for each partition, the smooth problem in the cluster centres solved by scipy's
BFGS in float64; the minimum over partitions is f), central finite differences of the value,
and Prop. B.1's 1-smoothness.  The auto-encoder loss is checked against the square loss with
y = x, and its oracle steps against the dense references.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from scipy.optimize import minimize  # noqa: E402
from torch import nn  # noqa: E402

from smoothchain.oracles import gauss_newton_step, gradient_step, newton_step  # noqa: E402
from smoothchain.losses import loss_function  # noqa: E402
from smoothchain.oracles.clustering import convex_clustering, convex_clustering_prox  # noqa: E402

from cases import DT, flat, rel_err  # noqa: E402,F401





# ----------------------------------------------------------------------------- references
def _partitions(items):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in _partitions(rest):
        for i in range(len(part)):
            yield part[:i] + [[first] + part[i]] + part[i + 1:]
        yield [[first]] + part


def brute_force_clustering(z: np.ndarray) -> tuple[float, np.ndarray]:
    """min over partitions of min over distinct centres c_k of
    sum_k sum_{i in C_k} 1/2||c_k - z_i||^2 + sum_{k<l} |C_k||C_l| ||c_k - c_l||  (= f(z))."""
    n, d = z.shape
    best, best_y = math.inf, None
    for part in _partitions(list(range(n))):
        k = len(part)
        sizes = [len(c) for c in part]

        def fun(v, part=part, k=k, sizes=sizes):
            c = v.reshape(k, d)
            val, g = 0.0, np.zeros_like(c)
            for a, cl in enumerate(part):
                diff = c[a] - z[cl]
                val += 0.5 * (diff ** 2).sum()
                g[a] += diff.sum(0)
            for a, b in itertools.combinations(range(k), 2):
                e = c[a] - c[b]
                nrm, w = np.linalg.norm(e), sizes[a] * sizes[b]
                val += w * nrm
                if nrm > 0:
                    g[a] += w * e / nrm
                    g[b] -= w * e / nrm
            return val, g.ravel()

        c0 = np.array([z[cl].mean(0) for cl in part])
        res = minimize(fun, c0.ravel(), jac=True, method="BFGS", options=dict(gtol=1e-12, maxiter=500))
        if res.fun < best:
            best, centres = res.fun, res.x.reshape(k, d)
            best_y = np.zeros_like(z)
            for a, cl in enumerate(part):
                best_y[cl] = centres[a]
    return best, best_y


def clustered_points(n, d, k, spread, noise, seed):
    rng = np.random.default_rng(seed)
    centres = spread * rng.standard_normal((k, d))
    return centres[np.arange(n) % k] + noise * rng.standard_normal((n, d))


# ----------------------------------------------------------------------------- convex clustering
@pytest.mark.parametrize("a, b", [((0.0, 0.0), (3.0, 4.0)), ((0.0, 0.0), (0.3, 0.4)),
                                  ((1.0, -1.0), (1.0, 1.0))])
def test_two_points_closed_form(a, b):
    """n = 2: prox shrinks y1 - y2 by 2 (fuses if ||a - b|| <= 2); f = ||a-b|| - 1 or ||a-b||^2/4."""
    z = torch.tensor([a, b], dtype=DT)
    dist = float((z[0] - z[1]).norm())
    res = convex_clustering_prox(z)
    if dist <= 2:
        value, prox = dist ** 2 / 4, z.mean(0).expand(2, 2)
    else:
        e = (z[0] - z[1]) / dist
        value, prox = dist - 1, torch.stack([z[0] - e, z[1] + e])
    assert abs(float(res.value) - value) <= 1e-12 * (1 + value)
    torch.testing.assert_close(res.prox, prox, rtol=0, atol=1e-10)
    torch.testing.assert_close(res.grad, z - prox, rtol=0, atol=1e-10)


@pytest.mark.parametrize("n, d, k, spread, noise, seed", [
    (4, 2, 2, 4.0, 2.0, 0),
    (4, 3, 2, 4.0, 2.0, 2),
    (5, 2, 3, 6.0, 2.0, 0),
])
def test_convex_clustering_against_brute_force(n, d, k, spread, noise, seed):
    z = clustered_points(n, d, k, spread, noise, seed)
    value, y = brute_force_clustering(z)
    res = convex_clustering_prox(torch.tensor(z, dtype=DT))
    assert res.gap <= 1e-12 * (1 + (z ** 2).sum())
    assert abs(float(res.value) - value) <= 1e-9 * (1 + abs(value))
    assert float(res.value) <= value + 1e-9           # d(u) is a lower bound on f
    np.testing.assert_allclose(res.prox.numpy(), y, rtol=0, atol=1e-6)
    np.testing.assert_allclose(res.grad.numpy(), z - y, rtol=0, atol=1e-6)


def test_brute_force_cases_fuse_some_points_but_not_all():
    """The brute-force cases above exercise fusion: 1 < number of clusters < n for one of them."""
    counts = []
    for n, d, k, spread, noise, seed in [(4, 2, 2, 4.0, 2.0, 0), (4, 3, 2, 4.0, 2.0, 2),
                                         (5, 2, 3, 6.0, 2.0, 0)]:
        res = convex_clustering_prox(torch.tensor(clustered_points(n, d, k, spread, noise, seed), dtype=DT))
        close = torch.cdist(res.prox, res.prox) < 1e-6
        counts.append((n, len({tuple(row.tolist()) for row in close})))
    assert any(1 < c < n for n, c in counts), counts


def test_gradient_is_finite_difference_of_value():
    z = torch.tensor(clustered_points(8, 3, 3, 8.0, 3.0, 1), dtype=DT)
    grad = convex_clustering_prox(z).grad
    gen = torch.Generator().manual_seed(0)
    h = 1e-5
    for _ in range(3):
        u = torch.randn(z.shape, generator=gen, dtype=DT)
        fd = (float(convex_clustering_prox(z + h * u).value)
              - float(convex_clustering_prox(z - h * u).value)) / (2 * h)
        assert abs(fd - float((grad * u).sum())) <= 1e-5 * (1 + abs(fd))


def test_one_smooth_prop_b1():
    """RH Prop. B.1: grad f is 1-Lipschitz (a Moreau envelope)."""
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        a = 6.0 * torch.randn(6, 2, generator=gen, dtype=DT)
        b = a + 2.0 * torch.randn(6, 2, generator=gen, dtype=DT)
        ga, gb = convex_clustering_prox(a).grad, convex_clustering_prox(b).grad
        assert float((ga - gb).norm()) <= float((a - b).norm()) * (1 + 1e-9)


def test_structured_outputs_and_degenerate_batches():
    z = torch.tensor(clustered_points(5, 4, 2, 5.0, 1.0, 3), dtype=DT)
    res4 = convex_clustering_prox(z.reshape(5, 2, 2))
    res2 = convex_clustering_prox(z)
    assert res4.grad.shape == (5, 2, 2)
    torch.testing.assert_close(res4.grad.reshape(5, 4), res2.grad)
    one = convex_clustering_prox(torch.ones(1, 3, dtype=DT))
    assert float(one.value) == 0.0 and float(one.grad.abs().max()) == 0.0
    with pytest.raises(ValueError, match="tol"):
        convex_clustering_prox(z, tol=0.0)
    with pytest.warns(RuntimeWarning, match="inexact"):
        convex_clustering_prox(torch.tensor(clustered_points(9, 2, 3, 10.0, 2.0, 0)), max_iter=2)


def test_autograd_and_torch_func_gradients():
    z = torch.tensor(clustered_points(6, 2, 2, 6.0, 2.0, 4), dtype=DT)
    ref = convex_clustering_prox(z).grad
    torch.testing.assert_close(torch.func.grad(convex_clustering)(z), ref, rtol=0, atol=0)
    zz = z.clone().requires_grad_()
    (3.0 * convex_clustering(zz)).backward()
    torch.testing.assert_close(zz.grad, 3.0 * ref, rtol=0, atol=0)
    zz = z.clone().requires_grad_()
    (g,) = torch.autograd.grad(convex_clustering(zz), zz, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()


def test_convex_clustering_gradient_step():
    """Gradient step (12) on f o psi: DP (Prop. C.2) = dense = -gamma (autograd gradient + l2 w)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    with torch.no_grad():
        model[2].weight.mul_(8.0)
    x = torch.randn(6, 3, dtype=DT)
    gamma, l2 = 0.3, 0.01
    dp = gradient_step(model, x, None, loss="convex-clustering", l2=l2, gamma=gamma)
    dense = gradient_step(model, x, None, loss="convex-clustering", l2=l2, gamma=gamma, method="dense")
    model.zero_grad()
    (convex_clustering(model(x)) + 0.5 * l2 * sum((p ** 2).sum() for p in model.parameters())).backward()
    auto = [-gamma * p.grad for p in model.parameters()]
    assert rel_err(dp.direction, auto) <= 1e-10
    assert rel_err(dense.direction, auto) <= 1e-8
    assert dp.oracle_calls == 1
    for step in (gauss_newton_step, newton_step):
        with pytest.raises(ValueError, match="no Hessian"):
            step(model, x, None, loss="convex-clustering", gamma=1.0)


# ----------------------------------------------------------------------------- auto-encoder
def _autoencoder():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 3), nn.Tanh(), nn.Linear(3, 6), nn.Sigmoid(),
                          nn.Unflatten(1, (2, 3))).to(DT)
    return model, torch.rand(4, 2, 3, dtype=DT)


def test_autoencoder_is_square_loss_on_inputs():
    model, x = _autoencoder()
    z = model(x)
    ref = 0.5 * ((z - x) ** 2).sum() / 4
    f = loss_function("autoencoder", None, x)
    torch.testing.assert_close(f(z), ref)
    torch.testing.assert_close(f(z.reshape(4, 6)), ref)
    with pytest.raises(ValueError, match="as many entries"):
        f(z[:, :1])
    with pytest.raises(ValueError, match="inputs"):
        loss_function("autoencoder", None)


@pytest.mark.parametrize("l2", [0.0, 0.05])
def test_autoencoder_steps_match_dense(l2):
    model, x = _autoencoder()
    sq = gauss_newton_step(model, x, x, loss="square", l2=l2, gamma=0.7, method="dense")
    for method in ("dual", "dp", "dense"):
        res = gauss_newton_step(model, x, None, loss="autoencoder", l2=l2, gamma=0.7, method=method)
        assert rel_err(res.direction, sq.direction) <= 1e-8, method
    dense = newton_step(model, x, None, loss="autoencoder", l2=l2, gamma=0.2, method="dense")
    dp = newton_step(model, x, None, loss="autoencoder", l2=l2, gamma=0.2)
    assert dp.gamma == dense.gamma
    assert rel_err(dp.direction, dense.direction) <= 1e-8
    g = gradient_step(model, x, torch.zeros(1), loss="autoencoder", l2=l2, gamma=0.5)
    g_sq = gradient_step(model, x, x, loss="square", l2=l2, gamma=0.5)
    assert rel_err(g.direction, g_sq.direction) <= 1e-12

"""Rate calculators (smoothchain.rates): the hand-worked examples of docs/rates.md, closed forms,
and the gradient-noise estimator against the exact per-example formula."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from smoothchain import certify
from smoothchain.rates import (
    gd_iterations,
    gradient_noise,
    gradient_noise_exact,
    pl_bound,
    pl_iterations,
    sgd_best_step,
    sgd_bound,
    sgd_iterations,
)



# ---------------------------------------------------------------- docs/rates.md, worked examples


def test_doc_example_sgd_bound():
    # Delta = 2, beta = 4, eta = 1/4, T = 100, sigma^2 = 1: 2*2/(25) + 4*(1/4)*1 = 0.16 + 1 = 1.16
    assert sgd_bound(2, 0.25, 100, 4, 1) == pytest.approx(1.16, rel=1e-15)
    # no noise: the 1/T term alone
    assert sgd_bound(2, 0.25, 100, 4, 0) == pytest.approx(0.16, rel=1e-15)


def test_doc_example_sgd_best_step_and_iterations():
    # sqrt(2*2/(100*4*1)) = 0.1 <= 1/4; bound 4/(0.1*100) + 0.4 = 0.8
    assert sgd_best_step(2, 100, 4, 1) == pytest.approx(0.1, rel=1e-15)
    assert sgd_bound(2, 0.1, 100, 4, 1) == pytest.approx(0.8, rel=1e-15)
    # eta = 1/8: floor 4*(1/8)*1 = 1/2; target 1 -> T = ceil(4 / ((1/8)(1/2))) = 64, and 64 reaches it exactly
    assert sgd_iterations(2, 0.125, 4, 1, 1.0) == 64
    assert sgd_bound(2, 0.125, 64, 4, 1) == 1.0
    assert sgd_bound(2, 0.125, 63, 4, 1) > 1.0
    # floor above the target: never
    assert sgd_iterations(2, 0.125, 4, 1, 0.5) == math.inf


def test_doc_example_pl():
    # Delta 1, beta 2, mu 1/2, eta 1/2, T 3, sigma^2 0.4: (3/4)^3 + 2*(1/2)*0.4/(2*(1/2)) = 0.421875 + 0.4
    assert pl_bound(1, 0.5, 3, 2, 0.5, 0.4) == pytest.approx(0.821875, rel=1e-15)
    # target 0.5: need (3/4)^T <= 0.1: 0.75^8 = 0.1001 > 0.1, 0.75^9 = 0.0751 -> T = 9
    assert pl_iterations(1, 0.5, 2, 0.5, 0.4, 0.5) == 9
    assert pl_iterations(1, 0.5, 2, 0.5, 0.4, 0.4) == math.inf
    assert pl_iterations(1, 0.5, 2, 0.5, 0.4, 0.3) == math.inf  # below the floor 0.4


def test_doc_example_gd_matches_the_certificate_constant():
    # L_F = 3, Delta = 2, epsilon = 1/2: ceil(2*3*2/(1/4)) = 48
    assert gd_iterations(3, 2, 0.5) == 48
    cert = certify("mlp", batch_size=4, radius=0.5, epsilon=0.1)
    o = cert.objective
    assert gd_iterations(o.smoothness, o.gap, o.epsilon) == o.iterations


# ---------------------------------------------------------------- closed forms and edge cases


@pytest.mark.parametrize("T", [1, 7, 1000])
def test_best_step_minimises_the_bound(T):
    delta, beta, s2 = 3.0, 2.0, 0.7
    eta = sgd_best_step(delta, T, beta, s2)
    grid = [eta * f for f in (0.5, 0.9, 0.99, 1.01, 1.1, 2.0) if eta * f <= 1 / beta]
    for e in grid:
        assert sgd_bound(delta, eta, T, beta, s2) <= sgd_bound(delta, e, T, beta, s2) + 1e-15


def test_pl_bound_decreases_to_the_noise_floor():
    vals = [pl_bound(5, 0.1, t, 4, 1, 2) for t in range(0, 200, 20)]
    assert all(a > b for a, b in zip(vals, vals[1:]))
    assert vals[-1] == pytest.approx(4 * 0.1 * 2 / 2, rel=1e-6)
    assert pl_bound(5, 0.1, 0, 4, 1, 0) == 5


def test_pl_iterations_is_the_smallest():
    # noise floor 3 * 0.2 * 0.01 / (2 * 0.7) = 0.004286: below it, never
    assert pl_iterations(2, 0.2, 3, 0.7, 0.01, 4e-3) == math.inf
    for target in (5e-3, 0.05, 0.9, 2.5):
        t = pl_iterations(2, 0.2, 3, 0.7, 0.01, target)
        assert pl_bound(2, 0.2, int(t), 3, 0.7, 0.01) <= target
        if t > 0:
            assert pl_bound(2, 0.2, int(t) - 1, 3, 0.7, 0.01) > target


def test_bad_arguments():
    with pytest.raises(ValueError, match="eta <= 1/beta"):
        sgd_bound(1, 0.5, 10, 4, 0)
    with pytest.raises(ValueError, match="mu > beta"):
        pl_bound(1, 0.1, 10, 1, 2)
    with pytest.raises(ValueError):
        sgd_bound(-1, 0.1, 10, 1)
    with pytest.raises(ValueError):
        sgd_bound(1, 0.1, 0, 1)
    assert gd_iterations(math.inf, 1, 1) == math.inf


# ---------------------------------------------------------------- gradient noise


def _scalar_linear(w: float):
    model = nn.Sequential(nn.Linear(1, 1, bias=False)).double()
    with torch.no_grad():
        model[0].weight.fill_(w)
    return model


def test_doc_example_gradient_noise_exact():
    """docs/rates.md: g(x) = w x at w = 0, x = (1, 3), y = (1, 1), f_i = (w x_i - y_i)^2 / 2:
    g_i = -y_i x_i = (-1, -3), mean -2, s^2 = 1."""
    model = _scalar_linear(0.0)
    x = torch.tensor([[1.0], [3.0]], dtype=torch.float64)
    y = torch.tensor([[1.0], [1.0]], dtype=torch.float64)
    assert gradient_noise_exact(model, x, y, batch_size=1).sigma2 == pytest.approx(1.0, rel=1e-15)
    assert gradient_noise_exact(model, x, y, batch_size=2).sigma2 == pytest.approx(0.5, rel=1e-15)
    assert gradient_noise_exact(model, x, y, batch_size=1, replacement=False).sigma2 == pytest.approx(1.0, rel=1e-15)
    assert gradient_noise_exact(model, x, y, batch_size=2, replacement=False).sigma2 == 0.0
    assert gradient_noise_exact(model, x, y).gradient_norm2 == pytest.approx(4.0, rel=1e-15)


@pytest.mark.parametrize("replacement", [True, False])
def test_monte_carlo_noise_converges_to_exact(replacement):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(12, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (12,))
    exact = gradient_noise_exact(model, x, y, loss="cross-entropy", batch_size=4, replacement=replacement).sigma2
    est = gradient_noise(model, x, y, loss="cross-entropy", batch_size=4, samples=400, replacement=replacement, seed=1)
    assert abs(est.sigma2 - exact) <= 4 * est.stderr, (est, exact)
    assert est.stderr < 0.2 * exact

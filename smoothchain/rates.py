"""Rate calculators: non-convex SGD, SGD under PL, RH Thm 4.1, and gradient-noise estimation.

Sources: Scaman's lecture (slides "Convergence of SGD... to a stationary point" and "Theorem
(convergence of SGD under mu-PL)") and RH Thm 4.1 (made concrete as in
:mod:`smoothchain.objective`).  Hand-worked examples are in docs/rates.md (and in the tests).

Conventions: beta is the smoothness constant of the objective (L_F of RH Prop. 4.2), eta the
step size (eta <= 1/beta is required by every bound here), Delta = L(theta_0) - L(theta*) >= 0,
sigma^2 a bound on E ||g~ - grad L||^2 (the lecture's var(g~) <= sigma^2: the expected squared
Euclidean distance of the stochastic gradient to the true one), mu the PL constant with
||grad L||^2 >= 2 mu (L - L*) (lecture's definition).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = [
    "sgd_bound",
    "sgd_best_step",
    "sgd_iterations",
    "pl_bound",
    "pl_iterations",
    "gd_iterations",
    "GradientNoise",
    "gradient_noise",
    "gradient_noise_exact",
]


def _nonneg(name: str, x: float) -> float:
    if not (isinstance(x, (int, float)) and x >= 0 and not math.isnan(x)):
        raise ValueError(f"{name} must be a number >= 0, got {x!r}")
    return float(x)


def _pos(name: str, x: float) -> float:
    if not (isinstance(x, (int, float)) and x > 0 and not math.isnan(x)):
        raise ValueError(f"{name} must be a number > 0, got {x!r}")
    return float(x)


def _step(eta: float, beta: float) -> tuple[float, float]:
    eta, beta = _pos("eta", eta), _pos("beta", beta)
    if eta * beta > 1.0 + 1e-12:
        raise ValueError(f"the bounds need eta <= 1/beta = {1.0 / beta!r}, got eta = {eta!r}")
    return eta, beta


def sgd_bound(delta: float, eta: float, iterations: int, beta: float, sigma2: float = 0.0) -> float:
    """E[min_{t <= T} ||grad L(theta_t)||^2] <= 2 Delta / (eta T) + beta eta sigma^2 (lecture,
    "Theorem (convergence of non-convex SGD)"), for eta <= 1/beta and T >= 1 iterations."""
    eta, beta = _step(eta, beta)
    delta, sigma2 = _nonneg("delta", delta), _nonneg("sigma2", sigma2)
    if int(iterations) != iterations or iterations < 1:
        raise ValueError(f"iterations must be a positive integer, got {iterations!r}")
    return 2.0 * delta / (eta * iterations) + beta * eta * sigma2


def sgd_best_step(delta: float, iterations: int, beta: float, sigma2: float = 0.0) -> float:
    """The eta <= 1/beta minimising :func:`sgd_bound`: min(1/beta, sqrt(2 Delta / (T beta sigma^2)))
    (the unconstrained minimiser of 2 Delta/(eta T) + beta eta sigma^2 is sqrt(2 Delta/(T beta sigma^2)))."""
    beta, delta, sigma2 = _pos("beta", beta), _nonneg("delta", delta), _nonneg("sigma2", sigma2)
    if int(iterations) != iterations or iterations < 1:
        raise ValueError(f"iterations must be a positive integer, got {iterations!r}")
    if sigma2 == 0.0:
        return 1.0 / beta
    return min(1.0 / beta, math.sqrt(2.0 * delta / (iterations * beta * sigma2)))


def sgd_iterations(delta: float, eta: float, beta: float, sigma2: float, target: float) -> float:
    """Smallest T with 2 Delta/(eta T) + beta eta sigma^2 <= ``target`` (a bound on
    E min ||grad||^2): ceil(2 Delta / (eta (target - beta eta sigma^2))), or inf when the noise
    floor beta eta sigma^2 >= target."""
    eta, beta = _step(eta, beta)
    delta, sigma2, target = _nonneg("delta", delta), _nonneg("sigma2", sigma2), _pos("target", target)
    room = target - beta * eta * sigma2
    if room <= 0:
        return math.inf
    return float(max(1, math.ceil(2.0 * delta / (eta * room))))


def pl_bound(delta: float, eta: float, iterations: int, beta: float, mu: float, sigma2: float = 0.0) -> float:
    """E[L(theta_T) - L*] <= Delta (1 - mu eta)^T + beta eta sigma^2 / (2 mu) (lecture, "Theorem
    (convergence of SGD under mu-PL)"), eta <= 1/beta.  mu <= beta always holds for a beta-smooth
    mu-PL function (so 1 - mu eta >= 0); a larger mu is rejected."""
    eta, beta = _step(eta, beta)
    mu, delta, sigma2 = _pos("mu", mu), _nonneg("delta", delta), _nonneg("sigma2", sigma2)
    if mu > beta * (1 + 1e-12):
        raise ValueError(f"a beta-smooth function cannot be mu-PL with mu > beta (mu = {mu!r}, beta = {beta!r})")
    if int(iterations) != iterations or iterations < 0:
        raise ValueError(f"iterations must be an integer >= 0, got {iterations!r}")
    return delta * (1.0 - mu * eta) ** iterations + beta * eta * sigma2 / (2.0 * mu)


def pl_iterations(delta: float, eta: float, beta: float, mu: float, sigma2: float, target: float) -> float:
    """Smallest T >= 0 with :func:`pl_bound` <= ``target``: with floor = beta eta sigma^2/(2 mu),
    T = ceil(log((target - floor)/Delta) / log(1 - mu eta)); inf when floor >= target."""
    eta, beta = _step(eta, beta)
    target = _pos("target", target)
    floor = pl_bound(0.0, eta, 0, beta, mu, sigma2)
    room = target - floor
    if room <= 0:
        return math.inf
    if delta <= room:
        return 0.0
    rate = 1.0 - mu * eta
    if rate <= 0.0:  # mu eta = 1: one step removes Delta
        return 1.0
    t = math.ceil(math.log(room / delta) / math.log(rate))
    while t > 0 and delta * rate ** (t - 1) + floor <= target:  # guard the rounding of log
        t -= 1
    while delta * rate**t + floor > target:
        t += 1
    return float(t)


def gd_iterations(smoothness: float, delta: float, epsilon: float) -> float:
    """RH Thm 4.1 (i) made concrete: projected gradient descent with step 1/L_F reaches
    min_k ||G_k|| <= epsilon within ceil(2 L_F Delta / epsilon^2) iterations (descent lemma
    F(w_{k+1}) <= F(w_k) - ||G_k||^2/(2 L_F), summed) -- the constant of
    :func:`smoothchain.objective.objective_bounds`."""
    smoothness, delta, epsilon = _nonneg("smoothness", smoothness), _nonneg("delta", delta), _pos("epsilon", epsilon)
    if math.isinf(smoothness):
        return math.inf if delta > 0 else 0.0
    return float(math.ceil(2.0 * smoothness * delta / (epsilon * epsilon)))


# --------------------------------------------------------------------------------------------
# Gradient noise
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GradientNoise:
    """sigma^2 = E ||g_B - grad F||^2 for mini-batches B of ``batch_size`` examples.

    ``sigma2``: the estimate (sample mean over ``samples`` mini-batches, or exact);
    ``stderr``: its standard error (0 when exact); ``gradient_norm2``: ||grad F||^2 on the data.
    """

    sigma2: float
    stderr: float
    samples: int
    batch_size: int
    examples: int
    replacement: bool
    gradient_norm2: float


def _full_gradient(model, x, y, loss):
    from torch.func import grad

    from .estimators import flat_parameters, objective

    w = flat_parameters(model)
    return w, grad(objective(model, x, y, loss=loss))(w)


def gradient_noise(model, x, y, *, loss: str = "square", batch_size: int = 1, samples: int = 100,
                   replacement: bool = True, seed: int = 0) -> GradientNoise:
    """Monte-Carlo sigma^2 (the lecture's var(g~), slide "Assumptions"): the mean over ``samples``
    random mini-batches B (``batch_size`` examples, i.i.d. uniform with ``replacement``, else
    without) of ||grad F_B(w) - grad F(w)||^2, with F_B the objective on B and F on all of
    (x, y) (:func:`smoothchain.estimators.objective`; the same mean-over-the-batch loss).
    Unbiased for E ||g_B - grad F||^2 when F is a mean of per-example losses (no batch norm in
    training mode)."""
    import torch
    from torch.func import grad

    from .estimators import objective

    n = x.shape[0]
    if int(batch_size) != batch_size or not 1 <= batch_size <= (math.inf if replacement else n):
        raise ValueError(f"batch_size must be an integer in [1, {n}] (or any >= 1 with replacement), got {batch_size!r}")
    if int(samples) != samples or samples < 2:
        raise ValueError(f"samples must be an integer >= 2, got {samples!r}")
    w, g_full = _full_gradient(model, x, y, loss)
    gen = torch.Generator().manual_seed(int(seed))
    vals = []
    for _ in range(int(samples)):
        idx = (torch.randint(0, n, (int(batch_size),), generator=gen) if replacement
               else torch.randperm(n, generator=gen)[: int(batch_size)])
        g = grad(objective(model, x[idx], y[idx], loss=loss))(w)
        vals.append(float((g - g_full).pow(2).sum()))
    mean = sum(vals) / len(vals)
    var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
    return GradientNoise(mean, math.sqrt(var / len(vals)), int(samples), int(batch_size), n, bool(replacement),
                         float(g_full.pow(2).sum()))


def gradient_noise_exact(model, x, y, *, loss: str = "square", batch_size: int = 1,
                         replacement: bool = True) -> GradientNoise:
    """Exact E ||g_B - grad F||^2 from the per-example gradients g_i (F = mean of f_i):
    with s^2 = (1/n) sum_i ||g_i - grad F||^2, it is s^2 / b with replacement and
    s^2 (n - b) / (b (n - 1)) without (sampling a finite population)."""
    import torch
    from torch.func import grad

    from .estimators import objective

    n = x.shape[0]
    b = int(batch_size)
    if b != batch_size or b < 1 or (not replacement and b > n):
        raise ValueError(f"batch_size must be an integer in [1, {n}], got {batch_size!r}")
    w, g_full = _full_gradient(model, x, y, loss)
    gs = torch.stack([grad(objective(model, x[i : i + 1], y[i : i + 1], loss=loss))(w) for i in range(n)])
    s2 = float((gs - g_full).pow(2).sum(dim=1).mean())
    sigma2 = s2 / b if replacement else (0.0 if n == 1 else s2 * (n - b) / (b * (n - 1)))
    return GradientNoise(sigma2, 0.0, 0, b, n, bool(replacement), float(g_full.pow(2).sum()))

"""Step sizes and stopping-time bounds: F Thm 3.9, Cor. 3.10, Cor. 3.11, Thm 4.8, Lemma 4.10,
Thm 4.12.

Notation: L the constant of F Assumption 3.5 (L = 1 for DSGD on networks, F Lemma 4.7), c the
2-uniform convexity parameter of the Finsler structure (F Def. 3.7; c = 0 always valid,
c = 1 for inner-product norms), sigma2 the variance bound of F Assumption 3.6, gamma the
stationarity target of the stopping time tau = inf{t : ||df/dw(w(t))||_{w(t)}^2 <= gamma}
(F eq. 5) and G = f(w(1)) - f*.
"""

from __future__ import annotations

import math
from typing import Sequence

from .norms import check_q

__all__ = [
    "max_step_size",
    "stopping_time_bound",
    "corollary_310_step_size",
    "corollary_310_bound",
    "corollary_310_bound_paper",
    "corollary_311_iterations",
    "corollary_311_stationarity",
    "batch_step_size",
    "batch_iterations",
    "stochastic_step_size",
    "stochastic_stopping_time_bound",
    "stochastic_stopping_time_bound_paper",
    "variance_bound_paper",
    "variance_bound",
]


def _pos(name: str, value, allow_zero: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    ok = (v >= 0 if allow_zero else v > 0) and math.isfinite(v)
    if not ok:
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} must be {kind} and finite, got {value!r}")
    return v


def _convexity(c) -> float:
    c = _pos("c (convexity parameter)", c, allow_zero=True)
    if c > 1:
        raise ValueError(f"c (convexity parameter, F Def. 3.7) must lie in [0, 1], got {c!r}")
    return c


def max_step_size(L: float, c: float, sigma2: float, gamma: float) -> float:
    """Upper limit of F condition (9): eps < ((1+c) gamma - (1-c) sigma2) / (L ((2-c) gamma +
    (2-c^2) sigma2)); requires gamma > (1-c)/(1+c) sigma2."""
    L, c = _pos("L", L), _convexity(c)
    s2, g = _pos("sigma2", sigma2, allow_zero=True), _pos("gamma", gamma)
    num = (1 + c) * g - (1 - c) * s2
    if num <= 0:
        raise ValueError(f"F Thm 3.9 needs gamma > (1-c)/(1+c) sigma2 = {(1 - c) / (1 + c) * s2!r}, "
                         f"got gamma = {gamma!r}")
    return num / (L * ((2 - c) * g + (2 - c * c) * s2))


def stopping_time_bound(G: float, L: float, c: float, sigma2: float, gamma: float,
                        eps: float) -> float:
    """F Thm 3.9: E[tau] <= (2G + eps A gamma) / (eps A gamma - eps B sigma2), with
    A = 1 + c - L eps (2 - c), B = L eps (2 - c^2) + 1 - c.  Raises if (9) fails.

    This is the last line of F's proof; the statement (10) prints the numerator as 2G + A gamma
    (no eps), which is wrong for eps > 1 (e.g. sigma2 = G = 0, c = 1, eps = 1/L with L < 1 gives
    L < 1 <= tau)."""
    G = _pos("G", G, allow_zero=True)
    eps = _pos("eps", eps)
    limit = max_step_size(L, c, sigma2, gamma)
    if not eps < limit:
        raise ValueError(f"F Thm 3.9 needs eps < {limit!r} (condition 9), got eps = {eps!r}")
    L, c, s2, g = float(L), float(c), float(sigma2), float(gamma)
    A = 1 + c - L * eps * (2 - c)
    B = L * eps * (2 - c * c) + 1 - c
    return (2 * G + eps * A * g) / (eps * A * g - eps * B * s2)


def corollary_310_step_size(L: float, c: float, sigma2: float, gamma: float) -> float:
    """F Cor. 3.10 (2): eps = ((1+c) gamma - (1-c) sigma2) / (2L ((2-c) gamma + (2-c^2) sigma2))
    (half the limit of (9)); case 1 (Euclidean SGD) is c = 1: eps = gamma / (L (gamma + sigma2))."""
    return 0.5 * max_step_size(L, c, sigma2, gamma)


def corollary_310_bound(G: float, L: float, c: float, sigma2: float, gamma: float) -> float:
    """E[tau] at the step of F Cor. 3.10, in closed form, *corrected*:

    with N = (1+c) gamma - (1-c) sigma2 and P = (2-c) gamma + (2-c^2) sigma2, eps = N / (2LP)
    makes the denominator of Thm 3.9 equal to eps N / 2, so
    E[tau] <= 4G / (eps N) + 2 A gamma / N <= 8 L G P / N^2 + 2 (1+c) gamma / N.

    F's printed bound (:func:`corollary_310_bound_paper`) has (1+c) gamma + (1-c) sigma2 in
    place of N (a sign slip in F eq. 43) and starts from the eps-free numerator of (10); when
    c < 1 and sigma2 > 0 it can fall below the Thm 3.9 value (G = 100, L = 1, c = 0,
    sigma2 = 1, gamma = 2: printed 732, Thm 3.9 4803).  For c = 1 (case 1) the printed bound
    holds whenever L >= 1/4.
    """
    max_step_size(L, c, sigma2, gamma)  # validates, incl. gamma > (1-c)/(1+c) sigma2
    G = _pos("G", G, allow_zero=True)
    L, c, s2, g = float(L), float(c), float(sigma2), float(gamma)
    N = (1 + c) * g - (1 - c) * s2
    P = (2 - c) * g + (2 - c * c) * s2
    return 8 * L * G * P / N**2 + 2 * (1 + c) * g / N


def corollary_310_bound_paper(G: float, L: float, c: float, sigma2: float, gamma: float) -> float:
    """F Cor. 3.10 (2) as printed: 8LG(2-c^2) sigma2 / ((1+c) gamma + (1-c) sigma2)^2
    + 8L(2-c^2)(G + sigma2) / ((1+c) gamma + (1-c) sigma2) + 8L(2-c).

    Not implied by Thm 3.9 when c < 1 and sigma2 > 0 (see :func:`corollary_310_bound`); kept
    for comparison with the paper."""
    max_step_size(L, c, sigma2, gamma)
    G = _pos("G", G, allow_zero=True)
    L, c, s2, g = float(L), float(c), float(sigma2), float(gamma)
    den = (1 + c) * g + (1 - c) * s2
    return (8 * L * G * (2 - c * c) * s2 / den**2 + 8 * L * (2 - c * c) * (G + s2) / den
            + 8 * L * (2 - c))


def corollary_311_iterations(G: float, L: float, gamma: float) -> int:
    """F Cor. 3.11 (exact gradients, eps = 1/L): tau <= ceil(2 G L / gamma)."""
    G, L, g = _pos("G", G, allow_zero=True), _pos("L", L), _pos("gamma", gamma)
    return max(1, math.ceil(2.0 * G * L / g))


def corollary_311_stationarity(G: float, L: float, T: int) -> float:
    """F Cor. 3.11: min_{t <= T} ||df/dw(w(t))||_{w(t)}^2 <= 2 G L / T."""
    G, L = _pos("G", G, allow_zero=True), _pos("L", L)
    if not (isinstance(T, int) and T >= 1):
        raise ValueError(f"T must be a positive integer, got {T!r}")
    return 2.0 * G * L / T


def batch_step_size() -> float:
    """F Thm 4.8: batch DSGD on networks uses eps = 1 (L = 1 by F Lemma 4.7)."""
    return 1.0


def batch_iterations(f0: float, delta: float) -> int:
    """F Thm 4.8: min_{t <= T} ||df/dw(w(t))||_{w(t)}^2 <= delta once T >= 2 f(w(1)) / delta
    (f* = 0 for the squared error)."""
    return corollary_311_iterations(f0, 1.0, delta)


def stochastic_step_size(gamma: float, sigma2: float) -> float:
    """F Thm 4.12: eps = (gamma - sigma2) / (4 (gamma + sigma2)), requires gamma > sigma2
    (Cor. 3.10 with L = 1, c = 0)."""
    g, s2 = _pos("gamma", gamma), _pos("sigma2", sigma2, allow_zero=True)
    if not g > s2:
        raise ValueError(f"F Thm 4.12 needs gamma > sigma2 = {s2!r}, got gamma = {gamma!r}")
    return 0.25 * (g - s2) / (g + s2)


def stochastic_stopping_time_bound(G: float, gamma: float, sigma2: float) -> float:
    """E[tau] for F Thm 4.12's step (L = 1, c = 0), corrected as in :func:`corollary_310_bound`:
    16 G (gamma + sigma2) / (gamma - sigma2)^2 + 2 gamma / (gamma - sigma2).
    F prints 16 G sigma2 / (gamma + sigma2)^2 + 16 (G + sigma2) / (gamma + sigma2) + 16
    (:func:`stochastic_stopping_time_bound_paper`), which Thm 3.9 does not imply."""
    stochastic_step_size(gamma, sigma2)
    return corollary_310_bound(G, 1.0, 0.0, sigma2, gamma)


def stochastic_stopping_time_bound_paper(G: float, gamma: float, sigma2: float) -> float:
    """F Thm 4.12 as printed: 16 G sigma2 / (gamma + sigma2)^2 + 16 (G + sigma2) / (gamma +
    sigma2) + 16 (see :func:`stochastic_stopping_time_bound`)."""
    stochastic_step_size(gamma, sigma2)
    G = _pos("G", G, allow_zero=True)
    g, s2 = float(gamma), float(sigma2)
    return 16 * G * s2 / (g + s2) ** 2 + 16 * (G + s2) / (g + s2) + 16


def _batch_size(b) -> int:
    if isinstance(b, bool) or not isinstance(b, int) or b < 1:
        raise ValueError(f"batch_size must be a positive integer, got {b!r}")
    return b


def variance_bound_paper(K: int, n: int, q, batch_size: int, data_bound: float = 1.0) -> float:
    """F Lemma 4.10: sigma2 = 32 K n^{max(1 + 2/q, 4 - 4/q)} / b for K layers of width n.

    With ``data_bound`` D != 1 the constant 32 = 4 d_{q,1}^2 / d_{q,2} / n^{...} scales with
    d_{q,1}^2, i.e. by ((1 + D) / 2)^2.  For mixed widths it stays valid with n the largest
    dimension of any layer matrix (zero padding changes none of the norms involved)."""
    q = check_q(q)
    if isinstance(K, bool) or not isinstance(K, int) or K < 1:
        raise ValueError(f"K must be a positive integer, got {K!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    b = _batch_size(batch_size)
    D = _pos("data_bound", data_bound)
    inv_q = 0.0 if q == math.inf else 1.0 / q
    expo = max(1.0 + 2.0 * inv_q, 4.0 - 4.0 * inv_q)
    return 32.0 * K * n**expo / b * ((1.0 + D) / 2.0) ** 2


def _shape_factor(rows: int, cols: int, q: float) -> float:
    """kappa^2 = sup ||l||_*^2/||l||_F^2 * sup ||l||_F^2/||l||_*^2 for r x c matrices:
    min(r, c) for q = 2 (nuclear vs Frobenius), r c for q = 1 or inf."""
    return float(min(rows, cols)) if q == 2.0 else float(rows * cols)


def variance_bound(model_or_shapes, q, batch_size: int, data_bound: float = 1.0,
                   *, method: str = "tight") -> float:
    """A sigma2 for F Assumption 3.6 with the Finsler structure (25), any widths and biases.

    ``model_or_shapes`` is a DSGD model or a list of layer-matrix shapes (rows, cols) with cols
    counting the bias column, ordered input to output.

    ``method="tight"`` (see docs/dsgd.md): with M^2 = d_{q,1}^2 / d_{q,2} (so that every
    per-example gradient satisfies ||df_j/dw_i||_* <= M p_i(w), F eq. 84),
    E||delta||_w^2 <= sum_i E||delta_i||_*^2 / p_i^2 <= (M^2 / b) sum_i kappa_i^2, where kappa_i
    compares the dual q-norm with the Frobenius norm on layer i and the Euclidean variance of a
    mean of b i.i.d. samples is at most 1/b of their second moment.
    ``method="paper"``: :func:`variance_bound_paper` with n = the largest matrix dimension.
    """
    q = check_q(q)
    b = _batch_size(batch_size)
    D = _pos("data_bound", data_bound)
    if isinstance(model_or_shapes, Sequence) and not hasattr(model_or_shapes, "forward"):
        shapes = [(int(r), int(c)) for r, c in model_or_shapes]
    else:
        from .bounds import parse_model

        shapes = [(s.out_features, s.in_features + int(s.bias)) for s in parse_model(model_or_shapes)]
    if not shapes:
        raise ValueError("need at least one layer")
    if method == "paper":
        n = max(max(r, c) for r, c in shapes)
        return variance_bound_paper(len(shapes), n, q, b, D)
    if method != "tight":
        raise ValueError(f"method must be 'tight' or 'paper', got {method!r}")
    from ..losses import f_loss_constants

    d1, d2 = f_loss_constants(shapes[-1][0], q, D)
    return d1 * d1 / d2 * sum(_shape_factor(r, c, q) for r, c in shapes) / b

"""Objective smoothness and gradient-descent rates (RH Prop. 4.2, Thm 4.1, Appendix B.1-B.2).

The objective is F(w) = f(psi(w)) + r(w) with f a loss on the batch output of the chain and
r(w) = lambda/2 ||w||_2^2 (so L_r = lambda).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .chain import ChainError, _mul
from .recursion import ChainBounds

__all__ = ["LossConstants", "ObjectiveBounds", "loss_constants", "objective_bounds", "LOSSES", "MODES"]

LOSSES = ("cross-entropy", "square", "autoencoder", "convex-clustering")
MODES = ("paper", "tight")


@dataclass(frozen=True)
class LossConstants:
    """l_f and L_f of the loss f on the chain's output set (RH Appendix B.1/B.2)."""

    lipschitz: float
    smoothness: float
    name: str = ""


def loss_constants(
    loss: str,
    *,
    batch_size: int,
    output_bound: float,
    mode: str = "paper",
    target_norm: float = 1.0,
    input_norm: float = 1.0,
) -> LossConstants:
    """Constants of the batch loss f(yhat) = (1/n) sum_i f_i(yhat_i), n = ``batch_size``.

    ``paper`` (RH App. B.1, using l_f <= max_i l_{f_i}, L_f <= max_i L_{f_i}):

    * cross-entropy (logistic loss on one-hot labels): l = 2, L = 2;
    * square, f_i = ||yhat_i - y_i||^2 / 2 with ||y_i|| <= rho_Y (``target_norm``):
      l = rho_C + rho_Y with rho_C = ``output_bound`` (m_psi bounds every ||yhat_i||), L = 1;
    * autoencoder, the square loss with targets the inputs: rho_Y = ``input_norm``;
    * convex-clustering (RH Prop. B.1): l = n(n-1)/2, L = 1 (raised to sqrt(2) for n = 2, where
      the printed value is below the attained sup).

    ``tight`` (proofs in docs/tight-constants.md) keeps the 1/n of the batch mean, since
    grad f = (1/n)(grad f_i)_i and grad^2 f = (1/n) blockdiag(grad^2 f_i):

    * cross-entropy: ||softmax(yhat_i) - y_i|| <= sqrt(2) and grad^2 f_i = diag(p) - p p^T has norm
      <= 1/2, so l = sqrt(2/n), L = 1/(2n);
    * square/autoencoder: ||grad f|| = ||Yhat - Y||_F / n <= (rho_C + sqrt(n) rho_Y)/n, L = 1/n;
    * convex-clustering: grad f = D^T u with ||u_ij|| <= 1 and ||D||^2 = n, so l = n sqrt((n-1)/2)
      (attained by a far-apart regular simplex), L = 1.
    """
    if mode not in MODES:
        raise ChainError(f"unknown constants mode {mode!r}; choose one of {', '.join(MODES)}")
    if batch_size < 1:
        raise ChainError(f"batch size must be >= 1, got {batch_size}")
    n = float(batch_size)
    if loss == "cross-entropy":
        if mode == "paper":
            return LossConstants(2.0, 2.0, loss)
        return LossConstants(math.sqrt(2.0 / n), 1.0 / (2.0 * n), loss)
    if loss in ("square", "autoencoder"):
        rho_y = target_norm if loss == "square" else input_norm
        if rho_y < 0 or math.isnan(rho_y):
            raise ChainError(f"target norm must be >= 0, got {rho_y}")
        if mode == "paper":
            return LossConstants(output_bound + rho_y, 1.0, loss)
        return LossConstants((output_bound + math.sqrt(n) * rho_y) / n, 1.0 / n, loss)
    if loss == "convex-clustering":
        # grad f = D^T u with ||u_ij|| <= 1 and ||D||^2 = n (pair-difference operator), so
        # ||grad f|| <= sqrt(n) sqrt(n(n-1)/2), attained by a far-apart regular simplex.
        exact = n * math.sqrt((n - 1) / 2.0)
        # RH Prop. B.1 prints n(n-1)/2, below the attained sup when n = 2: paper mode keeps the
        # printed value only where it is sound (docs/tight-constants.md).
        lip = exact if mode == "tight" else max(n * (n - 1) / 2, exact)
        return LossConstants(lip, 1.0, loss)
    raise ChainError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")


@dataclass(frozen=True)
class ObjectiveBounds:
    """Smoothness of F = f o psi + r on C and what gradient descent gets from it.

    ``smoothness`` = L_psi l_f + l_psi^2 L_f + L_r (RH Prop. 4.2 with l~_f = l_f);
    ``step_size`` = 1/smoothness; ``iterations`` = ceil(2 L_F Delta / epsilon^2) (RH Thm 4.1,
    constant 2 from the descent lemma of projected gradient descent with step 1/L_F:
    F(w_{k+1}) <= F(w_k) - ||G_k||^2 / (2 L_F), so min_k ||G_k|| <= epsilon after that many
    steps); ``gap`` is the Delta used, an upper bound on F(w_0) - min_C F.
    """

    loss_lipschitz: float
    loss_smoothness: float
    regularization_smoothness: float
    smoothness: float
    step_size: float
    iterations: float
    epsilon: float
    gap: float


def objective_bounds(
    chain: ChainBounds,
    loss: LossConstants,
    *,
    l2: float = 0.0,
    epsilon: float = 1e-2,
    gap: float | None = None,
    weight_norms: tuple[float, ...] | None = None,
) -> ObjectiveBounds:
    """RH Prop. 4.2 and Thm 4.1 for the chain bounds ``chain`` and loss constants ``loss``.

    Without ``gap`` the certificate uses Delta <= sup_C F - inf_C F
    <= 2 l_f m_psi + (range of r on C): lambda/2 tau R^2 for balls around 0 and
    lambda/2 sum_l ((||v*_l|| + R)^2 - max(0, ||v*_l|| - R)^2) around the weights
    (``weight_norms``).
    """
    if l2 < 0 or math.isnan(l2):
        raise ChainError(f"--l2 must be >= 0, got {l2}")
    if not epsilon > 0:
        raise ChainError(f"--epsilon must be > 0, got {epsilon}")
    smooth = _mul(chain.smoothness, loss.lipschitz) + _mul(_mul(chain.lipschitz, chain.lipschitz), loss.smoothness) + l2
    step = 0.0 if math.isinf(smooth) else (math.inf if smooth == 0 else 1.0 / smooth)
    if gap is None:
        R = chain.radius
        if weight_norms is None:
            reg_range = _mul(0.5 * l2, len(chain.layers) * R * R)
        else:
            # (w + R)^2 - max(0, w - R)^2, written without cancellation: 4 w R when w >= R
            reg_range = _mul(0.5 * l2, sum(_mul(4.0 * w, R) if w >= R else (w + R) ** 2 for w in weight_norms))
        gap = _mul(2.0 * loss.lipschitz, chain.output_bound) + reg_range
    elif gap < 0 or math.isnan(gap):
        raise ChainError(f"--gap must be >= 0, got {gap}")
    iterations = _mul(_mul(2.0, smooth), gap) / (epsilon * epsilon)
    if not math.isinf(iterations):
        iterations = float(math.ceil(iterations))
    return ObjectiveBounds(
        loss_lipschitz=loss.lipschitz,
        loss_smoothness=loss.smoothness,
        regularization_smoothness=float(l2),
        smoothness=smooth,
        step_size=step,
        iterations=iterations,
        epsilon=float(epsilon),
        gap=gap,
    )

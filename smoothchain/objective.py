"""Objective smoothness and gradient-descent rates (RH Prop. 4.2, Thm 4.1, Appendix B.1-B.2).

The objective is F(w) = f(psi(w)) + r(w) with f a loss on the batch output of the chain and
r(w) = lambda/2 ||w||_2^2 (so L_r = lambda).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .chain import ChainError, _mul
from .losses import MODES, LossConstants, loss_names
from .losses import rh_loss_constants as loss_constants  # RH App. B.1/B.2, from the loss table
from .recursion import ChainBounds

__all__ = ["LossConstants", "ObjectiveBounds", "loss_constants", "objective_bounds", "LOSSES", "MODES"]

#: the losses the certificate knows the constants of (rows of :data:`smoothchain.losses.LOSSES`)
LOSSES = loss_names(certified=True)


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


def objective_bounds(chain: ChainBounds, loss: LossConstants, *, l2: float = 0.0, epsilon: float = 1e-2,
                     gap: float | None = None, weight_norms: tuple[float, ...] | None = None,
                     loss_part: float | None = None) -> ObjectiveBounds:
    """RH Prop. 4.2 and Thm 4.1 for the chain bounds ``chain`` and loss constants ``loss``.

    Without ``gap`` the certificate uses Delta <= sup_C F - inf_C F
    <= 2 l_f m_psi + (range of r on C): lambda/2 tau R^2 for balls around 0 and
    lambda/2 sum_l ((||v*_l|| + R)^2 - max(0, ||v*_l|| - R)^2) around the weights
    (``weight_norms``).  ``loss_part``: another bound on sup_C ||grad^2 (f o psi)|| than
    L_psi l_f + l_psi^2 L_f (the local certificates' adjoint bound, docs/local.md Prop. 4); the
    smaller one is used.
    """
    if l2 < 0 or math.isnan(l2):
        raise ChainError(f"--l2 must be >= 0, got {l2}")
    if not epsilon > 0:
        raise ChainError(f"--epsilon must be > 0, got {epsilon}")
    part = _mul(chain.smoothness, loss.lipschitz) + _mul(_mul(chain.lipschitz, chain.lipschitz), loss.smoothness)
    if loss_part is not None and not math.isnan(loss_part):
        part = min(part, loss_part)
    smooth = part + l2
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

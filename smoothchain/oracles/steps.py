"""The three oracle steps of RH eqs. (12)-(14) on a chain (public API).

The DP methods run over an ``nn.Sequential``, or over the chain of blocks of any module torch.fx
can trace (:func:`smoothchain.torch_graph.chain_of_blocks`, docs/graphs.md); the dual and
``"autodiff"`` need only the autodiff oracle.

Objective F(w) = f(psi(w)) + r(w), r(w) = l2/2 ||w||^2 over all parameters, f a row of
the loss table (:mod:`smoothchain.losses`): "square", "cross-entropy" (batch means),
"autoencoder" (the square loss with targets x; y is not used) for every step, and
"convex-clustering" (RH eq. (25), a Moreau envelope with no Hessian; y is not used) for the
gradient step only.  Each function returns the direction w~* = w_{t+1} - w_t of

* gradient (12):     argmin  <grad (f o psi)(w_t), w~> + <l2 w_t, w~> + 1/(2 gamma)||w~||^2
                     = -gamma (grad (f o psi)(w_t) + l2 w_t);
* Gauss-Newton (13): argmin  q_f(psi(w_t) + grad psi(w_t)^T w~; psi(w_t)) + q_r(w_t + w~; w_t)
                             + 1/(2 gamma)||w~||^2;
* Newton (14):       argmin  q_{f o psi}(w_t + w~; w_t) + q_r(w_t + w~; w_t) + 1/(2 gamma)||w~||^2,

(l_h, q_h the first- and second-order Taylor models of h).  Methods:

==============  ==========================================  =================================
step            methods                                     default
==============  ==========================================  =================================
gradient        "dp" (Prop. C.2 = backprop), "dense"        "dp"
Gauss-Newton    "dual" (Prop. 3.5), "dp" (Prop. C.1),        "dual"
                "dense"
Newton          "dp" (Prop. C.1 / Algo. 4), "dense"         "dp"
==============  ==========================================  =================================

``gamma`` in the result is the step size used; only Newton can halve it (Algo. 4 line 24; the
other problems are strongly convex for every gamma > 0 since f and r are convex, RH App. C.1).
``feasible`` is Algo. 4's flag: True iff the problem at the *requested* gamma was strongly
convex.  When it is False the direction is still the exact minimiser at the returned (halved)
gamma.  ``oracle_calls`` counts chain sweeps by autodiff (``autodiff`` module docstring).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..losses import loss_function
from .autodiff import LOSSES, SECOND_ORDER_LOSSES, AutodiffOracle, OracleCounter, loss_grad
from .dense import dense_gauss_newton, dense_gradient, dense_newton
from .dual import gauss_newton_dual
from .lq import assemble_lq, gradient_dp, solve_lq

__all__ = ["StepResult", "gradient_step", "gauss_newton_step", "newton_step"]


@dataclass(frozen=True)
class StepResult:
    """direction: tensors shaped like ``model.parameters()`` (w_{t+1} = w_t + direction);
    oracle_calls: autodiff calls used; gamma: step size finally used; feasible: Algo. 4's flag."""

    direction: list[torch.Tensor]
    oracle_calls: int
    gamma: float
    feasible: bool


def _check(model, loss: str, l2, gamma, method: str, methods: tuple[str, ...],
           losses: tuple[str, ...] = LOSSES) -> tuple[float, float]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if loss not in losses:
        if loss in LOSSES:
            raise ValueError(f"loss {loss!r} has no Hessian (RH Prop. B.1: a Moreau envelope, "
                             f"C^1 only); this step needs one of {losses}; use gradient_step")
        raise ValueError(f"loss must be one of {losses}, got {loss!r}")
    if method not in methods:
        raise ValueError(f"method must be one of {methods}, got {method!r}")
    try:
        gamma, l2 = float(gamma), float(l2)
    except (TypeError, ValueError):
        raise ValueError(f"gamma and l2 must be numbers, got gamma={gamma!r}, l2={l2!r}") from None
    if not (gamma > 0 and math.isfinite(gamma)):
        raise ValueError(f"gamma must be a finite positive number, got {gamma!r}")
    if not (l2 >= 0 and math.isfinite(l2)):
        raise ValueError(f"l2 must be a finite non-negative number, got {l2!r}")
    return gamma, l2


def _as_chain(model, what: str, instead: str) -> tuple[nn.Sequential, list[int] | None]:
    """The chain the DP of RH Algo. 4 runs over: the model itself when it is an ``nn.Sequential``,
    else its chain of blocks (:func:`smoothchain.torch_graph.chain_of_blocks`), with the position
    in ``model.parameters()`` of each of the chain's parameters (None: the same order)."""
    if isinstance(model, nn.Sequential):
        return model, None
    from ..chain import ChainError
    from ..torch_graph import chain_of_blocks

    try:
        chain = chain_of_blocks(model)
    except ChainError as err:
        raise TypeError(f"{what} by dynamic programming (RH Algo. 4) needs a chain, or a module torch.fx "
                        f"can cut into a chain of blocks (docs/graphs.md): {err}; or use {instead}") from None
    index = {id(p): i for i, p in enumerate(model.parameters())}
    order = [index.get(id(p), -1) for p in chain.parameters()]
    if sorted(order) != list(range(len(index))):
        raise TypeError(f"{what}: the chain of blocks of {type(model).__name__} does not hold each of its "
                        f"parameters once (a parameter shared or used by two blocks); use {instead}")
    return chain, order


def _in_model_order(direction, order):
    if order is None:
        return direction
    out = [None] * len(order)
    for d, i in zip(direction, order):
        out[i] = d
    return out


def _result(direction, counter: OracleCounter, gamma: float, feasible: bool) -> StepResult:
    return StepResult([d.detach() for d in direction], counter.calls, float(gamma), bool(feasible))


def _by_dp(model, x, f, l2, gamma, kind, counter, what: str, instead: str):
    """The step by the DP of Algo. 4 over the model's chain (:func:`_as_chain`), in the model's
    parameter order: (direction, gamma, feasible)."""
    chain, order = _as_chain(model, what, instead)
    lq = assemble_lq(chain, x, f, l2, kind, counter)
    sol = solve_lq(lq, gamma)
    return _in_model_order(lq.chain.to_parameters(sol.v), order), sol.gamma, sol.feasible


def gradient_step(model, x, y, *, loss, l2=0.0, gamma, method="dp") -> StepResult:
    """Gradient step (12): direction -gamma (grad (f o psi)(w_t) + l2 w_t); one oracle call.

    ``method="dp"`` back-propagates layer by layer over the chain (RH Prop. 3.1, Algo. 2);
    ``"autodiff"`` makes the same one call through any module, graphs with skip connections
    included (RH Algo. 3's oracle, docs/graphs.md); ``"dense"`` builds the Jacobian (tests).
    """
    gamma, l2 = _check(model, loss, l2, gamma, method, ("dp", "autodiff", "dense"))
    f, counter = loss_function(loss, y, x), OracleCounter()
    if method == "dp":
        chain, order = _as_chain(model, "gradient_step", "method='autodiff'")
        direction = _in_model_order(gradient_dp(chain, x, f, l2, gamma, counter), order)
    elif method == "autodiff":
        oracle = AutodiffOracle(model, x, counter)
        grads = oracle.backward(loss_grad(f, oracle.output))
        direction = [-gamma * (g + l2 * w.detach()) for g, w in zip(grads, oracle.params)]
    else:
        direction = dense_gradient(model, x, f, l2, gamma, counter)
    return _result(direction, counter, gamma, True)


def gauss_newton_step(model, x, y, *, loss, l2=0.0, gamma, method="dual") -> StepResult:
    """Regularised Gauss-Newton step (13); by the dual it uses <= 2q+1 oracle calls (Prop. 3.5)."""
    gamma, l2 = _check(model, loss, l2, gamma, method, ("dual", "dp", "dense"), SECOND_ORDER_LOSSES)
    f, counter = loss_function(loss, y, x), OracleCounter()
    if method == "dual":
        direction, _ = gauss_newton_dual(model, x, f, l2, gamma, counter)
        feasible = True
    elif method == "dp":
        direction, gamma, feasible = _by_dp(model, x, f, l2, gamma, "gauss-newton", counter,
                                            "gauss_newton_step(method='dp')",
                                            "method='dual' (Prop. 3.5, autodiff calls only)")
    else:
        direction, feasible = dense_gauss_newton(model, x, f, l2, gamma, counter), True
    return _result(direction, counter, gamma, feasible)


def newton_step(model, x, y, *, loss, l2=0.0, gamma, method="dp") -> StepResult:
    """Newton step (14) by DP (Algo. 4), halving gamma until the step problem is strongly convex."""
    gamma, l2 = _check(model, loss, l2, gamma, method, ("dp", "dense"), SECOND_ORDER_LOSSES)
    f, counter = loss_function(loss, y, x), OracleCounter()
    if method == "dp":
        direction, gamma, feasible = _by_dp(model, x, f, l2, gamma, "newton", counter, "newton_step",
                                            "method='dense' (small models) or gauss_newton_step(method='dual')")
    else:
        direction, gamma, feasible = dense_newton(model, x, f, l2, gamma, counter)
    return _result(direction, counter, gamma, feasible)

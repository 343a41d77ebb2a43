"""Second-order optimizers on chains of layers: regularised Gauss-Newton (RH eq. (13)) and Newton
(RH eq. (14)) steps, as ``torch.optim.Optimizer`` subclasses.

Each ``step(closure)`` takes the batch ``(x, y) = closure()``, computes the step's direction with
the oracle of :mod:`smoothchain.oracles` -- :func:`~smoothchain.oracles.gauss_newton_step`
(by the dual, RH Prop. 3.5, 2q+1 autodiff calls at most, by default) or
:func:`~smoothchain.oracles.newton_step` (by dynamic programming, RH Prop. C.1 / Algo. 4, with
gamma halved until the step problem is strongly convex) -- and applies w <- w + direction.
It returns F(w_t) = f(psi(w_t)) + l2/2 ||w_t||^2 at the weights *before* the step (a 0-dim
tensor), and keeps ``last_result`` (the :class:`~smoothchain.oracles.StepResult`) and
``last_gamma`` (the step size used, after any halving).  ``gamma`` is requested afresh at every
step (Algo. 4 halves within a step only).

Example::

    opt = GaussNewton(model, loss="cross-entropy", gamma=1.0, l2=1e-4)
    for x, y in batches:
        value = opt.step(lambda: (x, y))

The closure gives the batch rather than a loss because the oracles need the chain's output
and the loss separately (RH Sec. 3).  ``loss`` is one of "square", "cross-entropy" and
"autoencoder" (targets = inputs; y is not used); "convex-clustering" has no Hessian (RH Prop.
B.1) and is rejected.  The DP steps take an ``nn.Sequential`` chain or any module torch.fx
cuts into a chain of blocks (docs/graphs.md); the dual Gauss-Newton step accepts any module.
All the parameters form one group.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from ..oracles import StepResult, gauss_newton_step, newton_step
from ..losses import loss_function
from ..oracles.autodiff import SECOND_ORDER_LOSSES

__all__ = ["GaussNewton", "Newton"]


def _finite(name: str, value, *, positive: bool) -> float:
    """``value`` as a float, finite and > 0 (``positive``) or >= 0, else a ValueError naming it."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        x = math.nan
    if math.isfinite(x) and (x > 0 if positive else x >= 0):
        return x
    kind = "positive" if positive else "non-negative"
    raise ValueError(f"{name} must be a finite {kind} number, got {value!r}")


class _OracleOptimizer(torch.optim.Optimizer):
    """Shared machinery: one parameter group (the whole chain), an oracle step function."""

    _oracle: Callable[..., StepResult]
    _methods: tuple[str, ...]

    def __init__(self, model: nn.Module, *, loss: str, gamma: float, l2: float, method: str):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if loss not in SECOND_ORDER_LOSSES:
            raise ValueError(f"loss must be one of {SECOND_ORDER_LOSSES}, got {loss!r}"
                             + (" (no Hessian, RH Prop. B.1: use gradient steps)"
                                if loss == "convex-clustering" else ""))
        if method not in self._methods:
            raise ValueError(f"method must be one of {self._methods}, got {method!r}")
        params = list(model.parameters())
        if not params:
            raise ValueError("the model has no parameters: nothing to optimise")
        defaults = dict(gamma=_finite("gamma", gamma, positive=True),
                        l2=_finite("l2", l2, positive=False), loss=loss, method=method)
        super().__init__(params, defaults)
        self.model = model
        self.last_result: StepResult | None = None
        self.last_gamma: float | None = None

    def add_param_group(self, param_group: dict) -> None:
        if self.param_groups:
            raise ValueError(f"{type(self).__name__} optimises the whole chain as one group; "
                             "it takes no extra parameter groups")
        super().add_param_group(param_group)

    @torch.no_grad()
    def _objective(self, x, y, loss: str, l2: float) -> torch.Tensor:
        value = loss_function(loss, y, x)(self.model(x))
        if l2:
            value = value + 0.5 * l2 * sum((p * p).sum() for p in self.model.parameters())
        return value.detach()

    def step(self, closure=None) -> torch.Tensor:  # type: ignore[override]
        """One step on the batch ``(x, y) = closure()``; returns F(w_t) before the step."""
        if closure is None:
            raise ValueError(f"{type(self).__name__}.step needs a closure returning the batch (x, y)")
        batch = closure()
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise TypeError(f"the closure must return the batch (x, y), got {type(batch).__name__}")
        x, y = batch
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"the closure's x must be a tensor, got {type(x).__name__}")
        group = self.param_groups[0]
        gamma = _finite("gamma", group["gamma"], positive=True)
        l2 = _finite("l2", group["l2"], positive=False)
        loss, method = group["loss"], group["method"]
        value = self._objective(x, y, loss, l2)
        result = type(self)._oracle(self.model, x, y, loss=loss, l2=l2, gamma=gamma, method=method)
        with torch.no_grad():
            for p, d in zip(group["params"], result.direction):
                p.add_(d)
        state = self.state[group["params"][0]]
        state["step"] = state.get("step", 0) + 1
        self.last_result, self.last_gamma = result, result.gamma
        return value


class GaussNewton(_OracleOptimizer):
    """Regularised Gauss-Newton steps (RH eq. (13)); ``method`` "dual" (Prop. 3.5, default),
    "dp" (Prop. C.1) or "dense" (reference)."""

    _oracle = staticmethod(gauss_newton_step)
    _methods = ("dual", "dp", "dense")

    def __init__(self, model: nn.Module, *, loss: str = "square", gamma: float = 1.0,
                 l2: float = 0.0, method: str = "dual"):
        super().__init__(model, loss=loss, gamma=gamma, l2=l2, method=method)


class Newton(_OracleOptimizer):
    """Newton steps (RH eq. (14)) by dynamic programming (Algo. 4, default ``method="dp"``) or
    dense; gamma is halved within a step until the step problem is strongly convex."""

    _oracle = staticmethod(newton_step)
    _methods = ("dp", "dense")

    def __init__(self, model: nn.Module, *, loss: str = "square", gamma: float = 1.0,
                 l2: float = 0.0, method: str = "dp"):
        super().__init__(model, loss=loss, gamma=gamma, l2=l2, method=method)
